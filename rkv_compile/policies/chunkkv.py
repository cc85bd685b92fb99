"""ChunkKV: SnapKV's votes, kept and evicted in chunks of consecutive tokens.

Liu et al., "ChunkKV: Semantic-Preserving KV Cache Compression for Efficient Long-Context LLM
Inference", arXiv 2502.00299.
"""
from __future__ import annotations

import dataclasses

from ..kernels import reference
from .base import Policy, check_int, register


@register
@dataclasses.dataclass(frozen=True)
class ChunkKV(Policy):
    """The window's attention votes (SnapKV's, unpooled), summed over each chunk of
    `chunk_size` consecutive prompt tokens (the paper's 10); whole chunks are kept, best first,
    so that phrases stay together (the last chunk the budget reaches may be cut: its earliest
    tokens are kept), and the window; decode is exact. Layer-wise index reuse: each group of
    `reuse_layers` consecutive layers keeps the positions its first layer selects (1: every
    layer selects its own; the paper finds 2 costs little accuracy for half the scoring work)."""

    chunk_size: int = 10
    reuse_layers: int = 1

    name = "chunkkv"

    def __post_init__(self):
        super().__post_init__()
        check_int("chunk_size", self.chunk_size, 1)
        check_int("reuse_layers", self.reuse_layers, 1)

    def reuses(self, layer: int) -> int | None:
        return layer - layer % self.reuse_layers if layer % self.reuse_layers else None

    def prompt_scores(self, query_window, key, mask, scale):
        votes = reference.snapkv_votes(query_window, key, mask, scale, 1)     # B H n-w
        # every token of a chunk gets its chunk's total: the stable top-k keeps whole chunks
        return reference.chunk_scores(votes, self.chunk_size)
