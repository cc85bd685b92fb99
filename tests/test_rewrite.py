"""The pass end to end on small models: every rewrite checked against eager or the eager oracle."""
import pytest
import torch
from hypothesis import given, settings, strategies as st
from transformers import DynamicCache
from rkv_compile.eager import generate as oracle_generate
from models import compiled, prompt, stored_lengths, tiny_hf

import rkv_compile
from rkv_compile import RocketKVConfig, stored
from rkv_compile.cache import RocketKVCache
from rkv_compile.hf import cache_argument, returned_cache
from rkv_compile.state import slot_bucket

BUDGET = {"token_budget": 64, "max_new_tokens": 8}


def hf_generate(model, ids, options, inductor, steps=8):
    forward = model.forward
    model.forward = compiled(forward, options, inductor)
    try:
        out = model.generate(ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                             return_dict_in_generate=True)
    finally:
        model.forward = forward
    return out.sequences[0, ids.shape[1]:].tolist(), stored_lengths(returned_cache(out))


@pytest.mark.parametrize("arch,attn,inductor", [
    ("llama", "sdpa", True), ("llama", "eager", False), ("qwen2", "sdpa", False)])
def test_no_budget_equals_eager(arch, attn, inductor):
    model = tiny_hf(arch, attn)
    ids = prompt(40)
    with torch.no_grad():
        expected = model(ids).logits
        got = compiled(model.forward, {"token_budget": None}, inductor)(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    tokens, _ = hf_generate(model, ids, {"token_budget": None}, inductor)
    assert tokens == model.generate(ids, max_new_tokens=8, min_new_tokens=8,
                                    do_sample=False)[0, 40:].tolist()


@pytest.mark.parametrize("arch,attn,inductor", [
    ("llama", "sdpa", True), ("llama", "eager", False), ("qwen2", "sdpa", False)])
def test_budget_matches_eager_oracle(arch, attn, inductor):
    model = tiny_hf(arch, attn)
    config = RocketKVConfig.from_options(BUDGET)
    for length in (300, 257):  # two prompt lengths, two plans, one compiled model
        ids = prompt(length, seed=length)
        tokens, cache = hf_generate(model, ids, BUDGET, inductor)
        expected, kept = oracle_generate(model, ids, config, 8)
        plan = config.plan(length, 16)
        assert kept == [plan.prompt_budget] * 2 and plan.prompt_budget < length
        assert cache == [plan.prompt_budget + 7] * 2   # the last token is never cached
        assert tokens == expected


def test_budget_changes_tokens_somewhere():
    """The oracle comparison is not vacuous: compression does change this model's output."""
    model = tiny_hf("llama")
    ids = prompt(300, seed=300)
    full, _ = hf_generate(model, ids, {"token_budget": None}, inductor=False)
    compressed, _ = hf_generate(model, ids, BUDGET, inductor=False)
    assert full != compressed


def test_prompt_within_budget_is_exact():
    model = tiny_hf("llama")
    ids = prompt(100)
    tokens, cache = hf_generate(model, ids, {"token_budget": 256, "max_new_tokens": 8},
                                inductor=False)
    assert cache == [100 + 7] * 2
    full, _ = hf_generate(model, ids, {"token_budget": None}, inductor=False)
    assert tokens[:1] == full[:1]   # prefill is exact; decode is sparse but over all tokens


def test_explain_table_lists_every_site():
    model = tiny_hf("llama")
    with torch.no_grad():
        report = rkv_compile.explain(model, prompt(300), options=BUDGET)
    text = str(report)
    assert text.count("the cache stores the 173 tokens rocketkv keeps") == 2
    assert "kv source" in text.splitlines()[0]


def test_explain_generate_over_a_forward_the_user_compiled():
    """explain(model.generate) when the user has already compiled the forward (the README's
    usage): the same sites and actions as over the plain model (the prompt length may be
    traced as a symbol by then), and the user's compiled forward is left in place."""
    model = tiny_hf("llama")
    model.generation_config.eos_token_id = None
    ids = prompt(200)

    def sites(report):
        return [(s.graph, s.site, s.kv_source, s.rewritten, s.action.split(";")[0])
                for s in report.sites]
    with torch.no_grad():
        plain = rkv_compile.explain(model.generate, ids, max_new_tokens=3, options=BUDGET)
        model.forward = torch.compile(model.forward, backend="rocketkv", options=BUDGET)
        users = model.forward
        model.generate(ids, max_new_tokens=3)
        again = rkv_compile.explain(model.generate, ids, max_new_tokens=3, options=BUDGET)
    assert sites(again) == sites(plain) and len(plain.sites) == 4
    assert vars(model)["forward"] is users


@pytest.mark.parametrize("options,name", [
    ({"token_budget": 0}, "token_budget"), ({"max_new_tokens": -1}, "max_new_tokens"),
    ({"kernel_size": 4}, "kernel_size"), ({"policy": "nope"}, "policy"),
    ({"budget": 64}, "budget"), ({"kv_bits": 9}, "kv_bits"),
    ({"policy": "h2o", "recent_size": 300}, "recent_size"),
    ({"policy": "shotkv", "decode_budget": 0}, "decode_budget")])
def test_bad_options_name_the_option(options, name):
    with pytest.raises(ValueError, match=name):
        RocketKVConfig.from_options(options)
    fn = torch.compile(lambda x: x + 1, backend="rocketkv", options=options)
    with pytest.raises(ValueError, match=f"'{name}'"):   # at the first call, as itself
        fn(torch.ones(2))


def left_padded(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of 1-D prompts, left-padded (pad id 0), and its attention_mask."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):], mask[b, width - len(p):] = p, 1
    return ids, mask


def padded_generate(lengths: list[int], policy: str, seed: int, rocketkv_cache: bool):
    """A left-padded batch of prompts of `lengths` generated through the pass (6 tokens), and
    each prompt alone under the eager oracle: (generate's output, [(tokens, kept)] alone, the
    padded ids, the config)."""
    model = tiny_hf("llama")
    model.generation_config.eos_token_id = None
    options = dict(BUDGET, policy=policy)
    config = RocketKVConfig.from_options(options)
    prompts = [prompt(n, seed=seed + b)[0] for b, n in enumerate(lengths)]
    alone = [oracle_generate(model, p[None], config, 6) for p in prompts]
    ids, mask = left_padded(prompts)
    cache = RocketKVCache(model.config, BUDGET["max_new_tokens"]) if rocketkv_cache else None
    torch._dynamo.reset()   # each example its own graphs
    model.forward = compiled(model.forward, options, inductor=False)
    try:
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6,
                                 do_sample=False, return_dict_in_generate=True,
                                 **{cache_argument(): cache})
    finally:
        del model.forward
    return out, alone, ids, config


@settings(deadline=None, max_examples=4)
@given(lengths=st.lists(st.integers(20, 300), min_size=2, max_size=3),
       policy=st.sampled_from(["rocketkv", "snapkv", "streamingllm", "h2o", "pyramidkv"]),
       cache=st.sampled_from(["dynamic", "rocketkv"]), seed=st.integers(0, 2**16))
def test_padded_batch_rows_as_each_prompt_alone(lengths, policy, cache, seed):
    """A left-padded batch, into either cache: each row is evicted over its own tokens with the
    plan of its own length (a row shorter than its budget keeps them all), stored left-aligned
    with its own length and plan in its header, and decodes over its own stored slots, so its
    tokens are those of its prompt alone (the eager oracle); padding is never stored. Its plan
    moves with it when rows are repeated (several continuations of each prompt)."""
    out, alone, ids, config = padded_generate(lengths, policy, seed, cache == "rocketkv")
    assert out.sequences[:, ids.shape[1]:].tolist() == [tokens for tokens, _ in alone]
    layers = stored(returned_cache(out))
    for i, layer in enumerate(layers):
        assert layer.lengths == [kept[i] + 5 for _, kept in alone]
        assert layer.positions == [n + 5 for n in lengths]
        plans = [config.plan(n, 16, i, 2) for n in lengths]
        assert layer.chunk == [p.chunk for p in plans] and layer.dims == [p.dims for p in plans]
    widest = max(k for _, kept in alone for k in kept)
    assert layers[0].slots == slot_bucket(widest + BUDGET["max_new_tokens"], 16, 4,
                                          bool(config.method.state))
    returned_cache(out).batch_repeat_interleave(2)
    moved = stored(returned_cache(out))[0]
    assert moved.lengths == [k for k in layers[0].lengths for _ in range(2)]
    assert moved.chunk == [c for c in layers[0].chunk for _ in range(2)]


def test_all_ones_attention_mask_is_compressed():
    """A decode loop that passes a full 2-D attention_mask (as generate does in older
    transformers): all ones lines up with the evicted cache, so it is compressed, as the oracle."""
    from transformers import DynamicCache

    model = tiny_hf("llama")
    config = RocketKVConfig.from_options(BUDGET)
    ids = prompt(300, seed=300)
    forward = compiled(model.forward, BUDGET, inductor=False)
    cache, tokens = DynamicCache(config=model.config), []
    with torch.no_grad():
        logits = forward(ids, attention_mask=torch.ones_like(ids), **{cache_argument(): cache},
                         position_ids=torch.arange(300)[None]).logits
        for step in range(8):
            tokens.append(int(logits[0, -1].argmax()))
            if step == 7:
                break
            logits = forward(torch.tensor([[tokens[-1]]]), **{cache_argument(): cache},
                             attention_mask=torch.ones(1, 301 + step, dtype=torch.long),
                             position_ids=torch.tensor([[300 + step]])).logits
    expected, _ = oracle_generate(model, ids, config, 8)
    assert tokens == expected
    assert stored_lengths(cache) == [config.plan(300, 16).prompt_budget + 7] * 2


def test_new_turn_over_a_compressed_dynamic_cache_is_refused():
    """A second generate() on the same DynamicCache: transformers slices the new turn, and
    positions it, by the stored length, which is not the conversation's: refused with a clear
    error naming what works (a RocketKVCache)."""
    model = tiny_hf("llama")
    model.generation_config.eos_token_id = None
    kwargs = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
    model.forward = compiled(model.forward, BUDGET, inductor=False)
    try:
        with torch.no_grad():
            for length in (300, 40):   # evicted, and within the budget
                ids, cache = prompt(length), DynamicCache(config=model.config)
                first = model.generate(ids, **{cache_argument(): cache}, **kwargs)
                turn = torch.cat([first, prompt(12, seed=9)], dim=1)
                with pytest.raises(NotImplementedError, match="Pass a RocketKVCache"):
                    model.generate(turn, **{cache_argument(): cache}, **kwargs)
    finally:
        del model.forward
