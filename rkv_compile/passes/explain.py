"""``rkv_compile.explain``: what the pass does with every attention site of a function."""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from .causal_mask import CausalProof
from .kv_source import KVSource
from .rewrite import SiteDecision


@dataclasses.dataclass
class SiteReport:
    graph: int
    site: str
    kind: str
    kv_source: str
    query_len: str
    rewritten: bool
    action: str     # what is done, or why the site stays exact

    @classmethod
    def of(cls, graph: int, d: SiteDecision) -> "SiteReport":
        p, name = d.plan, d.method.name
        if d.phase == "prefill":
            rewrites = d.method.rewrites_prompt(d.prompt_len, p)
            kept = (f"the {min(p.prompt_budget, d.prompt_len)} tokens {name} keeps"
                    + (f", quantized to {d.method.kv_bits} bits" if d.method.kv_bits else "")
                    if rewrites else "the whole prompt (within the budget)")
        if d.phase == "prefill" and d.key.source is KVSource.NEW_ROCKETKV:
            action = (f"prefill: exact attention; the RocketKVCache stores {kept} in "
                      f"{d.capacity}-token buffers")
        elif d.phase == "prefill" and d.method.keeps_history:
            action = (f"prefill: exact attention; the cache keeps every token, and decode reads "
                      f"a view of {kept}")
        elif d.phase == "prefill":
            action = (f"prefill: exact attention; the cache stores {kept}"
                      + (" (committed by the first rewritten decode step)" if rewrites else ""))
        if d.phase == "prefill":
            action += _mask_note(d)
        elif d.phase == "turn":
            action = (f"new turn: exact attention over the stored tokens and the turn's; then "
                      f"{name} selects again over them all (the kept history and the turn), "
                      f"voted by the turn's last {d.method.observed_queries(int(d.query_len))} "
                      "queries, into buffers the conversation's length sizes (planned at run "
                      "time: the graph runs uncompiled)")
        elif d.phase == "decode" and d.kernel == "exact" and d.key.source is KVSource.ROCKETKV:
            action = (f"decode: {name}, exact attention over each row's stored slots of this "
                      "layer (their own lengths: layers and the rows of a padded batch keep "
                      "different numbers of tokens)")
        elif d.phase == "decode" and d.kernel == "exact":
            action = f"decode: {name}, exact attention over the kept tokens (unchanged)"
        elif d.phase == "decode" and d.method.keeps_history:
            action = (f"decode: {name}, {d.method.decode_kind} (the PyTorch reference op, the "
                      "graph uncompiled: the view enters as inputs Dynamo never traced)")
        elif d.phase == "decode" and d.method.decode_state:
            action = (f"decode: {name}, {d.method.decode_kind} (the PyTorch reference op, the "
                      "graph uncompiled: its state, a score per stored token, enters as an input "
                      "Dynamo never traced; plan and state carried by the cache)")
        elif d.phase == "decode":
            runs = ("Triton kernels" if d.kernel == "triton" else "the PyTorch reference op"
                    + ("" if d.method.triton else f": {name} has no Triton kernel yet"))
            slots = " over each row's stored slots" if d.key.source is KVSource.ROCKETKV else ""
            action = (f"decode: {name}, {d.method.decode_kind}{slots} ({runs}; plan carried by "
                      "the cache)")
        else:
            action = d.reason
        return cls(graph, d.site.name, d.site.kind, d.key.source.value, str(d.query_len),
                   d.rewritten, action)


def _mask_note(d: SiteDecision) -> str:
    if isinstance(d.causal, CausalProof):
        return ("; its mask is proven plain causal: SDPA runs is_causal (flash)"
                + (", while the padding mask is all ones" if d.causal.padding else ""))
    return f"; its mask is kept: {d.causal}" if d.causal else ""


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
    """
    from ..backend import make_backend

    reports: list[SiteReport] = []

    def record(decisions):
        graph = 1 + max((r.graph for r in reports), default=0)
        reports.extend(SiteReport.of(graph, d) for d in decisions)

    backend = make_backend(compiler=lambda gm, _: gm.forward, on_analysis=record)
    compiled = torch.compile(fn, backend=lambda gm, ex: backend(gm, ex, options=options))
    compiled(*args, **kwargs)
    return Report(reports)
