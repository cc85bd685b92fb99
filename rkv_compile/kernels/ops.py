"""The ``rocketkv`` torch.library ops that rewritten graphs and RocketKVCache call.

Cache ops, over a layer packed as `rkv_compile.state` lays it out (the implementations are
`cache_ops`; on CUDA the append and RocketKV's decode launch Triton kernels):
- `store` (a prompt kept whole, sized by its shapes) and `compress` (a prompt under a policy's
  selection): new packed tensors; the plan decides compress's size at run time, so its fake
  kernel gives it sizes of its own (unbacked: one compiled prefill serves every prompt length;
  only the pass inserts it, after Dynamo has traced);
- `append_`: one decode token into the packed tensors, in place;
- `decode`, `evicting_decode_`, `decode_triton`, `page_decode_triton`, `sparq_decode_triton`
  and `exact_decode_triton`: a decode step's attention over the stored tokens, with each row's
  plan read from its header (the `*_triton` ops take the policy's kv_bits and kv_group_size:
  a quantized layer's codes are dequantized inside the kernels);
- `extend` (a new turn kept whole) and `turn` (a new turn's attention and the policy's
  selection again over the stored tokens and the turn's).
They take the policy as its `spec` string (a custom op takes no Python objects). The
`*_triton` ops are `triton_op`s, which Inductor traces into and schedules with the rest of the
graph on CUDA; the others are opaque custom ops with fake kernels (Dynamo, AOTAutograd and
Inductor trace around them).
`sparse_decode` (the reference stage 2 over plain keys) is what the tests hold the kernels to.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.library import triton_op

from .. import state as S
from ..policies import base as policies   # a module: policies import the reference ops too
from . import cache_ops, reference, triton_decode


def _unbacked_state(key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
    """Fake packed tensors whose sizes the run decides."""
    ctx = torch.library.get_ctx()
    B, H, _, D = key.shape
    dtype = S.packed_dtype(key.dtype)
    return (key.new_empty(B, H, ctx.new_dynamic_size(), D, dtype=dtype),
            key.new_empty(B, H, ctx.new_dynamic_size(), value.shape[-1], dtype=dtype))


@torch.library.custom_op("rocketkv::compress", mutates_args=())
def compress(query_window: Tensor, key: Tensor, value: Tensor, mask: Tensor | None,
             scale: float, room: int, policy: str, layer: int, layers: int, probe: bool,
             reuse: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """A prefill's store under the policy (cache_ops.compress): (packed keys, packed values,
    the kept positions, (B, H, k), -1 past a row's own)."""
    return cache_ops.compress(query_window, key, value, mask, scale, room,
                              policies.from_spec(policy), layer, layers, probe, reuse)


@compress.register_fake
def _(query_window, key, value, mask, scale, room, policy, layer, layers, probe, reuse=None):
    keys, values = _unbacked_state(key, value)
    width = torch.library.get_ctx().new_dynamic_size()
    return keys, values, key.new_empty(key.shape[0], key.shape[1], width, dtype=torch.int64)


@torch.library.custom_op("rocketkv::store", mutates_args=())
def store(key: Tensor, value: Tensor, room: int) -> tuple[Tensor, Tensor]:
    """The whole prompt, exactly, with room for `room` new tokens (cache_ops.store)."""
    return cache_ops.store(key, value, room)


@store.register_fake
def _(key, value, room):
    return _fake_state(key, value, key.shape[2] + room)


def _fake_state(key: Tensor, value: Tensor, slots) -> tuple[Tensor, Tensor]:
    """Fake packed tensors of `slots` slots (no state region)."""
    B, H, _, D = key.shape
    rows = S.Layout.new(slots, False, D, key.element_size()).rows
    dtype = S.packed_dtype(key.dtype)
    return (key.new_empty(B, H, rows, D, dtype=dtype),
            key.new_empty(B, H, rows, value.shape[-1], dtype=dtype))


@torch.library.custom_op("rocketkv::append_", mutates_args=("keys", "values"))
def append_(keys: Tensor, values: Tensor, new_key: Tensor, new_value: Tensor,
            state: str = "") -> None:
    """One decode token per row into a packed layer, in place (cache_ops.append; on CUDA for a
    layer with no state region, one Triton launch). `state`: the policy's state kind."""
    if keys.device.type == "cuda" and not state:
        triton_decode.append_packed(keys, values, new_key, new_value)
    else:
        cache_ops.append(keys, values, new_key, new_value, state)


@torch.library.custom_op("rocketkv::decode", mutates_args=())
def decode(query: Tensor, keys: Tensor, values: Tensor, scale: float, policy: str) -> Tensor:
    """A decode step's attention over a packed layer's stored slots (cache_ops.decode)."""
    return cache_ops.decode(query, keys, values, scale, policies.from_spec(policy))


@decode.register_fake
def _(query, keys, values, scale, policy):
    return query.new_empty(*query.shape[:-1], values.shape[-1])


@torch.library.custom_op("rocketkv::evicting_decode_", mutates_args=("keys",))
def evicting_decode_(query: Tensor, keys: Tensor, values: Tensor, scale: float, policy: str
                     ) -> Tensor:
    """A decode step of a policy that evicts as it decodes (H2O): its attention, and each
    slot's score updated in the layer's state region (cache_ops.evicting_decode)."""
    return cache_ops.evicting_decode(query, keys, values, scale, policies.from_spec(policy))


@evicting_decode_.register_fake
def _(query, keys, values, scale, policy):
    return query.new_empty(*query.shape[:-1], values.shape[-1])


# Each `*_triton` op over a packed layer takes `bits` and `group`, the policy's kv_bits and
# kv_group_size (None: the layer holds no codes).

@triton_op("rocketkv::decode_triton", mutates_args=())
def decode_triton(query: Tensor, keys: Tensor, values: Tensor, scale: float, topk: int,
                  bits: int | None = None, group: int | None = None) -> Tensor:
    """RocketKV's stage 2 over a packed layer through the Triton kernels (CUDA): each row's
    chunk, query dims and topk from its header, `topk` the selection list's length (each row
    attends to the lesser)."""
    return triton_decode.packed_sparse_decode(query, keys, values, scale, topk, bits, group)


@triton_op("rocketkv::page_decode_triton", mutates_args=())
def page_decode_triton(query: Tensor, keys: Tensor, values: Tensor, scale: float, pages: int,
                       page_size: int, bits: int | None = None, group: int | None = None
                       ) -> Tensor:
    """Quest's decode step over a packed layer through the Triton kernels (CUDA): per query
    head the best `pages` pages by their key bounds, then exact attention over them."""
    return triton_decode.packed_page_decode(query, keys, values, scale, pages, page_size, bits,
                                            group)


@triton_op("rocketkv::sparq_decode_triton", mutates_args=())
def sparq_decode_triton(query: Tensor, keys: Tensor, values: Tensor, scale: float, topk: int,
                        bits: int | None = None, group: int | None = None) -> Tensor:
    """SparQ's decode step over a packed layer through the Triton kernels (CUDA): RocketKV's
    stage 2 at chunk 1 over the header's r dims, then mean-value reallocation."""
    return triton_decode.packed_sparq_decode(query, keys, values, scale, topk, bits, group)


@triton_op("rocketkv::exact_decode_triton", mutates_args=())
def exact_decode_triton(query: Tensor, keys: Tensor, values: Tensor, scale: float,
                        bits: int | None = None, group: int | None = None) -> Tensor:
    """Exact attention over each row's stored tokens of a packed layer through the Triton
    flash-decoding kernel (CUDA): what `decode` computes for a policy that decodes exactly,
    reading the stored tokens only (the count from the header), where SDPA reads every slot."""
    return triton_decode.packed_exact_decode(query, keys, values, scale, bits, group)


@torch.library.custom_op("rocketkv::turn", mutates_args=())
def turn(query: Tensor, key: Tensor, value: Tensor, keys: Tensor, values: Tensor, scale: float,
         room: int, policy: str, layer: int, layers: int, reuse: Tensor | None = None
         ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A new turn over a packed layer (cache_ops.turn): (its attention, the new packed keys and
    values, the kept positions)."""
    return cache_ops.turn(query, key, value, keys, values, scale, room,
                          policies.from_spec(policy), layer, layers, reuse)


@turn.register_fake
def _(query, key, value, keys, values, scale, room, policy, layer, layers, reuse=None):
    new_keys, new_values = _unbacked_state(key, value)
    width = torch.library.get_ctx().new_dynamic_size()
    return (query.new_empty(*query.shape[:-1], value.shape[-1]), new_keys, new_values,
            key.new_empty(key.shape[0], key.shape[1], width, dtype=torch.int64))


@torch.library.custom_op("rocketkv::extend", mutates_args=())
def extend(keys: Tensor, values: Tensor, key: Tensor, value: Tensor, room: int
           ) -> tuple[Tensor, Tensor]:
    """A new turn kept whole (cache_ops.extend): packed tensors of slots + turn + room slots."""
    return cache_ops.extend(keys, values, key, value, room, key.dtype)


@extend.register_fake
def _(keys, values, key, value, room):
    return _fake_state(key, value, S.Layout.of(keys, False).slots + key.shape[2] + room)


@torch.library.custom_op("rocketkv::sparse_decode", mutates_args=())
def sparse_decode(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, scale: float,
                  chunk: list[int], dims: list[int], topk: list[int], policy: str) -> Tensor:
    """One sparse decode step of the policy over plain keys, on the reference path (the
    Triton kernels' oracle); chunk, dims, topk: one for every row, or one per row."""
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


@triton_op("rocketkv::sparse_decode_triton", mutates_args=())
def sparse_decode_triton(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None,
                         scale: float, chunk: list[int], dims: list[int], topk: list[int]
                         ) -> Tensor:
    """Stage 2 through the Triton kernels over plain keys (mask: None or boolean)."""
    if len(set(topk)) != 1:
        raise ValueError(f"rocketkv: the Triton decode takes one top-k for every row (got {topk})")
    return triton_decode.sparse_decode(query, key, value, mask, scale, chunk, dims, topk[0])
