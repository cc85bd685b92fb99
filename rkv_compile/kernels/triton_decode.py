"""Stage 2 (hybrid sparse attention, one decode step) in Triton, no torch glue.

Read block by block:
1. `_chunk_logits_kernel`, per KV head and block of chunks (a program takes every P-th block
   of its row where the batch's heads alone fill the GPU: `_chunk_programs`). Query prep
   first: the sign of each dim's group sum, the r dims of largest group-mean |q|, SparQ's
   temperature. Then each chunk's
   bound over the chosen dims only (max of K where the sign is +, min where -), built from the
   chunk's K rows as they are read, and its dot product with each query head: one approximate
   logit per (query head, chunk). No token-level score is written. Over a packed layer it reads
   each row's stored count and plan from the header itself. HEAD_BOUNDS (Quest): each query
   head's own bound, sum_d max(q_d min_d, q_d max_d), from the same K rows.
2. `_select` (in `_select_kernel`), one program per KV head holding all its chunks in
   registers: per-chunk softmax and group mean (the reference's scores), the k-th largest token
   score by a radix search over its bits (`_kth_largest_bits`, a few bits a pass), then the
   selected slots in slot order (ties to the earlier slot, as a stable sort). No sort, no
   top-k op. PAGES (Quest): the top k chunks, whole; MASS (SparQ): each head's probability on
   the taken tokens. Over a packed layer the chunk is read on the device, so the lanes are
   sized for a chunk of one slot; a row with few chunks takes a small copy of the selection
   (`_select_sized`). A row of more chunks than a program holds is selected in two levels
   (`_long_row_selection`): each segment's softmax parts, its own top k as candidates, then
   one program per KV head merging them.
3. `_attend` (in `_sparse_attention_kernel`): flash-decoding over selected slots only. Each
   program takes one KV head and one split of its slot list, loads the K/V rows in place by
   index (nothing is gathered into a new tensor), and runs an online softmax for the whole GQA
   group at once, its products on the tensor cores (the group padded to 16 rows; the
   probabilities enter the second product as a 16-bit head and tail, so nothing is lost to
   their rounding).
4. `_combine_kernel`: merges the splits' partial outputs with their running max and sum.
   With DENSE, 3 and 4 attend to every stored token of a packed layer's rows, in order
   (`packed_exact_decode`: flash-decoding that reads exactly the stored tokens; what the
   exact-decoding policies run on CUDA, and the benchmarks' dense row).
5. `_packed_select_attend_kernel`: 2 and 3 in one program per KV head of a packed layer, over
   its whole list, normalized in place of 4. With 1, a packed layer's stage 2 is two launches
   (`packed_sparse_decode`; a long list over few heads takes the split of 2-4 instead). The
   same program per query head with PAGES and KV_GROUP is Quest (`packed_page_decode`), and
   with MEAN_V it ends in SparQ's mean-value reallocation (`packed_sparq_decode`).
6. `_append_packed_kernel`: a decode token into a packed layer's next slot, in place, with its
   header's counts (one launch for every row and head).
Every load of a packed layer's keys or values goes through `_rows`: over a quantized layer
(`state.Coded`, kv_bits) a row's tokens are its codes, then its exact slots, and a code is
read as bytes with its fp16 step and zero and dequantized in registers, never written back.
Kernels are launched through `wrap_triton`, so that inside the `rocketkv::*_triton` ops
(ops.py; over a packed layer, each row's plan read from its header) and
`rocketkv::sparse_decode_triton` (over plain keys, for the tests and benchmarks) Inductor sees
and schedules them with the rest of the graph. Every launch passes every constexpr: a kernel
Inductor lowers gets only those passed (a default arrives as None). A kernel reads its header
words with `tl.load` itself, never through a helper that returns them: Inductor's analysis of
what a kernel writes follows a store's address back through every call to the call's pointer
arguments (through loads it does not), so a selection sized by a helper's header read made the
header "written", and Inductor gave the kernel a copy of it (`tests/test_kernel_writes.py`).
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from .. import state as S


@triton.jit
def _chunk_logits_kernel(
    q_ptr, k_ptr, valid_ptr, plan_ptr, out_ptr,
    n, chunk, chunks, dims, Hkv,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_vb,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_C: tl.constexpr, HAS_VALID: tl.constexpr, PER_ROW: tl.constexpr,
    FROM_HEADER: tl.constexpr, STORED: tl.constexpr, CHUNK: tl.constexpr, DIMS: tl.constexpr,
    HEAD_BOUNDS: tl.constexpr, UNROLL: tl.constexpr, DIMS_BY_RANK: tl.constexpr,
    ONE_BOUND: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, CODED: tl.constexpr,
    CODED_CAPACITY: tl.constexpr, CODE_ROW: tl.constexpr,
):
    # Programs (KV head, p) of P per head (`_chunk_programs`): the query prep once, then every
    # P-th block of BLOCK_C chunks of the row: the chunks' key bounds, built once for the G
    # query heads, and each head's logit. HEAD_BOUNDS (Quest): each head's own upper bound of
    # q.k, sum_d max(q_d min_d, q_d max_d), instead of the bound on the group's signs.
    bh = tl.program_id(0)
    b, h = bh // Hkv, bh % Hkv
    if PER_ROW:  # rows evicted apart (a padded batch): each row's own chunk and r
        chunk = tl.load(plan_ptr + 2 * b)
        dims = tl.load(plan_ptr + 2 * b + 1)
    coded, capacity, code_row = 0, 0, 0
    if FROM_HEADER:  # a packed layer: the row's tokens and plan from its header (plan_ptr:
        # the header, stride_vb its row stride); chunks counts up to one per token
        header = plan_ptr + b * stride_vb
        coded, capacity = tl.load(header + CODED), tl.load(header + CODED_CAPACITY)
        code_row, n = tl.load(header + CODE_ROW), coded + tl.load(header + STORED)
        chunk = tl.load(header + CHUNK)
        dims = tl.load(header + DIMS)
        chunks_of_row = tl.cdiv(n, chunk)
    else:
        chunks_of_row = chunks
    blocks = tl.cdiv(chunks_of_row, BLOCK_C)   # of the row (a packed row's live ones only)
    if tl.program_id(1) >= blocks:
        return
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, BLOCK_D)
    g_ok, d_ok = g < G, d < D
    q = tl.load(q_ptr + b * stride_qb + (h * G + g)[:, None] * stride_qh + d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)

    # Query prep, per KV head: the sign of each dim's group sum picks max or min bounds; the
    # r dims of largest group-mean |q| are read, ties to the lower dims; each head's query is
    # scaled by 1 / SparQ's temperature. The means are computed once and compared as they are
    # (computed twice, in two layouts, a dim could be ranked against a differently rounded
    # self). Two ways to find the r dims, timed against each other by tune_stage2.py: the r-th
    # largest mean by a search over its bits (means are >= 0, so their bit patterns order as
    # the floats do; 32 / 4 passes of a reduction each), or each dim's rank from all D x D
    # comparisons at once (one reduction, D * D / threads comparisons a thread).
    positive = tl.sum(q, axis=0) >= 0
    weight = tl.where(d_ok, (tl.sum(tl.abs(q), axis=0) / G).to(tl.int32, bitcast=True), -1)
    if DIMS_BY_RANK:
        ahead = (weight[None, :] > weight[:, None]) | (
            (weight[None, :] == weight[:, None]) & (d[None, :] < d[:, None]))
        chosen = d_ok & (tl.sum(ahead.to(tl.int32), axis=1) < dims)
    else:
        threshold = _kth_largest_bits(weight, d_ok.to(tl.int32), dims, 4)
        tied = (weight == threshold).to(tl.int32)
        need = dims - tl.sum((weight > threshold).to(tl.int32), axis=0)
        chosen = (weight > threshold) | ((tied != 0) & (tl.cumsum(tied, axis=0) <= need))
    q_r = tl.where(chosen[None, :], q, 0.0)
    q_norm = tl.where(g_ok, tl.sum(tl.abs(q), axis=1), 1.0)   # padding heads: no 0 / 0
    temperature = tl.maximum(tl.sqrt(D * tl.sum(tl.abs(q_r), axis=1) / q_norm), 1e-6)
    q_r = q_r / temperature[:, None]

    # Bounds of BLOCK_C chunks over the chosen dims only, built from the chunk's K rows. Live
    # slots per chunk: a partial last chunk and masked slots count less; a chunk without any
    # (past a row's last chunk too) gets no logit. UNROLL rows of each chunk are loaded per
    # step, so that their loads are in flight together (the chunk is only known at run time).
    # ONE_BOUND (not HEAD_BOUNDS): only the bound the sign picks is kept, max or min per dim,
    # half the registers of both.
    one_bound: tl.constexpr = ONE_BOUND and not HEAD_BOUNDS
    k_base = b * stride_kb + h * stride_kh
    for block in range(tl.program_id(1), blocks, tl.num_programs(1)):
        c = block * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = c < chunks
        live = tl.zeros((BLOCK_C,), tl.int32)
        kmin = tl.full((BLOCK_C, BLOCK_D), float("inf"), tl.float32)
        kmax = tl.full((BLOCK_C, BLOCK_D), float("-inf"), tl.float32)
        if one_bound:
            kmax = tl.where(positive[None, :], kmax, kmin)   # the bound, from its identity
        for j0 in range(0, chunk, UNROLL):
            for u in tl.static_range(UNROLL):
                slot = c * chunk + j0 + u
                ok = c_ok & (slot < n) & (j0 + u < chunk)
                if HAS_VALID:
                    ok &= tl.load(valid_ptr + b * stride_vb + slot, mask=ok, other=0) != 0
                live += ok.to(tl.int32)
                rows_ok = ok[:, None] & chosen[None, :]
                rows = _rows(k_ptr, k_base, slot, ok, d, chosen, stride_kn, coded, capacity,
                             code_row, D, BITS, GROUP, True, ANY_TOKENS).to(tl.float32)
                if one_bound:
                    kmax = tl.where(rows_ok, tl.where(positive[None, :], tl.maximum(kmax, rows),
                                                      tl.minimum(kmax, rows)), kmax)
                else:
                    kmin = tl.where(rows_ok, tl.minimum(kmin, rows), kmin)
                    kmax = tl.where(rows_ok, tl.maximum(kmax, rows), kmax)
        if one_bound:
            bound = tl.where(chosen[None, :] & (live > 0)[:, None], kmax, 0.0)
        else:
            bound = tl.where(chosen[None, :] & (live > 0)[:, None],
                             tl.where(positive[None, :], kmax, kmin), 0.0)
        counted = chosen[None, :] & (live > 0)[:, None]
        for gi in tl.static_range(G):
            q_g = tl.sum(tl.where((g == gi)[:, None], q_r, 0.0), axis=0)
            if HEAD_BOUNDS:
                logit = tl.sum(tl.where(counted, tl.maximum(q_g[None, :] * kmin,
                                                            q_g[None, :] * kmax), 0.0), axis=1)
            else:
                logit = tl.sum(bound * q_g[None, :], axis=1)
            logit = tl.where(live > 0, logit, float("-inf"))
            tl.store(out_ptr + (bh * G + gi) * chunks + c, logit, mask=c_ok)


@triton.jit
def _kth_largest_bits(bits, weight, k, RADIX: tl.constexpr):
    """The largest T >= 0 such that the `weight`s of the `bits` >= T sum to k or more (0 if
    they never do), found RADIX bits at a time: each pass counts for every value of the next
    digit at once, so 32 / RADIX reductions find it instead of 31. Candidates with the sign
    bit set are negative and never taken."""
    digit = tl.arange(0, 1 << RADIX)
    threshold = 0
    for shift in tl.static_range(32 - RADIX, -1, -RADIX):
        candidate = threshold | (digit << shift)
        count = tl.sum(tl.where(bits[None, :] >= candidate[:, None], weight[None, :], 0), axis=1)
        taken = (count >= k) & (candidate >= 0)
        threshold = threshold | (tl.max(tl.where(taken, digit, 0), axis=0) << shift)
    return threshold


# What a load of a quantized layer's tokens reads (`_rows`'s TOKENS): a token of the list may
# be a code or an exact slot; a tile of consecutive codes from a multiple of its size; exact
# slots only. A dense sweep over a row (codes first, then exact slots) reads the last two in
# two loops, so each tile loads only its own kind and the key steps of a tile are one vector.
ANY_TOKENS: tl.constexpr = tl.constexpr(0)
CODE_TILE: tl.constexpr = tl.constexpr(1)
EXACT_SLOTS: tl.constexpr = tl.constexpr(2)


@triton.jit
def _rows(ptr, base, slot, row_ok, cols, col_ok, stride_n, coded, capacity, code_row,
          WIDTH: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, KEYS: tl.constexpr,
          TOKENS: tl.constexpr):
    """Tokens `slot` (where `row_ok`) of one KV head's keys (KEYS) or values, columns `cols`
    (tl.arange(0, BLOCK), where `col_ok`), `base` the head's offset in `ptr`, in ptr's dtype.
    BITS > 0, a quantized layer's order (state.token_rows): a token below `coded` is a code
    (`_dequantized`), the rest exact slots from 0; TOKENS says which kinds `slot` holds (with
    ANY_TOKENS both loads are masked, so a tile of one kind reads only its own bytes). (One
    return, after a static if/else: Triton compiles the statements after an early return
    too, with BITS = 0.)"""
    ok = row_ok[:, None] & col_ok[None, :]
    if BITS == 0:
        rows = tl.load(ptr + base + slot[:, None] * stride_n + cols[None, :], mask=ok, other=0.0)
    elif TOKENS == EXACT_SLOTS:
        rows = tl.load(ptr + base + (slot - coded)[:, None] * stride_n + cols[None, :], mask=ok,
                       other=0.0)
    elif TOKENS == CODE_TILE:
        rows = _dequantized(ptr, base, slot, row_ok, cols, col_ok, stride_n, capacity,
                            code_row, WIDTH, BITS, GROUP, KEYS, True)
    else:
        is_code = slot < coded
        exact = tl.load(ptr + base + (slot - coded)[:, None] * stride_n + cols[None, :],
                        mask=ok & ~is_code[:, None], other=0.0)
        codes = _dequantized(ptr, base, slot, row_ok & is_code, cols, col_ok, stride_n,
                             capacity, code_row, WIDTH, BITS, GROUP, KEYS, False)
        rows = tl.where(is_code[:, None], codes, exact)
    return rows


@triton.jit
def _dequantized(ptr, base, slot, row_ok, cols, col_ok, stride_n, capacity, code_row,
                 WIDTH: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr,
                 KEYS: tl.constexpr, TILE: tl.constexpr):
    """Coded tokens `slot` of a quantized layer (state.Coded; `capacity` and `code_row` from its
    header), dequantized in registers as reference.dequantize does: code * step + zero in
    float32, rounded to ptr's dtype. Keys share a step and zero per channel over GROUP tokens,
    values per token over GROUP channels. A token's codes are loaded as whole bytes and
    unpacked in registers (`_unpack`) where they start on a byte (every head dim a multiple of
    8 / BITS). Each step and zero is loaded once and broadcast where the shapes allow: a TILE
    (N consecutive tokens from a multiple of N) reads one row of key steps per group it spans
    (or lies in); a value row's GROUP-wide steps are read as one per group."""
    ok = row_ok[:, None] & col_ok[None, :]
    BLOCK: tl.constexpr = cols.shape[0]
    ITEMSIZE: tl.constexpr = ptr.dtype.element_ty.primitive_bitwidth // 8
    PER_BYTE: tl.constexpr = 8 // BITS
    region = (base + code_row * stride_n) * ITEMSIZE   # in bytes: the head's region is contiguous
    bytes_ptr = ptr.to(tl.pointer_type(tl.uint8)) + region
    if WIDTH % PER_BYTE == 0:
        j = tl.arange(0, BLOCK // PER_BYTE)
        byte = tl.load(bytes_ptr + slot[:, None] * (WIDTH // PER_BYTE) + j[None, :],
                       mask=row_ok[:, None] & (j < WIDTH // PER_BYTE)[None, :], other=0)
        code = _unpack(byte.to(tl.int32), BITS)
    else:
        at = slot[:, None] * WIDTH + cols[None, :]
        byte = tl.load(bytes_ptr + at * BITS // 8, mask=ok, other=0).to(tl.int32)
        code = (byte >> (at * BITS % 8)) & ((1 << BITS) - 1)
    steps = ptr.to(tl.pointer_type(tl.float16)) + (region + capacity * WIDTH * BITS // 8) // 2
    GROUPS: tl.constexpr = (WIDTH + GROUP - 1) // GROUP   # value groups of a token
    N: tl.constexpr = slot.shape[0]
    if KEYS and TILE and (tl.constexpr(GROUP) % N == 0 or N % tl.constexpr(GROUP) == 0):
        # the tile lies in one key group or spans whole ones: each group's row of steps is
        # read once and spread down the group's tokens
        TILE_GROUPS: tl.constexpr = (N + GROUP - 1) // GROUP
        group = tl.min(slot, axis=0) // GROUP + tl.arange(0, TILE_GROUPS)
        at_k = group[:, None] * WIDTH + cols[None, :]
        group_ok = (group < capacity // GROUP)[:, None] & col_ok[None, :]
        step = _spread(tl.load(steps + at_k, mask=group_ok, other=0.0), N // TILE_GROUPS, True)
        zero = _spread(tl.load(steps + capacity // GROUP * WIDTH + at_k, mask=group_ok,
                               other=0.0), N // TILE_GROUPS, True)
    elif KEYS:
        at = (slot // GROUP)[:, None] * WIDTH + cols[None, :]
        step = tl.load(steps + at, mask=ok, other=0.0).to(tl.float32)
        zero = tl.load(steps + capacity // GROUP * WIDTH + at, mask=ok, other=0.0).to(tl.float32)
    elif GROUPS > 1 and GROUPS * GROUP == BLOCK:   # whole groups fill the columns: one load per group
        at_v = slot[:, None] * GROUPS + tl.arange(0, GROUPS)[None, :]
        step = _spread(tl.load(steps + at_v, mask=row_ok[:, None], other=0.0), GROUP, False)
        zero = _spread(tl.load(steps + capacity * GROUPS + at_v, mask=row_ok[:, None],
                               other=0.0), GROUP, False)
    else:
        at = slot[:, None] * GROUPS + (cols // GROUP)[None, :]
        step = tl.load(steps + at, mask=ok, other=0.0).to(tl.float32)
        zero = tl.load(steps + capacity * GROUPS + at, mask=ok, other=0.0).to(tl.float32)
    return (code.to(tl.float32) * step + zero).to(ptr.dtype.element_ty)


@triton.jit
def _spread(per_group, GROUP: tl.constexpr, ROWS: tl.constexpr):
    """`per_group` (M, N) as float32, each row (ROWS: (M * GROUP, N)) or each column ((M,
    N * GROUP)) repeated GROUP times."""
    M: tl.constexpr = per_group.shape[0]
    N: tl.constexpr = per_group.shape[1]
    if ROWS:
        tall = tl.broadcast_to(per_group.to(tl.float32)[:, None, :], (M, GROUP, N))
        spread = tl.reshape(tall, (M * GROUP, N))
    else:
        wide = tl.broadcast_to(per_group.to(tl.float32)[:, :, None], (M, N, GROUP))
        spread = tl.reshape(wide, (M, N * GROUP))
    return spread


@triton.jit
def _unpack(byte, BITS: tl.constexpr):
    """Bytes (N, M) as their codes (N, M * 8 / BITS), the lower bits the earlier code
    (state._pack_codes)."""
    if BITS == 8:
        return byte
    elif BITS == 4:
        return tl.interleave(byte & 15, byte >> 4)
    else:   # 2: codes 0 and 2, then 1 and 3, interleaved: 0, 1, 2, 3
        return tl.interleave(tl.interleave(byte & 3, (byte >> 4) & 3),
                             tl.interleave((byte >> 2) & 3, byte >> 6))


@triton.jit
def _select_kernel(
    logits_ptr, valid_ptr, plan_ptr, out_ptr, n, chunk, chunks, k, Hkv, stride_vb,
    G: tl.constexpr, G_ROWS: tl.constexpr, BLOCK_C: tl.constexpr, HAS_VALID: tl.constexpr,
    PER_ROW: tl.constexpr, RADIX: tl.constexpr, SMALL_C: tl.constexpr, SMALL_RADIX: tl.constexpr,
    FROM_HEADER: tl.constexpr, STORED: tl.constexpr, CHUNK: tl.constexpr, CODED: tl.constexpr,
    TOPK: tl.constexpr,
):
    bh = tl.program_id(0)
    b = bh // Hkv
    row_chunks, count = chunks, k
    if PER_ROW:
        chunk = tl.load(plan_ptr + 2 * b)
    if FROM_HEADER:  # a packed layer (plan_ptr: the header, stride_vb its row stride): the
        # row's tokens (coded and stored), chunk and topk (k: the list's length, at least
        # it); a row with fewer tokens selects them all
        n = tl.load(plan_ptr + b * stride_vb + CODED) + tl.load(plan_ptr + b * stride_vb + STORED)
        chunk = tl.load(plan_ptr + b * stride_vb + CHUNK)
        row_chunks = tl.cdiv(n, chunk)
        count = tl.minimum(tl.minimum(k, n), tl.load(plan_ptr + b * stride_vb + TOPK))
    _select_sized(logits_ptr, chunks, valid_ptr, out_ptr + bh * k, bh, n, chunk, row_chunks,
                  count, Hkv, stride_vb, G, G_ROWS, BLOCK_C, HAS_VALID, RADIX, False, k, False,
                  logits_ptr, SMALL_C, SMALL_RADIX)


@triton.jit
def _select_sized(logits_ptr, stride_lg, valid_ptr, out_ptr, bh, n, chunk, chunks, k, Hkv,
                  stride_vb, G: tl.constexpr, G_ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
                  HAS_VALID: tl.constexpr, RADIX: tl.constexpr, PAGES: tl.constexpr, list_len,
                  MASS: tl.constexpr, mass_ptr, SMALL_C: tl.constexpr, SMALL_RADIX: tl.constexpr):
    """`_select` over SMALL_C lanes where the row has no more chunks, else over BLOCK_C. A
    packed layer's chunk is read on the device, so its lanes are sized for a chunk of one
    slot: a row of 1296 slots in chunks of 8 would be searched over 2048 lanes for 162."""
    if SMALL_C < BLOCK_C:
        if chunks <= SMALL_C:
            _select(logits_ptr, stride_lg, valid_ptr, out_ptr, bh, n, chunk, chunks, k, Hkv,
                    stride_vb, G, G_ROWS, SMALL_C, HAS_VALID, SMALL_RADIX, PAGES, list_len, MASS,
                    mass_ptr)
        else:
            _select(logits_ptr, stride_lg, valid_ptr, out_ptr, bh, n, chunk, chunks, k, Hkv,
                    stride_vb, G, G_ROWS, BLOCK_C, HAS_VALID, RADIX, PAGES, list_len, MASS,
                    mass_ptr)
    else:
        _select(logits_ptr, stride_lg, valid_ptr, out_ptr, bh, n, chunk, chunks, k, Hkv,
                stride_vb, G, G_ROWS, BLOCK_C, HAS_VALID, RADIX, PAGES, list_len, MASS, mass_ptr)


@triton.jit
def _select(logits_ptr, stride_lg, valid_ptr, out_ptr, bh, n, chunk, chunks, k, Hkv, stride_vb,
            G: tl.constexpr, G_ROWS: tl.constexpr, BLOCK_C: tl.constexpr, HAS_VALID: tl.constexpr,
            RADIX: tl.constexpr, PAGES: tl.constexpr, list_len, MASS: tl.constexpr, mass_ptr):
    """The top k slots of KV head `bh` by chunk score, in slot order, into out_ptr[:k]. The
    chunk array is held in registers: `chunks` (at most BLOCK_C) logits per query head, rows
    `stride_lg` apart. PAGES: the top k chunks instead (Quest's pages), every live slot of
    each, the list padded to `list_len` with n (a slot attention skips). MASS: each query
    head's probability mass on the taken tokens into mass_ptr[bh * G + g] (SparQ's a)."""
    b = bh // Hkv
    c = tl.arange(0, BLOCK_C)
    c_ok = c < chunks
    size = tl.minimum(tl.maximum(n - c * chunk, 0), chunk)
    if HAS_VALID:
        live = tl.zeros((BLOCK_C,), tl.int32)
        for j in range(chunk):
            slot = c * chunk + j
            ok = c_ok & (slot < n)
            live += (tl.load(valid_ptr + b * stride_vb + slot, mask=ok, other=0) != 0).to(tl.int32)
    else:
        live = tl.where(c_ok, size, 0)

    # Chunk probabilities: per query head a softmax over tokens (a chunk weighs as many times as
    # it has live tokens), then the group mean. Every live token of a chunk has its score; a
    # masked token scores 0.
    # All G heads at once (G_ROWS >= G rows, the padding all -inf): three reductions, not 2G.
    g = tl.arange(0, G_ROWS)
    logit = tl.load(logits_ptr + (bh * G + g)[:, None] * stride_lg + c[None, :],
                    mask=(g < G)[:, None] & c_ok[None, :], other=float("-inf"))
    top = tl.max(logit, axis=1)
    e = tl.exp(logit - tl.where(top == float("-inf"), 0.0, top)[:, None])
    z = tl.sum(e * live[None, :], axis=1)
    probability = tl.where(z[:, None] > 0, e / tl.where(z > 0, z, 1.0)[:, None], 0.0)
    score = tl.sum(probability, axis=0) / G

    # The k-th largest token score, T: the largest T with k tokens scoring >= T (scores are
    # >= 0, so their bit patterns order as the floats do).
    bits = tl.where(c_ok, score.to(tl.int32, bitcast=True), -1)
    # What is counted toward k: a chunk's live tokens, or (PAGES) the chunk once if it has any.
    if PAGES:
        weight = (live > 0).to(tl.int32)
    else:
        weight = live
    threshold = _kth_largest_bits(bits, weight, k, RADIX)

    # Every token above T is taken; tokens at T are taken in slot order until there are k (as a
    # stable sort would). At T = 0 masked tokens tie too: attention skips them. (PAGES: the
    # same over whole chunks, then each taken chunk's live tokens.)
    above = tl.where(bits > threshold, weight, 0)
    tied = tl.where(bits == threshold, weight, 0)
    if not PAGES:
        tied += tl.where(c_ok & (threshold == 0), size - live, 0)
    need = k - tl.sum(above, axis=0)
    tied_before = tl.cumsum(tied, axis=0) - tied
    take_tied = tl.minimum(tl.maximum(need - tied_before, 0), tied)
    taken = above + take_tied
    if PAGES:
        taken = taken * live
    if MASS:
        mass = tl.sum(probability * taken[None, :], axis=1)
        tl.store(mass_ptr + bh * G + g, mass, mask=g < G)
    offset = tl.cumsum(taken, axis=0) - taken
    written = tl.zeros((BLOCK_C,), tl.int32)
    tied_seen = tl.zeros((BLOCK_C,), tl.int32)
    for j in range(chunk):
        slot = c * chunk + j
        in_range = c_ok & (slot < n)
        is_live = in_range
        if HAS_VALID:
            is_live &= tl.load(valid_ptr + b * stride_vb + slot, mask=in_range, other=0) != 0
        if PAGES:
            take = is_live & (taken > 0)
        else:
            is_tied = (is_live & (bits == threshold)) | (in_range & ~is_live & (threshold == 0))
            take = (is_live & (bits > threshold)) | (is_tied & (tied_seen < take_tied))
            tied_seen += is_tied.to(tl.int32)
        tl.store(out_ptr + offset + written, slot, mask=take)
        written += take.to(tl.int32)
    if PAGES:
        total = tl.sum(taken, axis=0)
        for base in range(0, list_len, BLOCK_C):
            i = base + c
            tl.store(out_ptr + i, n, mask=(i >= total) & (i < list_len))


# A row of more chunks than one selection program holds (SELECTION_LANES; oracle top-k and SparQ
# keep a chunk per token) is selected in two levels, as `_select` would select it: each segment
# of the row takes its own top k by the row's scores, then one program per KV head takes the
# row's top k from the segments' candidates. (A slot of the row's top k is in its segment's top
# k: fewer than k of the segment's tokens come before it in score order, ties to the earlier
# slot.) The scores need each query head's softmax over the whole row, so a first launch writes
# each segment's max and sum of exp, which the next two combine.


@triton.jit
def _segment_chunks(first, n, chunk, SEGMENT: tl.constexpr):
    """Chunks `first`.. `first + SEGMENT` of a row of `n` tokens: their index, whether the row
    has them, and their live tokens (0 past the row). (The kernels load what these index
    themselves: Inductor takes a store whose address follows from a helper's return as a
    write through that helper's pointer arguments; tests/test_kernel_writes.py.)"""
    c = first + tl.arange(0, SEGMENT)
    c_ok = c < tl.cdiv(n, chunk)
    return c, c_ok, tl.where(c_ok, tl.minimum(tl.maximum(n - c * chunk, 0), chunk), 0)


@triton.jit
def _finite(top):
    return tl.where(top == float("-inf"), 0.0, top)


@triton.jit
def _row_softmax(tops, sums):
    """Each query head's max logit over the row and its sum of exp from that max, from the
    segments' own (SEGMENTS, G_ROWS) (`_segment_softmax_kernel`; -inf and 0 past them)."""
    top = tl.max(tops, axis=0)
    return top, tl.sum(sums * tl.exp(tops - _finite(top)[None, :]), axis=0)


@triton.jit
def _probability(logit, top, z):
    """Each token's softmax probability (a row of no live token: 0)."""
    e = tl.exp(logit - _finite(top)[:, None])
    return tl.where(z[:, None] > 0, e / tl.where(z > 0, z, 1.0)[:, None], 0.0)


@triton.jit
def _segment_softmax_kernel(logits_ptr, header_ptr, parts_ptr, lanes, Hkv, stride_hb,
                            G: tl.constexpr, G_ROWS: tl.constexpr, SEGMENT: tl.constexpr,
                            STORED: tl.constexpr, CHUNK: tl.constexpr, CODED: tl.constexpr):
    # Program (KV head, segment): each query head's max logit and sum of exp over the segment's
    # tokens (a chunk weighs its live tokens), into parts[bh, segment] = (maxes, sums).
    bh, s = tl.program_id(0), tl.program_id(1)
    header = header_ptr + bh // Hkv * stride_hb
    n = tl.load(header + CODED) + tl.load(header + STORED)
    c, c_ok, live = _segment_chunks(s * SEGMENT, n, tl.load(header + CHUNK), SEGMENT)
    g = tl.arange(0, G_ROWS)
    logit = tl.load(logits_ptr + (bh * G + g)[:, None] * lanes + c[None, :],
                    mask=(g < G)[:, None] & c_ok[None, :], other=float("-inf"))
    top = tl.max(logit, axis=1)
    z = tl.sum(tl.exp(logit - _finite(top)[:, None]) * live[None, :], axis=1)
    part = parts_ptr + (bh * tl.num_programs(1) + s) * (2 * G_ROWS) + g
    tl.store(part, top)
    tl.store(part + G_ROWS, z)


@triton.jit
def _segment_candidates_kernel(logits_ptr, header_ptr, parts_ptr, candidates_ptr, lanes, k, Hkv,
                               stride_hb, G: tl.constexpr, G_ROWS: tl.constexpr,
                               SEGMENT: tl.constexpr, SEGMENTS: tl.constexpr,
                               RADIX: tl.constexpr, STORED: tl.constexpr, CHUNK: tl.constexpr,
                               CODED: tl.constexpr, TOPK: tl.constexpr):
    # Program (KV head, segment): the segment's top min(k, tokens, topk) tokens by the row's
    # scores, as `_select` takes them, written as the chunks they lie in: candidates[bh,
    # segment] = (score bits, chunk) of up to k chunks in slot order, the rest score -1.
    bh, s = tl.program_id(0), tl.program_id(1)
    segments = tl.num_programs(1)
    header = header_ptr + bh // Hkv * stride_hb
    n = tl.load(header + CODED) + tl.load(header + STORED)
    count = tl.minimum(tl.minimum(k, n), tl.load(header + TOPK))
    c, c_ok, live = _segment_chunks(s * SEGMENT, n, tl.load(header + CHUNK), SEGMENT)
    g = tl.arange(0, G_ROWS)
    logit = tl.load(logits_ptr + (bh * G + g)[:, None] * lanes + c[None, :],
                    mask=(g < G)[:, None] & c_ok[None, :], other=float("-inf"))
    r = tl.arange(0, SEGMENTS)
    part = parts_ptr + (bh * segments + r)[:, None] * (2 * G_ROWS) + g[None, :]
    top, z = _row_softmax(tl.load(part, mask=(r < segments)[:, None], other=float("-inf")),
                          tl.load(part + G_ROWS, mask=(r < segments)[:, None], other=0.0))
    score = tl.sum(_probability(logit, top, z), axis=0) / G
    bits = tl.where(live > 0, score.to(tl.int32, bitcast=True), -1)
    threshold = _kth_largest_bits(bits, live, count, RADIX)
    above = bits > threshold
    tied = tl.where(bits == threshold, live, 0)
    need = count - tl.sum(tl.where(above, live, 0), axis=0)
    taken = above | ((tied > 0) & (tl.cumsum(tied, axis=0) - tied < need))
    at = tl.cumsum(taken.to(tl.int32), axis=0) - taken.to(tl.int32)
    out = candidates_ptr + (bh * segments + s) * 2 * k
    tl.store(out + at, bits, mask=taken)
    tl.store(out + k + at, c, mask=taken)
    total = tl.sum(taken.to(tl.int32), axis=0)
    for first in range(0, k, SEGMENT):
        i = first + tl.arange(0, SEGMENT)
        tl.store(out + i, -1, mask=(i >= total) & (i < k))


@triton.jit
def _merge_candidates_kernel(logits_ptr, header_ptr, parts_ptr, candidates_ptr, out_ptr,
                             mass_ptr, lanes, k, segments, Hkv, stride_hb, G: tl.constexpr,
                             G_ROWS: tl.constexpr, CANDIDATES: tl.constexpr,
                             SEGMENTS: tl.constexpr, RADIX: tl.constexpr, MASS: tl.constexpr,
                             STORED: tl.constexpr, CHUNK: tl.constexpr, CODED: tl.constexpr,
                             TOPK: tl.constexpr):
    # One program per KV head: the row's top min(k, tokens, topk) slots from its segments'
    # candidates (in slot order, so ties go to the earlier slot as in `_select`), in slot order
    # into out[bh, :k]; MASS (SparQ): each query head's probability on them into mass[bh, g].
    bh = tl.program_id(0)
    header = header_ptr + bh // Hkv * stride_hb
    n = tl.load(header + CODED) + tl.load(header + STORED)
    chunk = tl.load(header + CHUNK)
    count = tl.minimum(tl.minimum(k, n), tl.load(header + TOPK))
    i = tl.arange(0, CANDIDATES)
    ok = i < segments * k
    at = candidates_ptr + (bh * segments + i // k) * 2 * k + i % k
    bits = tl.load(at, mask=ok, other=-1)
    c = tl.load(at + k, mask=ok & (bits >= 0), other=0)
    size = tl.where(bits >= 0, tl.minimum(tl.maximum(n - c * chunk, 0), chunk), 0)
    threshold = _kth_largest_bits(bits, size, count, RADIX)
    above = tl.where(bits > threshold, size, 0)
    tied = tl.where(bits == threshold, size, 0)
    need = count - tl.sum(above, axis=0)
    taken = above + tl.minimum(tl.maximum(need - (tl.cumsum(tied, axis=0) - tied), 0), tied)
    if MASS:
        g = tl.arange(0, G_ROWS)
        r = tl.arange(0, SEGMENTS)
        part = parts_ptr + (bh * segments + r)[:, None] * (2 * G_ROWS) + g[None, :]
        top, z = _row_softmax(tl.load(part, mask=(r < segments)[:, None], other=float("-inf")),
                              tl.load(part + G_ROWS, mask=(r < segments)[:, None], other=0.0))
        logit = tl.load(logits_ptr + (bh * G + g)[:, None] * lanes + c[None, :],
                        mask=(g < G)[:, None] & (taken > 0)[None, :], other=float("-inf"))
        mass = tl.sum(_probability(logit, top, z) * taken[None, :], axis=1)
        tl.store(mass_ptr + bh * G + g, mass, mask=g < G)
    offset = tl.cumsum(taken, axis=0) - taken   # a taken chunk's first token, its first slots
    for j in range(chunk):
        tl.store(out_ptr + bh * k + offset + j, c * chunk + j, mask=j < taken)


@triton.jit
def _sparse_attention_kernel(
    q_ptr, k_ptr, v_ptr, idx_ptr, valid_ptr, part_out_ptr, part_m_ptr, part_l_ptr,
    n, count, per_split, Hkv, scale, splits,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_validb,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_VALID: tl.constexpr, DENSE: tl.constexpr, HEADER_COUNT: tl.constexpr,
    STORED: tl.constexpr, TOPK: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr,
    CODED: tl.constexpr,
    CODED_CAPACITY: tl.constexpr, CODE_ROW: tl.constexpr,
):
    bh = tl.program_id(0)
    split = tl.program_id(1)   # of `splits` partials per head
    g = tl.arange(0, G_PAD)
    dv = tl.arange(0, BLOCK_DV)
    selected = idx_ptr + bh * count
    # Over a packed layer (valid_ptr: the header): DENSE, every token of the row (coded, then
    # stored), in order; HEADER_COUNT, the first min(count, tokens, topk) of the row's list.
    coded, capacity, code_row = 0, 0, 0
    if DENSE or HEADER_COUNT:
        header = valid_ptr + (bh // Hkv) * stride_validb
        coded, capacity = tl.load(header + CODED), tl.load(header + CODED_CAPACITY)
        code_row, tokens = tl.load(header + CODE_ROW), coded + tl.load(header + STORED)
        if DENSE:
            n, count = tokens, tokens
        else:
            count = tl.minimum(tl.minimum(count, tokens), tl.load(header + TOPK))
    start = split * per_split
    m, l, acc = _attend(q_ptr, k_ptr, v_ptr, selected, valid_ptr, bh, Hkv, n,
                        start, tl.minimum(start + per_split, count), scale,
                        stride_qb, stride_qh, stride_kb, stride_kh, stride_kn,
                        stride_vb, stride_vh, stride_vn, stride_validb,
                        G, G_PAD, D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, HAS_VALID, DENSE, 1,
                        coded, capacity, code_row, BITS, GROUP)
    row = (bh * splits + split) * G + g
    tl.store(part_m_ptr + row, m, mask=g < G)
    tl.store(part_l_ptr + row, l, mask=g < G)
    tl.store(part_out_ptr + row[:, None] * DV + dv[None, :], acc,
             mask=(g < G)[:, None] & (dv < DV)[None, :])


@triton.jit
def _attend(q_ptr, k_ptr, v_ptr, idx_ptr, valid_ptr, bh, Hkv, n, start, stop, scale,
            stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh,
            stride_vn, stride_validb,
            G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
            BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr,
            HAS_VALID: tl.constexpr, DENSE: tl.constexpr, KV_GROUP: tl.constexpr,
            coded, capacity, code_row, BITS: tl.constexpr, GROUP: tl.constexpr):
    """Online softmax of KV head `bh`'s whole GQA group over the slots idx_ptr[start:stop]
    (or, DENSE, the slots start:stop themselves), loading each K/V row in place:
    (running max, sum, unnormalized output), one row per query head (G_PAD >= 16 rows: the
    group is padded to a tensor-core tile, padding rows are zeros). KV_GROUP > 1: `bh` is one
    query head (G = 1) of KV head h // KV_GROUP (Quest selects per query head). BITS > 0: the
    slots are a quantized row's tokens, codes first (`_rows`); DENSE, its codes and its exact
    slots are swept by two loops."""
    b, h = bh // Hkv, bh % Hkv
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + b * stride_qb + (h * G + g)[:, None] * stride_qh + d[None, :],
                mask=(g < G)[:, None] & (d < D)[None, :], other=0.0)
    q = q.to(k_ptr.dtype.element_ty)
    m = tl.full((G_PAD,), float("-inf"), tl.float32)
    l = tl.zeros((G_PAD,), tl.float32)
    acc = tl.zeros((G_PAD, BLOCK_DV), tl.float32)
    k_base = b * stride_kb + (h // KV_GROUP) * stride_kh
    v_base = b * stride_vb + (h // KV_GROUP) * stride_vh
    if DENSE and BITS > 0:
        # each half at least 16 wide, the size tl.dot has long required (the GPU has an older
        # Triton than this machine); head dim 16 keeps the unpacked loop
        if BITS == 4 and DV == BLOCK_DV and DV >= 32:
            m, l, acc = _attend_nibble_tiles(q, m, l, acc, k_ptr, v_ptr, valid_ptr, k_base,
                                             v_base, b, n, start, tl.minimum(stop, coded),
                                             scale, stride_kn, stride_vn, stride_validb, D, DV,
                                             BLOCK_D, BLOCK_N, HAS_VALID, capacity, code_row,
                                             GROUP)
        else:
            m, l, acc = _attend_tiles(q, m, l, acc, k_ptr, v_ptr, idx_ptr, valid_ptr, k_base,
                                      v_base, b, n, start, tl.minimum(stop, coded), scale,
                                      stride_kn, stride_vn, stride_validb, D, DV, BLOCK_D,
                                      BLOCK_DV, BLOCK_N, HAS_VALID, DENSE, coded, capacity,
                                      code_row, BITS, GROUP, CODE_TILE)
        m, l, acc = _attend_tiles(q, m, l, acc, k_ptr, v_ptr, idx_ptr, valid_ptr, k_base,
                                  v_base, b, n, tl.maximum(start, coded), stop, scale,
                                  stride_kn, stride_vn, stride_validb, D, DV, BLOCK_D,
                                  BLOCK_DV, BLOCK_N, HAS_VALID, DENSE, coded, capacity,
                                  code_row, BITS, GROUP, EXACT_SLOTS)
    else:
        m, l, acc = _attend_tiles(q, m, l, acc, k_ptr, v_ptr, idx_ptr, valid_ptr, k_base,
                                  v_base, b, n, start, stop, scale, stride_kn, stride_vn,
                                  stride_validb, D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, HAS_VALID,
                                  DENSE, coded, capacity, code_row, BITS, GROUP, ANY_TOKENS)
    return m, l, acc


@triton.jit
def _attend_tiles(q, m, l, acc, k_ptr, v_ptr, idx_ptr, valid_ptr, k_base, v_base, b, n, start,
                  stop, scale, stride_kn, stride_vn, stride_validb, D: tl.constexpr,
                  DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                  BLOCK_N: tl.constexpr, HAS_VALID: tl.constexpr, DENSE: tl.constexpr,
                  coded, capacity, code_row, BITS: tl.constexpr, GROUP: tl.constexpr,
                  TOKENS: tl.constexpr):
    """`_attend`'s loop over slots start:stop (of the list, or DENSE themselves) in tiles of
    BLOCK_N, from its running (m, l, acc); TOKENS: what the slots hold (`_rows`)."""
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    for base in range(start, stop, BLOCK_N):
        i = base + tl.arange(0, BLOCK_N)
        ok = i < stop
        if DENSE:
            slot = i
        else:
            slot = tl.load(idx_ptr + i, mask=ok, other=0)
        ok &= slot < n  # a short list is padded with slots past the end
        if HAS_VALID:  # a masked slot can be selected (fewer live slots than top-k): skip it
            ok &= tl.load(valid_ptr + b * stride_validb + slot, mask=ok, other=0) != 0
        k = _rows(k_ptr, k_base, slot, ok, d, d < D, stride_kn, coded, capacity, code_row, D,
                  BITS, GROUP, True, TOKENS)
        m_new, alpha, p = _tile_weights(q, k, ok, m, scale)
        v = _rows(v_ptr, v_base, slot, ok, dv, dv < DV, stride_vn, coded, capacity, code_row,
                  DV, BITS, GROUP, False, TOKENS)
        acc = _accumulate(acc * alpha[:, None], p, v)
        l = l * alpha + tl.sum(p, axis=1)
        m = m_new
    return m, l, acc


@triton.jit
def _tile_weights(q, k, ok, m, scale):
    """One tile of the online softmax: from the query rows `q`, the tile's keys `k` (slots
    where `ok`) and the running max `m`, the new running max, the factor rescaling what came
    before, and the tile's unnormalized probabilities."""
    # Products of 16-bit numbers are exact in float32: the tensor cores lose nothing here.
    # (Inductor passes `scale` as a float64 scalar: keep the loop state in float32.)
    s = (tl.dot(q, tl.trans(k), input_precision="ieee") * scale).to(tl.float32)
    s = tl.where(ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)   # all masked so far: no NaN
    return m_new, tl.exp(m - m_use), tl.exp(s - m_use[:, None])


@triton.jit
def _accumulate(acc, p, v):
    """acc + p @ v, p float32 probabilities, v a tile of values in the model's dtype."""
    if v.dtype == tl.float32:
        acc = tl.dot(p, v, acc, input_precision="ieee")
    else:   # p as a 16-bit head and tail: about float32's precision in two products
        p_head = p.to(v.dtype)
        acc = tl.dot(p_head, v, acc)
        acc = tl.dot((p - p_head.to(tl.float32)).to(v.dtype), v, acc)
    return acc


@triton.jit
def _attend_nibble_tiles(q, m, l, acc, k_ptr, v_ptr, valid_ptr, k_base, v_base, b, n, start,
                         stop, scale, stride_kn, stride_vn, stride_validb, D: tl.constexpr,
                         DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                         HAS_VALID: tl.constexpr, capacity, code_row, GROUP: tl.constexpr):
    """`_attend_tiles` over a dense sweep of 4-bit codes (slots start:stop), its value codes
    never unpacked: a byte's low nibbles are the even channels and its high nibbles the odd
    ones, each half dequantized where it lies and multiplied into an accumulator of its own,
    the two interleaved once, after the loop. Unpacked (`_unpack`'s interleave), a tile had to
    be dequantized before its trip through shared memory and went as bf16 numbers; as two
    elementwise functions of the loaded bytes it goes as bytes, as 8-bit codes do, and 4-bit
    decode takes 58 us where unpacking took 72 (H100, 1x32K; BENCHMARKS.md "KV codes").
    Keeping the keys' nibbles apart too was slower (73 us): they stay `_rows`'."""
    HALF: tl.constexpr = DV // 2
    GROUPS: tl.constexpr = (DV + GROUP - 1) // GROUP
    acc_even, acc_odd = tl.split(tl.reshape(acc, (acc.shape[0], HALF, 2)))
    d = tl.arange(0, BLOCK_D)
    j = tl.arange(0, HALF)
    ITEMSIZE: tl.constexpr = v_ptr.dtype.element_ty.primitive_bitwidth // 8
    region = (v_base + code_row * stride_vn) * ITEMSIZE   # in bytes, as `_dequantized`'s
    bytes_ptr = v_ptr.to(tl.pointer_type(tl.uint8)) + region
    steps = v_ptr.to(tl.pointer_type(tl.float16)) + (region + capacity * HALF) // 2
    for base in range(start, stop, BLOCK_N):
        slot = base + tl.arange(0, BLOCK_N)
        ok = (slot < stop) & (slot < n)
        if HAS_VALID:
            ok &= tl.load(valid_ptr + b * stride_validb + slot, mask=ok, other=0) != 0
        k = _rows(k_ptr, k_base, slot, ok, d, d < D, stride_kn, 0, capacity, code_row, D, 4,
                  GROUP, True, CODE_TILE)
        m_new, alpha, p = _tile_weights(q, k, ok, m, scale)
        byte = tl.load(bytes_ptr + slot[:, None] * HALF + j[None, :], mask=ok[:, None],
                       other=0).to(tl.int32)
        if GROUPS > 1 and GROUPS * GROUP == DV and GROUP % 2 == 0:
            # a group's step and zero cover GROUP / 2 columns of each half: one load each per
            # token and group, spread in registers
            at = slot[:, None] * GROUPS + tl.arange(0, GROUPS)[None, :]
            step = _spread(tl.load(steps + at, mask=ok[:, None], other=0.0), GROUP // 2, False)
            zero = _spread(tl.load(steps + capacity * GROUPS + at, mask=ok[:, None], other=0.0),
                           GROUP // 2, False)
            v_even = ((byte & 15).to(tl.float32) * step + zero).to(v_ptr.dtype.element_ty)
            v_odd = ((byte >> 4).to(tl.float32) * step + zero).to(v_ptr.dtype.element_ty)
        else:
            v_even = _nibbles(byte & 15, slot[:, None] * GROUPS + (2 * j // GROUP)[None, :],
                              steps, capacity * GROUPS, ok, v_ptr.dtype.element_ty)
            v_odd = _nibbles(byte >> 4, slot[:, None] * GROUPS + ((2 * j + 1) // GROUP)[None, :],
                             steps, capacity * GROUPS, ok, v_ptr.dtype.element_ty)
        acc_even = _accumulate(acc_even * alpha[:, None], p, v_even)
        acc_odd = _accumulate(acc_odd * alpha[:, None], p, v_odd)
        l = l * alpha + tl.sum(p, axis=1)
        m = m_new
    return m, l, tl.reshape(tl.join(acc_even, acc_odd), (acc.shape[0], DV))


@triton.jit
def _nibbles(codes, at, steps, zeros_at, ok, dtype: tl.constexpr):
    """Half a tile's 4-bit value codes dequantized with the step and zero of each one's group
    (`at`: their index among the steps; the zeros follow the steps at `zeros_at`)."""
    step = tl.load(steps + at, mask=ok[:, None], other=0.0).to(tl.float32)
    zero = tl.load(steps + zeros_at + at, mask=ok[:, None], other=0.0).to(tl.float32)
    return (codes.to(tl.float32) * step + zero).to(dtype)


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


@triton.jit
def _packed_select_attend_kernel(
    q_ptr, k_ptr, v_ptr, header_ptr, logits_ptr, idx_ptr, out_ptr, mass_ptr,
    lanes, topk, Hkv, scale,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_hb,
    STORED: tl.constexpr, CHUNK: tl.constexpr, TOPK: tl.constexpr, G: tl.constexpr,
    G_PAD: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, G_ROWS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
    RADIX: tl.constexpr, SMALL_C: tl.constexpr, SMALL_RADIX: tl.constexpr,
    PAGES: tl.constexpr, KV_GROUP: tl.constexpr, MEAN_V: tl.constexpr,
    BITS: tl.constexpr, GROUP: tl.constexpr, CODED: tl.constexpr,
    CODED_CAPACITY: tl.constexpr, CODE_ROW: tl.constexpr,
):
    # One program per selecting head of a packed layer (a KV head, or with PAGES a query head
    # of KV head h // KV_GROUP): its row's tokens (coded, then stored; `_rows`) and chunk
    # and topk from the header, the
    # selection (`_select`) into this head's list, then attention over the list (`_attend`),
    # normalized and written: no partials, no combine, no mask tensor. `lanes`: the length of
    # a head's logits row. `topk`: the list's length, at least the row's topk (PAGES: topk //
    # chunk pages). MEAN_V
    # (SparQ): the output is a y + (1 - a) mean(V), a each head's probability mass on the
    # list (through mass_ptr, B * Hq floats; else unused), mean(V) over the row's stored values
    # (read here: the cache keeps no running mean).
    bh = tl.program_id(0)
    b = bh // Hkv
    header = header_ptr + b * stride_hb
    coded, capacity = tl.load(header + CODED), tl.load(header + CODED_CAPACITY)
    code_row, n = tl.load(header + CODE_ROW), coded + tl.load(header + STORED)
    chunk = tl.load(header + CHUNK)
    if PAGES:
        k, attended = topk // chunk, topk
    else:
        k = tl.minimum(tl.minimum(topk, n), tl.load(header + TOPK))
        attended = k
    selected = idx_ptr + bh * topk
    _select_sized(logits_ptr, lanes, header_ptr, selected, bh, n, chunk, tl.cdiv(n, chunk), k,
                  Hkv, 0, G, G_ROWS, BLOCK_C, False, RADIX, PAGES, topk, MEAN_V, mass_ptr,
                  SMALL_C, SMALL_RADIX)
    tl.debug_barrier()   # the list, written by the whole program, is read by all of it
    m, l, acc = _attend(q_ptr, k_ptr, v_ptr, selected, header_ptr, bh, Hkv, n, 0, attended, scale,
                        stride_qb, stride_qh, stride_kb, stride_kh, stride_kn,
                        stride_vb, stride_vh, stride_vn, 0,
                        G, G_PAD, D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, False, False, KV_GROUP,
                        coded, capacity, code_row, BITS, GROUP)
    g = tl.arange(0, G_PAD)
    dv = tl.arange(0, BLOCK_DV)
    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    if MEAN_V:
        total = tl.zeros((BLOCK_DV,), tl.float32)
        for base in range(0, n, BLOCK_N):
            i = base + tl.arange(0, BLOCK_N)
            v = _rows(v_ptr, b * stride_vb + (bh % Hkv) * stride_vh, i, i < n, dv, dv < DV,
                      stride_vn, coded, capacity, code_row, DV, BITS, GROUP, False, ANY_TOKENS)
            total += tl.sum(v.to(tl.float32), axis=0)
        mass = tl.load(mass_ptr + bh * G + g, mask=g < G, other=0.0)
        out = mass[:, None] * out + (1 - mass)[:, None] * (total / n)[None, :]
    tl.store(out_ptr + (bh * G + g)[:, None] * DV + dv[None, :],
             out.to(out_ptr.dtype.element_ty), mask=(g < G)[:, None] & (dv < DV)[None, :])


@triton.jit
def _append_packed_kernel(
    k_ptr, v_ptr, header_ptr, new_k_ptr, new_v_ptr, slots, Hkv,
    stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, stride_hb, stride_hh,
    stride_nkb, stride_nkh, stride_nvb, stride_nvh,
    STORED: tl.constexpr, POSITION: tl.constexpr, CODE_ROW: tl.constexpr, D: tl.constexpr,
    DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    # One program per row and KV head: it reads and then bumps that head's copy of the row's
    # header (every head holds one), so no two programs touch the same words. A quantized
    # layer's exact slots end where its codes start (CODE_ROW, 0 without codes).
    bh = tl.program_id(0)
    b, h = bh // Hkv, bh % Hkv
    header = header_ptr + b * stride_hb + h * stride_hh
    slot = tl.load(header + STORED)
    code_row = tl.load(header + CODE_ROW)
    room = slot < tl.where(code_row > 0, code_row, slots)
    tl.device_assert(room, "rocketkv: the cache is full")
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    k = tl.load(new_k_ptr + b * stride_nkb + h * stride_nkh + d, mask=(d < D) & room)
    v = tl.load(new_v_ptr + b * stride_nvb + h * stride_nvh + dv, mask=(dv < DV) & room)
    tl.store(k_ptr + b * stride_kb + h * stride_kh + slot * stride_kn + d, k, mask=(d < D) & room)
    tl.store(v_ptr + b * stride_vb + h * stride_vh + slot * stride_vn + dv, v,
             mask=(dv < DV) & room)
    tl.store(header + STORED, slot + 1, mask=room)
    tl.store(header + POSITION, tl.load(header + POSITION) + 1, mask=room)


# Launch parameters, as data: block sizes and warps of the kernels above (a selection's warps
# follow its size, `_selection_launch`). benchmarks/tune_stage2.py times the alternatives on a GPU.
# Chunk logits: 32 chunks a program was the fastest step at 1x128K over both caches and both
# budgets on the H100 (tune_stage2.py, 2026-12-06: 33.1 against 34.1 us packed at B=256, 108
# against 131 at B=1024), warps changed little. A chunk's rows one at a time (UNROLL 1) beat
# 2, 4 and 8 in flight at every shape (tune_stage2.py --knobs, ced62b2: 46.6 against 51.6 us
# over plain keys at 1x128K B=1024, 47.1 against 53.2 at 8x128K B=256; BENCHMARKS.md).
# DIMS_BY_RANK: the query's r dims by ranks rather than the bit search: the cache step in 33.0
# against 33.2 us at 1x32K B=256, 27.8 against 28.2 at 1x128K, 48.7 against 50.6 at 8x128K
# (H100, tune_stage2.py --knobs CHUNK_LOGITS.DIMS_BY_RANK, 2026-12-07, a825e0b).
# Programs per KV head for the chunk logits: enough for CHUNK_PROGRAMS_PER_SM on every SM, at
# most one per block of BLOCK_C chunks (`_chunk_programs`). A batch of few heads gets a program
# per block, as before this rule; a large batch one program per head that preps its query once
# (not once per block) and loops over its row. Not measured yet (tune_stage2.py --shapes
# 349x131072x256 --knobs CHUNK_PROGRAMS_PER_SM; 1 << 20: a program per block always).
CHUNK_PROGRAMS_PER_SM = 16
# ONE_BOUND: written for the large batch, where chunk logits took 1289 of a layer's 1500 us
# at 349 x 128K B=256 (H100, profile_stage2.py, 2026-12-08), about 4.6x reading the keys once;
# not measured yet (tune_stage2.py --shapes 349x131072x256 --knobs CHUNK_LOGITS.ONE_BOUND).
CHUNK_LOGITS = dict(BLOCK_C=32, num_warps=4, UNROLL=1,   # chunks per program, rows in flight
                    DIMS_BY_RANK=True, ONE_BOUND=False)
ATTENTION = dict(BLOCK_N=32, num_warps=4)      # slots per loop step; the split path's programs
# The same over a quantized layer, where dequantizing in registers, not bytes, bounds a tile:
# 64 slots a step took the exact decode at 1x32K from 76 to 72 us at 4 bits and from 108 to 75
# at 8 (bf16: 53 us at 32 slots, 57 at 64; H100, 2026-12-07, BENCHMARKS.md "KV codes").
ATTENTION_CODED = dict(BLOCK_N=64, num_warps=4)
PACKED_ATTENTION = dict(BLOCK_N=32)            # one program per KV head (warps: the selection's)
SELECTION_WARPS = None                         # None: by the number of chunks held
# Lanes of a selection whose row has that few chunks (`_select_sized`). RocketKV's chunk of 3
# gives 432 chunks at 1x128K B=256: 512 lanes took the step from 32.9 (256: the small copy
# never taken) and 31.0 us (no small copy) to 28.7, and 61.5 / 59.7 to 57.1 at 8x128K (H100,
# tune_stage2.py --knobs on ced62b2).
SELECTION_SMALL = 512
# A selection program holds a row's chunk scores in registers (16 warps at 16384 lanes: oracle
# top-k at 16K tokens ran so on the H100, EVALUATION.md). A longer row (oracle top-k and SparQ
# keep every token, a chunk per slot) is selected in two levels (`_long_row_selection`):
# programs of LONG_SEGMENT chunks (or more, until their candidates fit one program), then one
# program per KV head over the candidates, each program holding at most MERGE_LANES; past
# that, by torch ops.
SELECTION_LANES = 16384
LONG_SEGMENT = 4096
MERGE_LANES = 16384


def _group_rows(G: int) -> int:
    """Rows for a GQA group held elementwise (a power of two, at least 2 for tl.arange)."""
    return max(triton.next_power_of_2(G), 2)


def _dot_rows(n: int) -> int:
    """A power of two >= n and >= 16, tl.dot's least tile side (a GQA group of 4 query heads
    is attended as 16 rows, 12 of them zeros)."""
    return max(triton.next_power_of_2(n), 16)


def _selection_launch(block_chunks: int, chunks_on_device: bool = True) -> dict:
    """Warps for a program holding `block_chunks` chunk scores, and the radix of its k-th
    largest search: the most bits a pass (2**RADIX candidates against every chunk) can count
    while each thread holds at most 64 of those comparisons; the same for the small selection
    a row with at most SELECTION_SMALL chunks takes (`_select_sized`), where the chunks are
    only counted on the device (a packed layer's header). Counted on the host, `block_chunks`
    already fits them: no small copy is compiled."""
    warps = SELECTION_WARPS or (4 if block_chunks <= 1024 else 8 if block_chunks <= 4096 else 16)

    def radix(lanes: int) -> int:
        return next(r for r in (4, 2, 1) if (lanes << r) <= 64 * 32 * warps or r == 1)

    small = min(block_chunks, triton.next_power_of_2(max(SELECTION_SMALL, 16))) \
        if chunks_on_device else block_chunks
    return dict(num_warps=warps, RADIX=radix(block_chunks), SMALL_C=small,
                SMALL_RADIX=radix(small))


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # Triton's interpreter: a few programs are plenty


def _chunk_programs(heads: int, lanes: int, device) -> int:
    """Programs per KV head for `_chunk_logits_kernel` over `lanes` chunks
    (CHUNK_PROGRAMS_PER_SM)."""
    blocks = triton.cdiv(lanes, CHUNK_LOGITS["BLOCK_C"])
    return max(1, min(blocks, triton.cdiv(CHUNK_PROGRAMS_PER_SM * _sm_count(device), heads)))


def row_plans(chunk: int | Sequence[int], dims: int | Sequence[int], device
              ) -> tuple[int, int, Tensor | None]:
    """(the smallest chunk, dims, per-row plan): the plan of every row as ints and None, or,
    where rows differ (a padded batch whose rows were evicted apart), (B, 2) int32 (chunk, dims)
    per row for the kernels to read."""
    chunk, dims = ([x] if isinstance(x, int) else list(x) for x in (chunk, dims))
    if len(set(zip(chunk, dims))) == 1:
        return chunk[0], dims[0], None
    per_row = torch.tensor(list(zip(chunk, dims)), dtype=torch.int32, device=device)
    return min(chunk), dims[0], per_row


def chunk_logits(query: Tensor, key: Tensor, chunk: int, dims: int, valid: Tensor | None = None,
                 per_row: Tensor | None = None) -> Tensor:
    """Stage 2's approximate logit per (query head, chunk): (B, Hkv, G, C) float32, -inf for a
    chunk with no live slot, as reference.chunk_logits.

    valid: None or (B, n) uint8, 0 for masked slots (batch stride may be 0). per_row: None, or
    each row's (chunk, dims) (`row_plans`; `chunk` is then the smallest).
    """
    B, Hkv, n, D = key.shape
    G = query.shape[1] // Hkv
    chunks = triton.cdiv(n, chunk)
    logits = torch.empty(B, Hkv, G, chunks, device=key.device, dtype=torch.float32)
    BLOCK_D = triton.next_power_of_2(D)
    wrap_triton(_chunk_logits_kernel)[(B * Hkv, _chunk_programs(B * Hkv, chunks, key.device))](
        query, key, valid if valid is not None else key,
        per_row if per_row is not None else key, logits,
        n, chunk, chunks, dims, Hkv,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), key.stride(2),
        valid.stride(0) if valid is not None else 0,
        G=G, G_PAD=_group_rows(G), D=D, BLOCK_D=BLOCK_D,
        HAS_VALID=valid is not None, PER_ROW=per_row is not None, FROM_HEADER=False, STORED=0,
        CHUNK=0, DIMS=0, HEAD_BOUNDS=False, **CHUNK_LOGITS, **_codes(None, None))
    return logits


def select_slots(logits: Tensor, n: int, chunk: int, topk: int, valid: Tensor | None = None,
                 per_row: Tensor | None = None) -> Tensor:
    """The top min(topk, n) slots by stage-2 score, ties to the earlier slot, in slot order:
    (B, Hkv, k) int32. One program per KV head holds all its chunk scores in registers."""
    B, Hkv, G, chunks = logits.shape
    k = min(topk, n)
    slots = torch.empty(B, Hkv, k, device=logits.device, dtype=torch.int32)
    BLOCK_C = max(triton.next_power_of_2(chunks), 16)
    wrap_triton(_select_kernel)[(B * Hkv,)](
        logits, valid if valid is not None else logits,
        per_row if per_row is not None else logits, slots, n, chunk, chunks, k, Hkv,
        valid.stride(0) if valid is not None else 0,
        G=G, G_ROWS=_group_rows(G), BLOCK_C=BLOCK_C,
        HAS_VALID=valid is not None, PER_ROW=per_row is not None, FROM_HEADER=False, STORED=0,
        CHUNK=0, CODED=0, TOPK=0, **_selection_launch(BLOCK_C, chunks_on_device=False))
    return slots


def sparse_attention(query: Tensor, key: Tensor, value: Tensor, slots: Tensor, scale: float,
                     valid: Tensor | None = None) -> Tensor:
    """Exact attention of each GQA group over its selected live slots: (B, Hq, 1, Dv)."""
    return _split_attention(query, key, value, scale, slots.shape[-1], slots, valid)


def packed_exact_decode(query: Tensor, keys: Tensor, values: Tensor, scale: float,
                        bits: int | None = None, group: int | None = None) -> Tensor:
    """Exact attention over every stored token of a packed layer's rows, each row's count read
    from its header: flash-decoding that reads exactly the stored tokens, as
    cache_ops.exact_attention computes it (B, Hq, 1, Dv). `bits`, `group`: the policy's
    kv_bits and kv_group_size, for a quantized layer (its codes dequantized in registers)."""
    query, key, value, header = _packed_inputs(query, keys, values)
    return _split_attention(query, key, value, scale, _most_tokens(key, bits), None, None,
                            header=header, bits=bits, group=group)


def _codes(bits: int | None, group: int | None) -> dict:
    """The constexprs through which a kernel reads a packed layer's tokens: BITS 0 for a layer
    without codes (the header's code words are 0 there, and are read either way)."""
    return dict(BITS=bits or 0, GROUP=group or 1, CODED=int(S.Word.CODED),
                CODED_CAPACITY=int(S.Word.CODED_CAPACITY), CODE_ROW=int(S.Word.CODE_ROW))


def _most_tokens(key: Tensor, bits: int | None) -> int:
    """The most tokens a packed layer's slot rows can hold (a static bound for launch sizes:
    the kernels read each row's own count): a slot each, or with codes of `bits`, every row's
    bytes as codes."""
    return key.shape[2] if not bits else key.shape[2] * 8 * key.element_size() // bits


def _splits(count, heads: int, device, BLOCK_N: int) -> tuple[int, int]:
    """(splits, slots per split) for `count` slots per KV head over `heads` heads: enough
    programs to fill the GPU, each a whole number of BLOCK_N blocks."""
    splits = max(1, min(triton.cdiv(count, BLOCK_N), triton.cdiv(4 * _sm_count(device), heads)))
    per_split = triton.cdiv(triton.cdiv(count, splits), BLOCK_N) * BLOCK_N
    return triton.cdiv(count, per_split), per_split


def _split_attention(query: Tensor, key: Tensor, value: Tensor, scale: float, count: int,
                     slots: Tensor | None, valid: Tensor | None, header: Tensor | None = None,
                     bits: int | None = None, group: int | None = None) -> Tensor:
    """Flash-decoding over `count` slots per KV head, split over programs so that a few KV
    heads still fill the GPU, then the splits combined: the list `slots` (masked by `valid`),
    or over a packed layer (`header`) the first min(count, tokens) of the list, or with no list
    each row's tokens (`count` at most); `bits`, `group`: a quantized layer's (`_rows`)."""
    B, Hq, _, D = query.shape
    Hkv, n, DV = key.shape[1], key.shape[2], value.shape[-1]
    G = Hq // Hkv
    launch = ATTENTION_CODED if bits else ATTENTION
    splits, per_split = _splits(count, B * Hkv, query.device, launch["BLOCK_N"])
    part_out = torch.empty(B * Hkv * splits * G, DV, device=query.device, dtype=torch.float32)
    part_m = torch.empty(B * Hkv * splits * G, device=query.device, dtype=torch.float32)
    part_l = torch.empty_like(part_m)
    dense = slots is None
    rows = header if header is not None else valid   # read per row: stored count, or mask
    wrap_triton(_sparse_attention_kernel)[(B * Hkv, splits)](
        query, key, value, slots if slots is not None else header,
        rows if rows is not None else slots, part_out, part_m, part_l,
        n, count, per_split, Hkv, scale, splits,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2), rows.stride(0) if rows is not None else 0,
        G=G, G_PAD=_dot_rows(G), D=D, DV=DV, BLOCK_D=_dot_rows(D), BLOCK_DV=_dot_rows(DV),
        **launch,
        HAS_VALID=valid is not None, DENSE=dense, HEADER_COUNT=header is not None and not dense,
        STORED=int(S.Word.STORED), TOPK=int(S.Word.TOPK), **_codes(bits, group))
    out = torch.empty(B, Hq, 1, DV, device=query.device, dtype=query.dtype)
    wrap_triton(_combine_kernel)[(B * Hkv, G)](part_out, part_m, part_l, out, splits, G, DV=DV,
                                               BLOCK_S=max(triton.next_power_of_2(splits), 2),
                                               BLOCK_DV=triton.next_power_of_2(DV))
    return out


def slot_validity(mask: Tensor | None, batch: int, n: int) -> Tensor | None:
    """A boolean mask broadcastable to (B, 1, 1, n), True = attend, as (B, n) uint8 (a mask
    shared by the batch keeps batch stride 0: the kernels index rows by that stride)."""
    if mask is None:
        return None
    return mask[..., -1, :].reshape(-1, n).to(torch.uint8).contiguous().expand(batch, n)


def sparse_decode(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, scale: float,
                  chunk: int | Sequence[int], dims: int | Sequence[int], topk: int) -> Tensor:
    """Stage 2 for one decode step, as reference.sparse_decode (mask: None or boolean; chunk
    and dims: one for every row or one per row)."""
    query, key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))
    valid = slot_validity(mask, key.shape[0], key.shape[2])
    chunk, dims, per_row = row_plans(chunk, dims, key.device)
    logits = chunk_logits(query, key, chunk, dims, valid, per_row)
    slots = select_slots(logits, key.shape[2], chunk, topk, valid, per_row)
    return sparse_attention(query, key, value, slots, scale, valid)


def append_packed(keys: Tensor, values: Tensor, new_key: Tensor, new_value: Tensor) -> None:
    """cache_ops.append for a packed layer with no state region, in one launch: each row's
    token into its next slot, its header's stored and position grown by one."""
    layer = S.unpack(keys, values, False, new_key.dtype)
    k, v, header = layer.keys, layer.values, layer.header
    B, Hkv, slots, D = k.shape
    DV = v.shape[-1]
    wrap_triton(_append_packed_kernel)[(B * Hkv,)](
        k, v, header, new_key, new_value, slots, Hkv,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        header.stride(0), header.stride(1), new_key.stride(0), new_key.stride(1),
        new_value.stride(0), new_value.stride(1),
        STORED=int(S.Word.STORED), POSITION=int(S.Word.POSITION),
        CODE_ROW=int(S.Word.CODE_ROW), D=D, DV=DV,
        BLOCK_D=triton.next_power_of_2(D), BLOCK_DV=triton.next_power_of_2(DV))


def _one_program_per_head(heads: int, k: int) -> bool:
    """Whether one program per KV head should attend to its whole list (the fused kernel), or
    the list be split over programs and combined (two launches more). Measured on the H100
    (decode_attention.py, 2026-12-06, append + stage 2 per layer): fused 51 against 57-62 µs
    at 8 heads x k=128, 93 against 181 at 64 heads x 128, 315 against 576 at 64 heads x 512,
    but 146 against 119 at 8 heads x 512: a long list over few heads wants the split. (Measured
    before attention ran on the tensor cores, d7cd2bb, and before the split path read the
    header, 6ad21c8; not re-measured since.)"""
    return k <= 128 or heads >= 32


def _packed_chunk_logits(query: Tensor, key: Tensor, header: Tensor, lanes: int,
                         bits: int | None, group: int | None, head_bounds: bool = False
                         ) -> Tensor:
    """Chunk logits over a packed layer's rows, each row's tokens, chunk and dims read from its
    header: (B, Hkv, G, lanes) float32, `lanes` at least the chunks of any row (one per token
    where the chunk is only known on the device). `head_bounds`: Quest's bound of each query
    head instead of RocketKV's (HEAD_BOUNDS); `bits`, `group`: a quantized layer's."""
    B, Hkv, slots, D = key.shape
    G = query.shape[1] // Hkv
    logits = torch.empty(B, Hkv, G, lanes, device=key.device, dtype=torch.float32)
    wrap_triton(_chunk_logits_kernel)[(B * Hkv, _chunk_programs(B * Hkv, lanes, key.device))](
        query, key, header, header, logits,
        slots, 1, lanes, 1, Hkv,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), key.stride(2),
        header.stride(0),
        G=G, G_PAD=_group_rows(G), D=D, BLOCK_D=triton.next_power_of_2(D), HAS_VALID=False,
        PER_ROW=False, FROM_HEADER=True, STORED=int(S.Word.STORED), CHUNK=int(S.Word.CHUNK),
        DIMS=int(S.Word.DIMS), HEAD_BOUNDS=head_bounds, **CHUNK_LOGITS, **_codes(bits, group))
    return logits


def _packed_select_attend(query: Tensor, key: Tensor, value: Tensor, header: Tensor,
                          logits: Tensor, listed: int, selecting: int, scale: float,
                          bits: int | None, group: int | None, mass: Tensor | None = None,
                          pages: bool = False, kv_group: int = 1, mean_v: bool = False
                          ) -> Tensor:
    """One program per selecting head (`selecting` per row: KV heads, or Quest's query heads)
    selects from its `logits` row into a list of `listed` slots and attends over it
    (`_packed_select_attend_kernel`; `pages`, `kv_group`, `mean_v`: its PAGES / KV_GROUP /
    MEAN_V, `mass` the scratch MEAN_V needs; `bits`, `group`: a quantized layer's)."""
    B, Hq, DV = key.shape[0], query.shape[1], value.shape[-1]
    G = Hq // selecting   # query heads a selecting head attends for
    lanes = logits.shape[-1]
    selected = torch.empty(B * selecting * listed, device=key.device, dtype=torch.int32)
    out = torch.empty(B, Hq, 1, DV, device=key.device, dtype=query.dtype)
    block_chunks = max(triton.next_power_of_2(lanes), 16)
    wrap_triton(_packed_select_attend_kernel)[(B * selecting,)](
        query, key, value, header, logits, selected, out, mass if mass is not None else logits,
        lanes, listed, selecting, scale,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2), header.stride(0),
        STORED=int(S.Word.STORED), CHUNK=int(S.Word.CHUNK), TOPK=int(S.Word.TOPK), G=G,
        G_PAD=_dot_rows(G),
        D=key.shape[-1], DV=DV, BLOCK_D=_dot_rows(key.shape[-1]), BLOCK_DV=_dot_rows(DV),
        G_ROWS=_group_rows(G), BLOCK_C=block_chunks, PAGES=pages, KV_GROUP=kv_group,
        MEAN_V=mean_v, **PACKED_ATTENTION, **_codes(bits, group),
        **_selection_launch(block_chunks))
    return out


def _packed_inputs(query: Tensor, keys: Tensor, values: Tensor):
    """(query with unit last stride, keys, values, header) of a packed layer."""
    layer = S.unpack(keys, values, False, query.dtype)
    query = query if query.stride(-1) == 1 else query.contiguous()
    return query, layer.keys, layer.values, layer.header


def packed_sparse_decode(query: Tensor, keys: Tensor, values: Tensor, scale: float, topk: int,
                         bits: int | None = None, group: int | None = None) -> Tensor:
    """Stage 2 over a packed layer's stored tokens, each row with the chunk and query dims of
    its header's plan, in two launches: chunk logits (bounds built from the keys; up to one
    chunk per token, since the chunk is read on the device), then per KV head selection and
    attention (`_packed_select_attend_kernel`). A long list over few KV heads is selected by
    one program per KV head, then attended by split programs and combined (four launches;
    `_one_program_per_head`). Every kernel reads the header: no torch op between them. A row
    of more tokens than a selection program holds is selected by torch ops, then attended by
    the split programs (`_selection_in_torch`). `bits`, `group`: a quantized layer's (its
    codes dequantized in registers wherever a kernel reads a key or value)."""
    query, key, value, header = _packed_inputs(query, keys, values)
    B, Hkv = key.shape[:2]
    G = query.shape[1] // Hkv
    tokens = _most_tokens(key, bits)
    logits = _packed_chunk_logits(query, key, header, tokens, bits, group)
    k = min(topk, tokens)
    if tokens > SELECTION_LANES:
        selected, _ = _long_row_selection(logits, header, k)
        return _split_attention(query, key, value, scale, k, selected, None, header, bits, group)
    if _one_program_per_head(B * Hkv, k):
        return _packed_select_attend(query, key, value, header, logits, k, Hkv, scale, bits,
                                     group)
    selected = torch.empty(B * Hkv * k, device=key.device, dtype=torch.int32)
    block_chunks = max(triton.next_power_of_2(tokens), 16)
    wrap_triton(_select_kernel)[(B * Hkv,)](
        logits, header, header, selected, tokens, 1, tokens, k, Hkv, header.stride(0),
        G=G, G_ROWS=_group_rows(G), BLOCK_C=block_chunks, HAS_VALID=False, PER_ROW=False,
        FROM_HEADER=True, STORED=int(S.Word.STORED), CHUNK=int(S.Word.CHUNK),
        CODED=int(S.Word.CODED), TOPK=int(S.Word.TOPK), **_selection_launch(block_chunks))
    return _split_attention(query, key, value, scale, k, selected, None, header, bits, group)


def packed_page_decode(query: Tensor, keys: Tensor, values: Tensor, scale: float, pages: int,
                       page_size: int, bits: int | None = None, group: int | None = None
                       ) -> Tensor:
    """Quest over a packed layer's stored tokens: for each query head, the `pages` pages (runs
    of the row's header chunk, `page_size` tokens) of largest upper bound of q.k, then exact
    attention over their tokens, as `policies.quest.Quest.decode` computes it. Two launches:
    each query head's bound of every page (chunk logits HEAD_BOUNDS, all dims; the bounds
    built from the keys once per KV head, not read from stored page summaries), then one
    program per query head selecting its pages and attending to them. (A logit's softmax
    ranks the pages as the bound does, up to float32 underflow: pages whose probability
    underflows to 0 tie, and are taken in slot order.)"""
    query, key, value, header = _packed_inputs(query, keys, values)
    Hkv, Hq = key.shape[1], query.shape[1]
    # each row's chunk (its header's) is page_size: the lanes are counted by it
    logits = _packed_chunk_logits(query, key, header,
                                  triton.cdiv(_most_tokens(key, bits), page_size), bits, group,
                                  head_bounds=True)
    return _packed_select_attend(query, key, value, header, logits, pages * page_size, Hq,
                                 scale, bits, group, pages=True, kv_group=Hq // Hkv)


def packed_sparq_decode(query: Tensor, keys: Tensor, values: Tensor, scale: float, topk: int,
                        bits: int | None = None, group: int | None = None) -> Tensor:
    """SparQ over a packed layer's stored tokens, as `policies.sparq.SparQ.decode` computes it:
    RocketKV's stage 2 at chunk 1 over the row's r dims (its header's plan: per token,
    q[r] . K[:, r] over SparQ's temperature, the group's mean softmax, the top k), exact
    attention over the k tokens, then mean-value reallocation, a y + (1 - a) mean(V). Two
    launches: chunk logits, then one program per KV head that selects, attends and reallocates
    (`_packed_select_attend_kernel` MEAN_V); past SELECTION_LANES tokens, the selection as
    torch ops, the split attention, and mean(V) as exact attention of a zero query (uniform
    weights over the row's tokens, so codes are read as everywhere else)."""
    query, key, value, header = _packed_inputs(query, keys, values)
    B, Hkv = key.shape[:2]
    tokens = _most_tokens(key, bits)
    logits = _packed_chunk_logits(query, key, header, tokens, bits, group)
    k = min(topk, tokens)
    if tokens > SELECTION_LANES:
        selected, mass = _long_row_selection(logits, header, k, mass=True)
        attended = _split_attention(query, key, value, scale, k, selected, None, header, bits,
                                    group)
        mean_v = _split_attention(query.new_zeros(query.shape, dtype=torch.float32), key, value,
                                  scale, tokens, None, None, header, bits, group)
        a = mass.view(B, -1, 1, 1)
        return (a * attended.float() + (1 - a) * mean_v).to(query.dtype)
    mass = torch.empty(B * query.shape[1], device=key.device, dtype=torch.float32)
    return _packed_select_attend(query, key, value, header, logits, k, Hkv, scale, bits, group,
                                 mass, mean_v=True)


def _long_row_selection(logits: Tensor, header: Tensor, k: int, mass: bool = False):
    """`_select` for rows of more lanes than a selection program holds (SELECTION_LANES;
    `logits` (B, Hkv, G, lanes) with a lane per token, the chunk read from the header): each
    row's top min(k, tokens, topk) slots in slot order, as a (B * Hkv * k) int32 list whose
    entries past those attention skips; with `mass`, also each query head's probability on its
    slots (B * Hq float32; SparQ's a), else None. Three launches: the segments' softmax parts
    (`_segment_softmax_kernel`), their candidates (`_segment_candidates_kernel`), the merge
    (`_merge_candidates_kernel`); by torch ops where the candidates of segments as large as a
    program holds still do not fit one program."""
    B, Hkv, G, lanes = logits.shape
    segment = LONG_SEGMENT
    while triton.cdiv(lanes, segment) * k > MERGE_LANES and segment < MERGE_LANES:
        segment *= 2
    segments = triton.cdiv(lanes, segment)
    if segments * k > MERGE_LANES:
        return _selection_in_torch(logits, header, k, mass)
    G_ROWS = _group_rows(G)
    parts = torch.empty(B * Hkv * segments * 2 * G_ROWS, device=logits.device,
                        dtype=torch.float32)
    candidates = torch.empty(B * Hkv * segments * 2 * k, device=logits.device, dtype=torch.int32)
    selected = torch.empty(B * Hkv * k, device=logits.device, dtype=torch.int32)
    masses = torch.empty(B * Hkv * G if mass else 1, device=logits.device, dtype=torch.float32)
    words = dict(STORED=int(S.Word.STORED), CHUNK=int(S.Word.CHUNK), CODED=int(S.Word.CODED))
    held = max(triton.next_power_of_2(segments), 2)
    wrap_triton(_segment_softmax_kernel)[(B * Hkv, segments)](
        logits, header, parts, lanes, Hkv, header.stride(0), G=G, G_ROWS=G_ROWS,
        SEGMENT=segment, num_warps=_selection_launch(segment)["num_warps"], **words)
    launch = _selection_launch(segment, chunks_on_device=False)
    wrap_triton(_segment_candidates_kernel)[(B * Hkv, segments)](
        logits, header, parts, candidates, lanes, k, Hkv, header.stride(0), G=G,
        G_ROWS=G_ROWS, SEGMENT=segment, SEGMENTS=held, RADIX=launch["RADIX"],
        num_warps=launch["num_warps"], TOPK=int(S.Word.TOPK), **words)
    pool = max(triton.next_power_of_2(segments * k), 16)
    launch = _selection_launch(pool, chunks_on_device=False)
    wrap_triton(_merge_candidates_kernel)[(B * Hkv,)](
        logits, header, parts, candidates, selected, masses, lanes, k, segments, Hkv,
        header.stride(0), G=G, G_ROWS=G_ROWS, CANDIDATES=pool, SEGMENTS=held,
        RADIX=launch["RADIX"], MASS=mass, num_warps=launch["num_warps"],
        TOPK=int(S.Word.TOPK), **words)
    return selected, masses if mass else None


def _selection_in_torch(logits: Tensor, header: Tensor, k: int, mass: bool = False):
    """`_long_row_selection` as torch ops: each row's top min(k, tokens, topk)
    slots (topk its header's) by the group's mean softmax over tokens (a token scores its
    chunk's, the chunk from the header), ties to the earlier slot (a stable sort), in slot
    order, as a (B * Hkv * k) int32 list whose entries past those attention skips. With
    `mass`, also each query head's probability on its slots (B * Hq float32; SparQ's a), else
    None."""
    B, Hkv, G, slots = logits.shape
    stored = header[:, 0, S.Word.STORED].long() + header[:, 0, S.Word.CODED].long()
    chunk = header[:, 0, S.Word.CHUNK].long()
    token = torch.arange(slots, device=logits.device)
    live = token[None] < stored[:, None]                                       # (B, slots)
    of_chunk = (token[None] // chunk[:, None]).clamp(max=slots - 1)
    logit = logits.gather(-1, of_chunk[:, None, None].expand(B, Hkv, G, slots))
    logit = logit.masked_fill(~live[:, None, None], float("-inf"))
    probability = torch.softmax(logit, -1).nan_to_num(0.0)   # a row with no slot: all 0
    score = probability.sum(2).div(G).masked_fill(~live[:, None], -1.0)
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices[..., :k]
    # past the row's topk: a slot past every row's tokens, sorted last, which attention skips
    kept = (torch.arange(k, device=logits.device) < header[:, 0, S.Word.TOPK, None])[:, None]
    selected = order.masked_fill(~kept, slots).sort(-1).values
    if not mass:
        return selected.to(torch.int32).reshape(-1), None
    taken = torch.zeros_like(score, dtype=torch.bool).scatter(-1, order, kept.expand_as(order)) \
        & live[:, None]
    return (selected.to(torch.int32).reshape(-1),
            (probability * taken[:, :, None]).sum(-1).reshape(-1))
