"""Long-context tasks generated locally (no datasets are downloaded), after RULER's synthetic
tasks (Hsieh et al., "RULER: What's the Real Context Size of Your Long-Context Language Models?",
arXiv 2404.06654): passkey retrieval, multi-key and multi-value needles in a haystack, variable
tracking and common-words extraction; and a two-turn variant of each (`TWO_TURN_TASKS`).

A task builds a prompt of about `context_tokens` tokens from a seed and a depth (where in the
haystack its needles start, 0 = start, 1 = end): the haystack repeats a passage of filler
sentences drawn from a bank by the seed, so prompts differ in their filler. Prompts end with the start of the
answer (completion style), and a sample scores the fraction of its expected strings found in
the generated text.
"""
from __future__ import annotations

import dataclasses
import random
from typing import Callable

CLASSIC_FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
                  "There and back again. ")
SENTENCES = (
    "The grass is green and the sky is blue.", "The sun is yellow, here we go.",
    "There and back again, the road goes on.", "A river winds slowly through the valley.",
    "The market opens early on most weekdays.", "Clouds gathered over the hills by noon.",
    "The old library keeps its doors open late.", "Children played near the fountain all day.",
    "A light breeze moved through the tall trees.", "The train left the station on time.",
    "Fresh bread was sold at the corner bakery.", "The harbour was quiet before the storm.",
    "Snow covered the mountain peaks in winter.", "The museum added a new wing last year.",
    "Birds sang in the garden after the rain.", "The village held a fair every autumn.",
    "A narrow bridge crossed the rushing stream.", "The farmer checked the fences at dawn.",
    "Lanterns lit the path along the lake.", "The bakery smelled of cinnamon and butter.",
)


@dataclasses.dataclass(frozen=True)
class Sample:
    task: str
    prompt: str
    answers: tuple[str, ...]      # every one should appear in the generated text
    max_new_tokens: int
    depth: float
    seed: int
    follow_up: str | None = None  # a two-turn sample's second turn (the question); `prompt` is
                                  # then the first turn, answered and not scored

    def score(self, generated: str) -> float:
        """The fraction of the answers in `generated` (case-insensitive), as RULER scores."""
        text = generated.lower()
        return sum(a.lower() in text for a in self.answers) / len(self.answers)


def _haystack(tokenizer, tokens: int, rng: random.Random) -> list[str]:
    """About `tokens` tokens of filler: a passage of five sentences drawn from the bank (each
    prompt its own), repeated, as the passkey literature repeats one passage."""
    passage = rng.sample(SENTENCES, 5)
    sizes = [len(tokenizer(" " + s).input_ids) for s in passage]
    out, used = [], 0
    while used < tokens:
        out.append(passage[len(out) % 5])
        used += sizes[(len(out) - 1) % 5]
    return out


def _words(tokenizer, rng: random.Random, count: int) -> list[str]:
    """`count` distinct lowercase English-looking words, each one token of the tokenizer."""
    vocab = sorted(w[1:] for w in tokenizer.get_vocab() if w[:1] in ("Ġ", "▁") and
                   w[1:].isalpha() and w[1:].islower() and 4 <= len(w) - 1 <= 9)
    return rng.sample(vocab, count)


def _number(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def _assemble(tokenizer, context_tokens: int, head: str, needles: list[str], depth: float,
              question: str, rng: random.Random) -> str:
    """The head, the haystack with the needles spread from `depth` towards the end (in order),
    then the question."""
    fixed = len(tokenizer(head + " ".join(needles) + question).input_ids)
    hay = _haystack(tokenizer, max(context_tokens - fixed, 0), rng)
    first = round(depth * len(hay))
    spots = sorted(first + rng.randint(0, len(hay) - first) for _ in needles[1:])
    for spot, needle in sorted(zip([first] + spots, needles), key=lambda p: -p[0]):
        hay.insert(spot, needle)
    return head + " ".join(hay) + question


PASSKEY_HEAD = ("There is an important piece of information hidden inside a lot of irrelevant "
                "text. Find it and memorize it.\n")
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"


def _passkey_needle(key: str) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key."


def passkey(tokenizer, context_tokens: int, depth: float, seed: int) -> Sample:
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    prompt = _assemble(tokenizer, context_tokens, PASSKEY_HEAD, [_passkey_needle(key)], depth,
                       PASSKEY_QUESTION, rng)
    return Sample("passkey", prompt, (key,), 12, depth, seed)


def multikey_needle(tokenizer, context_tokens: int, depth: float, seed: int) -> Sample:
    """Four needles with different keys; the question asks for one key's number."""
    rng = random.Random(seed)
    keys = _words(tokenizer, rng, 4)
    values = [_number(rng) for _ in keys]
    needles = [f"One of the special magic numbers for {k} is: {v}." for k, v in zip(keys, values)]
    target = rng.randrange(len(keys))
    head = ("Some special magic numbers are hidden within the following text. Make sure to "
            "memorize them. I will quiz you about the numbers afterwards.\n")
    question = (f"\nWhat is the special magic number for {keys[target]} mentioned in the text "
                f"above? The special magic number for {keys[target]} is")
    prompt = _assemble(tokenizer, context_tokens, head, needles, depth, question, rng)
    return Sample("multikey", prompt, (values[target],), 16, depth, seed)


def multivalue_needle(tokenizer, context_tokens: int, depth: float, seed: int) -> Sample:
    """Four needles with the same key; the question asks for all four numbers."""
    rng = random.Random(seed)
    key = _words(tokenizer, rng, 1)[0]
    values = [_number(rng) for _ in range(4)]
    needles = [f"One of the special magic numbers for {key} is: {v}." for v in values]
    head = ("Some special magic numbers are hidden within the following text. Make sure to "
            "memorize them. I will quiz you about the numbers afterwards.\n")
    question = (f"\nWhat are all the special magic numbers for {key} mentioned in the text "
                f"above? The special magic numbers for {key} are")
    prompt = _assemble(tokenizer, context_tokens, head, needles, depth, question, rng)
    return Sample("multivalue", prompt, tuple(values), 48, depth, seed)


def variable_tracking(tokenizer, context_tokens: int, depth: float, seed: int) -> Sample:
    """A chain of five assignments, VAR A = 12345, VAR B = VAR A, ...; the question asks for
    every variable holding the value."""
    rng = random.Random(seed)
    names = ["".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
             for _ in range(5)]
    value = _number(rng, 5)
    needles = [f"VAR {names[0]} = {value}."] + \
        [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
    head = "Memorize and track the chain of variable assignments hidden in the following text.\n"
    question = (f"\nFind all variables that are assigned the value {value} in the text above. "
                f"Answer: According to the chain of variable assignments in the text above, "
                f"{len(names)} variables are assigned the value {value}, they are:")
    prompt = _assemble(tokenizer, context_tokens, head, needles, depth, question, rng)
    return Sample("variables", prompt, tuple(names), 32, depth, seed)


def common_words(tokenizer, context_tokens: int, depth: float, seed: int) -> Sample:
    """A numbered list of words in which ten words appear far more often than the others; the
    question asks for those ten (`depth` is unused: the list is the whole context)."""
    rng = random.Random(seed)
    head = "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones that appear most often.\n"
    question = ("\nQuestion: What are the 10 most common words in the above list? Answer: The top "
                "10 words that appear most often in the list are:")
    words = _words(tokenizer, rng, 1000)
    room = context_tokens - len(tokenizer(head + question).input_ids)
    slots = 100
    for _ in range(2):   # "N. word" tokens: about 5, more as the numbers grow
        trial = " ".join(f"{i + slots // 2}. {w}" for i, w in enumerate(words[:100]))
        per_word = len(tokenizer(trial).input_ids) / 100
        slots = max(int(room / per_word), 40)
    common_count = max(slots // 40, 4)    # each common word: ~1/40 of the list
    rare = min((slots - 10 * common_count) // 2, len(words) - 10)
    listed = words[:10] * common_count + words[10:10 + rare] * 2
    rng.shuffle(listed)
    # numbers grow longer down the list: trim rare entries from the end to fit
    excess = len(tokenizer(_numbered(listed)).input_ids) - (slots * per_word)
    for _ in range(max(int(excess / per_word) + 1, 0)):
        listed.pop(max(i for i, w in enumerate(listed) if w not in words[:10]))
    body = _numbered(listed)
    return Sample("common_words", head + body + question, tuple(words[:10]), 40, depth, seed)


def _numbered(words: list[str]) -> str:
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


TASKS: dict[str, Callable[..., Sample]] = {
    "passkey": passkey, "multikey": multikey_needle, "multivalue": multivalue_needle,
    "variables": variable_tracking, "common_words": common_words,
}

FIRST_TURN_QUESTION = "\nIn one word, what is the text above mostly about? It is mostly about"
FIRST_TURN_TOKENS = 4   # the first turn's reply (not scored)


def two_turn(task: Callable[..., Sample]) -> Callable[..., Sample]:
    """A task's two-turn variant: the first turn is its context with an unrelated question (as
    if the user asked something else first), the second its own question. A policy that evicts
    by the first turn's queries keeps what that question needed; rocketkv-mt selects again for
    the second."""
    def build(tokenizer, context_tokens: int, depth: float, seed: int) -> Sample:
        sample = task(tokenizer, context_tokens, depth, seed)
        context, question = sample.prompt.rsplit("\n", 1)
        return dataclasses.replace(sample, task=f"{sample.task}-2turn",
                                   prompt=context + FIRST_TURN_QUESTION,
                                   follow_up="\n" + question)
    return build


TWO_TURN_TASKS = {f"{name}-2turn": two_turn(task) for name, task in TASKS.items()}


def passkey_prompt(tokenizer, context_tokens: int, depth: float, seed: int) -> tuple[str, str]:
    """The classic passkey prompt (one filler passage repeated, as in Mohtashami and Jaggi's
    landmark-attention test) of about `context_tokens` tokens: (prompt, passkey). The demo's."""
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    needle = _passkey_needle(key) + " "
    budget = context_tokens - len(tokenizer(PASSKEY_HEAD + needle + PASSKEY_QUESTION).input_ids)
    repeats = max(1, budget // len(tokenizer(CLASSIC_FILLER).input_ids))
    at = round(depth * repeats)
    text = PASSKEY_HEAD + CLASSIC_FILLER * at + needle + CLASSIC_FILLER * (repeats - at) + \
        PASSKEY_QUESTION
    return text, key
