"""Inductor's analysis of our Triton kernels, done once per kernel signature, not per call.

Inside a `triton_op`, each launch of a Triton kernel is analysed by torch for the tensors it
reads and writes: it lowers the kernel to Triton IR and walks it (torch's
`triton_kernel_wrap.identify_accessed_tensors`), at AOTAutograd's functionalization and again
at Inductor's lowering. A decode graph of a 32-layer model launches our four stage-2 kernels
in every layer, so the same analysis ran hundreds of times per compile, with the same result:
it depends only on the kernel, its arguments' dtypes and its scalar and constexpr values (the
IR is built over stand-in tensors), and names the kernel's own parameters.
`memoized()` caches it by exactly that key, for our kernels only, while a graph compiles.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator

import torch

# the analysis function, by its name in torch's versions
_ANALYSES = ("identify_accessed_tensors", "identify_mutated_tensors")
_PACKAGE = __name__.rsplit(".", 2)[0]
_results: dict[tuple, Any] = {}
stats = {"analysed": 0, "reused": 0}


def _arg_key(value: Any):
    """What of a kernel argument the analysis can depend on (None: unknown, do not cache)."""
    import sympy
    from torch._inductor.ir import IRNode

    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype)
    if isinstance(value, IRNode):
        return ("tensor", value.get_dtype())
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool, sympy.Expr)):
        return ("symbol",)   # the analysis builds the IR with a stand-in value for these
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype)):
        return ("value", type(value), value)
    return None


def _key(kernel, kwargs: dict, rest: tuple) -> tuple | None:
    fn = getattr(kernel, "fn", kernel)   # an autotuner wraps its JIT function
    if not getattr(fn, "__module__", "").startswith(_PACKAGE) or any(rest):
        return None
    args = tuple(sorted((name, _arg_key(value)) for name, value in kwargs.items()))
    if any(key is None for _, key in args):
        return None
    return (fn.__module__, fn.__qualname__, args)


def _cached(analyse: Callable) -> Callable:
    @functools.wraps(analyse)
    def analysis(kernel, kwargs, *rest):
        key = _key(kernel, kwargs, rest)
        if key is None:
            return analyse(kernel, kwargs, *rest)
        if key in _results:
            stats["reused"] += 1
        else:
            stats["analysed"] += 1
            _results[key] = analyse(kernel, kwargs, *rest)
        return _results[key]
    return analysis


@contextlib.contextmanager
def memoized() -> Iterator[None]:
    """Within: torch's analysis of our kernels is computed once per key (see the module)."""
    from torch._higher_order_ops import triton_kernel_wrap as wrap

    saved = {name: getattr(wrap, name) for name in _ANALYSES if hasattr(wrap, name)}
    for name, analyse in saved.items():
        setattr(wrap, name, _cached(analyse))
    try:
        yield
    finally:
        for name, analyse in saved.items():
            setattr(wrap, name, analyse)
