"""Options of the ``rocketkv`` backend and the RocketKV budget planner.

The planner follows RocketKV (arXiv 2502.14051) exactly: from the token budget B, the planned
sequence length L = prompt + max_new_tokens and the head dim D it derives how many prompt tokens
stage 1 keeps and how stage 2 (hybrid sparse attention) summarises and selects at decode time.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

POLICIES = ("rocketkv",)


@dataclasses.dataclass(frozen=True)
class RocketKVConfig:
    """What ``torch.compile(..., backend="rocketkv", options={...})`` accepts.

    token_budget:   B, the tokens stage 2 may attend to per step (it reads B/2 of them exactly);
                    None turns compression off: the backend is then plain Inductor.
    max_new_tokens: the tokens the caller will generate; with the prompt length it gives the
                    planned length L that sizes the compressed cache.
    window_size:    the last prompt queries that vote in stage 1 (SnapKV's observation window);
                    their own keys are always kept.
    kernel_size:    width of the max-pool that smooths stage-1 votes (odd).
    policy:         the selection method; "rocketkv" (the baselines come as further policies).
    """

    token_budget: int | None = 256
    max_new_tokens: int = 128
    window_size: int = 32
    kernel_size: int = 63
    policy: str = "rocketkv"

    def __post_init__(self):
        _check_int("token_budget", self.token_budget, 2, none_ok=True)
        _check_int("max_new_tokens", self.max_new_tokens, 1)
        _check_int("window_size", self.window_size, 1)
        _check_int("kernel_size", self.kernel_size, 1)
        if self.kernel_size % 2 == 0:
            raise ValueError(f"rocketkv option 'kernel_size' must be odd (got {self.kernel_size})")
        if self.policy not in POLICIES:
            raise ValueError(f"rocketkv option 'policy' must be one of {POLICIES} (got {self.policy!r})")

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> "RocketKVConfig":
        options = dict(options or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(
                f"unknown rocketkv option(s) {unknown}; the options are {sorted(known)}"
            )
        return cls(**options)

    @property
    def compresses(self) -> bool:
        return self.token_budget is not None

    def plan(self, prompt_len: int, head_dim: int) -> "Plan":
        return Plan.make(self.token_budget, prompt_len, self.max_new_tokens, head_dim, self.window_size)


def _check_int(name: str, value: Any, low: int, none_ok: bool = False) -> None:
    if value is None and none_ok:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        allowed = f"an int >= {low}" + (" or None" if none_ok else "")
        raise ValueError(f"rocketkv option {name!r} must be {allowed} (got {value!r})")


@dataclasses.dataclass(frozen=True)
class Plan:
    """Budgets for one sequence, per RocketKV's planner.

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

    @classmethod
    def make(cls, token_budget: int, prompt_len: int, max_new_tokens: int, head_dim: int,
             window_size: int = 32) -> "Plan":
        B, M, D = token_budget, max_new_tokens, head_dim
        L = prompt_len + M
        c = max(1.0, L / B)
        alpha = min(0.2 + 0.06 * math.log2(c), 0.8)
        capacity = max(int(L / c**alpha), min(2 * M, L))
        c2 = max(1.0, capacity / B)
        chunk = math.ceil(math.sqrt(c2))
        if chunk > c2:
            chunk = 1
        dims = min(max(int(D * chunk / c2), 1), D)
        prompt_budget = max(capacity - M, window_size)
        return cls(B, L, capacity, prompt_budget, B // 2, chunk, dims)
