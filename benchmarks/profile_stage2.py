"""Where one stage-2 decode step spends GPU time: kernels, their count and their device time.

Llama-3.1-8B attention shape, bf16, RocketKV's plan for the given context and token budget.
Three steps are profiled: stage 2 over plain keys (`sparse_decode`, the plan as ints), a
compressed cache's step over the packed layout (append + `packed_sparse_decode`, the plan read
from the header), and exact flash-decoding over a packed layer holding the whole context
(`packed_exact_decode`, the dense row on our stack).
    python3 benchmarks/profile_stage2.py [--batch 1] [--context 131072] [--budget 256]
"""
import argparse
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, ".")
from rkv_compile import state as S  # noqa: E402
from rkv_compile.kernels import triton_decode as T  # noqa: E402
from rkv_compile.policies import RocketKV  # noqa: E402

HQ, HKV, D = 32, 8, 128


def packed_layer(batch: int, keys: torch.Tensor, values: torch.Tensor, **words):
    """A packed layer holding `keys`/`values` as its stored slots, room for more after them."""
    n = keys.shape[2]
    packed_k, packed_v, layer = S.allocate(batch, HKV, D, D, S.slot_bucket(n + 1), "",
                                           keys.dtype, "cuda")
    layer.keys[:, :, :n], layer.values[:, :, :n] = keys, values
    layer.set_word(S.Word.STORED, n)
    for word, value in words.items():
        layer.set_word(S.Word[word], value)
    return packed_k, packed_v, layer


def steps(batch: int, context: int, budget: int):
    """RocketKV's plan for the shape, and the three steps as functions: stage 2 over plain keys,
    a compressed cache's step over the packed layout (the stored counts put back after each
    step: one tiny copy), and exact decode over a packed layer holding the whole context."""
    plan = RocketKV(budget, 128).plan(context - 128, D)
    scale = D**-0.5
    q = torch.randn(batch, HQ, 1, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(batch, HKV, plan.capacity, D, device="cuda", dtype=torch.bfloat16)
            for _ in range(2))
    keys, values, layer = packed_layer(batch, k[:, :, :-1], v[:, :, :-1], CHUNK=plan.chunk,
                                       DIMS=plan.dims, TOPK=plan.topk)
    start = layer.header.clone()

    def cache_step():
        T.append_packed(keys, values, k[:, :, -1:], v[:, :, -1:])
        out = T.packed_sparse_decode(q, keys, values, scale, plan.topk)
        layer.header.copy_(start)
        return out

    whole = [torch.randn(batch, HKV, context, D, device="cuda", dtype=torch.bfloat16)
             for _ in range(2)]
    exact_k, exact_v, _ = packed_layer(batch, *whole)
    return plan, dict(
        plain=lambda: T.sparse_decode(q, k, v, None, scale, plan.chunk, plan.dims, plan.topk),
        cache_step=cache_step,
        exact=lambda: T.packed_exact_decode(q, exact_k, exact_v, scale))


def report(name: str, step, steps: int = 10) -> None:
    for _ in range(20):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    launches = sum(e.count for e in events) / steps
    busy = sum(e.device_time_total for e in events) / steps
    print(f"{name}: {launches:.0f} kernels per step, {busy:.1f} us of GPU time per step")
    for e in sorted(events, key=lambda e: -e.device_time_total):
        print(f"  {e.device_time_total / steps:7.2f} us  x{e.count // steps:<3} {e.key[:90]}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=128 * 1024)
    parser.add_argument("--budget", type=int, default=256)
    args = parser.parse_args()
    plan, timed = steps(args.batch, args.context, args.budget)
    print(f"batch {args.batch}, {args.context // 1024}K context, budget {args.budget}: cache "
          f"{plan.capacity} tokens, chunk {plan.chunk}, dims {plan.dims}, top-k {plan.topk}")
    report("stage 2 over plain keys", timed["plain"])
    report("a compressed cache's step (append + stage 2, packed)", timed["cache_step"])
    report(f"exact decode over {args.context // 1024}K packed tokens", timed["exact"])


if __name__ == "__main__":
    main()
