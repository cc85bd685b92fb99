"""The RocketKV budget planner (RocketKV.plan) and RocketKVConfig's option checking.

The formulas are re-derived here from DESIGN.md ("The algorithm"), independently of config.py.
"""
from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rkv_compile.config import RocketKVConfig
from rkv_compile.policies import Plan, RocketKV

SETTINGS = settings(deadline=None, max_examples=300)

budgets = st.one_of(st.sampled_from([2, 3, 64, 128, 256, 512, 1024, 2048, 4096]),
                    st.integers(2, 8192))
prompts = st.one_of(st.integers(1, 300), st.integers(1, 300_000))
new_tokens = st.one_of(st.sampled_from([1, 16, 128, 512]), st.integers(1, 8192))
head_dims = st.one_of(st.sampled_from([32, 64, 80, 96, 128, 256]), st.integers(1, 512))
windows = st.one_of(st.just(32), st.integers(1, 128))


def design_plan(B: int, prompt: int, M: int, D: int, w: int) -> dict:
    """DESIGN.md's planner, written out step by step."""
    L = prompt + M
    c = L / B if L / B > 1 else 1.0
    alpha = 0.2 + 0.06 * math.log2(c)
    if alpha > 0.8:
        alpha = 0.8
    cap = int(L / c**alpha)
    floor = 2 * M if 2 * M < L else L
    if cap < floor:
        cap = floor
    c2 = cap / B if cap / B > 1 else 1.0
    chunk = math.ceil(math.sqrt(c2))
    if chunk > c2:
        chunk = 1
    r = int(D * chunk / c2)
    r = 1 if r < 1 else (D if r > D else r)
    return dict(token_budget=B, length=L, capacity=cap, prompt_budget=max(cap - M, w),
                topk=B // 2, chunk=chunk, dims=r)


# ---------------------------------------------------------------------------------------------
# DESIGN.md's worked examples (D=128, 128 new tokens, B=256)

@pytest.mark.parametrize("L, capacity, chunk, dims", [
    (32000, 1619, 3, 60),
    (128000, 1304, 3, 75),
])
def test_design_examples(L, capacity, chunk, dims):
    plan = RocketKV(256, 128).plan(L - 128, 128)
    assert plan.length == L
    assert plan.capacity == capacity
    assert plan.chunk == chunk
    assert plan.dims == dims
    assert plan.topk == 128
    assert plan.prompt_budget == capacity - 128
    assert plan.token_budget == 256


def test_design_examples_via_config():
    cfg = RocketKVConfig(token_budget=256, max_new_tokens=128)
    assert cfg.plan(32000 - 128, 128) == RocketKV(256, 128, 32).plan(32000 - 128, 128)
    p = cfg.plan(128000 - 128, 128)
    assert (p.capacity, p.chunk, p.dims, p.topk) == (1304, 3, 75, 128)


# ---------------------------------------------------------------------------------------------
# properties

@SETTINGS
@given(B=budgets, prompt=prompts, M=new_tokens, D=head_dims, w=windows)
def test_plan_matches_design_formulas(B, prompt, M, D, w):
    plan = RocketKV(B, M, w).plan(prompt, D)
    expected = design_plan(B, prompt, M, D, w)
    got = {k: getattr(plan, k) for k in expected}
    assert got == expected


@SETTINGS
@given(B=budgets, prompt=prompts, M=new_tokens, D=head_dims, w=windows)
def test_plan_invariants(B, prompt, M, D, w):
    plan = RocketKV(B, M, w).plan(prompt, D)
    L = prompt + M
    assert plan.length == L
    assert plan.capacity >= min(2 * M, L)
    assert plan.capacity <= L
    assert plan.prompt_budget == max(plan.capacity - M, w)
    assert 1 <= plan.dims <= D
    assert plan.topk == B // 2
    assert plan.chunk >= 1
    c2 = max(1.0, plan.capacity / B)
    if math.ceil(math.sqrt(c2)) > c2:
        assert plan.chunk == 1
    else:
        assert plan.chunk == math.ceil(math.sqrt(c2))
    for name in ("capacity", "prompt_budget", "topk", "chunk", "dims", "length"):
        assert type(getattr(plan, name)) is int, name


@SETTINGS
@given(B=st.integers(2, 4096), data=st.data(), D=head_dims, w=windows)
def test_plan_without_eviction(B, data, D, w):
    """L <= B: nothing to compress; the cache holds everything and stage 2 reads all dims."""
    M = data.draw(st.integers(1, B - 1), label="max_new_tokens")
    prompt = data.draw(st.integers(1, B - M), label="prompt")
    plan = RocketKV(B, M, w).plan(prompt, D)
    assert plan == Plan(**design_plan(B, prompt, M, D, w))
    assert plan.capacity == prompt + M
    assert plan.prompt_budget == max(prompt, w) >= prompt
    assert plan.chunk == 1 and plan.dims == D


@SETTINGS
@given(B=budgets, prompt=prompts, M=new_tokens, D=head_dims, w=windows)
def test_short_prompt_plans_follow_formulas(B, prompt, M, D, w):
    """Whenever the prompt fits the prompt budget, the plan is still the formulas' plan."""
    plan = RocketKV(B, M, w).plan(prompt, D)
    if prompt <= plan.prompt_budget:
        assert plan == Plan(**design_plan(B, prompt, M, D, w))
        assert plan.capacity <= prompt + M


# ---------------------------------------------------------------------------------------------
# RocketKVConfig validation

def test_config_defaults():
    cfg = RocketKVConfig()
    assert cfg.compresses
    assert RocketKVConfig.from_options(None) == cfg
    assert RocketKVConfig.from_options({}) == cfg
    cfg = RocketKVConfig.from_options({"token_budget": 512, "max_new_tokens": 64,
                                       "window_size": 16, "kernel_size": 7,
                                       "policy": "rocketkv"})
    assert (cfg.token_budget, cfg.max_new_tokens, cfg.window_size, cfg.method.kernel_size) == \
        (512, 64, 16, 7)


def test_policy_options_go_to_their_policy():
    assert RocketKVConfig.from_options({"policy": "snapkv", "kernel_size": 7}).method.kernel_size == 7
    assert RocketKVConfig(policy="snapkv").method.kernel_size == 5
    assert RocketKVConfig().method.kernel_size == 63
    assert RocketKVConfig.from_options({"policy": "streamingllm", "sink_size": 8}).method \
        .sink_size == 8
    with pytest.raises(ValueError, match="'kernel_size' does not apply to policy 'oracle-topk'"):
        RocketKVConfig.from_options({"policy": "oracle-topk", "kernel_size": 7})
    with pytest.raises(ValueError, match="'sink_size' does not apply to policy 'rocketkv'"):
        RocketKVConfig.from_options({"sink_size": 7})
    with pytest.raises(ValueError, match="'token_budget' .* must exceed streamingllm's 'sink_size'"):
        RocketKVConfig.from_options({"policy": "streamingllm", "token_budget": 4})


def test_token_budget_none_turns_compression_off():
    cfg = RocketKVConfig.from_options({"token_budget": None})
    assert cfg.token_budget is None
    assert cfg.compresses is False
    assert RocketKVConfig(token_budget=None).compresses is False


@pytest.mark.parametrize("key", ["budget", "tokenbudget", "Token_Budget", "mode"])
def test_unknown_option_names_the_key(key):
    with pytest.raises(ValueError, match=key):
        RocketKVConfig.from_options({key: 1})
    with pytest.raises(ValueError, match=key):
        RocketKVConfig.from_options({"token_budget": 256, key: 1})


@pytest.mark.parametrize("name, value", [
    ("token_budget", 0), ("token_budget", 1), ("token_budget", -5), ("token_budget", "256"),
    ("token_budget", True), ("token_budget", 1.5), ("token_budget", 256.0),
    ("max_new_tokens", 0), ("max_new_tokens", -1), ("max_new_tokens", None),
    ("max_new_tokens", True),
    ("window_size", 0), ("window_size", None), ("window_size", 2.0), ("window_size", True),
    ("policy", "nope"), ("policy", ""), ("policy", None), ("policy", 3),
    ("cudagraphs", 1), ("cudagraphs", "yes"), ("compile_prefill", None),
    ("compile_prefill", 1), ("compile_layers_once", None), ("compile_layers_once", "no"),
])
def test_bad_values_name_the_option(name, value):
    with pytest.raises(ValueError, match=name):
        RocketKVConfig.from_options({name: value})
    with pytest.raises(ValueError, match=name):
        RocketKVConfig(**{name: value})


@pytest.mark.parametrize("policy, name, value", [
    ("rocketkv", "kernel_size", 0), ("rocketkv", "kernel_size", 2), ("snapkv", "kernel_size", 64),
    ("rocketkv", "kernel_size", False), ("rocketkv", "kernel_size", True),
    ("snapkv", "kernel_size", 3.0), ("streamingllm", "sink_size", -1),
    ("streamingllm", "sink_size", None), ("quest", "page_size", 0), ("quest", "dense_layers", -1),
    ("rocketkv", "stages", "stage3"),
    ("pyramidkv", "beta", 0),
])
def test_bad_policy_values_name_the_option(policy, name, value):
    with pytest.raises(ValueError, match=name):
        RocketKVConfig.from_options({"policy": policy, name: value})


@pytest.mark.parametrize("name, value", [
    ("token_budget", 2), ("max_new_tokens", 1), ("window_size", 1)])
def test_edge_values_accepted(name, value):
    assert getattr(RocketKVConfig.from_options({name: value}), name) == value


@pytest.mark.parametrize("policy, name, value", [
    ("rocketkv", "kernel_size", 1), ("rocketkv", "kernel_size", 63), ("snapkv", "kernel_size", 1),
    ("streamingllm", "sink_size", 0), ("quest", "page_size", 1), ("pyramidkv", "beta", 1)])
def test_edge_policy_values_accepted(policy, name, value):
    config = RocketKVConfig.from_options({"policy": policy, name: value})
    assert getattr(config.method, name) == value


@settings(deadline=None, max_examples=100)
@given(budget=st.sampled_from([64, 128, 256, 512]), prompt=st.integers(4096, 131072),
       head_dim=st.sampled_from([64, 128]), group=st.integers(1, 8),
       policy=st.sampled_from(["full", "rocketkv", "snapkv", "h2o", "quest", "sparq",
                               "oracle-topk", "streamingllm", "kvquant"]))
def test_a_decode_step_reads_at_most_what_full_kv_reads(budget, prompt, head_dim, group,
                                                        policy):
    """KV bytes a decode step reads (Policy.read_bytes, what "equal traffic" compares): every
    policy at most full KV's over the whole prompt, Quest at most that and its page summaries
    (each query head picks its own pages: a group of heads may pick every page); RocketKV its
    formula (r dims of every stored key, top-k tokens' keys and values); the other sparse
    ones over every token less than exact attention over them; the exact ones all they
    hold."""
    config = RocketKVConfig.from_options({"policy": policy, "token_budget": budget,
                                          "max_new_tokens": 16})
    method, layers = config.method, 4
    full = 2 * (prompt + 1) * head_dim * 2
    for layer in range(layers):
        plan = config.plan(prompt, head_dim, layer, layers)
        stored = min(plan.prompt_budget, prompt)
        read = method.read_bytes(stored, 1, plan, head_dim, 2, group)
        n = stored + 1
        if policy == "quest" and plan.topk < n:
            pages = -(-n // plan.chunk)
            assert read == (2 * pages + 2 * min(n, group * plan.topk)) * head_dim * 2
            assert 0 < read <= full + 2 * pages * head_dim * 2
            continue
        assert 0 < read <= full
        if policy == "rocketkv":
            assert read == ((stored + 1) * plan.dims + plan.topk * 2 * head_dim) * 2
        elif method.sparse_decode and plan.topk < stored:
            assert read < method.kv_bytes(stored, 1, head_dim, 2)
        elif not method.sparse_decode:
            assert read == method.kv_bytes(stored, 1, head_dim, 2)
