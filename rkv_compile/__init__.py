"""rkv_compile: RocketKV KV-cache compression as a torch.compile backend (``backend="rocketkv"``)."""
from .backend import rocketkv
from .config import Plan, RocketKVConfig
from .passes.explain import Report, explain
from .state import StoredLayer, stored

__all__ = ["Plan", "Report", "RocketKVConfig", "StoredLayer", "explain", "rocketkv", "stored"]
__version__ = "0.2.0"


def _register_backend_name() -> None:
    """`backend="rocketkv"` without an install (a checkout): an installed package registers the
    name through its torch_dynamo_backends entry point, which Dynamo loads on first use."""
    from torch._dynamo.backends import registry

    if "rocketkv" not in registry._BACKENDS:
        registry.register_backend(rocketkv, name="rocketkv")


_register_backend_name()
