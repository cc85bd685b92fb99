"""ChunkKV: SnapKV's votes, kept and evicted in chunks of consecutive tokens.

Liu et al., "ChunkKV: Semantic-Preserving KV Cache Compression for Efficient Long-Context LLM
Inference", arXiv 2502.00299.
"""
from __future__ import annotations

import dataclasses

import torch.nn.functional as F

from ..kernels import reference
from .base import Policy, check_int, register


@register
@dataclasses.dataclass(frozen=True)
class ChunkKV(Policy):
    """The window's attention votes (SnapKV's, unpooled), summed over each chunk of
    `chunk_size` consecutive prompt tokens (the paper's 10); whole chunks are kept, best first,
    so that phrases stay together (the last chunk the budget reaches may be cut: its earliest
    tokens are kept), and the window; decode is exact. Not built: the paper's layer-wise index
    reuse, a saving of scoring work that leaves accuracy as is or lowers it."""

    chunk_size: int = 10

    name = "chunkkv"

    def __post_init__(self):
        check_int("chunk_size", self.chunk_size, 1)

    def prompt_scores(self, query_window, key, mask, scale):
        votes = reference.snapkv_votes(query_window, key, mask, scale, 1)     # B H n-w
        n = votes.shape[-1]
        chunks = -(-n // self.chunk_size)
        padded = F.pad(votes.nan_to_num(0.0, neginf=0.0), (0, chunks * self.chunk_size - n))
        totals = padded.view(*votes.shape[:-1], chunks, self.chunk_size).sum(-1)
        # every token of a chunk gets its chunk's total: the stable top-k keeps whole chunks
        scores = totals.repeat_interleave(self.chunk_size, dim=-1)[..., :n]
        return scores.masked_fill(votes.isneginf(), float("-inf"))
