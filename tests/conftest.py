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


def _interpreter_dot_takes_bfloat16():
    """Triton's interpreter keeps a bfloat16 tensor as its raw 16 bits (numpy uint16), and its
    tl.dot multiplies those bits as integers (a 16 x 16 product came out 4.5e9 times too
    large, triton 3.7.1). Its dot converts them to float32 first here, as tensor cores take
    bfloat16, so the kernels' bfloat16 paths are tested on the CPU too (tests/devices.py)."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    dot = interpreter.InterpreterBuilder.create_dot

    def as_float32(x):
        if x.dtype.scalar != tl.bfloat16:
            return x
        data = interpreter._convert_float(x.data, tl.bfloat16, tl.float32, None)
        return interpreter.TensorHandle(data.view(np.float32), tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return dot(self, as_float32(a), as_float32(b), d, input_precision, max_num_imprecise_acc)

    interpreter.InterpreterBuilder.create_dot = create_dot


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_dot_takes_bfloat16()
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
