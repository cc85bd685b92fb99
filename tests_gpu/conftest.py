import os
import sys

# GPU-only tests, run on the device machine (from the repository root):
#   PYTHONPATH=. python3 -m pytest -q tests/test_triton_decode.py tests_gpu
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
