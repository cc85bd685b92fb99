"""Selection policies, one small class per method, by option name."""
from .rocketkv import Plan, RocketKV

POLICIES = {"rocketkv": RocketKV}

__all__ = ["POLICIES", "Plan", "RocketKV"]
