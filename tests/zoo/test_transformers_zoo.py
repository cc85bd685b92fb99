"""The zoo: tiny random transformers decoders of every attention family, through the pass.

For each architecture, attention implementation (sdpa, eager) and cache (DynamicCache, the
static cache): with no budget the backend's tokens equal eager's; with a budget the model is
either compressed, and its tokens equal the eager application of the policy
(`rkv_compile.eager`), or every site is left exact with a reason and its tokens equal eager's.
Never silently wrong. Rewritten graphs run as FX (not Inductor) to keep the zoo quick.
"""
import pytest
import torch
import transformers as T

from rkv_compile import RocketKVConfig
from rkv_compile.backend import make_backend
from rkv_compile.eager import generate as oracle_generate

VOCAB, PROMPT, STEPS = 128, 200, 5
BUDGET = {"token_budget": 48, "max_new_tokens": STEPS}
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)

ZOO = {   # name: (model class, config); how each family differs is in its name
    "llama-gqa": lambda: (T.LlamaForCausalLM, T.LlamaConfig(**SMALL)),
    "mistral": lambda: (T.MistralForCausalLM, T.MistralConfig(**SMALL, sliding_window=None)),
    "qwen2": lambda: (T.Qwen2ForCausalLM, T.Qwen2Config(**SMALL)),
    "qwen3-qk-norm": lambda: (T.Qwen3ForCausalLM, T.Qwen3Config(**SMALL, head_dim=16)),
    "gemma3-sliding-and-global": lambda: (T.Gemma3ForCausalLM, T.Gemma3TextConfig(
        **SMALL, head_dim=16, sliding_window=64, layer_types=["sliding_attention", "full_attention"])),
    "phi3-head-dim-96": lambda: (T.Phi3ForCausalLM, T.Phi3Config(
        **dict(SMALL, hidden_size=192, num_attention_heads=2, num_key_value_heads=2),
        pad_token_id=0)),
    "gpt-neox-partial-rotary": lambda: (T.GPTNeoXForCausalLM, T.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, rotary_pct=0.25, max_position_embeddings=2048)),
    "gpt2-mha-learned-positions": lambda: (T.GPT2LMHeadModel, T.GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=2048,
        initializer_range=0.2)),
    "opt-positions-from-mask": lambda: (T.OPTForCausalLM, T.OPTConfig(
        vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=2048, word_embed_proj_dim=64,
        init_std=0.2)),
    "falcon-alibi": lambda: (T.FalconForCausalLM, T.FalconConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        alibi=True, new_decoder_architecture=False, multi_query=True)),
}


# transformers' own Falcon fails on a static cache (its ALiBi bias is sized by the prompt)
CASES = [(name, attn, cache) for name in sorted(ZOO) for attn in ("sdpa", "eager")
         for cache in ("dynamic", "static") if not (name == "falcon-alibi" and cache == "static")]


def build(name: str, attn: str):
    cls, config = ZOO[name]()
    config._attn_implementation = attn
    torch.manual_seed(0)
    model = cls(config).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def run(model, ids, cache: str, options=None, decisions=None):
    """Greedy tokens through generate, under the rocketkv pass if `options` (FX, no Inductor);
    `decisions` collects every site's decision."""
    forward = model.forward
    if options is not None:
        backend = make_backend(compiler=lambda gm, _: gm.forward, on_analysis=(
            decisions.extend if decisions is not None else None))
        model.forward = torch.compile(forward, backend=lambda gm, ex: backend(gm, ex,
                                                                             options=options))
    extra = {"cache_implementation": "static", "disable_compile": True} if cache == "static" \
        else {}
    try:
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=STEPS, min_new_tokens=STEPS,
                                 do_sample=False, **extra)
    finally:
        model.forward = forward
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("name, attn, cache", CASES)
def test_zoo_member_is_compressed_correctly_or_left_exact(name, attn, cache):
    model = build(name, attn)
    ids = torch.randint(1, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(7))
    exact = run(model, ids, cache)
    torch._dynamo.reset()
    assert run(model, ids, cache, {"token_budget": None}) == exact
    torch._dynamo.reset()
    decisions = []
    compressed = run(model, ids, cache, BUDGET, decisions)
    if any(d.rewritten for d in decisions):
        expected, kept = oracle_generate(model, ids, RocketKVConfig.from_options(BUDGET), STEPS)
        assert compressed == expected and min(kept) < PROMPT
        # a model whose tokens never vary would test nothing (tiny Gemma3 repeats one token
        # with full KV; compressed, it does not)
        assert len(set(exact)) > 1 or compressed != exact
    else:   # every site found stays exact, and says why (Falcon's eager attention: none found)
        assert compressed == exact
        assert all(d.reason for d in decisions)
        assert decisions or name == "falcon-alibi" and attn == "eager"


def test_what_the_zoo_leaves_exact_and_why():
    """The sites each family keeps exact, by the reason the explain report gives."""
    ids = torch.randint(1, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(7))
    reasons = {}
    for name, cache in (("gemma3-sliding-and-global", "dynamic"), ("falcon-alibi", "dynamic"),
                        ("llama-gqa", "static")):
        decisions = []
        torch._dynamo.reset()
        run(build(name, "sdpa"), ids, cache, BUDGET, decisions)
        reasons[name] = {d.reason for d in decisions}
    assert reasons["gemma3-sliding-and-global"] == {
        None, "keys are a sliding-window cache: nothing to compress (it keeps its own last "
              "tokens; this layer stays exact)"}
    assert all("not one (batch, 1, q, kv) mask for all heads" in r
               for r in reasons["falcon-alibi"])
    # prefill and decode sites alike: the static cache is a buffer written in place
    assert reasons["llama-gqa"] == {
        "keys are written in place into a buffer: nothing to compress (a static cache written "
        "in place is not compressed; with transformers, use the cache generate builds, or a "
        "RocketKVCache)"}
