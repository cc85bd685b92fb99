"""Prefill masks proven plain causal run SDPA with is_causal=True: the verdict is checked against
the mask's values, and every compiled prefill against eager, with padding and without."""
import logging

import pytest
import torch
from hypothesis import given, settings, strategies as st
from devices import DEVICE
from models import MaskedSDPA, VOCAB, prefill_mask, tiny_hf

import rkv_compile
from rkv_compile.backend import make_backend
from rkv_compile.passes import causal_mask
from rkv_compile.passes.causal_mask import NOT_CAUSAL_PREFILL, CausalProof
from rkv_compile.passes.sites import find_sites

OPTIONS = {"token_budget": 16}


def compile_recording(model):
    """model compiled by the rocketkv pass (no Inductor); returns it, the decisions and graphs."""
    decisions, graphs = [], []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    backend = make_backend(compiler=keep, on_analysis=decisions.extend)
    fn = torch.compile(model, backend=lambda gm, ex: backend(gm, ex, options=OPTIONS))
    return fn, decisions, graphs


def sdpa_masks(gm) -> list:
    return [(s.mask, s.is_causal) for s in find_sites(gm.graph)]


@settings(deadline=None, max_examples=12)
@given(recipe=st.sampled_from(["causal", "additive", "lowest", "window", "flipped"]),
       length=st.integers(20, 48), batch=st.integers(1, 2), data=st.data())
def test_verdict_matches_the_mask_and_outputs_match_eager(recipe, length, batch, data):
    torch._dynamo.reset()   # each example compiles a new model
    flip = (data.draw(st.integers(0, length - 1)), data.draw(st.integers(0, length - 1)))
    model = MaskedSDPA(recipe, flip=flip).eval()
    ids = torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(length))
    ones = torch.ones_like(ids)
    expected_mask = prefill_mask(recipe, ones, length, flip)
    attend = expected_mask if expected_mask.dtype == torch.bool else expected_mask == 0
    causal = torch.equal(attend[0, 0], torch.ones(length, length, dtype=torch.bool).tril())
    fn, decisions, graphs = compile_recording(model)
    padded = ones.clone()
    padded[-1, : data.draw(st.integers(1, length - 1))] = 0
    with torch.no_grad():
        for padding in (ones, padded):
            got, expected = fn(ids, padding), model(ids, padding)
            torch.testing.assert_close(got[0], expected[0], equal_nan=True)
    (d,) = decisions
    assert isinstance(d.causal, CausalProof) == causal, d.causal
    assert d.rewritten == causal   # a prefill whose mask is not causal stays exact
    if causal:
        assert sdpa_masks(graphs[0]) == [(None, True)]
        assert [n.name for n in d.causal.padding] == ["l_padding_"]


def test_large_masks_are_checked_by_a_compiled_reduction(monkeypatch):
    """Above EAGER_CHECK_ELEMENTS the check is compiled by Inductor (no L x L tensor): it must
    reach the same verdicts (on the GPU too, where the large masks are)."""
    monkeypatch.setattr(causal_mask, "EAGER_CHECK_ELEMENTS", 0)
    ids = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    verdicts = []
    for recipe in ("causal", "window"):
        torch._dynamo.reset()
        fn, decisions, _ = compile_recording(MaskedSDPA(recipe).eval().to(DEVICE))
        with torch.no_grad():
            fn(ids, torch.ones_like(ids))
        verdicts.append(decisions[0].causal)
    assert isinstance(verdicts[0], CausalProof)
    assert verdicts[1] == "the mask is not the causal mask (with no padding)"


def test_mask_from_another_input_is_kept():
    """A mask read from an input that is no padding mask cannot be proven: it stays."""
    model = MaskedSDPA("input").eval()
    ids = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(3))
    causal = torch.ones(20, 20, dtype=torch.bool).tril()
    bias = torch.zeros(20, 20).masked_fill(~causal, -1e9)
    fn, decisions, graphs = compile_recording(model)
    with torch.no_grad():
        torch.testing.assert_close(fn(ids, None, bias)[0], model(ids, None, bias)[0])
    (d,) = decisions
    assert d.causal == "the mask reads input l_mask_, which is no 2-D padding mask"
    assert sdpa_masks(graphs[0])[0][0] is not None


def test_hf_prefill_with_attention_mask_runs_is_causal(caplog):
    """transformers builds an L x L mask from attention_mask when traced: proven causal, the
    prefill runs is_causal; with padding it keeps the mask, uncompiled, and still matches eager."""
    model = tiny_hf("llama")
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    fn, decisions, graphs = compile_recording(model)
    padded = torch.ones_like(ids)
    padded[1, :7] = 0
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="rkv_compile"):
        for padding in (torch.ones_like(ids), padded):
            got = fn(ids, attention_mask=padding).logits
            expected = model(ids, attention_mask=padding).logits
            torch.testing.assert_close(got, expected)
    assert decisions and all(isinstance(d.causal, CausalProof) for d in decisions)
    assert all(mask is None and is_causal for mask, is_causal in sdpa_masks(graphs[0]))
    assert "a padded prompt" in caplog.text
    with torch.no_grad():
        report = rkv_compile.explain(model, ids, attention_mask=torch.ones_like(ids),
                                     options=OPTIONS)
    assert all("proven plain causal" in s.action for s in report.sites)


@pytest.mark.parametrize("recipe", ["causal", "window"])
def test_explain_says_what_happens_to_the_mask(recipe):
    model = MaskedSDPA(recipe).eval()
    ids = torch.randint(0, VOCAB, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        report = rkv_compile.explain(model, ids, torch.ones_like(ids), options=OPTIONS)
    (site,) = report.sites
    assert ("proven plain causal" in site.action) == (recipe == "causal")
    assert (site.action == NOT_CAUSAL_PREFILL) == (recipe == "window") != site.rewritten
