"""`rkv eval`: its tasks, its engines, and the CLI smoke case on the real model."""
import json
import os

import pytest
from hypothesis import given, settings, strategies as st
from models import tiny_hf

from rkv_compile import cli, evaluate
from rkv_compile.hf import MODELS, load_tokenizer
from rkv_compile.eager import multi_turn
from rkv_compile.tasks import FIRST_TURN_QUESTION, FIRST_TURN_TOKENS, TASKS, TWO_TURN_TASKS, Sample


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2")


# From 1K tokens (the shortest any run asks, --smoke): below it a task's needles are so much
# of the text that the first one's place in characters sits well before its depth
@settings(deadline=None, max_examples=25)
@given(task=st.sampled_from(sorted(TASKS)), context=st.integers(1000, 3000),
       depth=st.floats(0, 1), seed=st.integers(0, 2**20))
def test_tasks_hold_their_answers_at_their_length(tokenizer, task, context, depth, seed):
    sample = TASKS[task](tokenizer, context, depth, seed)
    length = len(tokenizer(sample.prompt).input_ids)
    assert (0.8 if task == "common_words" else 0.95) * context <= length <= 1.02 * context + 8
    for answer in sample.answers:
        assert answer in sample.prompt
    if task == "common_words":   # the ten answers appear far more often than any other word
        listed = [w for w in sample.prompt.split("\n")[1].split() if w.isalpha()]
        fewest_common = min(listed.count(a) for a in sample.answers)
        assert fewest_common > max(listed.count(w) for w in set(listed) - set(sample.answers))
    else:   # the needles sit from their depth of the haystack on (the first one there)
        haystack = sample.prompt[sample.prompt.index("\n") + 1: sample.prompt.rindex("\n")]
        first = min(haystack.index(a) for a in sample.answers) / len(haystack)
        assert first > depth - 0.12
        if task != "multikey":    # (the asked-for key need not be the first needle)
            assert first < depth + 0.12
    assert sample == TASKS[task](tokenizer, context, depth, seed)   # seeded


def test_score_is_the_fraction_of_answers_found():
    sample = Sample("t", "", ("12", "AbC", "9"), 4, 0.0, 0)
    assert sample.score("x 12 abc") == pytest.approx(2 / 3)
    assert sample.score("") == 0.0


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        evaluate.EvalSettings(["nope"], ["full"], [64], [100], 1)
    with pytest.raises(ValueError, match="'policy'"):
        evaluate.EvalSettings(["passkey"], ["nope"], [64], [100], 1)
    with pytest.raises(ValueError, match="token_budget"):
        evaluate.EvalSettings(["passkey"], ["rocketkv"], [1], [100], 1)
    with pytest.raises(ValueError, match="engine must be"):
        evaluate.EvalSettings(["passkey"], ["full"], [64], [100], 1, engine="jit")
    with pytest.raises(ValueError, match="samples must be"):
        evaluate.EvalSettings(["passkey"], ["full"], [64], [100], 0)
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        evaluate.EvalSettings(["passkey"], ["full"], [64], [100], 1, model="nope")
    with pytest.raises(ValueError, match="smollm2 reads 8192 tokens: contexts must be at most"):
        evaluate.EvalSettings(["passkey"], ["full"], [64], [100, 16000], 1)
    evaluate.EvalSettings(["passkey"], ["full"], [64], [16000], 1, model="qwen2.5-coder-0.5b")


def test_compile_engine_matches_eager_engine(tokenizer):
    """The product path (generate under backend="rocketkv") gives the outputs of the eager
    application the sweeps use, on a tiny random model with the real tokenizer."""
    model = tiny_hf("llama", vocab=len(tokenizer))
    model.generation_config.eos_token_id = None
    outputs, records = {}, {}
    for engine in ("eager", "compile"):
        run = evaluate.EvalSettings(["passkey"], ["rocketkv", "streamingllm", "h2o",
                                                  "kvquant:kv_bits=4"], [64], [300], 2,
                                    engine=engine)
        records[engine] = evaluate.run(model, tokenizer, run, False)["records"]
        outputs[engine] = [r["output"] for r in records[engine]]
    assert outputs["eager"] == outputs["compile"]
    assert len(set(outputs["eager"])) > 1
    # the compile engine measures the caches' tensors: at least the computed bytes (new-token
    # slots, headers and rounding come on top); codes hold less than rocketkv's exact tokens
    for computed, held in zip(records["eager"], records["compile"]):
        assert computed["kv_mib"] <= held["kv_mib"] < 3 * computed["kv_mib"], (computed, held)
    held = {r["policy"]: r["kv_mib"] for r in records["compile"]}
    assert held["kvquant:kv_bits=4"] < held["streamingllm"]


def test_transformers_quantized_cache_is_a_reference_row(tokenizer):
    """`hf-quantized` rows run plain generate over transformers' own QuantizedCache (here fp8:
    quanto and hqq need packages this project does not install) beside our policies: its
    replies are transformers' own, and what it holds is measured from the cache's tensors (fp8
    entries for the float32 model's: about a quarter of full KV's bytes). Its bad options,
    and a backend whose package is missing, are ValueErrors naming them."""
    from transformers import QuantizedCache

    from rkv_compile.hf import cache_argument

    model = tiny_hf("llama", vocab=len(tokenizer))
    model.generation_config.eos_token_id = None
    run = evaluate.EvalSettings(["passkey"], ["full", "hf-quantized:backend=fp8"], [64], [300], 2)
    records = evaluate.run(model, tokenizer, run, False)["records"]
    held = {(r["policy"], r["index"]): r["kv_mib"] for r in records}
    for index in range(2):
        assert 0.2 < held["hf-quantized:backend=fp8", index] / held["full", index] < 0.3
    sample = TASKS["passkey"](tokenizer, 300, evaluate._depth(0, 2),
                              evaluate._seed("passkey", 300, 0))
    ids = tokenizer(sample.prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=sample.max_new_tokens, do_sample=False,
                         **{cache_argument(): QuantizedCache("fp8", model.config)})
    want = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    row = next(r for r in records if r["policy"] == "hf-quantized:backend=fp8" and not r["index"])
    assert want.startswith(row["output"]) and row["output"]
    for bad, named in [("hf-quantized:bits=4", "takes backend and nbits, axis_key"),
                       ("hf-quantized:backend=x", "backend must be one of"),
                       ("hf-quantized:backend=fp8:nbits=4", "'fp8' takes no nbits"),
                       ("hf-quantized:backend=fp8:axis_key=-1", "'fp8' takes no axis_key"),
                       ("hf-quantized:backend=quanto:nbits=four", "nbits must be an integer"),
                       ("hf-quantized:axis_key=last", "axis_key must be an integer")]:
        with pytest.raises(ValueError, match=named):
            evaluate.EvalSettings(["passkey"], [bad], [64], [300], 1)
    import transformers.utils

    for backend, package, available in [("quanto", "optimum-quanto", "is_optimum_quanto_available"),
                                        ("hqq", "hqq", "is_hqq_available")]:
        if getattr(transformers.utils, available)():
            assert evaluate.hf_quantized_options(f"hf-quantized:backend={backend}")["nbits"] == 4
            assert evaluate.hf_quantized_options(
                f"hf-quantized:backend={backend}:axis_key=-1:q_group_size=32") == \
                dict(backend=backend, nbits=4, axis_key=-1, q_group_size=32)
        else:
            with pytest.raises(ValueError, match=f"needs the {package} package"):
                evaluate.EvalSettings(["passkey"], [f"hf-quantized:backend={backend}"], [64],
                                      [300], 1)


@settings(deadline=None, max_examples=10)
@given(task=st.sampled_from(sorted(TASKS)), seed=st.integers(0, 2**20))
def test_two_turn_variant_asks_its_question_second(tokenizer, task, seed):
    """The first turn is the task's context with an unrelated question; the second its own."""
    one = TASKS[task](tokenizer, 600, 0.5, seed)
    two = TWO_TURN_TASKS[f"{task}-2turn"](tokenizer, 600, 0.5, seed)
    assert two.prompt == one.prompt[: one.prompt.rindex("\n")] + FIRST_TURN_QUESTION
    assert one.prompt.endswith(two.follow_up) and two.follow_up.startswith("\n")
    assert (two.task, two.answers) == (f"{task}-2turn", one.answers)


def test_two_turn_tasks_run_conversations(tokenizer):
    """A two-turn task's record is the second reply of `eager.multi_turn` under the
    configuration (cut at a line break); the first turn's reply is not scored."""
    model = tiny_hf("llama", vocab=len(tokenizer))
    model.generation_config.eos_token_id = None
    run = evaluate.EvalSettings(["passkey-2turn"], ["full", "rocketkv", "rocketkv-mt"], [64],
                                [300], 1)
    records = evaluate.run(model, tokenizer, run, False)["records"]
    sample = TWO_TURN_TASKS["passkey-2turn"](tokenizer, 300, 0.5, evaluate._seed("passkey", 300, 0))
    ids = tokenizer(sample.prompt, return_tensors="pt").input_ids
    follow_up = tokenizer(sample.follow_up, add_special_tokens=False, return_tensors="pt").input_ids
    assert [(r["task"], r["policy"], r["budget"]) for r in records] == [
        ("passkey-2turn", "full", None), ("passkey-2turn", "rocketkv", 64),
        ("passkey-2turn", "rocketkv-mt", 64)]
    for r in records:
        config = run.config(r["policy"], r["budget"], sample.max_new_tokens)
        reply = multi_turn(model, [ids, follow_up], config, [FIRST_TURN_TOKENS, 12])[1]
        assert tokenizer.decode(reply, skip_special_tokens=True).startswith(r["output"])
        assert r["kv_mib"] is None
    assert len({r["output"] for r in records}) > 1   # the policies differ on the second turn
    with pytest.raises(ValueError, match="eager engine"):
        evaluate.EvalSettings(["passkey-2turn"], ["full"], [64], [300], 1, engine="compile")
    with pytest.raises(ValueError, match=r"evict during decode \(\['h2o'\]\)"):
        evaluate.EvalSettings(["passkey-2turn"], ["full", "h2o"], [64], [300], 1)


def test_smoke_run_on_smollm2(tmp_path, capsys):
    """`rkv eval --smoke` on two tasks (the shortest answer and the longest list; every task's
    prompts are checked above): once at 1K tokens, full KV / rocketkv / snapkv / h2o at budget
    128 and 4-bit kvquant; the KV cache each leaves, quantized as packed codes and scales."""
    tasks = ["passkey", "common_words"]
    assert cli.main(["eval", "--smoke", "--tasks", ",".join(tasks), "--device", "cpu",
                     "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert len(result["records"]) == len(tasks) * 5
    memory = result["kv_mib"]["1000"]
    layers, heads, dim = 30, 3, 64   # SmolLM2-135M, float32 on the CPU
    full_mib = memory["full"]["full"]
    prompts = [r["prompt_tokens"] for r in result["records"] if r["policy"] == "full"]
    prompt = sum(prompts) / len(prompts)   # kv_mib is the mean over the samples
    assert full_mib > layers * heads * 2 * prompt * dim * 4 / 2**20
    assert memory["kvquant:kv_bits=4"]["full"] < 0.2 * full_mib   # 4 of 32 bits, plus scales
    assert memory["rocketkv"]["128"] < 0.5 * full_mib and memory["h2o"]["128"] < 0.5 * full_mib
    assert "KV cache after generation" in (tmp_path / "eval.md").read_text()
    read = result["kv_read_kib"]["1000"]   # a decode step's reads: all of full's cache, ...
    assert abs(read["full"]["full"] - 1024 * full_mib) < 0.05 * 1024 * full_mib
    assert read["rocketkv"]["128"] < 0.5 * read["full"]["full"]   # ... a part of rocketkv's
    assert "KV read by a decode step" in (tmp_path / "eval.md").read_text()
    scores = {(r["task"], r["policy"]): r["score"] for r in result["records"]}
    assert scores["passkey", "full"] == 1.0     # the real model retrieves at 1K tokens
    summary = result["summary"]["1000"]
    assert set(summary) == set(tasks) | {"mean"}
    assert summary["passkey"]["rocketkv"]["128"] == 100 * scores["passkey", "rocketkv"]
    assert "| rocketkv |" in (tmp_path / "eval.md").read_text()
    assert "| snapkv |" in capsys.readouterr().out
    assert os.path.exists(tmp_path / "eval.png") or not _has_matplotlib()


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_merge_lets_later_runs_replace_rows():
    def result(policy, score, tasks):
        records = [{"context": 100, "task": t, "index": 0, "policy": policy, "budget": 64,
                    "score": score} for t in tasks]
        settings = {"tasks": tasks, "policies": [policy], "budgets": [64], "contexts": [100],
                    "samples": 1}
        return {"settings": settings, "records": records}

    merged = evaluate.merge([result("quest", 0.0, ["a", "b"]), result("full", 1.0, ["a"]),
                             result("quest", 0.5, ["b"])])
    summary = merged["summary"]["100"]
    assert summary["a"] == {"quest": {"64": 0.0}, "full": {"64": 100.0}}
    assert summary["b"] == {"quest": {"64": 50.0}}
    assert merged["settings"]["tasks"] == ["a", "b"] and len(merged["records"]) == 3


def test_policy_entries_carry_their_own_options():
    settings = evaluate.EvalSettings(["passkey"], ["full", "rocketkv:stages=stage1:kernel_size=31"],
                                     [64], [100], 1)
    config = settings.config("rocketkv:stages=stage1:kernel_size=31", 64, 8)
    assert (config.method.stages, config.method.kernel_size, config.token_budget) == \
        ("stage1", 31, 64)
    assert not settings.config("full", None, 8).compresses
    with pytest.raises(ValueError, match="'sink_size' does not apply"):
        evaluate.EvalSettings(["passkey"], ["rocketkv:sink_size=3"], [64], [100], 1)


def test_a_stopped_run_resumes_where_it_stopped(tokenizer, tmp_path, monkeypatch):
    """Records reach the journal as they are made; a run started again over it computes only
    what is missing (a line cut short by the stop included) and ends with the records of an
    uninterrupted run. A journal of other settings is refused, naming itself."""
    model = tiny_hf("llama", vocab=len(tokenizer))
    model.generation_config.eos_token_id = None
    run = evaluate.EvalSettings(["passkey", "multikey"], ["full", "rocketkv", "snapkv"], [64],
                                [300], 2)
    journal = str(tmp_path / evaluate.JOURNAL)
    whole = evaluate.run(model, tokenizer, run, False, journal=journal)["records"]
    lines = open(journal).read().splitlines()
    assert len(lines) == 1 + len(whole) == 1 + 2 * 2 * 3
    with open(journal, "w") as f:   # stopped after 5 records, while writing the 6th
        f.write("\n".join(lines[:6]) + "\n" + lines[6][:20])
    calls = []
    continue_greedy = evaluate.eager.continue_greedy
    monkeypatch.setattr(evaluate.eager, "continue_greedy",
                        lambda *a, **k: calls.append(1) or continue_greedy(*a, **k))
    resumed = evaluate.run(model, tokenizer, run, False, journal=journal)["records"]
    assert len(calls) == len(whole) - 5
    key = evaluate._key
    assert sorted(map(key, resumed)) == sorted(map(key, whole))
    assert {key(r): r["output"] for r in resumed} == {key(r): r["output"] for r in whole}
    assert len(open(journal).read().splitlines()) == 1 + len(whole)
    other = evaluate.EvalSettings(["passkey"], ["full"], [64], [300], 1)
    with pytest.raises(ValueError, match="records.jsonl is the journal of a run with other"):
        evaluate.run(model, tokenizer, other, False, journal=journal)


def test_rkv_explain_reports_smollm2s_sites(capsys):
    """`rkv explain`: one row per attention site of SmolLM2's prefill and decode graphs (30
    layers each); a bad option is named before the model loads."""
    assert cli.main(["explain", "--context", "300"]) == 0
    out = capsys.readouterr().out
    assert out.count("prefill: exact attention") == 30 and out.count("decode: rocketkv") == 30
    assert cli.main(["explain", "--options", "token_budget=64,policy=nope"]) == 2
    assert "'policy' must be one of" in capsys.readouterr().err


def test_rkv_help_lists_every_task_and_policy_without_importing_torch():
    """`rkv --help` starts at once: the package and the command import no torch for it, and
    the names it lists are the registries' (held here, as --help cannot import them)."""
    import subprocess
    import sys

    from rkv_compile.policies import POLICIES

    assert list(cli.TASKS) == sorted(evaluate.ALL_TASKS)
    assert list(cli.POLICIES) == sorted(POLICIES)
    assert list(cli.MODELS) == sorted(MODELS)
    probe = ("import sys\nfrom rkv_compile import cli\ntry:\n    cli.main(['eval', '--help'])\n"
             "except SystemExit:\n    pass\nprint('torch imported:', 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout
    assert "torch imported: False" in out and "streamingllm" in out and "passkey-2turn" in out


def test_the_backend_name_registers_when_dynamo_loads_after_the_package():
    """A checkout has no entry point: `import rkv_compile` before torch still gives
    `backend="rocketkv"` (registered when Dynamo's registry loads)."""
    import subprocess
    import sys

    probe = ("import importlib.metadata as m\n"
             "real = m.entry_points  # as a checkout: no installed dynamo entry point\n"
             "m.entry_points = lambda **k: (real(group='no such group') if k.get('group') == "
             "'torch_dynamo_backends' else real(**k))\n"
             "import rkv_compile\nimport torch\n"
             "from torch._dynamo.backends.registry import lookup_backend\n"
             "print(lookup_backend('rocketkv') is rkv_compile._rocketkv_by_name)\n"
             "f = torch.compile(lambda x: x * 2, backend='rocketkv')\n"
             "print(f(torch.ones(2)).tolist())")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout
    assert out.split("\n")[:2] == ["True", "[2.0, 2.0]"]


def test_intervals_are_wilsons_and_shown_beside_each_mean():
    """95% Wilson intervals: 3 of 10 is 10.8-60.3% (the textbook value), 6 of 6 is 61.0-100%
    (not empty, as mean +- 2 standard errors would be); the mean over tasks pools their
    samples; the table prints each beside its mean."""
    assert evaluate.wilson(0.3, 10) == (10.8, 60.3)
    assert evaluate.wilson(1.0, 6) == (61.0, 100.0)
    records = [{"context": 100, "task": task, "index": i, "policy": "full", "budget": None,
                "score": float(i < right)} for task, right in (("a", 3), ("b", 7))
               for i in range(10)]
    spans = evaluate.intervals(records)["100"]
    assert spans["a"]["full"]["full"] == [10.8, 60.3]
    assert spans["mean"]["full"]["full"] == list(evaluate.wilson(0.5, 20))
    settings = {"tasks": ["a", "b"], "policies": ["full"], "budgets": [64], "contexts": [100],
                "samples": 10}
    text = evaluate.table(evaluate.merge([{"settings": settings, "records": records}]))
    assert "| full | 30.0 (10.8-60.3) |" in text and "| full | 50.0 (" in text


@pytest.mark.parametrize("model", sorted(MODELS))
def test_eval_defaults_are_the_models_own(model, monkeypatch, tmp_path):
    """Without --tasks and --contexts a run asks the model's own tasks (those its full KV
    solves) at its own lengths; given, they win. The model is not loaded here."""
    seen = []

    class Stop(Exception):
        pass

    def load(name, dtype, device):
        raise Stop

    monkeypatch.setattr(evaluate, "EvalSettings",
                        lambda *a, **k: seen.append((a[0], a[3])) or evaluate.EvalSettings)
    monkeypatch.setattr("rkv_compile.hf.load_model", load)
    with pytest.raises(Stop):
        cli.main(["eval", "--model", model, "--device", "cpu", "--out", str(tmp_path)])
    with pytest.raises(Stop):
        cli.main(["eval", "--model", model, "--device", "cpu", "--tasks", "passkey",
                  "--contexts", "900", "--out", str(tmp_path)])
    assert seen == [(list(MODELS[model].tasks), list(MODELS[model].contexts)),
                    (["passkey"], [900])]
    assert set(MODELS[model].tasks) <= set(TASKS)
    assert max(MODELS[model].contexts) + 64 <= MODELS[model].context
