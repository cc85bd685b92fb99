"""The packed layer state (rkv_compile.state) and the cache ops over it, against their definitions:
layouts from shapes alone, a prompt stored row by row as each row's policy selection, a token
appended, a decode step over each row's stored slots with its own plan, a turn."""
import pytest
import torch
import torch.nn.functional as F
from devices import DEVICE, DTYPES
from hypothesis import given, settings, strategies as st

import rkv_compile.kernels  # noqa: F401  (registers torch.ops.rocketkv)
from rkv_compile import state as S
from rkv_compile.kernels import cache_ops, reference
from rkv_compile.kernels import triton_decode as T
from rkv_compile.policies import POLICIES
from rkv_compile.state import Word


@settings(deadline=None, max_examples=40)
@given(slots=st.integers(1, 3000), head_dim=st.sampled_from([8, 16, 64, 80, 128]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       stateful=st.booleans())
def test_layout_follows_from_the_length_alone(slots, head_dim, dtype, stateful):
    itemsize = torch.empty(0, dtype=dtype).element_size()
    bucket = S.slot_bucket(slots, head_dim, itemsize, stateful)
    assert slots <= bucket <= max(slots * 17 // 16 + 1, slots + 16 * S.words_per_row(
        head_dim, itemsize))
    layout = S.Layout.new(bucket, stateful, head_dim, itemsize)
    keys = torch.empty(1, 1, layout.rows, head_dim, dtype=S.packed_dtype(dtype))
    assert S.Layout.of(keys, stateful) == layout
    assert layout.header * S.words_per_row(head_dim, itemsize) >= S.HEADER_WORDS
    assert layout.state * S.words_per_row(head_dim, itemsize) >= (bucket if stateful else 0)


def test_views_write_the_cache_and_rows_move_together():
    """The views are the packed tensors' own memory; indexing the batch (what transformers'
    beam search and batch operations do) moves every row's tokens, state and header."""
    keys, values, layer = S.allocate(3, 2, 16, 16, 32, "scores", torch.bfloat16, "cpu")
    for b in range(3):
        layer.keys[b] = b + 1
        layer.state.view(torch.float32)[b] = b + 0.5
        layer.header[b, :, Word.STORED] = 10 * b
    assert layer.keys.dtype == torch.bfloat16 and keys.dtype == torch.int16
    moved = S.unpack(keys[[2, 0, 2]], values[[2, 0, 2]], True, torch.bfloat16)
    assert moved.keys[:, 0, 0, 0].tolist() == [3, 1, 3]
    assert moved.state.view(torch.float32)[:, 1, 5].tolist() == [2.5, 0.5, 2.5]
    assert moved.stored.tolist() == [20, 0, 20]
    assert S.stored_counts(keys) == ([0, 10, 20], S.Flag.STATE)


def _prompt(B, H, G, n, D, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H * G, n, D, generator=gen).to(dtype)
    k, v = (torch.randn(B, H, n, D, generator=gen).to(dtype) for _ in range(2))
    return q, k, v


def _left_padded_mask(lengths, n):
    """(B, 1, n, n) boolean causal mask of left-padded rows of `lengths` tokens."""
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    live = torch.stack([torch.arange(n) >= n - m for m in lengths])
    return causal[None, None] & live[:, None, None, :]


POLICY_CASES = ["rocketkv", "snapkv", "streamingllm", "h2o", "rocketkv-mt", "pyramidkv",
                "shotkv", "kvquant"]


@settings(deadline=None, max_examples=25)
@given(lengths=st.lists(st.integers(8, 90), min_size=1, max_size=3), H=st.integers(1, 2),
       G=st.integers(1, 2), policy=st.sampled_from(POLICY_CASES), room=st.integers(1, 6),
       layer=st.integers(0, 2), seed=st.integers(0, 2**16))
def test_compress_stores_each_rows_selection(lengths, H, G, policy, room, layer, seed):
    """Each row stores what the policy keeps of its own tokens (a left-padded row: its real
    ones), with the plan of its own length and `room` new tokens, left-aligned; its header has
    the plan; the layers' tensors are sized for the widest row of any layer."""
    method = POLICIES[policy](24, room, 4)
    n, D = max(lengths), 16
    q, k, v = _prompt(len(lengths), H, G, n, D, seed)
    mask = _left_padded_mask(lengths, n) if len(set(lengths)) > 1 else None
    observed = method.observed_queries(n)
    window = None if mask is None else mask[..., -observed:, :]
    keys, values, positions = torch.ops.rocketkv.compress(q[..., -observed:, :], k, v, window,
                                                          0.25, room, method.spec, layer, 3,
                                                          False)
    layer_state = S.unpack(keys, values, bool(method.state), torch.float32)
    widest = 0
    for b, m in enumerate(lengths):
        own = slice(n - m, n)
        plan = method.plan(m, D, layer, 3)
        own_mask = None if mask is None else mask[b:b + 1, :, -method.observed_queries(m):, own]
        if method.rewrites_prompt(m, plan):
            want_k, want_v, want_pos, want_state = method.compress(
                q[b:b + 1, :, -method.observed_queries(m):], k[b:b + 1, :, own],
                v[b:b + 1, :, own], own_mask, 0.25, min(plan.prompt_budget, m))
        else:
            want_k, want_v = k[b:b + 1, :, own], v[b:b + 1, :, own]
            want_pos = torch.arange(m).expand(1, H, m)
        kept = m if method.keeps_history else want_k.shape[2]
        assert layer_state.position[b] == m
        if method.kv_bits is not None:   # codes, no exact slot used yet
            assert [layer_state.stored[b], layer_state.word(Word.CODED)[b]] == [0, kept]
            got = S.token_rows(keys, values, False, torch.float32)[b]
            for tokens, want in zip(got, method.quantized(want_k, want_v)):
                torch.testing.assert_close(tokens, want, rtol=0, atol=0)
            assert torch.equal(positions[b:b + 1, :, :kept], want_pos)
            widest = max(widest, kept)
            continue
        assert layer_state.stored[b] == kept
        stored_k = layer_state.keys[b:b + 1, :, :kept]
        if method.keeps_history:   # every token, and the selection as the view
            torch.testing.assert_close(stored_k, k[b:b + 1, :, own], rtol=0, atol=0)
            assert layer_state.word(Word.VIEW)[b] == want_pos.shape[2]
            assert torch.equal(layer_state.state[b:b + 1, :, :want_pos.shape[2]].long(), want_pos)
        else:
            torch.testing.assert_close(stored_k, want_k, rtol=0, atol=0)
            torch.testing.assert_close(layer_state.values[b:b + 1, :, :kept], want_v, rtol=0,
                                       atol=0)
            assert torch.equal(positions[b:b + 1, :, :kept], want_pos)
        if method.state == "scores":
            torch.testing.assert_close(layer_state.state.view(torch.float32)[b:b + 1, :, :kept],
                                       want_state)
        assert [layer_state.word(w)[b] for w in (Word.CHUNK, Word.DIMS)] == [plan.chunk,
                                                                              plan.dims]
        assert layer_state.word(Word.TOPK)[b] == (plan.topk or S.NOT_SELECTED)
        for other in range(3):   # every layer's widest row sizes the tensors
            p = method.plan(m, D, other, 3)
            widest = max(widest, m if method.keeps_history or not method.rewrites_prompt(m, p)
                         else min(p.prompt_budget, m))
    if method.kv_bits is not None:   # the exact slots for new tokens, then the codes
        code, exact = S.coded(keys, values)
        assert exact == S.slot_bucket(room) and code.capacity >= widest
        return
    assert layer_state.keys.shape[2] == S.slot_bucket(widest + room, D, 4, bool(method.state))


@settings(deadline=None, max_examples=20)
@given(stored=st.lists(st.integers(0, 20), min_size=1, max_size=3), state=st.sampled_from(
       ["", "scores", "view"]), D=st.sampled_from([8, 16]), seed=st.integers(0, 2**16))
def test_append_puts_the_token_after_each_rows_stored_slots(stored, state, D, seed):
    B, H = len(stored), 2
    slots = S.slot_bucket(max(stored) + 3, D, 4, bool(state))
    keys, values, layer = S.allocate(B, H, D, D, slots, state, torch.float32, "cpu")
    layer.set_word(Word.STORED, torch.tensor(stored))
    layer.set_word(Word.POSITION, torch.tensor(stored) + 7)
    if state == "view":
        layer.set_word(Word.VIEW, torch.tensor([s // 2 for s in stored]))
    before = [t.clone() for t in (layer.keys, layer.values, layer.state)]
    gen = torch.Generator().manual_seed(seed)
    new_k, new_v = (torch.randn(B, H, 1, D, generator=gen) for _ in range(2))
    torch.ops.rocketkv.append_(keys, values, new_k, new_v, state)
    for b, n in enumerate(stored):
        assert torch.equal(layer.keys[b, :, n], new_k[b, :, 0])
        assert torch.equal(layer.values[b, :, n], new_v[b, :, 0])
        assert torch.equal(layer.keys[b, :, :n], before[0][b, :, :n])
        if state == "scores":
            assert layer.state.view(torch.float32)[b, :, n].tolist() == [0.0] * H
        if state == "view":
            assert layer.state[b, :, n // 2].tolist() == [n] * H
            assert layer.word(Word.VIEW)[b] == n // 2 + 1
    assert layer.stored.tolist() == [n + 1 for n in stored]
    assert layer.position.tolist() == [n + 8 for n in stored]


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != torch.float32][:1] + [torch.float32])
def test_triton_append_equals_the_reference(dtype):
    stored = [3, 0, 17]
    layers = []
    for append in (cache_ops.append, T.append_packed):
        keys, values, layer = S.allocate(3, 2, 16, 16, 32, "", dtype, DEVICE)
        layer.set_word(Word.STORED, torch.tensor(stored))
        gen = torch.Generator().manual_seed(1)
        new_k, new_v = (torch.randn(3, 2, 1, 16, generator=gen).to(dtype).to(DEVICE)
                        for _ in range(2))
        if append is cache_ops.append:
            append(keys, values, new_k, new_v, "")
        else:
            append(keys, values, new_k, new_v)
        layers.append((keys, values))
    assert all(torch.equal(a, b) for a, b in zip(*layers))


def _packed(rows, H, D, state, method_topk, seed, plans):
    """A packed layer whose rows store `rows[b]` random tokens with plans[b] (chunk, dims)."""
    B = len(rows)
    plans = plans[:B]
    slots = S.slot_bucket(max(rows) + 2, D, 4, bool(state))
    keys, values, layer = S.allocate(B, H, D, D, slots, state, torch.float32, "cpu")
    gen = torch.Generator().manual_seed(seed)
    layer.keys.copy_(torch.randn(layer.keys.shape, generator=gen))
    layer.values.copy_(torch.randn(layer.values.shape, generator=gen))
    layer.set_word(Word.STORED, torch.tensor(rows))
    layer.set_word(Word.CHUNK, torch.tensor([p[0] for p in plans]))
    layer.set_word(Word.DIMS, torch.tensor([p[1] for p in plans]))
    layer.set_word(Word.TOPK, method_topk)
    return keys, values, layer


@settings(deadline=None, max_examples=25)
@given(rows=st.lists(st.integers(1, 40), min_size=1, max_size=3), G=st.integers(1, 3),
       policy=st.sampled_from(["rocketkv", "snapkv", "quest", "sparq", "oracle-topk",
                               "streamingllm"]),
       plans=st.lists(st.tuples(st.integers(1, 4), st.integers(1, 16)), min_size=3, max_size=3),
       seed=st.integers(0, 2**16))
def test_decode_is_each_rows_policy_decode_over_its_stored_slots(rows, G, policy, plans, seed):
    method, H, D = POLICIES[policy](16, 4, 4), 2, 16
    keys, values, layer = _packed(rows, H, D, "", 8, seed, plans)
    query = torch.randn(len(rows), H * G, 1, D, generator=torch.Generator().manual_seed(seed))
    got = torch.ops.rocketkv.decode(query, keys, values, 0.3, method.spec)
    for b, n in enumerate(rows):
        k, v = layer.keys[b:b + 1, :, :n], layer.values[b:b + 1, :, :n]
        if method.sparse_decode:
            want = method.decode(query[b:b + 1], k, v, None, 0.3, *plans[b], 8)
        else:
            want = F.scaled_dot_product_attention(query[b:b + 1], k, v, scale=0.3,
                                                  enable_gqa=True)
        torch.testing.assert_close(got[b:b + 1], want, rtol=1e-5, atol=1e-5)


def test_a_layer_stored_whole_decodes_exactly():
    """`store` (a RocketKVCache without the pass) marks its layer exact: a sparse policy's
    decode attends to every stored slot."""
    q, k, v = _prompt(1, 2, 2, 30, 16, 3)
    with pytest.warns(RuntimeWarning, match="stores a prompt whole"):
        keys, values = torch.ops.rocketkv.store(k, v, 4)
    got = torch.ops.rocketkv.decode(q[:, :, -1:], keys, values, 0.25,
                                    POLICIES["rocketkv"](8, 4).spec)
    want = F.scaled_dot_product_attention(q[:, :, -1:], k, v, scale=0.25, enable_gqa=True)
    torch.testing.assert_close(got, want)


@settings(deadline=None, max_examples=15)
@given(stored=st.lists(st.integers(0, 30), min_size=1, max_size=2), turn=st.integers(2, 40),
       policy=st.sampled_from(["rocketkv", "snapkv", "rocketkv-mt"]), seed=st.integers(0, 2**16))
def test_turn_attends_over_the_stored_tokens_and_selects_again(stored, turn, policy, seed):
    method, H, G, D = POLICIES[policy](16, 3, 8), 2, 2, 16
    keys, values, layer = _packed(stored, H, D, method.state, 8, seed, [(2, 8)] * 2)
    layer.set_word(Word.POSITION, torch.tensor(stored) + 50)
    q, k, v = _prompt(len(stored), H, G, turn, D, seed + 1)
    out, new_keys, new_values, _ = torch.ops.rocketkv.turn(q, k, v, keys, values, 0.25, 3,
                                                           method.spec, 0, 1)
    new = S.unpack(new_keys, new_values, bool(method.state), torch.float32)
    for b, n in enumerate(stored):
        all_k = torch.cat([layer.keys[b:b + 1, :, :n], k[b:b + 1]], 2)
        all_v = torch.cat([layer.values[b:b + 1, :, :n], v[b:b + 1]], 2)
        mask = torch.ones(turn, n + turn, dtype=torch.bool).tril(n)
        want = F.scaled_dot_product_attention(q[b:b + 1], all_k, all_v, attn_mask=mask,
                                              scale=0.25, enable_gqa=True)
        torch.testing.assert_close(out[b:b + 1], want, rtol=1e-5, atol=1e-5)
        assert new.position[b] == n + 50 + turn
        plan = method.plan(n + 50 + turn, D)
        row = cache_ops.select_row(method, q[b:b + 1], all_k, all_v, None, 0.25, plan)
        if turn < method.observed_queries(n + turn):   # too short to vote: every token kept
            assert new.stored[b] == n + turn
        else:
            assert new.stored[b] == (n + turn if method.keeps_history else row.keys.shape[2])
            torch.testing.assert_close(new.keys[b:b + 1, :, :row.keys.shape[2]], row.keys)


def test_ops_schemas_and_fake_kernels():
    """The ops' schemas and fake kernels (shapes, dtypes) agree with what they return."""
    q, k, v = _prompt(2, 2, 2, 40, 16, 5)
    spec = POLICIES["rocketkv"](16, 4).spec
    keys, values, _ = torch.ops.rocketkv.compress(q[..., -4:, :], k, v, None, 0.25, 4, spec, 0,
                                                  1, False)
    checks = [(torch.ops.rocketkv.decode, (q[:, :, -1:], keys, values, 0.25, spec)),
              (torch.ops.rocketkv.append_, (keys.clone(), values.clone(), k[:, :, :1],
                                            v[:, :, :1], "")),
              (torch.ops.rocketkv.extend, (keys, values, k[:, :, :5], v[:, :, :5], 4))]
    for op, args in checks:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


@settings(deadline=None, max_examples=15)
@given(rows=st.lists(st.integers(2, 30), min_size=1, max_size=2), G=st.integers(1, 2),
       policy=st.sampled_from(["h2o", "shotkv"]), limit=st.integers(1, 40),
       seed=st.integers(0, 2**16))
def test_evicting_decode_updates_each_rows_scores_in_place(rows, G, policy, limit, seed):
    """A policy that evicts as it decodes: each row's attention and new scores are its
    policy's evicting_decode over its stored slots, the scores written into the state region."""
    method, H, D = POLICIES[policy](16, 4, 4), 2, 16
    keys, values, layer = _packed(rows, H, D, "scores", limit, seed, [(0, D)] * 2)
    gen = torch.Generator().manual_seed(seed + 1)
    scores = layer.state.view(torch.float32)
    scores.copy_(torch.rand(scores.shape, generator=gen))
    before = scores.clone()
    query = torch.randn(len(rows), H * G, 1, D, generator=gen)
    got = torch.ops.rocketkv.evicting_decode_(query, keys, values, 0.3, method.spec)
    for b, n in enumerate(rows):
        valid = torch.arange(layer.keys.shape[2]) < n
        want, want_scores = method.evicting_decode(
            query[b:b + 1], layer.keys[b:b + 1], layer.values[b:b + 1], valid.view(1, 1, 1, -1),
            0.3, limit, before[b:b + 1])
        torch.testing.assert_close(got[b:b + 1], want)
        torch.testing.assert_close(scores[b:b + 1, :, :n], want_scores[..., :n])


def test_compress_reuses_another_layers_positions():
    """With `reuse` (ChunkKV's layer-wise reuse), a layer stores its own keys at the positions
    another layer selected."""
    q, k, v = _prompt(2, 2, 2, 60, 16, 9)
    spec = POLICIES["chunkkv"](24, 4, 4).spec
    _, _, positions = torch.ops.rocketkv.compress(q[..., -4:, :], k, v, None, 0.25, 4, spec, 0,
                                                  2, False)
    reused = positions.flip(-1).sort(-1).values
    keys, values, again = torch.ops.rocketkv.compress(q[..., -4:, :], k.flip(2), v, None, 0.25,
                                                      4, spec, 1, 2, False, reused)
    layer = S.unpack(keys, values, False, torch.float32)
    assert torch.equal(again, reused)
    n = reused.shape[-1]
    torch.testing.assert_close(layer.keys[:, :, :n], reference.gather_tokens(k.flip(2), reused))
    torch.library.opcheck(torch.ops.rocketkv.compress, (q[..., -4:, :], k, v, None, 0.25, 4,
                                                         spec, 0, 2, False),
                          test_utils=("test_schema",))


def test_the_pool_hands_out_only_unheld_memory_zeroed():
    """A dropped buffer serves the next ask of its shape, zeroed; a held one never does (a view
    of it counts as held); asking for a new shape frees the dropped buffers of the others."""
    pool = S.BufferPool()
    first = pool.zeros((2, 3), torch.int16, "cpu")
    first.fill_(7)
    held, view = first.data_ptr(), first[1]
    del first
    second = pool.zeros((2, 3), torch.int16, "cpu")   # `view` holds the first
    assert second.data_ptr() != held and (view == 7).all()
    address = second.data_ptr()
    second.fill_(5)
    del second
    third = pool.zeros((2, 3), torch.int16, "cpu")
    assert third.data_ptr() == address and not third.any()
    del view, third
    assert pool.free_bytes() == 2 * (2 * 3 * 2)
    other = pool.zeros((4,), torch.int16, "cpu")
    assert list(pool.buffers) == [((4,), torch.int16, torch.device("cpu"), False)]
    assert pool.free_bytes() == 0 and other.shape == (4,)


def test_the_pool_keeps_inference_tensors_apart():
    """A buffer made under inference_mode (an inference tensor) is never handed to a cache
    outside it, where its appends would raise."""
    pool = S.BufferPool()
    with torch.inference_mode():
        made = pool.zeros((2, 3), torch.int16, "cpu")
    del made
    outside = pool.zeros((2, 3), torch.int16, "cpu")
    outside[0, 0] = 1
    assert not outside.is_inference()
    del outside
    with torch.inference_mode():
        inside = pool.zeros((2, 3), torch.int16, "cpu")
        inside[0, 0] = 1
