"""Options of the ``rocketkv`` backend, validated, and the policy they select."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from .policies import POLICIES, Plan, Policy


@dataclasses.dataclass(frozen=True)
class RocketKVConfig:
    """What ``torch.compile(..., backend="rocketkv", options={...})`` accepts.

    token_budget:   B, the tokens stage 2 may attend to per step (it reads B/2 of them exactly);
                    None turns compression off: the backend is then plain Inductor.
    max_new_tokens: the tokens the caller will generate; with the prompt length it gives the
                    planned length L that sizes the compressed cache.
    window_size:    the last prompt queries that vote in stage 1 (SnapKV's observation window);
                    their own keys are always kept.
    kernel_size:    width of the pooling that smooths prompt votes (odd); None: the policy's own
                    (RocketKV 63, SnapKV 5). Only for policies that pool.
    policy:         the method (rkv_compile/policies): "rocketkv", "snapkv", "oracle-topk",
                    "full" (no compression, through the same pass and cache).
    cudagraphs:     decode graphs replay as CUDA graphs (Inductor's cudagraph trees); for
                    RocketKVCache, whose decode steps all have the same shapes.
    """

    token_budget: int | None = 256
    max_new_tokens: int = 128
    window_size: int = 32
    kernel_size: int | None = None
    policy: str = "rocketkv"
    cudagraphs: bool = False

    def __post_init__(self):
        if not isinstance(self.cudagraphs, bool):
            raise ValueError(f"rocketkv option 'cudagraphs' must be True or False "
                             f"(got {self.cudagraphs!r})")
        _check_int("token_budget", self.token_budget, 2, none_ok=True)
        _check_int("max_new_tokens", self.max_new_tokens, 1)
        _check_int("window_size", self.window_size, 1)
        _check_int("kernel_size", self.kernel_size, 1, none_ok=True)
        if self.kernel_size is not None and self.kernel_size % 2 == 0:
            raise ValueError(f"rocketkv option 'kernel_size' must be odd (got {self.kernel_size})")
        if self.policy not in POLICIES:
            raise ValueError(f"rocketkv option 'policy' must be one of {sorted(POLICIES)} "
                             f"(got {self.policy!r})")
        if self.kernel_size is not None and not any(
                f.name == "kernel_size" for f in dataclasses.fields(POLICIES[self.policy])):
            raise ValueError(f"rocketkv option 'kernel_size' does not apply to policy "
                             f"{self.policy!r} (it pools no votes)")

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

    @property
    def method(self) -> Policy:
        """The selected policy, with these options as its hyperparameters."""
        extra = {} if self.kernel_size is None else {"kernel_size": self.kernel_size}
        return POLICIES[self.policy](self.token_budget, self.max_new_tokens, self.window_size,
                                     **extra)

    def plan(self, prompt_len: int, head_dim: int) -> Plan:
        """The selected policy's plan for a prompt of `prompt_len` tokens."""
        return self.method.plan(prompt_len, head_dim)


def _check_int(name: str, value: Any, low: int, none_ok: bool = False) -> None:
    if value is None and none_ok:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        allowed = f"an int >= {low}" + (" or None" if none_ok else "")
        raise ValueError(f"rocketkv option {name!r} must be {allowed} (got {value!r})")
