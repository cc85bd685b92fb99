"""The runtime contract, tested through transformers' `generate` as users drive it: every way
either compresses with the eager oracle's tokens (`rkv_compile.eager.generate_like`, the same
generate with the policy applied eagerly) or runs exact with a RuntimeWarning from rkv_compile.

A property test draws sessions: sequences of calls in one process over one model, with prompt
lengths, caches, generate modes (greedy, beam search, sampling several sequences) and option
sets drawn, each option set compiled once and reused, as an eval loop or a sweep would. Then the
cases users met, one test each."""
import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st
from models import (VOCAB, TinyGPT, compiled, greedy, logits_along, oracle_gpt_tokens, prompt,
                    stored_lengths, tiny_hf)
from transformers import CompileConfig, DynamicCache, LlamaConfig, LlamaForCausalLM

import rkv_compile
from rkv_compile import RocketKVConfig
from rkv_compile.backend import make_backend
from rkv_compile.cache import RocketKVCache
from rkv_compile.eager import generate as oracle_generate, generate_like
from rkv_compile.hf import cache_argument, returned_cache
from rkv_compile.passes.sites import value_of
from rkv_compile.state import stored

STEPS = 5
OPTION_SETS = [
    {"token_budget": 64, "max_new_tokens": STEPS},
    {"token_budget": 48, "max_new_tokens": STEPS, "policy": "snapkv"},
    {"token_budget": 48, "max_new_tokens": STEPS, "policy": "h2o"},
    {"token_budget": 64, "max_new_tokens": STEPS, "kv_bits": 4},
]
MODES = {
    "greedy": {"do_sample": False},
    "beams": {"do_sample": False, "num_beams": 2},
    "sampled": {"do_sample": True, "num_return_sequences": 2, "top_k": 8},
}


def tiny_llama(seed: int = 0):
    """A tiny random Llama whose compressed and exact tokens differ (initializer_range 0.3)."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048, initializer_range=0.3,
                         attn_implementation="sdpa")
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    return model


class Session:
    """One model in one process; each option set compiled once (`model.forward = torch.compile
    (...)`), swapped in per call."""

    def __init__(self, model):
        self.model, self.eager, self.forwards = model, model.forward, {}

    def generate(self, ids, options: dict | None, cache: str, mode: str, seed: int, **kwargs):
        key = repr(sorted(options.items())) if options is not None else None
        if options is not None and key not in self.forwards:
            self.forwards[key] = compiled(self.eager, options, inductor=False)
        self.model.forward = self.forwards[key] if options is not None else self.eager
        cache_object = RocketKVCache(self.model.config, STEPS) if cache == "rocketkv" else None
        torch.manual_seed(seed)
        try:
            with torch.no_grad():
                return self.model.generate(ids, max_new_tokens=STEPS, min_new_tokens=STEPS,
                                           return_dict_in_generate=True, **MODES[mode],
                                           **{cache_argument(): cache_object}, **kwargs)
        finally:
            self.model.forward = self.eager

    def oracle(self, ids, options: dict, mode: str, seed: int):
        torch.manual_seed(seed)
        return generate_like(self.model, ids, RocketKVConfig.from_options(options),
                             max_new_tokens=STEPS, min_new_tokens=STEPS,
                             return_dict_in_generate=True, **MODES[mode]).sequences


def assert_compressed_as_the_oracle(session, ids, options, cache, mode, seed):
    out = session.generate(ids, options, cache, mode, seed)
    assert torch.equal(out.sequences, session.oracle(ids, options, mode, seed))
    config = RocketKVConfig.from_options(options)
    layers = stored(returned_cache(out))
    assert all(layer is not None for layer in layers), "every layer is compressed"
    budget = config.plan(ids.shape[1], 16).prompt_budget
    if ids.shape[1] > budget and not config.method.keeps_history and config.method.budgeted:
        assert max(layers[0].lengths) < ids.shape[1] + STEPS - 1
    return out


CALLS = st.tuples(st.integers(30, 260), st.sampled_from(["dynamic", "rocketkv"]),
                  st.sampled_from(sorted(MODES)), st.integers(0, len(OPTION_SETS) - 1),
                  st.integers(0, 2**16))


@settings(deadline=None, max_examples=4)
@given(calls=st.lists(CALLS, min_size=2, max_size=4))
def test_generate_sessions_compress_as_the_oracle(calls):
    """Drawn sequences of generate calls in one process: each call's sequences are the oracle's
    and its cache is compressed, whatever came before it (prompt lengths, option sets, modes,
    caches)."""
    torch._dynamo.reset()
    session = Session(tiny_llama())
    for length, cache, mode, options, seed in calls:
        ids = prompt(length, seed=seed)
        assert_compressed_as_the_oracle(session, ids, OPTION_SETS[options], cache, mode, seed)


def test_compression_changes_this_models_tokens():
    """The oracle comparisons are not vacuous: here compressed and exact tokens differ."""
    session = Session(tiny_llama())
    ids = prompt(250, seed=3)
    exact = session.generate(ids, None, "dynamic", "greedy", 0).sequences
    for options in OPTION_SETS[:2]:
        assert not torch.equal(session.oracle(ids, options, "greedy", 0), exact)


@pytest.mark.parametrize("cache", ["dynamic", "rocketkv"])
def test_an_eval_loop_over_twelve_prompt_lengths(cache):
    """One compiled forward, twelve prompt lengths: every prompt compressed as the oracle, by a
    few graphs (none per length: plans are read at run time)."""
    graphs = []
    backend = make_backend(compiler=lambda gm, ex: graphs.append(gm) or gm.forward)
    options = OPTION_SETS[0]
    session = Session(tiny_llama())
    session.forwards[repr(sorted(options.items()))] = torch.compile(
        session.eager, backend=lambda gm, ex: backend(gm, ex, options=options))
    for length in range(100, 220, 10):
        assert_compressed_as_the_oracle(session, prompt(length, seed=length), options, cache,
                                        "greedy", 0)
    # prefill (a static then a symbolic length), decode (transformers 5.17: one more, as its
    # attention mask's length turns symbolic)
    assert len(graphs) <= 5


def test_an_eval_loop_reuses_dropped_caches_and_never_a_held_one():
    """generate calls of one shape store their caches in the memory of the last dropped one
    (on CUDA: at the same addresses, so the recorded decode graphs replay), never in a cache
    someone holds: a held cache keeps its tokens through later calls and can be continued."""
    from rkv_compile.state import POOL
    session, options = Session(tiny_llama()), OPTION_SETS[0]

    def storages(out):
        return {layer.keys.untyped_storage().data_ptr() for layer in returned_cache(out).layers}

    held = assert_compressed_as_the_oracle(session, prompt(220, seed=1), options, "dynamic",
                                           "greedy", 0)
    held_stored = [(s.keys.clone(), s.values.clone(), s.lengths) for s in
                   stored(returned_cache(held))]
    recycled = POOL.recycled
    second = assert_compressed_as_the_oracle(session, prompt(220, seed=2), options, "dynamic",
                                             "greedy", 0)
    assert not storages(second) & storages(held)
    addresses = storages(second)
    del second
    third = assert_compressed_as_the_oracle(session, prompt(221, seed=3), options, "dynamic",
                                            "greedy", 0)
    assert storages(third) == addresses and POOL.recycled > recycled
    for (keys, values, lengths), now in zip(held_stored, stored(returned_cache(held))):
        assert torch.equal(keys, now.keys) and torch.equal(values, now.values)
        assert lengths == now.lengths
    # the held cache decodes on: its next token is the oracle's
    forward = session.forwards[repr(sorted(options.items()))]
    with torch.no_grad():
        logits = forward(held.sequences[:, -1:], position_ids=torch.tensor([[220 + STEPS - 1]]),
                         **{cache_argument(): returned_cache(held)}, use_cache=True).logits
    want = generate_like(session.model, prompt(220, seed=1), RocketKVConfig.from_options(options),
                         max_new_tokens=STEPS + 1, min_new_tokens=STEPS + 1, do_sample=False)
    assert int(logits[0, -1].argmax()) == int(want[0, -1])


def test_a_new_cache_shape_releases_the_dropped_ones():
    """The pool keeps the free memory of one shape only: a call of another shape frees it.
    (gc.collect: Dynamo's tracing holds a compiling call's cache in reference cycles.)"""
    import gc

    from rkv_compile.state import POOL
    POOL.release()
    session, options = Session(tiny_llama()), OPTION_SETS[0]
    shapes = []
    for length in (220, 2000):
        assert_compressed_as_the_oracle(session, prompt(length), options, "dynamic", "greedy", 0)
        gc.collect()
        assert len(POOL.buffers) == 1
        (shape, *_), buffers = next(iter(POOL.buffers.items()))
        assert POOL.free_bytes() == sum(b.numel() * b.element_size() for b in buffers) > 0
        shapes.append(shape)
    assert shapes[0] != shapes[1]


def test_calls_in_and_out_of_inference_mode_compress_as_the_oracle():
    """An eval harness under torch.inference_mode, then a call outside it, then inside again:
    each cache appends in place where it was made (a dropped inference tensor is not lent to
    a cache outside inference mode)."""
    session, options = Session(tiny_llama()), OPTION_SETS[0]
    key = repr(sorted(options.items()))
    session.forwards[key] = compiled(session.eager, options, inductor=False)
    for inference in (True, True, False, True):   # the first call's cache outlives it (compiling)
        ids = prompt(220, seed=5)
        session.model.forward = session.forwards[key]
        try:
            with torch.inference_mode() if inference else torch.no_grad():
                out = session.model.generate(ids, max_new_tokens=STEPS, min_new_tokens=STEPS,
                                             do_sample=False)
        finally:
            session.model.forward = session.eager
        assert torch.equal(out, session.oracle(ids, options, "greedy", 0))


@pytest.mark.parametrize("cache", ["dynamic", "rocketkv"])
def test_beam_search_compresses_as_the_oracle(cache):
    session = Session(tiny_llama())
    out = assert_compressed_as_the_oracle(session, prompt(220, seed=5), OPTION_SETS[0], cache,
                                          "beams", 0)
    assert out.sequences.shape[0] == 1


def test_model_compile_form_compresses():
    """`model.compile(backend="rocketkv", options=...)` compiles what generate calls."""
    model = tiny_llama()
    ids = prompt(220, seed=6)
    expected = Session(model).oracle(ids, OPTION_SETS[0], "greedy", 0)
    model.compile(backend="rocketkv", options=OPTION_SETS[0])
    try:
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=STEPS, min_new_tokens=STEPS,
                                 do_sample=False, return_dict_in_generate=True)
    finally:
        model._compiled_call_impl = None
    assert torch.equal(out.sequences, expected)
    assert stored(returned_cache(out))[0] is not None


@pytest.mark.parametrize("cache", ["dynamic", "rocketkv"])
def test_compile_config_alone_is_exact(cache):
    """transformers' compile_config compiles decode steps only, and only for a compileable cache
    (a RocketKVCache is not one: generate would otherwise bypass the pass): generate runs
    eagerly and exactly, and with a RocketKVCache rkv_compile says the prompt is stored whole."""
    session = Session(tiny_llama())
    ids = prompt(220, seed=7)
    exact = session.generate(ids, None, "dynamic", "greedy", 0).sequences
    config = CompileConfig(backend="rocketkv", options=OPTION_SETS[0])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = session.generate(ids, None, cache, "greedy", 0, compile_config=config)
    assert torch.equal(out.sequences, exact)
    ours = [w for w in caught if "stores a prompt whole" in str(w.message)]
    assert len(ours) == (1 if cache == "rocketkv" else 0)


def test_compile_config_beside_a_compiled_forward_compresses():
    """With the forward compiled too, generate's prefill and decode both go through the pass."""
    session = Session(tiny_llama())
    ids = prompt(220, seed=8)
    config = CompileConfig(backend="rocketkv", options=OPTION_SETS[0])
    out = session.generate(ids, OPTION_SETS[0], "rocketkv", "greedy", 0, compile_config=config)
    assert torch.equal(out.sequences, session.oracle(ids, OPTION_SETS[0], "greedy", 0))


def test_compiling_the_module_does_not_reach_generate():
    """`torch.compile(model).generate(...)` runs the module's own generate, whose forward is
    not the compiled one: uncompressed and exact. (The README's usage says so.)"""
    model = tiny_llama()
    ids = prompt(220, seed=9)
    with torch.no_grad():
        exact = model.generate(ids, max_new_tokens=STEPS, do_sample=False)
        out = torch.compile(model, backend="rocketkv", options=OPTION_SETS[0]).generate(
            ids, max_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(out.sequences, exact) and stored(returned_cache(out))[0] is None


def test_bad_options_raise_value_error_at_the_first_call():
    model = tiny_llama()
    model.forward = torch.compile(model.forward, backend="rocketkv",
                                  options={"token_budget": 64, "kernel_size": 4})
    with pytest.raises(ValueError, match="kernel_size"):
        with torch.no_grad():
            model.generate(prompt(50), max_new_tokens=2)


def test_the_whole_prompt_is_released_by_the_first_decode_step():
    """A prefill that computes its positions (an arange, as Llama's forward does without
    position_ids, and transformers 5.17's generate) keeps the whole prompt beside the
    compressed cache until a decode step shows its positions do not derive from the stored
    length; that step releases it."""
    import rkv_compile.backend as runtime
    model = tiny_llama()
    forward = compiled(model.forward, OPTION_SETS[0], inductor=False)
    cache = DynamicCache(config=model.config)
    ids = prompt(220, seed=12)
    with torch.no_grad():
        logits = forward(ids, **{cache_argument(): cache}, use_cache=True).logits
        assert cache.layers[0].keys.untyped_storage() in runtime.WHOLE_PROMPTS
        forward(logits[:, -1:].argmax(-1), position_ids=torch.tensor([[220]]),
                **{cache_argument(): cache}, use_cache=True)
    assert stored(cache)[0] is not None and stored(cache)[0].lengths[0] < 220
    assert cache.layers[0].keys.untyped_storage() not in runtime.WHOLE_PROMPTS


def test_a_full_rocketkv_cache_names_its_argument():
    session = Session(tiny_llama())
    session.model.forward = compiled(session.eager, OPTION_SETS[0], inductor=False)
    cache = RocketKVCache(session.model.config, 3)
    with pytest.raises(RuntimeError, match="max_new_tokens"), torch.no_grad():
        session.model.generate(prompt(220), max_new_tokens=20, min_new_tokens=20,
                               do_sample=False, **{cache_argument(): cache})


@pytest.mark.parametrize("options", [OPTION_SETS[0], OPTION_SETS[3]], ids=["exact", "codes"])
def test_a_dynamic_cache_grows_past_the_options_max_new_tokens(options):
    """The option sizes a DynamicCache for 5 tokens; generating 24 grows it (the plan stays the
    prompt's; a quantized cache's codes move after its new slots), with the oracle's tokens."""
    session = Session(tiny_llama())
    ids = prompt(220, seed=10)
    session.model.forward = compiled(session.eager, options, inductor=False)
    try:
        with torch.no_grad():
            out = session.model.generate(ids, max_new_tokens=24, min_new_tokens=24,
                                         do_sample=False, return_dict_in_generate=True)
    finally:
        session.model.forward = session.eager
    want = generate_like(session.model, ids, RocketKVConfig.from_options(options),
                         max_new_tokens=24, min_new_tokens=24, do_sample=False)
    assert torch.equal(out.sequences, want)
    assert stored_lengths(returned_cache(out))[0] == stored(returned_cache(out))[0].lengths[0]


def cuda_decode_backend(monkeypatch, graphs: list):
    """The backend as on CUDA (`on_cuda` forced, decode ops taken as CUDA-graph capturable), run
    on the CPU: prefill graphs as FX, each decode graph appended to `graphs`."""
    import rkv_compile.backend as runtime

    class OnCuda(runtime.Runtime):
        def __init__(self, *args):
            super().__init__(*args[:-1], True)

    monkeypatch.setattr(runtime, "Runtime", OnCuda)
    monkeypatch.setattr(runtime, "_capturable", lambda rewritten: True)   # as the Triton ops
    return make_backend(compiler=lambda gm, ex: gm.forward,
                        decode_compiler=lambda gm, ex: graphs.append(gm) or gm.forward)


@pytest.mark.parametrize("cache", ["dynamic", "rocketkv"])
def test_decode_graphs_per_cache_size_serve_every_step(cache, monkeypatch):
    """On CUDA a decode step is compiled per cache size, its integer inputs fixed (CUDA graphs
    take only tensors). The attention mask's length grows every step but is dead once attention
    is rewritten: one graph serves all steps, with the oracle's tokens. The CUDA path, run here
    on the CPU (`on_cuda` forced)."""
    graphs = []
    backend = cuda_decode_backend(monkeypatch, graphs)
    session = Session(tiny_llama())
    options = OPTION_SETS[0]
    session.forwards[repr(sorted(options.items()))] = torch.compile(
        session.eager, backend=lambda gm, ex: backend(gm, ex, options=options))
    assert_compressed_as_the_oracle(session, prompt(210, seed=4), options, cache, "greedy", 0)
    assert len(graphs) == 1
    placeholders = graphs[0].graph.find_nodes(op="placeholder")
    assert not any(isinstance(value_of(p), torch.SymInt) or p.type is int for p in placeholders)
    assert all(p.users for p in placeholders)   # the mask, dead, is no input either
    appends = [n for n in graphs[0].graph.nodes
               if str(n.target).startswith("rocketkv.append_")]
    assert len(appends) == 2   # the token into each layer
    # it returns none of its inputs: a CUDA-graph recording would keep them (the caches) alive
    returned = graphs[0].graph.output_node().args[0]
    assert not any(getattr(out, "op", None) == "placeholder" for out in returned)


def test_a_topk_that_follows_the_prompt_decodes_as_the_oracle(monkeypatch):
    """rocketkv-fine's topk grows with the prompt (RocketKV's is B/2 at any length): the decode
    graph, built for every prompt, holds a list of every slot, and each row attends to its
    header's topk. The Triton decode ops (under the interpreter), head dim 64."""
    from rkv_compile.passes import rewrite
    monkeypatch.setattr(rewrite.SiteDecision, "on_cuda", property(lambda self: True))
    options = {"token_budget": 64, "max_new_tokens": STEPS, "policy": "rocketkv-fine"}
    model = tiny_hf("llama", head_dim=64)
    model.generation_config.eos_token_id = None
    ids = prompt(300, seed=300)
    want = oracle_generate(model, ids, RocketKVConfig.from_options(options), STEPS)[0]
    forward = model.forward
    model.forward = compiled(forward, options, inductor=False)
    try:
        with torch.no_grad():
            got = model.generate(ids, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False)
    finally:
        model.forward = forward
    assert got[0, 300:].tolist() == want


@pytest.mark.parametrize("once, cache", [(True, "dynamic"), (True, "rocketkv"),
                                         (False, "dynamic")])
def test_a_per_size_decode_graph_compiles_its_layers_once(once, cache, monkeypatch):
    """On CUDA, Inductor compiles a decode graph's alike layers once (`compile_layers_once`,
    default on): each layer is two calls of shared subgraphs, cut at the cache's append; off,
    the graph compiles whole. Either way the oracle's tokens. The CUDA path through Inductor,
    on the CPU (`on_cuda` forced)."""
    import rkv_compile.backend as runtime

    outlined = []
    outline = runtime.outline_repeated_layers
    monkeypatch.setattr(runtime, "outline_repeated_layers",
                        lambda gm, inputs: outlined.append(outline(gm, inputs)) or outlined[-1])
    cuda_decode_backend(monkeypatch, [])
    backend = make_backend(decode_compiler=None)
    session = Session(tiny_llama())
    options = {**OPTION_SETS[0], "compile_layers_once": once}
    session.forwards[repr(sorted(options.items()))] = torch.compile(
        session.eager, backend=lambda gm, ex: backend(gm, ex, options=options))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)   # no fallback to the whole graph
        assert_compressed_as_the_oracle(session, prompt(150, seed=2), options, cache, "greedy",
                                        0)
    assert outlined == ([4] if once else [])


def test_without_cuda_graphs_a_decode_step_is_one_symbolic_graph(monkeypatch):
    """Per-size graphs exist for CUDA graphs: with the option off, the CUDA path compiles one
    graph of symbolic sizes for every step."""
    graphs = []
    backend = cuda_decode_backend(monkeypatch, graphs)
    session = Session(tiny_llama())
    options = {**OPTION_SETS[0], "cudagraphs": False}
    session.forwards[repr(sorted(options.items()))] = torch.compile(
        session.eager, backend=lambda gm, ex: backend(gm, ex, options=options))
    assert_compressed_as_the_oracle(session, prompt(210, seed=4), options, "rocketkv", "greedy",
                                    0)
    assert len(graphs) == 1
    assert any(isinstance(n, torch.SymInt) for p in graphs[0].graph.find_nodes(op="placeholder")
               for n in getattr(value_of(p), "shape", ()))


def test_a_per_size_graph_keeps_an_append_fx_does_not_count_impure(monkeypatch):
    """torch 2.11's FX counts a call of a custom op's packet (`torch.ops.rocketkv.append_`, as
    Dynamo traces a RocketKVCache's append) pure: its dead-code elimination dropped the append
    of every decode step on CUDA. The per-size graph keeps it whatever FX says."""
    import rkv_compile.backend as runtime
    from rkv_compile import state as S
    from rkv_compile.kernels import cache_ops

    def step(keys, values, key, value, length):
        torch.ops.rocketkv.append_(keys, values, key, value)
        return key * length

    gm = torch.fx.symbolic_trace(step)
    monkeypatch.setattr(torch.fx.Node, "is_impure",
                        lambda self, *a, **k: self.op in ("placeholder", "output"))
    keys, values = cache_ops.store(torch.randn(1, 2, 20, 8), torch.randn(1, 2, 20, 8), 4)
    new = torch.randn(1, 2, 1, 8)
    run, fixed = runtime._with_sizes_fixed(gm, [keys, values, new, new, 3],
                                           lambda g, inputs: g.forward)
    torch.testing.assert_close(run(keys, values, new, new, 3), new * 3)
    assert S.read(keys, values).stored.tolist() == [21] and fixed == {4: 3}


def test_a_decode_input_growing_every_step_runs_one_symbolic_graph(monkeypatch):
    """A decode step that reads an input growing every step cannot be one graph per cache size:
    after two it runs one graph of symbolic sizes (no CUDA graphs), with a warning, and the
    oracle's tokens. The CUDA path, on the CPU."""
    graphs = []

    class ReadsAGrowingInput(TinyGPT):
        zeros = torch.zeros(1)

        def forward(self, idx, positions=None, past=None):
            logits, presents = super().forward(idx, positions, past)
            logits = logits + self.zeros.sum()
            self.zeros = torch.zeros(self.zeros.shape[0] + 1)
            return logits, presents

    backend = cuda_decode_backend(monkeypatch, graphs)
    options = {"token_budget": 64, "max_new_tokens": 8}
    model, ids = ReadsAGrowingInput().eval(), prompt(200, seed=6)
    forward = torch.compile(model, backend=lambda gm, ex: backend(gm, ex, options=options))
    with pytest.warns(RuntimeWarning, match="change size from step to step"):
        tokens, _ = greedy(forward, ids, 8)
    assert tokens == oracle_gpt_tokens(model, ids, RocketKVConfig.from_options(options), 8)[0]
    symbolic = [any(isinstance(value_of(p), torch.SymInt)
                    for p in g.graph.find_nodes(op="placeholder")) for g in graphs]
    assert symbolic[-1] and not any(symbolic[:-1]) and len(graphs) >= 3


def test_near_the_recompile_limit_prompts_stay_exact():
    """Dynamo runs a function eagerly after `recompile_limit` graphs, and an eager decode step
    cannot read a compressed cache: near the limit a prompt stays exact, with a warning, and
    when the limit is reached the backend says so too. Never wrong tokens."""
    session = Session(tiny_llama())
    ids = prompt(220, seed=11)
    exact = session.generate(ids, None, "dynamic", "greedy", 0).sequences
    limit = torch._dynamo.config.recompile_limit
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            session.generate(ids, OPTION_SETS[0], "dynamic", "greedy", 0)  # installs the backend
            torch._dynamo.config.recompile_limit = 2
            outs = [session.generate(prompt(n, seed=n), OPTION_SETS[i % 2], "dynamic",
                                     "greedy", 0) for i, n in enumerate((220, 221, 222, 223))]
        finally:
            torch._dynamo.config.recompile_limit = limit
    messages = [str(w.message) for w in caught if "rocketkv" in str(w.message)]
    assert any("recompile_limit" in m for m in messages)
    for n, out in zip((220, 221, 222, 223), outs):
        exact_n = session.generate(prompt(n, seed=n), None, "dynamic", "greedy", 0).sequences
        if stored(returned_cache(out))[0] is None:
            assert torch.equal(out.sequences, exact_n)
    assert exact.shape == outs[0].sequences.shape


def test_bfloat16_compiled_is_the_oracle_where_inductor_rounds_as_eager():
    """bfloat16 at head dim 64 through Inductor: made to follow the oracle's tokens, the logits
    are the oracle's exactly once Inductor rounds to bfloat16 between fused ops as eager does
    (`emulate_precision_casts`). By default it keeps float32 across a fusion, which moves this
    model's logits by up to ~0.2 and flips its argmax at near ties: the GPU suite's bfloat16
    tolerance (tests_gpu, LOGIT_GAP) is Inductor's rounding, not the pass's."""
    options = {"token_budget": 64, "max_new_tokens": 10}
    config = RocketKVConfig.from_options(options)
    model = tiny_hf("llama", head_dim=64).to(torch.bfloat16)
    model.generation_config.eos_token_id = None
    ids = prompt(300, seed=300)
    tokens = oracle_generate(model, ids, config, 10)[0]
    want = logits_along(lambda **kw: generate_like(model, ids, config, **kw), tokens)
    forward = model.forward
    model.forward = compiled(forward, options, inductor=True)
    try:
        with torch._inductor.config.patch(emulate_precision_casts=True), torch.no_grad():
            got = logits_along(lambda **kw: model.generate(ids, **{cache_argument(): None}, **kw),
                               tokens)
    finally:
        model.forward = forward
    assert torch.equal(got, want)


def test_our_code_gives_no_future_warning():
    """rkv_compile passes the cache by the name the installed transformers takes."""
    model = tiny_llama()
    ids = prompt(120)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rkv_compile.eager.generate(model, ids, RocketKVConfig.from_options(OPTION_SETS[0]), 3)
        Session(model).generate(ids, OPTION_SETS[0], "rocketkv", "greedy", 0)
    ours = [w for w in caught if issubclass(w.category, FutureWarning) and
            "rkv_compile" in w.filename]
    assert not ours, [str(w.message) for w in ours]


@pytest.mark.parametrize("compile_prefill", [False, True])
def test_only_the_decode_step_reaches_inductor_unless_compile_prefill(compile_prefill,
                                                                      monkeypatch):
    """By default a prompt's graph runs as traced and only the decode step is compiled (a first
    call's compile time is the decode step's); `compile_prefill` compiles the prefill too. The
    tokens are the oracle's either way."""
    import rkv_compile.backend as runtime

    phases = []
    monkeypatch.setattr(runtime, "inductor", lambda gm, ex, decode=False, **flags: (
        phases.append("decode" if decode else "prompt") or gm.forward))
    session = Session(tiny_llama())
    options = {**OPTION_SETS[0], "compile_prefill": compile_prefill}
    session.forwards[repr(sorted(options.items()))] = torch.compile(
        session.eager, backend="rocketkv", options=options)
    assert_compressed_as_the_oracle(session, prompt(210, seed=4), options, "dynamic", "greedy", 0)
    assert phases == (["prompt", "decode"] if compile_prefill else ["decode"])
