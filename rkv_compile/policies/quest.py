"""Quest: query-aware page selection over the whole cache.

Tang et al., "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference", ICML 2024,
arXiv 2406.10774.
"""
from __future__ import annotations

import dataclasses

import torch

from ..kernels import reference
from .base import Policy, check_int, register


@register
@dataclasses.dataclass(frozen=True)
class Quest(Policy):
    """No eviction. The cache is cut into pages of `page_size` consecutive slots, each
    summarised by the element-wise min and max of its keys. At each decode step a page's score
    for a query head is the upper bound of q.k over it, sum_d max(q_d min_d, q_d max_d); each
    query head attends exactly to the tokens of its best pages (GQA: per query head, as Quest
    defines it on MHA). As the authors' evaluation runs it: the budget counts attended tokens
    (`token_budget // page_size` pages, at least 3), and the first `dense_layers` layers attend
    to everything. The page summaries are read on top of the budget: 2 L / page_size key-sized
    rows per step (1024 at L = 8K, page 16).
    """

    page_size: int = 16
    dense_layers: int = 2

    name = "quest"
    sparse_decode = True
    triton = "pages"
    decode_kind = "exact attention over the best pages (per query head)"

    def __post_init__(self):
        super().__post_init__()
        check_int("page_size", self.page_size, 1)
        check_int("dense_layers", self.dense_layers, 0)

    def plan(self, prompt_len, head_dim, layer=0, layers=1):
        length = prompt_len + self.max_new_tokens
        pages = -(-length // self.page_size) if layer < self.dense_layers else \
            max(3, self.token_budget // self.page_size)
        return self.keep_all(prompt_len, pages * self.page_size, self.page_size, head_dim)

    def read_bytes(self, stored, generated, plan, head_dim, itemsize, group):
        """Every page's min and max keys, and the pages the `group` query heads pick, keys and
        values: at most each head's own, and never more than every page (heads may pick the
        same pages). A dense layer reads all."""
        n = stored + generated
        if plan.topk >= n:
            return super().read_bytes(stored, generated, plan, head_dim, itemsize, group)
        summaries = 2 * -(-n // plan.chunk) * head_dim
        picked = min(n, group * plan.topk)
        return round((summaries + picked * 2 * head_dim) * self.entry_bytes(itemsize))

    def decode(self, query, key, value, mask, scale, chunk, dims, topk):
        B, H, n, D = key.shape
        Hq = query.shape[1]
        q = query.float()[:, :, -1]                                             # B Hq D
        # each query head selects its own pages: its group's key and value, repeated
        key, value = (t.repeat_interleave(Hq // H, dim=1) for t in (key, value))
        kmin, kmax = reference.chunk_bounds(key, chunk, mask)                   # B Hq P D
        bound = torch.maximum(q.unsqueeze(2) * kmin, q.unsqueeze(2) * kmax).sum(-1)
        live = reference.chunk_live_counts(mask, B, n, chunk, key.device) > 0   # B 1 P
        bound = bound.nan_to_num(0.0).masked_fill(~live, float("-inf"))         # B Hq P
        pages = reference.select_tokens(bound, topk // chunk)                    # B Hq p
        slots = (pages.unsqueeze(-1) * chunk + torch.arange(chunk, device=key.device)).flatten(2)
        index = slots.clamp_max(n - 1)   # the last page may run past the cache: masked below
        k_sel, v_sel = (t.gather(2, index.unsqueeze(-1).expand(-1, -1, -1, t.shape[-1])).float()
                        for t in (key, value))
        logits = torch.einsum("bhd,bhkd->bhk", q, k_sel) * scale
        bias = reference.additive_mask(mask)
        if bias is not None:
            logits = logits + bias[:, :, -1, :].expand(B, Hq, n).gather(-1, index)
        logits = logits.masked_fill(slots >= n, float("-inf"))
        probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
        out = torch.einsum("bhk,bhkd->bhd", probs, v_sel)
        return out.unsqueeze(2).to(query.dtype)
