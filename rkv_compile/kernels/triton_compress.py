"""Stage 1 (SnapKV++ eviction) scoring in Triton.

A prefix key's vote is the softmax probability that the last w prompt queries give it, summed
over those w queries and the G query heads of its KV group. The softmax runs over all n keys,
so the direct way materialises a (w x n) probability matrix per query head; here none is ever
written. As in flash attention, each probability is recomputed from q.k where it is needed, and
only one float32 number per window query, its log-sum-exp, travels between the passes.

Two kernels, read block by block:
1. `_window_stats_kernel`: one program per (KV head, block of the group's window rows, split of
   the keys). The rows of all G query heads of a group are stacked, head-major, into one
   (G * w, D) matrix, so each K block loaded serves the whole group. Over its key blocks it
   computes the logits q.k * scale under the in-window causal mask (window row i sees keys
   0 .. n - w + i) and keeps the online-softmax running max m and sum of exp(logit - m) per row.
   A few torch ops merge the splits' (m, l) into one log-sum-exp lse = m + log(l) per
   (batch, query head, window row).
2. `_votes_kernel`: one program per (KV head, block of prefix keys [0, n - w)). It loads its K
   block once, then walks the group's stacked window rows block by block, recomputes their
   logits against it, turns them into probabilities exp(logit - lse), and sums them down the
   rows: one vote per prefix key. No causal mask is needed: every window row sees every prefix
   key.
The max-pool over the votes, the top-k and the gather of the kept tokens then run as in the
reference (reference.keep_indices), in torch.
Kernels are launched through `wrap_triton`, so that inside a `triton_op` Inductor sees and
schedules them with the rest of the graph.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from . import reference
from .triton_decode import _sm_count


@triton.jit
def _window_stats_kernel(
    q_ptr, k_ptr, part_m_ptr, part_l_ptr,
    n, w, Hkv, scale, keys_per_split,
    stride_qb, stride_qh, stride_qw, stride_kb, stride_kh, stride_kn,
    G: tl.constexpr, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0)
    b, h = bh // Hkv, bh % Hkv
    split = tl.program_id(2)
    rows = G * w
    # Row r of the stacked group matrix is window row i of query head h * G + g.
    r = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = r < rows
    g, i = r // w, r % w
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q = tl.load(q_ptr + b * stride_qb + (h * G + g)[:, None] * stride_qh
                + i[:, None] * stride_qw + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    last = n - w + i  # the last key each row sees: its own position
    k_base = k_ptr + b * stride_kb + h * stride_kh
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_M,), tl.float32)
    start = split * keys_per_split
    stop = tl.minimum(start + keys_per_split, n)
    for base in range(start, stop, BLOCK_N):
        j = base + tl.arange(0, BLOCK_N)
        k = tl.load(k_base + j[:, None] * stride_kn + d[None, :],
                    mask=(j < stop)[:, None] & d_ok[None, :], other=0.0)
        # ieee: float32 inputs must not be rounded to tf32 (fp16/bf16 ignore the setting).
        # (Inductor passes `scale` as a float64 scalar: keep the loop state in float32.)
        s = (tl.dot(q, tl.trans(k), input_precision="ieee") * scale).to(tl.float32)
        s = tl.where((j[None, :] <= last[:, None]) & (j < stop)[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        # A row may see no key of this block (causal mask, or a split past it): no NaN from it.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        l = l * tl.exp(m - m_use) + tl.sum(tl.exp(s - m_use[:, None]), axis=1)
        m = m_new
    # Stored (split, B * Hq * w): row r of KV head h is entry (b * Hq + h * G) * w + r.
    out = split * tl.num_programs(0) * rows + bh * rows + r
    tl.store(part_m_ptr + out, m, mask=row_ok)
    tl.store(part_l_ptr + out, l, mask=row_ok)


@triton.jit
def _votes_kernel(
    q_ptr, k_ptr, lse_ptr, votes_ptr,
    n, w, Hkv, scale,
    stride_qb, stride_qh, stride_qw, stride_kb, stride_kh, stride_kn,
    G: tl.constexpr, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0)
    b, h = bh // Hkv, bh % Hkv
    prefix = n - w
    rows = G * w
    j = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    key_ok = j < prefix
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    k = tl.load(k_ptr + b * stride_kb + h * stride_kh + j[:, None] * stride_kn + d[None, :],
                mask=key_ok[:, None] & d_ok[None, :], other=0.0)
    votes = tl.zeros((BLOCK_N,), tl.float32)
    for base in range(0, rows, BLOCK_M):
        r = base + tl.arange(0, BLOCK_M)
        row_ok = r < rows
        g, i = r // w, r % w
        q = tl.load(q_ptr + b * stride_qb + (h * G + g)[:, None] * stride_qh
                    + i[:, None] * stride_qw + d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        lse = tl.load(lse_ptr + bh * rows + r, mask=row_ok, other=0.0)
        s = (tl.dot(q, tl.trans(k), input_precision="ieee") * scale).to(tl.float32)
        p = tl.exp(s - lse[:, None])  # = exp(s - m) / l, one exp and no division
        votes += tl.sum(tl.where(row_ok[:, None] & key_ok[None, :], p, 0.0), axis=0)
    tl.store(votes_ptr + bh * prefix + j, votes, mask=key_ok)


def _tiles(D: int) -> tuple[int, int, int]:
    """(long side, short side, BLOCK_D) of the tiles: tl.dot needs every side >= 16 and D is
    padded to a power of 2. The side a program keeps (the window rows in pass 1, the prefix
    keys in pass 2) is the long one, so each tile streamed past it is reused more (on an H100
    this ran ~20% faster than square tiles); a D of 256 halves both to stay in registers."""
    BLOCK_D = max(16, triton.next_power_of_2(D))
    return (128, 64, BLOCK_D) if BLOCK_D <= 128 else (64, 32, BLOCK_D)


def _row_block(rows: int, most: int) -> int:
    return min(most, max(16, triton.next_power_of_2(rows)))


def window_stats(query_window: Tensor, key: Tensor, scale: float) -> Tensor:
    """Per window query, the log-sum-exp m + log(l) of its causal logits: (B, Hq, w) float32.

    The softmax of window row i over keys 0 .. n - w + i is exp(logit - lse)."""
    B, Hq, w, D = query_window.shape
    Hkv, n = key.shape[1], key.shape[2]
    G, rows = Hq // Hkv, Hq // Hkv * w
    long, BLOCK_N, BLOCK_D = _tiles(D)
    BLOCK_M = _row_block(rows, long)
    row_blocks = triton.cdiv(rows, BLOCK_M)
    # Split the keys across programs so that few KV heads and short windows still fill the GPU.
    splits = max(1, min(triton.cdiv(n, BLOCK_N),
                        triton.cdiv(4 * _sm_count(key.device), B * Hkv * row_blocks)))
    keys_per_split = triton.cdiv(triton.cdiv(n, splits), BLOCK_N) * BLOCK_N
    splits = triton.cdiv(n, keys_per_split)
    part_m = torch.empty(splits, B, Hq, w, device=key.device, dtype=torch.float32)
    part_l = torch.empty_like(part_m)
    wrap_triton(_window_stats_kernel)[(B * Hkv, row_blocks, splits)](
        query_window, key, part_m, part_l, n, w, Hkv, scale, keys_per_split,
        query_window.stride(0), query_window.stride(1), query_window.stride(2),
        key.stride(0), key.stride(1), key.stride(2),
        G=G, D=D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D)
    # Every row sees key 0, so m is finite; a split a row sees nothing of has m -inf and l 0.
    m = part_m.amax(0)
    return m + (part_l * (part_m - m).exp()).sum(0).log()


def prefix_votes(query_window: Tensor, key: Tensor, scale: float, lse: Tensor) -> Tensor:
    """The unpooled votes of the n - w prefix keys, given `window_stats`: (B, Hkv, n - w)."""
    B, Hq, w, D = query_window.shape
    Hkv, n = key.shape[1], key.shape[2]
    G = Hq // Hkv
    BLOCK_N, short, BLOCK_D = _tiles(D)
    BLOCK_M = _row_block(G * w, short)
    votes = torch.empty(B, Hkv, n - w, device=key.device, dtype=torch.float32)
    wrap_triton(_votes_kernel)[(B * Hkv, triton.cdiv(n - w, BLOCK_N))](
        query_window, key, lse, votes, n, w, Hkv, scale,
        query_window.stride(0), query_window.stride(1), query_window.stride(2),
        key.stride(0), key.stride(1), key.stride(2),
        G=G, D=D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D)
    return votes


def snapkv_votes(query_window: Tensor, key: Tensor, scale: float, kernel_size: int) -> Tensor:
    """Stage 1 scores, as reference.snapkv_votes with no mask: (B, Hkv, n - w) float32, pooled."""
    query_window, key = (t if t.stride(-1) == 1 else t.contiguous() for t in (query_window, key))
    B, _, w, _ = query_window.shape
    Hkv, n = key.shape[1], key.shape[2]
    if n == w:  # no prefix: nothing to score
        return torch.empty(B, Hkv, 0, device=key.device, dtype=torch.float32)
    lse = window_stats(query_window, key, scale)
    votes = prefix_votes(query_window, key, scale, lse)
    return F.max_pool1d(votes, kernel_size, stride=1, padding=kernel_size // 2)


def compress(query_window: Tensor, key: Tensor, value: Tensor, scale: float, keep: int,
             kernel_size: int) -> tuple[Tensor, Tensor]:
    """Stage 1 eviction, as reference.compress with no mask: the `keep` best-voted prefix tokens
    per KV head, then the whole window, as contiguous caches in sequence order."""
    votes = snapkv_votes(query_window, key, scale, kernel_size)
    index = reference.kept_positions(votes, keep + query_window.shape[-2], key.shape[2])
    return reference.gather_tokens(key, index), reference.gather_tokens(value, index)
