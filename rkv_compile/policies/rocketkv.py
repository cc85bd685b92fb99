"""RocketKV: SnapKV++ eviction after prefill, hybrid sparse attention at every decode step.

Behnam et al., "RocketKV: Accelerating Long-Context LLM Inference via Two-Stage KV Cache
Compression", ICML 2025, arXiv 2502.14051. The planner below follows the paper's budget split.
"""
from __future__ import annotations

import dataclasses
import math

from ..kernels import reference, triton_compress
from .base import Plan, Policy, check_int, register


@register
@dataclasses.dataclass(frozen=True)
class RocketKV(Policy):
    """RocketKV with token budget B: the plan for a prompt of a given length and head dim.

    With L = prompt + max_new_tokens: c = max(1, L/B); alpha = min(0.2 + 0.06 log2 c, 0.8);
    capacity = int(L / c^alpha), at least min(2 max_new_tokens, L); topk = B // 2;
    c2 = max(1, capacity/B); chunk = ceil(sqrt(c2)) (1 if that exceeds c2);
    dims = clamp(int(D * chunk / c2), 1, D).
    Stage 1 (SnapKV++): window votes summed over each GQA group, max-pooled (kernel_size).
    Stage 2: chunk-level approximate scores from K's min/max summaries on r query dims, top-k
    tokens, exact attention over them (reference.sparse_decode).
    `stages` runs one stage alone, to tell their losses apart: "stage1" evicts to the capacity
    and decodes exactly over it; "stage2" keeps the whole cache (capacity = L) and plans stage 2
    over it with the formulas above.
    """

    kernel_size: int = 63
    stages: str = "both"

    name = "rocketkv"
    triton = "stage2"
    decode_kind = "stage-2 hybrid sparse attention"

    def __post_init__(self):
        super().__post_init__()
        check_int("kernel_size", self.kernel_size, 1, odd=True)
        if self.stages not in ("both", "stage1", "stage2"):
            raise ValueError(f"rocketkv option 'stages' must be 'both', 'stage1' or 'stage2' "
                             f"(got {self.stages!r})")

    @property
    def sparse_decode(self) -> bool:
        return self.stages != "stage1"

    def plan(self, prompt_len, head_dim, layer=0, layers=1):
        B, M, D = self.token_budget, self.max_new_tokens, head_dim
        L = prompt_len + M
        c = max(1.0, L / B)
        alpha = min(0.2 + 0.06 * math.log2(c), 0.8)
        capacity = max(int(L / c**alpha), min(2 * M, L)) if self.stages != "stage2" else L
        c2 = max(1.0, capacity / B)
        chunk = math.ceil(math.sqrt(c2))
        if chunk > c2:
            chunk = 1
        dims = min(max(int(D * chunk / c2), 1), D)
        prompt_budget = max(capacity - M, self.window_size)
        return Plan(B, L, capacity, prompt_budget, B // 2, chunk, dims)

    def prompt_scores(self, query_window, key, mask, scale):
        if key.is_cuda and mask is None:   # the Triton kernels: no w x n matrix is written
            return triton_compress.snapkv_votes(query_window, key, scale, self.kernel_size)
        return reference.snapkv_votes(query_window, key, mask, scale, self.kernel_size)

    def read_bytes(self, stored, generated, plan, head_dim, itemsize, group):
        """Stage 2 reads r dims of every stored key (the kernels build the chunk bounds from
        them) and the top-k tokens' keys and values."""
        if not self.sparse_decode:
            return super().read_bytes(stored, generated, plan, head_dim, itemsize, group)
        n = stored + generated
        return round((n * plan.dims + min(plan.topk, n) * 2 * head_dim)
                     * self.entry_bytes(itemsize))

    def decode(self, query, key, value, mask, scale, chunk, dims, topk):
        return reference.sparse_decode(query, key, value, mask, scale, chunk, dims, topk)
