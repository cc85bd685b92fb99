"""ShotKV: the prompt compressed by whole shots at prefill, generated tokens apart at decode.

Liu et al., "Can LLMs Maintain Fundamental Abilities under KV Cache Compression?",
arXiv 2502.01941.
"""
from __future__ import annotations

import dataclasses

import torch

from ..kernels import reference
from .base import Policy, check_int, register


@register
@dataclasses.dataclass(frozen=True)
class ShotKV(Policy):
    """Two caches with their own budgets. Prefill: each shot is scored by the window's attention
    votes averaged over its tokens, and the best shots are kept whole, best first, up to
    `token_budget` prompt tokens with the window (the last shot the budget reaches may be cut);
    those prompt tokens are never evicted. Decode: generated tokens are scored by the attention
    they receive from later queries, accumulated (summed over the GQA group's heads); beyond
    `decode_budget` of them the lowest-scored is evicted, sparing the most recent half.
    Stated departure: a shot is a run of `shot_size` consecutive tokens. The paper's shots are
    a prompt's few-shot examples, which only its text delimits; the ops see no token ids."""

    shot_size: int = 32
    decode_budget: int = 64

    name = "shotkv"
    state = "scores"
    decode_kind = "exact attention over the kept shots and the best generated tokens"

    def __post_init__(self):
        super().__post_init__()
        check_int("shot_size", self.shot_size, 1)
        check_int("decode_budget", self.decode_budget, 1)

    def plan(self, prompt_len, head_dim, layer=0, layers=1):
        base = super().plan(prompt_len, head_dim)
        # decode reads every kept prompt token and at most decode_budget generated ones
        live = min(base.prompt_budget, prompt_len) + self.decode_budget
        return dataclasses.replace(base, topk=live)

    def prompt_scores(self, query_window, key, mask, scale):
        votes = reference.snapkv_votes(query_window, key, mask, scale, 1)
        return reference.chunk_scores(votes, self.shot_size, mean=True)

    def select(self, query_window, key, mask, scale, keep):
        index, _ = super().select(query_window, key, mask, scale, keep)
        return index, torch.full(index.shape, float("inf"), device=key.device)

    def evicting_decode(self, query, key, value, mask, scale, topk, state):
        return reference.evicting_decode(query, key, value, mask, scale, state, topk,
                                         self.decode_budget // 2)
