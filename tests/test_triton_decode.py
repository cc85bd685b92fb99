"""The Triton stage-2 kernels against the PyTorch reference.

On the CPU they run in Triton's interpreter (TRITON_INTERPRET=1, set in conftest.py) in float32,
float16 and bfloat16 at small shapes; on a CUDA machine the same tests run on the GPU:
    python3 -m pytest -q tests/test_triton_decode.py
"""
from __future__ import annotations

import contextlib
import inspect
from unittest import mock

import pytest
import torch
import triton
from devices import CUDA, DEVICE, DTYPES, GPU_EXAMPLES, relative_error
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from test_reference import NEAR_TIE

import rkv_compile.kernels  # noqa: F401  (registers torch.ops.rocketkv)
from rkv_compile.kernels import reference as R
from rkv_compile.kernels import triton_compress as TC
from rkv_compile.kernels import triton_decode as T
from rkv_compile import state as S

# bf16/fp16 outputs are rounded once at the end; the kernels accumulate in float32
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
SETTINGS = settings(deadline=None, max_examples=GPU_EXAMPLES if CUDA else 12)


@st.composite
def decode_cases(draw, small=not CUDA):
    G = draw(st.integers(1, 8))
    Hkv = draw(st.integers(1, 2 if small else 8))
    B = draw(st.integers(1, 2 if small else 16))
    D = draw(st.sampled_from([16, 64, 80, 96, 128] + ([] if small else [256])))
    n = draw(st.integers(1, 160 if small else 3000))
    chunk = draw(st.integers(1, 5))
    dims = draw(st.integers(1, D))
    topk = draw(st.integers(1, n + 40))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**16))
    return B, Hkv, G, D, n, chunk, dims, topk, dtype, seed


def _inputs(B, Hkv, G, D, n, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(B, Hkv * G, 1, D), (B, Hkv, n, D), (B, Hkv, n, D)]
    return [torch.randn(*s, generator=gen).to(dtype).to(DEVICE) for s in shapes]


def _boundary_is_clear(scores: torch.Tensor, topk: int) -> bool:
    """No two different chunk scores within rounding of each other near the top-k cut."""
    k = min(topk, scores.shape[-1])
    if k == scores.shape[-1]:
        return True
    s = scores.sort(dim=-1, descending=True).values.double()
    lo = s[..., max(k - 2, 0): k + 2]
    gaps = (lo[..., :-1] - lo[..., 1:]) / lo[..., :-1].abs().clamp_min(1e-30)
    return bool(((gaps == 0) | (gaps > NEAR_TIE)).all())


def _dims_are_clear(q: torch.Tensor, kv_heads: int, dims: int) -> bool:
    """No tie at the r-th largest group-mean |q| (half-precision queries tie often): which dims
    a tie admits is up to each implementation's order."""
    means = R.group_queries(q, kv_heads)[:, :, :, -1].abs().mean(2).sort(-1, descending=True).values
    return dims == means.shape[-1] or bool((means[..., dims - 1] != means[..., dims]).all())


# A quantized layer for the packed tests, or None: (bits, group, each row's coded tokens)
CODES = st.one_of(st.none(), st.tuples(st.sampled_from([2, 4, 8]), st.sampled_from([1, 5, 32, 64]),
                                       st.lists(st.integers(0, 160), min_size=3, max_size=3)))


def _packed(k, v, words: dict, codes=None):
    """(keys, values, tokens): a packed layer holding each row's first `words[STORED]` tokens of
    k and v, each header word of `words` set (a value for every row, or one per row), and
    `tokens(b)`, row b's tokens as the kernels must read them, (1, Hkv, n, D) each. `codes`
    (`CODES`): each row's first tokens, up to its count, held as codes (`state.Coded`), the
    rest in its exact slots; `tokens` reads them back through `state.token_rows`
    (test_kv_codes holds it to `reference.fake_quantize`)."""
    B, Hkv, n, D = k.shape
    stored = words[S.Word.STORED]
    stored = [stored] * B if isinstance(stored, int) else stored
    coded = [0] * B if codes is None else [min(c, m) for c, m in zip(codes[2], stored)]
    code = None if codes is None else \
        S.Coded.new(S.slot_bucket(max(max(coded), 1)), *codes[:2], D, D, k.element_size())
    slots = S.slot_bucket(n)
    keys, values, layer = S.allocate(B, Hkv, D, D, slots, "", k.dtype, DEVICE, code)
    for b, (c, m) in enumerate(zip(coded, stored)):
        if c:
            code.write(keys, values, slots, b, R.quantize(k[b:b + 1, :, :c], *codes[:2], 2),
                       R.quantize(v[b:b + 1, :, :c], *codes[:2], 3))
        layer.keys[b, :, :m - c], layer.values[b, :, :m - c] = k[b, :, c:m], v[b, :, c:m]
    words = {**words, S.Word.STORED: [m - c for c, m in zip(coded, stored)],
             S.Word.CODED: coded}
    for word, value in words.items():
        layer.set_word(word, value if isinstance(value, int) else
                       torch.tensor(value, device=DEVICE))

    rows = S.token_rows(keys, values, False, k.dtype) if codes is not None else \
        [(k[b:b + 1, :, :m], v[b:b + 1, :, :m]) for b, m in enumerate(stored)]
    return keys, values, rows.__getitem__


def _code_args(codes) -> tuple:
    """The ops' trailing (bits, group) for `codes`."""
    return () if codes is None else tuple(codes[:2])


def _check_op(q, k, v, mask, chunk, dims, topk):
    """The triton_op against the float64 reference, where no near-tie decides the selection."""
    assume(_dims_are_clear(q, k.shape[1], dims))
    assume(_boundary_is_clear(R.approximate_scores(q, k, mask, chunk, dims), topk))
    scale = q.shape[-1] ** -0.5
    want = R.sparse_decode(q.double(), k.double(), v.double(), mask, scale, chunk, dims, topk)
    got = torch.ops.rocketkv.sparse_decode_triton(q, k, v, mask, scale, [chunk], [dims], [topk])
    assert got.shape == q.shape and got.dtype == q.dtype
    assert relative_error(got, want) < TOLERANCE[q.dtype]


def _random_mask(B, n, chunk, seed):
    """About 30% of slots masked, the first chunk wholly, never the last slot."""
    gen = torch.Generator().manual_seed(seed + 1)
    mask = torch.rand(B, 1, 1, n, generator=gen) > 0.3
    mask[:, :, :, : min(chunk, n)] = False
    mask[:, :, :, -1] = True
    return mask.to(DEVICE)


@SETTINGS
@given(case=decode_cases(), masked=st.booleans(), one_bound=st.booleans(),
       programs=st.sampled_from([1, 16]))
# On the GPU, a dim's group mean computed twice in two layouts once ranked it below itself.
@example(case=(1, 1, 5, 80, 1, 1, 1, 1, torch.float32, 2), masked=False, one_bound=True,
         programs=16)
def test_chunk_logits_match_reference(case, masked, one_bound, programs):
    """Chunk logits against the reference, each chunk's bounds kept as max and min or as the
    one the sign picks (CHUNK_LOGITS["ONE_BOUND"]), a program per block of chunks or programs
    that take every P-th block (CHUNK_PROGRAMS_PER_SM 1: P = 1 to 4 here)."""
    B, Hkv, G, D, n, chunk, dims, topk, dtype, seed = case
    q, k, _ = _inputs(B, Hkv, G, D, n, dtype, seed)
    assume(_dims_are_clear(q, Hkv, dims))
    mask = _random_mask(B, n, chunk, seed) if masked else None
    want = R.chunk_logits(q, k, mask, chunk, dims)
    with mock.patch.dict(T.CHUNK_LOGITS, ONE_BOUND=one_bound), \
            mock.patch.object(T, "CHUNK_PROGRAMS_PER_SM", programs):
        got = T.chunk_logits(q, k, chunk, dims, T.slot_validity(mask, B, n))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@SETTINGS
@given(case=decode_cases(), levels=st.integers(1, 4))
def test_both_ways_of_choosing_dims_agree(case, levels):
    """The query's r dims by the bit search and by ranks (CHUNK_LOGITS["DIMS_BY_RANK"]) are the
    same dims, ties at the r-th mean to the lower dims: queries of a few levels tie often."""
    B, Hkv, G, D, n, chunk, dims, topk, dtype, seed = case
    q, k, _ = _inputs(B, Hkv, G, D, n, dtype, seed)
    q = (q * levels).round() / levels
    got = {}
    for by_rank in (False, True):
        with mock.patch.dict(T.CHUNK_LOGITS, DIMS_BY_RANK=by_rank):
            got[by_rank] = T.chunk_logits(q, k, chunk, dims)
    assert torch.equal(got[False], got[True])


@SETTINGS
@given(case=decode_cases(), masked=st.booleans())
def test_selection_matches_reference(case, masked):
    """Same logits in, the same slots out: the k-th score, ties to the earlier slot (masked
    slots score 0 and tie too, as in the reference)."""
    B, Hkv, G, D, n, chunk, dims, topk, dtype, seed = case
    q, k, _ = _inputs(B, Hkv, G, D, n, dtype, seed)
    mask = _random_mask(B, n, chunk, seed) if masked else None
    logits = R.chunk_logits(q, k, mask, chunk, dims)
    scores = R.token_scores(logits, mask, chunk, n)
    assume(_boundary_is_clear(scores, topk))
    want = R.select_tokens(scores, topk).sort(-1).values
    got = T.select_slots(logits, n, chunk, topk, T.slot_validity(mask, B, n)).long()
    assert torch.equal(got, want)  # the same slots, in slot order


@pytest.mark.parametrize("module", [T, TC], ids=["decode", "compress"])
def test_launched_kernels_declare_no_constexpr_defaults(module):
    """A kernel Inductor lowers from a `triton_op` gets only the constexprs its launch passes:
    a default arrives as None (the fused select-attend kernel failed to compile so on the GPU
    while the interpreter, which applies defaults, passed). So the launched kernels have none
    and every launch names them all."""
    kernels = {name: fn for name, fn in vars(module).items()
               if isinstance(fn, triton.runtime.jit.KernelInterface) and name.endswith("_kernel")}
    assert kernels
    defaults = {name: [p.name for p in inspect.signature(fn.fn).parameters.values()
                       if p.default is not inspect.Parameter.empty]
                for name, fn in kernels.items()}
    assert defaults == {name: [] for name in kernels}


def test_selection_ties_go_to_earlier_slots():
    """Equal keys everywhere: every chunk ties, so the first k slots are the top k."""
    q = torch.randn(1, 4, 1, 64, device=DEVICE)
    k = torch.ones(1, 1, 50, 64, device=DEVICE)
    logits = T.chunk_logits(q, k, 3, 16)
    assert T.select_slots(logits, 50, 3, 20).tolist() == [[list(range(20))]]


@SETTINGS
@given(case=decode_cases())
def test_sparse_attention_matches_reference(case):
    """Attention over a given slot list: no selection in play, so no tie can interfere."""
    B, Hkv, G, D, n, chunk, dims, topk, dtype, seed = case
    q, k, v = _inputs(B, Hkv, G, D, n, dtype, seed)
    gen = torch.Generator().manual_seed(seed + 7)
    slots = torch.stack([torch.randperm(n, generator=gen)[:min(topk, n)]
                         for _ in range(B * Hkv)]).view(B, Hkv, -1).to(DEVICE)
    scale = D**-0.5
    want = R.attend_selected(q.double(), k.double(), v.double(), None, scale, slots)
    got = T.sparse_attention(q, k, v, slots.to(torch.int32).contiguous(), scale)
    assert got.shape == q.shape and got.dtype == dtype
    assert relative_error(got, want) < TOLERANCE[dtype]


@SETTINGS
@given(case=decode_cases())
def test_sparse_decode_op_matches_reference(case):
    B, Hkv, G, D, n, chunk, dims, topk, dtype, seed = case
    _check_op(*_inputs(B, Hkv, G, D, n, dtype, seed), None, chunk, dims, topk)


def test_dense_limit_equals_sdpa():
    """chunk 1, every dim, top-k over all tokens: plain attention."""
    q, k, v = _inputs(2, 2, 4, 64, 150, torch.float32, 3)
    got = T.sparse_decode(q, k, v, None, 0.125, 1, 64, 10_000)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.125, enable_gqa=True)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


@SETTINGS
@given(case=decode_cases(), shared=st.booleans())
@example(case=(2, 1, 2, 64, 40, 3, 8, 9, torch.float32, 5), shared=True)
def test_boolean_mask_matches_reference(case, shared):
    """Masked slots (whole chunks too, never all) never reach the output, as in the reference;
    also with one mask shared by the batch (the kernels then read its row at batch stride 0)."""
    B, Hkv, G, D, n, chunk, dims, topk, dtype, seed = case
    q, k, v = _inputs(B, Hkv, G, D, n, dtype, seed)
    _check_op(q, k, v, _random_mask(1 if shared else B, n, chunk, seed), chunk, dims, topk)


@SETTINGS
@given(case=decode_cases(), rows=st.lists(st.tuples(st.integers(1, 5), st.integers(1, 128),
                                                    st.integers(1, 160)), min_size=2, max_size=3))
def test_rows_with_their_own_plans(case, rows):
    """A padded batch whose rows were evicted apart: each row's own chunk, r and stored slots
    (the first `live` of them: RocketKVCache left-aligns a row), as that row alone."""
    _, Hkv, G, D, n, _, _, topk, dtype, seed = case
    B = len(rows)
    chunks, dims, live = ([row[i] for row in rows] for i in range(3))
    dims, live = [min(r, D) for r in dims], [min(m, n) for m in live]
    q, k, v = _inputs(B, Hkv, G, D, n, dtype, seed)
    mask = (torch.arange(n) < torch.tensor(live)[:, None]).view(B, 1, 1, n).to(DEVICE)
    scale = D**-0.5
    for b in range(B):
        row = [t[b:b + 1] for t in (q, k, mask)]
        assume(_dims_are_clear(row[0], Hkv, dims[b]))
        assume(_boundary_is_clear(R.approximate_scores(*row, chunks[b], dims[b]), topk))
    got = torch.ops.rocketkv.sparse_decode_triton(q, k, v, mask, scale, chunks, dims, [topk] * B)
    for b in range(B):
        want = R.sparse_decode(*(t[b:b + 1].double() for t in (q, k, v)), mask[b:b + 1], scale,
                               chunks[b], dims[b], topk)
        assert relative_error(got[b:b + 1], want) < TOLERANCE[dtype]


# (SELECTION_SMALL, SELECTION_LANES, LONG_SEGMENT, MERGE_LANES): the test rows' chunks (up to
# 160) mostly over 16 lanes, mostly under 256, and every row past 8 lanes: selected in two
# levels from segments of 32 lanes, or by torch ops where their candidates overflow 8 lanes
SELECTIONS = [(16, 1 << 20, 4096, 1 << 14), (256, 1 << 20, 4096, 1 << 14),
              (256, 8, 32, 1 << 14), (256, 8, 32, 8)]


@contextlib.contextmanager
def _selection(sizes):
    with contextlib.ExitStack() as stack:
        for name, size in zip(("SELECTION_SMALL", "SELECTION_LANES", "LONG_SEGMENT",
                               "MERGE_LANES"), sizes):
            stack.enter_context(mock.patch.object(T, name, size))
        yield


@SETTINGS
@given(case=decode_cases(), rows=st.lists(st.tuples(st.integers(1, 5), st.integers(1, 128),
                                                    st.integers(1, 160), st.integers(1, 200)),
                                          min_size=1, max_size=3),
       header_topk=st.booleans(), listed=st.sampled_from(["topk", "every slot"]),
       fused=st.booleans(), selection=st.sampled_from(SELECTIONS), codes=CODES,
       programs=st.sampled_from([1, 16]))
# rows' own topk under a list of every slot, selected by the kernel and by torch ops, then
# attended by the split programs (which must stop at the row's topk)
@example(case=(1, 1, 2, 16, 100, 1, 4, 40, torch.float32, 3), rows=[(1, 4, 100, 10)],
         header_topk=True, listed="every slot", fused=False, selection=SELECTIONS[1], codes=None,
         programs=16)
@example(case=(1, 1, 2, 16, 100, 1, 4, 40, torch.float32, 3), rows=[(1, 4, 100, 10)],
         header_topk=True, listed="every slot", fused=False, selection=SELECTIONS[2], codes=None,
         programs=16)
@example(case=(1, 1, 2, 16, 100, 1, 4, 40, torch.float32, 3), rows=[(1, 4, 100, 10)],
         header_topk=True, listed="every slot", fused=False, selection=SELECTIONS[3], codes=None,
         programs=16)
# two levels over rows of chunks of 3 (the first row's 50 chunks in two segments), codes and
# exact slots
@example(case=(2, 2, 3, 64, 150, 1, 4, 60, torch.float32, 11), rows=[(3, 20, 150, 60),
                                                                    (2, 64, 90, 25)],
         header_topk=True, listed="topk", fused=False, selection=SELECTIONS[2],
         codes=(4, 32, [64, 30, 0]), programs=1)
def test_packed_layer_decode(case, rows, header_topk, listed, fused, selection, codes,
                             programs):
    """RocketKV's decode op on CUDA over a packed layer (`rocketkv.decode_triton`): each row's
    chunk, r and topk from its header (unset: every token), over its stored tokens, as that
    row alone, the op's list as long as the policy's topk or every slot (a topk that follows
    the prompt: rocketkv-fine) and each row taking the lesser; through the fused
    kernel (one program per KV head) and through the split path alike, with rows of more
    chunks than the small selection's lanes beside rows of fewer, and selected by torch ops
    as rows too long for a program are (`SELECTIONS`); over a quantized layer's codes and
    exact slots as over their dequantized tokens (kv_bits); its chunk logits by a program per
    block of chunks or by programs that each take every P-th block (`programs`)."""
    _, Hkv, G, D, n, _, _, topk, dtype, seed = case
    B = len(rows)
    chunks, dims, live, row_topks = ([row[i] for row in rows] for i in range(4))
    dims, live = [min(r, D) for r in dims], [min(m, n) for m in live]
    words = {S.Word.STORED: live, S.Word.CHUNK: chunks, S.Word.DIMS: dims}
    if header_topk:
        words[S.Word.TOPK] = row_topks
    list_length = topk if listed == "topk" else S.NOT_SELECTED
    attended = [min(list_length, t if header_topk else S.NOT_SELECTED) for t in row_topks]
    q, k, v = _inputs(B, Hkv, G, D, n, dtype, seed)
    keys, values, tokens = _packed(k, v, words, codes)
    scale = D**-0.5
    for b in range(B):
        assume(_dims_are_clear(q[b:b + 1], Hkv, dims[b]))
        assume(_boundary_is_clear(R.approximate_scores(q[b:b + 1], tokens(b)[0], None,
                                                       chunks[b], dims[b]), attended[b]))
    with mock.patch.object(T, "_one_program_per_head", lambda heads, k: fused), \
            mock.patch.object(T, "CHUNK_PROGRAMS_PER_SM", programs), _selection(selection):
        got = torch.ops.rocketkv.decode_triton(q, keys, values, scale, list_length,
                                               *_code_args(codes))
    for b in range(B):
        want = R.sparse_decode(q[b:b + 1].double(), *(t.double() for t in tokens(b)), None,
                               scale, chunks[b], dims[b], attended[b])
        assert relative_error(got[b:b + 1], want) < TOLERANCE[dtype]


# (the interpreter's slowest kernel test, a program per query head: fewer cases on the CPU)
@settings(SETTINGS, max_examples=GPU_EXAMPLES if CUDA else 6)
@given(case=decode_cases(), live=st.lists(st.integers(1, 160), min_size=1, max_size=3),
       page_size=st.integers(1, 16), pages=st.integers(1, 12), codes=CODES)
def test_packed_page_decode(case, live, page_size, pages, codes):
    """Quest's decode op over a packed layer (`rocketkv.page_decode_triton`): per query head
    its best pages of the row's stored tokens (the last one partial; codes, kv_bits, as their
    dequantized tokens), as `Quest.decode` alone over that row (float64), where no near-tie
    of page bounds decides the selection."""
    from rkv_compile.policies.quest import Quest

    _, Hkv, G, D, n, _, _, _, dtype, seed = case
    B = len(live)
    live = [min(m, n) for m in live]
    q, k, v = _inputs(B, Hkv, G, D, n, dtype, seed)
    keys, values, tokens = _packed(k, v, {S.Word.STORED: live, S.Word.CHUNK: page_size,
                                          S.Word.DIMS: D}, codes)
    quest, scale = Quest(token_budget=pages * page_size), D**-0.5
    for b in range(B):
        kmin, kmax = R.chunk_bounds(tokens(b)[0].repeat_interleave(G, 1).double(), page_size)
        qb = q[b:b + 1, :, -1].double().unsqueeze(2)
        bounds = torch.maximum(qb * kmin, qb * kmax).sum(-1)
        assume(_boundary_is_clear(bounds, pages))
    got = torch.ops.rocketkv.page_decode_triton(q, keys, values, scale, pages, page_size,
                                                *_code_args(codes))
    assert got.shape == q.shape and got.dtype == dtype
    for b in range(B):
        want = quest.decode(q[b:b + 1].double(), *(t.double() for t in tokens(b)), None, scale,
                            page_size, D, pages * page_size)
        assert relative_error(got[b:b + 1], want) < TOLERANCE[dtype]


@SETTINGS
@given(case=decode_cases(), rows=st.lists(st.tuples(st.integers(1, 128), st.integers(1, 160)),
                                          min_size=1, max_size=3),
       selection=st.sampled_from(SELECTIONS), codes=CODES)
# rows of five and three segments selected in two levels, each head's mass on its list from the
# row's softmax over every segment
@example(case=(2, 2, 3, 64, 150, 1, 4, 20, torch.float32, 7), rows=[(6, 150), (3, 90)],
         selection=SELECTIONS[2], codes=None)
def test_packed_sparq_decode(case, rows, selection, codes):
    """SparQ's decode op over a packed layer (`rocketkv.sparq_decode_triton`): each row's r
    from its header, over its stored slots, as `SparQ.decode` alone over that row (float64),
    mean-value reallocation included (codes, kv_bits, as their dequantized tokens), where no
    near-tie decides the dims or the selection."""
    from rkv_compile.policies.sparq import SparQ

    _, Hkv, G, D, n, _, _, topk, dtype, seed = case
    B = len(rows)
    dims, live = [min(r, D) for r, _ in rows], [min(m, n) for _, m in rows]
    q, k, v = _inputs(B, Hkv, G, D, n, dtype, seed)
    keys, values, tokens = _packed(k, v, {S.Word.STORED: live, S.Word.CHUNK: 1,
                                          S.Word.DIMS: dims}, codes)
    for b in range(B):
        assume(_dims_are_clear(q[b:b + 1], Hkv, dims[b]))
        assume(_boundary_is_clear(R.approximate_scores(q[b:b + 1], tokens(b)[0], None, 1,
                                                       dims[b]), topk))
    scale = D**-0.5
    with _selection(selection):
        got = torch.ops.rocketkv.sparq_decode_triton(q, keys, values, scale, topk,
                                                     *_code_args(codes))
    assert got.shape == q.shape and got.dtype == dtype
    for b in range(B):
        want = SparQ(token_budget=2 * topk).decode(
            q[b:b + 1].double(), *(t.double() for t in tokens(b)), None, scale, 1, dims[b], topk)
        assert relative_error(got[b:b + 1], want) < TOLERANCE[dtype]


@SETTINGS
@given(case=decode_cases(), live=st.lists(st.integers(1, 160), min_size=1, max_size=3),
       codes=CODES)
# a head dim whose 2-bit codes do not fill whole bytes (each code read on its own), values in
# groups of 5 channels (each step read on its own), rows of codes only, exact slots only, both
@example(case=(3, 1, 2, 66, 40, 1, 1, 1, torch.float32, 5), live=[40, 7, 30],
         codes=(2, 5, [40, 0, 9]))
# 4-bit values read as nibbles (`_attend_nibble_tiles`): whole groups spread over each half,
# and groups of 5 read per column, in 16 and 32 bits
@example(case=(2, 2, 2, 64, 150, 1, 1, 1, torch.float16, 3), live=[150, 90],
         codes=(4, 32, [140, 64]))
@example(case=(2, 1, 3, 32, 100, 1, 1, 1, torch.float32, 4), live=[100, 20],
         codes=(4, 5, [70, 0]))
def test_packed_exact_decode(case, live, codes):
    """Flash-decoding over every stored token of a packed layer (`rocketkv.exact_decode_triton`,
    what exact-decoding policies run on CUDA), each row's count from its header, as exact
    attention over that row alone (float64); over a quantized layer (kvquant, kv_bits), its
    codes dequantized in registers and its exact slots, as over their dequantized tokens."""
    from rkv_compile.kernels.cache_ops import exact_attention

    _, Hkv, G, D, n, _, _, _, dtype, seed = case
    B = len(live)
    live = [min(m, n) for m in live]
    q, k, v = _inputs(B, Hkv, G, D, n, dtype, seed)
    keys, values, tokens = _packed(k, v, {S.Word.STORED: live}, codes)
    scale = D**-0.5
    got = torch.ops.rocketkv.exact_decode_triton(q, keys, values, scale, *_code_args(codes))
    assert got.shape == q.shape and got.dtype == dtype
    for b in range(B):
        want = exact_attention(q[b:b + 1].double(), *(t.double() for t in tokens(b)), None,
                               scale)
        assert relative_error(got[b:b + 1], want) < TOLERANCE[dtype]


@SETTINGS
@given(case=decode_cases(), live=st.integers(1, 160))
def test_oracle_topk_is_stage_two_at_chunk_one_over_every_dim(case, live):
    """Oracle top-k decodes on CUDA through RocketKV's kernels: at chunk 1 over every dim a
    slot's bound is its key and SparQ's temperature is sqrt(D), so the approximate scores are
    the exact softmax scores at scale 1/sqrt(D). Its plan's header words run `decode_triton`
    as OracleTopK.decode, row by row."""
    from rkv_compile.policies.oracle_topk import OracleTopK

    B, Hkv, G, D, n, _, _, budget, dtype, seed = case
    live = min(live, n)
    q, k, v = _inputs(B, Hkv, G, D, n, dtype, seed)
    policy = OracleTopK(budget)
    plan = policy.plan(live, D)
    scale = D**-0.5
    assert policy.triton_at(scale, D) and not policy.triton_at(2 * scale, D)
    keys, values, layer = _packed(k, v, {S.Word.STORED: live, S.Word.CHUNK: plan.chunk,
                                         S.Word.DIMS: plan.dims})
    q64, k64, v64 = (t.double() for t in (q, k[:, :, :live], v[:, :, :live]))
    exact = torch.softmax(torch.einsum("bhgd,bhnd->bhgn", R.group_queries(q64, Hkv)[:, :, :, -1]
                                       .double(),
                                       k64) * scale, dim=-1).mean(2)
    torch.testing.assert_close(R.approximate_scores(q64, k64, None, plan.chunk, plan.dims),
                               exact.float())
    assume(_boundary_is_clear(exact, plan.topk))
    got = torch.ops.rocketkv.decode_triton(q, keys, values, scale, plan.topk)
    want = policy.decode(q64, k64, v64, None, scale, plan.chunk, plan.dims, plan.topk)
    assert relative_error(got, want) < TOLERANCE[dtype]
