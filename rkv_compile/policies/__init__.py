"""KV-cache methods, one small class per method (base.py has what they share), by option name."""
from .base import REGISTRY as POLICIES, Plan, Policy, from_spec
from .chunkkv import ChunkKV
from .full import Full
from .h2o import H2O
from .kvquant import KVQuant
from .oracle_topk import OracleTopK
from .pyramidkv import PyramidKV
from .quest import Quest
from .rocketkv import RocketKV
from .rocketkv_fine import RocketKVFine
from .rocketkv_mt import RocketKVMultiTurn
from .shotkv import ShotKV
from .snapkv import SnapKV
from .sparq import SparQ
from .streamingllm import StreamingLLM

__all__ = ["POLICIES", "ChunkKV", "Full", "H2O", "KVQuant", "OracleTopK", "Plan", "Policy",
           "PyramidKV", "Quest", "RocketKV", "RocketKVFine", "RocketKVMultiTurn", "ShotKV", "SnapKV", "SparQ", "StreamingLLM",
           "from_spec"]
