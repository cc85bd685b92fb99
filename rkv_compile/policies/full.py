"""Full KV: no compression. The baseline every method is measured against, run through the same
pass and cache (with RocketKVCache: one static buffer of prompt + new tokens, CUDA graphs)."""
from __future__ import annotations

import dataclasses

from .base import Policy, register


@register
@dataclasses.dataclass(frozen=True)
class Full(Policy):
    """Keeps every prompt token and attends to all of them exactly (token_budget is unused)."""

    name = "full"
    budgeted = False

    def plan(self, prompt_len, head_dim, layer=0, layers=1):
        return self.keep_all(prompt_len, dims=head_dim)
