"""The pass end to end on small models: every rewrite checked against eager or the eager oracle."""
import pytest
import torch
from hypothesis import given, settings, strategies as st
from transformers import DynamicCache
from rkv_compile.eager import generate as oracle_generate
from models import compiled, prompt, tiny_hf

import rkv_compile
from rkv_compile import RocketKVConfig
from rkv_compile.cache import RocketKVCache
from rkv_compile.backend import PLAN_ATTR
from rkv_compile.passes.rewrite import rocketkv_capacity

BUDGET = {"token_budget": 64, "max_new_tokens": 8}


def hf_generate(model, ids, options, inductor, steps=8):
    forward = model.forward
    model.forward = compiled(forward, options, inductor)
    try:
        out = model.generate(ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                             return_dict_in_generate=True)
    finally:
        model.forward = forward
    cache = [layer.keys.shape[2] for layer in out.past_key_values.layers]
    return out.sequences[0, ids.shape[1]:].tolist(), cache


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
    # Dynamo wraps what a backend raises; the message keeps the ValueError and the option.
    with pytest.raises(Exception, match=f"ValueError: .*'{name}'"):
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
    torch._dynamo.reset()   # each example its own graphs (Dynamo's recompile limit is per code)
    model.forward = compiled(model.forward, options, inductor=False)
    try:
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6,
                                 do_sample=False, return_dict_in_generate=True,
                                 past_key_values=cache)
    finally:
        del model.forward
    return out, alone, ids, config


@settings(deadline=None, max_examples=4)
@given(lengths=st.lists(st.integers(20, 300), min_size=2, max_size=3),
       policy=st.sampled_from(["rocketkv", "snapkv", "streamingllm"]),
       seed=st.integers(0, 2**16))
def test_padded_batch_rows_as_each_prompt_alone(lengths, policy, seed):
    """A left-padded batch: each row is evicted over its own tokens with the plan of its own
    length (a row shorter than its budget keeps them all) and decodes with its own selection,
    so its tokens are those of its prompt alone (the eager oracle); padding is never kept."""
    out, alone, ids, _ = padded_generate(lengths, policy, seed, rocketkv_cache=False)
    assert out.sequences[:, ids.shape[1]:].tolist() == [tokens for tokens, _ in alone]
    # the cache holds the row that keeps most, then the 5 fed tokens
    stored = max(kept[0] for _, kept in alone)
    assert [layer.keys.shape[2] for layer in out.past_key_values.layers] == [stored + 5] * 2


@settings(deadline=None, max_examples=4)
@given(lengths=st.lists(st.integers(20, 300), min_size=2, max_size=3),
       policy=st.sampled_from(["rocketkv", "snapkv", "streamingllm"]),
       seed=st.integers(0, 2**16))
def test_padded_batch_into_rocketkv_cache_rows_as_each_prompt_alone(lengths, policy, seed):
    """The same through a RocketKVCache: each row stored left-aligned with its own length and
    plan, its decode over its own stored slots, so its tokens are its prompt alone's; the buffers
    hold the largest row plan's slots, and no padding."""
    out, alone, ids, config = padded_generate(lengths, policy, seed, rocketkv_cache=True)
    assert out.sequences[:, ids.shape[1]:].tolist() == [tokens for tokens, _ in alone]
    for i, layer in enumerate(out.past_key_values.layers):
        assert layer.lengths.tolist() == [kept[i] + 5 for _, kept in alone]
        assert layer.positions.tolist() == [ids.shape[1] + 5] * len(lengths)
    plans = tuple(config.plan(n, 16) for n in lengths)
    for layer in out.past_key_values.layers:
        assert layer.keys.shape[2] == max(rocketkv_capacity(p, n) for p, n in zip(plans, lengths))
        # a plan per row; one for the batch if nothing is padded
        assert getattr(layer.keys, PLAN_ATTR) == (plans if len(set(lengths)) > 1 else plans[0])
    # each row's plan moves with its row (several continuations of each prompt)
    out.past_key_values.batch_repeat_interleave(2)
    for layer in out.past_key_values.layers:
        assert getattr(layer.lengths, PLAN_ATTR) == (tuple(p for p in plans for _ in range(2))
                                                     if len(set(lengths)) > 1 else plans[0])


def test_padded_batch_stays_exact_where_rows_cannot_be_evicted_apart():
    """H2O evicts during decode by a state per stored slot: a padded batch is not evicted row
    by row, and with padding decode runs the exact graph over the whole cache."""
    model = tiny_hf("llama")
    options = dict(BUDGET, policy="h2o")
    ids = torch.cat([prompt(300, seed=3), prompt(300, seed=4)])
    mask = torch.ones_like(ids)
    mask[1, :40] = 0   # row 1 is left-padded
    kwargs = dict(attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    expected = model.generate(ids, **kwargs)
    report = rkv_compile.explain(lambda: model.generate(ids, **kwargs), options=options)
    decode = [s for s in report.sites if s.query_len == "1"]
    assert decode and all(s.rewritten for s in decode)   # the padding is checked at run time
    model.forward = compiled(model.forward, options, inductor=False)
    try:
        out = model.generate(ids, return_dict_in_generate=True, **kwargs)
    finally:
        del model.forward
    assert torch.equal(out.sequences, expected)
    assert [layer.keys.shape[2] for layer in out.past_key_values.layers] == [305, 305]


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
        logits = forward(ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                         position_ids=torch.arange(300)[None]).logits
        for step in range(8):
            tokens.append(int(logits[0, -1].argmax()))
            if step == 7:
                break
            logits = forward(torch.tensor([[tokens[-1]]]), past_key_values=cache,
                             attention_mask=torch.ones(1, 301 + step, dtype=torch.long),
                             position_ids=torch.tensor([[300 + step]])).logits
    expected, _ = oracle_generate(model, ids, config, 8)
    assert tokens == expected
    assert [layer.keys.shape[2] for layer in cache.layers] == [config.plan(300, 16).prompt_budget + 7] * 2


def test_new_turn_over_an_evicted_cache_is_refused():
    """A second generate() on the same DynamicCache feeds the new turn's tokens at positions
    transformers takes from the stored length: after eviction that is refused with a clear
    error; when the prompt fit the budget (nothing evicted) the new turn runs, exactly."""
    model = tiny_hf("llama")
    model.generation_config.eos_token_id = None
    kwargs = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
    model.forward = compiled(model.forward, BUDGET, inductor=False)
    try:
        with torch.no_grad():
            for length, evicted in ((300, True), (40, False)):
                ids, cache = prompt(length), DynamicCache(config=model.config)
                first = model.generate(ids, past_key_values=cache, **kwargs)
                turn = torch.cat([first, prompt(12, seed=9)], dim=1)
                if evicted:
                    with pytest.raises(NotImplementedError, match="eviction shortened"):
                        model.generate(turn, past_key_values=cache, **kwargs)
                else:
                    second = model.generate(turn, past_key_values=cache, **kwargs)
    finally:
        del model.forward
    with torch.no_grad():
        assert torch.equal(second, model.generate(turn, **kwargs))
