"""The ``rocketkv`` torch.library ops that rewritten graphs and RocketKVCache call.

- `compress` (what a prefill stores), `sparse_decode` (a sparse decode step) and
  `evicting_decode` (a decode step that evicts) are opaque custom ops with fake kernels whose
  shapes and (contiguous) strides match, so Dynamo, AOTAutograd and Inductor trace around them.
  They take the policy as its `spec` string and run its PyTorch reference (RocketKV's stage-1
  scores: the Triton kernels on CUDA).
- `sparse_decode_triton` is a `triton_op`: on CUDA, Inductor traces into it and schedules its
  Triton kernels with the rest of the graph. (Under Triton's CPU interpreter a triton_op cannot
  be traced by torch.compile, so CPU graphs keep the opaque reference ops.)
- RocketKVCache's state: `static_cache` (a prompt store: the whole prompt, or after the pass what
  `compress` kept of it), `append_` (one decode token, in place; an opaque op whose CUDA path
  is one Triton launch) and `extend_cache` (a new turn: the stored tokens and the turn's, in new
  buffers).
"""
from __future__ import annotations

import torch
from torch import Tensor

from torch.library import triton_op

from ..policies import base as policies   # a module: policies import the reference ops too
from . import reference, triton_decode


@torch.library.custom_op("rocketkv::compress", mutates_args=())
def compress(query_window: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, scale: float,
             keep: int, policy: str, reuse: Tensor | None = None
             ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """What a prefill stores under the policy (its `spec`): (keys, values, positions, state) of
    the `keep` prompt tokens it selects (Policy.compress), or of the positions `reuse` (another
    layer's selection). State: the kept tokens' scores, for a policy that evicts during decode
    (else empty)."""
    return policies.from_spec(policy).compress(query_window, key, value, mask, scale, keep, reuse)


@compress.register_fake
def _(query_window, key, value, mask, scale, keep, policy, reuse=None):
    B, H, _, D = key.shape
    stateful = reuse is None and policies.from_spec(policy).decode_state
    return (key.new_empty(B, H, keep, D), value.new_empty(B, H, keep, value.shape[-1]),
            key.new_empty(B, H, keep, dtype=torch.int64),
            key.new_empty(B, H, keep, dtype=torch.float32) if stateful else
            key.new_empty(0, dtype=torch.float32))


@torch.library.custom_op("rocketkv::sparse_decode", mutates_args=())
def sparse_decode(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, scale: float,
                  chunk: list[int], dims: list[int], topk: list[int], policy: str) -> Tensor:
    """One sparse decode step of the policy (its `spec`) over the stored cache, on the
    reference path. chunk, dims, topk: the plan's, one for every row or one per row (a padded
    batch whose rows were evicted apart: each row decodes with its own)."""
    method = policies.from_spec(policy)
    plans = list(zip(chunk, dims, topk))
    if len(set(plans)) == 1:
        return method.decode(query, key, value, mask, scale, *plans[0])
    return torch.cat([method.decode(query[b:b + 1], key[b:b + 1], value[b:b + 1],
                                    reference.row_of(mask, b), scale, *plan)
                      for b, plan in enumerate(plans)])


@sparse_decode.register_fake
def _(query, key, value, mask, scale, chunk, dims, topk, policy):
    return query.new_empty(*query.shape[:-1], value.shape[-1])


@torch.library.custom_op("rocketkv::evicting_decode", mutates_args=())
def evicting_decode(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, scale: float,
                    topk: int, state: Tensor, policy: str) -> tuple[Tensor, Tensor]:
    """One decode step of a policy that evicts as it decodes (H2O): (output, the stored slots'
    new state), on the reference path."""
    return policies.from_spec(policy).evicting_decode(query, key, value, mask, scale, topk, state)


@evicting_decode.register_fake
def _(query, key, value, mask, scale, topk, state, policy):
    return (query.new_empty(*query.shape[:-1], value.shape[-1]),
            state.new_empty(*key.shape[:3]))


@triton_op("rocketkv::sparse_decode_triton", mutates_args=())
def sparse_decode_triton(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None,
                         scale: float, chunk: list[int], dims: list[int], topk: list[int],
                         key_min: Tensor | None = None, key_max: Tensor | None = None) -> Tensor:
    """Stage 2 through the Triton kernels (mask: None or boolean): what CUDA decode graphs call.
    chunk, dims, topk: as sparse_decode's (the kernels take one top-k for every row, as
    RocketKV's plans have). key_min/key_max: the cache's chunk summaries of K, if it keeps them
    (RocketKVCache)."""
    if len(set(topk)) != 1:
        raise ValueError(f"rocketkv: the Triton decode takes one top-k for every row (got {topk})")
    summaries = None if key_min is None else (key_min, key_max)
    return triton_decode.sparse_decode(query, key, value, mask, scale, chunk, dims, topk[0],
                                       summaries)


@torch.library.custom_op("rocketkv::append_",
                         mutates_args=("keys", "values", "key_min", "key_max", "lengths",
                                       "positions"))
def append_(keys: Tensor, values: Tensor, key_min: Tensor, key_max: Tensor, lengths: Tensor,
            positions: Tensor, new_key: Tensor, new_value: Tensor) -> None:
    """One decode token into a RocketKVCache layer (reference.append), in place: on CUDA one
    Triton launch, elsewhere the reference. Opaque to Inductor: as a triton_op traced by Inductor
    (torch 2.11) its in-place writes to graph inputs were lost; an opaque mutating op keeps them."""
    state = (keys, values, key_min, key_max, lengths, positions, new_key, new_value)
    if keys.device.type == "cuda":
        triton_decode.append(*state)
    else:
        reference.append(*state)


@torch.library.custom_op("rocketkv::static_cache", mutates_args=())
def static_cache(key: Tensor, value: Tensor, capacity: int, chunk: int, prompt_len: int
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """A RocketKVCache layer's state holding `key`/`value` (the prompt, or what a policy kept of
    it), with positions continuing at `prompt_len`."""
    return reference.static_cache(key, value, capacity, chunk, prompt_len)


@torch.library.custom_op("rocketkv::extend_cache", mutates_args=())
def extend_cache(keys: Tensor, values: Tensor, key_min: Tensor, key_max: Tensor, lengths: Tensor,
                 positions: Tensor, new_key: Tensor, new_value: Tensor, room: int
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """A RocketKVCache layer's state with several new tokens per sequence after its stored ones
    (a new turn), in new buffers with `room` more slots."""
    return reference.extend_cache(keys, values, key_min, key_max, lengths, positions, new_key,
                                  new_value, room)


@extend_cache.register_fake
def _(keys, values, key_min, key_max, lengths, positions, new_key, new_value, room):
    return _fake_state(keys, values,
                       *reference.extended_size(keys, key_min, new_key.shape[2], room))


def _fake_state(key, value, capacity, chunk):
    B, H, _, D = key.shape
    capacity, chunks = reference.state_size(capacity, chunk)
    lengths = key.new_empty(B, dtype=torch.int32)
    return (key.new_empty(B, H, capacity, D), value.new_empty(B, H, capacity, value.shape[-1]),
            key.new_empty(B, H, chunks, D), key.new_empty(B, H, chunks, D), lengths,
            key.new_empty(B, dtype=torch.int64))


@static_cache.register_fake
def _(key, value, capacity, chunk, prompt_len):
    return _fake_state(key, value, capacity, chunk)
