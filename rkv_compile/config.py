"""Options of the ``rocketkv`` backend, validated, and the policy they select."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

from .policies import POLICIES, Plan, Policy
from .policies.base import SHARED_FIELDS, check_int


@dataclasses.dataclass(frozen=True)
class RocketKVConfig:
    """What ``torch.compile(..., backend="rocketkv", options={...})`` accepts.

    token_budget:   B, the tokens stage 2 may attend to per step (it reads B/2 of them exactly);
                    None turns compression off: the backend is then plain Inductor.
    max_new_tokens: the tokens the caller will generate; with the prompt length it gives the
                    planned length L that sizes the compressed cache.
    window_size:    the last prompt queries that vote in stage 1 (SnapKV's observation window);
                    their own keys are always kept.
    policy:         the method, one of rkv_compile/policies: "rocketkv" (default),
                    "rocketkv-mt" (multi-turn), "snapkv",
                    "pyramidkv", "chunkkv", "h2o", "shotkv", "streamingllm", "quest", "sparq",
                    "oracle-topk", "kvquant", "full".
    cudagraphs:     on CUDA, decode graphs replay as CUDA graphs (Inductor's cudagraph trees)
                    over the caches' static buffers; None (default): on; False: off.
    compile_prefill: whether Inductor compiles the graphs that read a prompt (prefill, a new
                    turn) too. False (default): they run as traced, op by op (their time is
                    in matmuls and attention, which Inductor leaves to the same kernels), so
                    a first call compiles only the decode step; True: fused, for a workload of
                    many prompts (BENCHMARKS.md measures both).
    compile_layers_once: on CUDA, a decode graph's alike layers share one compiled subgraph
                    (passes/repeated_layers.py): Inductor compiles one layer, not all 32 of an
                    8B model. True (default); False: the whole graph, fused across layers.
    Any other option is a hyperparameter of the selected policy (a field of its dataclass, e.g.
    "kernel_size" of rocketkv and snapkv, "sink_size" of streamingllm, and every policy's
    "kv_bits" and "kv_group_size"); `from_options` collects them into `policy_options`.
    """

    token_budget: int | None = 256
    max_new_tokens: int = 128
    window_size: int = 32
    policy: str = "rocketkv"
    cudagraphs: bool | None = None
    compile_prefill: bool = False
    compile_layers_once: bool = True
    policy_options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self):
        if self.cudagraphs is not None and not isinstance(self.cudagraphs, bool):
            raise ValueError(f"rocketkv option 'cudagraphs' must be True, False or None "
                             f"(got {self.cudagraphs!r})")
        if not isinstance(self.compile_prefill, bool):
            raise ValueError(f"rocketkv option 'compile_prefill' must be True or False "
                             f"(got {self.compile_prefill!r})")
        if not isinstance(self.compile_layers_once, bool):
            raise ValueError(f"rocketkv option 'compile_layers_once' must be True or False "
                             f"(got {self.compile_layers_once!r})")
        check_int("token_budget", self.token_budget, 2, none_ok=True)
        check_int("max_new_tokens", self.max_new_tokens, 1)
        check_int("window_size", self.window_size, 1)
        if not isinstance(self.policy, str) or self.policy not in POLICIES:
            raise ValueError(f"rocketkv option 'policy' must be one of {sorted(POLICIES)} "
                             f"(got {self.policy!r})")
        own = _own_fields(POLICIES[self.policy])
        for name, _ in self.policy_options:
            if name not in own:
                raise ValueError(f"rocketkv option {name!r} does not apply to policy "
                                 f"{self.policy!r} (its own options: {sorted(own) or 'none'})")
        self.method  # the policy checks its hyperparameters

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> "RocketKVConfig":
        options = dict(options or {})
        shared = {f.name for f in dataclasses.fields(cls)} - {"policy_options"}
        any_policy = set().union(*(_own_fields(p) for p in POLICIES.values()))
        unknown = sorted(set(options) - shared - any_policy)
        if unknown:
            raise ValueError(f"unknown rocketkv option(s) {unknown}; the options are "
                             f"{sorted(shared)} and the policies' own {sorted(any_policy)}")
        policy_options = tuple(sorted((k, v) for k, v in options.items() if k not in shared))
        return cls(**{k: v for k, v in options.items() if k in shared},
                   policy_options=policy_options)

    @property
    def compresses(self) -> bool:
        return self.token_budget is not None

    @functools.cached_property
    def method(self) -> Policy:
        """The selected policy, with these options as its hyperparameters."""
        return POLICIES[self.policy](self.token_budget, self.max_new_tokens, self.window_size,
                                     **dict(self.policy_options))

    def plan(self, prompt_len: int, head_dim: int, layer: int = 0, layers: int = 1) -> Plan:
        """The selected policy's plan for a prompt of `prompt_len` tokens (at attention layer
        `layer` of `layers`: some policies budget layers differently)."""
        return self.method.plan(prompt_len, head_dim, layer, layers)


def _own_fields(policy: type[Policy]) -> set[str]:
    return {f.name for f in dataclasses.fields(policy)} - SHARED_FIELDS
