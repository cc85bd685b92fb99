"""What the kernel tests share: where they run and the dtypes that can be tested there.

On the CPU, Triton's interpreter (conftest.py) runs float32, float16 and bfloat16 (conftest.py
makes its bfloat16 `tl.dot` and float32 -> bfloat16 cast do what a GPU does). On a GPU
each example compiles the kernels for its shapes: RKV_GPU_EXAMPLES lowers the examples a test
draws there, for a short device session (default 60).
"""
import os

import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GPU_EXAMPLES = int(os.environ.get("RKV_GPU_EXAMPLES", "60"))


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """|got - want| / |want| over the whole tensor, in float64."""
    return float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30))
