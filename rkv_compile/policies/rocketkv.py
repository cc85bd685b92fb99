"""RocketKV: SnapKV++ eviction after prefill, hybrid sparse attention at every decode step.

Behnam et al., "RocketKV: Accelerating Long-Context LLM Inference via Two-Stage KV Cache
Compression", ICML 2025, arXiv 2502.14051. The planner below follows the paper's budget split.
"""
from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class Plan:
    """Budgets for one sequence.

    capacity:      most tokens a layer's cache holds per KV head (prompt kept + generated).
    prompt_budget: prompt tokens stage 1 keeps (capacity - max_new_tokens, never below the window).
    topk:          tokens stage 2 attends to exactly (B // 2).
    chunk:         consecutive cache slots that share one min/max key summary.
    dims:          r, the query dims the approximate scores read.
    """

    token_budget: int
    length: int
    capacity: int
    prompt_budget: int
    topk: int
    chunk: int
    dims: int


@dataclasses.dataclass(frozen=True)
class RocketKV:
    """RocketKV with token budget B: the plan for a prompt of a given length and head dim.

    With L = prompt + max_new_tokens: c = max(1, L/B); alpha = min(0.2 + 0.06 log2 c, 0.8);
    capacity = int(L / c^alpha), at least min(2 max_new_tokens, L); topk = B // 2;
    c2 = max(1, capacity/B); chunk = ceil(sqrt(c2)) (1 if that exceeds c2);
    dims = clamp(int(D * chunk / c2), 1, D).
    """

    token_budget: int
    max_new_tokens: int
    window_size: int = 32
    kernel_size: int = 63

    def plan(self, prompt_len: int, head_dim: int) -> Plan:
        B, M, D = self.token_budget, self.max_new_tokens, head_dim
        L = prompt_len + M
        c = max(1.0, L / B)
        alpha = min(0.2 + 0.06 * math.log2(c), 0.8)
        capacity = max(int(L / c**alpha), min(2 * M, L))
        c2 = max(1.0, capacity / B)
        chunk = math.ceil(math.sqrt(c2))
        if chunk > c2:
            chunk = 1
        dims = min(max(int(D * chunk / c2), 1), D)
        prompt_budget = max(capacity - M, self.window_size)
        return Plan(B, L, capacity, prompt_budget, B // 2, chunk, dims)
