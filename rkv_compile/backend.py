"""The ``rocketkv`` torch.compile backend.

Dynamo hands us one FX graph per compiled frame: for an LLM under ``generate`` that is a prefill
graph (fresh cache) and a decode graph (one token over the stored cache). We analyse it, rewrite
the sites that read a cache, and give the result to Inductor (``compile_fx``).

The plan (how many tokens to keep, how stage 2 summarises) depends on the prompt length, which a
decode graph cannot see. So the plan travels with the cache: every cache tensor a rewritten graph
returns carries it as the attribute ``_rocketkv_plan``, and a decode graph is compiled once per
distinct set of plans it meets: the rewritten decode graph is compiled on its first call with
those plans, through a nested torch.compile so that its cache length stays symbolic. Cache tensors
get their length marked dynamic, so decode graphs are traced with a symbolic cache length (one
graph for all steps, and the pass can check that positions do not derive from the length).
"""
from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch
from torch.fx import Graph, GraphModule

from .config import Plan, RocketKVConfig
from .passes.rewrite import DECODE, PREFILL, SiteDecision, analyse, apply

log = logging.getLogger("rkv_compile")
PLAN_ATTR = "_rocketkv_plan"
Compiler = Callable[[GraphModule, Sequence], Callable]


def inductor(gm: GraphModule, example_inputs: Sequence) -> Callable:
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, list(example_inputs))


def _output_positions(graph: Graph, node) -> list[int]:
    outs = graph.output_node().args[0]
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    return [i for i, out in enumerate(outs) if out is node]


def _cache_outputs(graph: Graph, decisions: list[SiteDecision]) -> list[tuple[str, int, int]]:
    """(site name, output position, kv seq dim) of every cache tensor a rewritten site returns."""
    found = []
    for d in decisions:
        if d.phase is None:
            continue
        for origin in (d.key, d.value):
            found += [(d.site.name, i, 2) for i in _output_positions(graph, origin.cache)]
    return found


def _tag(outputs, cache_outputs, plans: dict[str, Plan]) -> None:
    for name, index, dim in cache_outputs:
        tensor = outputs[index]
        setattr(tensor, PLAN_ATTR, plans[name])
        torch._dynamo.maybe_mark_dynamic(tensor, dim)


def _copy_graph_module(gm: GraphModule) -> GraphModule:
    graph = Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    return GraphModule(gm, graph)


class RewrittenGraph:
    """A rewritten graph's runtime: tags the caches it returns; decode graphs pick their plans."""

    def __init__(self, gm: GraphModule, example_inputs: Sequence, config: RocketKVConfig,
                 decisions: list[SiteDecision], compiler: Compiler):
        self.gm, self.example_inputs, self.config, self.compiler = gm, example_inputs, config, compiler
        placeholders = list(gm.graph.find_nodes(op="placeholder"))
        self.prefill_plans = {d.site.name: d.plan for d in decisions if d.phase == PREFILL}
        self.decode_pasts = {d.site.name: placeholders.index(d.key.past)
                             for d in decisions if d.phase == DECODE}
        self.cache_outputs = _cache_outputs(gm.graph, decisions)
        self.variants: dict[tuple, Callable] = {}
        if not self.decode_pasts:
            self.variants[()] = self._compile({})

    def _compile(self, decode_plans: dict[str, Plan]) -> Callable:
        gm = _copy_graph_module(self.gm)
        apply(gm, analyse(gm.graph, self.config), self.config, decode_plans)
        if not decode_plans:
            return self.compiler(gm, self.example_inputs)
        # Called at run time, outside Dynamo's trace of the model: Dynamo traces the rewritten
        # graph afresh, so the cache length stays symbolic (a direct compile_fx would specialise).
        return torch.compile(gm, backend=self.compiler)

    def _plan_of(self, past: torch.Tensor) -> Plan:
        plan = getattr(past, PLAN_ATTR, None)
        if plan is None:  # a cache we did not prefill: plan as if its tokens were the prompt
            plan = self.config.plan(past.shape[2], past.shape[3])
        return plan

    def __call__(self, *args):
        decode_plans = {name: self._plan_of(args[i]) for name, i in self.decode_pasts.items()}
        key = tuple(sorted(decode_plans.items()))
        if key not in self.variants:
            log.info("rocketkv: compiling a decode graph for plans %s", key)
            self.variants[key] = self._compile(decode_plans)
        outputs = self.variants[key](*args)
        _tag(outputs, self.cache_outputs, {**self.prefill_plans, **decode_plans})
        return outputs


def make_backend(compiler: Compiler = inductor, on_analysis: Callable | None = None):
    """A Dynamo backend running the RocketKV pass before `compiler` (Inductor by default)."""

    def backend(gm: GraphModule, example_inputs: Sequence, options=None, mode=None):
        config = RocketKVConfig.from_options(options)
        if mode not in (None, "default"):
            raise ValueError(f"rocketkv: unsupported mode {mode!r}")
        decisions = analyse(gm.graph, config)
        if on_analysis is not None:
            on_analysis(decisions)
        for d in decisions:
            log.debug("rocketkv site %s: %s", d.site.name, d.phase or d.reason)
        if not any(d.phase for d in decisions):
            return compiler(gm, example_inputs)
        return RewrittenGraph(gm, example_inputs, config, decisions, compiler)

    return backend


rocketkv = make_backend()
