"""Property: attention modules drawn by hypothesis (GQA ratio, head_dim, how the mask is given,
explicit scale, argument spelling, dtype) obey the pass's rule. No budget: eager's tokens. With a
budget: the tokens of the eager oracle applying RocketKV, or every site exact with a reason."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from models import VOCAB, OracleGPT, TinyGPT, greedy, oracle_gpt_tokens

from rkv_compile import RocketKVConfig
from rkv_compile.backend import make_backend

SPELLINGS = ("manual", "sdpa-positional-gqa-bool-mask", "sdpa-keywords-repeated-additive-mask",
             "sdpa-is-causal")


class SpelledGPT(TinyGPT):
    """TinyGPT whose attention is written one of the SPELLINGS ways."""

    def __init__(self, spelling: str = "manual", **kwargs):
        super().__init__(**kwargs)
        self.spelling = spelling
        self.init_kwargs["spelling"] = spelling

    def attend(self, layer, q, k, v, mask):
        group = self.heads // self.kv_heads
        if self.spelling == "manual":
            return super().attend(layer, q, k, v, mask)
        if self.spelling == "sdpa-positional-gqa-bool-mask":
            return F.scaled_dot_product_attention(q, k, v, mask, 0.0, False, scale=self.scale,
                                                  enable_gqa=True)
        if self.spelling == "sdpa-keywords-repeated-additive-mask":
            bias = torch.zeros(mask.shape, dtype=q.dtype).masked_fill(~mask, float("-inf"))
            return F.scaled_dot_product_attention(
                query=q, key=k.repeat_interleave(group, dim=1),
                value=v.repeat_interleave(group, dim=1), attn_mask=bias, scale=self.scale)
        # is_causal for the prompt, no mask for one decode query (a Python branch: Dynamo
        # passes SDPA no symbolic is_causal)
        if q.shape[2] > 1:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale,
                                                  enable_gqa=True)
        return F.scaled_dot_product_attention(q, k, v, scale=self.scale, enable_gqa=True)


class OracleSpelledGPT(OracleGPT, SpelledGPT):
    """The eager oracle over a SpelledGPT: its exact attention keeps the model's spelling."""


def _compiled(model, options, decisions):
    backend = make_backend(compiler=lambda gm, _: gm.forward, on_analysis=decisions.extend)
    return torch.compile(model, backend=lambda gm, ex: backend(gm, ex, options=options))


@pytest.mark.parametrize("spelling", SPELLINGS)   # every spelling, whatever hypothesis draws
@settings(max_examples=4, deadline=None)
@given(kv_heads=st.sampled_from([1, 2]),
       group=st.sampled_from([1, 2, 3]), head_dim=st.sampled_from([8, 12, 16]),
       scale=st.sampled_from([None, 0.2]), dtype=st.sampled_from([torch.float32, torch.float64]),
       length=st.integers(40, 120), seed=st.integers(0, 2**16))
def test_generated_attention_obeys_the_rule(spelling, kv_heads, group, head_dim, scale, dtype,
                                            length, seed):
    heads = kv_heads * group
    model = SpelledGPT(spelling, dim=heads * head_dim, heads=heads, kv_heads=kv_heads,
                       scale=scale, seed=seed).to(dtype).eval()
    ids = torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))
    exact, _ = greedy(model, ids, 4)
    torch._dynamo.reset()
    assert greedy(_compiled(model, {"token_budget": None}, []), ids, 4)[0] == exact
    options = {"token_budget": 24, "max_new_tokens": 4, "window_size": 8}
    decisions = []
    torch._dynamo.reset()
    tokens, kept = greedy(_compiled(model, options, decisions), ids, 4)
    assert decisions, "every spelling is an attention site"
    assert all(d.rewritten or d.reason for d in decisions)
    if dtype == torch.float64:   # not an op dtype: exact, and says why
        assert all("unsupported" in d.reason for d in decisions)
    decode = [d for d in decisions if d.query_len == 1]
    if decode and all(d.rewritten for d in decode):
        config = RocketKVConfig.from_options(options)
        expected, expected_kept = oracle_gpt_tokens(model, ids, config, 4, OracleSpelledGPT)
        assert (tokens, kept) == (expected, expected_kept)
    else:   # every site left exact: the model is exact
        assert all(not d.rewritten for d in decisions)
        assert (tokens, kept) == (exact, [length + 3] * 2)
