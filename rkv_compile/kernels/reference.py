"""Pure-PyTorch RocketKV: the CPU implementation of the ops and the oracle for the Triton kernels.

Layout everywhere: query (B, Hq, q_len, D), key/value (B, Hkv, n, D), Hq = G * Hkv (GQA groups of
G query heads share one KV head). Masks are additive floats or booleans (True = attend) that
broadcast to (B, 1, q_len, n): one mask for all heads, as causal and padding masks are.
Scores are computed in float32 whatever the input dtype.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor


def row_of(mask: Tensor | None, b: int) -> Tensor | None:
    """Row b's mask (batch 1) of a mask shared by the batch or one per row."""
    return mask if mask is None or mask.shape[0] == 1 else mask[b:b + 1]


def additive_mask(mask: Tensor | None, dtype=torch.float32) -> Tensor | None:
    """A boolean (True = attend) or additive mask as an additive float mask, -inf where masked.

    Additive masks that mark masked slots with their dtype's lowest value (transformers' eager
    convention) get -inf there too, so those slots are recognisably masked.
    """
    if mask is None:
        return None
    mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))  # broadcast rank 4
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask.to(dtype).masked_fill(mask <= torch.finfo(mask.dtype).min, float("-inf"))


def group_queries(query: Tensor, kv_heads: int) -> Tensor:
    """(B, Hq, q_len, D) -> (B, Hkv, G, q_len, D) in float32."""
    B, Hq, S, D = query.shape
    return query.float().reshape(B, kv_heads, Hq // kv_heads, S, D)


def snapkv_votes(query_window: Tensor, key: Tensor, mask: Tensor | None, scale: float,
                 kernel_size: int, pool: str = "max") -> Tensor:
    """Stage 1 scores (SnapKV++): how much the last w queries attend to each earlier key.

    Softmax over all n keys (causal inside the window), the probabilities of the n - w prefix
    keys summed over the window queries and over the query heads of each KV group, then
    pooled along the sequence ("max", or "avg" as SnapKV does). Returns (B, Hkv, n - w)
    float32; a key that every window query masks out scores -inf so it is never kept.
    """
    B, Hkv, n, D = key.shape
    w = query_window.shape[-2]
    q = group_queries(query_window, Hkv)                                   # B Hkv G w D
    logits = torch.einsum("bhgwd,bhnd->bhgwn", q, key.float()) * scale
    causal = torch.ones(w, n, dtype=torch.bool, device=key.device).tril(n - w)
    logits = logits.masked_fill(~causal, float("-inf"))
    extra = additive_mask(mask)
    if extra is not None:
        logits = logits + extra.unsqueeze(2)                              # B 1 1 w n
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    votes = probs[..., : n - w].sum(dim=(2, 3))                            # B Hkv n-w
    pooling = F.max_pool1d if pool == "max" else F.avg_pool1d
    votes = pooling(votes, kernel_size, stride=1, padding=kernel_size // 2)
    if extra is not None:
        dead = torch.isneginf(extra[..., : n - w]).all(dim=-2)             # B 1 n-w
        votes = votes.masked_fill(dead, float("-inf"))
    return votes


def keep_indices(votes: Tensor, keep: int) -> Tensor:
    """The `keep` best-voted positions per KV head, in sequence order (ties: earlier first)."""
    order = torch.sort(votes, dim=-1, descending=True, stable=True).indices[..., :keep]
    return torch.sort(order, dim=-1).values


def compress(query_window: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, scale: float,
             keep: int, kernel_size: int) -> tuple[Tensor, Tensor]:
    """Stage 1 eviction: the `keep` best prefix tokens per KV head, then the whole window.

    Returns contiguous key and value caches of `keep + w` tokens, in sequence order.
    """
    votes = snapkv_votes(query_window, key, mask, scale, kernel_size)
    index = kept_positions(votes, keep + query_window.shape[-2], key.shape[2])
    return gather_tokens(key, index), gather_tokens(value, index)


def chunk_scores(votes: Tensor, size: int, mean: bool = False) -> Tensor:
    """Each token's score as its chunk's total of `votes` (runs of `size` tokens; the last may
    be shorter), or its mean; tokens voted -inf (masked) stay -inf. A stable top-k over these
    keeps whole chunks, best first."""
    n = votes.shape[-1]
    chunks = -(-n // size)
    padded = F.pad(votes.nan_to_num(0.0, neginf=0.0), (0, chunks * size - n))
    totals = padded.view(*votes.shape[:-1], chunks, size).sum(-1)
    if mean:
        totals = totals / F.pad(votes.new_ones(n), (0, chunks * size - n)).view(chunks, size).sum(-1)
    scores = totals.repeat_interleave(size, dim=-1)[..., :n]
    return scores.masked_fill(votes.isneginf(), float("-inf"))


def kept_positions(scores: Tensor, keep: int, n: int) -> Tensor:
    """Positions (B, Hkv, keep) in sequence order of `keep` of n tokens: every token after the
    scored prefix (scores cover the first scores.shape[-1]), and the best-scored of the prefix."""
    prefix = scores.shape[-1]
    tail = torch.arange(prefix, n, device=scores.device).expand(*scores.shape[:-1], -1)
    return torch.cat([keep_indices(scores, keep - (n - prefix)), tail], dim=-1)


def gather_tokens(t: Tensor, index: Tensor) -> Tensor:
    """The tokens of t (B, Hkv, n, D) at `index` (B, Hkv, k), contiguous."""
    return t.gather(2, index.unsqueeze(-1).expand(-1, -1, -1, t.shape[-1])).contiguous()


@dataclasses.dataclass
class Quantized:
    """x as `bits`-bit codes: `codes` (x's shape, uint8, one code per entry), and per run of
    `group_size` entries along `dim` a `step` and a `zero` (the run's min), fp16, in x's shape
    with that dim cut to the number of runs."""

    codes: Tensor
    step: Tensor
    zero: Tensor
    bits: int
    group_size: int
    dim: int


def quantize(x: Tensor, bits: int, group_size: int, dim: int) -> Quantized:
    """x through `bits`-bit codes: each run of `group_size` consecutive entries along `dim` (the
    last run may be shorter) shares a step and a zero point, its min, both fp16; asymmetric,
    round to nearest. Keys take dim 2 (one step per channel over a run of tokens), values dim 3
    (per token over a run of channels), as KIVI quantizes them."""
    moved = x.float().movedim(dim, -1)
    m = moved.shape[-1]
    pad = -m % group_size   # the last run, padded with its last entry: min and max unchanged
    groups = torch.cat([moved, moved[..., -1:].expand(*moved.shape[:-1], pad)], -1) \
        .unflatten(-1, (-1, group_size))
    low = groups.amin(-1, keepdim=True).half()
    step = ((groups.amax(-1, keepdim=True) - low.float()) / (2**bits - 1)).half()
    codes = ((groups - low.float()) / step.float()).round().clamp(0, 2**bits - 1)
    codes = torch.where(step > 0, codes, 0.0)   # a constant run: every entry is its zero point
    codes = codes.flatten(-2)[..., :m].to(torch.uint8).movedim(-1, dim).contiguous()
    return Quantized(codes, step.squeeze(-1).movedim(-1, dim).contiguous(),
                     low.squeeze(-1).movedim(-1, dim).contiguous(), bits, group_size, dim)


def dequantize(q: Quantized, dtype: torch.dtype) -> Tensor:
    """The numbers `q`'s codes stand for, in `dtype` (computed in float32)."""
    def per_entry(t: Tensor) -> Tensor:
        m = q.codes.shape[q.dim]
        return t.float().repeat_interleave(q.group_size, dim=q.dim).narrow(q.dim, 0, m)
    return (q.codes.float() * per_entry(q.step) + per_entry(q.zero)).to(dtype)


def fake_quantize(x: Tensor, bits: int, group_size: int, dim: int) -> Tensor:
    """x through `bits`-bit codes and back (what a quantized cache reads): `quantize`, then
    `dequantize`."""
    return dequantize(quantize(x, bits, group_size, dim), x.dtype)


def accumulated_attention(query: Tensor, key: Tensor, mask: Tensor | None, scale: float,
                          block: int = 512) -> Tensor:
    """H2O's scores: each key's softmax probability summed over the queries (the last q_len
    positions of the n, causal) and over the query heads of its GQA group: (B, Hkv, n) float32.
    Computed `block` query rows at a time (no q_len x n matrix per head is held)."""
    B, Hkv, n, _ = key.shape
    q = group_queries(query, Hkv)                                          # B Hkv G S D
    S = q.shape[3]
    extra = additive_mask(mask)
    total = torch.zeros(B, Hkv, n, device=key.device)
    for start in range(0, S, block):
        rows = slice(start, min(start + block, S))
        logits = torch.einsum("bhgsd,bhnd->bhgsn", q[:, :, :, rows], key.float()) * scale
        position = torch.arange(rows.start, rows.stop, device=key.device) + n - S
        causal = torch.arange(n, device=key.device) <= position[:, None]
        logits = logits.masked_fill(~causal, float("-inf"))
        if extra is not None:
            logits = logits + extra[:, :, rows].unsqueeze(2)
        total += torch.softmax(logits, dim=-1).nan_to_num(0.0).sum(dim=(2, 3))
    return total


def evicting_decode(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None,
                    scale: float, state: Tensor, live_limit: int | Tensor, recent: int
                    ) -> tuple[Tensor, Tensor]:
    """One decode step that evicts by accumulated attention (H2O's rule), per KV head.

    state (B, Hkv, m <= n): each stored slot's score, -inf once evicted, +inf if it is never to
    be evicted; slots past m (the new token) start at 0. The query attends exactly to the live
    slots (not evicted, not masked); each live slot's probability, summed over the group's query
    heads, is added to its score. Then, while more than `live_limit` slots are live, the
    lowest-scored is evicted, sparing the `recent` most recent live slots (ties: the later slot
    goes); `live_limit`: one for every row, or (B,) each row's. Returns (output (B, Hq, 1, Dv),
    state (B, Hkv, n)).
    """
    B, H, n, _ = key.shape
    state = F.pad(state, (0, n - state.shape[-1]))
    bias = additive_mask(mask)
    bias = torch.zeros(B, 1, n, device=key.device) if bias is None else \
        bias[:, :, -1, :].expand(B, 1, n)
    live = ~torch.isneginf(bias) & ~torch.isneginf(state)                 # B Hkv n
    q = group_queries(query, H)[:, :, :, -1]                               # B Hkv G D
    logits = torch.einsum("bhgd,bhnd->bhgn", q, key.float()) * scale + bias.unsqueeze(2)
    probs = torch.softmax(logits.masked_fill(~live.unsqueeze(2), float("-inf")), -1).nan_to_num(0.0)
    out = torch.einsum("bhgn,bhnd->bhgd", probs, value.float())
    state = state + probs.sum(2)
    recent_rank = live.flip(-1).cumsum(-1).flip(-1)                        # 1: the newest live
    spared = live & ((recent_rank <= recent) | torch.isposinf(state))
    candidates = live & ~spared
    if isinstance(live_limit, Tensor):
        live_limit = live_limit.view(B, 1, 1)
    room = (live_limit - spared.sum(-1, keepdim=True)).clamp_min(0)
    order = torch.sort(state.masked_fill(~candidates, float("-inf")), dim=-1, descending=True,
                       stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(n, device=key.device)
                                            .expand_as(order))
    state = state.masked_fill(candidates & (rank >= room), float("-inf"))
    return out.reshape(*query.shape[:-1], value.shape[-1]).to(query.dtype), state


def chunk_bounds(key: Tensor, chunk: int, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Element-wise min and max of K over each run of `chunk` consecutive slots (RocketKV's KT).

    Returns (B, Hkv, ceil(n / chunk), D) float32 each; masked-out slots take no part.
    """
    B, H, n, D = key.shape
    chunks = -(-n // chunk)
    k = key.float()
    valid = torch.ones(B, 1, n, dtype=torch.bool, device=key.device)
    if mask is not None:
        valid = valid & ~torch.isneginf(additive_mask(mask)[:, :, -1, :])
    pad = chunks * chunk - n
    valid = F.pad(valid, (0, pad), value=False).unsqueeze(-1)             # B 1 n' 1
    k = F.pad(k, (0, 0, 0, pad))
    kmin = k.masked_fill(~valid, float("inf")).view(B, H, chunks, chunk, D).amin(3)
    kmax = k.masked_fill(~valid, float("-inf")).view(B, H, chunks, chunk, D).amax(3)
    return kmin, kmax


def chunk_logits(query: Tensor, key: Tensor, mask: Tensor | None, chunk: int, dims: int) -> Tensor:
    """Stage 2's approximate logit of each chunk for each query head: (B, Hkv, G, C) float32.

    The sign of each dim comes from the group sum of q; the r dims with the largest group mean
    |q| are read; a chunk's logit is the upper bound q[dims] . bound[dims] (bound: the chunk's max
    of K where the sign is +, its min where it is -) over SparQ's temperature
    sqrt(D * |q[dims]|_1 / |q|_1). A chunk with no live (unmasked) slot gets -inf.
    """
    B, H, n, D = key.shape
    q = group_queries(query, H)[:, :, :, -1]                               # B Hkv G D
    kmin, kmax = chunk_bounds(key, chunk, mask)
    chunks = kmin.shape[2]
    bound = torch.where(q.sum(2, keepdim=True) >= 0, kmax, kmin)           # B Hkv C D
    top_dims = q.abs().mean(2).topk(dims, dim=-1).indices                  # B Hkv r
    q_r = q.gather(-1, top_dims.unsqueeze(2).expand(-1, -1, q.shape[2], -1))
    bound_r = bound.gather(-1, top_dims.unsqueeze(2).expand(-1, -1, chunks, -1))
    temperature = (D * q_r.abs().sum(-1) / q.abs().sum(-1)).sqrt().clamp_min(1e-6)
    logits = torch.einsum("bhgr,bhcr->bhgc", q_r, bound_r) / temperature.unsqueeze(-1)
    # a chunk with no live slot has +-inf bounds (its logit may be NaN): it takes no part
    return logits.masked_fill(chunk_live_counts(mask, B, n, chunk, key.device).unsqueeze(2) == 0, float("-inf"))


def token_weights(mask: Tensor | None, batch: int, n: int, device) -> Tensor:
    """Each slot's weight in stage 2's softmax, exp(its mask bias): (B, 1, n), 0 if masked."""
    bias = additive_mask(mask)
    bias = torch.zeros(batch, 1, n, device=device) if bias is None else bias[:, :, -1, :].expand(batch, 1, n)
    return (bias - bias.amax(-1, keepdim=True).clamp_min(0)).exp()


def chunk_live_counts(mask: Tensor | None, batch: int, n: int, chunk: int, device) -> Tensor:
    """Summed slot weights of each chunk (its live slots, for boolean masks): (B, 1, C)."""
    chunks = -(-n // chunk)
    weight = F.pad(token_weights(mask, batch, n, device), (0, chunks * chunk - n))
    return weight.view(batch, 1, chunks, chunk).sum(-1)


def token_scores(logits: Tensor, mask: Tensor | None, chunk: int, n: int) -> Tensor:
    """Stage 2 selection scores from chunk logits: per KV head, one probability per slot.

    Softmax over tokens, mean over the group. The softmax is taken per chunk: a token's
    probability is its chunk's exp(logit) times the token's mask weight, over Z = sum over chunks
    of exp(logit) * (summed weights). So the tokens of one chunk get bit-identical scores, and
    top-k ties resolve by slot order alone (a per-token softmax would break them by rounding).
    Returns (B, Hkv, n) float32.
    """
    B = logits.shape[0]
    counts = chunk_live_counts(mask, B, n, chunk, logits.device).unsqueeze(2)     # B 1 1 C
    shift = logits.amax(-1, keepdim=True).nan_to_num(0.0, neginf=0.0)
    chunk_exp = (logits - shift).exp()                                     # B Hkv G C
    total = (chunk_exp * counts).sum(-1, keepdim=True)
    scores = (chunk_exp / total).nan_to_num(0.0).mean(2)                   # B Hkv C
    weight = token_weights(mask, B, n, logits.device)
    return scores.repeat_interleave(chunk, dim=-1)[..., :n] * weight


def approximate_scores(query: Tensor, key: Tensor, mask: Tensor | None, chunk: int,
                       dims: int) -> Tensor:
    """Stage 2 selection scores of the stored tokens: (B, Hkv, n) float32 (see token_scores)."""
    logits = chunk_logits(query, key, mask, chunk, dims)
    return token_scores(logits, mask, chunk, key.shape[2])


def select_tokens(scores: Tensor, topk: int) -> Tensor:
    """The min(topk, n) best-scored slots per KV head (ties: earlier slot first)."""
    k = min(topk, scores.shape[-1])
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]


def attend_selected(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, scale: float,
                    index: Tensor) -> Tensor:
    """Exact softmax attention of each GQA group over its own selected slots (B, Hkv, k)."""
    B, H, n, D = key.shape
    q = group_queries(query, H)                                            # B Hkv G S D
    gidx = index.unsqueeze(-1).expand(-1, -1, -1, D)
    k_sel, v_sel = key.gather(2, gidx).float(), value.gather(2, gidx).float()
    logits = torch.einsum("bhgsd,bhkd->bhgsk", q, k_sel) * scale
    extra = additive_mask(mask)
    if extra is not None:
        extra = extra.expand(B, 1, extra.shape[-2], n).expand(B, H, -1, -1)
        logits = logits + extra.gather(-1, index.unsqueeze(2).expand(-1, -1, extra.shape[2], -1)).unsqueeze(2)
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    out = torch.einsum("bhgsk,bhkd->bhgsd", probs, v_sel)
    return out.reshape(*query.shape[:-1], value.shape[-1]).to(query.dtype)


def sparse_decode(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, scale: float,
                  chunk: int, dims: int, topk: int) -> Tensor:
    """Stage 2, one decode step: approximate scores, top-k tokens, exact attention over them."""
    scores = approximate_scores(query, key, mask, chunk, dims)
    index = select_tokens(scores, topk)
    return attend_selected(query, key, value, mask, scale, index).contiguous()
