"""Sweep the stage-2 kernels' launch parameters (triton_decode's configs-as-data) on a GPU.

For each shape (Llama-3.1-8B attention, bf16, RocketKV's plan for the context and budget), one
knob at a time is moved off its default while the others keep theirs, and three steps are timed
as CUDA graphs (medians of do_bench_cudagraph): a compressed cache's step (append + stage 2 over
the packed layout), stage 2 over plain keys, and exact decode over the whole context (where the
batch's whole context fits: up to 2**20 tokens). `--bits N`: the cache's step over N-bit codes
only (`profile_stage2.coded_layer`).
    python3 benchmarks/tune_stage2.py --out tune.json
    python3 benchmarks/tune_stage2.py --shapes 349x131072x256 --knobs CHUNK_LOGITS.BLOCK_C
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time

import torch
import triton
from triton.testing import do_bench_cudagraph

sys.path.insert(0, ".")
from rkv_compile.kernels import triton_decode as T  # noqa: E402
from profile_stage2 import steps  # noqa: E402

KNOBS = {   # (config name, key): values tried; the first of each is not the default necessarily
    ("CHUNK_LOGITS", "BLOCK_C"): [8, 16, 32, 64, 128],
    ("CHUNK_LOGITS", "num_warps"): [1, 2, 4, 8],
    ("CHUNK_LOGITS", "UNROLL"): [1, 2, 4, 8],   # 1: a chunk's rows loaded one at a time
    ("CHUNK_LOGITS", "DIMS_BY_RANK"): [False, True],
    ("CHUNK_LOGITS", "ONE_BOUND"): [False, True],
    ("CHUNK_PROGRAMS_PER_SM", None): [1, 4, 16, 1 << 20],   # 1 << 20: a program per block
    ("SELECTION_SMALL", None): [1 << 20, 256, 512, 1024],   # 1 << 20: every lane, always
    ("ATTENTION", "BLOCK_N"): [16, 32, 64],
    ("ATTENTION", "num_warps"): [2, 4, 8],
    ("PACKED_ATTENTION", "BLOCK_N"): [16, 32, 64],
    ("SELECTION_WARPS", None): [1, 2, 4, 8, 16],
}


def setting(name, key, value):
    """Set one knob; returns a function that puts the old value back."""
    if key is None:
        old = getattr(T, name)
        setattr(T, name, value)
        return lambda: setattr(T, name, old)
    config = getattr(T, name)
    old = config[key]
    config[key] = value
    return lambda: config.__setitem__(key, old)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="1x131072x256,1x131072x1024,8x131072x256")
    parser.add_argument("--budget-s", type=float, default=240, help="stop sweeping after this")
    parser.add_argument("--out", default=None)
    parser.add_argument("--bits", type=int, choices=(2, 4, 8))
    parser.add_argument("--knobs", default=None,
                        help="comma-separated knob names to sweep (CHUNK_LOGITS.UNROLL, "
                             "SELECTION_SMALL, ...); all by default")
    args = parser.parse_args()
    began = time.time()
    rows = []
    result = dict(device=torch.cuda.get_device_name(), date=str(datetime.date.today()),
                  torch=torch.__version__, triton=triton.__version__,
                  command=" ".join(sys.argv), rows=rows)
    for shape in args.shapes.split(","):
        batch, context, budget = map(int, shape.split("x"))
        _, timed = steps(batch, context, budget, args.bits, batch * context <= 1 << 20)
        for (name, key), values in KNOBS.items():
            if args.knobs and (name if key is None else f"{name}.{key}") not in args.knobs.split(","):
                continue
            for value in values:
                if time.time() - began > args.budget_s:
                    break
                restore = setting(name, key, value)
                try:
                    ms = {step: do_bench_cudagraph(fn, rep=50, return_mode="median")
                          for step, fn in timed.items() if step != "exact" or name == "ATTENTION"}
                finally:
                    restore()
                rows.append(dict(batch=batch, context=context, budget=budget, config=name,
                                 key=key, value=value, **{f"{s}_us": t * 1e3 for s, t in ms.items()}))
                print(f"{shape:>14} {name}.{key}={value}: " + "  ".join(
                    f"{s} {t * 1e3:7.1f} us" for s, t in ms.items()), flush=True)
                if args.out:
                    json.dump(result, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
