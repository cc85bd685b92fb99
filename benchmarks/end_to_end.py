"""End to end on the GPU: a Llama-3.1-8B-shaped model with random bf16 weights, full KV vs RocketKV.

For each context: prefill time, decode ms/token over --steps tokens, tokens/s and peak GPU memory,
at batch 1 and at the largest batch each setup fits in memory, for
  generate     transformers `generate` as users run it today (DynamicCache, sdpa). At the large
               batch: its per-step forward in a loop (a batched prefill of that many prompts
               would not fit), eager, over the repeated cache.
  static       the strongest dense setup we built: prefill (sdpa, flash) into a DynamicCache,
               copied into a StaticCache; decode compiled by Inductor with CUDA graphs. Its
               decode attention groups each KV head's query heads as rows of one masked
               matmul-softmax-matmul that Inductor compiles (benchmarks/BENCHMARKS.md: HF's
               masked sdpa repeats the KV heads and is 10x slower at 128K).
  rocketkv-B   torch.compile(backend=rocketkv, token_budget=B) with RocketKVCache (CUDA graphs).
  rocketkv-B-Nbit  the same with kv_bits=N (--kv-bits): the kept prompt tokens held as N-bit
               codes, dequantized inside the decode kernels (issue 22).
Large batches repeat the batch-1 prefill's cache in the batch (`batch_repeat_interleave`):
prefilling hundreds of 128K prompts would take an hour, and decode time does not depend on the
values. The batch is the largest whose caches fit in the free memory, less a reserve.
Speed does not depend on weight values; RoPE is the plain one (no llama3 scaling).
The weight-read floor (weight bytes / copy bandwidth) is the least a batch-1 step can take.

    python3 benchmarks/end_to_end.py --out benchmarks/results/end_to_end_h100.json
    python3 benchmarks/end_to_end.py --tiny    # a small model, on the CPU too: checks the script
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import sys
import time

import torch
from transformers import (AttentionInterface, DynamicCache, LlamaConfig, LlamaForCausalLM,
                          LogitsProcessor, LogitsProcessorList, StaticCache)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

sys.path.insert(0, ".")
import rkv_compile  # noqa: E402
from rkv_compile.cache import RocketKVCache  # noqa: E402
from rkv_compile.hf import cache_argument  # noqa: E402

GIB = 2**30
WARMUP = 3        # decode steps before timing: compile, CUDA-graph warm-up and recording
RESERVE = 6 * GIB  # left free at the large batch: activations, logits, CUDA-graph pools
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def llama_8b() -> LlamaConfig:
    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       max_position_embeddings=262144, tie_word_embeddings=False)


def tiny() -> LlamaConfig:
    return LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192)


def grouped_decode_attention(module, query, key, value, attention_mask, scaling=None,
                             dropout=0.0, **kwargs):
    """Dense decode over a static cache without repeating KV heads: the G query heads of a KV
    head are G rows of one masked matmul-softmax-matmul. Prefill goes to sdpa (flash)."""
    if query.shape[2] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    B, Hq, _, D = query.shape
    Hkv = key.shape[1]
    q = query.view(B, Hkv, Hq // Hkv, D)
    scores = torch.matmul(q, key.transpose(-1, -2)) * (scaling or D**-0.5)
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask, float("-inf"))
    probs = scores.float().softmax(-1).to(query.dtype)
    out = torch.matmul(probs, value).view(B, Hq, 1, D)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("grouped_decode", grouped_decode_attention)
AttentionMaskInterface.register("grouped_decode", sdpa_mask)


def sync():
    if CUDA:
        torch.cuda.synchronize()


def free_bytes() -> int:
    return torch.cuda.mem_get_info()[0] if CUDA else RESERVE + 4 * 2**20   # the CPU check: a few rows


def reset_peak():
    if CUDA:
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / GIB if CUDA else 0.0


def release():
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


def cleanup():
    """Between setups: compiled graphs (and their CUDA-graph pools) too."""
    torch._dynamo.reset()
    release()


def build(config: LlamaConfig) -> LlamaForCausalLM:
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16 if CUDA else torch.float32)
    try:
        with torch.device(DEVICE):
            model = LlamaForCausalLM(config).eval().requires_grad_(False)
    finally:
        torch.set_default_dtype(default)
    model.generation_config.eos_token_id = None   # random weights: always generate every step
    model.generation_config.pad_token_id = 0
    return model


class StepTimer(LogitsProcessor):
    """Called by generate once per new token, after its forward: the time of each."""

    def __init__(self):
        self.times = []

    def __call__(self, input_ids, scores):
        sync()
        self.times.append(time.perf_counter())
        return scores


def greedy(forward, cache, logits, steps: int):
    """`steps` greedy decode steps from `logits`; the last step's logits."""
    for _ in range(steps):
        token = logits[:, -1:].argmax(-1)
        torch.compiler.cudagraph_mark_step_begin()
        logits = forward(token, **{cache_argument(): cache}, logits_to_keep=1).logits
    return logits


def static_prefill(model, ids, max_cache_len: int):
    """The dense setup's prefill: sdpa (flash) into a DynamicCache, copied into a StaticCache of
    `max_cache_len` slots one layer at a time (one copy at most). (logits, cache, prefill ms)."""
    model.set_attn_implementation("grouped_decode")
    dynamic = DynamicCache(config=model.config)
    logits, prefill = timed_ms(
        lambda: model(ids, **{cache_argument(): dynamic}, logits_to_keep=1).logits)
    cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
    for i, layer in enumerate(dynamic.layers):
        cache.update(layer.keys, layer.values, i)
        layer.keys = layer.values = None
    return logits, cache, prefill


def decode_ms(forward, cache, logits, steps: int) -> float:
    logits = greedy(forward, cache, logits, WARMUP)
    sync()
    start = time.perf_counter()
    greedy(forward, cache, logits, steps)
    sync()
    return (time.perf_counter() - start) / steps * 1e3


def timed_ms(fn):
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return out, (time.perf_counter() - start) * 1e3


def largest_batch(per_sequence: int, freed: int = 0) -> int:
    """The most sequences whose caches fit in the free memory (plus `freed`), less the reserve."""
    return max(1, (free_bytes() + freed - RESERVE) // per_sequence)


def cache_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class Bench:
    def __init__(self, model, steps: int, out: str | None, meta: dict):
        self.model, self.steps, self.out, self.meta, self.rows = model, steps, out, meta, []

    def record(self, setup, context, batch, prefill_ms=None, step_ms=None, status="ok",
               **extra):
        row = {"setup": setup, "context": context, "batch": batch, "status": status,
               "prefill_ms": None if prefill_ms is None else round(prefill_ms, 1),
               "decode_ms_per_token": None if step_ms is None else round(step_ms, 3),
               "tokens_per_s": None if step_ms is None else round(batch * 1e3 / step_ms, 1),
               "peak_gib": round(peak_gib(), 2), **extra}
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        if self.out:
            with open(self.out, "w") as f:
                json.dump({**self.meta, "rows": self.rows}, f, indent=1)

    def guarded(self, setup, context, run):
        """Run one setup at one context; an out-of-memory is a result, not a crash."""
        try:
            run()
        except torch.OutOfMemoryError as error:
            self.record(setup, context, None, status="OOM", error=str(error).split("\n")[0][:200])
        cleanup()

    def room(self) -> int:
        """Decode tokens a cache must hold: batch 1, then the large batch, each with warm-up."""
        return 2 * (WARMUP + self.steps) + 1

    def generate(self, ids):
        model, steps, context = self.model, self.steps, ids.shape[1]
        model.set_attn_implementation("sdpa")
        timer = StepTimer()
        reset_peak()
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=steps + 1, do_sample=False,
                           logits_processor=LogitsProcessorList([timer]))
        self.record("generate", context, 1, (timer.times[0] - start) * 1e3,
                    (timer.times[-1] - timer.times[0]) / steps * 1e3)
        cleanup()
        with torch.no_grad():
            cache = DynamicCache(config=model.config)
            logits = model(ids, **{cache_argument(): cache}, logits_to_keep=1).logits
            stored = cache_bytes(t for layer in cache.layers for t in (layer.keys, layer.values))
            # the cache grows by `room` tokens, and each step's cat copies one layer
            per_sequence = stored * (context + self.room()) // context * 33 // 32
            batch = largest_batch(per_sequence, stored)
            cache.batch_repeat_interleave(batch)
            reset_peak()
            step = decode_ms(model.forward, cache, logits.repeat(batch, 1, 1), steps)
        self.record("generate", context, batch, None, step, note="eager forward loop")

    def static(self, ids):
        model, steps, context = self.model, self.steps, ids.shape[1]
        reset_peak()
        with torch.no_grad():
            logits, cache, prefill = static_prefill(model, ids, context + self.room())
            forward = torch.compile(model.forward, options={"triton.cudagraphs": True})
            step = decode_ms(forward, cache, logits, steps)
            self.record("static", context, 1, prefill, step)
            stored = cache_bytes(t for layer in cache.layers for t in (layer.keys, layer.values))
            batch = largest_batch(stored, stored)
            for layer in cache.layers:
                layer.keys = layer.keys.repeat_interleave(batch, 0)
                layer.values = layer.values.repeat_interleave(batch, 0)
                torch._dynamo.mark_static_address(layer.keys)
                torch._dynamo.mark_static_address(layer.values)
            reset_peak()
            step = decode_ms(forward, cache, logits.repeat(batch, 1, 1), steps)
        self.record("static", context, batch, None, step)

    def rocketkv(self, ids, budget: int, kv_bits: int = 16):
        model, steps, context = self.model, self.steps, ids.shape[1]
        model.set_attn_implementation("sdpa")
        options = {"token_budget": budget, "max_new_tokens": self.room()}
        setup = f"rocketkv-{budget}"
        if kv_bits < 16:
            options["kv_bits"] = kv_bits
            setup += f"-{kv_bits}bit"
        forward = torch.compile(model.forward, backend=rkv_compile.rocketkv, options=options)

        def prefill():
            cache = RocketKVCache(model.config, self.room())
            return cache, forward(ids, **{cache_argument(): cache}, logits_to_keep=1).logits

        with torch.no_grad():
            first_ms = timed_ms(prefill)[1]   # compiles the prefill graph
            release()
            reset_peak()
            (cache, logits), prefill_ms = timed_ms(prefill)
            stored = rkv_compile.stored(cache)[0].lengths[0]
            step = decode_ms(forward, cache, logits, steps)
            state = [t for layer in cache.layers for t in (layer.keys, layer.values)]
            per_sequence = cache_bytes(state)
            self.record(setup, context, 1, prefill_ms, step, first_prefill_ms=round(first_ms),
                        cache_gib=round(per_sequence / GIB, 3), stored_after_prefill=stored)
            del state
            batch = largest_batch(per_sequence, per_sequence)
            cache.batch_repeat_interleave(batch)
            reset_peak()
            step = decode_ms(forward, cache, logits.repeat(batch, 1, 1), steps)
        self.record(setup, context, batch, None, step)


def run_meta(model, steps: int) -> dict:
    """What a run's results record about it (printed too): device, date, command, the bytes of
    weights a decode step reads, the copy bandwidth and the weight-read floor. Also lifts
    Dynamo's recompile limits (each batch size and context compiles its own graphs)."""
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.accumulated_recompile_limit = 4096
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    embedding = model.model.embed_tokens.weight
    weights -= embedding.numel() * embedding.element_size()   # a step reads one row of it
    bandwidth = None
    if CUDA:
        sys.path.insert(0, "benchmarks")
        from decode_attention import copy_bandwidth
        bandwidth = copy_bandwidth()
    meta = {"device": torch.cuda.get_device_name() if CUDA else "cpu",
            "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv),
            "torch": torch.__version__, "steps": steps, "weight_bytes": weights,
            "copy_bandwidth_bytes_per_s": bandwidth,
            "weight_read_floor_ms": bandwidth and round(weights / bandwidth * 1e3, 3)}
    print(json.dumps(meta), flush=True)
    return meta


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[16384, 32768, 65536, 131072])
    parser.add_argument("--budgets", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--setups", nargs="+", default=["generate", "static", "rocketkv"])
    parser.add_argument("--kv-bits", type=int, nargs="+", default=[16], choices=[2, 4, 8, 16],
                        help="rocketkv's KV codes (16: the model's dtype, no codes)")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--tiny", action="store_true", help="a small model: checks the script")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.tiny:
        args.contexts, args.budgets, args.steps = [c for c in args.contexts if c <= 4096] or [300], \
            [b for b in args.budgets if b <= 64] or [32], min(args.steps, 4)
    model = build(tiny() if args.tiny else llama_8b())
    meta = run_meta(model, args.steps)
    bench = Bench(model, args.steps, args.out, meta)
    for context in args.contexts:
        ids = torch.randint(0, model.config.vocab_size, (1, context),
                            generator=torch.Generator().manual_seed(context)).to(DEVICE)
        if "generate" in args.setups:
            bench.guarded("generate", context, lambda: bench.generate(ids))
        if "static" in args.setups:
            bench.guarded("static", context, lambda: bench.static(ids))
        if "rocketkv" in args.setups:
            for budget in args.budgets:
                for bits in args.kv_bits:
                    bench.guarded(f"rocketkv-{budget}", context,
                                  lambda: bench.rocketkv(ids, budget, bits))


if __name__ == "__main__":
    main()
