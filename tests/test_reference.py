"""The pure-PyTorch RocketKV reference against loop oracles written from the paper's definitions.

The oracles below loop over batch, KV head, query head and token and use plain per-row torch math
or Python floats (float64); they call nothing from rkv_compile. Selections follow the stable rule
of the reference (ties: earlier position first). Random inputs make accidental near-ties between
different scores unlikely; an example where one sits right at a selection boundary is discarded
(the two implementations round differently), while exact ties by design (max-pool plateaus, the
tokens of one chunk) must be resolved identically.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import rkv_compile.kernels  # noqa: F401  (registers torch.ops.rocketkv)
from rkv_compile import state as S
from rkv_compile.kernels import reference as R
from rkv_compile.policies import POLICIES, from_spec

SETTINGS = settings(deadline=None, max_examples=30)
NEAR_TIE = 1e-4  # relative gap under which two different scores count as a rounding-level tie

NEG_INF = float("-inf")


def _ranked(scores: list[float]) -> list[int]:
    """Positions by descending score, earlier position first among equal scores."""
    return sorted(range(len(scores)), key=lambda j: (-scores[j], j))


def _clear_boundary(scores: list[float], ranking: list[int], k: int) -> bool:
    """False when the top-k set hangs on a rounding-level difference between two scores.

    The set is decided by the distinct score values from just above the k-th best to just below
    the (k+1)-th best (a boundary inside a chunk's run of equal scores depends on which chunk
    lands there): each neighbouring pair of those must differ by more than rounding.
    """
    if k >= len(ranking) or k == 0:
        return True
    distinct = sorted(set(scores), reverse=True)
    first = distinct.index(scores[ranking[k - 1]])
    last = distinct.index(scores[ranking[k]])
    span = distinct[max(first - 1, 0): last + 2]
    return all(math.isinf(a) or math.isinf(b) or (a - b) > NEAR_TIE * max(abs(a), abs(b))
               for a, b in zip(span, span[1:]))


def _softmax(xs: list[float]) -> list[float]:
    finite = [x for x in xs if x != NEG_INF]
    if not finite:
        return [0.0] * len(xs)
    m = max(finite)
    es = [0.0 if x == NEG_INF else math.exp(x - m) for x in xs]
    s = sum(es)
    return [e / s for e in es]


# ---------------------------------------------------------------------------------------------
# oracles

def oracle_compress(qw, key, value, scale, keep, kernel_size):
    """SnapKV++ eviction by the definition. Returns (k, v, votes (float64), index lists, clear)."""
    B, Hq, w, D = qw.shape
    _, Hkv, n, _ = key.shape
    G = Hq // Hkv
    P = n - w
    q64, k64 = qw.double(), key.double()
    out_k = torch.empty(B, Hkv, keep + w, D, dtype=key.dtype)
    out_v = torch.empty(B, Hkv, keep + w, value.shape[-1], dtype=value.dtype)
    all_votes = torch.empty(B, Hkv, P, dtype=torch.float64)
    kept, clear = [], True
    for b in range(B):
        for h in range(Hkv):
            votes = [0.0] * P
            for g in range(G):
                qh = h * G + g
                for i in range(w):
                    last = n - w + i                           # the query's own position
                    logits = [NEG_INF] * n
                    for j in range(last + 1):
                        logits[j] = float(torch.dot(q64[b, qh, i], k64[b, h, j])) * scale
                    probs = _softmax(logits)
                    for j in range(P):
                        votes[j] += probs[j]
            r = kernel_size // 2
            pooled = [max(votes[max(0, j - r): min(P, j + r + 1)]) for j in range(P)]
            all_votes[b, h] = torch.tensor(pooled, dtype=torch.float64)
            ranking = _ranked(pooled)
            clear = clear and _clear_boundary(pooled, ranking, keep)
            idx = sorted(ranking[:keep])
            kept.append(idx)
            for slot, j in enumerate(idx + list(range(P, n))):
                out_k[b, h, slot] = key[b, h, j]
                out_v[b, h, slot] = value[b, h, j]
    return out_k, out_v, all_votes, kept, clear


def oracle_decode(q, key, value, valid, scale, chunk, dims, topk):
    """Hybrid sparse attention of one decode query per head, by the definition.

    valid: None or a (B, n) list of lists of bools (False = masked slot).
    Returns (output float64, scores (B, Hkv, n) float64, selected index lists, clear).
    """
    B, Hq, _, D = q.shape
    _, Hkv, n, _ = key.shape
    G = Hq // Hkv
    Dv = value.shape[-1]
    out = torch.zeros(B, Hq, 1, Dv, dtype=torch.float64)
    all_scores = torch.zeros(B, Hkv, n, dtype=torch.float64)
    selected, clear = [], True
    for b in range(B):
        ok = [True] * n if valid is None else list(valid[b])
        for h in range(Hkv):
            qs = [q[b, h * G + g, 0].double().tolist() for g in range(G)]
            K = key[b, h].double().tolist()
            plus = [sum(qs[g][d] for g in range(G)) >= 0 for d in range(D)]
            mean_abs = [sum(abs(qs[g][d]) for g in range(G)) / G for d in range(D)]
            dim_rank = _ranked(mean_abs)
            clear = clear and _clear_boundary(mean_abs, dim_rank, dims)
            chosen = dim_rank[:dims]
            # per chunk: the bound of each chosen dim over the chunk's unmasked slots
            n_chunks = (n + chunk - 1) // chunk
            bounds = []
            for c in range(n_chunks):
                slots = [t for t in range(c * chunk, min((c + 1) * chunk, n)) if ok[t]]
                if not slots:
                    bounds.append(None)
                    continue
                bounds.append({d: (max if plus[d] else min)(K[t][d] for t in slots)
                               for d in chosen})
            scores = [0.0] * n
            for g in range(G):
                temperature = math.sqrt(D * sum(abs(qs[g][d]) for d in chosen)
                                        / sum(abs(x) for x in qs[g]))
                chunk_logit = [None if bd is None else
                               sum(qs[g][d] * bd[d] for d in chosen) / temperature
                               for bd in bounds]
                logits = [chunk_logit[t // chunk] if ok[t] else NEG_INF for t in range(n)]
                for t, p in enumerate(_softmax(logits)):
                    scores[t] += p / G
            all_scores[b, h] = torch.tensor(scores, dtype=torch.float64)
            ranking = _ranked(scores)
            k = min(topk, n)
            clear = clear and _clear_boundary(scores, ranking, k)
            sel = ranking[:k]
            selected.append(sorted(sel))
            # exact attention over the selected, unmasked tokens
            use = [t for t in sel if ok[t]]
            for g in range(G):
                qrow = q[b, h * G + g, 0].double()
                logits = [float(torch.dot(qrow, key[b, h, t].double())) * scale for t in use]
                acc = torch.zeros(Dv, dtype=torch.float64)
                for t, p in zip(use, _softmax(logits)):
                    acc += p * value[b, h, t].double()
                out[b, h * G + g, 0] = acc
    return out, all_scores, selected, clear


# ---------------------------------------------------------------------------------------------
# shapes

@st.composite
def heads(draw):
    G = draw(st.integers(1, 8))
    Hkv = draw(st.integers(1, 2))
    B = draw(st.integers(1, 2))
    D = draw(st.sampled_from([64, 80, 96, 128]))
    seed = draw(st.integers(0, 2**31 - 1))
    return B, Hkv, G, D, seed


@st.composite
def stage1_cases(draw):
    B, Hkv, G, D, seed = draw(heads())
    w = draw(st.sampled_from([4, 8, 32]))
    n = w + draw(st.integers(1, 70))
    keep = draw(st.integers(1, n - w))
    kernel_size = draw(st.sampled_from([1, 3, 7, 63]))
    scale = D**-0.5 * draw(st.sampled_from([1.0, 0.5, 3.0]))
    return B, Hkv, G, D, seed, w, n, keep, kernel_size, scale


@st.composite
def stage2_cases(draw):
    B, Hkv, G, D, seed = draw(heads())
    w = draw(st.sampled_from([4, 8, 32]))
    n = w + draw(st.integers(1, 70))
    chunk = draw(st.integers(1, 4))
    topk = draw(st.integers(1, n + 3))
    dims = draw(st.one_of(st.integers(1, D), st.just(D)))
    scale = D**-0.5 * draw(st.sampled_from([1.0, 0.5, 3.0]))
    return B, Hkv, G, D, seed, n, chunk, topk, dims, scale


def _tensors(seed, *shapes, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=gen).to(dtype) for s in shapes]


def _valid_mask(seed, B, n, chunk):
    """A random (B, 1, 1, n) boolean mask with some masked slots (whole chunks too), never all."""
    gen = torch.Generator().manual_seed(seed + 1)
    mask = torch.rand(B, 1, 1, n, generator=gen) > 0.4
    n_chunks = (n + chunk - 1) // chunk
    for b in range(B):
        dead = int(torch.randint(0, n_chunks, (1,), generator=gen))   # one whole chunk masked
        mask[b, 0, 0, dead * chunk:(dead + 1) * chunk] = False
        if not mask[b].any():
            mask[b, 0, 0, int(torch.randint(0, n, (1,), generator=gen))] = True
    return mask


# ---------------------------------------------------------------------------------------------
# stage 1

@SETTINGS
@given(case=stage1_cases())
def test_compress_matches_oracle(case):
    B, Hkv, G, D, seed, w, n, keep, kernel_size, scale = case
    qw, k, v = _tensors(seed, (B, Hkv * G, w, D), (B, Hkv, n, D), (B, Hkv, n, D))
    ok, ov, ovotes, kept, clear = oracle_compress(qw, k, v, scale, keep, kernel_size)
    votes = R.snapkv_votes(qw, k, None, scale, kernel_size)
    assert votes.shape == (B, Hkv, n - w) and votes.dtype == torch.float32
    torch.testing.assert_close(votes.double(), ovotes, rtol=2e-5, atol=1e-6)
    assume(clear)
    idx = R.keep_indices(votes, keep)
    assert idx.tolist() == [kept[b * Hkv:(b + 1) * Hkv] for b in range(B)]
    rk, rv = R.compress(qw, k, v, None, scale, keep, kernel_size)
    assert rk.shape == (B, Hkv, keep + w, D) and rk.is_contiguous() and rv.is_contiguous()
    torch.testing.assert_close(rk, ok, rtol=0, atol=0)
    torch.testing.assert_close(rv, ov, rtol=0, atol=0)


def test_compress_plateau_ties_keep_earlier_positions():
    """A wide max-pool makes long plateaus of equal votes: the earliest positions win."""
    torch.manual_seed(0)
    B, Hkv, G, D, w, n = 1, 1, 2, 64, 4, 40
    qw, k, v = torch.randn(B, Hkv * G, w, D), torch.randn(B, Hkv, n, D), torch.randn(B, Hkv, n, D)
    for keep in (1, 5, 17, n - w):
        ok, ov, ovotes, kept, _ = oracle_compress(qw, k, v, D**-0.5, keep, 63)
        rk, rv = R.compress(qw, k, v, None, D**-0.5, keep, 63)
        assert kept[0] == list(range(keep))   # every vote equals the global max
        torch.testing.assert_close(rk, ok, rtol=0, atol=0)
        torch.testing.assert_close(rv, ov, rtol=0, atol=0)


def test_compress_zero_mask_is_no_mask():
    torch.manual_seed(1)
    qw, k, v = torch.randn(2, 6, 8, 64), torch.randn(2, 3, 50, 64), torch.randn(2, 3, 50, 64)
    zeros = torch.zeros(2, 1, 8, 50)
    ones = torch.ones(2, 1, 8, 50, dtype=torch.bool)
    a = R.compress(qw, k, v, None, 0.125, 20, 7)
    for mask in (zeros, ones):
        b = R.compress(qw, k, v, mask, 0.125, 20, 7)
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# stage 2

def _check_decode(q, k, v, mask, valid, scale, chunk, dims, topk, in_hypothesis=True):
    B, Hkv = k.shape[:2]
    out_o, scores_o, sel_o, clear = oracle_decode(q, k, v, valid, scale, chunk, dims, topk)
    scores = R.approximate_scores(q, k, mask, chunk, dims)
    assert scores.shape == (B, Hkv, k.shape[2]) and scores.dtype == torch.float32
    torch.testing.assert_close(scores.double(), scores_o, rtol=1e-4, atol=1e-7)
    if in_hypothesis:
        assume(clear)
    else:
        assert clear
    sel = R.select_tokens(scores, topk).sort(dim=-1).values
    assert sel.tolist() == [sel_o[b * Hkv:(b + 1) * Hkv] for b in range(B)]
    out = R.sparse_decode(q, k, v, mask, scale, chunk, dims, topk)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    torch.testing.assert_close(out, out_o.float(), rtol=1e-5, atol=1e-5)
    return out


@SETTINGS
@given(case=stage2_cases())
def test_sparse_decode_matches_oracle(case):
    B, Hkv, G, D, seed, n, chunk, topk, dims, scale = case
    q, k, v = _tensors(seed, (B, Hkv * G, 1, D), (B, Hkv, n, D), (B, Hkv, n, D))
    _check_decode(q, k, v, None, None, scale, chunk, dims, topk)


@SETTINGS
@given(case=stage2_cases())
def test_sparse_decode_boolean_mask_matches_oracle(case):
    B, Hkv, G, D, seed, n, chunk, topk, dims, scale = case
    q, k, v = _tensors(seed, (B, Hkv * G, 1, D), (B, Hkv, n, D), (B, Hkv, n, D))
    mask = _valid_mask(seed, B, n, chunk)
    valid = mask[:, 0, 0].tolist()
    out = _check_decode(q, k, v, mask, valid, scale, chunk, dims, topk)
    # the same mask as an additive float mask
    additive = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(R.sparse_decode(q, k, v, additive, scale, chunk, dims, topk), out,
                               rtol=0, atol=0)
    # masked slots take no part: changing their keys and values changes nothing
    k2, v2 = k.clone(), v.clone()
    dead = ~mask[:, 0, 0]                                            # B n
    k2.masked_scatter_(dead[:, None, :, None].expand_as(k2), 100 * torch.randn(k2.shape))
    v2.masked_scatter_(dead[:, None, :, None].expand_as(v2), 100 * torch.randn(v2.shape))
    torch.testing.assert_close(R.sparse_decode(q, k2, v2, mask, scale, chunk, dims, topk), out,
                               rtol=0, atol=0)


@settings(deadline=None, max_examples=25)
@given(case=stage2_cases())
def test_sparse_decode_zero_mask_is_no_mask(case):
    B, Hkv, G, D, seed, n, chunk, topk, dims, scale = case
    q, k, v = _tensors(seed, (B, Hkv * G, 1, D), (B, Hkv, n, D), (B, Hkv, n, D))
    a = R.sparse_decode(q, k, v, None, scale, chunk, dims, topk)
    for mask in (torch.zeros(B, 1, 1, n), torch.ones(B, 1, 1, n, dtype=torch.bool)):
        b = R.sparse_decode(q, k, v, mask, scale, chunk, dims, topk)
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_sparse_decode_chunk_ties_keep_earlier_slots():
    """Tokens of a chunk share one score; a top-k boundary inside a chunk keeps its first slots."""
    torch.manual_seed(2)
    B, Hkv, G, D, n, chunk = 1, 2, 3, 64, 23, 4
    q, k, v = torch.randn(B, Hkv * G, 1, D), torch.randn(B, Hkv, n, D), torch.randn(B, Hkv, n, D)
    for topk in (1, 2, 3, 5, 10, 22):
        out_o, scores_o, sel_o, clear = oracle_decode(q, k, v, None, 0.125, chunk, 16, topk)
        assert clear
        scores = R.approximate_scores(q, k, None, chunk, 16)
        sel = R.select_tokens(scores, topk)
        assert sel.sort(-1).values.tolist()[0] == sel_o
        for h in range(Hkv):      # chunk mates share one score exactly
            s = scores[0, h].view(-1)
            for c in range(0, n, chunk):
                assert (s[c:c + chunk] == s[c]).all()
        torch.testing.assert_close(R.sparse_decode(q, k, v, None, 0.125, chunk, 16, topk),
                                   out_o.float(), rtol=1e-5, atol=1e-5)


def test_fully_masked_chunk_with_disagreeing_signs():
    """A chunk whose slots are all masked has no bounds; it must not poison the other tokens.

    With G > 1 a query head whose q[d] has the opposite sign of the group sum multiplies an
    infinite empty-chunk bound of the other sign: the approximate logit must not become NaN.
    """
    torch.manual_seed(0)
    B, Hkv, G, n, D, chunk = 1, 1, 4, 12, 8, 4
    q, k, v = torch.randn(B, Hkv * G, 1, D), torch.randn(B, Hkv, n, D), torch.randn(B, Hkv, n, D)
    mask = torch.ones(B, 1, 1, n, dtype=torch.bool)
    mask[..., :chunk] = False
    scores = R.approximate_scores(q, k, mask, chunk, D)
    assert not scores.isnan().any()
    assert (scores[..., :chunk] == 0).all()
    torch.testing.assert_close(scores.sum(-1), torch.ones(B, Hkv))
    _check_decode(q, k, v, mask, mask[:, 0, 0].tolist(), D**-0.5, chunk, D, 4,
                  in_hypothesis=False)


@settings(deadline=None, max_examples=25)
@given(case=stage2_cases(), masked=st.booleans())
def test_sparse_decode_dense_limit_is_sdpa(case, masked):
    """Selecting every token (topk >= n) is exact attention, whatever chunk and dims are."""
    B, Hkv, G, D, seed, n, chunk, topk, dims, scale = case
    q, k, v = _tensors(seed, (B, Hkv * G, 1, D), (B, Hkv, n, D), (B, Hkv, n, D))
    mask = _valid_mask(seed, B, n, chunk) if masked else None
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                              enable_gqa=True)
    for c, r in ((1, D), (chunk, dims)):
        out = R.sparse_decode(q, k, v, mask, scale, c, r, n + topk)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("masked", [False, True])
def test_sparse_decode_dense_limit_low_precision(dtype, tol, masked):
    B, Hkv, G, D, n = 2, 2, 4, 64, 45
    q, k, v = _tensors(7, (B, Hkv * G, 1, D), (B, Hkv, n, D), (B, Hkv, n, D), dtype=dtype)
    mask = _valid_mask(7, B, n, 3) if masked else None
    out = R.sparse_decode(q, k, v, mask, D**-0.5, 1, D, n)
    assert out.dtype == dtype and out.shape == q.shape
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                              scale=D**-0.5, enable_gqa=True)
    torch.testing.assert_close(out.float(), expected, rtol=tol, atol=tol)
    low = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=D**-0.5, enable_gqa=True)
    torch.testing.assert_close(out, low, rtol=2 * tol, atol=2 * tol)


def test_sparse_decode_low_precision_matches_fp32_of_same_values():
    """Scores are float32 whatever the input dtype: bf16 inputs select as their fp32 copies do."""
    B, Hkv, G, D, n = 1, 2, 3, 64, 60
    q, k, v = _tensors(11, (B, Hkv * G, 1, D), (B, Hkv, n, D), (B, Hkv, n, D),
                       dtype=torch.bfloat16)
    a = R.sparse_decode(q, k, v, None, D**-0.5, 2, 20, 16)
    b = R.sparse_decode(q.float(), k.float(), v.float(), None, D**-0.5, 2, 20, 16)
    torch.testing.assert_close(a, b.to(torch.bfloat16), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# the registered ops

def _compress_args(seed, B, Hkv, G, w, n, D, mask_kind):
    qw, k, v = _tensors(seed, (B, Hkv * G, w, D), (B, Hkv, n, D), (B, Hkv, n, D))
    mask = None
    if mask_kind == "bool":
        mask = torch.ones(B, 1, w, n, dtype=torch.bool)
        mask[..., : n // 4] = False
    elif mask_kind == "float":
        mask = torch.zeros(B, 1, w, n)
        mask[..., : n // 4] = float("-inf")
    return (qw, k, v, mask, D**-0.5, (n - w) // 2, 7)


def _decode_args(seed, B, Hkv, G, n, D, mask_kind):
    q, k, v = _tensors(seed, (B, Hkv * G, 1, D), (B, Hkv, n, D), (B, Hkv, n, D))
    mask = None
    if mask_kind == "bool":
        mask = _valid_mask(seed, B, n, 2)
    elif mask_kind == "float":
        mask = torch.zeros(B, 1, 1, n).masked_fill(~_valid_mask(seed, B, n, 2), float("-inf"))
    return (q, k, v, mask, D**-0.5, 2, D // 2, 8)


DECODE_SHAPES = [(1, 1, 4, 20, 16, None), (2, 2, 3, 33, 32, "bool"), (1, 3, 2, 9, 16, "float")]


def _spec(name: str, kernel_size: int | None = None) -> str:
    """A policy's spec for the ops (token_budget and max_new_tokens do not reach them)."""
    extra = {} if kernel_size is None else {"kernel_size": kernel_size}
    return POLICIES[name](64, 8, **extra).spec


def _assert_fake_matches(op, args):
    """The op's fake kernel gives outputs of the real ones' shapes, strides and dtypes."""
    real = op(*args)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
    real, fake = ((t,) if isinstance(t, torch.Tensor) else t for t in (real, fake))
    for f, r in zip(fake, real, strict=True):
        assert f.shape == r.shape and f.stride() == r.stride() and f.dtype == r.dtype


@pytest.mark.parametrize("policy", ["rocketkv", "oracle-topk"])
@pytest.mark.parametrize("shape", DECODE_SHAPES)
def test_sparse_decode_opcheck(shape, policy):
    args = _decode_args(4, *shape)
    op_args = (*args[:5], *([x] for x in args[5:]), _spec(policy))   # the plan: one for all rows
    torch.library.opcheck(torch.ops.rocketkv.sparse_decode.default, op_args)
    got = torch.ops.rocketkv.sparse_decode(*op_args)
    torch.testing.assert_close(got, from_spec(_spec(policy)).decode(*args), rtol=0, atol=0)
    if policy == "rocketkv":
        torch.testing.assert_close(got, R.sparse_decode(*args), rtol=0, atol=0)
    _assert_fake_matches(torch.ops.rocketkv.sparse_decode, op_args)


@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
def test_sparse_decode_rows_with_their_own_plans(mask_kind):
    """A padded batch evicted row by row: each row decodes with its own plan, as it would alone."""
    q, k, v, mask, scale, *_ = _decode_args(6, 3, 2, 2, 40, 32, mask_kind)
    plans = [(2, 16, 8), (3, 5, 12), (1, 32, 8)]
    op_args = (q, k, v, mask, scale, *(list(field) for field in zip(*plans)), _spec("rocketkv"))
    torch.library.opcheck(torch.ops.rocketkv.sparse_decode.default, op_args)
    got = torch.ops.rocketkv.sparse_decode(*op_args)
    for b, plan in enumerate(plans):
        row = (t[b:b + 1] for t in (q, k, v))
        torch.testing.assert_close(got[b:b + 1], R.sparse_decode(*row, R.row_of(mask, b), scale,
                                                                 *plan), rtol=0, atol=0)
    _assert_fake_matches(torch.ops.rocketkv.sparse_decode, op_args)


def test_ops_follow_input_dtype():
    args = list(_decode_args(5, 1, 2, 2, 17, 32, None))
    args[:3] = [a.to(torch.bfloat16) for a in args[:3]]
    out = torch.ops.rocketkv.sparse_decode(*args[:5], *([x] for x in args[5:]), _spec("rocketkv"))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, R.sparse_decode(*args), rtol=0, atol=0)
    cargs = list(_compress_args(5, 1, 2, 2, 4, 17, 32, None))
    cargs[:3] = [a.to(torch.float16) for a in cargs[:3]]
    keys, values, _ = torch.ops.rocketkv.compress(*cargs[:5], 4, _spec("rocketkv", cargs[-1]),
                                                  0, 1, False)
    assert keys.dtype == values.dtype == torch.int16
    assert S.model_dtype(keys) == torch.float16
