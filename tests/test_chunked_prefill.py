"""Chunked prefill (generate's `prefill_chunk_size`) through the pass, against one prefill.

Every chunk after the first is a prefill of the whole cache: exact attention, then the policy's
selection over every stored token, voted by the chunk's last queries. The last chunk's window is
the prompt's window, so the kept set is one prefill's, provided that chunk holds the window.
"""
import pytest
import torch
from devices import DEVICE
from models import prompt, tiny_hf

from rkv_compile import RocketKVConfig
from rkv_compile.backend import make_backend
from rkv_compile.eager import generate as oracle_generate
from rkv_compile.passes.kv_source import KVSource

BUDGET = {"token_budget": 64, "max_new_tokens": 8}
PROMPT, STEPS = 300, 8


def chunked_generate(model, ids, chunk: int, inductor: bool, decisions: list):
    """Greedy tokens, prefilled `chunk` tokens at a time, and the cache length per layer."""
    backend = make_backend(compiler=None if inductor else (lambda gm, _: gm.forward),
                           on_analysis=decisions.extend)
    forward = model.forward
    model.forward = torch.compile(forward, backend=lambda gm, ex: backend(gm, ex, options=BUDGET))
    try:
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False,
                                 prefill_chunk_size=chunk, return_dict_in_generate=True)
    finally:
        model.forward = forward
    return (out.sequences[0, ids.shape[1]:].tolist(),
            [layer.keys.shape[2] for layer in out.past_key_values.layers])


@pytest.mark.parametrize("chunk, inductor", [(128, True), (100, False), (PROMPT, False)])
def test_chunks_keep_what_one_prefill_keeps(chunk, inductor):
    model = tiny_hf("llama").to(DEVICE)   # on a GPU machine: Inductor's CUDA path
    model.generation_config.eos_token_id = None
    ids = prompt(PROMPT).to(DEVICE)
    decisions = []
    tokens, cache = chunked_generate(model, ids, chunk, inductor, decisions)
    expected, kept = oracle_generate(model, ids, RocketKVConfig.from_options(BUDGET), STEPS)
    assert tokens == expected
    assert cache == [k + STEPS - 1 for k in kept] and kept[0] < PROMPT
    later = [d for d in decisions if d.key.source is KVSource.GROWN and d.query_len != 1]
    assert all(d.rewritten and d.prompt_len > d.query_len for d in later)
    assert len(later) == 2 * (-(-PROMPT // chunk) - 1)   # two layers, every chunk but the first


def test_last_chunk_shorter_than_the_window_keeps_the_whole_prompt():
    """A last chunk of 10 queries cannot vote as the prompt's 32-query window: that prefill
    stays exact, says why, and the cache keeps every token (decode still runs stage 2)."""
    model = tiny_hf("llama")
    model.generation_config.eos_token_id = None
    decisions = []
    tokens, cache = chunked_generate(model, prompt(PROMPT), 290, False, decisions)
    (last,) = {d.reason for d in decisions if d.query_len == 10}
    assert last == ("10 new queries over an existing cache: rocketkv selects by the last 32 "
                    "queries of the prompt, more than this chunk has; the cache is kept whole")
    assert cache == [PROMPT + STEPS - 1] * 2 and len(tokens) == STEPS
    assert any(d.rewritten and d.query_len == 1 for d in decisions)
