"""H2O: heavy hitters by accumulated attention, plus a recent window, evicting as it decodes.

Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language
Models", NeurIPS 2023, arXiv 2306.14048.
"""
from __future__ import annotations

import dataclasses

from ..kernels import reference
from .base import Plan, Policy, check_int, register


@register
@dataclasses.dataclass(frozen=True)
class H2O(Policy):
    """A cache of `token_budget` tokens per KV head: the `recent_size` most recent (default half
    the budget, the paper's equal split) and the heavy hitters, the tokens with the largest
    attention accumulated over every query so far (summed over the GQA group's query heads).
    After prefill, the scores are the column sums of the whole prompt's causal attention; at
    each decode step the new token joins, the query attends exactly over the cache, each token's
    score grows by its probability, and the lowest-scored token outside the recent window is
    evicted once the cache holds more than the budget. Evicted slots stay allocated (masked out)
    until generation ends: the cache grows by one slot per step, as every policy's here."""

    recent_size: int | None = None

    name = "h2o"
    state = "scores"
    decode_kind = "exact attention over the heavy hitters and the recent window, evicting one " \
        "token per step"

    def __post_init__(self):
        super().__post_init__()
        check_int("recent_size", self.recent_size, 0, none_ok=True)
        if self.recent_size is not None and self.token_budget is not None and \
                self.recent_size > self.token_budget:
            raise ValueError(f"rocketkv option 'recent_size' ({self.recent_size}) must not "
                             f"exceed 'token_budget' ({self.token_budget})")

    @property
    def recent(self) -> int:
        return self.token_budget // 2 if self.recent_size is None else self.recent_size

    def plan(self, prompt_len, head_dim, layer=0, layers=1):
        # The cache holds token_budget live tokens; decode reads them all (topk: the live limit).
        length = prompt_len + self.max_new_tokens
        prompt_budget = self.token_budget
        return Plan(self.token_budget, length, prompt_budget + self.max_new_tokens,
                    prompt_budget, self.token_budget, 0, head_dim)

    def observed_queries(self, prompt_len):
        return prompt_len

    def select(self, query_window, key, mask, scale, keep):
        scores = reference.accumulated_attention(query_window, key, mask, scale)  # B H n
        n = key.shape[2]
        recent = min(self.recent, keep, n)
        index = reference.kept_positions(scores[..., : n - recent], min(keep, n), n)
        return index, scores.gather(-1, index)

    def evicting_decode(self, query, key, value, mask, scale, topk, state):
        return reference.evicting_decode(query, key, value, mask, scale, state, topk, self.recent)
