"""Small models for the tests (tiny random HF configs, hand-written attention models) and the
loops and compile helpers that run them."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import (LlamaConfig, LlamaForCausalLM, LogitsProcessor, LogitsProcessorList,
                          Qwen2Config, Qwen2ForCausalLM)

from rkv_compile import RocketKVConfig
from rkv_compile.backend import make_backend
from rkv_compile.hf import cache_argument, returned_cache
from rkv_compile.kernels import reference
from rkv_compile.state import is_packed, stored

VOCAB = 128
_rewrite_only = make_backend(compiler=lambda gm, example_inputs: gm.forward)


def compiled(fn, options, inductor: bool):
    """fn under the rocketkv backend, through Inductor or with the rewritten graphs run as FX."""
    if inductor:
        return torch.compile(fn, backend="rocketkv", options=options)
    return torch.compile(fn, backend=lambda gm, ex: _rewrite_only(gm, ex, options=options))


def prompt(length: int, seed: int = 1):
    return torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


def tiny_hf(arch: str, attn: str = "sdpa", seed: int = 0, vocab: int = VOCAB, head_dim: int = 16):
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=4 * head_dim, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=2048, attn_implementation=attn)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**common)).eval()
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common)).eval()
    raise ValueError(arch)


class TinyGPT(nn.Module):
    """nanoGPT-style decoder: hand-written attention (matmul, masked_fill, softmax, matmul), GQA by
    repeat_interleave, a tuple cache returned as new `past` tensors, explicit positions.

    `positions_from_cache=True` derives positions from the stored cache length instead, as some
    hand-written decoders do: the pass must then refuse to compress. `dropout` drops attention
    probabilities in training mode.
    """

    def __init__(self, dim=64, heads=4, kv_heads=2, layers=2, positions_from_cache=False, seed=0,
                 scale=None, dropout=0.0):
        super().__init__()
        self.init_kwargs = dict(dim=dim, heads=heads, kv_heads=kv_heads, layers=layers,
                                positions_from_cache=positions_from_cache, seed=seed, scale=scale)
        torch.manual_seed(seed)
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.scale = scale if scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.positions_from_cache, self.dropout = positions_from_cache, dropout
        self.tok = nn.Embedding(VOCAB, dim)
        self.pos = nn.Embedding(2048, dim)
        self.qkv = nn.ModuleList(nn.Linear(dim, (heads + 2 * kv_heads) * self.head_dim)
                                 for _ in range(layers))
        self.proj = nn.ModuleList(nn.Linear(dim, dim) for _ in range(layers))
        self.head = nn.Linear(dim, VOCAB)

    def attend(self, layer: int, q, k, v, mask):
        group = self.heads // self.kv_heads
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        att = (q @ k.transpose(-2, -1)) * self.scale
        att = att.masked_fill(~mask, float("-inf"))
        att = F.softmax(att, dim=-1)
        att = F.dropout(att, self.dropout, training=self.training)
        return att @ v

    def forward(self, idx, positions=None, past=None):
        B, T = idx.shape
        if self.positions_from_cache:
            start = 0 if past is None else past[0][0].shape[2]
            positions = torch.arange(start, start + T)[None]
        x = self.tok(idx) + self.pos(positions)
        presents = []
        for i, (qkv, proj) in enumerate(zip(self.qkv, self.proj)):
            q, k, v = qkv(x).split([self.heads * self.head_dim, self.kv_heads * self.head_dim,
                                    self.kv_heads * self.head_dim], dim=-1)
            q = q.view(B, T, self.heads, self.head_dim).transpose(1, 2)
            k = k.view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
            v = v.view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
            if past is not None:
                k = torch.cat([past[i][0], k], dim=-2)
                v = torch.cat([past[i][1], v], dim=-2)
            presents.append((k, v))
            n = k.shape[2]
            mask = torch.ones(T, n, dtype=torch.bool).tril(n - T)[None, None]
            y = self.attend(i, q, k, v, mask).transpose(1, 2).reshape(B, T, -1)
            x = x + proj(y)
        return self.head(x), tuple(presents)


class OracleGPT(TinyGPT):
    """TinyGPT whose attention applies the reference ops step by step (the eager oracle)."""

    def __init__(self, config: RocketKVConfig, **kw):
        super().__init__(**kw)
        self.config, self.plans, self.kept = config, {}, {}

    def attend(self, layer, q, k, v, mask):
        scale = self.scale
        T, n = q.shape[2], k.shape[2]
        if T == n:
            plan = self.plans[layer] = self.config.plan(n, self.head_dim, layer, len(self.proj))
            method = self.config.method
            if method.rewrites_prompt(n, plan):
                seen = method.observed_queries(n)
                self.kept[layer] = method.compress(q[:, :, -seen:], k, v, mask[..., -seen:, :],
                                                   scale, min(plan.prompt_budget, n))[:2]
            return super().attend(layer, q, k, v, mask)
        plan = self.plans[layer]
        return reference.sparse_decode(q, k, v, mask, scale, plan.chunk, plan.dims, plan.topk)


def stored_lengths(cache) -> list[int]:
    """Each layer's stored tokens (row 0): a compressed layer's, or a plain layer's length."""
    pairs = [(layer.keys, layer.values) for layer in cache.layers] if hasattr(cache, "layers") \
        else list(cache)
    return [stored([pair])[0].lengths[0] if is_packed(pair[0]) else pair[0].shape[2]
            for pair in pairs]


@torch.no_grad()
def greedy(forward, idx, steps: int, on_prefill=None):
    """Greedy decoding with a tuple-cache model: (tokens, final stored length per layer).

    `on_prefill(past)` may replace the cache after prefill."""
    T = idx.shape[1]
    logits, past = forward(idx, torch.arange(T)[None])
    if on_prefill is not None:
        past = on_prefill(past)
    tokens = [int(logits[0, -1].argmax())]
    for step in range(steps - 1):
        logits, past = forward(torch.tensor([[tokens[-1]]]), torch.tensor([[T + step]]), past)
        tokens.append(int(logits[0, -1].argmax()))
    return tokens, stored_lengths(past)


def oracle_gpt_tokens(model: TinyGPT, idx, config: RocketKVConfig, steps: int,
                      oracle_class=None):
    """The eager oracle's tokens for `model` (oracle_class: an OracleGPT for its class)."""
    oracle = (oracle_class or OracleGPT)(config, **model.init_kwargs)
    oracle.load_state_dict(model.state_dict())
    oracle.eval()

    def evict(past):
        return tuple(oracle.kept.get(i, kv) for i, kv in enumerate(past))

    return greedy(oracle, idx, steps, on_prefill=evict)


class GPTFast(nn.Module):
    """gpt-fast-style decoder: static KV buffers written in place at explicit positions
    (`k_cache[:, :, input_pos] = k`), a causal-mask buffer indexed by position, SDPA with GQA.
    The pass cannot shrink buffers it does not own: it must leave this model exact."""

    def __init__(self, dim=64, heads=4, kv_heads=2, layers=2, max_len=320, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.tok = nn.Embedding(VOCAB, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.qkv = nn.ModuleList(nn.Linear(dim, (heads + 2 * kv_heads) * self.head_dim)
                                 for _ in range(layers))
        self.proj = nn.ModuleList(nn.Linear(dim, dim) for _ in range(layers))
        self.head = nn.Linear(dim, VOCAB)
        shape = (1, kv_heads, max_len, self.head_dim)
        for i in range(layers):
            self.register_buffer(f"k_cache{i}", torch.zeros(shape))
            self.register_buffer(f"v_cache{i}", torch.zeros(shape))
        self.register_buffer("causal", torch.ones(max_len, max_len, dtype=torch.bool).tril())

    def forward(self, idx, input_pos):
        B, T = idx.shape
        x = self.tok(idx) + self.pos(input_pos)[None]
        mask = self.causal[None, None, input_pos]
        for i, (qkv, proj) in enumerate(zip(self.qkv, self.proj)):
            q, k, v = qkv(x).split([self.heads * self.head_dim, self.kv_heads * self.head_dim,
                                    self.kv_heads * self.head_dim], dim=-1)
            q = q.view(B, T, self.heads, self.head_dim).transpose(1, 2)
            k_cache, v_cache = getattr(self, f"k_cache{i}"), getattr(self, f"v_cache{i}")
            k_cache[:, :, input_pos] = k.view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
            v_cache[:, :, input_pos] = v.view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
            y = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask,
                                               enable_gqa=True)
            x = x + proj(y.transpose(1, 2).reshape(B, T, -1))
        return self.head(x)


@torch.no_grad()
def gpt_fast_greedy(forward, idx, steps: int) -> list[int]:
    """gpt-fast's loop: prefill at positions 0..T-1, then one token per step at its position."""
    T = idx.shape[1]
    tokens = [int(forward(idx, torch.arange(T))[0, -1].argmax())]
    for step in range(steps - 1):
        logits = forward(torch.tensor([[tokens[-1]]]), torch.tensor([T + step]))
        tokens.append(int(logits[0, -1].argmax()))
    return tokens


class Encoder(nn.Module):
    """Bidirectional self-attention, no cache: must be left exact."""

    def __init__(self, dim=64, heads=4, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(B, T, C))


def prefill_mask(recipe: str, padding, length: int, flip=(0, 0), window: int = 4):
    """A (B, 1, L, L) prefill mask built the way models build theirs, from positions and a 2-D
    padding mask. Recipes: "causal" (boolean), "additive" (0 / -inf), "lowest" (0 / the dtype's
    lowest value, transformers' eager convention); not causal: "window" (sliding window),
    "flipped" (causal with the entry at `flip` toggled)."""
    rows = torch.arange(length, device=padding.device)[:, None]
    cols = torch.arange(length, device=padding.device)[None, :]
    attend = (cols <= rows)[None, None] & padding[:, None, None, :].bool()
    if recipe == "window":
        attend = attend & (rows - cols < window)
    if recipe == "flipped":
        toggle = (rows == flip[0]) & (cols == flip[1])
        attend = attend ^ toggle
    if recipe == "additive":
        return torch.zeros(attend.shape, device=padding.device).masked_fill(~attend, float("-inf"))
    if recipe == "lowest":
        return torch.zeros(attend.shape, device=padding.device).masked_fill(
            ~attend, torch.finfo(torch.float32).min)
    return attend


class MaskedSDPA(nn.Module):
    """One SDPA layer (GQA via enable_gqa) whose prefill builds its mask by `prefill_mask` (or,
    for recipe "input", takes it as an input), and returns its new keys and values as a fresh
    tuple cache."""

    def __init__(self, recipe: str, dim=64, heads=4, kv_heads=2, flip=(0, 0), seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.recipe, self.flip = recipe, flip
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.tok = nn.Embedding(VOCAB, dim)
        self.qkv = nn.Linear(dim, (heads + 2 * kv_heads) * self.head_dim)
        self.head = nn.Linear(dim, VOCAB)

    def forward(self, idx, padding, mask=None):
        B, T = idx.shape
        q, k, v = self.qkv(self.tok(idx)).split(
            [self.heads * self.head_dim, self.kv_heads * self.head_dim,
             self.kv_heads * self.head_dim], dim=-1)
        q = q.view(B, T, self.heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.recipe != "input":
            mask = prefill_mask(self.recipe, padding, T, self.flip)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return self.head(y.transpose(1, 2).reshape(B, T, -1)), (k, v)


def generate(model, ids, steps: int, cache=None, backend=None):
    """Greedy tokens through generate() (no EOS, so exactly `steps` of them, as the oracle gives)
    under torch.compile with `backend` if given, and the cache it leaves."""
    forward = model.forward
    if backend is not None:
        model.forward = torch.compile(forward, backend=backend)
    model.generation_config.eos_token_id = None
    try:
        out = model.generate(ids, max_new_tokens=steps, do_sample=False,
                             return_dict_in_generate=True, **{cache_argument(): cache})
    finally:
        model.forward = forward
    return out.sequences[0, ids.shape[1]:].tolist(), returned_cache(out)


class FollowTokens(LogitsProcessor):
    """Records each step's logits, then leaves only `tokens[step]` possible: a run made to follow
    the oracle's tokens gives logits that compare with the oracle's step by step, past the first
    step where its own argmax would have differed."""

    def __init__(self, tokens: list[int]):
        self.tokens, self.logits = tokens, []

    def __call__(self, input_ids, scores):
        self.logits.append(scores[0].float().clone())
        forced = torch.full_like(scores, -float("inf"))
        forced[:, self.tokens[len(self.logits) - 1]] = 0
        return forced


def logits_along(generate, tokens: list[int]) -> torch.Tensor:
    """(steps, vocab) logits of `generate(logits_processor=..., ...)` made to follow `tokens`
    (one prompt, greedy, exactly len(tokens) steps)."""
    follow = FollowTokens(tokens)
    generate(logits_processor=LogitsProcessorList([follow]), max_new_tokens=len(tokens),
             min_new_tokens=len(tokens), do_sample=False)
    return torch.stack(follow.logits)


def compare_logits(got: torch.Tensor, want: torch.Tensor) -> dict:
    """The largest logit gap along the path, and at each step where the argmaxes differ the
    oracle's (`want`'s) margin between its own top token and the other's: small at a near tie."""
    top_got, top_want = got.argmax(-1), want.argmax(-1)
    steps = torch.nonzero(top_got != top_want).flatten().tolist()
    return dict(max_logit_gap=float((got - want).abs().max()),
                flips=[dict(step=s, oracle_margin=float(want[s, top_want[s]] - want[s, top_got[s]]))
                       for s in steps])
