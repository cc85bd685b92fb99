"""PyramidKV: SnapKV's selection with budgets that shrink with depth.

Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling",
arXiv 2406.02069.
"""
from __future__ import annotations

import dataclasses

from .base import Plan, check_int, register
from .snapkv import SnapKV


@register
@dataclasses.dataclass(frozen=True)
class PyramidKV(SnapKV):
    """SnapKV inside each layer (window votes, average pooling), with the prompt tokens before
    the window budgeted in an arithmetic progression over depth, as the authors' code does:
    with P = token_budget - window_size, the last layer keeps P // beta, the first
    2P - P // beta, the layers between in equal steps; so the layers keep about P each on
    average, as SnapKV at the same budget. Every layer keeps the window; decode is exact.
    Each layer's cache is sized by its own budget, on either cache."""

    beta: int = 20

    name = "pyramidkv"

    def __post_init__(self):
        super().__post_init__()
        check_int("beta", self.beta, 1)

    def plan(self, prompt_len, head_dim, layer=0, layers=1):
        prefix = max(self.token_budget - self.window_size, 0)
        least = prefix // self.beta
        most = 2 * prefix - least
        step = (most - least) // (layers - 1) if layers > 1 else 0
        prompt_budget = most - layer * step + self.window_size if layers > 1 else \
            max(self.token_budget, self.window_size)
        return Plan(self.token_budget, prompt_len + self.max_new_tokens,
                    prompt_budget + self.max_new_tokens, prompt_budget, 0, 0, head_dim)
