"""The Triton stage-1 kernels against the PyTorch reference.

On the CPU they run in Triton's interpreter (TRITON_INTERPRET=1, set in conftest.py) in float32,
float16 and bfloat16 at small shapes; on a CUDA machine the same tests run on the GPU at long
prompts:
    python3 -m pytest -q tests/test_triton_compress.py
"""
from __future__ import annotations

import torch
from devices import CUDA, DEVICE, DTYPES, GPU_EXAMPLES, relative_error
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from test_reference import _clear_boundary, _ranked

from rkv_compile.kernels import reference as R
from rkv_compile.kernels import triton_compress as T

# Against float64 on the same rounded inputs. Half-precision products are exact in float32, but
# tensor cores (fp16/bf16 on the GPU) accumulate them a little less exactly than float32 FMAs.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-4}
SETTINGS = settings(deadline=None, max_examples=GPU_EXAMPLES if CUDA else 10)


@st.composite
def stage1_cases(draw, small=not CUDA):
    B = draw(st.integers(1, 3))
    Hkv = draw(st.integers(1, 4))
    G = draw(st.integers(1, 8))
    D = draw(st.sampled_from([64, 80, 96, 128] + ([] if small else [256])))
    w = draw(st.one_of(st.just(32), st.integers(1, 64)))
    n = w + draw(st.integers(1, 160 if small else 5000))
    keep = draw(st.integers(1, n - w + 8))
    kernel_size = draw(st.sampled_from([1, 3, 7, 63]))
    scale = D**-0.5 * draw(st.sampled_from([1.0, 0.5, 3.0]))
    # HF attention hands over (B, S, H, D) transposed to (B, H, S, D): strided heads
    transposed = draw(st.booleans())
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**16))
    return B, Hkv, G, D, w, n, keep, kernel_size, scale, transposed, dtype, seed


def _inputs(B, Hkv, G, D, w, n, transposed, dtype, seed):
    """query_window (the last w of 2w prompt queries), key, value."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(B, Hkv * G, 2 * w, D), (B, Hkv, n, D), (B, Hkv, n, D)]
    if transposed:
        q, k, v = (torch.randn(s[0], s[2], s[1], s[3], generator=gen).transpose(1, 2)
                   for s in shapes)
    else:
        q, k, v = (torch.randn(*s, generator=gen) for s in shapes)
    q, k, v = (t.to(DEVICE, dtype) for t in (q, k, v))
    return q[:, :, w:], k, v


@SETTINGS
@given(case=stage1_cases())
def test_window_stats_match_reference(case):
    """Pass 1 alone: each window query's log-sum-exp over the keys it sees."""
    B, Hkv, G, D, w, n, _, _, scale, transposed, dtype, seed = case
    q, k, _ = _inputs(B, Hkv, G, D, w, n, transposed, dtype, seed)
    lse = T.window_stats(q, k, scale)
    q64 = q.double().reshape(B, Hkv, G, w, D)
    logits = torch.einsum("bhgwd,bhnd->bhgwn", q64, k.double())
    causal = torch.ones(w, n, dtype=torch.bool, device=k.device).tril(n - w)
    want = (logits * scale).masked_fill(~causal, float("-inf")).logsumexp(-1).flatten(1, 2)
    assert lse.shape == (B, Hkv * G, w) and lse.dtype == torch.float32
    torch.testing.assert_close(lse.double(), want, rtol=0, atol=1e-5)


@SETTINGS
@given(case=stage1_cases())
def test_snapkv_votes_match_reference(case):
    B, Hkv, G, D, w, n, _, kernel_size, scale, transposed, dtype, seed = case
    q, k, _ = _inputs(B, Hkv, G, D, w, n, transposed, dtype, seed)
    want = R.snapkv_votes(q.double(), k.double(), None, scale, kernel_size)
    got = T.snapkv_votes(q, k, scale, kernel_size)
    assert got.shape == (B, Hkv, n - w) and got.dtype == torch.float32
    assert relative_error(got, want) < TOLERANCE[dtype]


@SETTINGS
@given(case=stage1_cases())
def test_compress_matches_reference(case):
    """Bit-identical caches wherever no rounding-level near-tie decides the kept set."""
    B, Hkv, G, D, w, n, keep, kernel_size, scale, transposed, dtype, seed = case
    q, k, v = _inputs(B, Hkv, G, D, w, n, transposed, dtype, seed)
    ref_votes = R.snapkv_votes(q, k, None, scale, kernel_size)
    rows = ref_votes.flatten(0, 1).tolist()
    assume(all(_clear_boundary(row, _ranked(row), keep) for row in rows))
    want_idx = R.keep_indices(ref_votes, keep)
    assert torch.equal(R.keep_indices(T.snapkv_votes(q, k, scale, kernel_size), keep), want_idx)
    want_k, want_v = R.compress(q, k, v, None, scale, keep, kernel_size)
    got_k, got_v = T.compress(q, k, v, scale, keep, kernel_size)
    assert got_k.is_contiguous() and got_v.is_contiguous()
    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)


def test_no_prefix_keeps_the_window():
    """n == w: nothing to score or evict; the caches are the window itself."""
    q, k, v = _inputs(2, 2, 3, 64, 8, 8, False, torch.float32, 0)
    assert T.snapkv_votes(q, k, 0.125, 7).shape == (2, 2, 0)
    got_k, got_v = T.compress(q, k, v, 0.125, 4, 7)
    assert torch.equal(got_k, k) and torch.equal(got_v, v)


def test_single_query_head_votes_are_attention_probabilities():
    """w = 1, G = 1, no pooling: the votes are the last query's softmax over the prefix."""
    q, k, _ = _inputs(1, 1, 1, 64, 1, 100, False, torch.float32, 1)
    want = torch.softmax((q[0, 0, 0] @ k[0, 0].T) * 0.125, dim=-1)[:-1]
    torch.testing.assert_close(T.snapkv_votes(q, k, 0.125, 1)[0, 0], want, rtol=1e-5, atol=1e-8)
