"""RocketKV-MT: RocketKV for multi-turn conversations.

Behnam et al., "RocketKV: Accelerating Long-Context LLM Inference via Two-Stage KV Cache
Compression", ICML 2025, arXiv 2502.14051 (the multi-turn variant of its evaluation).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor

from ..kernels import reference
from .base import register
from .rocketkv import RocketKV


def whole_view(key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The view of a cache nothing was selected from (its prompt fit the budget): every token,
    at its own position."""
    B, H, n = key.shape[:3]
    return key, value, torch.arange(n, device=key.device).expand(B, H, n).contiguous()


@register
@dataclasses.dataclass(frozen=True)
class RocketKVMultiTurn(RocketKV):
    """RocketKV whose cache keeps every token, so that a later turn may need any of them.

    Each prefill (the first prompt, and each new turn over the whole history) runs stage 1 over
    every stored token, voted by its last `window_size` queries, into a compressed view; each
    decode step adds its token to the view and runs stage 2 over it. Memory is full KV's; the
    tokens read per step are RocketKV's.
    """

    name = "rocketkv-mt"
    state = "view"
    triton = ""
    decode_kind = "stage-2 hybrid sparse attention over the view stage 1 kept at the last prefill"

    def view_decode(self, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None,
                    scale: float, chunk: int, dims: int, topk: int, view_key: Tensor,
                    view_value: Tensor, view_positions: Tensor
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One decode step: (output, the view with this step's token added: keys, values and
        positions in the whole cache). `key`/`value` are the whole cache, this token last.

        Where the site's mask hides a token of the view (padding, a window), attention is exact
        over the whole cache instead: a view mask would differ per KV head."""
        n = key.shape[2] - 1
        view_key = torch.cat([view_key, key[:, :, n:]], dim=2)
        view_value = torch.cat([view_value, value[:, :, n:]], dim=2)
        view_positions = torch.cat([view_positions, torch.full_like(view_positions[..., :1], n)],
                                   dim=-1)
        extra = reference.additive_mask(mask)
        if extra is not None:
            B, H = view_positions.shape[:2]
            last = extra[:, :, -1, :].expand(B, H, n + 1)   # the mask row of this token
            if bool(torch.isneginf(last.gather(-1, view_positions)).any()):
                out = F.scaled_dot_product_attention(
                    query, key, value, attn_mask=extra.to(query.dtype), scale=scale,
                    enable_gqa=query.shape[1] != key.shape[1])
                return out, view_key, view_value, view_positions
        out = reference.sparse_decode(query, view_key, view_value, None, scale, chunk, dims, topk)
        return out, view_key, view_value, view_positions
