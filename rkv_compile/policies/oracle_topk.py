"""Oracle top-k: exact attention scores pick the tokens each decode step attends to.

The ceiling for any sparse-attention selection (RocketKV's stage 2, Quest, SparQ) at the same
number of attended tokens; it reads every key to score, so it saves no memory traffic.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from ..kernels import reference
from .base import Policy, register


@register
@dataclasses.dataclass(frozen=True)
class OracleTopK(Policy):
    """No eviction. At each decode step, per KV head: the softmax probabilities of the exact
    logits q.k * scale, averaged over the group's query heads; the `token_budget` most probable
    tokens (ties: earlier slot first); exact attention over them.

    On CUDA this is RocketKV's stage 2 run at chunk 1 over every dim: each slot's bound is its
    key, SparQ's temperature over all dims is sqrt(head_dim), so the approximate logits are the
    exact ones at the usual scale 1/sqrt(head_dim), and the same Triton kernels select and
    attend (at another scale the reference runs)."""

    name = "oracle-topk"
    sparse_decode = True
    triton = "stage2"
    decode_kind = "exact top-k attention (oracle scores)"

    def plan(self, prompt_len, head_dim, layer=0, layers=1):
        return self.keep_all(prompt_len, topk=self.token_budget, chunk=1, dims=head_dim)

    def read_bytes(self, stored, generated, plan, head_dim, itemsize, group):
        """Every stored key (to score), the top-k tokens' values."""
        n = stored + generated
        return round((n + min(plan.topk, n)) * head_dim * self.entry_bytes(itemsize))

    def triton_at(self, scale, head_dim):
        return math.isclose(scale * math.sqrt(head_dim), 1.0, rel_tol=1e-6)

    def decode(self, query, key, value, mask, scale, chunk, dims, topk):
        q = reference.group_queries(query, key.shape[1])[:, :, :, -1]         # B Hkv G D
        logits = torch.einsum("bhgd,bhnd->bhgn", q, key.float()) * scale
        extra = reference.additive_mask(mask)
        if extra is not None:
            logits = logits + extra[:, :, -1:, :]
        scores = torch.softmax(logits, dim=-1).nan_to_num(0.0).mean(2)        # B Hkv n
        index = reference.select_tokens(scores, topk)
        return reference.attend_selected(query, key, value, mask, scale, index).contiguous()
