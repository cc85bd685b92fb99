"""The ``rocketkv`` torch.library ops that rewritten graphs call.

`compress` and `sparse_decode` are opaque custom ops running the PyTorch reference on any device,
with fake kernels whose shapes and (contiguous) strides match, so Dynamo, AOTAutograd and Inductor
can trace around them. `sparse_decode_triton` is a `triton_op`: on CUDA, Inductor traces into it
and schedules its Triton kernels with the rest of the graph. (Under Triton's CPU interpreter a
triton_op cannot be traced by torch.compile, so CPU graphs keep the opaque reference ops.)
"""
from __future__ import annotations

import torch
from torch import Tensor

from torch.library import triton_op

from . import reference, triton_decode


@torch.library.custom_op("rocketkv::compress", mutates_args=())
def compress(query_window: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, scale: float,
             keep: int, kernel_size: int) -> tuple[Tensor, Tensor]:
    """Stage 1: the `keep` best-voted prefix tokens per KV head plus the window, as new caches."""
    return reference.compress(query_window, key, value, mask, scale, keep, kernel_size)


@compress.register_fake
def _(query_window, key, value, mask, scale, keep, kernel_size):
    B, H, _, D = key.shape
    kept = keep + query_window.shape[-2]
    return key.new_empty(B, H, kept, D), value.new_empty(B, H, kept, value.shape[-1])


@torch.library.custom_op("rocketkv::sparse_decode", mutates_args=())
def sparse_decode(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, scale: float,
                  chunk: int, dims: int, topk: int) -> Tensor:
    """Stage 2: hybrid sparse attention of one query token per head over the stored cache."""
    return reference.sparse_decode(query, key, value, mask, scale, chunk, dims, topk)


@sparse_decode.register_fake
def _(query, key, value, mask, scale, chunk, dims, topk):
    return query.new_empty(*query.shape[:-1], value.shape[-1])


@triton_op("rocketkv::sparse_decode_triton", mutates_args=())
def sparse_decode_triton(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None,
                         scale: float, chunk: int, dims: int, topk: int,
                         key_min: Tensor | None = None, key_max: Tensor | None = None) -> Tensor:
    """Stage 2 through the Triton kernels (mask: None or boolean): what CUDA decode graphs call.
    key_min/key_max: the cache's chunk summaries of K, if it keeps them (RocketKVCache)."""
    summaries = None if key_min is None else (key_min, key_max)
    return triton_decode.sparse_decode(query, key, value, mask, scale, chunk, dims, topk, summaries)


@triton_op("rocketkv::append_", mutates_args={"keys", "values", "key_min", "key_max", "lengths"})
def append_(keys: Tensor, values: Tensor, key_min: Tensor, key_max: Tensor, lengths: Tensor,
            new_key: Tensor, new_value: Tensor, chunk: int) -> None:
    """One decode token into a RocketKVCache layer: K/V slot, chunk summary, length (in place).
    On CUDA one Triton launch; elsewhere the reference."""
    if keys.device.type == "cuda":
        triton_decode.append(keys, values, key_min, key_max, lengths, new_key, new_value, chunk)
    else:
        reference.append(keys, values, key_min, key_max, lengths, new_key, new_value, chunk)
