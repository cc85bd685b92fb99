"""KV quantization: every token kept, stored through low-bit codes.

In the spirit of KVComp (Jiang et al., "KVComp: A High-Performance, LLM-Aware, Lossy Compression
Framework for KV Cache", arXiv 2509.00579: block-wise, channel-specific quantization), with the
grouping of KIVI (Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache",
ICML 2024, arXiv 2402.02750): keys per channel, values per token.
"""
from __future__ import annotations

import dataclasses

from .base import register
from .full import Full


@register
@dataclasses.dataclass(frozen=True)
class KVQuant(Full):
    """No eviction; the prompt's keys and values are stored through `kv_bits`-bit codes
    (asymmetric, round to nearest): keys with one fp16 scale and zero point per channel over each
    run of `kv_group_size` tokens, values per token over each run of `kv_group_size` channels.
    Decode attends exactly over them. Any policy takes `kv_bits` too, and then quantizes what it
    keeps: {"policy": "rocketkv", "kv_bits": 4}.

    Through the pass the cache holds codes, steps and zeros (`state.Coded`): a quarter of the
    bf16 bytes at 4 bits, plus a step and a zero per group. Generated tokens are stored
    exactly (KIVI's full-precision residual, here up to max_new_tokens long). On CUDA
    decode reads the codes in a flash-decoding kernel that dequantizes them in registers
    (`rocketkv::exact_decode_triton` with bits); on the CPU PyTorch ops dequantize them first. A
    new turn over codes is refused. `rkv eval`'s eager engine computes the bytes (`Policy.kv_bytes`)."""

    kv_bits: int | None = 8

    name = "kvquant"

    def __post_init__(self):
        super().__post_init__()
        if self.kv_bits is None:
            raise ValueError("rocketkv option 'kv_bits' of policy 'kvquant' must be 2, 4 "
                             "or 8, not None")
