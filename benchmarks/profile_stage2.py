"""Where one stage-2 decode step spends GPU time: kernels, their count and their device time.

Llama-3.1-8B attention shape, bf16, the plan for a 128K context at token budget 256.
    python3 benchmarks/profile_stage2.py [--batch 1]
"""
import argparse
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, ".")
from rkv_compile.kernels import triton_decode as T  # noqa: E402
from rkv_compile.policies import RocketKV  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    plan = RocketKV(256, 128).plan(128 * 1024 - 128, 128)
    q = torch.randn(args.batch, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(args.batch, 8, plan.capacity, 128, device="cuda", dtype=torch.bfloat16)
            for _ in range(2))

    def step():
        return T.sparse_decode(q, k, v, None, 128**-0.5, plan.chunk, plan.dims, plan.topk)

    for _ in range(20):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    launches = sum(e.count for e in events) / 10
    busy = sum(e.device_time_total for e in events) / 10
    print(f"batch {args.batch}, cache {plan.capacity} tokens: {launches:.0f} kernels per step, "
          f"{busy:.1f} us of GPU time per step")
    for e in sorted(events, key=lambda e: -e.device_time_total):
        print(f"  {e.device_time_total / 10:7.2f} us  x{e.count // 10:<3} {e.key[:90]}")


if __name__ == "__main__":
    main()
