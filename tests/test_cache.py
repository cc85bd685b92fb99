"""RocketKVCache: its ops against the reference, and generate() through it against the
DynamicCache path of the pass and the eager oracle (same tokens)."""
import logging

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from models import VOCAB, generate, stored_lengths, tiny_hf
from rkv_compile.eager import generate as oracle_generate
from transformers import LlamaConfig

import rkv_compile
from rkv_compile import RocketKVConfig, stored
from rkv_compile import state as S
from rkv_compile.backend import make_backend
from rkv_compile.cache import RocketKVCache
from rkv_compile.hf import cache_argument
from rkv_compile.kernels import cache_ops

rewrite_only = make_backend(compiler=lambda gm, example_inputs: gm.forward)


@settings(deadline=None, max_examples=15)
@given(B=st.integers(1, 3), H=st.integers(1, 2), stored_=st.lists(st.integers(0, 12), min_size=3,
       max_size=3), new=st.integers(2, 9), room=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_extend_appends_a_turn_to_each_sequence(B, H, stored_, new, room, seed):
    """A new turn kept whole (RocketKVCache without the pass): each row's stored slots, then its
    new tokens, in tensors with room for `room` more, stored and position grown by the turn;
    as the fake kernel says."""
    gen = torch.Generator().manual_seed(seed)
    D = 8
    keys, values, layer = S.allocate(B, H, D, D, max(stored_) + 3, "", torch.float32, "cpu")
    layer.keys.copy_(torch.randn(layer.keys.shape, generator=gen))
    layer.values.copy_(torch.randn(layer.values.shape, generator=gen))
    layer.set_word(S.Word.STORED, torch.tensor(stored_[:B]))
    layer.set_word(S.Word.POSITION, torch.tensor(stored_[:B]) + 5)
    new_k, new_v = (torch.randn(B, H, new, D, generator=gen) for _ in range(2))
    out_keys, out_values = torch.ops.rocketkv.extend(keys, values, new_k, new_v, room)
    out = S.read(out_keys, out_values)
    assert out.keys.shape[2] == layer.keys.shape[2] + new + room
    assert out.stored.tolist() == [n + new for n in stored_[:B]]
    assert out.position.tolist() == [n + 5 + new for n in stored_[:B]]
    for b, n in enumerate(stored_[:B]):
        assert torch.equal(out.keys[b, :, :n + new], torch.cat([layer.keys[b, :, :n], new_k[b]], 1))
        assert torch.equal(out.values[b, :, :n + new],
                           torch.cat([layer.values[b, :, :n], new_v[b]], 1))
    torch.library.opcheck(torch.ops.rocketkv.extend, (keys, values, new_k, new_v, room),
                          test_utils=("test_schema", "test_faketensor"))


def test_full_cache_append_is_an_error():
    keys, values, layer = S.allocate(1, 1, 8, 8, 4, "", torch.float32, "cpu")
    layer.set_word(S.Word.STORED, 4)
    with pytest.raises(RuntimeError, match="full"):
        cache_ops.append(keys, values, torch.zeros(1, 1, 1, 8), torch.zeros(1, 1, 1, 8), "")


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


@settings(deadline=None, max_examples=4)
# The model's argmax here is its EOS token: generate must not suppress it (the oracle does not).
@example(arch="llama", length=205, budget=64, steps=4, seed=27481)
@given(arch=st.sampled_from(["llama", "qwen2"]), length=st.integers(40, 400),
       budget=st.sampled_from([16, 32, 64]), steps=st.integers(2, 8), seed=st.integers(0, 2**16))
def test_cache_matches_dynamic_cache_path(arch, length, budget, steps, seed):
    """generate() through a RocketKVCache gives the tokens of the DynamicCache path of the pass,
    and of the eager oracle; each layer holds what the plan keeps and the generated tokens, and
    counts the logical length."""
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
    for layer in stored(cache):
        assert layer.lengths == [kept + steps - 1]
        assert layer.positions == [length + steps - 1]
    assert int(cache.get_seq_length()) == length + steps - 1


def test_cache_through_inductor_and_explain():
    """The full backend (Inductor) on a RocketKVCache, and what explain says about its sites."""
    model = tiny_hf("llama")
    options = {"token_budget": 64, "max_new_tokens": 6}
    ids = torch.randint(0, VOCAB, (1, 300), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        report = rkv_compile.explain(
            model.generate, ids, max_new_tokens=3,
            **{cache_argument(): RocketKVCache(model.config, 6)}, options=options)
        kinds = {(s.kv_source, s.rewritten) for s in report.sites}
        assert kinds == {("new RocketKVCache", True), ("RocketKVCache", True)}
        assert "the RocketKVCache stores the 175 tokens rocketkv keeps" in str(report)
        model.forward = torch.compile(model.forward, backend=rkv_compile.rocketkv, options=options)
        tokens = generate(model, ids, 6, RocketKVCache(model.config, 6))[0]
    assert tokens == oracle_generate(model, ids, RocketKVConfig.from_options(options), 6)[0]


def test_one_decode_graph_serves_every_prompt_length():
    """RocketKVCache sizes come from the plan, read at run time: under one compiled forward,
    three prompt lengths share their decode graph (never an uncompiled fallback), with the
    oracle's tokens."""
    model = tiny_hf("llama")
    model.generation_config.eos_token_id = None
    options = {"token_budget": 32, "max_new_tokens": 3}
    prompts = [torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(n))
               for n in (120, 90, 150)]
    want = [oracle_generate(model, ids, RocketKVConfig.from_options(options), 3)[0]
            for ids in prompts]
    graphs = []
    backend = make_backend(compiler=lambda gm, ex: graphs.append(gm) or gm.forward)
    forward = model.forward
    model.forward = torch.compile(forward, backend=lambda gm, ex: backend(gm, ex,
                                                                          options=options))
    try:
        with torch.no_grad():
            got = [model.generate(ids, max_new_tokens=3, do_sample=False,
                                  **{cache_argument(): RocketKVCache(model.config, 3)})
                   [0, ids.shape[1]:].tolist() for ids in prompts]
    finally:
        model.forward = forward
    assert got == want
    assert len(graphs) <= 3   # a static and a symbolic prefill, one decode


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
            logits = forward(tokens[-1][:, None], **{cache_argument(): cache}).logits
        return torch.stack(tokens, 1)

    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="rkv_compile"):
        cache = RocketKVCache(model.config, 4)
        logits = forward(ids, **{cache_argument(): cache}).logits
        alone = decode(cache, logits, 2)
        cache = RocketKVCache(model.config, 4)
        logits = forward(ids, **{cache_argument(): cache}).logits
        cache.batch_repeat_interleave(3)
        repeated = decode(cache, logits.repeat(3, 1, 1), 2)
        assert torch.equal(repeated, alone.expand(3, -1))
        cache.batch_select_indices(torch.tensor([2]))
        assert cache.layers[0].keys.shape[0] == 1
        decode(cache, logits, 1)
    assert "runs uncompiled" not in caplog.text
    if compressed:
        assert stored_lengths(cache)[0] < 150


def test_padded_rocketkv_cache_the_pass_did_not_store_decodes_exactly():
    """A padded prompt stored without the backend keeps its padding in the cache's slots, which
    only the model's mask hides: decode steps under the backend then run the graph as traced,
    exactly, through transformers' mask."""
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
                           **{cache_argument(): cache}).logits
            tokens, step_mask, step_positions = [], mask, positions[:, -1:]
            for _ in range(4):
                tokens.append(logits[:, -1].argmax(-1))
                step_mask = torch.cat([step_mask, torch.ones_like(mask[:, :1])], -1)
                step_positions = step_positions + 1
                logits = step_forward(tokens[-1][:, None], attention_mask=step_mask,
                                      position_ids=step_positions,
                                      **{cache_argument(): cache}).logits
            runs.append(torch.stack(tokens, 1))
    assert torch.equal(runs[0], runs[1])


def test_new_turn_of_a_padded_batch_into_rocketkv_cache_is_refused():
    """Rows evicted apart have their own logical lengths, but transformers slices one new turn
    for every row: refused with a clear error."""
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
                                 **{cache_argument(): cache})
            turn = torch.cat([out, ids[:, :40]], 1)
            with pytest.raises(NotImplementedError, match="new turn of a padded batch"):
                model.generate(turn, attention_mask=torch.cat([mask, torch.ones_like(
                    turn[:, 200:])], 1), max_new_tokens=4, **{cache_argument(): cache})
    finally:
        del model.forward
