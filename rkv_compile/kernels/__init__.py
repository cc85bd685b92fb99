"""RocketKV ops: ``torch.ops.rocketkv.*`` (registered on import) and their PyTorch reference."""
from . import ops, reference  # noqa: F401  (registers torch.ops.rocketkv)
