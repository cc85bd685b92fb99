"""SparQ Attention: approximate scores from the query's largest components, then top-k.

Ribar et al., "SparQ Attention: Bandwidth-Efficient LLM Inference", ICML 2024, arXiv 2312.04985.
"""
from __future__ import annotations

import dataclasses

import torch

from ..kernels import reference
from .base import Policy, register


@register
@dataclasses.dataclass(frozen=True)
class SparQ(Policy):
    """No eviction. At each decode step, per KV head and its GQA group of query heads:
    1. the r dims with the largest mean |q| over the group; each query head's approximate
       scores s = softmax(q[r] . K[:, r] / sqrt(D |q[r]|_1 / |q|_1)) (the paper's temperature);
    2. the k tokens with the best group-mean s; exact attention over them, y;
    3. mean-value reallocation: with a = the s mass of those k tokens, a y + (1 - a) mean(V)
       (V averaged over the stored tokens).
    Budget, in tokens' worth of reads (one token = its key and value, 2D numbers): k = B/2
    tokens, and r = B D / L dims of each of the L = prompt + max_new_tokens keys for the
    approximation (L r = B D numbers), clamped to 1..D: the split RocketKV's planner makes.
    """

    name = "sparq"
    sparse_decode = True
    triton = "sparq"
    decode_kind = "exact top-k attention (SparQ scores) with mean-value reallocation"

    def plan(self, prompt_len, head_dim, layer=0, layers=1):
        length = prompt_len + self.max_new_tokens
        dims = min(max(round(self.token_budget * head_dim / length), 1), head_dim)
        # chunk 1: each token its own bound, which is its key (the Triton kernels' reading)
        return self.keep_all(prompt_len, topk=self.token_budget // 2, chunk=1, dims=dims)

    def read_bytes(self, stored, generated, plan, head_dim, itemsize, group):
        """r dims of every key and the top-k tokens' keys and values; mean(V) as the paper
        keeps it, a running mean (one row: the reference recomputes it from every value)."""
        n = stored + generated
        return round((n * plan.dims + min(plan.topk, n) * 2 * head_dim + head_dim)
                     * self.entry_bytes(itemsize))

    def decode(self, query, key, value, mask, scale, chunk, dims, topk):
        B, H, n, D = key.shape
        q = reference.group_queries(query, H)[:, :, :, -1]                      # B H G D
        G = q.shape[2]
        top_dims = q.abs().mean(2).topk(dims, dim=-1).indices                   # B H r
        q_r = q.gather(-1, top_dims.unsqueeze(2).expand(-1, -1, G, -1))
        k_r = key.float().gather(-1, top_dims.unsqueeze(2).expand(-1, -1, n, -1))
        temperature = (D * q_r.abs().sum(-1) / q.abs().sum(-1)).sqrt().clamp_min(1e-6)
        logits = torch.einsum("bhgr,bhnr->bhgn", q_r, k_r) / temperature.unsqueeze(-1)
        bias = reference.additive_mask(mask)
        live = torch.ones(B, 1, n, device=key.device)
        if bias is not None:
            logits = logits + bias[:, :, -1, :].unsqueeze(2)
            live = (~torch.isneginf(bias[:, :, -1, :])).float().expand(B, 1, n)
        approx = torch.softmax(logits, dim=-1).nan_to_num(0.0)                  # B H G n
        index = reference.select_tokens(approx.mean(2), topk)                    # B H k
        attended = reference.attend_selected(query, key, value, mask, scale, index).float()
        mass = approx.gather(-1, index.unsqueeze(2).expand(-1, -1, G, -1)).sum(-1, keepdim=True)
        mean_value = (value.float() * live.unsqueeze(-1)).sum(2) / live.sum(-1, keepdim=True)
        out = mass * attended.reshape(B, H, G, -1) + (1 - mass) * mean_value.unsqueeze(2)
        return out.reshape(*query.shape[:-1], value.shape[-1]).to(query.dtype)
