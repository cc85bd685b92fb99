"""Long-context prompts generated locally (no datasets are downloaded)."""
from __future__ import annotations

import random

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again. ")


def passkey_prompt(tokenizer, context_tokens: int, depth: float, seed: int) -> tuple[str, str]:
    """A passkey-retrieval prompt of about `context_tokens` tokens: (prompt, passkey).

    The passkey sentence sits at relative `depth` (0 = start, 1 = end) of the filler.
    """
    rng = random.Random(seed)
    passkey = str(rng.randint(10000, 99999))
    head = ("There is an important piece of information hidden inside a lot of irrelevant text. "
            "Find it and memorize it.\n")
    needle = f"The pass key is {passkey}. Remember it. {passkey} is the pass key. "
    question = "\nWhat is the pass key? The pass key is"
    budget = context_tokens - len(tokenizer(head + needle + question).input_ids)
    repeats = max(1, budget // len(tokenizer(FILLER).input_ids))
    at = round(depth * repeats)
    text = head + FILLER * at + needle + FILLER * (repeats - at) + question
    return text, passkey
