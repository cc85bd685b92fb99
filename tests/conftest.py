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
