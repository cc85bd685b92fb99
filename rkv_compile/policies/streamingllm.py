"""StreamingLLM: attention sinks and a recent window, after prefill and as tokens are generated.

Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024,
arXiv 2309.17453.
"""
from __future__ import annotations

import dataclasses

import torch

from ..kernels import reference
from .base import Policy, check_int, register


@register
@dataclasses.dataclass(frozen=True)
class StreamingLLM(Policy):
    """The first `sink_size` tokens (the attention sinks; the paper's 4) and the most recent
    `token_budget - sink_size`. The prefill keeps exactly those prompt tokens; each decode step
    attends exactly to the sinks and the `token_budget - sink_size` most recent stored tokens,
    which is the paper's rolling cache as tokens are generated. Two departures, both as kvpress
    does: tokens keep their original positions (the paper re-numbers positions inside the
    cache), and tokens that roll out of the window stay stored until generation ends (the cache
    is sized prompt budget + max_new_tokens, as for every policy here; decode reads
    `token_budget` of them)."""

    sink_size: int = 4

    name = "streamingllm"
    sparse_decode = True
    decode_kind = "exact attention over the sinks and the recent window"

    def __post_init__(self):
        super().__post_init__()
        check_int("sink_size", self.sink_size, 0)
        if self.token_budget is not None and self.token_budget <= self.sink_size:
            raise ValueError(f"rocketkv option 'token_budget' ({self.token_budget}) must exceed "
                             f"streamingllm's 'sink_size' ({self.sink_size})")

    def plan(self, prompt_len, head_dim, layer=0, layers=1):
        # the base plan's prompt budget, and decode reads `token_budget` of the stored tokens
        return dataclasses.replace(super().plan(prompt_len, head_dim), topk=self.token_budget)

    def prompt_scores(self, query_window, key, mask, scale):
        # Recency, the sinks (the first live tokens) above everything; masked tokens never.
        B, H, n = key.shape[:3]
        prefix = n - query_window.shape[-2]
        live = _live_slots(mask, B, n, key.device)[..., :prefix]
        scores = torch.arange(prefix, device=key.device, dtype=torch.float32).expand(B, 1, -1)
        scores = scores.masked_fill(live & (live.cumsum(-1) <= self.sink_size), float("inf"))
        return scores.masked_fill(~live, float("-inf")).expand(B, H, -1)

    def decode(self, query, key, value, mask, scale, chunk, dims, topk):
        B, H, n = key.shape[:3]
        live = _live_slots(mask[..., -1:, :] if mask is not None else None, B, n, key.device)
        first = live & (live.cumsum(-1) <= self.sink_size)
        last = live & (live.flip(-1).cumsum(-1).flip(-1) <= topk - self.sink_size)
        # exactly the window's slots rank first (in slot order): the rest are masked or unread
        index = reference.select_tokens((first | last).float().expand(B, H, n), topk)
        return reference.attend_selected(query, key, value, mask, scale, index).contiguous()


def _live_slots(mask, batch: int, n: int, device) -> torch.Tensor:
    """(B, 1, n): the slots some query row of `mask` may attend to."""
    bias = reference.additive_mask(mask)
    if bias is None:
        return torch.ones(batch, 1, n, dtype=torch.bool, device=device)
    return (~torch.isneginf(bias)).any(-2).expand(batch, 1, n)
