"""How rkv_compile tells people what it did: the `rkv_compile` logger, warnings given once, and
the CUDA graphs recorded (for the benchmarks and the GPU tests)."""
from __future__ import annotations

import logging
import warnings

log = logging.getLogger("rkv_compile")
_WARNED: set[str] = set()   # warnings given (once per process)


def warn_once(message: str) -> None:
    """A RuntimeWarning the user sees once per process (a prefill and a decode graph, or every
    prompt of an eval loop, would give the same one)."""
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def recorded_cuda_graphs() -> int:
    """CUDA graphs Inductor's cudagraph trees hold on the current device (every node of every
    tree): one per decode graph and cache address it was recorded for."""
    import torch
    from torch._inductor import cudagraph_trees
    if not torch.cuda.is_available():
        return 0
    manager = cudagraph_trees.get_container(torch.cuda.current_device()).tree_manager
    if manager is None:
        return 0
    count, todo = 0, [n for nodes in manager.roots.values() for n in nodes]
    while todo:
        node = todo.pop()
        count += 1
        todo.extend(n for nodes in node.children.values() for n in nodes)
    return count
