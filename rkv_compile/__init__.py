"""rkv_compile: RocketKV KV-cache compression as a torch.compile backend (``backend="rocketkv"``)."""
from .backend import rocketkv
from .config import Plan, RocketKVConfig
from .passes.explain import Report, explain

__all__ = ["Plan", "Report", "RocketKVConfig", "explain", "rocketkv"]
__version__ = "0.1.0"
