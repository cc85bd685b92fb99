"""Policies side by side on one prompt: RocketKV and the baselines, each through the same
zero-change generate, against the full KV cache.

For each policy: the tokens stored per layer after generate (the cache's real size), and how
many of the 8 generated tokens agree with full KV. At one token_budget (what a decode step
reads) RocketKV stores more of the prompt than the one-stage methods (its SnapKV++ stage keeps
a multiple of the budget, its stage 2 reads the budget's top-k of it), and Quest stores every
token (it reads the top pages of them). On this random model agreement says little about
quality (EVALUATION.md has real-model scores); the point is that one option switches the
method. CPU: about 50 s (each policy compiles its graphs once).

    python examples/compare_policies.py
"""
import torch
from _tiny import random_prompt, tiny_llama

import rkv_compile
from rkv_compile.hf import returned_cache

POLICIES = ["rocketkv", "snapkv", "h2o", "streamingllm", "quest"]
BUDGET, NEW = 128, 8


def main() -> dict:
    model, ids = tiny_llama(), random_prompt(700)
    greedy = dict(max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True)
    eager_forward = model.forward
    with torch.no_grad():
        full = model.generate(ids, **greedy).sequences[0, ids.shape[1]:].tolist()
    rows = {}
    print(f"prompt: {ids.shape[1]} tokens, token_budget {BUDGET}\n")
    print(f"{'policy':14} {'stored/layer':>12}  agree with full KV")
    for policy in POLICIES:
        options = {"policy": policy, "token_budget": BUDGET, "max_new_tokens": NEW}
        model.forward = torch.compile(eager_forward, backend="rocketkv", options=options)
        try:
            with torch.no_grad():
                out = model.generate(ids, **greedy)
        finally:
            model.forward = eager_forward
        tokens = out.sequences[0, ids.shape[1]:].tolist()
        stored = max(layer.lengths[0] for layer in rkv_compile.stored(returned_cache(out)))
        agree = sum(a == b for a, b in zip(tokens, full))
        rows[policy] = {"tokens": tokens, "stored": stored, "agree": agree}
        print(f"{policy:14} {stored:>12}  {agree}/{NEW}")
    print(f"{'full KV':14} {ids.shape[1] + NEW - 1:>12}  {NEW}/{NEW}")
    return rows


if __name__ == "__main__":
    main()
