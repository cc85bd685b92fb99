"""torch's analysis of a Triton kernel launch inside a `triton_op` (which tensors it reads and
writes) is cached per kernel signature while our graphs compile (`kernel_analysis.memoized`):
once for the 32 layers of a model, not once per layer. The cache must never answer for another
signature or another's kernel, and must leave torch as it was."""
import pytest
import torch
import triton
import triton.language as tl
from torch._higher_order_ops import triton_kernel_wrap as wrap

from rkv_compile.kernels import kernel_analysis, triton_decode


@triton.jit
def foreign_kernel(x_ptr, n, BLOCK: tl.constexpr):   # a user's kernel, not ours
    tl.store(x_ptr + tl.arange(0, BLOCK), tl.zeros([BLOCK], tl.float32), mask=tl.arange(0, BLOCK) < n)


@pytest.fixture
def analyses(monkeypatch):
    """torch's analysis replaced by a recorder (the real one needs a GPU to lower the kernel)."""
    calls = []
    name = next(n for n in kernel_analysis._ANALYSES if hasattr(wrap, n))

    def analyse(kernel, kwargs, tma_descriptor_metadata):
        calls.append((kernel, dict(kwargs)))
        return object()   # a fresh result per real analysis

    monkeypatch.setattr(wrap, name, analyse)
    monkeypatch.setattr(kernel_analysis, "_results", {})
    return name, calls


def test_one_analysis_per_signature_of_our_kernels(analyses):
    name, calls = analyses
    ours = triton_decode._select_kernel
    a, b = torch.empty(4, dtype=torch.bfloat16), torch.empty(8, dtype=torch.bfloat16)
    with kernel_analysis.memoized():
        analysis = getattr(wrap, name)
        first = analysis(ours, {"x": a, "n": 5, "BLOCK": 16}, {})
        layers = [analysis(ours, {"x": b, "n": 5, "BLOCK": 16}, {}) for _ in range(31)]
        other_dtype = analysis(ours, {"x": a.float(), "n": 5, "BLOCK": 16}, {})
        other_value = analysis(ours, {"x": a, "n": 5, "BLOCK": 32}, {})
        theirs = [analysis(foreign_kernel, {"x_ptr": a, "n": 5, "BLOCK": 16}, {})
                  for _ in range(2)]
    assert all(result is first for result in layers)   # the same answer for every layer
    assert len({id(first), id(other_dtype), id(other_value)}) == 3
    assert theirs[0] is not theirs[1]                  # a user's kernel is never cached
    assert len(calls) == 5


def test_torch_is_restored_after_a_compile(analyses):
    name, _ = analyses
    before = getattr(wrap, name)
    with pytest.raises(RuntimeError):
        with kernel_analysis.memoized():
            assert getattr(wrap, name) is not before
            raise RuntimeError("a failed compile")
    assert getattr(wrap, name) is before
