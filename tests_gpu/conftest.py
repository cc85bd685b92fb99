import os
import sys

# GPU-only tests, run on the device machine: python3 -m pytest -q tests_gpu tests/test_triton_decode.py
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
