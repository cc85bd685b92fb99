"""Stage 2 (hybrid sparse attention, one decode step) in Triton.

Three kernels, read block by block:
1. `_chunk_logits_kernel`: per KV head and block of chunks, the element-wise min/max of K over
   each chunk's slots, the bound picked per dim by the group's query sign, and its dot product
   with each query head's (dims-masked, temperature-scaled) query: one approximate logit per
   (query head, chunk). No token-level score is ever written.
2. `_sparse_attention_kernel`: flash-decoding over the selected slots only. Each program takes
   one KV head and one split of its index list, loads the K/V rows in place by index (nothing is
   gathered into a new tensor), and runs an online softmax for the whole GQA group at once.
3. `_combine_kernel`: merges the splits' partial outputs with their running max and sum.
Kernels are launched through `wrap_triton`, so that inside the `rocketkv::sparse_decode_triton`
op (ops.py) Inductor sees and schedules them with the rest of the graph.
Between 1 and 2 a few small torch ops turn chunk logits into chunk probabilities (the reference's
per-chunk softmax), and chunks into the selected slots.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton


@triton.jit
def _chunk_logits_kernel(
    k_ptr, qsel_ptr, sign_ptr, valid_ptr, out_ptr,
    n, chunk, chunks, Hkv,
    stride_kb, stride_kh, stride_kn,
    G: tl.constexpr, D: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_VALID: tl.constexpr,
):
    bh = tl.program_id(0)
    b, h = bh // Hkv, bh % Hkv
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    k_base = k_ptr + b * stride_kb + h * stride_kh
    kmin = tl.full((BLOCK_C, BLOCK_D), float("inf"), tl.float32)
    kmax = tl.full((BLOCK_C, BLOCK_D), float("-inf"), tl.float32)
    # The chunk's slots, one at a time: chunk is small (a few slots), BLOCK_C rows per step.
    for j in range(chunk):
        slot = c * chunk + j
        live = slot < n
        if HAS_VALID:  # masked slots take no part in the bounds
            live &= tl.load(valid_ptr + b * n + slot, mask=live, other=0) != 0
        ok = live[:, None] & d_ok[None, :]
        rows = tl.load(k_base + slot[:, None] * stride_kn + d[None, :], mask=ok).to(tl.float32)
        kmin = tl.where(ok, tl.minimum(kmin, rows), kmin)
        kmax = tl.where(ok, tl.maximum(kmax, rows), kmax)
    sign = tl.load(sign_ptr + bh * D + d, mask=d_ok, other=1.0)
    bound = tl.where(sign[None, :] >= 0, kmax, kmin)
    bound = tl.where(d_ok[None, :], bound, 0.0)
    for g in tl.static_range(G):
        q = tl.load(qsel_ptr + (bh * G + g) * D + d, mask=d_ok, other=0.0)
        # q is zero outside the chosen dims: only those contribute
        logit = tl.sum(tl.where(q[None, :] != 0, bound * q[None, :], 0.0), axis=1)
        tl.store(out_ptr + (bh * G + g) * chunks + c, logit, mask=c < chunks)


@triton.jit
def _sparse_attention_kernel(
    q_ptr, k_ptr, v_ptr, idx_ptr, valid_ptr, part_out_ptr, part_m_ptr, part_l_ptr,
    n, count, per_split, Hkv, scale,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_VALID: tl.constexpr,
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    b, h = bh // Hkv, bh % Hkv
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    # The whole GQA group's queries, one row per head.
    q = tl.load(q_ptr + b * stride_qb + (h * G + g)[:, None] * stride_qh + d[None, :],
                mask=(g < G)[:, None] & (d < D)[None, :], other=0.0).to(tl.float32)
    m = tl.full((G_PAD,), float("-inf"), tl.float32)
    l = tl.zeros((G_PAD,), tl.float32)
    acc = tl.zeros((G_PAD, BLOCK_DV), tl.float32)
    start = split * per_split
    stop = tl.minimum(start + per_split, count)
    for base in range(start, stop, BLOCK_N):
        i = base + tl.arange(0, BLOCK_N)
        ok = i < stop
        slot = tl.load(idx_ptr + bh * count + i, mask=ok, other=0)
        ok &= slot < n  # a short list is padded with slots past the end
        if HAS_VALID:  # a masked slot can be selected (fewer live slots than top-k): skip it
            ok &= tl.load(valid_ptr + b * n + slot, mask=ok, other=0) != 0
        k = tl.load(k_ptr + b * stride_kb + h * stride_kh + slot[:, None] * stride_kn + d[None, :],
                    mask=ok[:, None] & (d < D)[None, :], other=0.0).to(tl.float32)
        # (Inductor passes `scale` as a float64 scalar: keep the loop state in float32.)
        s = (tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale).to(tl.float32)
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)   # all masked so far: no NaN
        alpha = tl.exp(m - m_use)
        p = tl.exp(s - m_use[:, None])
        v = tl.load(v_ptr + b * stride_vb + h * stride_vh + slot[:, None] * stride_vn + dv[None, :],
                    mask=ok[:, None] & (dv < DV)[None, :], other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        l = l * alpha + tl.sum(p, axis=1)
        m = m_new
    row = (bh * splits + split) * G + g
    tl.store(part_m_ptr + row, m, mask=g < G)
    tl.store(part_l_ptr + row, l, mask=g < G)
    tl.store(part_out_ptr + row[:, None] * DV + dv[None, :], acc,
             mask=(g < G)[:, None] & (dv < DV)[None, :])


@triton.jit
def _combine_kernel(part_out_ptr, part_m_ptr, part_l_ptr, out_ptr, splits, G,
                    DV: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr):
    bh = tl.program_id(0)
    g = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    dv = tl.arange(0, BLOCK_DV)
    row = (bh * splits + s) * G + g
    ok = s < splits
    m = tl.load(part_m_ptr + row, mask=ok, other=float("-inf"))
    l = tl.load(part_l_ptr + row, mask=ok, other=0.0)
    m_all = tl.max(m, axis=0)
    w = tl.where(ok & (m > float("-inf")), tl.exp(m - m_all), 0.0)
    part = tl.load(part_out_ptr + row[:, None] * DV + dv[None, :],
                   mask=ok[:, None] & (dv < DV)[None, :], other=0.0)
    out = tl.sum(part * w[:, None], axis=0) / tl.sum(l * w, axis=0)
    tl.store(out_ptr + (bh * G + g) * DV + dv, out.to(out_ptr.dtype.element_ty), mask=dv < DV)


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # Triton's interpreter: a few programs are plenty


def _query_prep(query: Tensor, kv_heads: int, dims: int) -> tuple[Tensor, Tensor]:
    """(sign of the group sum per dim, query masked to the r chosen dims / temperature)."""
    B, Hq, _, D = query.shape
    q = query.float().reshape(B, kv_heads, Hq // kv_heads, D)
    sign = torch.where(q.sum(2) >= 0, 1.0, -1.0).contiguous()
    chosen = torch.zeros(B, kv_heads, D, device=query.device, dtype=torch.bool)
    chosen.scatter_(-1, q.abs().mean(2).topk(dims, dim=-1).indices, True)
    q_r = q * chosen.unsqueeze(2)
    temperature = (D * q_r.abs().sum(-1) / q.abs().sum(-1)).sqrt().clamp_min(1e-6)
    return sign, (q_r / temperature.unsqueeze(-1)).contiguous()


def chunk_scores(query: Tensor, key: Tensor, chunk: int, dims: int,
                 valid: Tensor | None = None) -> Tensor:
    """Per KV head, the probability stage 2 gives each live token of each chunk: (B, Hkv, C).

    valid: None or (B, n) uint8, 0 for masked slots. Matches reference.approximate_scores with
    the equivalent boolean mask: a live token's score is its chunk's, a masked one's is 0."""
    B, Hkv, n, D = key.shape
    G = query.shape[1] // Hkv
    chunks = triton.cdiv(n, chunk)
    sign, q_sel = _query_prep(query, Hkv, dims)
    logits = torch.empty(B, Hkv, G, chunks, device=key.device, dtype=torch.float32)
    BLOCK_C = 32
    wrap_triton(_chunk_logits_kernel)[(B * Hkv, triton.cdiv(chunks, BLOCK_C))](
        key, q_sel, sign, valid if valid is not None else sign, logits, n, chunk, chunks, Hkv,
        key.stride(0), key.stride(1), key.stride(2),
        G=G, D=D, BLOCK_C=BLOCK_C, BLOCK_D=triton.next_power_of_2(D), HAS_VALID=valid is not None)
    if valid is None:
        # live slots per chunk: `chunk`, but fewer in a partial last chunk
        counts = (n - chunk * torch.arange(chunks, device=key.device)).clamp(max=chunk).float()
    else:
        counts = torch.nn.functional.pad(valid.float(), (0, chunks * chunk - n))
        counts = counts.view(B, 1, 1, chunks, chunk).sum(-1)
        logits = logits.masked_fill(counts == 0, float("-inf"))   # no live slot: no bound
    chunk_exp = (logits - logits.amax(-1, keepdim=True)).exp()
    return (chunk_exp / (chunk_exp * counts).sum(-1, keepdim=True)).nan_to_num(0.0).mean(2)


def select_slots(scores: Tensor, n: int, chunk: int, topk: int,
                 valid: Tensor | None = None) -> Tensor:
    """The top min(topk, n) slots from chunk scores, ties to the earlier slot: (B, Hkv, k) int32.

    Tokens of a chunk share its score, so the token ranking is the chunk ranking (stable), each
    chunk's slots in order; the last chunk may be partial. Masked slots (score 0) go last; which
    of them fill a short list does not matter, as attention skips them."""
    k = min(topk, n)
    take = min(scores.shape[-1], k // chunk + 2) if valid is None else scores.shape[-1]
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :take]
    slots = (order.unsqueeze(-1) * chunk + torch.arange(chunk, device=scores.device)).flatten(-2)
    # Slots past the end or masked go to the back, keeping the order of the rest.
    dead = slots >= n
    if valid is not None:
        B, H = scores.shape[:2]
        live = valid.bool().unsqueeze(1).expand(B, H, n)
        dead |= ~live.gather(-1, slots.clamp(max=n - 1))
    slots = slots.gather(-1, torch.sort(dead.to(torch.int8), dim=-1, stable=True).indices)
    return slots[..., :k].to(torch.int32).contiguous()


def sparse_attention(query: Tensor, key: Tensor, value: Tensor, slots: Tensor, scale: float,
                     valid: Tensor | None = None) -> Tensor:
    """Exact attention of each GQA group over its selected live slots: (B, Hq, 1, Dv)."""
    B, Hq, _, D = query.shape
    Hkv, n, DV = key.shape[1], key.shape[2], value.shape[-1]
    G, count = Hq // Hkv, slots.shape[-1]
    BLOCK_N = 32
    # Split the list across programs so a few KV heads still fill the GPU.
    splits = max(1, min(triton.cdiv(count, BLOCK_N), triton.cdiv(4 * _sm_count(query.device), B * Hkv)))
    per_split = triton.cdiv(triton.cdiv(count, splits), BLOCK_N) * BLOCK_N
    splits = triton.cdiv(count, per_split)
    part_out = torch.empty(B * Hkv * splits * G, DV, device=query.device, dtype=torch.float32)
    part_m = torch.empty(B * Hkv * splits * G, device=query.device, dtype=torch.float32)
    part_l = torch.empty_like(part_m)
    wrap_triton(_sparse_attention_kernel)[(B * Hkv, splits)](
        query, key, value, slots, valid if valid is not None else slots, part_out, part_m, part_l,
        n, count, per_split, Hkv, scale,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2),
        G=G, G_PAD=max(triton.next_power_of_2(G), 2), D=D, DV=DV,
        BLOCK_D=triton.next_power_of_2(D), BLOCK_DV=triton.next_power_of_2(DV), BLOCK_N=BLOCK_N,
        HAS_VALID=valid is not None)
    out = torch.empty(B, Hq, 1, DV, device=query.device, dtype=query.dtype)
    wrap_triton(_combine_kernel)[(B * Hkv, G)](part_out, part_m, part_l, out, splits, G, DV=DV,
                                               BLOCK_S=max(triton.next_power_of_2(splits), 2),
                                               BLOCK_DV=triton.next_power_of_2(DV))
    return out


def slot_validity(mask: Tensor | None, batch: int, n: int) -> Tensor | None:
    """A boolean mask broadcastable to (B, 1, 1, n), True = attend, as (B, n) uint8."""
    if mask is None:
        return None
    return mask[..., -1, :].reshape(-1, n).expand(batch, n).to(torch.uint8).contiguous()


def sparse_decode(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, scale: float,
                  chunk: int, dims: int, topk: int) -> Tensor:
    """Stage 2 for one decode step, as reference.sparse_decode (mask: None or boolean)."""
    query, key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))
    valid = slot_validity(mask, key.shape[0], key.shape[2])
    scores = chunk_scores(query, key, chunk, dims, valid)
    slots = select_slots(scores, key.shape[2], chunk, topk, valid)
    return sparse_attention(query, key, value, slots, scale, valid)
