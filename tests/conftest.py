import os
import tempfile

import torch

# Before the kernels are decorated: without a GPU they run in Triton's interpreter. One Inductor
# cache is shared by the whole run (cold CPU compiles cost ~10 s a graph).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), "rkv-inductor"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402


def _interpreter_takes_bfloat16():
    """Triton's interpreter keeps a bfloat16 tensor as its raw 16 bits (numpy uint16): its
    tl.dot multiplies those bits as integers (a 16 x 16 product came out 4.5e9 times too
    large, triton 3.7.1), and its float32 -> bfloat16 cast truncates where a GPU and torch
    round to nearest even. Both are done as on a GPU here, so the kernels' bfloat16 paths are
    tested on the CPU too (tests/devices.py)."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    dot, cast = builder.create_dot, builder.cast_impl

    def as_float32(x):
        if x.dtype.scalar != tl.bfloat16:
            return x
        data = interpreter._convert_float(x.data, tl.bfloat16, tl.float32, None)
        return interpreter.TensorHandle(data.view(np.float32), tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return dot(self, as_float32(a), as_float32(b), d, input_precision, max_num_imprecise_acc)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar != tl.float32 or dst_type.scalar != tl.bfloat16:
            return cast(self, src, dst_type)
        bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32)
        nearest_even = ((bits >> 16) & 1) + 0x7FFF
        rounded = np.where(np.isnan(src.data), bits | 0x400000, bits + nearest_even)
        return interpreter.TensorHandle((rounded >> 16).astype(np.uint16), tl.bfloat16)

    builder.create_dot, builder.cast_impl = create_dot, cast_impl


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_takes_bfloat16()
from hypothesis import settings  # noqa: E402

# CI draws the same examples every run (no flaky draws); local runs keep exploring.
settings.register_profile("rkv", deadline=None, derandomize=bool(os.environ.get("CI")))
settings.load_profile("rkv")


@pytest.fixture(autouse=True)
def fresh_dynamo(monkeypatch):
    """Each test its own graphs, and rkv_compile's once-per-process warnings given afresh."""
    from rkv_compile import diagnostics

    monkeypatch.setattr(diagnostics, "_WARNED", set())
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
