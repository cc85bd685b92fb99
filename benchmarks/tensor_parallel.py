"""Tensor parallelism on the GPUs: a Llama-3.1-8B-shaped model with random bf16 weights, sharded by
transformers (`tp_plan="auto"`) over the ranks torchrun starts, full KV vs RocketKV, batch 1.

Each rank holds half of the heads (at TP=2) and of every KV cache; the rocketkv pass compresses
each rank's own KV heads. Per setup: prefill time, decode ms/token over --steps greedy tokens, and
each rank's peak GPU memory.
  static       prefill (sdpa) into a DynamicCache copied into a StaticCache, decode compiled by
               Inductor with CUDA graphs (end_to_end.py's dense setup, grouped decode attention).
  rocketkv-B   torch.compile(backend=rocketkv, token_budget=B) with RocketKVCache (CUDA graphs).
The weights come from a checkpoint written once (random, seed 0), as transformers shards only
what it loads:

    python3 benchmarks/tensor_parallel.py --write-checkpoint /tmp/llama8b
    python3 benchmarks/tensor_parallel.py --checkpoint /tmp/llama8b --out tp1.json
    torchrun --nproc_per_node 2 benchmarks/tensor_parallel.py --checkpoint /tmp/llama8b --out tp2.json
    ... --tiny    # a small model, on the CPU too (gloo): checks the script
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

sys.path.insert(0, ".")
sys.path.insert(0, "benchmarks")
import rkv_compile  # noqa: E402
from rkv_compile.hf import cache_argument  # noqa: E402
from end_to_end import (CUDA, WARMUP, build, cleanup, decode_ms, llama_8b,  # noqa: E402
                        peak_gib, reset_peak, run_meta, static_prefill, timed_ms, tiny)
from rkv_compile.cache import RocketKVCache  # noqa: E402


def static(model, ids, steps: int) -> dict:
    with torch.no_grad():
        logits, cache, prefill = static_prefill(model, ids, ids.shape[1] + WARMUP + steps + 1)
        forward = torch.compile(model.forward, options={"triton.cudagraphs": CUDA})
        return {"prefill_ms": prefill, "decode_ms_per_token": decode_ms(forward, cache, logits,
                                                                         steps)}


def rocketkv(model, ids, steps: int, budget: int) -> dict:
    model.set_attn_implementation("sdpa")
    room = WARMUP + steps + 1
    options = {"token_budget": budget, "max_new_tokens": room}
    forward = torch.compile(model.forward, backend=rkv_compile.rocketkv, options=options)
    with torch.no_grad():
        cache = RocketKVCache(model.config, room)
        logits, first = timed_ms(lambda: forward(ids, **{cache_argument(): cache},
                                                 logits_to_keep=1).logits)   # compiles
        del cache, logits
        cleanup()
        reset_peak()
        cache = RocketKVCache(model.config, room)
        logits, prefill = timed_ms(lambda: forward(ids, **{cache_argument(): cache},
                                                   logits_to_keep=1).logits)
        return {"prefill_ms": prefill, "first_prefill_ms": first,
                "decode_ms_per_token": decode_ms(forward, cache, logits, steps),
                "stored_after_prefill": rkv_compile.stored(cache)[0].lengths[0],
                "kv_heads_per_rank": cache.layers[0].keys.shape[1]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write-checkpoint", help="write the random model here, then stop")
    parser.add_argument("--checkpoint")
    parser.add_argument("--context", type=int, default=131072)
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--setups", nargs="+", default=["static", "rocketkv"])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--tiny", action="store_true", help="a small model: checks the script")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.tiny:
        args.context, args.budget, args.steps = 300, 32, 3
    if args.write_checkpoint:
        build(tiny() if args.tiny else llama_8b()).save_pretrained(args.write_checkpoint)
        return
    world = int(os.environ.get("WORLD_SIZE", "1"))
    placement = {"tp_plan": "auto"} if world > 1 else {"device_map": "cuda"} if CUDA else {}
    model = AutoModelForCausalLM.from_pretrained(
        args.checkpoint, dtype=torch.bfloat16 if CUDA else torch.float32, **placement).eval()
    model.generation_config.eos_token_id = None
    rank = dist.get_rank() if dist.is_initialized() else 0
    meta = {**run_meta(model, args.steps), "tensor_parallel": world}
    # what this rank reads per step: its shard (a DTensor's numel is the whole tensor's)
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    embedding = model.model.embed_tokens.weight   # a step reads one row of it
    embedding = embedding.to_local() if hasattr(embedding, "to_local") else embedding
    meta["weight_bytes"] = sum(t.numel() * t.element_size() for t in local) \
        - embedding.numel() * embedding.element_size()
    if meta["copy_bandwidth_bytes_per_s"]:
        meta["weight_read_floor_ms"] = round(
            meta["weight_bytes"] / meta["copy_bandwidth_bytes_per_s"] * 1e3, 3)
    ids = torch.randint(0, model.config.vocab_size, (1, args.context),
                        generator=torch.Generator().manual_seed(args.context)).to(model.device)
    rows = []
    for setup in args.setups:
        reset_peak()
        try:
            row = static(model, ids, args.steps) if setup == "static" else \
                rocketkv(model, ids, args.steps, args.budget)
            row["status"] = "ok"
        except torch.OutOfMemoryError as error:
            row = {"status": "OOM", "error": str(error).split("\n")[0][:200]}
        name = setup if setup == "static" else f"rocketkv-{args.budget}"
        row = {"setup": name, "context": args.context, "rank": rank,
               **{k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()},
               "peak_gib": round(peak_gib(), 2)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        cleanup()
    every = [None] * world
    if world > 1:
        dist.all_gather_object(every, {**meta, "rows": rows})
    else:
        every = [{**meta, "rows": rows}]
    if rank == 0 and args.out:
        with open(args.out, "w") as f:
            json.dump({"ranks": every}, f, indent=1)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
