"""How fast `model.generate` decodes, by the way a user calls it: a Llama-3.1-8B-shaped model
with random bf16 weights, batch 1, greedy, per context.

Rows (setups):
  generate        plain `model.generate` (DynamicCache, sdpa, eager), no rkv_compile
  static          `generate(cache_implementation="static")`: transformers compiles decode itself
                  (Inductor, CUDA graphs)
  rocketkv        zero change: `model.forward = torch.compile(model.forward, backend="rocketkv",
                  options={"token_budget": 256, "max_new_tokens": N})`, then plain generate
                  (the DynamicCache it builds; CUDA graphs by default)
  rocketkv-cache  the same, with `cache=RocketKVCache(model.config, N)` passed to generate
  rocketkv-untuned  the same as rocketkv, its decode graphs compiled without Inductor's
                  coordinate-descent tuning (what the tuning costs at the first call and gains
                  per token)
  rocketkv-compile-prefill  the same as rocketkv with the `compile_prefill` option (the
                  prefill compiled by Inductor too, instead of run as traced)
  rocketkv-tune-all  the same as rocketkv with every generated kernel of the decode graph
                  tuned, not only those that read weights (`rkv_compile.kernels.tuning`)
  rocketkv-whole  the same as rocketkv with `compile_layers_once=False`: the decode graph
                  compiled whole, not one subgraph for its alike layers (what compiling the
                  layers once saves at the first call and costs per token)
  bare            the rocketkv decode step (the same compiled forward) in a bare loop, over the
                  cache the rocketkv generate returned: the step without generate around it;
                  then `--rounds` more generate calls and bare loops, alternated, so that the
                  gap between them is not a drift of the device between two measurements
                  (with rocketkv-cache among the setups, each round also a generate over a
                  new RocketKVCache: zero change against the cache, call against call)
For each: the first call's wall time, compiles included (each rocketkv forward is compiled once
for all contexts, as a user compiles once for all prompts: at the first context it compiles
everything, at a later one what that prompt length needs anew; where the time went is recorded;
the variants after the first reuse what Inductor cached on disk for identical graphs),
and from a second call the prefill time (to the first token), the decode time per token (median
of the steps, timed by a logits processor that synchronizes), the GPU memory held right after
prefill beyond the weights, and the peak. For rocketkv also the host time per step the
backend's run time spends around the compiled graph (its checks), which is part of the gap to
the bare loop. The weight-read floor (weight bytes / copy bandwidth) is the least a batch-1
step can take.

    python3 benchmarks/generate_paths.py --out benchmarks/results/generate_paths_h200.json
    python3 benchmarks/generate_paths.py --tiny     # a small model, on the CPU too
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
import sys
import time

import torch
from transformers import LogitsProcessor, LogitsProcessorList

sys.path.insert(0, ".")
sys.path.insert(0, "benchmarks")
import rkv_compile  # noqa: E402
from end_to_end import (CUDA, DEVICE, GIB, build, cleanup, llama_8b, peak_gib,  # noqa: E402
                        release, reset_peak, run_meta, sync, tiny)
from rkv_compile import backend as runtime  # noqa: E402
from rkv_compile.cache import RocketKVCache  # noqa: E402
from rkv_compile.hf import cache_argument, returned_cache  # noqa: E402
from rkv_compile.kernels import kernel_analysis, tuning  # noqa: E402
from rkv_compile.passes import repeated_layers  # noqa: E402


class Steps(LogitsProcessor):
    """Called by generate once per token, after its forward (synchronized): each token's time,
    and the memory allocated at the first (right after prefill)."""

    def __init__(self):
        self.times, self.after_prefill = [], None

    def __call__(self, input_ids, scores):
        sync()
        self.times.append(time.perf_counter())
        if self.after_prefill is None and CUDA:
            self.after_prefill = torch.cuda.memory_allocated()
        return scores


class StepTimes:
    """Per call of the backend's run time (a generate's calls are its decode steps and its
    prefill): the host time it spends outside the compiled graph it runs (its checks), and the
    device time of the graph itself, from CUDA events recorded just before and after the graph
    is launched (a replayed CUDA graph is one launch: the events bracket its execution, so a
    step's wall time less this is time the device waited on the host). Medians over calls."""

    def __init__(self):
        self.outside: list[float] = []
        self.events: list[tuple] = []

    def __enter__(self):
        call, run = runtime.Runtime.__call__, runtime.Runtime._run
        meter, inside = self, [0.0]

        def timed_call(self, *args):
            start, inside[0] = time.perf_counter(), 0.0
            try:
                return call(self, *args)
            finally:
                meter.outside.append(time.perf_counter() - start - inside[0])

        def timed_run(self, variant, args):
            start = time.perf_counter()
            begin = end = None
            if CUDA:
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                    enable_timing=True)
                begin.record()
            try:
                return run(self, variant, args)
            finally:
                if CUDA:
                    end.record()
                    meter.events.append((begin, end))
                inside[0] += time.perf_counter() - start

        self.saved = call, run
        runtime.Runtime.__call__, runtime.Runtime._run = timed_call, timed_run
        return self

    def __exit__(self, *exc):
        runtime.Runtime.__call__, runtime.Runtime._run = self.saved

    @property
    def calls(self) -> int:
        return len(self.outside)

    @property
    def us_per_call(self) -> float:
        """Median host time outside the graph, µs."""
        return round(statistics.median(self.outside) * 1e6, 1)

    @property
    def graph_ms(self) -> float | None:
        """Median device time of the graph a call runs, ms (None off CUDA)."""
        if not self.events:
            return None
        sync()
        return round(statistics.median(b.elapsed_time(e) for b, e in self.events), 3)


class CompileTimes:
    """Where a first call's time goes: each graph Inductor compiles for the backend (its phase,
    the compile itself, and its first calls, which include Triton's compiles, the decode
    graphs' coordinate-descent tuning and CUDA-graph warm-up and capture), Dynamo's own
    totals (tracing, the backend's pass and compiles inside), and torch's analyses of our
    Triton kernels' launches (`kernel_analysis`: how many ran, their time, how many the
    cache answered), and how many generated kernels were marked for tuning (`tuning`: those
    that read weights) and not."""

    def __init__(self):
        self.graphs = []
        self.analyses = {"seconds": 0.0}

    def __enter__(self):
        compile_graph = runtime.inductor
        graphs = self.graphs

        def timed(gm, inputs, decode=False, cudagraphs=False, layers_once=False):
            start = time.perf_counter()
            outlined = repeated_layers.stats["outlined"]
            compiled = compile_graph(gm, inputs, decode=decode, cudagraphs=cudagraphs,
                                     layers_once=layers_once)
            row = {"phase": "decode" if decode or cudagraphs else "other",
                   "cudagraphs": cudagraphs,
                   "layers_outlined": repeated_layers.stats["outlined"] - outlined,
                   "compile_s": round(time.perf_counter() - start, 2), "calls_s": []}
            graphs.append(row)

            def run(*args):
                if len(row["calls_s"]) >= 3:
                    return compiled(*args)
                sync()
                begin = time.perf_counter()
                out = compiled(*args)
                sync()
                row["calls_s"].append(round(time.perf_counter() - begin, 2))
                return out
            return run

        self.saved = compile_graph
        runtime.inductor = timed
        torch._dynamo.utils.compilation_time_metrics.clear()
        self.wrap = torch._higher_order_ops.triton_kernel_wrap
        self.name = next(n for n in kernel_analysis._ANALYSES if hasattr(self.wrap, n))
        self.analyse = getattr(self.wrap, self.name)
        self.counts = dict(kernel_analysis.stats)
        self.tuning_counts = dict(tuning.stats)

        @functools.wraps(self.analyse)
        def timed_analysis(*args, analyse=self.analyse, totals=self.analyses):
            start = time.perf_counter()
            try:
                return analyse(*args)
            finally:
                totals["seconds"] += time.perf_counter() - start
        setattr(self.wrap, self.name, timed_analysis)
        return self

    def __exit__(self, *exc):
        runtime.inductor = self.saved
        setattr(self.wrap, self.name, self.analyse)
        self.analyses.update({k: v - self.counts[k] for k, v in kernel_analysis.stats.items()})
        self.analyses["seconds"] = round(self.analyses["seconds"], 2)
        self.tuned = {k: v - self.tuning_counts[k] for k, v in tuning.stats.items()}

    def summary(self) -> dict:
        metrics = torch._dynamo.utils.compilation_time_metrics
        dynamo = {name: round(sum(times), 2) for name, times in metrics.items()
                  if sum(times) >= 0.5}
        return {"graphs": self.graphs, "dynamo_s": dynamo, "kernel_analyses": self.analyses,
                "kernels_tuned": self.tuned}


def one_call(model, ids, steps: int, new_cache=None, **kwargs):
    timer = Steps()
    if new_cache is not None:
        kwargs[cache_argument()] = new_cache()
    weights = torch.cuda.memory_allocated() if CUDA else 0
    reset_peak()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps + 1,
                             min_new_tokens=steps + 1, do_sample=False,
                             return_dict_in_generate=True,
                             logits_processor=LogitsProcessorList([timer]), **kwargs)
    wall = time.perf_counter() - start
    gaps = [b - a for a, b in zip(timer.times, timer.times[1:])]
    held = None if timer.after_prefill is None else (timer.after_prefill - weights) / GIB
    return out, {"first_token_ms": round((timer.times[0] - start) * 1e3, 1),
                 "decode_ms_per_token": round(statistics.median(gaps) * 1e3, 3),
                 "wall_s": round(wall, 2), "peak_gib": round(peak_gib(), 2),
                 "held_after_prefill_gib": None if held is None else round(held, 3)}


def measure(model, ids, steps: int, setup: str, **kwargs) -> dict:
    """First call (compiles), then a second call measured."""
    start = time.perf_counter()
    with CompileTimes() as compiles:
        one_call(model, ids, steps, **kwargs)
    first = time.perf_counter() - start
    with StepTimes() as host:
        out, row = one_call(model, ids, steps, **kwargs)
    row = {"setup": setup, "context": ids.shape[1], "first_call_s": round(first, 1), **row}
    if host.calls:
        row["backend_host_us_median_call"] = host.us_per_call
    if compiles.graphs:
        row["first_call_compiles"] = compiles.summary()
    return out, row


def alternated(model, ids, steps: int, rounds: int, new_cache=None) -> dict:
    """`rounds` generate calls through the same compiled forward, each followed by a bare loop
    over the cache it returned, and with `new_cache` (a RocketKVCache factory) by a generate
    over a new RocketKVCache too, so that zero change and the cache are compared call against
    call, not row against row minutes apart (the device drifts by as much as they differ).
    Per call: ms per token, the median device time of the decode graph
    (`StepTimes.graph_ms`), so that wall less graph is the time per step the device waits
    on the host (generate's own work, Dynamo's guards, the backend's checks, the launch), and
    the backend's host time per call. Each round also runs a generate under
    `torch.compiler.set_stance(skip_guard_eval_unsafe=True)` (Dynamo then checks only the
    guards that tell its compiled graphs apart): what Dynamo's guard evaluation costs a step."""
    rounds_ = {"generate_ms_per_token": [], "generate_graph_ms": [], "generate_backend_us": [],
               "generate_skip_guards_ms_per_token": [],
               "bare_ms_per_token": [], "bare_graph_ms": [], "bare_backend_us": [],
               "bare_forward_host_ms": []}
    if new_cache is not None:
        rounds_.update(cache_ms_per_token=[], cache_graph_ms=[])
        one_call(model, ids, steps, new_cache=new_cache)   # compiles its decode graph
        release()
    for _ in range(rounds):
        with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
            rounds_["generate_skip_guards_ms_per_token"].append(
                one_call(model, ids, steps)[1]["decode_ms_per_token"])
        release()
        with StepTimes() as through_generate:
            out, row = one_call(model, ids, steps)
        cache = returned_cache(out)
        with StepTimes() as bare:
            bare_ms, forward_host_ms = bare_step_ms(model.forward, cache, ids, steps)
        for name, ms, meter in (("generate", row["decode_ms_per_token"], through_generate),
                                ("bare", bare_ms, bare)):
            rounds_[f"{name}_ms_per_token"].append(ms)
            rounds_[f"{name}_graph_ms"].append(meter.graph_ms)
            rounds_[f"{name}_backend_us"].append(meter.us_per_call)
        rounds_["bare_forward_host_ms"].append(forward_host_ms)
        del out, cache
        release()   # not cleanup(): the rounds reuse the compiled forward, as a user's calls do
        if new_cache is not None:
            with StepTimes() as through_cache:
                row = one_call(model, ids, steps, new_cache=new_cache)[1]
            rounds_["cache_ms_per_token"].append(row["decode_ms_per_token"])
            rounds_["cache_graph_ms"].append(through_cache.graph_ms)
            release()
    return {"setup": "generate-vs-bare", "context": ids.shape[1], **rounds_}


def bare_step_ms(forward, cache, ids, steps: int) -> tuple[float, float]:
    """The decode step in a loop of its own over `cache` (positions continue after it), each
    step synchronized as generate's are (its stopping check reads the device): median ms per
    step, and median ms until the forward returns (its host work: Dynamo's guards, the
    backend, CUDA-graph bookkeeping and the launch; the device idles through it)."""
    position = ids.shape[1] + steps
    token = ids[:, -1:]
    times, host = [], []
    with torch.no_grad():
        for step in range(steps + 3):
            positions = torch.tensor([[position + step]], device=DEVICE)
            sync()
            start = time.perf_counter()
            forward(token, position_ids=positions, **{cache_argument(): cache}, logits_to_keep=1)
            returned = time.perf_counter()
            sync()
            times.append(time.perf_counter() - start)
            host.append(returned - start)
    return (round(statistics.median(times[3:]) * 1e3, 3),
            round(statistics.median(host[3:]) * 1e3, 3))


@contextlib.contextmanager
def tuning_every_kernel():
    """Compiles inside tune every kernel Inductor generates, and bypass Inductor's on-disk graph
    cache (its key does not see which kernels are tuned)."""
    from unittest import mock
    with mock.patch.object(tuning, "weight_reads_only", contextlib.nullcontext), \
            torch._inductor.config.patch(fx_graph_cache=False):
        yield


def tune_all_backend():
    def compile_decode(gm, inputs):
        with tuning_every_kernel():
            return runtime.inductor(gm, inputs, decode=True, cudagraphs=True, layers_once=True)
    return runtime.make_backend(decode_compiler=compile_decode)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[16384, 32768, 131072])
    parser.add_argument("--setups", nargs="+",
                        default=["generate", "static", "rocketkv", "rocketkv-cache"],
                        choices=["generate", "static", "rocketkv", "rocketkv-cache",
                                 "rocketkv-untuned", "rocketkv-compile-prefill",
                                 "rocketkv-tune-all", "rocketkv-whole"])
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternated generate calls and bare loops after the rocketkv row")
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--tiny", action="store_true", help="a small model: checks the script")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.tiny:
        args.contexts, args.budget, args.steps = [300], 32, 4
    model = build(tiny() if args.tiny else llama_8b())
    meta = run_meta(model, args.steps)
    rows = []

    def record(row):
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({**meta, "budget": args.budget, "rows": rows}, f, indent=1)

    options = {"token_budget": args.budget, "max_new_tokens": args.steps + 1}
    eager_forward = model.forward
    # each compiled once for every context, as a user compiles a model once for all prompts
    untuned = runtime.make_backend(decode_compiler=lambda gm, inputs: runtime.inductor(
        gm, inputs, decode=False, cudagraphs=True, layers_once=True))
    forwards = {
        "rocketkv": torch.compile(eager_forward, backend="rocketkv", options=options),
        "rocketkv-untuned": torch.compile(eager_forward, backend=untuned, options=options),
        "rocketkv-tune-all": torch.compile(eager_forward, backend=tune_all_backend(),
                                           options=options),
        "rocketkv-compile-prefill": torch.compile(eager_forward, backend="rocketkv", options={
            **options, "compile_prefill": True}),
        "rocketkv-whole": torch.compile(eager_forward, backend="rocketkv", options={
            **options, "compile_layers_once": False})}
    for context in args.contexts:
        ids = torch.randint(0, model.config.vocab_size, (1, context),
                            generator=torch.Generator().manual_seed(context)).to(DEVICE)
        model.set_attn_implementation("sdpa")
        for setup in ("rocketkv", "rocketkv-cache", "rocketkv-untuned",
                      "rocketkv-compile-prefill", "rocketkv-tune-all", "rocketkv-whole"):
            if setup not in args.setups:
                continue
            model.forward = forwards.get(setup, forwards["rocketkv"])
            try:
                if setup == "rocketkv-cache":
                    record(measure(model, ids, args.steps, setup, new_cache=lambda:
                                   RocketKVCache(model.config, args.steps + 1))[1])
                    continue
                out, row = measure(model, ids, args.steps, setup)
                cache = returned_cache(out)
                row["stored_after_generate"] = rkv_compile.stored(cache)[0].lengths[0]
                record(row)
                if setup == "rocketkv":
                    record({"setup": "bare", "context": context, "decode_ms_per_token":
                            bare_step_ms(model.forward, cache, ids, args.steps)[0]})
                    del out, cache
                    record(alternated(model, ids, args.steps, args.rounds, new_cache=(
                        (lambda: RocketKVCache(model.config, args.steps + 1))
                        if "rocketkv-cache" in args.setups else None)))
                    continue
                del out, cache
            finally:
                model.forward = eager_forward
                cleanup()
        # after rocketkv's, so that its first call is measured as a fresh process's
        if "generate" in args.setups:
            record(measure(model, ids, args.steps, "generate")[1])
            cleanup()
        if "static" in args.setups:
            record(measure(model, ids, args.steps, "static", cache_implementation="static")[1])
            cleanup()


if __name__ == "__main__":
    main()
