"""Multi-turn generation: generate() continuing one cache with a new user turn, three turns."""
import pytest
import torch
from transformers import DynamicCache
from models import compiled, prompt, tiny_hf

import rkv_compile
from rkv_compile import RocketKVConfig
from rkv_compile.cache import RocketKVCache
from rkv_compile.eager import generate as oracle_generate, multi_turn

MT = {"token_budget": 64, "max_new_tokens": 6, "policy": "rocketkv-mt"}
TURNS = [(200, 1), (60, 2), (40, 3)]   # (tokens, seed) of each user turn


def conversation(model, forward, turns=TURNS):
    """The reply to each turn, generate() continuing one cache; the cache lengths after each."""
    model.forward, replies, lengths, seq = forward, [], [], None
    cache = DynamicCache(config=model.config)
    try:
        with torch.no_grad():
            for tokens, seed in turns:
                ids = prompt(tokens, seed) if seq is None else torch.cat([seq, prompt(tokens, seed)], 1)
                seq = model.generate(ids, past_key_values=cache, max_new_tokens=6,
                                     min_new_tokens=6, do_sample=False)
                replies.append(seq[0, ids.shape[1]:].tolist())
                lengths.append([layer.keys.shape[2] for layer in cache.layers])
    finally:
        del model.forward
    return replies, lengths


def test_rocketkv_mt_three_turns_as_the_eager_reference():
    """Each turn: exact prefill over the whole history, stage 1 over every stored token into a
    view, stage 2 over the view. The cache keeps every token, so positions stay right."""
    model = tiny_hf("llama")
    model.generation_config.eos_token_id = None
    replies, lengths = conversation(model, compiled(model.forward, MT, inductor=False))
    expected = multi_turn(model, [prompt(n, s) for n, s in TURNS], RocketKVConfig.from_options(MT), 6)
    assert replies == expected
    assert [length[0] for length in lengths] == [205, 271, 317]   # nothing evicted
    full, _ = conversation(model, model.forward)
    assert replies != full   # the views change tokens: the comparison tests something


def test_rocketkv_mt_first_turn_decodes_as_rocketkv():
    """On one turn the view is what rocketkv keeps plus the decoded tokens: the same tokens as
    rocketkv's, from a cache that keeps every token (the eager application agrees)."""
    model = tiny_hf("llama")
    model.generation_config.eos_token_id = None
    ids = prompt(200)
    rocketkv, _ = oracle_generate(model, ids, RocketKVConfig.from_options(
        dict(MT, policy="rocketkv")), 6)
    expected, kept = oracle_generate(model, ids, RocketKVConfig.from_options(MT), 6)
    (replies,), ((length, _),) = conversation(model, compiled(model.forward, MT, False),
                                              TURNS[:1])
    assert replies == expected == rocketkv and kept == [200, 200] and length == 205


def test_rocketkv_mt_explain():
    model = tiny_hf("llama")
    ids = prompt(200)
    with torch.no_grad():
        report = rkv_compile.explain(lambda: model.generate(ids, max_new_tokens=3), options=MT)
    prefill = [s for s in report.sites if s.query_len == "200"]
    decode = [s for s in report.sites if s.query_len == "1" and s.rewritten]
    assert prefill and all("the cache keeps every token, and decode reads a view of the 138 "
                           "tokens rocketkv-mt keeps" in s.action for s in prefill)
    assert decode and all("over the view stage 1 kept at the last prefill" in s.action
                          for s in decode)


def test_rocketkv_mt_on_rocketkv_cache_stays_exact():
    model = tiny_hf("llama")
    ids = prompt(200)
    with torch.no_grad():
        report = rkv_compile.explain(lambda: model.generate(
            ids, max_new_tokens=3, past_key_values=RocketKVCache(model.config, 3)), options=MT)
    assert report.sites and not report.rewritten
    assert all("pass a DynamicCache" in s.action for s in report.sites if s.query_len == "200")


def test_plain_rocketkv_new_turn_after_eviction_is_refused():
    """Plain rocketkv evicts from the cache itself: transformers would position a new turn by the
    stored length, so the second turn is refused (rocketkv-mt is the multi-turn policy)."""
    model = tiny_hf("llama")
    model.generation_config.eos_token_id = None
    options = dict(MT, policy="rocketkv")
    with pytest.raises(NotImplementedError, match="eviction shortened"):
        conversation(model, compiled(model.forward, options, inductor=False))
