"""``rkv_compile.explain``: what the pass does with every attention site of a function."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import warnings
from typing import Callable

import torch

from .rewrite import SiteDecision


@dataclasses.dataclass
class SiteReport:
    graph: int
    site: str
    kind: str
    kv_source: str
    query_len: str
    rewritten: bool
    action: str     # what is done (the catalogue entry's words), or why the site stays exact

    @classmethod
    def of(cls, graph: int, d: SiteDecision) -> "SiteReport":
        action = d.rewrite.action(d) if d.rewritten else d.reason
        return cls(graph, d.site.name, d.site.kind, d.key.source.value, str(d.query_len),
                   d.rewritten, action)


@dataclasses.dataclass
class Report:
    sites: list[SiteReport]

    @property
    def rewritten(self) -> list[SiteReport]:
        return [s for s in self.sites if s.rewritten]

    @property
    def exact(self) -> list[SiteReport]:
        return [s for s in self.sites if not s.rewritten]

    def __str__(self) -> str:
        head = ("graph", "site", "kind", "kv source", "q len", "rewritten", "action / reason")
        rows = [head] + [(str(s.graph), s.site, s.kind, s.kv_source, s.query_len,
                          "yes" if s.rewritten else "no", s.action) for s in self.sites]
        widths = [max(len(r[i]) for r in rows) for i in range(len(head) - 1)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows]
        if not self.sites:
            lines.append("(no attention site found: the function runs exactly as compiled)")
        return "\n".join(lines)


def explain(fn: Callable, *args, options: dict | None = None, **kwargs) -> Report:
    """Run `fn(*args, **kwargs)` under the rocketkv pass and report every attention site.

    Every graph Dynamo captures during the call is analysed (a `generate` call gives a prefill
    and a decode graph). Rewritten graphs run eagerly, not through Inductor, so this is quick.
    `options` are the backend options (as for torch.compile).

    A model's own `generate` (`explain(model.generate, ids, max_new_tokens=3)`) runs as users
    run it: its forward compiled (`model.forward = torch.compile(model.forward, ...)`), its
    Python loop not. That reports the graphs the usage compiles, and skips tracing generate's
    loop, which takes Dynamo longer than the model (SmolLM2: about a minute on a CPU).
    """
    from ..backend import forward_compiled, make_backend

    reports: list[SiteReport] = []

    def record(decisions):
        graph = 1 + max((r.graph for r in reports), default=0)
        reports.extend(SiteReport.of(graph, d) for d in decisions)

    backend = make_backend(compiler=lambda gm, _: gm.forward, on_analysis=record)

    def recording(gm, example_inputs):
        return backend(gm, example_inputs, options=options)

    model = getattr(fn, "__self__", None)
    with _dynamo_quiet():
        if isinstance(model, torch.nn.Module) and getattr(fn, "__name__", "") == "generate":
            with forward_compiled(model, recording):
                fn(*args, **kwargs)
        else:
            torch.compile(fn, backend=recording)(*args, **kwargs)
    return Report(reports)


@contextlib.contextmanager
def _dynamo_quiet():
    """Dynamo's own warnings while it traces `fn` (the graph breaks of generate's Python loop,
    say) are not about attention: the report is what this call is for."""
    logger = logging.getLogger("torch._dynamo")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Dynamo", category=UserWarning)
            yield
    finally:
        logger.setLevel(level)
