"""RocketKVCache: the static-shape fast path of RocketKV for transformers models.

Each layer keeps capacity-sized buffers (K, V, the per-chunk min/max summaries of K that stage 2
reads), and per sequence its stored length and its logical position. Decode steps write one token
in place (`rocketkv::append_`, one Triton launch on CUDA that also updates the token's chunk
summary), so every step has the same shapes and can be captured in a CUDA graph. A new turn
(several tokens after decoding: `generate` again with the conversation so far) goes into new
buffers holding the stored tokens and the turn's (`rocketkv::extend_cache`); under the backend,
stage 1 then runs again over them (plain rocketkv's multi-turn).

Without the ``rocketkv`` backend the cache is exact: the prompt is stored whole with room for
`max_new_tokens`. Under the backend, the pass turns the prompt store into stage 1: the layer then
holds the plan's capacity, and decode attention runs stage 2 over the stored slots.

The physical slots hold fewer tokens than the logical sequence after eviction. transformers builds
one mask per forward from `get_mask_sizes`: with kv_offset = (evicted tokens), its causal rule
`slot + offset <= position` admits exactly the stored slots. `get_seq_length` is logical, as
positions need.

A left-padded batch under the backend stores each row apart: its own selection of its own
tokens, left-aligned, with its own length (padding is never stored). One mask offset cannot
serve rows of different lengths, so the pass's decode attends to each row's first `lengths[b]`
slots instead of through transformers' mask.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .backend import PLAN_ATTR
from .kernels import ops  # noqa: F401  (torch.ops.rocketkv)
from .kernels.reference import extended_size


STATE = ("keys", "values", "key_min", "key_max", "lengths", "positions")


class RocketKVLayer(CacheLayerMixin):
    is_compileable = True
    is_sliding = False

    def __init__(self, max_new_tokens: int):
        super().__init__()
        self.max_new_tokens = max_new_tokens

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            # The prompt: attended exactly, then stored (the rocketkv pass compresses it here).
            self.lazy_initialization(key_states, value_states)
            (self.keys, self.values, self.key_min, self.key_max, self.lengths,
             self.positions) = torch.ops.rocketkv.static_cache(
                key_states, value_states, key_states.shape[2] + self.max_new_tokens, 0,
                key_states.shape[2])
            return key_states, value_states
        if key_states.shape[2] != 1:
            # A new turn: the stored tokens and the turn's, attended exactly (the rocketkv pass
            # then runs stage 1 over them into the plan's buffers).
            (self.keys, self.values, self.key_min, self.key_max, self.lengths,
             self.positions) = torch.ops.rocketkv.extend_cache(
                self.keys, self.values, self.key_min, self.key_max, self.lengths, self.positions,
                key_states, value_states, self.max_new_tokens)
            return self.keys, self.values
        torch.ops.rocketkv.append_(self.keys, self.values, self.key_min, self.key_max,
                                   self.lengths, self.positions, key_states, value_states)
        return self.keys, self.values

    def get_seq_length(self):
        """The logical length (positions continue from it), a 0-dim tensor once filled."""
        return self.positions[0] if self.is_initialized else 0

    def get_mask_sizes(self, query_length: int):
        if not self.is_initialized:
            return query_length, 0
        slots = extended_size(self.keys, self.key_min, query_length, self.max_new_tokens)[0] \
            if query_length > 1 else self.keys.shape[2]   # a new turn: its new buffers
        return slots, self.positions[0] - self.lengths[0]

    def get_max_length(self) -> int:
        return self.keys.shape[2] if self.is_initialized else -1

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Each sequence `repeats` times in the batch (several continuations of one prompt)."""
        self._map_state(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the sequences at `indices`."""
        self._map_state(lambda t: t[indices])

    def _map_state(self, fn) -> None:
        if not self.is_initialized:
            return
        rows = fn(torch.arange(self.keys.shape[0], device=self.keys.device)).tolist()  # old rows
        for name in STATE:
            old = getattr(self, name)
            new = fn(old).contiguous()
            new.__dict__.update(old.__dict__)  # what the backend put on the state: plan, marks
            plan = getattr(old, PLAN_ATTR, None)
            if isinstance(plan, tuple):   # a plan per row (rows evicted apart): they move too
                setattr(new, PLAN_ATTR, tuple(plan[row] for row in rows))
            setattr(self, name, new)

    def reset(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False


class RocketKVCache(Cache):
    """A transformers Cache with RocketKV's static layout, for `generate(past_key_values=...)`.

    max_new_tokens: the tokens that will be generated; each layer has room for them. Pass
    `disable_compile=True` to generate on CUDA so that it does not wrap the forward in its own
    torch.compile.
    """

    def __init__(self, config, max_new_tokens: int):
        text = config.get_text_config(decoder=True)
        sliding = [t for t in getattr(text, "layer_types", None) or [] if t != "full_attention"]
        if sliding:
            raise NotImplementedError(f"RocketKVCache supports full-attention layers only "
                                      f"(this model has {sorted(set(sliding))})")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
                or max_new_tokens < 1:
            raise ValueError(f"RocketKVCache: max_new_tokens must be an int >= 1 "
                             f"(got {max_new_tokens!r})")
        super().__init__(layers=[RocketKVLayer(max_new_tokens)
                                 for _ in range(text.num_hidden_layers)])
