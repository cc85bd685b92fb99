"""How rkv_compile tells people what it did: the `rkv_compile` logger, and warnings given once."""
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
