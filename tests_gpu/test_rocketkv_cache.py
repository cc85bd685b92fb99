"""RocketKVCache on the GPU: Triton decode with chunk summaries and the append kernel, CUDA-graph
replay (the cudagraphs option), the tokens of the eager oracle, and memory after prefill."""
import pytest
import torch
from models import tiny_hf
from torch.profiler import ProfilerActivity, profile
from rkv_compile.eager import generate as oracle_generate

import rkv_compile
from rkv_compile import RocketKVConfig
from rkv_compile.backend import RewrittenGraph, make_backend
from rkv_compile.cache import STATE, RocketKVCache

assert torch.cuda.is_available(), "tests_gpu/ runs on the GPU machine"


def _generate(model, ids, steps, options, attention_mask=None):
    """Generate through the backend; also what it returned for each decode graph, and the CUDA
    graph launches seen by the profiler."""
    rocketkv, graphs = make_backend(), []

    def backend(gm, example_inputs, options=None):
        compiled = rocketkv(gm, example_inputs, options=options)
        graphs.append(compiled)
        return compiled

    torch._dynamo.utils.counters.clear()
    forward = model.forward
    model.forward = torch.compile(forward, backend=backend, options=options)
    try:
        cache = RocketKVCache(model.config, steps)
        activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
        with torch.no_grad(), profile(activities=activities) as prof:
            out = model.generate(ids, attention_mask=attention_mask, max_new_tokens=steps,
                                 min_new_tokens=steps, do_sample=False, past_key_values=cache,
                                 disable_compile=True)
    finally:
        model.forward = forward
    decode = [g for g in graphs if isinstance(g, RewrittenGraph) and g.decode_inputs]
    launches = sum(e.count for e in prof.key_averages() if "cudaGraphLaunch" in e.key)
    rows = out[:, ids.shape[1]:].tolist()
    return rows if attention_mask is not None else rows[0], cache, decode, launches


def test_cache_generate_matches_oracle_with_and_without_cudagraphs():
    """Decode graphs over RocketKVCache are compiled by Inductor with the Triton kernels inside,
    and with the cudagraphs option replayed as CUDA graphs; tokens are the oracle's."""
    model = tiny_hf("llama").cuda()
    ids = torch.randint(0, 128, (1, 400), generator=torch.Generator().manual_seed(7)).cuda()
    steps = 10
    options = {"token_budget": 64, "max_new_tokens": steps}
    expected, _ = oracle_generate(model, ids, RocketKVConfig.from_options(options), steps)
    with torch.no_grad():
        report = rkv_compile.explain(
            lambda: model.generate(ids, max_new_tokens=3, disable_compile=True,
                                   past_key_values=RocketKVCache(model.config, steps)),
            options=options)
    decode_sites = [s for s in report.sites if s.query_len == "1"]
    assert decode_sites and all(s.kv_source == "RocketKVCache" and "Triton kernels" in s.action
                                for s in decode_sites)
    plan = RocketKVConfig.from_options(options).plan(400, 16)
    for cudagraphs in (False, True):
        torch._dynamo.reset()
        tokens, cache, decode, launches = _generate(model, ids, steps,
                                                    {**options, "cudagraphs": cudagraphs})
        assert tokens == expected, cudagraphs
        assert [int(layer.lengths[0]) for layer in cache.layers] == [plan.prompt_budget + 9] * 2
        assert len(decode) == 1 and decode[0].compiled_plans is not None
        assert torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] == 0
        # cudagraph trees: the first step warms up, the second records, the rest replay
        assert launches >= steps - 3 if cudagraphs else launches == 0


def test_memory_after_prefill_is_the_plan():
    """After prefill the layers hold capacity buffers, not the prompt: memory allocated beyond the
    model and the logits is the cache state, far below a full KV cache."""
    model = tiny_hf("llama").cuda()
    T, steps = 8000, 16
    ids = torch.randint(0, 128, (1, T), generator=torch.Generator().manual_seed(8)).cuda()
    options = {"token_budget": 64, "max_new_tokens": steps}
    forward = torch.compile(model.forward, backend=rkv_compile.rocketkv, options=options)
    with torch.no_grad():   # compiles, and allocates cuBLAS's workspace (32 MiB on Hopper)
        forward(ids, past_key_values=RocketKVCache(model.config, steps), logits_to_keep=1)
    cache = RocketKVCache(model.config, steps)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    with torch.no_grad():
        logits = forward(ids, past_key_values=cache, logits_to_keep=1).logits
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - before - logits.numel() * logits.element_size()
    state = sum(t.numel() * t.element_size() for layer in cache.layers
                for t in (getattr(layer, name) for name in STATE))
    full_kv = 2 * 2 * T * 16 * 4 * 2   # layers x (K, V) x tokens x head_dim x fp32 x KV heads
    assert held <= state + 4096, (held, state)
    assert state < full_kv / 10


def test_plain_rocketkv_turns_on_cuda_as_the_eager_reference():
    """Three turns into a RocketKVCache on CUDA (decode through the Triton kernels, over the
    summaries each turn's stage 1 rebuilt; CUDA graphs on): the eager reference's replies."""
    from rkv_compile.eager import multi_turn

    model = tiny_hf("llama").cuda()
    model.generation_config.eos_token_id = None
    options = {"token_budget": 64, "max_new_tokens": 6, "cudagraphs": True}
    turns = [torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(s)).cuda()
             for n, s in ((200, 1), (10, 2), (60, 3))]
    forward, cache, seq, replies = model.forward, RocketKVCache(model.config, 6), None, []
    model.forward = torch.compile(forward, backend="rocketkv", options=options)
    try:
        with torch.no_grad():
            for turn in turns:
                ids = turn if seq is None else torch.cat([seq, turn], 1)
                seq = model.generate(ids, past_key_values=cache, max_new_tokens=6,
                                     min_new_tokens=6, do_sample=False, disable_compile=True)
                replies.append(seq[0, ids.shape[1]:].tolist())
    finally:
        model.forward = forward
    assert replies == multi_turn(model, turns, RocketKVConfig.from_options(options), 6)
    assert int(cache.layers[0].lengths[0]) < int(cache.layers[0].positions[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padded_batch_rows_as_each_prompt_alone_with_cudagraphs(dtype):
    """A left-padded batch into a RocketKVCache on CUDA: each row stored with its own plan (here
    chunks 2, 2 and 1: the kernels read each row's chunk and r, and build bounds from K), the
    decode graph compiled once and replayed as a CUDA graph; each row's tokens are its prompt
    alone's under the eager oracle (float32: all; bfloat16: the first of every row, and at least
    2 of 3 whole rows, as rounding differs between the batched and the lone run)."""
    model = tiny_hf("llama").to("cuda", dtype)
    model.generation_config.eos_token_id = None
    steps, lengths = 10, [400, 260, 90]
    options = {"token_budget": 64, "max_new_tokens": steps, "cudagraphs": True}
    config = RocketKVConfig.from_options(options)
    assert len({config.plan(n, 16).chunk for n in lengths}) == 2
    prompts = [torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(n)).cuda()
               for n in lengths]
    alone = [oracle_generate(model, p[None], config, steps) for p in prompts]
    ids = torch.zeros(3, 400, dtype=torch.long, device="cuda")
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, 400 - len(p):], mask[b, 400 - len(p):] = p, 1
    torch._dynamo.reset()
    rows, cache, decode, launches = _generate(model, ids, steps, options, attention_mask=mask)
    assert len(decode) == 1 and isinstance(decode[0].compiled_plans, dict)
    assert all(isinstance(plan, tuple) for plan in decode[0].compiled_plans.values())
    assert torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] == 0
    assert launches >= steps - 3
    assert [layer.lengths.tolist() for layer in cache.layers] == \
        [[kept[i] + steps - 1 for _, kept in alone] for i in range(2)]
    expected = [tokens for tokens, _ in alone]
    if dtype == torch.float32:
        assert rows == expected
    else:
        assert all(r[0] == a[0] for r, a in zip(rows, expected))
        assert sum(r == a for r, a in zip(rows, expected)) >= 2
