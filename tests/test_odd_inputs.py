"""Odd shapes and inputs behave as eager: unsupported dtypes fall back to exact with a warning,
NaN stays where eager puts it, short prompts and empty batches are exact, zero new tokens is
what transformers does."""
import warnings

import pytest
import torch
from models import VOCAB, tiny_hf

from rkv_compile import diagnostics
from rkv_compile.backend import make_backend

OPTIONS = {"token_budget": 48, "max_new_tokens": 4}


def _compiled(model, decisions=None):
    backend = make_backend(compiler=lambda gm, _: gm.forward,
                           on_analysis=decisions.extend if decisions is not None else None)
    return torch.compile(model.forward, backend=lambda gm, ex: backend(gm, ex, options=OPTIONS))


def _generate(model, ids, forward=None, **kwargs):
    original = model.forward
    model.forward = forward or original
    try:
        with torch.no_grad():
            return model.generate(ids, do_sample=False, **{"max_new_tokens": 4, **kwargs})
    finally:
        model.forward = original


def test_float64_falls_back_to_exact_with_one_warning(monkeypatch):
    monkeypatch.setattr(diagnostics, "_WARNED", set())   # warned once per process
    model = tiny_hf("llama").double()
    model.generation_config.eos_token_id = None
    ids = torch.randint(0, VOCAB, (1, 200), generator=torch.Generator().manual_seed(1))
    decisions = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        out = _generate(model, ids, _compiled(model, decisions), min_new_tokens=4)
    ours = [w for w in caught if "rocketkv: unsupported: torch.float64" in str(w.message)]
    assert len(ours) == 1
    assert decisions and all(d.reason and "unsupported" in d.reason for d in decisions)
    assert torch.equal(out, _generate(model, ids, min_new_tokens=4))


@pytest.mark.parametrize("length", [1, 5, 31])
def test_prompts_shorter_than_the_window_are_exact(length):
    model = tiny_hf("llama")
    model.generation_config.eos_token_id = None
    ids = torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(length))
    out = _generate(model, ids, _compiled(model), min_new_tokens=4)
    assert torch.equal(out, _generate(model, ids, min_new_tokens=4))


def test_nan_in_the_prompt_goes_where_eager_puts_it():
    """A NaN embedding in the prompt: the logits the compiled prefill and first decode steps
    give are NaN exactly where eager's are (all of them, through attention)."""
    model = tiny_hf("llama")
    embeds = model.get_input_embeddings()(
        torch.randint(0, VOCAB, (1, 120), generator=torch.Generator().manual_seed(2)))
    embeds[0, 60, 3] = float("nan")
    with torch.no_grad():
        want = model(inputs_embeds=embeds).logits
        got = _compiled(model)(inputs_embeds=embeds).logits
    assert torch.equal(got.isnan(), want.isnan())
    torch.testing.assert_close(got.nan_to_num(), want.nan_to_num())


def _outcome(fn):
    """What a call gives: its value, or the kind of error (Dynamo wraps errors from the model
    in RuntimeError subclasses)."""
    try:
        return fn()
    except RuntimeError:
        return RuntimeError
    except Exception as error:
        return type(error)


def test_empty_batch_and_zero_new_tokens_behave_as_eager():
    """transformers' Llama cannot view an empty batch (a reshape with -1 of 0 elements): the
    backend fails the same way, with no error of its own. Zero new tokens: the same outcome."""
    model = tiny_hf("llama")
    ids = torch.randint(0, VOCAB, (1, 200), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        eager = _outcome(lambda: model(ids[:0]).logits.shape)
        ours = _outcome(lambda: _compiled(model)(ids[:0]).logits.shape)
    assert eager == ours == RuntimeError
    torch._dynamo.reset()
    outcomes = [_outcome(lambda: _generate(model, ids, forward, max_new_tokens=0).tolist())
                for forward in (None, _compiled(model))]
    assert outcomes[0] == outcomes[1]
