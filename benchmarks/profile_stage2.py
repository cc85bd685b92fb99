"""Where one stage-2 decode step spends GPU time: kernels, their count and their device time.

Llama-3.1-8B attention shape, bf16, RocketKV's plan for the given context and token budget.
Three steps are profiled: stage 2 over plain keys (`sparse_decode`, the plan as ints), a
compressed cache's step over the packed layout (append + `packed_sparse_decode`, the plan read
from the header), and exact flash-decoding over a packed layer holding the whole context
(`packed_exact_decode`, the dense row on our stack). With `--bits N`, the compressed cache's
step over a quantized layer instead: the kept prompt tokens as N-bit codes (random codes, groups
of 32), the generated ones exact, as RocketKVCache holds them with kv_bits=N; `--no-exact` skips
the whole-context step (whose layer would not fit at a large batch).
    python3 benchmarks/profile_stage2.py [--batch 1] [--context 131072] [--budget 256]
        [--bits 4] [--no-exact]
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
GROUP = 32
GENERATED = 16   # exact tokens beside a quantized layer's codes


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


def coded_layer(batch: int, prompt: int, bits: int, **words):
    """A packed layer holding `prompt` tokens as random `bits`-bit codes and GENERATED - 1 exact
    ones, room for one more exact token."""
    code = S.Coded.new(prompt, bits, GROUP, D, D, 2)
    slots = S.slot_bucket(GENERATED)
    keys, values, layer = S.allocate(batch, HKV, D, D, slots, "", torch.bfloat16, "cuda", code)
    for codes, steps, zeros in code.regions(keys, values, slots):
        codes.copy_(torch.randint(0, 256, codes.shape, dtype=torch.uint8, device="cuda"))
        steps.fill_(2 / 2**bits)   # codes spread over [-1, 1)
        zeros.fill_(-1.0)
    layer.keys[:, :, :GENERATED - 1] = torch.randn_like(layer.keys[:, :, :GENERATED - 1])
    layer.values[:, :, :GENERATED - 1] = torch.randn_like(layer.values[:, :, :GENERATED - 1])
    layer.set_word(S.Word.CODED, prompt)
    layer.set_word(S.Word.STORED, GENERATED - 1)
    for word, value in words.items():
        layer.set_word(S.Word[word], value)
    return keys, values, layer


def steps(batch: int, context: int, budget: int, bits: int | None = None, exact: bool = True):
    """RocketKV's plan for the shape, and the three steps as functions: stage 2 over plain keys,
    a compressed cache's step over the packed layout (the stored counts put back after each
    step: one tiny copy), and exact decode over a packed layer holding the whole context."""
    plan = RocketKV(budget, 128).plan(context - 128, D)
    scale = D**-0.5
    q = torch.randn(batch, HQ, 1, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(batch, HKV, plan.capacity, D, device="cuda", dtype=torch.bfloat16)
            for _ in range(2))
    words = dict(CHUNK=plan.chunk, DIMS=plan.dims, TOPK=plan.topk)
    if bits:
        keys, values, layer = coded_layer(batch, plan.capacity - GENERATED, bits, **words)
    else:
        keys, values, layer = packed_layer(batch, k[:, :, :-1], v[:, :, :-1], **words)
    start = layer.header.clone()

    def cache_step():
        T.append_packed(keys, values, k[:, :, -1:], v[:, :, -1:])
        out = T.packed_sparse_decode(q, keys, values, scale, plan.topk, bits,
                                     GROUP if bits else None)
        layer.header.copy_(start)
        return out

    timed = dict(cache_step=cache_step)
    if bits:
        return plan, timed
    timed["plain"] = lambda: T.sparse_decode(q, k, v, None, scale, plan.chunk, plan.dims,
                                             plan.topk)
    if not exact:
        return plan, timed

    whole = [torch.randn(batch, HKV, context, D, device="cuda", dtype=torch.bfloat16)
             for _ in range(2)]
    exact_k, exact_v, _ = packed_layer(batch, *whole)
    timed["exact"] = lambda: T.packed_exact_decode(q, exact_k, exact_v, scale)
    return plan, timed


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
    parser.add_argument("--bits", type=int, choices=(2, 4, 8))
    parser.add_argument("--no-exact", action="store_true")
    args = parser.parse_args()
    plan, timed = steps(args.batch, args.context, args.budget, args.bits, not args.no_exact)
    print(f"batch {args.batch}, {args.context // 1024}K context, budget {args.budget}: cache "
          f"{plan.capacity} tokens, chunk {plan.chunk}, dims {plan.dims}, top-k {plan.topk}")
    if "plain" in timed:
        report("stage 2 over plain keys", timed["plain"])
    codes = f", prompt as {args.bits}-bit codes" if args.bits else ""
    report(f"a compressed cache's step (append + stage 2, packed{codes})", timed["cache_step"])
    if "exact" in timed:
        report(f"exact decode over {args.context // 1024}K packed tokens", timed["exact"])


if __name__ == "__main__":
    main()
