"""The eager oracle: greedy decoding of an HF model with RocketKV applied step by step.

It shares no code with the pass: a custom transformers attention function calls the reference
ops directly (exact attention + the policy's eviction at prefill, its decode step), and the
evicted caches are written into the DynamicCache by hand after prefill.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from rkv_compile import RocketKVConfig

ORACLE = "rkv_oracle"


def _oracle_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                      **kwargs):
    state = module._rkv_oracle
    config: RocketKVConfig = state["config"]
    D = query.shape[-1]
    scale = scaling if scaling is not None else D**-0.5
    q_len, n = query.shape[2], key.shape[2]
    layer, method = module.layer_idx, config.method
    out = None
    if q_len == n or not config.compresses or not method.sparse_decode:  # exact attention
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                             is_causal=attention_mask is None and q_len == n,
                                             scale=scale, enable_gqa=True)
    if not config.compresses:
        return out.transpose(1, 2).contiguous(), None
    if q_len == n:   # then eviction
        plan = config.plan(n, D)
        state["plans"][layer] = plan
        if n > plan.prompt_budget:
            w = config.window_size
            mask = None if attention_mask is None else attention_mask[..., -w:, :]
            state["kept"][layer] = method.evict(query[:, :, -w:], key, value, mask, scale,
                                                plan.prompt_budget - w)
    elif out is None:
        assert q_len == 1
        plan = state["plans"][layer]
        out = method.decode(query, key, value, attention_mask, scale, plan.chunk, plan.dims,
                            plan.topk)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ORACLE, _oracle_attention)
AttentionMaskInterface.register(ORACLE, sdpa_mask)


@torch.no_grad()
def oracle_generate(model, input_ids: torch.Tensor, config: RocketKVConfig,
                    max_new_tokens: int) -> tuple[list[int], list[int]]:
    """Greedy tokens (batch 1) and each layer's cache length right after prefill."""
    previous = model.config._attn_implementation
    state = {"config": config, "plans": {}, "kept": {}}
    attn_modules = [m for m in model.modules() if hasattr(m, "layer_idx")]
    for m in attn_modules:
        m._rkv_oracle = state
    model.set_attn_implementation(ORACLE)
    try:
        cache = DynamicCache(config=model.config)
        T = input_ids.shape[1]
        device = input_ids.device
        logits = model(input_ids, past_key_values=cache,
                       position_ids=torch.arange(T, device=device)[None]).logits
        for layer, (k, v) in state["kept"].items():
            cache.layers[layer].keys, cache.layers[layer].values = k, v
        kept = [layer.keys.shape[2] for layer in cache.layers]
        tokens = [int(logits[0, -1].argmax())]
        for step in range(max_new_tokens - 1):
            logits = model(torch.tensor([[tokens[-1]]], device=device), past_key_values=cache,
                           position_ids=torch.tensor([[T + step]], device=device)).logits
            tokens.append(int(logits[0, -1].argmax()))
    finally:
        model.set_attn_implementation(previous)
        for m in attn_modules:
            del m._rkv_oracle
    return tokens, kept
