"""Chunked prefill (generate's `prefill_chunk_size`) through the pass, on either cache.

The first chunk is a prefill: the cache stores what the policy keeps of it. Every later chunk is
a turn: exact attention over the stored tokens and the chunk's, then the selection again over
all of them, voted by the chunk's last queries. The kept set is not one prefill's (the first
chunk was selected from on its own): the tokens are the eager reference's conversation of the
chunks, unanswered but the last (`eager.multi_turn`).
"""
import pytest
import torch
from devices import DEVICE
from models import prompt, tiny_hf

from rkv_compile import RocketKVConfig, stored
from rkv_compile.backend import make_backend
from rkv_compile.cache import RocketKVCache
from rkv_compile.eager import generate as oracle_generate, multi_turn
from rkv_compile.hf import cache_argument, returned_cache
from rkv_compile.passes.rewrite import TURN

BUDGET = {"token_budget": 64, "max_new_tokens": 8}
PROMPT, STEPS = 300, 8


def chunked_generate(model, ids, chunk: int, inductor: bool, decisions: list, cache=None):
    """Greedy tokens, prefilled `chunk` tokens at a time, and what each layer stores."""
    backend = make_backend(compiler=None if inductor else (lambda gm, _: gm.forward),
                           on_analysis=decisions.extend)
    forward = model.forward
    model.forward = torch.compile(forward, backend=lambda gm, ex: backend(gm, ex, options=BUDGET))
    try:
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False,
                                 prefill_chunk_size=chunk, return_dict_in_generate=True,
                                 **{cache_argument(): cache})
    finally:
        model.forward = forward
    return out.sequences[0, ids.shape[1]:].tolist(), stored(returned_cache(out))


@pytest.mark.parametrize("chunk, inductor, cache", [(128, True, "dynamic"), (100, False, "dynamic"),
                                                    (100, False, "rocketkv")])
def test_chunks_are_turns_of_one_conversation(chunk, inductor, cache):
    model = tiny_hf("llama").to(DEVICE)   # on a GPU machine: Inductor's CUDA path
    model.generation_config.eos_token_id = None
    ids = prompt(PROMPT).to(DEVICE)
    decisions = []
    tokens, layers = chunked_generate(model, ids, chunk, inductor, decisions,
                                      RocketKVCache(model.config, STEPS) if cache == "rocketkv"
                                      else None)
    config = RocketKVConfig.from_options(BUDGET)
    chunks = [ids[:, start:start + chunk] for start in range(0, PROMPT, chunk)]
    replies = multi_turn(model, chunks, config, [0] * (len(chunks) - 1) + [STEPS])
    assert tokens == replies[-1]
    assert layers[0].positions == [PROMPT + STEPS - 1] and layers[0].lengths[0] < PROMPT
    turns = [d for d in decisions if d.phase == TURN]
    assert turns and all(d.rewritten for d in turns)


def test_one_chunk_is_one_prefill():
    model = tiny_hf("llama")
    model.generation_config.eos_token_id = None
    ids = prompt(PROMPT)
    tokens, layers = chunked_generate(model, ids, PROMPT, False, [])
    expected, kept = oracle_generate(model, ids, RocketKVConfig.from_options(BUDGET), STEPS)
    assert tokens == expected and [layer.lengths[0] for layer in layers] == [k + STEPS - 1
                                                                             for k in kept]


def test_a_last_chunk_shorter_than_the_window_keeps_every_token():
    """A last chunk of 10 queries cannot vote as a prompt's 32-query window: that turn keeps
    every stored token and the chunk's, with the plan its tokens decode with."""
    model = tiny_hf("llama")
    model.generation_config.eos_token_id = None
    ids = prompt(PROMPT)
    tokens, layers = chunked_generate(model, ids, 290, False, [])
    config = RocketKVConfig.from_options(BUDGET)
    first = config.plan(290, 16).prompt_budget
    assert layers[0].lengths == [first + 10 + STEPS - 1]
    assert tokens == multi_turn(model, [ids[:, :290], ids[:, 290:]], config, [0, STEPS])[-1]
