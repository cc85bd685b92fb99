"""A candidate for triton_decode._attend_tiles, measured by kv_codes_variants.py's
`split-values` variant before it is taken into the library (issue 22: 4-bit decode slower than
8-bit and than bf16).

At 8 bits Triton stages a tile's value codes through shared memory as bytes and dequantizes
them in the tensor cores' operand layout; at 4 bits `_unpack`'s interleave stops that, so the
tile is dequantized first and its bf16 numbers go through shared memory instead (the kernels'
TTGIR for sm_90, compiled on the CPU). Here the nibbles are never interleaved: each half of a
value tile is an elementwise function of the loaded bytes, with an accumulator of its own.
With SPLIT_KEYS (the `split-both` variant) a key tile's halves are not interleaved either:
the query is split into its even and odd channels once, and a tile's logits are the sum of
the two halves' products.
"""
import triton
import triton.language as tl

from rkv_compile.kernels.triton_decode import CODE_TILE, _rows, _spread
from rkv_compile.kernels.triton_decode import _attend_tiles as _attend_tiles_as_is

SPLIT_KEYS: tl.constexpr = tl.constexpr(False)   # set by kv_codes_variants.py's split-both


@triton.jit
def _attend_tiles_split_values(q, m, l, acc, k_ptr, v_ptr, idx_ptr, valid_ptr, k_base, v_base, b,
                               n, start, stop, scale, stride_kn, stride_vn, stride_validb,
                               D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr,
                               BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr,
                               HAS_VALID: tl.constexpr, DENSE: tl.constexpr, coded, capacity,
                               code_row, BITS: tl.constexpr, GROUP: tl.constexpr,
                               TOKENS: tl.constexpr):
    """`_attend_tiles`, but a tile of 4-bit value codes is never unpacked: a byte's low
    nibbles are the even channels and its high nibbles the odd ones, each dequantized where it
    is (an elementwise function of the loaded bytes, which Triton can move after the tile's
    trip through shared memory, as it does for 8-bit codes) and multiplied into an accumulator
    of its own; the two are interleaved once, after the loop."""
    if BITS == 4 and TOKENS == CODE_TILE and DV == BLOCK_DV and DV % 2 == 0:
        HALF: tl.constexpr = BLOCK_DV // 2
        GROUPS: tl.constexpr = (DV + GROUP - 1) // GROUP
        acc_even, acc_odd = tl.split(tl.reshape(acc, (acc.shape[0], HALF, 2)))
        d = tl.arange(0, BLOCK_D)
        j = tl.arange(0, HALF)
        ITEMSIZE: tl.constexpr = v_ptr.dtype.element_ty.primitive_bitwidth // 8
        region = (v_base + code_row * stride_vn) * ITEMSIZE
        bytes_ptr = v_ptr.to(tl.pointer_type(tl.uint8)) + region
        steps = v_ptr.to(tl.pointer_type(tl.float16)) + (region + capacity * DV // 2) // 2
        HALF_D: tl.constexpr = BLOCK_D // 2
        jd = tl.arange(0, HALF_D)
        k_region = (k_base + code_row * stride_kn) * ITEMSIZE
        k_bytes_ptr = k_ptr.to(tl.pointer_type(tl.uint8)) + k_region
        k_steps = k_ptr.to(tl.pointer_type(tl.float16)) + (k_region + capacity * D // 2) // 2
        q_even, q_odd = tl.split(tl.reshape(q, (q.shape[0], HALF_D, 2)))
        for base in range(start, stop, BLOCK_N):
            i = base + tl.arange(0, BLOCK_N)
            ok = i < stop
            if DENSE:
                slot = i
            else:
                slot = tl.load(idx_ptr + i, mask=ok, other=0)
            ok &= slot < n
            if HAS_VALID:
                ok &= tl.load(valid_ptr + b * stride_validb + slot, mask=ok, other=0) != 0
            if SPLIT_KEYS and D == BLOCK_D and (GROUP % BLOCK_N == 0 or BLOCK_N % GROUP == 0):
                k_even, k_odd = _key_halves(k_bytes_ptr, k_steps, slot, ok, jd, capacity, D,
                                            GROUP, k_ptr.dtype.element_ty)
                s = tl.dot(q_even, tl.trans(k_even), input_precision="ieee")
                s = tl.dot(q_odd, tl.trans(k_odd), s, input_precision="ieee")
            else:
                k = _rows(k_ptr, k_base, slot, ok, d, d < D, stride_kn, coded, capacity,
                          code_row, D, BITS, GROUP, True, TOKENS)
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            s = (s * scale).to(tl.float32)
            s = tl.where(ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m - m_use)
            p = tl.exp(s - m_use[:, None])
            byte = tl.load(bytes_ptr + slot[:, None] * HALF + j[None, :], mask=ok[:, None],
                           other=0).to(tl.int32)
            if GROUPS > 1 and GROUPS * GROUP == BLOCK_DV and GROUP % 2 == 0:
                # a group's step and zero cover GROUP / 2 columns of each half: one load each
                # per token and group, spread in registers (as `_dequantized` does)
                at = slot[:, None] * GROUPS + tl.arange(0, GROUPS)[None, :]
                step = _spread(tl.load(steps + at, mask=ok[:, None], other=0.0), GROUP // 2,
                               False)
                zero = _spread(tl.load(steps + capacity * GROUPS + at, mask=ok[:, None],
                                       other=0.0), GROUP // 2, False)
                v_even = ((byte & 15).to(tl.float32) * step + zero).to(v_ptr.dtype.element_ty)
                v_odd = ((byte >> 4).to(tl.float32) * step + zero).to(v_ptr.dtype.element_ty)
            else:
                v_even = _half(byte & 15, slot[:, None] * GROUPS + (2 * j // GROUP)[None, :],
                               steps, capacity * GROUPS, ok, v_ptr.dtype.element_ty)
                v_odd = _half(byte >> 4, slot[:, None] * GROUPS + ((2 * j + 1) // GROUP)[None, :],
                              steps, capacity * GROUPS, ok, v_ptr.dtype.element_ty)
            acc_even = acc_even * alpha[:, None]
            acc_odd = acc_odd * alpha[:, None]
            p_head = p.to(v_ptr.dtype.element_ty)
            p_tail = (p - p_head.to(tl.float32)).to(v_ptr.dtype.element_ty)
            acc_even = tl.dot(p_tail, v_even, tl.dot(p_head, v_even, acc_even))
            acc_odd = tl.dot(p_tail, v_odd, tl.dot(p_head, v_odd, acc_odd))
            l = l * alpha + tl.sum(p, axis=1)
            m = m_new
        acc = tl.reshape(tl.join(acc_even, acc_odd), (acc.shape[0], BLOCK_DV))
    else:
        m, l, acc = _attend_tiles_as_is(q, m, l, acc, k_ptr, v_ptr, idx_ptr, valid_ptr, k_base,
                                        v_base, b, n, start, stop, scale, stride_kn, stride_vn,
                                        stride_validb, D, DV, BLOCK_D, BLOCK_DV, BLOCK_N,
                                        HAS_VALID, DENSE, coded, capacity, code_row, BITS,
                                        GROUP, TOKENS)
    return m, l, acc


@triton.jit
def _half(codes, at, steps, zeros_at, ok, dtype: tl.constexpr):
    """One half's codes dequantized with the step and zero of each one's group (`at`: their
    index among the steps; the zeros follow the steps at `zeros_at`), as `_dequantized` does."""
    step = tl.load(steps + at, mask=ok[:, None], other=0.0).to(tl.float32)
    zero = tl.load(steps + zeros_at + at, mask=ok[:, None], other=0.0).to(tl.float32)
    return (codes.to(tl.float32) * step + zero).to(dtype)


@triton.jit
def _key_halves(bytes_ptr, steps, slot, ok, j, capacity, D: tl.constexpr, GROUP: tl.constexpr,
                dtype: tl.constexpr):
    """A tile of 4-bit key codes (consecutive slots from a multiple of the tile's size) as its
    even and odd channels, each dequantized where it lies in the loaded bytes with its
    channels' steps and zeros (one row per key group the tile spans, spread down its tokens,
    as `_dequantized` does)."""
    N: tl.constexpr = slot.shape[0]
    TILE_GROUPS: tl.constexpr = (N + GROUP - 1) // GROUP
    byte = tl.load(bytes_ptr + slot[:, None] * (D // 2) + j[None, :], mask=ok[:, None],
                   other=0).to(tl.int32)
    group = tl.min(slot, axis=0) // GROUP + tl.arange(0, TILE_GROUPS)
    group_ok = (group < capacity // GROUP)[:, None]
    at = group[:, None] * D + 2 * j[None, :]
    zeros = steps + capacity // GROUP * D
    step_even = _spread(tl.load(steps + at, mask=group_ok, other=0.0), N // TILE_GROUPS, True)
    zero_even = _spread(tl.load(zeros + at, mask=group_ok, other=0.0), N // TILE_GROUPS, True)
    step_odd = _spread(tl.load(steps + at + 1, mask=group_ok, other=0.0), N // TILE_GROUPS, True)
    zero_odd = _spread(tl.load(zeros + at + 1, mask=group_ok, other=0.0), N // TILE_GROUPS, True)
    even = ((byte & 15).to(tl.float32) * step_even + zero_even).to(dtype)
    odd = ((byte >> 4).to(tl.float32) * step_odd + zero_odd).to(dtype)
    return even, odd
