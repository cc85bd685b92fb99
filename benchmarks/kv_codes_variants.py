"""Why a quantized layer's exact decode is slower than bf16 (issue 22): the same kernel,
changed one way at a time, over kv_codes.py's layer (Llama-3.1-8B attention shape, every
token kept), at 16 (bf16), 8, 4 and 2 bits. Each variant runs in a process of its own
(Triton keys a kernel's compiled code by its source when first launched):

  default   the kernel as it is
  bytes     a tile's codes read by byte address, one load per code (the path for head dims
            that are not a whole number of bytes), not as whole bytes unpacked in registers:
            whether the unpacking (`_unpack`'s interleaves) costs what 4 bits lose
  stagesN   the loop software-pipelined N deep (Triton's num_stages; default 3 on Hopper)
  warps8    8 warps a program instead of 4
  block32   32 slots a step over codes instead of 64
(The `split-values` and `split-both` variants of 7ec33b5 measured 4-bit nibbles kept apart:
the values' way is the library's since, BENCHMARKS.md "H100, 7ec33b5".)

Per-layer decode through `exact_decode_triton` as a CUDA graph (median µs), and the error
against float64 attention over the dequantized tokens.

    python3 benchmarks/kv_codes_variants.py [--variants default bytes] [--shapes 1x32768]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

VARIANTS = ["default", "bytes", "stages1", "stages2", "stages4", "warps8", "block32"]


def _read_codes_by_address():
    """Rebinds triton_decode._dequantized to a copy whose whole-byte path is switched off
    (written to a file: Triton compiles a function from its source)."""
    from rkv_compile.kernels import triton_decode as T
    src = open(T.__file__).read()
    start = src.index("@triton.jit\ndef _dequantized")
    body = src[start:src.index("@triton.jit", start + 1)]
    assert "if WIDTH % PER_BYTE == 0:" in body
    folder = os.path.join(os.environ.get("TMPDIR", "/tmp"), "rkv_kv_codes_variants")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "codes_by_address.py"), "w") as f:
        f.write("import triton\nimport triton.language as tl\n"
                "from rkv_compile.kernels.triton_decode import _spread, _unpack  # noqa: F401\n\n"
                + body.replace("if WIDTH % PER_BYTE == 0:", "if False:"))
    sys.path.insert(0, folder)
    import codes_by_address
    T._dequantized = codes_by_address._dequantized


def variant_rows(variant: str, batch: int, context: int) -> None:
    from triton.testing import do_bench_cudagraph

    import kv_codes as K
    from rkv_compile import state as S
    from rkv_compile.kernels import cache_ops, triton_decode as T
    if variant == "bytes":
        _read_codes_by_address()
    elif variant.startswith("stages"):
        T.ATTENTION_CODED["num_stages"] = T.ATTENTION["num_stages"] = int(variant[6:])
    elif variant == "warps8":
        T.ATTENTION_CODED["num_warps"] = T.ATTENTION["num_warps"] = 8
    elif variant == "block32":
        T.ATTENTION_CODED["BLOCK_N"] = 32
    elif variant != "default":
        raise ValueError(f"unknown variant {variant!r}")
    for bits in (None, 8, 4, 2):
        q, keys, values = K.layer(batch, context, bits, torch.bfloat16, "cuda")
        run = K.step(q, keys, values, bits)
        tokens_k, tokens_v, valid = S.tokens(keys[:1], values[:1], False, torch.bfloat16)
        want = cache_ops.exact_attention(q[:1].double(), tokens_k.double(), tokens_v.double(),
                                         valid, K.D**-0.5)
        error = float((run()[:1].double() - want).norm() / want.norm())
        us = do_bench_cudagraph(run, rep=100, return_mode="median") * 1e3
        print(json.dumps(dict(variant=variant, batch=batch, context=context, bits=bits or 16,
                              us=round(us, 1), error=error)), flush=True)
        del q, keys, values, tokens_k, tokens_v, want
        torch.cuda.empty_cache()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    parser.add_argument("--shapes", nargs="+", default=["1x32768"], help="BATCHxCONTEXT")
    parser.add_argument("--variant", help=argparse.SUPPRESS)   # in the child process
    args = parser.parse_args()
    if args.variant:
        batch, context = map(int, args.shapes[0].split("x"))
        return variant_rows(args.variant, batch, context)
    for shape in args.shapes:
        for variant in args.variants:
            child = subprocess.run([sys.executable, __file__, "--variant", variant,
                                    "--shapes", shape], capture_output=True, text=True)
            print(child.stdout, end="", flush=True)
            if child.returncode:
                print(json.dumps(dict(variant=variant, shape=shape,
                                      failed=child.stderr[-1500:])), flush=True)


if __name__ == "__main__":
    main()
