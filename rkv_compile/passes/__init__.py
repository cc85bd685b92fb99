"""FX passes: find attention sites, classify their KV source, rewrite, explain."""
from .explain import Report, explain
from .rewrite import analyse, apply

__all__ = ["Report", "analyse", "apply", "explain"]
