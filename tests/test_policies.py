"""Each policy against a direct implementation of its paper's definition, and through the pass
(DynamicCache and RocketKVCache) against the eager oracle."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from models import VOCAB, generate, stored_lengths, tiny_hf
from rkv_compile.eager import generate as oracle_generate

import rkv_compile
from rkv_compile import RocketKVConfig, state, stored
from rkv_compile.backend import make_backend
from rkv_compile.cache import RocketKVCache
from rkv_compile.kernels import reference
from rkv_compile.policies import (H2O, ChunkKV, Full, KVQuant, OracleTopK, PyramidKV, Quest,
                                  RocketKV, RocketKVFine, ShotKV, SnapKV, SparQ, StreamingLLM)

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
    kk, vv = policy.compress(q, k, v, None, 8**-0.5, keep + w)[:2]
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


@settings(deadline=None, max_examples=20)
@given(B=st.integers(1, 2), Hkv=st.integers(1, 2), G=st.integers(1, 3), n=st.integers(12, 80),
       w=st.integers(1, 8), keep=st.integers(1, 40), chunk=st.integers(1, 12),
       seed=st.integers(0, 2**16))
def test_chunkkv_keeps_its_best_chunks(B, Hkv, G, n, w, keep, chunk, seed):
    """Per KV head: each chunk's total of the window's causal softmax attention over the
    group's query heads; chunks kept best first (ties: earlier), token by token up to `keep`."""
    keep = min(keep, n - w)
    q, k, v = _qkv(seed, B, Hkv, G, w, n, 8)
    policy = ChunkKV(64, 8, window_size=w, chunk_size=chunk)
    kk, _ = policy.compress(q, k, v, None, 8**-0.5, keep + w)[:2]
    for b in range(B):
        for h in range(Hkv):
            votes = 0
            for qh in range(h * G, (h + 1) * G):
                logits = q[b, qh] @ k[b, h].T / 8**0.5
                causal = torch.ones(w, n, dtype=torch.bool).tril(n - w)
                votes = votes + logits.masked_fill(~causal, float("-inf")).softmax(-1)[:, : n - w].sum(0)
            starts = range(0, n - w, chunk)
            order = sorted(starts, key=lambda c: (-float(votes[c:c + chunk].sum()), c))
            kept = [i for c in order for i in range(c, min(c + chunk, n - w))][:keep]
            want = sorted(kept) + list(range(n - w, n))
            torch.testing.assert_close(kk[b, h], k[b, h, want], rtol=0, atol=0)


def _live_mask(seed, B, n, masked):
    """A boolean decode mask (B, 1, 1, n) with random dead slots (the last always live), or None."""
    if not masked:
        return None
    live = torch.rand(B, 1, 1, n, generator=torch.Generator().manual_seed(seed + 1)) > 0.3
    live[..., -1] = True
    return live


def _attend(q, k, v, slots, scale):
    """Exact softmax attention of one query vector over the listed slots."""
    slots = list(slots)
    return (q @ k[slots].T * scale).softmax(-1) @ v[slots]


@settings(deadline=None, max_examples=20)
@given(B=st.integers(1, 2), Hkv=st.integers(1, 2), G=st.integers(1, 3), n=st.integers(12, 60),
       w=st.integers(1, 8), sinks=st.integers(0, 6), budget=st.integers(8, 40),
       masked=st.booleans(), seed=st.integers(0, 2**16))
def test_streamingllm_keeps_and_attends_sinks_and_recent(B, Hkv, G, n, w, sinks, budget, masked,
                                                         seed):
    """Prefill keeps the first `sink_size` and the last `token_budget - sink_size` tokens; a
    decode step attends exactly to the first `sink_size` and the last `token_budget - sink_size`
    live slots."""
    policy = StreamingLLM(budget, 8, window_size=w, sink_size=sinks)
    q, k, v = _qkv(seed, B, Hkv, G, w, n, 8)
    keep = min(max(budget, w) - w, n - w)
    kk, _ = policy.compress(q, k, v, None, 8**-0.5, keep + w)[:2]
    prefix = list(range(n - w))
    want = sorted(set(prefix[:sinks][:keep]) | set(prefix[len(prefix) - (keep - min(sinks, keep)):]))
    want = want + list(range(n - w, n))
    torch.testing.assert_close(kk, k[:, :, want], rtol=0, atol=0)

    q1 = _qkv(seed + 2, B, Hkv, G, 1, n, 8)[0]
    live = _live_mask(seed, B, n, masked)
    out = policy.decode(q1, k, v, live, 8**-0.5, 0, 8, budget)
    for b in range(B):
        alive = [i for i in range(n) if live is None or live[b, 0, 0, i]]
        chosen = sorted(set(alive[:sinks]) | set(alive[max(0, len(alive) - (budget - sinks)):]))
        for h in range(Hkv * G):
            torch.testing.assert_close(out[b, h, 0], _attend(q1[b, h, 0], k[b, h // G],
                                                              v[b, h // G], chosen, 8**-0.5),
                                       rtol=1e-5, atol=1e-6)


@settings(deadline=None, max_examples=20)
@given(B=st.integers(1, 2), Hkv=st.integers(1, 2), G=st.integers(1, 3), n=st.integers(2, 70),
       page=st.sampled_from([1, 3, 4, 8]), pages=st.integers(1, 6), masked=st.booleans(),
       seed=st.integers(0, 2**16))
def test_quest_attends_each_heads_best_pages(B, Hkv, G, n, page, pages, masked, seed):
    """Per query head: pages of `page` slots, scored by sum_d max(q_d min_d, q_d max_d) over
    their live keys; the best `pages` (ties: earlier page), exact attention over their live
    slots."""
    q, k, v = _qkv(seed, B, Hkv, G, 1, n, 8)
    live = _live_mask(seed, B, n, masked)
    out = Quest(64, 8).decode(q, k, v, live, 8**-0.5, page, 8, pages * page)
    for b in range(B):
        alive = [i for i in range(n) if live is None or live[b, 0, 0, i]]
        for h in range(Hkv * G):
            qv, kh, vh = q[b, h, 0], k[b, h // G], v[b, h // G]
            scored = []
            for p in range(-(-n // page)):
                slots = [i for i in range(p * page, min(n, (p + 1) * page)) if i in alive]
                if slots:
                    bound = torch.maximum(qv * kh[slots].amin(0), qv * kh[slots].amax(0)).sum()
                    scored.append((-float(bound), p, slots))
            chosen = [i for _, _, slots in sorted(scored)[:pages] for i in slots]
            torch.testing.assert_close(out[b, h, 0], _attend(qv, kh, vh, chosen, 8**-0.5),
                                       rtol=1e-5, atol=1e-6)


@settings(deadline=None, max_examples=20)
@given(B=st.integers(1, 2), Hkv=st.integers(1, 2), G=st.integers(1, 3), n=st.integers(2, 60),
       dims=st.integers(1, 8), topk=st.integers(1, 70), masked=st.booleans(),
       seed=st.integers(0, 2**16))
def test_sparq_by_its_three_steps(B, Hkv, G, n, dims, topk, masked, seed):
    """Per KV head: the r dims of largest group-mean |q|; each head's approximate softmax with
    SparQ's temperature; the topk tokens of best group-mean approximate score; each head's exact
    attention over them, mixed with the mean of the live values by the approximate mass."""
    q, k, v = _qkv(seed, B, Hkv, G, 1, n, 8)
    live = _live_mask(seed, B, n, masked)
    out = SparQ(64, 8).decode(q, k, v, live, 8**-0.5, 0, dims, topk)
    for b in range(B):
        alive = [i for i in range(n) if live is None or live[b, 0, 0, i]]
        for h in range(Hkv):
            heads = range(h * G, (h + 1) * G)
            r = q[b, list(heads), 0].abs().mean(0).topk(dims).indices
            approx = {}
            for qh in heads:
                qv = q[b, qh, 0]
                temperature = (8 * qv[r].abs().sum() / qv.abs().sum()).sqrt()
                logits = torch.full((n,), float("-inf"))
                logits[alive] = k[b, h][alive][:, r] @ qv[r] / temperature
                approx[qh] = logits.softmax(-1)
            mean = torch.stack(list(approx.values())).mean(0)
            chosen = sorted(range(n), key=lambda i: (-float(mean[i]), i))[:topk]
            chosen = [i for i in chosen if i in alive]
            for qh in heads:
                mass = approx[qh][chosen].sum()
                want = mass * _attend(q[b, qh, 0], k[b, h], v[b, h], chosen, 8**-0.5) \
                    + (1 - mass) * v[b, h][alive].mean(0)
                torch.testing.assert_close(out[b, qh, 0], want, rtol=1e-5, atol=1e-5)


@given(budget=st.integers(40, 4096), window=st.integers(1, 32), layers=st.integers(2, 80),
       beta=st.integers(1, 40))
def test_pyramidkv_budgets_shrink_with_depth(budget, window, layers, beta):
    """The authors' arithmetic progression: the first layer keeps 2P - P//beta prompt tokens
    before the window, the last about P//beta, P per layer on average (steps round down, so the
    layers may keep up to (layers - 1) / 2 more each)."""
    policy = PyramidKV(budget, 8, window_size=window, beta=beta)
    kept = [policy.plan(10_000, 64, i, layers).prompt_budget - window for i in range(layers)]
    P = budget - window
    assert kept[0] == 2 * P - P // beta
    assert kept == sorted(kept, reverse=True)
    assert P // beta <= kept[-1] <= P // beta + layers - 1
    assert P * layers <= sum(kept) <= P * layers + layers * (layers - 1) // 2


@given(prompt=st.integers(1, 200_000), budget=st.integers(16, 4096),
       new=st.integers(1, 512), head_dim=st.sampled_from([32, 64, 80, 128, 256]),
       divisor=st.integers(1, 8))
def test_rocketkv_fine_reads_what_rocketkv_reads(prompt, budget, new, head_dim, divisor):
    """Stage 2 at chunk 1 on r // divisor dims, the reads it frees spent on attended tokens:
    at the plan's capacity a step reads RocketKV's entries, n r + 2 D (B / 2), less at most
    one token's worth (2 D). Stage 1 is RocketKV's."""
    ours = RocketKVFine(budget, new, dims_divisor=divisor).plan(prompt, head_dim)
    theirs = RocketKV(budget, new).plan(prompt, head_dim)
    assert (ours.capacity, ours.prompt_budget, ours.chunk) == \
        (theirs.capacity, theirs.prompt_budget, 1)
    assert ours.dims == max(1, theirs.dims // divisor)
    n = theirs.capacity
    reads, budgeted = n * ours.dims + 2 * head_dim * ours.topk, \
        n * theirs.dims + 2 * head_dim * theirs.topk
    assert budgeted - 2 * head_dim < reads <= budgeted
    with pytest.raises(ValueError, match="dims_divisor"):
        RocketKVFine(budget, new, dims_divisor=0)


def test_plans_keep_what_their_papers_keep():
    full = Full(64, 8).plan(300, 16)
    assert (full.capacity, full.prompt_budget, full.topk) == (308, 300, 0)
    assert StreamingLLM(64, 8).plan(300, 16).topk == 64
    quest = Quest(256, 128).plan(8192 - 128, 64, layer=2, layers=30)
    assert (quest.chunk, quest.topk, quest.prompt_budget) == (16, 256, 8192 - 128)
    assert Quest(256, 128).plan(8192 - 128, 64, layer=1, layers=30).topk == 8192
    assert Quest(16, 128).plan(8192 - 128, 64, layer=2, layers=30).topk == 48
    sparq = SparQ(256, 128).plan(8192 - 128, 64)
    assert (sparq.topk, sparq.dims) == (128, 2)


def _rewrite(options):
    return lambda gm, example_inputs: rewrite_only(gm, example_inputs, options=options)


@pytest.mark.parametrize("policy, own", [
    ("snapkv", {}), ("oracle-topk", {}), ("full", {}), ("streamingllm", {}),
    ("quest", {"dense_layers": 1}),   # one sparse layer of the two
    ("sparq", {}), ("chunkkv", {}), ("rocketkv", {"stages": "stage1"}),
    ("rocketkv", {"stages": "stage2"}), ("rocketkv-fine", {})])
def test_policy_through_the_pass_matches_the_oracle(policy, own):
    """DynamicCache and RocketKVCache paths give the eager oracle's tokens, and hold what the
    plan keeps."""
    model = tiny_hf("llama")
    model.generation_config.eos_token_id = None
    options = {"policy": policy, "token_budget": 48, "max_new_tokens": 6, **own}
    config = RocketKVConfig.from_options(options)
    ids = torch.randint(0, VOCAB, (1, 200), generator=torch.Generator().manual_seed(7))
    plan = config.plan(200, 16)
    with torch.no_grad():
        expected, kept = oracle_generate(model, ids, config, 6)
        torch._dynamo.reset()
        dynamic, dynamic_cache = generate(model, ids, 6, None, _rewrite(options))
        torch._dynamo.reset()
        static, static_cache = generate(model, ids, 6, RocketKVCache(model.config, 6),
                                        _rewrite(options))
    assert dynamic == static == expected
    assert kept == [min(200, plan.prompt_budget)] * 2
    assert stored_lengths(dynamic_cache) == stored_lengths(static_cache) == [kept[0] + 5] * 2


def test_pyramidkv_through_either_cache_matches_the_oracle():
    """Each layer keeps its own budget, on either cache (its tensors are as large as the
    layer that keeps most: transformers builds one mask for all layers)."""
    model = tiny_hf("llama")
    model.generation_config.eos_token_id = None
    options = {"policy": "pyramidkv", "token_budget": 64, "max_new_tokens": 6}
    config = RocketKVConfig.from_options(options)
    ids = torch.randint(0, VOCAB, (1, 200), generator=torch.Generator().manual_seed(7))
    budgets = [config.plan(200, 16, layer, 2).prompt_budget for layer in range(2)]
    assert budgets[0] > 64 > budgets[1]
    with torch.no_grad():
        expected, kept = oracle_generate(model, ids, config, 6)
        for cache in (RocketKVCache(model.config, 6), None):
            torch._dynamo.reset()
            tokens, returned = generate(model, ids, 6, cache, _rewrite(options))
            assert tokens == expected and kept == budgets
            assert stored_lengths(returned) == [b + 5 for b in budgets]


def _quantize_by_definition(x, bits, group, dim):
    """Entry by entry: each run of `group` entries along `dim` (of a 4-D tensor) maps to
    round((x - lo) / s) * s + lo, s = (hi - lo) / (2^bits - 1), lo and s as fp16."""
    out = torch.empty_like(x)
    moved, result = x.movedim(dim, -1), out.movedim(dim, -1)
    m = moved.shape[-1]
    for index in torch.cartesian_prod(*(torch.arange(s) for s in moved.shape[:-1])):
        row = moved[tuple(index)]
        for start in range(0, m, group):
            run = row[start:start + group]
            lo = run.min().half().float()
            step = ((run.max() - lo) / (2**bits - 1)).half().float()
            codes = ((run - lo) / step).round().clamp(0, 2**bits - 1) if step > 0 else 0 * run
            result[tuple(index)][start:start + group] = codes * step + lo
    return out


@settings(deadline=None, max_examples=15)
@given(B=st.integers(1, 2), H=st.integers(1, 2), n=st.integers(1, 20), D=st.integers(1, 12),
       bits=st.sampled_from([2, 4, 8]), group=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_kvquant_stores_keys_per_channel_and_values_per_token(B, H, n, D, bits, group, seed):
    """Keys share a scale per channel over runs of tokens, values per token over runs of
    channels; every entry within half a step of its original."""
    _, k, v = _qkv(seed, B, H, 1, 1, n, D)
    policy = RocketKVConfig.from_options({"policy": "kvquant", "kv_bits": bits,
                                          "kv_group_size": group}).method
    index = torch.arange(n).expand(B, H, n)
    kk, vv = policy.quantized(*policy.store(k, v, index))
    torch.testing.assert_close(kk, _quantize_by_definition(k, bits, group, 2), rtol=0, atol=1e-6)
    torch.testing.assert_close(vv, _quantize_by_definition(v, bits, group, 3), rtol=0, atol=1e-6)
    for x, q, dim in ((k, kk, 2), (v, vv, 3)):
        runs = x.movedim(dim, -1)
        spread = max(float((runs[..., s:s + group].amax(-1) - runs[..., s:s + group].amin(-1))
                           .max()) for s in range(0, runs.shape[-1], group))
        assert float((q - x).abs().max()) <= spread / (2**bits - 1) / 2 + 1e-2 * spread + 1e-3


def test_kv_bytes_count_codes_scales_and_exact_new_tokens():
    """Per KV head and layer: 2 n D bits/8 of codes; fp16 scale + zero point per key channel per
    run of G tokens and per value token per run of G channels; new tokens at full width."""
    plain = Full(64, 8)
    assert plain.kv_bytes(100, 8, 64, 2) == 2 * 108 * 64 * 2
    quant = KVQuant(64, 8, kv_bits=4, kv_group_size=32)
    codes = 2 * 100 * 64 * 4 // 8
    scales = 4 * (4 * 64 + 100 * 2)   # 4 token runs x 64 channels; 100 tokens x 2 channel runs
    assert quant.kv_bytes(100, 8, 64, 2) == codes + scales + 2 * 8 * 64 * 2
    assert quant.kv_bytes(100, 8, 64, 2) < 0.4 * plain.kv_bytes(100, 8, 64, 2)


def _group_probs(q, k, b, h, G, rows, n, scale):
    """Summed over the group's heads: causal softmax attention of query rows `rows` (positions
    n - S .. n - 1 of S queries) to the n keys."""
    S = q.shape[2]
    total = torch.zeros(n)
    for qh in range(h * G, (h + 1) * G):
        for r in rows:
            logits = q[b, qh, r] @ k[b, h].T * scale
            logits[n - S + r + 1:] = float("-inf")
            total += logits.softmax(-1)
    return total


@settings(deadline=None, max_examples=15)
@given(B=st.integers(1, 2), Hkv=st.integers(1, 2), G=st.integers(1, 3), n=st.integers(4, 40),
       budget=st.integers(2, 30), recent=st.integers(0, 10), seed=st.integers(0, 2**16))
def test_h2o_keeps_heavy_hitters_and_recent_tokens(B, Hkv, G, n, budget, recent, seed):
    """Prefill: every prompt query votes (causal softmax, summed over the group); the last
    `recent_size` tokens and the most-voted of the rest are kept, with their votes as state."""
    recent = min(recent, budget)
    policy = H2O(budget, 8, recent_size=recent)
    q, k, v = _qkv(seed, B, Hkv, G, n, n, 8)
    keep = min(budget, n)
    kk, _, index, state = policy.compress(q, k, v, None, 8**-0.5, keep)
    for b in range(B):
        for h in range(Hkv):
            votes = _group_probs(q, k, b, h, G, range(n), n, 8**-0.5)
            tail = list(range(n - min(recent, keep), n))
            rest = sorted(range(n - len(tail)), key=lambda i: (-float(votes[i]), i))
            want = sorted(rest[:keep - len(tail)]) + tail
            assert index[b, h].tolist() == want
            torch.testing.assert_close(state[b, h], votes[want], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(kk[b, h], k[b, h, want], rtol=0, atol=0)


@settings(deadline=None, max_examples=15)
@given(B=st.integers(1, 2), Hkv=st.integers(1, 2), G=st.integers(1, 3), n=st.integers(3, 30),
       limit=st.integers(1, 30), recent=st.integers(0, 6), masked=st.booleans(),
       seed=st.integers(0, 2**16))
def test_evicting_decode_by_h2o_rule(B, Hkv, G, n, limit, recent, masked, seed):
    """The new token joins at score 0; the query attends exactly to the live slots; scores grow
    by the group's summed probabilities; then the lowest-scored live slots outside the `recent`
    newest (and the never-evicted, +inf) go until `limit` are live (ties: the later goes)."""
    q, k, v = _qkv(seed, B, Hkv, G, 1, n, 8)
    g = torch.Generator().manual_seed(seed + 3)
    state = torch.rand(B, Hkv, n - 1, generator=g)
    state[torch.rand(B, Hkv, n - 1, generator=g) < 0.2] = float("-inf")
    state[torch.rand(B, Hkv, n - 1, generator=g) < 0.1] = float("inf")
    live = _live_mask(seed, B, n, masked)
    out, new = reference.evicting_decode(q, k, v, live, 8**-0.5, state, limit, recent)
    for b in range(B):
        for h in range(Hkv):
            scores = torch.cat([state[b, h], torch.zeros(1)])
            alive = [i for i in range(n) if scores[i] > float("-inf")
                     and (live is None or live[b, 0, 0, i])]
            probs = {}
            for qh in range(h * G, (h + 1) * G):
                weights = (q[b, qh, 0] @ k[b, h, alive].T * 8**-0.5).softmax(-1)
                torch.testing.assert_close(out[b, qh, 0], weights @ v[b, h, alive],
                                           rtol=1e-5, atol=1e-5)
                for i, p in zip(alive, weights):
                    probs[i] = probs.get(i, 0.0) + float(p)
            for i in alive:
                scores[i] += probs[i]
            spared = set(alive[max(len(alive) - recent, 0):] if recent else []) | \
                {i for i in alive if scores[i] == float("inf")}
            others = sorted((i for i in alive if i not in spared),
                            key=lambda i: (-float(scores[i]), i))
            gone = others[max(limit - len(spared), 0):]
            scores[gone] = float("-inf")
            torch.testing.assert_close(new[b, h], scores, rtol=1e-5, atol=1e-6)


@settings(deadline=None, max_examples=15)
@given(B=st.integers(1, 2), Hkv=st.integers(1, 2), G=st.integers(1, 3), n=st.integers(12, 80),
       w=st.integers(1, 8), keep=st.integers(1, 40), shot=st.integers(1, 12),
       seed=st.integers(0, 2**16))
def test_shotkv_keeps_best_shots_whole_and_never_evicts_them(B, Hkv, G, n, w, keep, shot, seed):
    """Shots (runs of `shot_size`) ranked by the window's votes averaged over their tokens; kept
    best first (ties: earlier) up to the budget; the kept prompt tokens' state is +inf."""
    keep = min(keep, n - w)
    q, k, v = _qkv(seed, B, Hkv, G, w, n, 8)
    policy = ShotKV(64, 8, window_size=w, shot_size=shot)
    kk, _, index, state = policy.compress(q, k, v, None, 8**-0.5, keep + w)
    assert torch.isposinf(state).all() and state.shape == index.shape
    for b in range(B):
        for h in range(Hkv):
            votes = _group_probs(q, k, b, h, G, range(w), n, 8**-0.5)
            starts = range(0, n - w, shot)
            order = sorted(starts, key=lambda c: (-float(votes[c:min(c + shot, n - w)].mean()), c))
            kept = [i for c in order for i in range(c, min(c + shot, n - w))][:keep]
            want = sorted(kept) + list(range(n - w, n))
            assert index[b, h].tolist() == want
            torch.testing.assert_close(kk[b, h], k[b, h, want], rtol=0, atol=0)


@pytest.mark.parametrize("policy, own", [
    ("h2o", {}), ("h2o", {"recent_size": 8}), ("shotkv", {"decode_budget": 3}),
    ("kvquant", {"kv_bits": 4}), ("rocketkv", {"kv_bits": 4}), ("snapkv", {"kv_bits": 2}),
    ("chunkkv", {"reuse_layers": 2})])
def test_new_policies_through_the_pass_match_the_oracle(policy, own):
    """Either cache gives the eager oracle's tokens; the state of a policy that evicts as it
    decodes (kept in the cache's tensors) leaves exactly its live budget."""
    model = tiny_hf("llama")
    model.generation_config.eos_token_id = None
    options = {"policy": policy, "token_budget": 48, "max_new_tokens": 6, **own}
    config = RocketKVConfig.from_options(options)
    method = config.method
    ids = torch.randint(0, VOCAB, (1, 200), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected, kept = oracle_generate(model, ids, config, 6)
        torch._dynamo.reset()
        dynamic, dynamic_cache = generate(model, ids, 6, None, _rewrite(options))
        torch._dynamo.reset()
        static, static_cache = generate(model, ids, 6, RocketKVCache(model.config, 6),
                                        _rewrite(options))
        torch._dynamo.reset()
        report = str(rkv_compile.explain(model.generate, ids, max_new_tokens=3,
                                         options=options))
    assert dynamic == static == expected
    assert stored_lengths(dynamic_cache) == stored_lengths(static_cache) == [k + 5 for k in kept]
    if method.state == "scores":
        live = config.plan(200, 16).topk
        for layer in dynamic_cache.layers:   # the scores, in the layer's state region
            scores = state.read(layer.keys, layer.values).state.view(torch.float32)
            alive = (~torch.isneginf(scores[0, :, :kept[0] + 5])).sum(-1).tolist()
            assert alive == [min(live, kept[0] + 5)] * 2
        assert report.count(f"{method.decode_kind} over each row's stored slots") == 2
    if method.kv_bits:
        assert report.count(f"quantized to {method.kv_bits} bits") == 2


def test_chunkkv_layers_reuse_their_groups_first_selection():
    """reuse_layers=2: the second layer stores its own keys at the positions the first layer
    selected (a selection of its own would differ on this model)."""
    model = tiny_hf("llama")
    ids = torch.randint(0, VOCAB, (1, 200), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        _, full = generate(model, ids, 2)
        positions = {}
        for reuse in (1, 2):
            options = {"policy": "chunkkv", "token_budget": 48, "max_new_tokens": 2,
                       "reuse_layers": reuse}
            torch._dynamo.reset()
            _, cache = generate(model, ids, 2, None, _rewrite(options))
            for layer in range(2):
                kept = stored(cache)[layer].keys[0, :, :48]
                prompt = full.layers[layer].keys[0, :, :200]
                positions[reuse, layer] = [[int((prompt[h] == row).all(-1).nonzero())
                                            for row in kept[h]] for h in range(2)]
    assert positions[2, 0] == positions[2, 1] == positions[1, 0] != positions[1, 1]
