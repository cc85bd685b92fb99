"""A decode graph's compile tunes only the kernels that read weights (`tuning.weight_reads_only`):
Inductor's kernel codegen sees `coordinate_descent_tuning` on for a GEMV-sized kernel and off
for a norm or a pointwise kernel, never on where the compile did not ask for tuning, and torch
is left as it was. (Inductor generates Triton kernels only on a GPU: its codegen is replaced
by a recorder here; tests_gpu compiles a real decode graph.)"""
import pytest
import sympy
from torch._inductor import config
from torch._inductor.codegen.triton import TritonKernel

from rkv_compile.kernels import tuning


class Kernel:
    def __init__(self, **numels):
        self.numels = {prefix: sympy.Integer(n) for prefix, n in numels.items()}


@pytest.fixture
def codegen(monkeypatch):
    """Inductor's kernel codegen replaced by one that records the tuning flag it sees."""
    seen = []

    def record(self, name=None):
        seen.append(config.coordinate_descent_tuning)
        return "source"

    monkeypatch.setattr(TritonKernel, "codegen_kernel", record)
    return seen


@pytest.mark.parametrize("numels, tuned", [
    ({"x": 14336, "r0_": 4096}, True),     # an MLP projection of an 8B model at batch 1
    ({"x": 128256, "r0_": 576}, True),     # a small model's LM head
    ({"x": 1024, "r0_": 1024}, True),      # the smallest weight tuned
    ({"x": 1, "r0_": 4096}, False),        # an RMSNorm at batch 1
    ({"x": 14336}, False),                 # SiLU times the up projection
    ({"x": 1023, "r0_": 1024}, False),
])
def test_only_kernels_as_large_as_a_weight_are_tuned(codegen, numels, tuned):
    with config.patch(coordinate_descent_tuning=True), tuning.weight_reads_only():
        assert TritonKernel.codegen_kernel(Kernel(**numels)) == "source"
    assert codegen == [tuned]


def test_a_compile_that_asks_for_no_tuning_gets_none(codegen):
    with config.patch(coordinate_descent_tuning=False), tuning.weight_reads_only():
        TritonKernel.codegen_kernel(Kernel(x=14336, r0_=4096))
    assert codegen == [False]


def test_a_kernel_without_sizes_stays_tuned(codegen):
    with config.patch(coordinate_descent_tuning=True), tuning.weight_reads_only():
        TritonKernel.codegen_kernel(object())
    assert codegen == [True]


def test_torch_is_restored_after_a_compile(codegen):
    before = TritonKernel.codegen_kernel
    with pytest.raises(RuntimeError):
        with tuning.weight_reads_only():
            assert TritonKernel.codegen_kernel is not before
            raise RuntimeError("a failed compile")
    assert TritonKernel.codegen_kernel is before
    assert config.coordinate_descent_tuning is False
