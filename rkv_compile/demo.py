"""``rkv demo``: passkey retrieval on SmolLM2-135M-Instruct, full KV cache against RocketKV."""
from __future__ import annotations

import time

import torch

from .config import RocketKVConfig
from .hf import load_model, returned_cache
from .state import stored
from .tasks import passkey_prompt


def _generate(model, ids, max_new_tokens):
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                         return_dict_in_generate=True)
    seconds = time.perf_counter() - start
    new = out.sequences[0, ids.shape[1]:]
    cache = returned_cache(out)
    cached = {layer.lengths[0] if layer else plain.keys.shape[2]
              for layer, plain in zip(stored(cache), cache.layers)}
    # The cache holds the prompt tokens kept plus every generated token but the last.
    return new, max(cached) - (len(new) - 1), len(cached) == 1, seconds


def run_demo(context: int, budget: int, max_new_tokens: int, depth: float, seed: int) -> bool:
    torch.manual_seed(seed)
    model, tokenizer = load_model("smollm2")
    cfg = model.config
    text, passkey = passkey_prompt(tokenizer, context, depth, seed)
    ids = tokenizer(text, return_tensors="pt").input_ids
    options = {"token_budget": budget, "max_new_tokens": max_new_tokens}
    plan = RocketKVConfig.from_options(options).plan(ids.shape[1], cfg.head_dim)
    print(f"SmolLM2-135M-Instruct: {cfg.num_hidden_layers} layers, {cfg.num_attention_heads} query /"
          f" {cfg.num_key_value_heads} KV heads, head_dim {cfg.head_dim}; CPU, float32")
    print(f"prompt: {ids.shape[1]} tokens, passkey {passkey} at depth {depth}; "
          f"token_budget {budget}, max_new_tokens {max_new_tokens}")
    print(f"plan: capacity {plan.capacity}, prompt budget {plan.prompt_budget}, top-k {plan.topk},"
          f" chunk {plan.chunk}, r {plan.dims}")

    rows = [("full KV (eager generate)", *_generate(model, ids, max_new_tokens))]
    eager_forward = model.forward
    model.forward = torch.compile(eager_forward, backend="rocketkv", options=options)
    try:
        rows.append(("RocketKV, first call (compiles)", *_generate(model, ids, max_new_tokens)))
        rows.append(("RocketKV, second call", *_generate(model, ids, max_new_tokens)))
    finally:
        model.forward = eager_forward

    print(f"\n{'run':32} {'prompt tokens cached/layer':>26} {'wall s':>8}  correct  answer")
    all_correct = True
    for name, new, kept, uniform, seconds in rows:
        answer = tokenizer.decode(new, skip_special_tokens=True)
        correct = passkey in answer
        all_correct &= correct
        kept_text = f"{kept}" if uniform else f"{kept} (max; layers differ)"
        print(f"{name:32} {ids.shape[1]:>11} -> {kept_text:<11} {seconds:>8.2f}  "
              f"{'yes' if correct else 'NO':7}  {answer!r}")
    return all_correct
