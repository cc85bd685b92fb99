"""What every KV-cache method shares: a plan per prompt, what a prefill keeps, how decode reads.

A method is a frozen dataclass whose fields are its hyperparameters. Most write one method:
`prompt_scores` (a score per prompt token; the best `prompt_budget` are kept, the observation
window always) or `decode` (one decode step over the stored cache). Methods that evict during
decode (`state = "scores"`) write `select` and `evicting_decode`, and carry a score per stored
token from step to step in the cache. The ops receive a method as its `spec` string (a custom op takes no Python
objects) and rebuild it with `from_spec`. Every method composes with lossy KV quantization
(`kv_bits`): what the prefill stores is kept as codes (`state.Coded`).
"""
from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..kernels import reference
from ..state import CODE_BITS


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
    kv_bits: int | None = None   # quantize the stored prompt (kvquant.py says how); None: exact
    kv_group_size: int = 32      # entries sharing one scale and zero point

    name: ClassVar[str]
    sparse_decode: ClassVar[bool] = False   # decode calls `decode`; else it attends exactly
    # A state the cache carries per stored slot: "scores" (decode evicts by them: `select` and
    # `evicting_decode`), "view" (the cache keeps every token; decode reads a view of them).
    state: ClassVar[str] = ""
    budgeted: ClassVar[bool] = True         # token_budget matters (not: every token is kept)
    # The Triton decode CUDA runs (rewrite.TRITON_DECODE): "stage2", RocketKV's (one list per
    # GQA group), "pages", Quest's (pages per query head), or "sparq" (stage 2 at chunk 1 and
    # mean-value reallocation); "": the PyTorch reference
    triton: ClassVar[str] = ""
    decode_kind: ClassVar[str] = "exact attention over the kept tokens"

    def __post_init__(self):
        check_int("kv_bits", self.kv_bits, 2, none_ok=True)
        if self.kv_bits is not None and self.kv_bits not in CODE_BITS:
            raise ValueError(f"rocketkv option 'kv_bits' must be one of {CODE_BITS} or None "
                             f"(got {self.kv_bits}): codes pack whole into bytes")
        if self.kv_bits is not None and self.state:
            raise ValueError(f"rocketkv option 'kv_bits' is not supported by policy "
                             f"{self.name!r} yet: its decode re-selects over stored tokens, "
                             f"which no op reads as codes")
        check_int("kv_group_size", self.kv_group_size, 1)

    def plan(self, prompt_len: int, head_dim: int, layer: int = 0, layers: int = 1) -> Plan:
        """The budgets of attention layer `layer` (of `layers`, in graph order) for a prompt.
        By default: keep `token_budget` prompt tokens (at least the window), attend to all."""
        prompt_budget = max(self.token_budget, self.window_size)
        capacity = prompt_budget + self.max_new_tokens
        return Plan(self.token_budget, prompt_len + self.max_new_tokens, capacity, prompt_budget,
                    0, 0, head_dim)

    def selected_list_length(self, head_dim: int, layer: int = 0, layers: int = 1) -> int:
        """The tokens a Triton decode step's selection list holds, baked into the decode graph:
        the plan's topk, where it does not depend on the prompt (every row's header then says
        the same); NOT_SELECTED where it does, so the list holds every slot of the layer and
        each row attends to its own header's topk."""
        return self.plan(self.token_budget, head_dim, layer, layers).topk

    def triton_at(self, scale: float, head_dim: int) -> bool:
        """Whether the Triton kernels compute this policy's decode step at this attention
        scale (on CUDA; else its `decode` runs, the PyTorch reference)."""
        return bool(self.triton)

    def keep_all(self, prompt_len: int, topk: int = 0, chunk: int = 0, dims: int = 0) -> Plan:
        """The plan of a policy that evicts nothing: every prompt and new token is stored."""
        length = prompt_len + self.max_new_tokens
        return Plan(self.token_budget, length, length, prompt_len, topk, chunk, dims)

    def prompt_scores(self, query_window: Tensor, key: Tensor, mask: Tensor | None,
                      scale: float) -> Tensor:
        """(B, Hkv, n - w) scores of the prompt tokens before the window: the best are kept."""
        raise NotImplementedError(f"{self.name} keeps no prompt subset")

    def observed_queries(self, prompt_len: int) -> int:
        """How many of the last prompt queries the prompt selection reads."""
        return min(self.window_size, prompt_len)

    def rewrites_prompt(self, prompt_len: int, plan: Plan) -> bool:
        """Whether the prefill stores something other than the exact prompt."""
        return prompt_len > plan.prompt_budget or self.kv_bits is not None or \
            self.state == "scores"

    def reuses(self, layer: int) -> int | None:
        """The earlier layer whose selected positions layer `layer` keeps, if any."""
        return None

    def select(self, query_window: Tensor, key: Tensor, mask: Tensor | None, scale: float,
               keep: int) -> tuple[Tensor, Tensor]:
        """(positions, state): the `keep` prompt tokens stored, (B, Hkv, keep) in sequence
        order: the best-scored before the window, then the window; and their decode state
        ((B, Hkv, keep) for a policy whose state is "scores", else empty)."""
        B, H, n = key.shape[:3]
        if keep >= n:
            index = torch.arange(n, device=key.device).expand(B, H, n).contiguous()
        else:
            scores = self.prompt_scores(query_window, key, mask, scale)
            index = reference.kept_positions(scores, keep, n)
        return index, key.new_empty(0, dtype=torch.float32)

    def store(self, key: Tensor, value: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        """The tokens at `index`, contiguous (exact: a quantized cache quantizes them as it
        packs them)."""
        return tuple(reference.gather_tokens(t, index) for t in (key, value))

    def quantized(self, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """Kept keys and values as a quantized cache reads them (through `kv_bits`-bit codes,
        `reference.quantize`); unchanged without kv_bits."""
        if self.kv_bits is None:
            return key, value
        return (reference.fake_quantize(key, self.kv_bits, self.kv_group_size, dim=2),
                reference.fake_quantize(value, self.kv_bits, self.kv_group_size, dim=3))

    def compress(self, query_window: Tensor, key: Tensor, value: Tensor, mask: Tensor | None,
                 scale: float, keep: int, reuse: Tensor | None = None
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """What the prefill stores: (keys, values, positions, decode state) of the `keep` tokens
        it selects, or of the positions `reuse` (another layer's selection; no state)."""
        if reuse is None:
            index, state = self.select(query_window, key, mask, scale, keep)
        else:   # a copy: a custom op's outputs may not alias its inputs
            index = reuse.clone(memory_format=torch.contiguous_format)
            state = key.new_empty(0, dtype=torch.float32)
        return *self.store(key, value, index), index, state

    def kv_bytes(self, stored: int, generated: int, head_dim: int, itemsize: int) -> int:
        """Bytes one KV head of one layer holds: `stored` prompt tokens as the prefill stores
        them (codes, plus fp16 scales and zero points if kv_bits) and `generated` exact ones."""
        exact = 2 * (stored + generated) * head_dim * itemsize
        if self.kv_bits is None:
            return exact
        groups = -(-stored // self.kv_group_size) * head_dim \
            + stored * -(-head_dim // self.kv_group_size)   # keys per channel, values per token
        return -(-2 * stored * head_dim * self.kv_bits // 8) + 4 * groups \
            + 2 * generated * head_dim * itemsize

    def read_bytes(self, stored: int, generated: int, plan: Plan, head_dim: int, itemsize: int,
                   group: int) -> int:
        """Bytes of KV one KV head of one layer reads at a decode step over `stored` prompt
        and `generated` new tokens (`group` query heads share it): by default all it holds,
        attended exactly. A sparse policy counts what its selection reads and what it attends
        to, each number at its stored width (scales and zero points left out)."""
        return self.kv_bytes(stored, generated, head_dim, itemsize)

    def entry_bytes(self, itemsize: int) -> float:
        """Bytes of one stored number: the model's, or kv_bits' codes."""
        return itemsize if self.kv_bits is None else self.kv_bits / 8

    def decode(self, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, scale: float,
               chunk: int, dims: int, topk: int) -> Tensor:
        """One decode step over the stored cache (sparse_decode policies)."""
        raise NotImplementedError(f"{self.name} decodes exactly")

    def evicting_decode(self, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None,
                        scale: float, topk: int, state: Tensor) -> tuple[Tensor, Tensor]:
        """One decode step of a policy whose state is "scores": (output, every slot's state)."""
        raise NotImplementedError(f"{self.name} does not evict during decode")

    @property
    def keeps_history(self) -> bool:
        return self.state == "view"

    @property
    def spec(self) -> str:
        return json.dumps({"policy": self.name, **dataclasses.asdict(self)}, sort_keys=True)


SHARED_FIELDS = {"token_budget", "max_new_tokens", "window_size"}   # the backend's own options
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
