"""The CPU examples in examples/ run, and say what their docstrings claim (a smoke test each;
the GPU one only checks that it stops cleanly without a GPU)."""
import importlib.util
import pathlib
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def run(name: str) -> dict:
    sys.path.insert(0, str(EXAMPLES))   # the examples import their shared _tiny.py
    try:
        spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.main()
    finally:
        sys.path.remove(str(EXAMPLES))


def test_hf_generate_compresses_with_the_oracles_tokens():
    out = run("hf_generate")
    assert out["tokens"] == out["oracle"] != out["exact"]
    assert max(out["stored"]) < 600


def test_hand_written_attention_is_compressed():
    out = run("hand_written_attention")
    assert max(out["stored"]) < 500 and len(out["tokens"]) == 6
    assert out["tokens"][0] == out["exact"][0]   # the prefill is exact


def test_explain_report_lists_every_site():
    out = run("explain_report")
    assert out["report"].sites and not out["report"].exact
    assert out["exact"].sites and not out["exact"].rewritten
    assert all("token_budget=None" in s.action for s in out["exact"].sites)
    assert "decode:" in str(out["report"])


def test_compare_policies_each_shrinks_or_keeps_its_cache():
    rows = run("compare_policies")
    for policy in ("rocketkv", "snapkv", "h2o", "streamingllm"):
        assert rows[policy]["stored"] < 700, policy
    assert rows["quest"]["stored"] == 707   # Quest keeps every token, reads pages of them
    assert all(row["agree"] >= 1 for row in rows.values())   # the first token: exact prefill


def test_multi_turn_replies_are_the_eager_references():
    out = run("multi_turn")
    assert out["replies"] == out["reference"]
    assert all(stored < length for length, stored in out["sizes"])


def test_padded_batch_rows_are_their_prompts_alone():
    out = run("padded_batch")
    assert out["batch"] == out["alone"]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="runs for real on a GPU")
def test_gpu_fast_path_stops_cleanly_without_a_gpu():
    assert run("gpu_fast_path") == {"skipped": "no CUDA GPU"}
