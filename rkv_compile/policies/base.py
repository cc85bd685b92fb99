"""What every KV-cache method shares: a plan per prompt, what a prefill keeps, how decode reads.

A method is a frozen dataclass whose fields are its hyperparameters. Most write one method:
`prompt_scores` (a score per prompt token; the best `prompt_budget` are kept, the observation
window always) or `decode` (one decode step over the stored cache). The ops receive a method as
its `spec` string (a custom op takes no Python objects) and rebuild it with `from_spec`.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, ClassVar

from torch import Tensor

from ..kernels import reference


@dataclasses.dataclass(frozen=True)
class Plan:
    """Budgets for one sequence.

    capacity:      most tokens a layer's cache holds per KV head (prompt kept + generated).
    prompt_budget: prompt tokens the prefill keeps (capacity - max_new_tokens, at least the
                   window).
    topk:          tokens a decode step attends to exactly (0: all it stores).
    chunk:         consecutive cache slots sharing one min/max key summary (0: no summaries).
    dims:          r, the query dims approximate scores read.
    """

    token_budget: int
    length: int
    capacity: int
    prompt_budget: int
    topk: int
    chunk: int
    dims: int


@dataclasses.dataclass(frozen=True)
class Policy:
    """A KV-cache method on rkv_compile's pipeline (exact prefill, prompt eviction, decode)."""

    token_budget: int
    max_new_tokens: int = 128
    window_size: int = 32

    name: ClassVar[str]
    sparse_decode: ClassVar[bool] = False   # decode sites call `decode`; else they stay exact
    triton: ClassVar[bool] = False          # CUDA runs RocketKV's Triton kernels (else: reference)
    per_layer: ClassVar[bool] = False       # layers keep different numbers of tokens
    decode_kind: ClassVar[str] = "exact attention over the kept tokens"

    def plan(self, prompt_len: int, head_dim: int, layer: int = 0, layers: int = 1) -> Plan:
        """The budgets of attention layer `layer` (of `layers`, in graph order) for a prompt.
        By default: keep `token_budget` prompt tokens (at least the window), attend to all."""
        prompt_budget = max(self.token_budget, self.window_size)
        capacity = prompt_budget + self.max_new_tokens
        return Plan(self.token_budget, prompt_len + self.max_new_tokens, capacity, prompt_budget,
                    0, 0, head_dim)

    def keep_all(self, prompt_len: int, topk: int = 0, chunk: int = 0, dims: int = 0) -> Plan:
        """The plan of a policy that evicts nothing: every prompt and new token is stored."""
        length = prompt_len + self.max_new_tokens
        return Plan(self.token_budget, length, length, prompt_len, topk, chunk, dims)

    def prompt_scores(self, query_window: Tensor, key: Tensor, mask: Tensor | None,
                      scale: float) -> Tensor:
        """(B, Hkv, n - w) scores of the prompt tokens before the window: the best are kept."""
        raise NotImplementedError(f"{self.name} keeps no prompt subset")

    def evict(self, query_window: Tensor, key: Tensor, value: Tensor, mask: Tensor | None,
              scale: float, keep: int) -> tuple[Tensor, Tensor]:
        """The `keep` best-scored prompt tokens per KV head, then the window, in order."""
        scores = self.prompt_scores(query_window, key, mask, scale)
        return reference.gather_kept(key, value, reference.keep_indices(scores, keep),
                                     query_window.shape[-2])

    def decode(self, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, scale: float,
               chunk: int, dims: int, topk: int) -> Tensor:
        """One decode step over the stored cache (sparse_decode policies)."""
        raise NotImplementedError(f"{self.name} decodes exactly")

    @property
    def spec(self) -> str:
        return json.dumps({"policy": self.name, **dataclasses.asdict(self)}, sort_keys=True)


SHARED_FIELDS = {f.name for f in dataclasses.fields(Policy)}   # the backend's own options
REGISTRY: dict[str, type[Policy]] = {}


def register(cls: type[Policy]) -> type[Policy]:
    REGISTRY[cls.name] = cls
    return cls


@functools.lru_cache(maxsize=None)
def from_spec(spec: str) -> Policy:
    fields = json.loads(spec)
    return REGISTRY[fields.pop("policy")](**fields)


def check_int(name: str, value: Any, low: int, none_ok: bool = False, odd: bool = False) -> None:
    """A ValueError naming rocketkv option `name` unless `value` is an int >= low (or None)."""
    if value is None and none_ok:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low or \
            odd and value % 2 == 0:
        allowed = f"an {'odd ' if odd else ''}int >= {low}" + (" or None" if none_ok else "")
        raise ValueError(f"rocketkv option {name!r} must be {allowed} (got {value!r})")
