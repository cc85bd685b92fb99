"""backend="rocketkv" resolves through the torch_dynamo_backends entry point, with no import."""
import subprocess
import sys

SCRIPT = """
import sys, torch
import torch.nn.functional as F
assert "rkv_compile" not in sys.modules
f = torch.compile(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                  backend="rocketkv", options={"token_budget": 64, "max_new_tokens": 4})
q = torch.randn(1, 2, 8, 16)
torch.testing.assert_close(f(q, q, q), F.scaled_dot_product_attention(q, q, q, is_causal=True))
assert "rkv_compile" in sys.modules   # loaded by Dynamo through the entry point
print("ok")
"""


def test_backend_found_without_import():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
