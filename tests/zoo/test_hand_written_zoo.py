"""The zoo's hand-written members: models that spell attention and their caches themselves.

The same rule as the transformers zoo: with a budget a member is compressed and its tokens equal
the eager oracle's, or every site stays exact with a reason and its outputs equal eager's.
"""
import pytest
import torch
import transformers as T
from models import (Encoder, GPTFast, TinyGPT, compiled, gpt_fast_greedy, greedy,
                    oracle_gpt_tokens, prompt, tiny_hf)

import rkv_compile
from rkv_compile import RocketKVConfig
from rkv_compile.passes.causal_mask import NOT_CAUSAL_PREFILL

BUDGET = {"token_budget": 64, "max_new_tokens": 8}


@pytest.mark.parametrize("inductor", [False, True])
def test_nanogpt_tuple_cache_is_compressed_as_the_oracle(inductor):
    model = TinyGPT().eval()
    config = RocketKVConfig.from_options(BUDGET)
    ids = prompt(200)
    tokens, kept = greedy(compiled(model, BUDGET, inductor), ids, 8)
    expected, expected_kept = oracle_gpt_tokens(model, ids, config, 8)
    plan = config.plan(200, 16)
    assert expected_kept == [plan.prompt_budget + 7] * 2
    assert kept == expected_kept
    assert tokens == expected
    report = rkv_compile.explain(greedy, model, ids, 3, options=BUDGET)
    assert report.sites and not report.exact
    assert {(s.kind, s.query_len) for s in report.sites} == {("manual", "200"), ("manual", "1")}


def test_nanogpt_no_budget_equals_eager():
    model = TinyGPT().eval()
    ids = prompt(60)
    assert greedy(compiled(model, {"token_budget": None}, True), ids, 6) == greedy(model, ids, 6)


def test_positions_from_cache_length_stay_exact():
    """Eviction would shift this model's positions. Its prefill computes them (no input), so
    it keeps the whole prompt beside the compressed cache until a decode step has been checked;
    the decode step derives them from the stored length, so it runs exactly over the whole
    prompt, and the cache stays whole from then on."""
    model = TinyGPT(positions_from_cache=True).eval()
    ids = prompt(200)
    report = rkv_compile.explain(greedy, model, ids, 3, options=BUDGET)
    decode = [s for s in report.sites if s.query_len == "1"]
    assert len(decode) >= 2 and not any(s.rewritten for s in decode)
    assert "positions (or the query) derive from the stored cache length" in decode[0].action
    assert all("the cache holds every token" in s.action for s in decode[2:])
    tokens, cache = greedy(compiled(model, BUDGET, True), ids, 6)
    assert (tokens, cache) == greedy(model, ids, 6)
    assert cache == [200 + 5] * 2


def test_gpt_fast_static_buffers_stay_exact():
    """Buffers the model writes in place at explicit positions are not the pass's to shrink:
    every site, prefill and decode, stays exact and says so; tokens equal eager's."""
    model = GPTFast().eval()
    ids = prompt(200)
    report = rkv_compile.explain(gpt_fast_greedy, model, ids, 3, options=BUDGET)
    assert {s.query_len for s in report.sites} == {"200", "1"} and not report.rewritten
    assert all(s.kv_source == "written in place into a buffer" and "RocketKVCache" in s.action
               for s in report.sites)
    expected = gpt_fast_greedy(GPTFast().eval(), ids, 8)
    assert gpt_fast_greedy(compiled(GPTFast().eval(), BUDGET, True), ids, 8) == expected
    assert len(set(expected)) > 1


def test_encoder_is_left_exact():
    model = Encoder().eval()
    x = torch.randn(2, 50, 64)
    report = rkv_compile.explain(model, x, options=BUDGET)
    assert len(report.sites) == 1 and not report.rewritten
    assert report.sites[0].kv_source == "no cache"
    with torch.no_grad():
        torch.testing.assert_close(compiled(model, BUDGET, True)(x), model(x), atol=1e-5, rtol=1e-5)


def test_training_step_is_left_exact():
    model = tiny_hf("llama").train()
    ids = prompt(40)
    report = rkv_compile.explain(lambda i: model(i, labels=i).loss, ids, options=BUDGET)
    assert report.sites and not report.rewritten
    model.zero_grad()
    model(ids, labels=ids).loss.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled(lambda i: model(i, labels=i).loss, BUDGET, True)(ids).backward()
    for got, want in zip([p.grad for p in model.parameters()], expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("model", ["nanogpt-manual", "llama-sdpa"])
def test_attention_dropout_stays_exact(model):
    """Dropout active (training mode, no gradients): every site stays exact, and the graph, run
    as FX, draws the same random numbers as eager."""
    if model == "nanogpt-manual":
        net, ids = TinyGPT(dropout=0.25).train(), prompt(120)

        def run(forward):
            return greedy(forward, ids, 4)

        def explained():
            return rkv_compile.explain(run, net.forward, options=BUDGET)
    else:
        config = T.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               attention_dropout=0.25, attn_implementation="sdpa")
        torch.manual_seed(0)
        net, ids = T.LlamaForCausalLM(config).train(), prompt(120)
        net.generation_config.eos_token_id = None

        def run(forward):
            net.forward = forward
            try:
                with torch.no_grad():
                    return net.generate(ids, max_new_tokens=4, min_new_tokens=4,
                                        do_sample=False).tolist()
            finally:
                del net.forward

        def explained():   # as users call it: the forward compiled, generate's loop not traced
            return rkv_compile.explain(net.generate, ids, max_new_tokens=4, min_new_tokens=4,
                                       do_sample=False, options=BUDGET)
    torch.manual_seed(1)
    report = explained()
    assert report.sites and not report.rewritten
    assert all(s.action == "attention dropout p=0.25" for s in report.sites)
    torch.manual_seed(2)
    expected = run(net.forward)
    torch.manual_seed(2)
    assert run(compiled(net.forward, BUDGET, inductor=False)) == expected


def test_cross_attention_stays_exact():
    """BART: cross-attention reads keys computed from the encoder. With the encoder's padding
    mask and as many decoder tokens as encoder tokens, a cross-attention prefill looks like a
    self-attention one by its shapes; its mask, evaluated, is not causal, so it stays exact.
    (BART's decoder derives positions from the cache length, so its decode stays exact too.)"""
    config = T.BartConfig(vocab_size=128, d_model=64, encoder_layers=2, decoder_layers=2,
                          encoder_attention_heads=4, decoder_attention_heads=4,
                          encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=512,
                          init_std=0.2)
    torch.manual_seed(0)
    model = T.BartForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = None
    ids = prompt(200)
    # 199 decoder tokens after the start token generate prepends: 200, as many as the encoder's
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=5, min_new_tokens=5,
                  do_sample=False, decoder_input_ids=prompt(199, seed=2))
    with torch.no_grad():
        expected = model.generate(ids, **kwargs)
        report = rkv_compile.explain(model.generate, ids, **kwargs, options=BUDGET)
        model.forward = compiled(model.forward, BUDGET, inductor=False)
        try:
            got = model.generate(ids, **kwargs)
        finally:
            del model.forward
    assert torch.equal(got, expected) and len(set(expected[0, 200:].tolist())) > 1
    prefill = [s for s in report.sites if s.query_len == "200" and s.kv_source == "new cache"]
    assert len(prefill) == 4   # the decoder's self- and cross-attention (the encoder has none)
    assert sum(s.action == NOT_CAUSAL_PREFILL for s in prefill) == 2
    decode = [s for s in report.sites if s.query_len == "1"]
    assert decode and not any(s.rewritten for s in decode)
    assert sum(s.kv_source == "graph input, not written" for s in decode) >= 2
