"""Where a batch-1 RocketKV decode step of the 8B-shaped model spends its time.

The same step as benchmarks/end_to_end.py's rocketkv-B at batch 1 (compiled, CUDA graphs), timed,
then profiled: GPU time by kind of kernel (the weight GEMVs, RocketKV's attention kernels,
Inductor's fused kernels, the rest), the bandwidth the GEMVs reach, and the time the GPU sits
idle in a step. Once with the decode graph compiled untuned, once as the backend compiles it
(Inductor's coordinate-descent tuning, gpt-fast's setting).

    python3 benchmarks/profile_decode_step.py [--context 16384] [--budget 256] [--out F.json]
"""
from __future__ import annotations

import argparse
import functools
import json
import re
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, ".")
sys.path.insert(0, "benchmarks")
import rkv_compile  # noqa: E402
from rkv_compile.hf import cache_argument  # noqa: E402
from decode_attention import copy_bandwidth  # noqa: E402
from end_to_end import WARMUP, build, greedy, llama_8b, timed_ms  # noqa: E402
from rkv_compile.backend import inductor, make_backend  # noqa: E402
from rkv_compile.cache import RocketKVCache  # noqa: E402

KINDS = [   # (kind, kernel-name pattern), first match wins
    ("weight GEMV (cuBLAS)", re.compile(r"gemm|gemv|cutlass|nvjet|cublas|xmma|splitK", re.I)),
    ("RocketKV attention", re.compile(r"^_(chunk_logits|select|sparse_attention|combine|append)")),
    ("Inductor fused", re.compile(r"^triton_")),
]


def kind_of(name: str) -> str:
    return next((kind for kind, pattern in KINDS if pattern.search(name)), "other")


def profile_steps(forward, cache, logits, steps: int) -> list:
    """Kernel (name, calls, GPU µs) per step, from the profiler over `steps` steps."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        greedy(forward, cache, logits, steps)
        torch.cuda.synchronize()
    return [(e.key, e.count / steps, e.device_time_total / steps) for e in prof.key_averages()
            if e.device_time_total > 0 and e.device_type == torch.autograd.DeviceType.CUDA]


def measure(model, ids, budget: int, steps: int, weight_bytes: int, tuning: bool) -> dict:
    torch._dynamo.reset()
    backend = rkv_compile.rocketkv if tuning else make_backend(
        decode_compiler=functools.partial(inductor, cudagraphs=True))
    room = 2 * (WARMUP + 2 * steps) + 1
    options = {"token_budget": budget, "max_new_tokens": room}
    forward = torch.compile(model.forward, backend=backend, options=options)
    with torch.no_grad():
        cache = RocketKVCache(model.config, room)
        logits = forward(ids, **{cache_argument(): cache}, logits_to_keep=1).logits
        logits = greedy(forward, cache, logits, WARMUP)
        _, total_ms = timed_ms(lambda: greedy(forward, cache, logits, steps))
        step_us = total_ms / steps * 1e3
        kernels = profile_steps(forward, cache, logits, steps)
    by_kind: dict[str, float] = {}
    for name, _, us in kernels:
        by_kind[kind_of(name)] = by_kind.get(kind_of(name), 0.0) + us
    busy = sum(by_kind.values())
    gemv = by_kind.get(KINDS[0][0], 0.0)
    return {"coordinate_descent_tuning": tuning, "step_us": round(step_us, 1),
            "gpu_busy_us": round(busy, 1), "idle_us": round(step_us - busy, 1),
            "kernels_per_step": round(sum(calls for _, calls, _ in kernels)),
            "by_kind_us": {k: round(v, 1) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "gemv_bandwidth_tb_s": round(weight_bytes / gemv / 1e6, 2) if gemv else None,
            "top_kernels": [(name[:100], round(calls, 1), round(us, 1)) for name, calls, us in
                            sorted(kernels, key=lambda k: -k[2])[:12]]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--context", type=int, default=16384)
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--out")
    args = parser.parse_args()
    model = build(llama_8b())
    embedding = model.model.embed_tokens.weight
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) \
        - embedding.numel() * embedding.element_size()   # a step reads one row of it
    bandwidth = copy_bandwidth()
    ids = torch.randint(0, model.config.vocab_size, (1, args.context),
                        generator=torch.Generator().manual_seed(args.context)).cuda()
    result = {"device": torch.cuda.get_device_name(), "command": " ".join(sys.argv),
              "torch": torch.__version__, "context": args.context, "budget": args.budget,
              "weight_bytes": weights, "copy_bandwidth_tb_s": round(bandwidth / 1e12, 2),
              "weight_read_floor_us": round(weights / bandwidth * 1e6, 1), "runs": []}
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}), flush=True)
    for tuning in (False, True):
        run = measure(model, ids, args.budget, args.steps, weights, tuning)
        print(json.dumps(run, indent=1), flush=True)
        result["runs"].append(run)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
