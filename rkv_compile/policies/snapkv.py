"""SnapKV: keep the prompt tokens the last queries attend to; decode exactly over them.

Li et al., "SnapKV: LLM Knows What You Are Looking for Before Generation", NeurIPS 2024,
arXiv 2404.14469.
"""
from __future__ import annotations

import dataclasses

from ..kernels import reference
from .base import Policy, check_int, register


@register
@dataclasses.dataclass(frozen=True)
class SnapKV(Policy):
    """The observation window's (the last `window_size` queries') softmax attention to each
    earlier prompt token, summed over the window, average-pooled over `kernel_size` neighbours
    (the paper's clustering), averaged over the query heads of a GQA group; the best
    `token_budget - window_size` tokens and the window are kept, and decode attends to all of
    them exactly. Defaults: the authors' code (window 32, kernel 5, average pooling)."""

    kernel_size: int = 5

    name = "snapkv"

    def __post_init__(self):
        super().__post_init__()
        check_int("kernel_size", self.kernel_size, 1, odd=True)

    def prompt_scores(self, query_window, key, mask, scale):
        # Summed over the group instead of averaged: the same ranking.
        return reference.snapkv_votes(query_window, key, mask, scale, self.kernel_size, pool="avg")
