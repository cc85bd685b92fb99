"""Each policy against a direct implementation of its paper's definition, and through the pass
(DynamicCache and RocketKVCache) against the eager oracle."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from models import VOCAB, tiny_hf
from oracle import oracle_generate

from rkv_compile import RocketKVConfig
from rkv_compile.backend import make_backend
from rkv_compile.cache import RocketKVCache
from rkv_compile.policies import Full, OracleTopK, SnapKV

rewrite_only = make_backend(compiler=lambda gm, example_inputs: gm.forward)


def _qkv(seed, B, Hkv, G, S, n, D):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hkv * G, S, D, generator=g)
    k, v = (torch.randn(B, Hkv, n, D, generator=g) for _ in range(2))
    return q, k, v


def snapkv_by_definition(q_window, key, keep, kernel_size):
    """SnapKV, per query head as the paper writes it: the window's causal softmax attention to
    every key, summed over the window, average-pooled; a KV head keeps the prefix tokens with the
    best mean score over its query heads."""
    B, Hq, w, D = q_window.shape
    Hkv, n = key.shape[1], key.shape[2]
    kept = torch.empty(B, Hkv, keep, dtype=torch.long)
    for b in range(B):
        for h in range(Hkv):
            heads = range(h * Hq // Hkv, (h + 1) * Hq // Hkv)
            scores = 0
            for qh in heads:
                logits = q_window[b, qh] @ key[b, h].T / D**0.5               # w x n
                causal = torch.ones(w, n, dtype=torch.bool).tril(n - w)
                probs = logits.masked_fill(~causal, float("-inf")).softmax(-1)
                votes = probs[:, : n - w].sum(0)
                scores = scores + F.avg_pool1d(votes[None], kernel_size, 1, kernel_size // 2)[0]
            order = sorted(range(n - w), key=lambda i: (-float(scores[i]), i))[:keep]
            kept[b, h] = torch.tensor(sorted(order))
    return kept


@settings(deadline=None, max_examples=20)
@given(B=st.integers(1, 2), Hkv=st.integers(1, 2), G=st.integers(1, 3), n=st.integers(12, 60),
       w=st.integers(1, 8), keep=st.integers(1, 10), seed=st.integers(0, 2**16))
def test_snapkv_keeps_what_its_definition_keeps(B, Hkv, G, n, w, keep, seed):
    keep = min(keep, n - w)
    q, k, v = _qkv(seed, B, Hkv, G, w, n, 8)
    policy = SnapKV(64, 8, window_size=w)
    kk, vv = policy.evict(q, k, v, None, 8**-0.5, keep)
    index = snapkv_by_definition(q, k, keep, policy.kernel_size)
    want_k = torch.cat([k.gather(2, index[..., None].expand(-1, -1, -1, 8)), k[:, :, n - w:]], 2)
    want_v = torch.cat([v.gather(2, index[..., None].expand(-1, -1, -1, 8)), v[:, :, n - w:]], 2)
    torch.testing.assert_close(kk, want_k, rtol=0, atol=0)
    torch.testing.assert_close(vv, want_v, rtol=0, atol=0)


@settings(deadline=None, max_examples=20)
@given(B=st.integers(1, 2), Hkv=st.integers(1, 2), G=st.integers(1, 3), n=st.integers(2, 60),
       topk=st.integers(1, 70), masked=st.booleans(), seed=st.integers(0, 2**16))
def test_oracle_topk_attends_its_best_tokens(B, Hkv, G, n, topk, masked, seed):
    """Per KV head: the topk tokens with the highest group-mean exact softmax probability; each
    query head attends exactly to those (masked slots never)."""
    q, k, v = _qkv(seed, B, Hkv, G, 1, n, 8)
    live = torch.rand(B, 1, 1, n, generator=torch.Generator().manual_seed(seed)) > 0.3 \
        if masked else torch.ones(B, 1, 1, n, dtype=torch.bool)
    live[..., -1] = True
    out = OracleTopK(topk, 8).decode(q, k, v, live if masked else None, 8**-0.5, 0, 8, topk)
    for b in range(B):
        for h in range(Hkv):
            heads = range(h * G, (h + 1) * G)
            probs = torch.stack([(q[b, qh, 0] @ k[b, h].T * 8**-0.5)
                                 .masked_fill(~live[b, 0, 0], float("-inf")).softmax(-1)
                                 for qh in heads]).mean(0)
            chosen = sorted(range(n), key=lambda i: (-float(probs[i]), i))[:topk]
            chosen = [i for i in chosen if live[b, 0, 0, i]]
            for qh in heads:
                weights = (q[b, qh, 0] @ k[b, h, chosen].T * 8**-0.5).softmax(-1)
                torch.testing.assert_close(out[b, qh, 0], weights @ v[b, h, chosen],
                                           rtol=1e-5, atol=1e-6)


def test_full_plan_keeps_everything():
    plan = Full(64, 8).plan(300, 16)
    assert (plan.prompt_budget, plan.capacity, plan.topk) == (300, 308, 0)


def _generate(model, ids, steps, cache, options):
    forward = model.forward
    model.forward = torch.compile(forward, backend=lambda gm, ex: rewrite_only(gm, ex,
                                                                               options=options))
    try:
        out = model.generate(ids, max_new_tokens=steps, do_sample=False, past_key_values=cache,
                             return_dict_in_generate=True)
    finally:
        model.forward = forward
    return out.sequences[0, ids.shape[1]:].tolist(), out.past_key_values


@pytest.mark.parametrize("policy", ["snapkv", "oracle-topk", "full"])
def test_policy_through_the_pass_matches_the_oracle(policy):
    """DynamicCache and RocketKVCache paths give the eager oracle's tokens, and hold what the
    plan keeps."""
    model = tiny_hf("llama")
    model.generation_config.eos_token_id = None
    options = {"policy": policy, "token_budget": 48, "max_new_tokens": 6}
    config = RocketKVConfig.from_options(options)
    ids = torch.randint(0, VOCAB, (1, 200), generator=torch.Generator().manual_seed(7))
    plan = config.plan(200, 16)
    with torch.no_grad():
        expected, kept = oracle_generate(model, ids, config, 6)
        torch._dynamo.reset()
        dynamic, dynamic_cache = _generate(model, ids, 6, None, options)
        torch._dynamo.reset()
        static, static_cache = _generate(model, ids, 6, RocketKVCache(model.config, 6), options)
    assert dynamic == static == expected
    assert kept == [min(200, plan.prompt_budget)] * 2
    assert [layer.keys.shape[2] for layer in dynamic_cache.layers] == [kept[0] + 5] * 2
    assert [int(layer.lengths[0]) for layer in static_cache.layers] == [kept[0] + 5] * 2
