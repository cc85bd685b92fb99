"""Multi-turn generation: generate() continuing one cache with a new user turn, three turns."""
import pytest
import torch
from transformers import DynamicCache
from models import compiled, prompt, stored_lengths, tiny_hf

import rkv_compile
from rkv_compile import RocketKVConfig, stored
from rkv_compile.cache import RocketKVCache
from rkv_compile.eager import generate as oracle_generate, multi_turn
from rkv_compile.hf import cache_argument

MT = {"token_budget": 64, "max_new_tokens": 6, "policy": "rocketkv-mt"}
TURNS = [(200, 1), (60, 2), (40, 3)]   # (tokens, seed) of each user turn
# the second turn is shorter than the window (32): it is not selected from
SHORT_TURN = [(200, 1), (10, 2), (60, 3)]


def conversation(model, forward, turns=TURNS, cache=None):
    """The reply to each turn, generate() continuing one cache (a RocketKVCache unless given);
    the stored lengths of its layers after each."""
    model.forward, replies, lengths, seq = forward, [], [], None
    cache = RocketKVCache(model.config, 6) if cache is None else cache
    try:
        with torch.no_grad():
            for tokens, seed in turns:
                ids = prompt(tokens, seed) if seq is None else torch.cat([seq, prompt(tokens, seed)], 1)
                seq = model.generate(ids, **{cache_argument(): cache}, max_new_tokens=6,
                                     min_new_tokens=6, do_sample=False)
                replies.append(seq[0, ids.shape[1]:].tolist())
                lengths.append(stored_lengths(cache))
    finally:
        del model.forward
    return replies, lengths


def test_rocketkv_mt_three_turns_as_the_eager_reference():
    """Each turn into a RocketKVCache: exact attention over the whole history, stage 1 over
    every stored token into a view, stage 2 over the view. The cache keeps every token."""
    model = tiny_hf("llama")
    model.generation_config.eos_token_id = None
    replies, lengths = conversation(model, compiled(model.forward, MT, inductor=False))
    expected = multi_turn(model, [prompt(n, s) for n, s in TURNS], RocketKVConfig.from_options(MT), 6)
    assert replies == expected
    assert [length[0] for length in lengths] == [205, 271, 317]   # nothing evicted
    full, _ = conversation(model, model.forward, cache=DynamicCache(config=model.config))
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
                                              TURNS[:1], DynamicCache(config=model.config))
    assert replies == expected == rocketkv and kept == [200, 200] and length == 205


def test_rocketkv_mt_explain():
    model = tiny_hf("llama")
    ids = prompt(200)
    with torch.no_grad():
        report = rkv_compile.explain(model.generate, ids, max_new_tokens=3, options=MT)
    assert "forward" not in vars(model)   # explain compiled it for the call, then put it back
    prefill = [s for s in report.sites if s.query_len == "200"]
    decode = [s for s in report.sites if s.query_len == "1" and s.rewritten]
    assert prefill and all("the cache keeps every token, and decode reads a view of the 138 "
                           "tokens rocketkv-mt selects" in s.action for s in prefill)
    assert decode and all("over the view stage 1 kept at the last prefill" in s.action
                          for s in decode)


def test_rocketkv_cache_takes_new_turns_exactly():
    """Without the backend a RocketKVCache takes a new turn (new buffers holding the stored
    tokens and the turn's) as a DynamicCache does: transformers' masks and positions agree."""
    model = tiny_hf("llama")
    model.generation_config.eos_token_id = None
    cache = RocketKVCache(model.config, 6)
    assert conversation(model, model.forward, SHORT_TURN, cache)[0] == \
        conversation(model, model.forward, SHORT_TURN, DynamicCache(config=model.config))[0]


def test_plain_rocketkv_turns_on_rocketkv_cache_as_the_eager_reference():
    """Plain rocketkv over three turns into a RocketKVCache (through Inductor): each turn is
    attended exactly over the kept history, then stage 1 runs again over every stored token,
    planned for the conversation's length; a turn shorter than the window keeps every stored
    token and the last plan. The eager reference agrees; full KV does not."""
    model = tiny_hf("llama")
    model.generation_config.eos_token_id = None
    options = dict(MT, policy="rocketkv")
    replies, lengths = conversation(model, compiled(model.forward, options, inductor=True),
                                    SHORT_TURN, RocketKVCache(model.config, 6))
    expected = multi_turn(model, [prompt(n, s) for n, s in SHORT_TURN],
                          RocketKVConfig.from_options(options), 6)
    assert replies == expected
    # stored after each turn (logical 205, 221, 287): 138 kept + 5 decoded; + 11 + 5; 164 + 10
    assert [length[0] for length in lengths] == [143, 159, 174]
    assert replies != conversation(model, model.forward, SHORT_TURN,
                                   DynamicCache(config=model.config))[0]


def test_chunked_prefill_into_rocketkv_cache_is_a_turn_per_chunk():
    """A RocketKVCache stores the first chunk compressed at once, so each later chunk is a new
    turn: stage 1 runs again over the kept tokens and the chunk. The kept set then differs from
    one prefill's (a DynamicCache keeps one prefill's); the tokens equal the eager reference's
    conversation of the chunks, unanswered but the last."""
    model = tiny_hf("llama")
    model.generation_config.eos_token_id = None
    options = dict(MT, policy="rocketkv")
    ids, cache = prompt(200), RocketKVCache(model.config, 6)
    model.forward = compiled(model.forward, options, inductor=False)
    try:
        with torch.no_grad():
            out = model.generate(ids, **{cache_argument(): cache}, max_new_tokens=6,
                                 min_new_tokens=6, do_sample=False, prefill_chunk_size=100)
    finally:
        del model.forward
    config = RocketKVConfig.from_options(options)
    chunks = multi_turn(model, [ids[:, :100], ids[:, 100:]], config, [0, 6])
    assert out[0, 200:].tolist() == chunks[1] and chunks[0] == []
    assert out[0, 200:].tolist() != oracle_generate(model, ids, config, 6)[0]
    assert stored(cache)[0].lengths == [143] and stored(cache)[0].positions == [205]


def test_new_turn_into_rocketkv_cache_explain():
    """explain(model.generate) of a second turn into a RocketKVCache (the first turn compressed
    it) reports the turn's sites: rocketkv selects again over the kept tokens and the turn."""
    model = tiny_hf("llama")
    model.generation_config.eos_token_id = None
    options = dict(MT, policy="rocketkv")
    cache = RocketKVCache(model.config, 3)
    model.forward = compiled(model.forward, options, inductor=False)
    try:
        with torch.no_grad():
            seq = model.generate(prompt(200), **{cache_argument(): cache}, max_new_tokens=3)
    finally:
        del model.forward
    torch._dynamo.reset()
    with torch.no_grad():
        report = rkv_compile.explain(model.generate, torch.cat([seq, prompt(40, 2)], 1),
                                     **{cache_argument(): cache}, max_new_tokens=3,
                                     options=options)
    turn = [s for s in report.sites if s.kv_source == "RocketKVCache, new turn"]
    assert turn and all(s.rewritten and "rocketkv selects again over them all, voted by the "
                        "turn's last 32 queries (a shorter turn keeps them all)" in s.action
                        for s in turn)


def test_plain_rocketkv_new_turn_after_eviction_is_refused():
    """Over a DynamicCache transformers would slice and position a new turn by the stored
    length, so the second turn is refused, naming what works (a RocketKVCache)."""
    model = tiny_hf("llama")
    model.generation_config.eos_token_id = None
    options = dict(MT, policy="rocketkv")
    with pytest.raises(NotImplementedError, match="Pass a RocketKVCache"):
        conversation(model, compiled(model.forward, options, inductor=False),
                     cache=DynamicCache(config=model.config))
