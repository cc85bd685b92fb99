"""Many `generate` calls through one compiled forward, as an evaluation loop makes them: does a
decode step stay as fast at the 200th call as at the second?

Each call builds a new DynamicCache. Inductor's CUDA graphs (cudagraph trees) take a static
input at a new address as a reason to record the graph again, so the compressed caches a decode
graph reads are kept at the addresses of the cache the call before dropped (`state.POOL`); this
script counts the recordings and the CUDA graphs Inductor skipped, and times the decode steps
of every call.

A small Llama (2 layers, bf16 on CUDA) keeps each call short, so that a step's host time (where
a growing list of recorded graphs would show) is most of it.

    python3 benchmarks/repeated_generate.py --calls 200 --out benchmarks/results/repeated_generate_h200.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch
from transformers import LogitsProcessorList

sys.path.insert(0, ".")
sys.path.insert(0, "benchmarks")
import rkv_compile  # noqa: E402,F401
from rkv_compile.diagnostics import recorded_cuda_graphs  # noqa: E402
from end_to_end import DEVICE, StepTimer, build, run_meta, tiny  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--prompt", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--budget", type=int, default=64)
    parser.add_argument("--out")
    args = parser.parse_args()
    model = build(tiny())
    meta = run_meta(model, args.steps)
    model.forward = torch.compile(model.forward, backend="rocketkv", options={
        "token_budget": args.budget, "max_new_tokens": args.steps + 1})
    torch._dynamo.utils.counters.clear()
    rows = []
    for call in range(args.calls):
        ids = torch.randint(0, model.config.vocab_size, (1, args.prompt),
                            generator=torch.Generator().manual_seed(call)).to(DEVICE)
        timer = StepTimer()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.steps + 1, min_new_tokens=args.steps + 1,
                           do_sample=False, logits_processor=LogitsProcessorList([timer]))
        gaps = [b - a for a, b in zip(timer.times, timer.times[1:])]
        row = {"call": call, "decode_ms_per_token": round(statistics.median(gaps) * 1e3, 3),
               "recorded_graphs": recorded_cuda_graphs(),
               "cudagraph_skips": torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]}
        rows.append(row)
        if call in (0, 1, 2) or (call + 1) % 25 == 0:
            print(json.dumps(row), flush=True)
    result = {**meta, "prompt": args.prompt, "budget": args.budget, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    first, last = rows[1], rows[-1]
    print(f"decode ms/token: call 2 {first['decode_ms_per_token']}, call {args.calls} "
          f"{last['decode_ms_per_token']}; recorded graphs {last['recorded_graphs']}; "
          f"cudagraph skips {last['cudagraph_skips']}")


if __name__ == "__main__":
    main()
