"""A policy applied eagerly: greedy decoding of an HF model with the policy step by step.

No torch.compile and no pass: a custom transformers attention function runs exact attention for
the prompt and records what eviction needs (each layer's keys, values and last queries); the
policy's PyTorch reference then evicts, and decode steps call its reference decode. The tests
hold the pass to this (the eager oracle). `rkv eval` uses it to sweep policies without compiling
a graph per configuration, and shares one prefill across them: every policy here prefills
exactly.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .config import RocketKVConfig
from .policies.rocketkv_mt import whole_view

ATTENTION = "rkv_eager"


@dataclasses.dataclass
class Prefill:
    """An exact prefill (batch 1), per attention layer in order: what any policy evicts from."""

    length: int
    logits: Tensor                 # (vocab,) at the last prompt position
    keys: list[Tensor]
    values: list[Tensor]
    queries: list[Tensor]          # the last `window` queries
    masks: list[Tensor | None]     # their mask rows, or None (plain causal)
    scales: list[float]


def _policy_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                      **kwargs):
    state = module._rkv_eager
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    layer = module.layer_idx
    if "prefill" in state:   # the prompt: exact, and recorded
        w, record = state["window"], state["prefill"]
        record.keys.append(key)
        record.values.append(value)
        record.queries.append(query[:, :, -w:])
        record.masks.append(None if attention_mask is None else attention_mask[..., -w:, :])
        record.scales.append(scale)
    config, plan = state.get("config"), state.get("plans", {}).get(layer)
    if plan is None or not (config.method.sparse_decode or config.method.decode_state):
        q_len, n = query.shape[2], key.shape[2]
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                             is_causal=attention_mask is None and q_len == n,
                                             scale=scale, enable_gqa=True)
    elif config.method.keeps_history:
        out, *view = config.method.view_decode(query, key, value, attention_mask, scale,
                                               plan.chunk, plan.dims, plan.topk,
                                               *state["views"][layer])
        state["views"][layer] = view
    elif config.method.decode_state:
        out, state["states"][layer] = config.method.evicting_decode(
            query, key, value, attention_mask, scale, plan.topk, state["states"][layer])
    else:
        out = config.method.decode(query, key, value, attention_mask, scale, plan.chunk,
                                   plan.dims, plan.topk)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION, _policy_attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)


@contextlib.contextmanager
def _attention(model, state: dict):
    previous = model.config._attn_implementation
    modules = [m for m in model.modules() if hasattr(m, "layer_idx")]
    for m in modules:
        m._rkv_eager = state
    model.set_attn_implementation(ATTENTION)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
        for m in modules:
            del m._rkv_eager


@torch.no_grad()
def prefill(model, input_ids: Tensor, window: int) -> Prefill:
    """The exact prefill of one prompt, recorded for `continue_greedy`."""
    T = input_ids.shape[1]
    record = Prefill(T, None, [], [], [], [], [])
    with _attention(model, {"prefill": record, "window": window}):
        logits = model(input_ids, position_ids=torch.arange(T, device=input_ids.device)[None],
                       use_cache=False, logits_to_keep=1).logits
    record.logits = logits[0, -1]
    return record


@torch.no_grad()
def continue_greedy(model, prompt: Prefill, config: RocketKVConfig, max_new_tokens: int,
                    stop_tokens: frozenset[int] = frozenset()) -> tuple[list[int], list[int]]:
    """Greedy tokens after `prompt` with the policy of `config` (up to and including a stop
    token after the first token), and each layer's cache length right after eviction."""
    T, layers, method = prompt.length, len(prompt.keys), config.method
    observed = method.observed_queries(T)
    if prompt.queries and prompt.queries[0].shape[2] < observed:
        raise ValueError(f"the prefill recorded {prompt.queries[0].shape[2]} queries; "
                         f"{method.name} reads {observed}")
    cache, plans, positions, states, views = DynamicCache(config=model.config), {}, {}, {}, {}
    # sliding-window layers keep their own last tokens: the pass leaves them exact
    types = getattr(model.config.get_text_config(decoder=True), "layer_types", None)
    full = [layer for layer in range(layers) if types is None or types[layer] == "full_attention"]
    for layer in range(layers):
        key, value = whole = prompt.keys[layer], prompt.values[layer]
        views[layer] = whole_view(*whole)
        if config.compresses and layer in full:
            index = full.index(layer)   # the layer's place among the compressed ones
            plan = plans[layer] = config.plan(T, key.shape[-1], index, len(full))
            if method.rewrites_prompt(T, plan):
                source, mask = method.reuses(index), prompt.masks[layer]
                key, value, positions[layer], states[layer] = method.compress(
                    prompt.queries[layer][:, :, -observed:], key, value,
                    None if mask is None else mask[..., -observed:, :], prompt.scales[layer],
                    min(plan.prompt_budget, T), None if source is None else positions[full[source]])
                views[layer] = (key, value, positions[layer])
        if method.keeps_history:   # the cache keeps every token; decode reads the view
            key, value = whole
        cache.update(key, value, layer)
    kept = [layer.keys.shape[2] for layer in cache.layers]
    tokens = [int(prompt.logits.argmax())]
    device = prompt.logits.device
    with _attention(model, {"config": config, "plans": plans, "states": states, "views": views}):
        for step in range(max_new_tokens - 1):
            if step and tokens[-1] in stop_tokens:
                break
            logits = model(torch.tensor([[tokens[-1]]], device=device), past_key_values=cache,
                           position_ids=torch.tensor([[T + step]], device=device)).logits
            tokens.append(int(logits[0, -1].argmax()))
    return tokens, kept


def generate(model, input_ids: Tensor, config: RocketKVConfig, max_new_tokens: int,
             stop_tokens: frozenset[int] = frozenset()) -> tuple[list[int], list[int]]:
    """`continue_greedy` after this prompt's prefill."""
    observed = config.method.observed_queries(input_ids.shape[1])
    return continue_greedy(model, prefill(model, input_ids, observed), config, max_new_tokens,
                           stop_tokens)


@torch.no_grad()
def multi_turn(model, turns: list[Tensor], config: RocketKVConfig,
               max_new_tokens: int | Sequence[int]) -> list[list[int]]:
    """A conversation under the policy of `config`: the greedy reply of `max_new_tokens` tokens
    (or as many as its entry for each turn; 0: the turn is a prompt's chunk, fed and not
    answered) to each turn (batch 1), as `generate` continuing one cache gives.

    Each turn's tokens (after the last reply's final token, which the cache has not seen) are
    prefilled exactly over the cache. The policy's selection then runs over every stored token,
    voted by the turn's last queries (if it has as many as the selection reads; else every
    token is kept), with the plan of the conversation's length so far: into
    each layer's view, which decode reads, for a policy that keeps the history (rocketkv-mt);
    into the cache itself otherwise (rocketkv: the kept history and the turn are evicted
    again)."""
    method, cache, replies, length = config.method, DynamicCache(config=model.config), [], 0
    plans = {}
    device = turns[0].device
    counts = [max_new_tokens] * len(turns) if isinstance(max_new_tokens, int) else max_new_tokens
    for turn, count in zip(turns, counts):
        new = turn if not (replies and replies[-1]) else torch.cat(
            [torch.tensor([[replies[-1][-1]]], device=device), turn], dim=1)
        record = Prefill(0, None, [], [], [], [], [])
        stored = cache.get_seq_length() + new.shape[1]
        observed = method.observed_queries(stored)
        with _attention(model, {"prefill": record, "window": observed}):
            positions = torch.arange(length, length + new.shape[1], device=device)[None]
            logits = model(new, past_key_values=cache, position_ids=positions).logits
        length += new.shape[1]
        # A turn with fewer tokens than the selection reads queries keeps every stored token;
        # where the cache itself was evicted, decode keeps its plan (the plan of its summaries).
        short = new.shape[1] < observed
        views, selections = {}, {}
        for layer, (key, value) in enumerate(zip(record.keys, record.values)):
            plan = config.plan(length, key.shape[-1], layer, len(record.keys))
            if not (short and layer in plans and not method.keeps_history):
                plans[layer] = plan
            kept = whole_view(key, value)
            if method.rewrites_prompt(stored, plan) and not short:
                source = method.reuses(layer)
                kept = method.compress(record.queries[layer], key, value, record.masks[layer],
                                       record.scales[layer], min(plan.prompt_budget, stored),
                                       None if source is None else selections[source])[:3]
            selections[layer] = kept[2]
            if method.keeps_history:
                views[layer] = kept
            else:
                cache.layers[layer].keys, cache.layers[layer].values = kept[:2]
        tokens = [int(logits[0, -1].argmax())] if count else []
        with _attention(model, {"config": config, "plans": plans, "views": views}):
            for _ in range(count - 1):
                logits = model(torch.tensor([[tokens[-1]]], device=device), past_key_values=cache,
                               position_ids=torch.tensor([[length]], device=device)).logits
                length += 1
                tokens.append(int(logits[0, -1].argmax()))
        replies.append(tokens)
    return replies
