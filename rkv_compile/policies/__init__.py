"""KV-cache methods, one small class per method (base.py has what they share), by option name."""
from .base import REGISTRY as POLICIES, Plan, Policy, from_spec
from .full import Full
from .oracle_topk import OracleTopK
from .rocketkv import RocketKV
from .snapkv import SnapKV

__all__ = ["POLICIES", "Full", "OracleTopK", "Plan", "Policy", "RocketKV", "SnapKV", "from_spec"]
