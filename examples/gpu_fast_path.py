"""The fast path on a GPU is the zero-change one: compile the forward, call generate.

A Llama-3.2-1B-shaped model with random bf16 weights and a 16K-token prompt, greedy: plain
generate (full KV) against the same generate with the forward compiled by backend="rocketkv".
Decode steps then run compiled with the Triton kernels inside, replayed as CUDA graphs, over
the DynamicCache generate builds. Prints the time per decode step and the GPU memory the cache
holds. Needs a CUDA GPU (on the CPU it says so and stops); the first rocketkv call compiles
(minutes), the second is timed. Measured numbers for an 8B shape: BENCHMARKS.md.

    python examples/gpu_fast_path.py
"""
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import rkv_compile
from rkv_compile.hf import returned_cache

CONTEXT, NEW, OPTIONS = 16384, 32, {"token_budget": 256, "max_new_tokens": 32}


def ms_per_token(model, ids) -> tuple[float, object]:
    """Decode time per token: (a generate of NEW tokens - a generate of 1) / (NEW - 1)."""
    def timed(n):
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             return_dict_in_generate=True)
        torch.cuda.synchronize()
        return time.perf_counter() - start, out
    with torch.no_grad():
        timed(NEW)   # warm up (compiles)
        one, _ = timed(1)
        many, out = timed(NEW)
    return (many - one) / (NEW - 1) * 1e3, out


def main() -> dict:
    if not torch.cuda.is_available():
        print("gpu_fast_path.py needs a CUDA GPU")
        return {"skipped": "no CUDA GPU"}
    config = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                         max_position_embeddings=131072)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    model.generation_config.eos_token_id = None
    ids = torch.randint(0, config.vocab_size, (1, CONTEXT), device="cuda")
    dense_ms, dense = ms_per_token(model, ids)
    dense_bytes = sum(t.numel() * t.element_size() for layer in returned_cache(dense).layers
                      for t in (layer.keys, layer.values))
    del dense
    model.forward = torch.compile(model.forward, backend="rocketkv", options=OPTIONS)
    rocketkv_ms, out = ms_per_token(model, ids)
    cache = returned_cache(out)
    kept = rkv_compile.stored(cache)[0].lengths[0]
    cache_bytes = sum(t.numel() * t.element_size() for layer in cache.layers
                      for t in (layer.keys, layer.values))
    print(f"{CONTEXT}-token prompt, {NEW} new tokens, {torch.cuda.get_device_name()}")
    mib = 2**20
    print(f"plain generate (full KV): {dense_ms:6.2f} ms/token, cache {dense_bytes / mib:7.1f} MiB")
    print(f"rocketkv, zero change:    {rocketkv_ms:6.2f} ms/token, cache {cache_bytes / mib:7.1f} "
          f"MiB ({kept} tokens kept per KV head)")
    return {"dense_ms": dense_ms, "rocketkv_ms": rocketkv_ms, "kept": kept}


if __name__ == "__main__":
    main()
