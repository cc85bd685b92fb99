"""``rkv eval``: accuracy of the policies on long-context tasks with a real model.

For every context length, task and sample, one exact prefill is shared by all policies and
budgets (every policy here prefills exactly); each then evicts and decodes greedily through
`rkv_compile.eager` (the policies' PyTorch references, which the tests hold the pass to). Full KV
is the same at every budget and runs once. A two-turn task (`passkey-2turn`, ...) runs each
configuration's conversation through `eager.multi_turn` (no prefill is shared: the second turn
is prefilled over what each policy kept); its KV cache size is not reported. A row
`hf-quantized[:backend=quanto|hqq|fp8][:nbits=N][:axis_key=A]...` is not a policy of ours: plain
`generate` over transformers' own `QuantizedCache` (full KV quantized in groups, its
group-wise arguments `HF_GROUP_OPTIONS` passed through; the reference beside `kvquant` and
`kv_bits`), its bytes measured from the cache's tensors. With `engine="compile"` each
configuration instead runs `generate` under ``torch.compile(backend="rocketkv")``: the product
path, one compile per configuration (slow; for spot checks).

Writes `<out>/eval.json` (settings, every sample's output, score and KV cache size, the summary),
`eval.md` (tables of mean accuracy, in %, per task: policy x budget; and of the mean KV cache
size) and `eval.png` (accuracy vs budget per task, if matplotlib is installed). While it runs,
each record goes to `<out>/records.jsonl` as it is made (`Journal`): a stopped run, started
again with the same settings and `--out`, resumes where it stopped.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import json
import logging
import math
import os
import platform
import sys
import warnings
import zlib

import torch
from tqdm import tqdm

from . import eager
from .backend import forward_compiled, rocketkv
from .config import RocketKVConfig
from .hf import MODELS, cache_argument, returned_cache
from .policies import POLICIES
from .tasks import FIRST_TURN_TOKENS, TASKS, TWO_TURN_TASKS, Sample

ALL_TASKS = TASKS | TWO_TURN_TASKS


@dataclasses.dataclass
class EvalSettings:
    tasks: list[str]
    policies: list[str]       # "name:key=value" sets options; those that keep every token
                              # ("full", "kvquant") run once, at no budget
    budgets: list[int]
    contexts: list[int]
    samples: int              # per task and context; needle depths spread over 0..1
    device: str = "cpu"
    dtype: str = "float32"
    engine: str = "eager"     # or "compile"
    window_size: int = 32
    model: str = "smollm2"    # a key of hf.MODELS: what the run's records were made with

    def __post_init__(self):
        for name in self.tasks:
            if name not in ALL_TASKS:
                raise ValueError(f"rkv eval: unknown task {name!r}; the tasks are "
                                 f"{sorted(ALL_TASKS)}")
        two_turn = [name for name in self.tasks if name in TWO_TURN_TASKS]
        if two_turn and self.engine != "eager":
            raise ValueError(f"rkv eval: two-turn tasks {two_turn} run on the eager engine")
        evicting = [p for p in self.policies
                    if getattr(POLICIES.get(p.split(":")[0]), "state", "") == "scores"]
        if two_turn and evicting:
            raise ValueError(f"rkv eval: two-turn tasks {two_turn} do not run policies that "
                             f"evict during decode ({evicting})")
        quantized = [p for p in self.policies if _hf_quantized(p)]
        if two_turn and quantized:
            raise ValueError(f"rkv eval: two-turn tasks {two_turn} do not run {quantized}")
        if self.engine not in ("eager", "compile"):
            raise ValueError(f"rkv eval: engine must be 'eager' or 'compile' (got {self.engine!r})")
        if self.model not in MODELS:
            raise ValueError(f"rkv eval: unknown model {self.model!r}; the models are "
                             f"{sorted(MODELS)}")
        longest = MODELS[self.model].context
        if max(self.contexts) + 64 > longest:   # room for the question and the answer
            raise ValueError(f"rkv eval: {self.model} reads {longest} tokens: contexts must be "
                             f"at most {longest - 64} (got {max(self.contexts)})")
        if self.samples < 1:
            raise ValueError(f"rkv eval: samples must be >= 1 (got {self.samples})")
        for policy, budget in configurations(self):   # each must be a valid config
            if _hf_quantized(policy):
                hf_quantized_options(policy)
            else:
                self.config(policy, budget, 1)

    def config(self, policy: str, budget: int | None, max_new_tokens: int) -> RocketKVConfig:
        """The backend options of one configuration. `policy` may carry the policy's own
        options: "rocketkv:stages=stage1:kernel_size=31"."""
        name, *own = policy.split(":")
        options = {k: int(v) if v.isdigit() else v for k, v in (o.split("=", 1) for o in own)}
        if budget is None and name != "full":   # a policy that keeps every token: any budget
            budget = min(self.budgets)
        return RocketKVConfig.from_options(dict(options, policy=name, token_budget=budget,
                                                max_new_tokens=max_new_tokens,
                                                window_size=self.window_size))


def configurations(settings: EvalSettings) -> list[tuple[str, int | None]]:
    """(policy, budget) pairs; None for a policy that keeps every token (budget-independent)."""
    return [(p, b) for p in settings.policies
            for b in (settings.budgets if _budgeted(p) else [None])]


def _budgeted(policy: str) -> bool:
    return not _hf_quantized(policy) and \
        getattr(POLICIES.get(policy.split(":")[0]), "budgeted", True)


# transformers' QuantizedCache as a reference row (issue 22): what a user gets from transformers
# itself. quanto and hqq quantize in groups (KIVI, a residual of recent tokens kept exact) and
# need their packages; fp8 (newer transformers) is one scale per tensor and takes no options.
HF_QUANTIZED = "hf-quantized"
HF_BACKENDS = {"quanto": ("optimum-quanto", "is_optimum_quanto_available"),
               "hqq": ("hqq", "is_hqq_available"), "fp8": (None, None)}


def _hf_quantized(policy: str) -> bool:
    return policy.split(":")[0] == HF_QUANTIZED


# QuantizedCache's group-wise arguments (quanto and hqq; transformers' defaults where unset)
HF_GROUP_OPTIONS = ("nbits", "axis_key", "axis_value", "q_group_size", "residual_length")


def hf_quantized_options(policy: str) -> dict:
    """QuantizedCache's arguments for an "hf-quantized[:backend=...][:nbits=...][:axis_key=...]
    ..." row (quanto at 4 bits by default; the group-wise options of HF_GROUP_OPTIONS as
    integers, transformers' defaults where unset); a ValueError naming the option, or the
    package the backend lacks."""
    import transformers.cache_utils
    import transformers.utils

    options = dict(o.split("=", 1) for o in policy.split(":")[1:])
    unknown = set(options) - {"backend", *HF_GROUP_OPTIONS}
    if unknown:
        raise ValueError(f"rkv eval: {HF_QUANTIZED} takes backend and "
                         f"{', '.join(HF_GROUP_OPTIONS)} (got {sorted(unknown)})")
    backend = options.pop("backend", "quanto")
    if backend not in HF_BACKENDS:
        raise ValueError(f"rkv eval: {HF_QUANTIZED} backend must be one of {sorted(HF_BACKENDS)} "
                         f"(got {backend!r})")
    if backend == "fp8" and options:
        raise ValueError(f"rkv eval: {HF_QUANTIZED} backend 'fp8' takes no {sorted(options)[0]}")
    for name, value in options.items():
        if not value.removeprefix("-").isdigit():
            raise ValueError(f"rkv eval: {HF_QUANTIZED} {name} must be an integer (got {value!r})")
    package, available = HF_BACKENDS[backend]
    if package is not None and not getattr(transformers.utils, available)():
        raise ValueError(f"rkv eval: {HF_QUANTIZED} backend {backend!r} needs the {package} "
                         "package, which is not installed")
    if backend == "fp8":
        if not hasattr(transformers.cache_utils, "Fp8QuantizedLayer"):
            raise ValueError(f"rkv eval: {HF_QUANTIZED} backend 'fp8' is not in this "
                             f"transformers ({transformers.__version__})")
        return dict(backend=backend)
    return dict(backend=backend, nbits=4, **{name: int(v) for name, v in options.items()})


def _generate_hf_quantized(model, ids, policy: str, sample: Sample, stop
                           ) -> tuple[list[int], float]:
    """The greedy reply through plain generate over a QuantizedCache, and the MiB the cache's
    tensors hold after it (codes, scales and the exact residual)."""
    from transformers import QuantizedCache

    cache = QuantizedCache(config=model.config, **hf_quantized_options(policy))
    out = model.generate(ids, max_new_tokens=sample.max_new_tokens, do_sample=False,
                         return_dict_in_generate=True, **{cache_argument(): cache})
    held = sum(_bytes(vars(layer)) for layer in cache.layers)
    return _until_stop(out.sequences[0, ids.shape[1]:].tolist(), stop), round(held / 2**20, 3)


def _bytes(value) -> int:
    """Bytes of the tensors in `value` (nested in tuples, lists and dicts; a tensor subclass,
    as quanto's, by the plain tensors it is made of)."""
    if isinstance(value, torch.Tensor):
        if type(value) is not torch.Tensor and hasattr(value, "__tensor_flatten__"):
            return sum(_bytes(getattr(value, name)) for name in value.__tensor_flatten__()[0])
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_bytes(v) for v in value.values())
    return 0


def _seed(task: str, context: int, index: int) -> int:
    """Each task, context and sample index its own prompt, the same in every run."""
    return zlib.crc32(f"{task}/{context}/{index}".encode())


def _depth(index: int, samples: int) -> float:
    return index / (samples - 1) if samples > 1 else 0.5


def _generate_compiled(model, ids, config: RocketKVConfig, sample: Sample, stop
                       ) -> tuple[list[int], float]:
    """The greedy reply through generate under backend="rocketkv", and the MiB its cache's
    tensors hold after it (measured: codes, slots for new tokens, headers, rounding)."""
    torch._dynamo.reset()
    options = dataclasses.asdict(config) | dict(config.policy_options)
    options.pop("policy_options")
    # the backend object itself: the "rocketkv" name needs the package installed (entry point)
    with forward_compiled(model, functools.partial(rocketkv, options=options)):
        out = model.generate(ids, max_new_tokens=sample.max_new_tokens, do_sample=False,
                             return_dict_in_generate=True)
    held = sum(t.numel() * t.element_size() for layer in returned_cache(out).layers
               for t in (layer.keys, layer.values))
    return _until_stop(out.sequences[0, ids.shape[1]:].tolist(), stop), round(held / 2**20, 3)


def _until_stop(tokens: list[int], stop) -> list[int]:
    """A reply up to and with its first stop token after the first (an answer takes one line)."""
    return tokens[: next((i + 1 for i, t in enumerate(tokens) if i and t in stop), len(tokens))]


JOURNAL = "records.jsonl"


def _key(record: dict) -> tuple:
    return (record["context"], record["task"], record["index"], record["policy"],
            record["budget"])


class Journal:
    """A run's records as they are made: a header line (the settings), then one JSON line per
    record, appended and flushed. Opened over an earlier journal of the same settings, it holds
    that run's records, which `run` then skips; a line cut short by a stop is dropped."""

    def __init__(self, path: str, settings: EvalSettings):
        self.path = path
        header = json.loads(json.dumps({"settings": dataclasses.asdict(settings)}))
        self.records: list[dict] = []
        if os.path.exists(path):
            with open(path) as f:
                lines = f.read().splitlines()
            parsed = []
            for line in lines:
                try:
                    parsed.append(json.loads(line))
                except json.JSONDecodeError:   # the last line, cut short by the stop
                    break
            if parsed and parsed[0] != header:
                raise ValueError(f"rkv eval: {path} is the journal of a run with other settings "
                                 f"({parsed[0].get('settings')}): rerun those, or pass another "
                                 "--out")
            self.records = parsed[1:]
        with open(path, "w") as f:   # rewritten whole: drops a cut line
            for line in [header] + self.records:
                f.write(json.dumps(line) + "\n")
        self.done = {_key(r) for r in self.records}

    def add(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.records.append(record)
        self.done.add(_key(record))


@contextlib.contextmanager
def _above(bar):
    """Warnings and rkv_compile's log lines printed above the progress bar, not through it."""
    if bar.disable:
        yield
        return

    def show(message, category, filename, lineno, file=None, line=None):
        bar.write(warnings.formatwarning(message, category, filename, lineno, line).rstrip())

    class Handler(logging.Handler):
        def emit(self, record):
            bar.write(self.format(record))

    logger, handler, saved = logging.getLogger("rkv_compile"), Handler(), warnings.showwarning
    propagate, logger.propagate = logger.propagate, False
    logger.addHandler(handler)
    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = saved
        logger.removeHandler(handler)
        logger.propagate = propagate


def run(model, tokenizer, settings: EvalSettings, progress: bool = True,
        journal: str | None = None) -> dict:
    """Every sample of every task under every configuration: the records and their summary.
    `journal`: a path for `Journal` (records written as they are made; an earlier journal of the
    same settings is resumed)."""
    # Answers take one line: end of text, or a line break after the first token.
    stop = frozenset(t for t in [tokenizer.eos_token_id] if t is not None) | frozenset(
        t for t, piece in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))))
        if piece is not None and ("\n" in piece or "Ċ" in piece))
    configs = configurations(settings)
    book = Journal(journal, settings) if journal is not None else None
    records = list(book.records) if book is not None else []
    done = book.done if book is not None else set()

    def emit(record: dict) -> None:
        records.append(record)
        if book is not None:
            book.add(record)

    total = len(settings.contexts) * len(settings.tasks) * settings.samples * len(configs)
    bar = tqdm(total=total, desc="rkv eval", disable=not progress, initial=len(done))
    with _above(bar):
        _run(model, tokenizer, settings, configs, stop, done, emit, bar)
    bar.close()
    return {"settings": dataclasses.asdict(settings), "records": records,
            "summary": summarise(records), "interval95": intervals(records),
            "kv_mib": memory(records), "kv_read_kib": memory(records, "kv_read_kib")}


def _run(model, tokenizer, settings: EvalSettings, configs, stop, done: set, emit, bar) -> None:
    for context in settings.contexts:
        for task in settings.tasks:
            for index in range(settings.samples):
                todo = [(p, b) for p, b in configs if (context, task, index, p, b) not in done]
                if not todo:   # resumed: this sample is in the journal
                    continue
                sample = ALL_TASKS[task](tokenizer, context, _depth(index, settings.samples),
                                         _seed(task.removesuffix("-2turn"), context, index))
                ids = tokenizer(sample.prompt, return_tensors="pt").input_ids.to(settings.device)
                if sample.follow_up is not None:
                    for record in _conversations(model, tokenizer, settings, sample, ids, stop,
                                                 todo, context, index):
                        emit(record)
                        bar.update()
                    continue
                # the prefill records the queries the most demanding policy reads (H2O: all)
                ours = [(p, b) for p, b in todo if not _hf_quantized(p)]
                observed = max((settings.config(p, b, 1).method.observed_queries(ids.shape[1])
                                for p, b in ours), default=0)
                prompt = None if settings.engine == "compile" or not ours else \
                    eager.prefill(model, ids, observed)
                for policy, budget in todo:
                    if _hf_quantized(policy):
                        tokens, kv_mib = _generate_hf_quantized(model, ids, policy, sample, stop)
                        kv_read = None
                    elif prompt is None:
                        config = settings.config(policy, budget, sample.max_new_tokens)
                        tokens, kv_mib = _generate_compiled(model, ids, config, sample, stop)
                        kv_read = None
                    else:
                        config = settings.config(policy, budget, sample.max_new_tokens)
                        tokens, kept = eager.continue_greedy(model, prompt, config,
                                                             sample.max_new_tokens, stop)
                        kv_mib, kv_read = _kv_sizes(config, prompt, kept, len(tokens) - 1,
                                                    ids.shape[1], model.config)
                    text = tokenizer.decode(tokens, skip_special_tokens=True)
                    emit({"context": context, "task": task, "index": index,
                          "depth": sample.depth, "prompt_tokens": ids.shape[1],
                          "policy": policy, "budget": budget, "score": sample.score(text),
                          "answers": sample.answers, "output": text, "kv_mib": kv_mib,
                          "kv_read_kib": kv_read})
                    bar.update()
                del prompt


def _conversations(model, tokenizer, settings: EvalSettings, sample: Sample, ids, stop,
                   configs, context: int, index: int) -> list[dict]:
    """A two-turn sample under every configuration: the second reply is scored."""
    follow_up = tokenizer(sample.follow_up, add_special_tokens=False,
                          return_tensors="pt").input_ids.to(settings.device)
    records = []
    for policy, budget in configs:
        config = settings.config(policy, budget, sample.max_new_tokens)
        _, tokens = eager.multi_turn(model, [ids, follow_up], config,
                                     [FIRST_TURN_TOKENS, sample.max_new_tokens])
        tokens = _until_stop(tokens, stop)
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        records.append({"context": context, "task": sample.task, "index": index,
                        "depth": sample.depth,
                        "prompt_tokens": ids.shape[1] + 1 + follow_up.shape[1],
                        "policy": policy, "budget": budget, "score": sample.score(text),
                        "answers": sample.answers, "output": text, "kv_mib": None})
    return records


def _kv_sizes(config: RocketKVConfig, prompt: eager.Prefill, kept: list[int], generated: int,
              prompt_len: int, model_config) -> tuple[float, float]:
    """Per layer's `kept` prompt tokens, all layers and KV heads:
    - MiB the cache holds after generation: the stored prompt tokens (as packed codes and
      scales if quantized: Policy.kv_bytes) and the `generated` ones. Slots a policy evicts
      during decode are counted: they stay allocated here;
    - KiB of KV the first decode step reads (Policy.read_bytes): what "equal traffic"
      compares."""
    layers = len(kept)
    group = model_config.num_attention_heads // model_config.num_key_value_heads
    held = read = 0
    for layer, stored in enumerate(kept):
        _, heads, _, dim = prompt.keys[layer].shape
        itemsize = prompt.keys[layer].element_size()
        plan = config.plan(prompt_len, dim, layer, layers)
        held += heads * config.method.kv_bytes(stored, generated, dim, itemsize)
        read += heads * config.method.read_bytes(stored, 1, plan, dim, itemsize, group)
    return round(held / 2**20, 3), round(read / 2**10, 1)


def summarise(records: list[dict]) -> dict:
    """Mean score in % per context -> task -> policy -> budget ("full" for a policy that keeps
    every token)."""
    sums: dict = {}
    for r in records:
        key = (str(r["context"]), r["task"], r["policy"], str(r["budget"] or "full"))
        total, count = sums.get(key, (0.0, 0))
        sums[key] = (total + r["score"], count + 1)
    summary: dict = {}
    for (context, task, policy, budget), (total, count) in sums.items():
        summary.setdefault(context, {}).setdefault(task, {}).setdefault(policy, {})[budget] = \
            round(100 * total / count, 1)
    for context, tasks in summary.items():   # the mean over tasks
        mean: dict = {}
        for by_policy in tasks.values():
            for policy, by_budget in by_policy.items():
                for budget, score in by_budget.items():
                    mean.setdefault(policy, {}).setdefault(budget, []).append(score)
        tasks["mean"] = {p: {b: round(sum(s) / len(s), 1) for b, s in v.items()}
                         for p, v in mean.items()}
    return summary


def wilson(mean: float, count: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a success rate `mean` over `count` samples, in %
    (a sample's score is 0 or 1, or a fraction of its answers: then it is approximate, and
    wider than the spread of fractions needs). Unlike mean +- 2 standard errors it is not
    empty at 0% or 100%: 6 of 6 right is 61-100%."""
    centre = (mean + z * z / (2 * count)) / (1 + z * z / count)
    half = z / (1 + z * z / count) * math.sqrt(mean * (1 - mean) / count + z * z / (4 * count**2))
    return round(100 * max(centre - half, 0.0), 1), round(100 * min(centre + half, 1.0), 1)


def intervals(records: list[dict]) -> dict:
    """The 95% interval of every mean `summarise` gives (same keys; the mean over tasks over
    all their samples), as [low, high] in %."""
    scores: dict = {}
    for r in records:
        budget = str(r["budget"] or "full")
        for task in (r["task"], "mean"):
            scores.setdefault((str(r["context"]), task, r["policy"], budget), []).append(
                r["score"])
    out: dict = {}
    for (context, task, policy, budget), values in scores.items():
        out.setdefault(context, {}).setdefault(task, {}).setdefault(policy, {})[budget] = \
            list(wilson(sum(values) / len(values), len(values)))
    return out


def memory(records: list[dict], field: str = "kv_mib") -> dict:
    """Mean KV cache size in MiB after generation (or another per-record size, `field`), per
    context -> policy -> budget (eager engine records only: the compiled one does not report
    it)."""
    sizes: dict = {}
    for r in records:
        if r.get(field) is not None:
            key = (str(r["context"]), r["policy"], str(r["budget"] or "full"))
            sizes.setdefault(key, []).append(r[field])
    summary: dict = {}
    for (context, policy, budget), values in sizes.items():
        summary.setdefault(context, {}).setdefault(policy, {})[budget] = \
            round(sum(values) / len(values), 2)
    return summary


def merge(results: list[dict]) -> dict:
    """Several runs (say, one per task, run side by side) as one result; a later run's record
    of a sample under a configuration replaces an earlier run's."""
    settings = dict(results[0]["settings"])
    for key in ("tasks", "policies", "budgets", "contexts"):
        settings[key] = list(dict.fromkeys(v for r in results for v in r["settings"][key]))
    settings["budgets"].sort()
    settings["samples"] = max(r["settings"]["samples"] for r in results)
    latest = {(r["context"], r["task"], r["index"], r["policy"], r["budget"]): r
              for result in results for r in result["records"]}
    records = list(latest.values())
    merged = {"settings": settings, "records": records, "summary": summarise(records),
              "interval95": intervals(records), "kv_mib": memory(records),
              "kv_read_kib": memory(records, "kv_read_kib")}
    if "environment" in results[0]:
        merged["environment"] = results[0]["environment"]
    return merged


def table(result: dict) -> str:
    """Markdown tables: per context and task, a row per policy, a column per budget (the mean
    and its 95% interval); then the mean KV cache size per context."""
    samples = result["settings"]["samples"]
    spans = result.get("interval95", {})

    def cell(mean, context, task, policy, budget):
        span = spans.get(context, {}).get(task, {}).get(policy, {}).get(budget)
        return f"{mean} ({span[0]:g}-{span[1]:g})" if span else mean

    sections = [(f"{task}, {context}-token prompts** (accuracy %, 95% interval; {samples} "
                 "samples a task)", {policy: {b: cell(m, context, task, policy, b)
                                             for b, m in by_budget.items()}
                                    for policy, by_budget in by_policy.items()})
                for context, tasks in result["summary"].items()
                for task, by_policy in tasks.items()]
    held = "held by the cache's tensors" if result["settings"].get("engine") == "compile" else \
        "computed: quantized prompts as packed codes and scales; hf-quantized rows: held by " \
        "its cache's tensors"
    sections += [(f"KV cache after generation, {context}-token prompts** (MiB, all layers; "
                  f"{held})", by_policy)
                 for context, by_policy in result.get("kv_mib", {}).items()]
    sections += [(f"KV read by a decode step, {context}-token prompts** (KiB, all layers: "
                  "what each policy's selection and attention read)", by_policy)
                 for context, by_policy in result.get("kv_read_kib", {}).items()]
    budgets = [str(b) for b in result["settings"]["budgets"]]
    lines = []
    for title, by_policy in sections:
        lines += [f"\n**{title}\n", "| policy | " + " | ".join(budgets) + " |",
                  "|---|" + "---:|" * len(budgets)]
        for policy in _ordered(by_policy, result):
            by_budget = by_policy[policy]
            cells = [by_budget["full"]] * len(budgets) if "full" in by_budget else \
                [by_budget.get(b, "") for b in budgets]
            lines.append(f"| {policy} | " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def plot(result: dict, path: str) -> bool:
    """Accuracy vs budget, one panel per context and task, the 95% intervals shaded; False
    without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    summary = result["summary"]
    contexts, tasks = list(summary), list(next(iter(summary.values())))
    budgets = result["settings"]["budgets"]
    palette = plt.get_cmap("tab20").colors   # 20 distinct colours: every policy its own
    colors = {p: palette[i % 20] for i, p in enumerate(result["settings"]["policies"])}
    fig, axes = plt.subplots(len(contexts), len(tasks), squeeze=False,
                             figsize=(3.2 * len(tasks) + 2, 2.8 * len(contexts)))
    for row, context in enumerate(contexts):
        for col, task in enumerate(tasks):
            ax = axes[row][col]
            for policy in _ordered(summary[context][task], result):
                by_budget = summary[context][task][policy]
                span = result.get("interval95", {}).get(context, {}).get(task, {}).get(policy, {})
                if "full" in by_budget:   # keeps every token: the same at every budget
                    color = "black" if policy == "full" else colors[policy]
                    ax.axhline(by_budget["full"], linestyle="--", label=policy, color=color)
                    if "full" in span:
                        ax.axhspan(*span["full"], color=color, alpha=0.08, linewidth=0)
                else:
                    ran = [b for b in budgets if str(b) in by_budget]
                    ax.plot(ran, [by_budget[str(b)] for b in ran], marker="o", label=policy,
                            color=colors[policy])
                    if all(str(b) in span for b in ran):
                        ax.fill_between(ran, [span[str(b)][0] for b in ran],
                                        [span[str(b)][1] for b in ran], color=colors[policy],
                                        alpha=0.12, linewidth=0)
            ax.set_xscale("log", base=2)
            ax.set_ylim(-5, 105)
            ax.set_title(f"{task}, {context} tokens", fontsize=9)
            ax.set_xlabel("token budget", fontsize=8)
            ax.set_ylabel("accuracy %", fontsize=8)
    fig.legend(*axes[0][-1].get_legend_handles_labels(), fontsize=7, loc="center right")
    fig.tight_layout(rect=(0, 0, 1 - 2 / (3.2 * len(tasks) + 2), 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _ordered(by_policy: dict, result: dict) -> list[str]:
    """The policies of a summary in the order the settings list them (runs merge in any order)."""
    return [p for p in result["settings"]["policies"] if p in by_policy]


def write(result: dict, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "eval.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out, "eval.md"), "w") as f:
        f.write(table(result) + "\n")
    plot(result, os.path.join(out, "eval.png"))


def environment(settings: EvalSettings) -> dict:
    device = torch.cuda.get_device_name() if settings.device.startswith("cuda") else \
        platform.processor() or platform.machine()
    return {"model": MODELS[settings.model].title, "device": device, "torch": torch.__version__,
            "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv)}
