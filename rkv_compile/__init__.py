"""rkv_compile: RocketKV KV-cache compression as a torch.compile backend (``backend="rocketkv"``).

Importing the package imports no torch: the public names load their modules on first use, so
the ``rkv`` command starts at once (``rkv --help``). The backend name is registered with Dynamo
when Dynamo's backend registry loads (at once if it has loaded already), so
``backend="rocketkv"`` works from a checkout too, where no entry point is installed."""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.2.0"

# Each public name and the module that defines it.
_PUBLIC = {"rocketkv": "backend", "Plan": "config", "RocketKVConfig": "config",
           "Report": "passes.explain", "explain": "passes.explain",
           "StoredLayer": "state", "stored": "state"}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value
    return value


def _rocketkv_by_name(gm, example_inputs, **kwargs):
    """`backend="rocketkv"`: the backend, its modules imported at the first compile."""
    from .backend import rocketkv

    return rocketkv(gm, example_inputs, **kwargs)


_REGISTRY = "torch._dynamo.backends.registry"


def _register(registry) -> None:
    if "rocketkv" not in registry._BACKENDS:
        registry.register_backend(_rocketkv_by_name, name="rocketkv")


class _RegisterWithDynamo(importlib.abc.MetaPathFinder):
    """Registers the backend name right after Dynamo's backend registry is imported."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _REGISTRY:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                _register(module)
            spec.loader.exec_module = exec_module
        return spec


if _REGISTRY in sys.modules:
    _register(sys.modules[_REGISTRY])
elif not any(isinstance(f, _RegisterWithDynamo) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWithDynamo())
