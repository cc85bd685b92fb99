"""RocketKVCache: its ops against the reference, and generate() through it against the
DynamicCache path of the pass and the eager oracle (same tokens)."""
import logging

import pytest
import torch
from devices import CUDA, DEVICE, DTYPES
from hypothesis import example, given, settings
from hypothesis import strategies as st
from models import VOCAB, generate, tiny_hf
from rkv_compile.eager import generate as oracle_generate
from transformers import LlamaConfig

import rkv_compile
from rkv_compile import RocketKVConfig
from rkv_compile.backend import make_backend
from rkv_compile.cache import RocketKVCache
from rkv_compile.kernels import reference as R
from rkv_compile.kernels import triton_decode as T

rewrite_only = make_backend(compiler=lambda gm, example_inputs: gm.forward)


@settings(deadline=None, max_examples=40 if CUDA else 10)
@given(B=st.integers(1, 3), H=st.integers(1, 3), D=st.sampled_from([64, 80, 128]),
       chunk=st.integers(0, 4), stored=st.integers(0, 30), room=st.integers(1, 5),
       dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**16))
def test_append_matches_reference(B, H, D, chunk, stored, room, dtype, seed):
    """The Triton append (K/V row, chunk summary, length, position) equals the reference, and the
    summaries stay those of the stored tokens."""
    gen = torch.Generator().manual_seed(seed)
    k, v = (torch.randn(B, H, stored, D, generator=gen).to(dtype).to(DEVICE) for _ in range(2))
    state = R.static_cache(k, v, stored + room, chunk, stored + 7)
    want, got = [t.clone() for t in state], [t.clone() for t in state]
    for _ in range(room):
        new_k, new_v = (torch.randn(B, H, 1, D, generator=gen).to(dtype).to(DEVICE)
                        for _ in range(2))
        R.append(*want, new_k, new_v)
        T.append(*got, new_k, new_v)
        k = torch.cat([k, new_k], dim=2)
    for a, b in zip(want, got):
        assert torch.equal(a, b)
    keys, _, key_min, key_max, lengths, positions = got
    assert lengths.tolist() == [stored + room] * B and positions.tolist() == [stored + room + 7] * B
    assert torch.equal(keys[:, :, : stored + room], k)
    if chunk:
        kmin, kmax = R.chunk_bounds(k, chunk)
        assert torch.equal(key_min[:, :, : kmin.shape[2]], kmin.to(dtype))
        assert torch.equal(key_max[:, :, : kmax.shape[2]], kmax.to(dtype))


@settings(deadline=None, max_examples=15)
@given(B=st.integers(1, 3), H=st.integers(1, 2), chunk=st.integers(0, 4),
       stored=st.lists(st.integers(0, 12), min_size=3, max_size=3), new=st.integers(2, 9),
       room=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_extend_cache_appends_a_turn_to_each_sequence(B, H, chunk, stored, new, room, seed):
    """A new turn (the op RocketKVCache calls for several new tokens): each sequence's stored
    slots, then its new tokens, in buffers with room for `room` more in whole chunks, summaries
    of the stored tokens, lengths and positions grown by the turn; as the fake kernel says."""
    gen = torch.Generator().manual_seed(seed)
    capacity, D = max(stored) + 3, 8
    k, v = (torch.randn(B, H, capacity, D, generator=gen) for _ in range(2))
    state = list(R.static_cache(k, v, capacity, chunk, 0))
    state[4] = torch.tensor(stored[:B], dtype=torch.int32)
    state[5] = torch.tensor(stored[:B]) + 5
    new_k, new_v = (torch.randn(B, H, new, D, generator=gen) for _ in range(2))
    out = torch.ops.rocketkv.extend_cache(*state, new_k, new_v, room)
    keys, values, key_min, key_max, lengths, positions = out
    slots, capacity = keys.shape[2], state[0].shape[2]   # (whole chunks)
    assert slots >= capacity + new + room and (not chunk or slots % chunk == 0)
    assert slots - (capacity + new + room) < max(chunk, 1)
    assert lengths.tolist() == [n + new for n in stored[:B]]
    assert positions.tolist() == [n + 5 + new for n in stored[:B]]
    for b, n in enumerate(stored[:B]):
        want = torch.cat([k[b, :, :n], new_k[b]], 1)
        assert torch.equal(keys[b, :, :n + new], want) and not keys[b, :, n + new:].any()
        assert torch.equal(values[b, :, :n + new], torch.cat([v[b, :, :n], new_v[b]], 1))
        if chunk:
            kmin, kmax = R.chunk_bounds(want[None], chunk)
            assert torch.equal(key_min[b:b + 1, :, :kmin.shape[2]], kmin)
            assert torch.equal(key_max[b:b + 1, :, :kmax.shape[2]], kmax)
    torch.library.opcheck(torch.ops.rocketkv.extend_cache, (*state, new_k, new_v, room),
                          test_utils=("test_schema", "test_faketensor"))


def test_full_cache_append_is_an_error():
    state = R.static_cache(torch.zeros(1, 1, 4, 8), torch.zeros(1, 1, 4, 8), 4, 2, 4)
    with pytest.raises(RuntimeError, match="full"):
        R.append(*state, torch.zeros(1, 1, 1, 8), torch.zeros(1, 1, 1, 8))


def test_static_cache_layout():
    k = torch.randn(2, 2, 7, 16)
    keys, values, key_min, key_max, lengths, positions = R.static_cache(k, k, 10, 3, 40)
    assert keys.shape == (2, 2, 12, 16) and key_min.shape == (2, 2, 4, 16)  # whole chunks
    assert torch.equal(keys[:, :, :7], k) and not keys[:, :, 7:].any()
    assert torch.equal(key_min[:, :, :3], R.chunk_bounds(k, 3)[0])
    assert torch.isposinf(key_min[:, :, 3]).all() and torch.isneginf(key_max[:, :, 3]).all()
    assert lengths.tolist() == [7, 7] and positions.tolist() == [40, 40]
    with pytest.raises(ValueError, match="do not fit"):
        R.static_cache(k, k, 5, 0, 7)


def test_cache_arguments_are_checked():
    config = LlamaConfig(num_hidden_layers=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        RocketKVCache(config, 0)
    config.layer_types = ["full_attention", "sliding_attention"]
    with pytest.raises(NotImplementedError, match="sliding_attention"):
        RocketKVCache(config, 4)


@settings(deadline=None, max_examples=6)
@given(length=st.integers(20, 320), steps=st.integers(2, 8), seed=st.integers(0, 2**16))
def test_eager_cache_is_exact(length, steps, seed):
    """Without the backend a RocketKVCache is a plain exact cache."""
    model = tiny_hf("llama")
    ids = torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        assert generate(model, ids, steps, RocketKVCache(model.config, steps))[0] == \
            generate(model, ids, steps)[0]


@settings(deadline=None, max_examples=6)
# The model's argmax here is its EOS token: generate must not suppress it (the oracle does not).
@example(arch="llama", length=205, budget=64, steps=4, seed=27481)
@given(arch=st.sampled_from(["llama", "qwen2"]), length=st.integers(40, 400),
       budget=st.sampled_from([16, 32, 64]), steps=st.integers(2, 8), seed=st.integers(0, 2**16))
def test_cache_matches_dynamic_cache_path(arch, length, budget, steps, seed):
    """The property the fast path must keep: generate() through RocketKVCache gives the tokens of
    the DynamicCache path of the pass, and of the eager oracle; each layer holds the plan's
    prompt budget and room for the new tokens (whole chunks), filled with the kept prompt and the
    generated tokens."""
    torch._dynamo.reset()
    model = tiny_hf(arch)
    options = {"token_budget": budget, "max_new_tokens": steps}
    backend = lambda gm, ex: rewrite_only(gm, ex, options=options)  # noqa: E731
    ids = torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))
    cache = RocketKVCache(model.config, steps)
    with torch.no_grad():
        tokens = generate(model, ids, steps, cache, backend)[0]
        torch._dynamo.reset()
        dynamic = generate(model, ids, steps, None, backend)[0]
    oracle, _ = oracle_generate(model, ids, RocketKVConfig.from_options(options), steps)
    assert tokens == dynamic == oracle
    plan = RocketKVConfig.from_options(options).plan(length, 16)
    kept = min(length, plan.prompt_budget)
    for layer in cache.layers:
        assert layer.keys.shape[2] == -(-(plan.prompt_budget + steps) // plan.chunk) * plan.chunk
        assert layer.lengths.tolist() == [kept + steps - 1]
        assert layer.positions.tolist() == [length + steps - 1]
    assert int(cache.get_seq_length()) == length + steps - 1


def test_cache_through_inductor_and_explain():
    """The full backend (Inductor) on a RocketKVCache, and what explain says about its sites."""
    model = tiny_hf("llama")
    options = {"token_budget": 64, "max_new_tokens": 6}
    ids = torch.randint(0, VOCAB, (1, 300), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        report = rkv_compile.explain(
            lambda: model.generate(ids, max_new_tokens=3,
                                   past_key_values=RocketKVCache(model.config, 6)),
            options=options)
        kinds = {(s.kv_source, s.rewritten) for s in report.sites}
        assert kinds == {("new RocketKVCache", True), ("RocketKVCache", True)}
        assert "the 175 tokens rocketkv keeps in 182-token buffers" in str(report)
        model.forward = torch.compile(model.forward, backend=rkv_compile.rocketkv, options=options)
        tokens = generate(model, ids, 6, RocketKVCache(model.config, 6))[0]
    assert tokens == oracle_generate(model, ids, RocketKVConfig.from_options(options), 6)[0]


def test_each_prompt_length_gets_a_compiled_decode_graph():
    """RocketKVCache buffers are sized by the plan: under one compiled forward, a new prompt
    length recompiles the decode graph for its plan (never the uncompiled fallback), and the
    tokens stay the oracle's."""
    model = tiny_hf("llama")
    model.generation_config.eos_token_id = None
    options = {"token_budget": 32, "max_new_tokens": 3}
    prompts = [torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(n))
               for n in (120, 90, 150)]
    want = [oracle_generate(model, ids, RocketKVConfig.from_options(options), 3)[0]
            for ids in prompts]
    warnings = []
    handler = logging.Handler()
    handler.emit = warnings.append
    logging.getLogger("rkv_compile").addHandler(handler)
    forward = model.forward
    model.forward = torch.compile(forward, backend=lambda gm, ex: rewrite_only(gm, ex,
                                                                               options=options))
    try:
        with torch.no_grad():
            got = [model.generate(ids, max_new_tokens=3, do_sample=False,
                                  past_key_values=RocketKVCache(model.config, 3))
                   [0, ids.shape[1]:].tolist() for ids in prompts]
    finally:
        model.forward = forward
        logging.getLogger("rkv_compile").removeHandler(handler)
    assert got == want
    assert not [w for w in warnings if "runs uncompiled" in w.getMessage()]


def test_compiled_graphs_keep_dynamo_input_metadata():
    """AOTAutograd finds the static inputs (RocketKVCache's buffers, updated in place, and the
    weights) from what Dynamo attached to its graph; without it CUDA graphs skip every decode
    graph. The rewritten graphs handed to the compiler keep it."""
    model = tiny_hf("llama")
    options = {"token_budget": 32, "max_new_tokens": 3}
    compiled = []

    def keep(gm, example_inputs):
        compiled.append(gm)
        return gm.forward

    backend = make_backend(compiler=keep)
    ids = torch.randint(0, VOCAB, (1, 120), generator=torch.Generator().manual_seed(3))
    generate(model, ids, 3, RocketKVCache(model.config, 3),
             lambda gm, ex: backend(gm, ex, options=options))
    assert len(compiled) == 2   # prefill, decode
    for gm in compiled:
        assert "dynamo_compile_id" in gm.meta and hasattr(gm, "_param_name_to_source")
        assert all(hasattr(p, "_dynamo_source") for p in gm.graph.find_nodes(op="placeholder"))


@pytest.mark.parametrize("compressed", [False, True])
def test_batch_repeat_then_select(compressed, caplog):
    """A prompt prefilled once and repeated in the batch decodes as the prompt alone, in every
    row (the decode graph is compiled for the new batch: no uncompiled fallback); selecting rows
    keeps them."""
    model = tiny_hf("llama")
    options = {"token_budget": 32, "max_new_tokens": 4}
    ids = torch.randint(0, VOCAB, (1, 150), generator=torch.Generator().manual_seed(4))
    forward = model.forward
    if compressed:
        forward = torch.compile(forward, backend=lambda gm, ex: rewrite_only(gm, ex,
                                                                             options=options))

    def decode(cache, logits, steps):
        tokens = []
        for _ in range(steps):
            tokens.append(logits[:, -1].argmax(-1))
            logits = forward(tokens[-1][:, None], past_key_values=cache).logits
        return torch.stack(tokens, 1)

    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="rkv_compile"):
        cache = RocketKVCache(model.config, 4)
        logits = forward(ids, past_key_values=cache).logits
        alone = decode(cache, logits, 2)
        cache = RocketKVCache(model.config, 4)
        logits = forward(ids, past_key_values=cache).logits
        cache.batch_repeat_interleave(3)
        repeated = decode(cache, logits.repeat(3, 1, 1), 2)
        assert torch.equal(repeated, alone.expand(3, -1))
        cache.batch_select_indices(torch.tensor([2]))
        assert cache.layers[0].keys.shape[0] == 1
        decode(cache, logits, 1)
    assert "runs uncompiled" not in caplog.text
    if compressed:
        assert cache.layers[0].keys.shape[2] < 150


def test_padded_batch_into_rocketkv_cache_where_rows_cannot_be_evicted_apart():
    """PyramidKV budgets layers differently, so a padded batch is not stored row by row into a
    RocketKVCache: refused with a clear error, never evicted and mis-masked. An unpadded batch:
    each row as it alone."""
    model = tiny_hf("llama")
    ids = torch.randint(0, VOCAB, (2, 300), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :120] = 0
    options = {"token_budget": 64, "max_new_tokens": 4, "policy": "pyramidkv"}
    model.forward = torch.compile(
        model.forward, backend=lambda gm, inputs: rewrite_only(gm, inputs, options=options))
    try:
        with torch.no_grad(), pytest.raises(NotImplementedError,
                                            match="'pyramidkv' cannot evict rows apart"):
            model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                           past_key_values=RocketKVCache(model.config, 4))
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                                 do_sample=False, past_key_values=RocketKVCache(model.config, 4))
    finally:
        del model.forward
    config = RocketKVConfig.from_options(options)
    for row in range(2):
        assert out[row, 300:].tolist() == oracle_generate(model, ids[row:row + 1], config, 4)[0]


def test_padded_rocketkv_cache_the_pass_did_not_store_decodes_exactly():
    """A padded prompt stored without the backend keeps its padding in the cache's slots, which
    only the model's mask hides: decode steps under the backend then run the exact graph (the
    rewritten one attends to every stored slot)."""
    model = tiny_hf("llama")
    ids = torch.randint(0, VOCAB, (2, 200), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[0, :50] = 0
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    forward = torch.compile(model.forward, backend=lambda gm, inputs: rewrite_only(
        gm, inputs, options={"token_budget": 64, "max_new_tokens": 4}))
    runs = []
    with torch.no_grad():
        for step_forward in (model.forward, forward):
            cache = RocketKVCache(model.config, 4)
            logits = model(ids, attention_mask=mask, position_ids=positions,
                           past_key_values=cache).logits
            tokens, step_mask, step_positions = [], mask, positions[:, -1:]
            for _ in range(4):
                tokens.append(logits[:, -1].argmax(-1))
                step_mask = torch.cat([step_mask, torch.ones_like(mask[:, :1])], -1)
                step_positions = step_positions + 1
                logits = step_forward(tokens[-1][:, None], attention_mask=step_mask,
                                      position_ids=step_positions, past_key_values=cache).logits
            runs.append(torch.stack(tokens, 1))
    assert torch.equal(runs[0], runs[1])


def test_new_turn_of_a_padded_batch_into_rocketkv_cache_is_refused():
    """Rows evicted apart hold different numbers of tokens, but transformers masks a new turn's
    slots with one offset for every row: refused with a clear error."""
    model = tiny_hf("llama")
    ids = torch.randint(0, VOCAB, (2, 200), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :60] = 0
    options = {"token_budget": 64, "max_new_tokens": 4}
    model.forward = torch.compile(
        model.forward, backend=lambda gm, inputs: rewrite_only(gm, inputs, options=options))
    cache = RocketKVCache(model.config, 4)
    try:
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                 past_key_values=cache)
            turn = torch.cat([out, ids[:, :40]], 1)
            with pytest.raises(NotImplementedError, match="new turn of a padded batch"):
                model.generate(turn, attention_mask=torch.cat([mask, torch.ones_like(
                    turn[:, 200:])], 1), max_new_tokens=4, past_key_values=cache)
    finally:
        del model.forward
