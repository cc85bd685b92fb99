"""Which CUDA-only piece of the compressed decode breaks a configuration: a diagnostic, not a
benchmark (no timing).

A tiny Llama (the GPU suite's, `tests/models.py`) generates greedily through the backend as a
user calls it, and again with each piece that runs only on CUDA replaced by what the CPU runs:
the Triton decode kernels (by the PyTorch reference op), the Triton append (by cache_ops),
CUDA graphs (off), Inductor (the rewritten graph run as FX). Each run's tokens are compared
with the eager oracle's (`rkv_compile.eager.generate`), and for the first layer of the cache it
returns, the Triton decode op's output with the reference op's. A piece whose replacement
restores the oracle's tokens is where to look.

Written for the 16-bit fault the GPU suite found on 2026-12-07 (H100): generate in bfloat16
or float16 on CUDA gave the oracle's first token, then other tokens, while float32 matched.
On 4a10445 it said: the Triton op run eagerly (its `triton_op_error` 0), the reference op
under Inductor, and the whole step as FX all gave the oracle's tokens, so the fault was the
Triton op as Inductor lowered it (docs/STATUS.md: Inductor took the header for written).

    python3 benchmarks/diagnose_decode.py --dtype bfloat16 --head-dim 16
    python3 benchmarks/diagnose_decode.py --dtype bfloat16 --head-dim 64 --prompts 8
        # steps_agreeing: per prompt, the steps before a variant left the oracle (16-bit
        # rounding leaves it at near ties now and then, in every compiled variant alike);
        # along_oracle: each variant made to follow the oracle's tokens, its logits against
        # the oracle's (largest gap; where its argmax differs, the oracle's own margin there)
    python3 benchmarks/diagnose_decode.py --device cpu --dtype float16    # checks the script
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from models import compare_logits, compiled, logits_along, tiny_hf  # noqa: E402
from rkv_compile import RocketKVConfig  # noqa: E402
from rkv_compile.eager import generate as oracle_generate, generate_like  # noqa: E402
from rkv_compile.hf import cache_argument, returned_cache  # noqa: E402
from rkv_compile.kernels import cache_ops, triton_decode  # noqa: E402
from rkv_compile.passes import rewrite  # noqa: E402

OPTIONS = {"token_budget": 64, "max_new_tokens": 10}
STEPS = 10


@contextlib.contextmanager
def reference_decode():
    """The rewrite picks the PyTorch reference op, as on the CPU."""
    on_cuda = rewrite.SiteDecision.on_cuda
    rewrite.SiteDecision.on_cuda = property(lambda self: False)
    try:
        yield
    finally:
        rewrite.SiteDecision.on_cuda = on_cuda


@contextlib.contextmanager
def reference_append():
    """The append op writes through cache_ops, as on the CPU."""
    append = triton_decode.append_packed
    triton_decode.append_packed = lambda k, v, nk, nv: cache_ops.append(k, v, nk, nv, "")
    try:
        yield
    finally:
        triton_decode.append_packed = append


VARIANTS = {   # name: (options, Inductor, context)
    "as users run it": (OPTIONS, True, contextlib.nullcontext),
    "CUDA graphs off": ({**OPTIONS, "cudagraphs": False}, True, contextlib.nullcontext),
    "no Inductor (FX)": (OPTIONS, False, contextlib.nullcontext),
    "reference decode op": (OPTIONS, True, reference_decode),
    "reference append": (OPTIONS, True, reference_append),
}


def model_of(head_dim: int, dtype, device):
    model = tiny_hf("llama", head_dim=head_dim).to(device, dtype)
    model.generation_config.eos_token_id = None
    return model


def op_check(cache, method, head_dim: int, dtype) -> float | None:
    """|Triton decode - reference decode| / |reference| on the returned cache's first layer, for
    a random query (on CUDA only: on the CPU the Triton op needs Triton's interpreter)."""
    layer = cache.layers[0]
    keys, values = layer.keys, layer.values
    if keys.device.type != "cuda":
        return None
    query = torch.randn(keys.shape[0], 4, 1, head_dim, device=keys.device, dtype=dtype)
    plan = method.plan(method.token_budget, head_dim, 0, 2)
    scale = head_dim ** -0.5
    want = torch.ops.rocketkv.decode(query, keys, values, scale, method.spec).double()
    got = torch.ops.rocketkv.decode_triton(query, keys, values, scale, plan.topk).double()
    return float((got - want).norm() / want.norm())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--head-dim", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=300)
    parser.add_argument("--prompts", type=int, default=1,
                        help="prompts per variant (the i-th 20 i tokens longer): how often each "
                             "variant leaves the oracle, and where (near ties, or a fault)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    model = model_of(args.head_dim, dtype, args.device)
    config = RocketKVConfig.from_options(OPTIONS)
    method = config.method
    prompts = [torch.randint(0, 128, (1, args.prompt + 20 * i), generator=torch.Generator()
                             .manual_seed(args.prompt + 1000 * i)).to(args.device)
               for i in range(args.prompts)]
    oracles = [oracle_generate(model, ids, config, STEPS)[0] for ids in prompts]
    oracle = oracles[0]
    oracle_logits = [logits_along(lambda **kw: generate_like(model, ids, config, **kw), want)
                     for ids, want in zip(prompts, oracles)]
    rows = [dict(variant="eager oracle", tokens=oracle)]
    print(json.dumps(rows[0]), flush=True)
    for name, (options, inductor, context) in VARIANTS.items():
        torch._dynamo.reset()
        forward = model.forward
        row = dict(variant=name)
        try:
            with context(), torch.no_grad():
                model.forward = compiled(forward, options, inductor)
                agreeing = []   # per prompt, the steps before the first token off the oracle's
                along = []
                for ids, want, want_logits in zip(prompts, oracles, oracle_logits):
                    out = model.generate(ids, max_new_tokens=STEPS, min_new_tokens=STEPS,
                                         do_sample=False, return_dict_in_generate=True,
                                         **{cache_argument(): None})
                    got = out.sequences[0, ids.shape[1]:].tolist()
                    agreeing.append(next((i for i, (a, b) in enumerate(zip(got, want))
                                          if a != b), STEPS))
                    if len(agreeing) == 1:
                        row.update(tokens=got, matches=got == oracle,
                                   triton_op_error=op_check(returned_cache(out), method,
                                                            args.head_dim, dtype))
                    along.append(compare_logits(logits_along(
                        lambda **kw: model.generate(ids, **{cache_argument(): None}, **kw), want),
                        want_logits))
                row.update(steps_agreeing=agreeing, along_oracle=along)
        except Exception:
            row.update(raised=traceback.format_exc()[-2000:])
        finally:
            model.forward = forward
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=args.device, dtype=args.dtype, head_dim=args.head_dim,
                           gpu=torch.cuda.get_device_name() if args.device == "cuda" else None,
                           torch=torch.__version__, date=str(datetime.date.today()),
                           command=" ".join(sys.argv), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
