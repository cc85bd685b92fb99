"""A left-padded batch of prompts of different lengths in one generate call.

Each row is evicted over its own tokens with the plan of its own length and decoded over its
own stored slots, so every row's tokens are those of its prompt alone (run here one by one).
The padded prefill keeps its mask and runs uncompiled (rkv_compile says so once); decode is
compiled. CPU: about 60 s.

    python examples/padded_batch.py
"""
import torch
from _tiny import random_prompt, tiny_llama

OPTIONS, NEW = {"token_budget": 96, "max_new_tokens": 6}, 6


def main() -> dict:
    model = tiny_llama()
    prompts = [random_prompt(n, seed=n)[0] for n in (500, 320, 150)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):], mask[row, width - len(p):] = p, 1
    model.forward = torch.compile(model.forward, backend="rocketkv", options=OPTIONS)
    with torch.no_grad():
        batch = model.generate(ids, attention_mask=mask, max_new_tokens=NEW,
                               do_sample=False)[:, width:].tolist()
        alone = [model.generate(p[None], max_new_tokens=NEW, do_sample=False)[0, len(p):].tolist()
                 for p in prompts]
    for p, b, a in zip(prompts, batch, alone):
        print(f"prompt of {len(p)} tokens: in the batch {b}, alone {a} "
              f"({'same' if a == b else 'DIFFER'})")
    return {"batch": batch, "alone": alone}


if __name__ == "__main__":
    main()
