import os
import sys

import pytest
import torch

# GPU-only tests, run on the device machine (from the repository root):
#   PYTHONPATH=. python3 -m pytest -q tests/test_triton_decode.py tests_gpu
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
