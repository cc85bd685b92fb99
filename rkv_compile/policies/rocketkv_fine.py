"""Ours: RocketKV's eviction and decode reads, stage 2 spent on single tokens and more of them.

Issue 21's "a selection that closes the gap". RocketKV (arXiv 2502.14051) scores chunks of c
tokens by an upper bound of q.k from their keys' min/max on r query dims, then attends to the
top B/2 tokens. On heads of 64 dims (SmolLM2, Qwen2.5-0.5B) that bound is loose: measured with
`benchmarks/selection_study.py` (EVALUATION.md), the chunk, not the dims, is what loses most.
Our kernels build the bounds from the keys at every step, so the bytes a step reads are
n r + 2 D k (n stored tokens, D head dims, k attended) whatever the chunk: a chunk of 1 costs
selection work, not reads. So this policy keeps RocketKV's plan and its read budget, and
spends it differently: each token scored on its own (chunk 1, SparQ's approximation) on a
fraction of the r dims, and the reads that frees bought back as attended tokens.
"""
from __future__ import annotations

import dataclasses

from ..state import NOT_SELECTED
from .base import check_int, register
from .rocketkv import RocketKV


@register
@dataclasses.dataclass(frozen=True)
class RocketKVFine(RocketKV):
    """RocketKV's stage 1 and capacity; stage 2 at chunk 1 on r' = max(1, r // dims_divisor)
    query dims (r: RocketKV's dims for the prompt), attending to k' = B/2 + n (r - r') / (2 D)
    tokens, n the plan's capacity: the entries a step reads at capacity, n r' + 2 D k', are
    RocketKV's, n r + 2 D (B/2), to within one token."""

    dims_divisor: int = 4

    name = "rocketkv-fine"
    decode_kind = "token-level approximate scores on r' dims, top-k', exact over them"

    def __post_init__(self):
        super().__post_init__()
        check_int("dims_divisor", self.dims_divisor, 1)

    def plan(self, prompt_len, head_dim, layer=0, layers=1):
        plan = super().plan(prompt_len, head_dim, layer, layers)
        if not self.sparse_decode:
            return plan
        dims = max(1, plan.dims // self.dims_divisor)
        topk = plan.topk + plan.capacity * (plan.dims - dims) // (2 * head_dim)
        return dataclasses.replace(plan, chunk=1, dims=dims, topk=topk)

    def selected_list_length(self, head_dim, layer=0, layers=1):
        # k' grows with the prompt's capacity: each row's header holds its own
        return NOT_SELECTED
