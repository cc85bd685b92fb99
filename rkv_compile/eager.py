"""A policy applied eagerly: the oracle the pass is held to, and the engine of `rkv eval`.

No torch.compile and no pass: a custom transformers attention function runs exact attention for
the prompt and records what eviction needs (each layer's keys, values and last queries); the
policy's PyTorch reference then evicts, and decode steps call its reference decode
(`decode_step`). Three ways in:
- `generate_like(model, ids, config, **generate_kwargs)`: transformers' own `generate`, any
  mode (greedy, sampling, beam search, several sequences per prompt), with the policy applied
  in each layer's attention and its cache; the oracle of `generate` under the backend.
- `prefill` + `continue_greedy`: greedy decoding after one exact prefill that `rkv eval`
  shares across policies and budgets (every policy here prefills exactly); `generate` is both.
- `multi_turn`: a conversation (or a prompt fed in chunks) continuing one cache.
It is written apart from the pass and the packed caches, so that it checks them.
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

from .config import Plan, RocketKVConfig
from .hf import cache_argument
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


@dataclasses.dataclass
class LayerDecode:
    """What a layer's decode steps need after eviction: its plan, and the state its policy
    carries from step to step (scores, or a view: keys, values, positions)."""

    plan: Plan
    scores: Tensor | None = None
    view: tuple | None = None


def decode_step(config: RocketKVConfig, layer: LayerDecode, query: Tensor, key: Tensor,
                value: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """One decode step's attention under the policy, over a layer's stored keys and values
    (this step's token last); `layer`'s state moves on."""
    method, plan = config.method, layer.plan
    if method.keeps_history:
        out, *view = method.view_decode(query, key, value, mask, scale, plan.chunk, plan.dims,
                                        plan.topk, *layer.view)
        layer.view = tuple(view)
        return out
    if method.state == "scores":
        out, layer.scores = method.evicting_decode(query, key, value, mask, scale, plan.topk,
                                                   layer.scores)
        return out
    if method.sparse_decode:
        return method.decode(query, key, value, mask, scale, plan.chunk, plan.dims, plan.topk)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale,
                                          enable_gqa=True)


def _exact(query, key, value, mask, scale):
    """Exact attention; where transformers' mask is not as long as this layer's keys (layers
    store different numbers of tokens), the causal mask of the queries over them."""
    q, n = query.shape[2], key.shape[2]
    if mask is not None and mask.shape[-1] != n:
        mask = torch.ones(q, n, dtype=torch.bool, device=query.device).tril(n - q)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale,
                                          is_causal=mask is None and q == n and q > 1,
                                          enable_gqa=True)


def _policy_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                      **kwargs):
    state = module._rkv_eager
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if "generate" in state:
        out = _generate_attention(state["generate"], module.layer_idx, query, key, value,
                                  attention_mask, scale)
        return out.transpose(1, 2).contiguous(), None
    if "prefill" in state:   # the prompt: exact, and recorded
        w, record = state["window"], state["prefill"]
        record.keys.append(key)
        record.values.append(value)
        record.queries.append(query[:, :, -w:])
        # (a mask as long as this layer's keys; the selection masks its window causally itself)
        record.masks.append(None if attention_mask is None or attention_mask.shape[-1] !=
                            key.shape[2] else attention_mask[..., -w:, :])
        record.scales.append(scale)
    layer = state.get("layers", {}).get(module.layer_idx)
    if layer is None:
        out = _exact(query, key, value, attention_mask, scale)
    else:
        out = decode_step(state["config"], layer, query, key, value, attention_mask, scale)
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


def _full_layers(model, layers: int) -> list[int]:
    """The full-attention layers: sliding-window ones keep their own last tokens, and the pass
    leaves them exact."""
    types = getattr(model.config.get_text_config(decoder=True), "layer_types", None)
    return [layer for layer in range(layers) if types is None or types[layer] == "full_attention"]


def evict(config: RocketKVConfig, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None,
          scale: float, index: int, layers: int, reused: Tensor | None = None
          ) -> tuple[tuple, LayerDecode, Tensor]:
    """A prompt layer under the policy (its exact keys and values, its queries; batch rows all
    of one length): (what the cache stores, (keys, values), the layer's decode state, the kept
    positions)."""
    method, T = config.method, key.shape[2]
    plan = config.plan(T, key.shape[-1], index, layers)
    kept, scores = whole_view(key, value), None
    if method.rewrites_prompt(T, plan):
        observed = method.observed_queries(T)
        *kept, scores = method.compress(query[:, :, -observed:], key, value,
                                        None if mask is None else mask[..., -observed:, :],
                                        scale, min(plan.prompt_budget, T), reused)
        kept[:2] = method.quantized(*kept[:2])
    layer = LayerDecode(plan, scores if method.state == "scores" else None,
                        tuple(kept) if method.keeps_history else None)
    stored = (key, value) if method.keeps_history else tuple(kept[:2])
    return stored, layer, kept[2]


class _OracleCache(DynamicCache):
    """generate_like's cache: what the policy keeps, in plain tensors, and each layer's decode
    state beside, moved along the batch with the rows (beam search, several sequences)."""

    def __init__(self, config):
        super().__init__(config=config)
        self.decodes: dict[int, LayerDecode] = {}
        self.kept: dict[int, Tensor] = {}

    def _rows(self, fn) -> None:
        for layer in self.decodes.values():
            if layer.scores is not None:
                layer.scores = fn(layer.scores)
            if layer.view is not None:
                layer.view = tuple(fn(t) for t in layer.view)

    def reorder_cache(self, beam_idx):
        super().reorder_cache(beam_idx)
        self._rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        self._rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices):
        super().batch_select_indices(indices)
        self._rows(lambda t: t[indices])


def _generate_attention(run: dict, layer: int, query, key, value, mask, scale) -> Tensor:
    """One attention call under generate_like: the prompt exact (then evicted from the cache),
    a decode step under the policy."""
    cache, config = run["cache"], run["config"]
    if layer not in run["full"] or not config.compresses:
        return _exact(query, key, value, mask, scale)
    if layer in cache.decodes:
        return decode_step(config, cache.decodes[layer], query, key, value, None, scale)
    if query.shape[2] != key.shape[2]:
        raise NotImplementedError("eager.generate_like: a new turn or a prompt chunk "
                                  "(eager.multi_turn takes conversations)")
    out = _exact(query, key, value, mask, scale)
    index = run["full"].index(layer)
    source = config.method.reuses(index)
    (keys, values), cache.decodes[layer], cache.kept[index] = evict(
        config, query, key, value, mask, scale, index, len(run["full"]),
        None if source is None else cache.kept[source])
    cache.layers[layer].keys, cache.layers[layer].values = keys, values
    return out


@torch.no_grad()
def generate_like(model, input_ids: Tensor, config: RocketKVConfig, **generate_kwargs):
    """transformers' `generate` (any mode: sampling, beam search, num_return_sequences, ...)
    with the policy of `config` applied eagerly; what generate returns. Prompts must not be
    padded (each row is planned for the batch's length)."""
    mask = generate_kwargs.get("attention_mask")
    if mask is not None and not bool(mask.all()):
        raise ValueError("eager.generate_like takes unpadded prompts (run each prompt alone)")
    layers = model.config.get_text_config(decoder=True).num_hidden_layers
    cache = _OracleCache(model.config)
    run = {"cache": cache, "config": config, "full": _full_layers(model, layers)}
    with _attention(model, {"generate": run}):
        return model.generate(input_ids, **{cache_argument(): cache}, **generate_kwargs)


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
    cache, decodes, kept = DynamicCache(config=model.config), {}, {}
    full = _full_layers(model, layers)
    for layer in range(layers):
        stored = prompt.keys[layer], prompt.values[layer]
        if config.compresses and layer in full:
            index = full.index(layer)   # the layer's place among the compressed ones
            source = method.reuses(index)
            stored, decodes[layer], kept[index] = evict(
                config, prompt.queries[layer], *stored, prompt.masks[layer],
                prompt.scales[layer], index, len(full), None if source is None else kept[source])
        cache.update(*stored, layer)
    lengths = [layer.keys.shape[2] for layer in cache.layers]
    tokens = [int(prompt.logits.argmax())]
    device = prompt.logits.device
    with _attention(model, {"config": config, "layers": decodes}):
        for step in range(max_new_tokens - 1):
            if step and tokens[-1] in stop_tokens:
                break
            logits = model(torch.tensor([[tokens[-1]]], device=device),
                           position_ids=torch.tensor([[T + step]], device=device),
                           **{cache_argument(): cache}).logits
            tokens.append(int(logits[0, -1].argmax()))
    return tokens, lengths


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
    token is kept), with the plan of the conversation's length so far: into each layer's view,
    which decode reads, for a policy that keeps the history (rocketkv-mt); into the cache
    itself otherwise (rocketkv: the kept history and the turn are evicted again)."""
    method, cache, replies, length = config.method, DynamicCache(config=model.config), [], 0
    if method.state == "scores":
        raise ValueError(f"eager.multi_turn: {method.name} evicts during decode; a new turn "
                         "over its cache is not supported")
    decodes: dict[int, LayerDecode] = {}
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
            logits = model(new, position_ids=positions, **{cache_argument(): cache}).logits
        length += new.shape[1]
        # A turn with fewer tokens than the selection reads queries keeps every stored token;
        # decode keeps the layer's last plan.
        short = new.shape[1] < observed
        selections = {}
        for layer, (key, value) in enumerate(zip(record.keys, record.values)):
            plan = config.plan(length, key.shape[-1], layer, len(record.keys))
            if short and layer in decodes and not method.keeps_history:
                plan = decodes[layer].plan
            kept = whole_view(key, value)
            if method.rewrites_prompt(stored, plan) and not short:
                source = method.reuses(layer)
                kept = method.compress(record.queries[layer], key, value, record.masks[layer],
                                       record.scales[layer], min(plan.prompt_budget, stored),
                                       None if source is None else selections[source])[:3]
                kept = (*method.quantized(*kept[:2]), kept[2])
            selections[layer] = kept[2]
            decodes[layer] = LayerDecode(plan, view=kept if method.keeps_history else None)
            if not method.keeps_history:
                cache.layers[layer].keys, cache.layers[layer].values = kept[:2]
        tokens = [int(logits[0, -1].argmax())] if count else []
        with _attention(model, {"config": config, "layers": decodes}):
            for _ in range(count - 1):
                logits = model(torch.tensor([[tokens[-1]]], device=device),
                               position_ids=torch.tensor([[length]], device=device),
                               **{cache_argument(): cache}).logits
                length += 1
                tokens.append(int(logits[0, -1].argmax()))
        replies.append(tokens)
    return replies
