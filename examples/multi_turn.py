"""A conversation: three turns, each `generate` continuing one RocketKVCache.

A DynamicCache cannot carry a compressed conversation (transformers positions a new turn by
the cache's stored length, which eviction shortened); a RocketKVCache counts each sequence's
logical length, and at every turn RocketKV selects again over the kept history and the new
turn. Shows the replies equal the eager reference's (`rkv_compile.eager.multi_turn`) and the
cache staying small while the conversation grows. CPU: about 60 s.

    python examples/multi_turn.py
"""
import torch
from _tiny import random_prompt, tiny_llama

import rkv_compile
from rkv_compile.cache import RocketKVCache
from rkv_compile.eager import multi_turn
from rkv_compile.hf import cache_argument

OPTIONS, NEW = {"token_budget": 96, "max_new_tokens": 6}, 6


def main() -> dict:
    model = tiny_llama()
    turns = [random_prompt(n, seed) for n, seed in ((400, 1), (30, 2), (120, 3))]
    cache = RocketKVCache(model.config, max_new_tokens=NEW)
    eager_forward = model.forward
    model.forward = torch.compile(eager_forward, backend="rocketkv", options=OPTIONS)
    replies, sizes, conversation = [], [], None
    try:
        with torch.no_grad():
            for turn in turns:
                ids = turn if conversation is None else torch.cat([conversation, turn], 1)
                conversation = model.generate(ids, **{cache_argument(): cache},
                                              max_new_tokens=NEW, do_sample=False)
                replies.append(conversation[0, ids.shape[1]:].tolist())
                layer = rkv_compile.stored(cache)[0]
                sizes.append((conversation.shape[1], layer.lengths[0]))
                print(f"turn of {turn.shape[1]:3} tokens: reply {replies[-1]}; conversation "
                      f"{sizes[-1][0]} tokens, cache stores {sizes[-1][1]}")
    finally:
        model.forward = eager_forward
    reference = multi_turn(model, turns, rkv_compile.RocketKVConfig.from_options(OPTIONS), NEW)
    print(f"eager reference replies: {reference} "
          f"({'the same' if reference == replies else 'DIFFER'})")
    return {"replies": replies, "reference": reference, "sizes": sizes}


if __name__ == "__main__":
    main()
