"""Zero change: compile a transformers model's forward with backend="rocketkv", call generate.

Shows that the prompt's KV cache is physically shrunk to the token budget (the DynamicCache
generate builds holds it), and that the tokens are the policy's: the same as applying RocketKV
eagerly (`rkv_compile.eager.generate_like`), and not the full-KV tokens. CPU: about 40 s, most
of it Inductor compiling the prefill and decode graphs once.

    python examples/hf_generate.py
"""
import torch
from _tiny import random_prompt, tiny_llama

import rkv_compile
from rkv_compile.eager import generate_like
from rkv_compile.hf import returned_cache

OPTIONS = {"token_budget": 128, "max_new_tokens": 8}


def main() -> dict:
    model, ids = tiny_llama(), random_prompt(600)
    greedy = dict(max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
    with torch.no_grad():
        exact = model.generate(ids, **greedy).sequences[0, 600:].tolist()
        eager_forward = model.forward
        model.forward = torch.compile(model.forward, backend="rocketkv", options=OPTIONS)
        out = model.generate(ids, **greedy)   # the unchanged call
        model.forward = eager_forward
        oracle = generate_like(model, ids, rkv_compile.RocketKVConfig.from_options(OPTIONS),
                               **greedy).sequences[0, 600:].tolist()
    tokens = out.sequences[0, 600:].tolist()
    stored = [layer.lengths[0] for layer in rkv_compile.stored(returned_cache(out))]
    plan = rkv_compile.RocketKVConfig.from_options(OPTIONS).plan(600, model.config.head_dim)
    print(f"prompt: {ids.shape[1]} tokens; token_budget {OPTIONS['token_budget']}: SnapKV++ keeps "
          f"{plan.prompt_budget} of the prompt, each decode step reads the top {plan.topk}")
    print(f"tokens stored per layer after generate: {stored} (prompt kept + 7 generated)")
    print(f"rocketkv through generate: {tokens}")
    print(f"RocketKV applied eagerly:  {oracle}  {'(same)' if tokens == oracle else '(DIFFER)'}")
    print(f"full KV cache:             {exact}")
    return {"tokens": tokens, "oracle": oracle, "exact": exact, "stored": stored}


if __name__ == "__main__":
    main()
