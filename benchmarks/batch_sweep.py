"""Decode throughput against batch size on the GPU, with padding: a Llama-3.1-8B-shaped model with
random bf16 weights at a 32K context, dense KV vs RocketKV.

The batch is left-padded: its prompts are the context less each --pads value (by default 0, 1K,
2K and 3K tokens of padding), one prompt per pad, repeated to fill the batch.
  static       the dense setup of end_to_end.py: a 32K prompt prefilled (sdpa, flash) into a
               StaticCache, repeated to the batch; decode compiled by Inductor with CUDA graphs.
               Padding does not change what a dense step reads (every row holds 32K slots), so
               one unpadded prompt stands for all. Batches whose caches do not fit are recorded
               as such, not run.
  rocketkv     torch.compile(backend=rocketkv, token_budget=--budget; CUDA graphs) with a
               RocketKVCache: the padded prompts prefilled together (each row evicted over its
               own tokens with its own plan; that prefill runs uncompiled), then repeated to the
               batch (`batch_select_indices`: decode time does not depend on the values).
Floors: the weight bytes plus the KV bytes a step must read (dense: every row's 32K slots;
RocketKV: every stored slot, more than stage 2 reads), over the copy bandwidth.

    python3 benchmarks/batch_sweep.py --out benchmarks/results/batch_sweep_h100.json
    python3 benchmarks/batch_sweep.py --tiny    # a small model, on the CPU too: checks the script
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import torch
sys.path.insert(0, ".")
sys.path.insert(0, "benchmarks")
import rkv_compile  # noqa: E402
from end_to_end import (DEVICE, GIB, RESERVE, WARMUP, build, cache_bytes, cleanup,  # noqa: E402
                        free_bytes, llama_8b, peak_gib, reset_peak, run_meta, static_prefill,
                        sync, timed_ms, tiny)
from rkv_compile.cache import RocketKVCache  # noqa: E402
from rkv_compile.hf import cache_argument  # noqa: E402


def decode_ms(forward, cache, token, positions, steps: int) -> float:
    """ms per greedy decode step over `cache`, after WARMUP steps (compile, CUDA-graph record);
    `positions`: each row's next position (a padded row's are its own)."""

    def run(count, token, positions):
        for _ in range(count):
            torch.compiler.cudagraph_mark_step_begin()
            logits = forward(token, **{cache_argument(): cache}, position_ids=positions[:, None],
                             logits_to_keep=1).logits
            token, positions = logits[:, -1:].argmax(-1), positions + 1
        return token, positions

    token, positions = run(WARMUP, token, positions)
    sync()
    start = time.perf_counter()
    run(steps, token, positions)
    sync()
    return (time.perf_counter() - start) / steps * 1e3


class Sweep:
    def __init__(self, model, args, meta: dict):
        self.model, self.args, self.meta, self.rows = model, args, meta, []
        self.room = WARMUP + args.steps + 1
        self.bandwidth = meta["copy_bandwidth_bytes_per_s"]

    def record(self, setup, batch, step_ms=None, status="ok", kv_bytes=None, **extra):
        floor = None
        if self.bandwidth and kv_bytes is not None:
            floor = round((self.meta["weight_bytes"] + kv_bytes) / self.bandwidth * 1e3, 3)
        row = {"setup": setup, "context": self.args.context, "batch": batch, "status": status,
               "decode_ms_per_token": None if step_ms is None else round(step_ms, 3),
               "tokens_per_s": None if step_ms is None else round(batch * 1e3 / step_ms, 1),
               "read_floor_ms": floor, "kv_gib": kv_bytes and round(kv_bytes / GIB, 2),
               "peak_gib": round(peak_gib(), 2), **extra}
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        if self.args.out:
            with open(self.args.out, "w") as f:
                json.dump({**self.meta, "rows": self.rows}, f, indent=1)

    def static(self, batches):
        model, context = self.model, self.args.context
        ids = torch.randint(0, model.config.vocab_size, (1, context),
                            generator=torch.Generator().manual_seed(0)).to(DEVICE)
        with torch.no_grad():
            logits, one, _ = static_prefill(model, ids, context + self.room)
            per_row = cache_bytes(t for layer in one.layers for t in (layer.keys, layer.values))
            forward = torch.compile(model.forward, options={"triton.cudagraphs": True})
            token = logits[:, -1:].argmax(-1)
            for batch in batches:
                if batch * per_row > free_bytes() + per_row - RESERVE:
                    self.record("static", batch, status="does not fit",
                                kv_bytes=batch * per_row)
                    continue
                cache = copy.copy(one)
                cache.layers = [copy.copy(layer) for layer in one.layers]
                for layer in cache.layers:   # (each step advances a layer's own counter)
                    layer.cumulative_length = layer.cumulative_length.clone()
                    layer.batch_size = batch
                    layer.keys = layer.keys.repeat_interleave(batch, 0)
                    layer.values = layer.values.repeat_interleave(batch, 0)
                    torch._dynamo.mark_static_address(layer.keys)
                    torch._dynamo.mark_static_address(layer.values)
                reset_peak()
                positions = torch.full((batch,), context, device=DEVICE)
                step = decode_ms(forward, cache, token.repeat(batch, 1), positions,
                                 self.args.steps)
                self.record("static", batch, step, kv_bytes=batch * per_row)
                del cache
                cleanup()

    def rocketkv(self, batches):
        model, args = self.model, self.args
        model.set_attn_implementation("sdpa")
        options = {"token_budget": args.budget, "max_new_tokens": self.room}
        forward = torch.compile(model.forward, backend=rkv_compile.rocketkv, options=options)
        lengths = [args.context - pad for pad in args.pads]
        ids = torch.zeros(len(lengths), args.context, dtype=torch.long)
        mask = torch.zeros_like(ids)
        gen = torch.Generator().manual_seed(1)
        for b, n in enumerate(lengths):
            ids[b, args.context - n:] = torch.randint(1, model.config.vocab_size, (n,),
                                                      generator=gen)
            mask[b, args.context - n:] = 1
        ids, mask = ids.to(DEVICE), mask.to(DEVICE)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        with torch.no_grad():
            reset_peak()
            padded = RocketKVCache(model.config, self.room)
            logits, prefill_ms = timed_ms(lambda: forward(
                ids, attention_mask=mask, position_ids=positions, **{cache_argument(): padded},
                logits_to_keep=1).logits)
            stored = rkv_compile.stored(padded)[0].lengths
            self.record(f"rocketkv-{args.budget} prefill", len(lengths), status="ok",
                        prefill_ms=round(prefill_ms, 1), prompt_lengths=lengths,
                        stored_after_prefill=stored)
            token = logits[:, -1:].argmax(-1)
            for batch in batches:
                rows = torch.arange(batch) % len(lengths)
                cache = copy.deepcopy(padded)
                cache.batch_select_indices(rows.to(DEVICE))
                state = [t for layer in cache.layers for t in (layer.keys, layer.values)]
                reset_peak()
                step = decode_ms(forward, cache, token[rows.to(DEVICE)],
                                 torch.tensor(lengths, device=DEVICE)[rows.to(DEVICE)],
                                 args.steps)
                self.record(f"rocketkv-{args.budget}", batch, step, kv_bytes=cache_bytes(state),
                            stored_after_prefill=[stored[r] for r in rows.tolist()])
                del cache, state
                cleanup()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--pads", type=int, nargs="+", default=[0, 1024, 2048, 3072])
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--setups", nargs="+", default=["static", "rocketkv"])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--tiny", action="store_true", help="a small model: checks the script")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.tiny:
        args.batches, args.context, args.pads = [1, 3], 400, [0, 100, 250]
        args.budget, args.steps = 32, 3
    model = build(tiny() if args.tiny else llama_8b())
    meta = run_meta(model, args.steps)
    sweep = Sweep(model, args, meta)
    if "rocketkv" in args.setups:
        sweep.rocketkv(args.batches)
        cleanup()
    if "static" in args.setups:
        sweep.static(args.batches)


if __name__ == "__main__":
    main()
