"""A quantized cache's decode on the GPU (issue 22): bytes held and per-layer exact decode at
2, 4 and 8 bits against the same layer stored exactly in bf16.

Llama-3.1-8B attention shape (32 query / 8 KV heads, head_dim 128), bf16, every context token
kept (kvquant: quantization alone, no eviction), 16 new tokens exact. For each batch and
context: the bytes the packed tensors hold per token (measured from the tensors), the decode
step through `exact_decode_triton` with `bits` (codes dequantized in registers) and through
`exact_decode_triton` over the bf16 layer, each as a CUDA graph, the read floor of each layer's
bytes at the copy bandwidth measured here, and the kernel's error against exact attention over
the dequantized tokens (`state.tokens`, float64). Medians of do_bench_cudagraph.

    python3 benchmarks/kv_codes.py --out results.json
    python3 benchmarks/kv_codes.py --tiny     # on the CPU (TRITON_INTERPRET=1): checks the script
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import rkv_compile.kernels  # noqa: E402,F401  (registers torch.ops.rocketkv)
from rkv_compile import state as S  # noqa: E402
from rkv_compile.kernels import cache_ops, reference as R  # noqa: E402

HQ, HKV, D = 32, 8, 128
NEW_TOKENS = 16
GROUP = 32


def layer(batch: int, context: int, bits: int | None, dtype, device):
    """(query, keys, values) of a layer holding `context` tokens (as `bits`-bit codes, or
    exactly) and NEW_TOKENS exact ones, with room for none more."""
    g = torch.Generator(device).manual_seed(context + (bits or 0))
    k, v = (torch.randn(batch, HKV, context + NEW_TOKENS, D, generator=g, device=device)
            .to(dtype) for _ in range(2))
    itemsize = k.element_size()
    code = None if bits is None else S.Coded.new(S.slot_bucket(context), bits, GROUP, D, D,
                                                 itemsize)
    slots = S.slot_bucket(NEW_TOKENS) if code else S.slot_bucket(context + NEW_TOKENS)
    keys, values, state = S.allocate(batch, HKV, D, D, slots, "", dtype, device, code)
    if code:
        for b in range(batch):
            code.write(keys, values, slots, b,
                       R.quantize(k[b:b + 1, :, :context], bits, GROUP, 2),
                       R.quantize(v[b:b + 1, :, :context], bits, GROUP, 3))
        state.set_word(S.Word.CODED, context)
        exact = slice(context, context + NEW_TOKENS)
        state.keys[:, :, :NEW_TOKENS], state.values[:, :, :NEW_TOKENS] = k[:, :, exact], v[:, :, exact]
        state.set_word(S.Word.STORED, NEW_TOKENS)
    else:
        state.keys[:, :, :context + NEW_TOKENS], state.values[:, :, :context + NEW_TOKENS] = k, v
        state.set_word(S.Word.STORED, context + NEW_TOKENS)
    q = torch.randn(batch, HQ, 1, D, generator=g, device=device).to(dtype)
    return q, keys, values


def step(q, keys, values, bits):
    if bits is None:
        return lambda: torch.ops.rocketkv.exact_decode_triton(q, keys, values, D**-0.5)
    return lambda: torch.ops.rocketkv.exact_decode_triton(q, keys, values, D**-0.5, bits, GROUP)


def copy_bandwidth() -> float:
    from triton.testing import do_bench
    src = torch.randn(1 << 30, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--contexts", default="32,128", help="K tokens")
    parser.add_argument("--bits", default="2,4,8")
    parser.add_argument("--tiny", action="store_true", help="small shapes, no timing")
    parser.add_argument("--out")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    contexts = [300] if args.tiny else [int(c) * 1024 for c in args.contexts.split(",")]
    batches = [1] if args.tiny else [int(b) for b in args.batches.split(",")]
    bandwidth = copy_bandwidth() if cuda else None
    rows = []
    for batch in batches:
        for context in contexts:
            for bits in [None] + [int(b) for b in args.bits.split(",")]:
                q, keys, values = layer(batch, context, bits, dtype, device)
                held = sum(t.numel() * t.element_size() for t in (keys, values))
                run = step(q, keys, values, bits)
                # the error on the first row (float64 over every row of 8x128K would not fit)
                tokens_k, tokens_v, valid = S.tokens(keys[:1], values[:1], False, dtype)
                want = cache_ops.exact_attention(q[:1].double(), tokens_k.double(),
                                                 tokens_v.double(), valid, D**-0.5)
                error = float((run()[:1].double() - want).norm() / want.norm())
                row = dict(batch=batch, context=context, bits=bits or 16,
                           bytes_per_token=held / batch / (context + NEW_TOKENS) / HKV,
                           held_mib=held / 2**20, error=error)
                if cuda:
                    from triton.testing import do_bench_cudagraph
                    us = do_bench_cudagraph(run, rep=100, return_mode="median") * 1e3
                    row.update(us=us, floor_us=held / bandwidth * 1e6)
                rows.append(row)
                print(json.dumps(row), flush=True)
                del q, keys, values, tokens_k, tokens_v, want
                if cuda:
                    torch.cuda.empty_cache()
                if args.out:   # after every row: a run stopped part way keeps what it measured
                    result = dict(device=torch.cuda.get_device_name() if cuda else "cpu",
                                  date=str(datetime.date.today()), torch=torch.__version__,
                                  bandwidth=bandwidth, command=" ".join(sys.argv), rows=rows)
                    with open(args.out, "w") as f:
                        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
