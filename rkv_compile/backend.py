"""The ``rocketkv`` torch.compile backend.

Dynamo hands us one FX graph per compiled frame: for an LLM under ``generate`` that is a prefill
graph (fresh cache) and a decode graph (one token over the stored cache). We analyse it, rewrite
the sites that read a cache, and give the result to Inductor (``compile_fx``).

State between graphs travels on the cache tensors themselves, as attributes:
- ``_rocketkv_plan``: the plan (it depends on the prompt length, which a decode graph cannot
  see); on a RocketKVCache of a padded batch, a tuple of one plan per row. A decode graph is
  compiled for the plan its first call's caches carry (the backend sees the real inputs), with
  the cache length symbolic; with another plan it runs uncompiled.
- ``_rocketkv_evicted``: on a prefill's full cache, the (keys, values) the policy stores (stage 1
  kept them, or quantized them). The first decode step swaps them in, but only if the pass
  rewrote every decode site: the decode graph is where it can be checked that positions do not
  derive from the stored cache length. So a model that would mis-position tokens after eviction
  keeps its full cache and stays exact.
- ``_rocketkv_state``: on a stored key cache of a policy that evicts as it decodes (H2O), the
  score of every stored slot; each decode step reads it and writes the next.
- ``_rocketkv_view``: on a full key cache of a policy that keeps the history (rocketkv-mt), the
  (keys, values, positions) view that decode reads: what the last prefill kept, and every token
  decoded since. The cache itself is never evicted, so a new turn's positions stay right.
- ``_rocketkv_decoded``: the cache came out of a rewritten decode step.
- ``_rocketkv_shortened``: the cache holds fewer tokens than its sequence (eviction was
  committed). A graph that feeds several new tokens over such a cache (a new turn) is refused at
  run time: transformers derives their positions from the stored length. Over a cache not
  shortened, such a graph (a prompt's later chunk) is a prefill of the whole cache: its eviction
  replaces the earlier chunk's, and the first decode step commits the last one. A RocketKVCache
  keeps logical positions itself: a new turn into it is evicted again (its graph runs
  uncompiled, planned at run time from the conversation's length).
- ``_rocketkv_rows``: on the caches of a padded batch evicted row by row, (each row's prompt
  length, the empty slots before its stored ones).
A padded batch (a 2-D attention_mask with zeros, laid out by logical position) is evicted and
decoded row by row, as each prompt alone would be, where the policy allows (`rowwise`): its
prefill, whose mask was proven causal but for the padding, runs a copy of the graph whose
stores select each row over its own tokens with its own plan, right-aligned; each decode step
then gets a per-row mask of the stored slots in place of the logical attention_mask, and its
sparse sites decode each row with its own plan (uncompiled). Otherwise a decode step with
padding runs the exact graph, uncompiled, on the full caches. A padded prompt into a
RocketKVCache is stored the same way, uncompiled, each row left-aligned with its own length, and
its state carries a plan per row (a tuple): decode graphs over a RocketKVCache attend to each
row's stored slots, so they stay compiled (and CUDA graphs) with every row's plan a constant.
Cache tensors get their length marked dynamic, so decode graphs are traced with a symbolic length
(one graph for all steps, and the positions check has a symbol to follow).
"""
import dataclasses
import functools
import logging
import operator
import warnings
from typing import Callable, Sequence

import torch
from torch.fx import Graph, GraphModule

from .config import Plan, RocketKVConfig
from .kernels.reference import additive_mask
from .policies.rocketkv_mt import whole_view
from .passes.rewrite import (DECODE, PREFILL, TURN, UNSUPPORTED, SiteDecision, analyse, apply,
                             attended_keys, plan_inputs, rocketkv_capacity, rowwise)
from .passes.causal_mask import NOT_CAUSAL, NOT_CAUSAL_PREFILL, CausalProof, prove_causal
from .passes.kv_source import KVSource
from .passes.sites import value_of

log = logging.getLogger("rkv_compile")
PLAN_ATTR = "_rocketkv_plan"
GROWING = (KVSource.FRESH, KVSource.GROWN)   # caches that grow by cat (DynamicCache, tuples)
ROCKETKV_STORES = (KVSource.NEW_ROCKETKV, KVSource.ROCKETKV_TURN)   # new RocketKVCache state
EVICTED_ATTR = "_rocketkv_evicted"
DECODED_ATTR = "_rocketkv_decoded"   # written by a rewritten decode step (so maybe evicted)
SHORTENED_ATTR = "_rocketkv_shortened"
STATE_ATTR = "_rocketkv_state"
VIEW_ATTR = "_rocketkv_view"
ROWS_ATTR = "_rocketkv_rows"
Compiler = Callable[[GraphModule, Sequence], Callable]
_WARNED: set[str] = set()   # unsupported-input warnings already given


def inductor(gm: GraphModule, example_inputs: Sequence, decode: bool = False,
             cudagraphs: bool = False) -> Callable:
    """Inductor. A decode graph is tuned (coordinate descent over its Triton kernels' configs, as
    gpt-fast does): at batch 1 its weight GEMVs become tuned Triton reductions fused with their
    neighbours, 7.96 -> 7.46 ms per 8B-shaped step on the H100 (BENCHMARKS.md)."""
    from torch._inductor.compile_fx import compile_fx

    patches = {"coordinate_descent_tuning": True} if decode else {}
    if cudagraphs:
        patches["triton.cudagraphs"] = True
    return compile_fx(gm, list(example_inputs), config_patches=patches)


def compiles_decode(decode: list[SiteDecision]) -> bool:
    """Whether a decode graph is compiled. One that calls the Triton kernels over a growing cache
    runs uncompiled (its kernels launched one by one): their launch code would compute grid and
    block sizes from the symbolic cache length. Over RocketKVCache every shape is static. One
    that carries a state or a view between steps (H2O, rocketkv-mt) runs uncompiled too: they
    are inputs Dynamo never saw, so Inductor has no symbolic length for them."""
    return all(not (d.method.decode_state or d.method.keeps_history) and
               (d.kernel != "triton" or d.key.source is KVSource.ROCKETKV) for d in decode)


def _output_positions(graph: Graph, node) -> list[int]:
    return [i for i, out in enumerate(graph.output_node().args[0]) if out is node]


def _state_outputs(graph: Graph, store) -> list[int]:
    """Output positions of the tensors a RocketKVCache prompt store returns (its layer state)."""
    return [i for i, out in enumerate(graph.output_node().args[0])
            if isinstance(out, torch.fx.Node) and out.target is operator.getitem
            and out.args[0] is store]


def _length_inputs(placeholders, decisions: list[SiteDecision]) -> dict | None:
    """Where the stored cache lengths enter a decode graph, or None if evictions can't be committed.

    Dynamo passes each symbolic size twice: inside the tensor and as an int input of its own; a
    swapped-in cache must update both. Evictions are committed only when every decode site of
    the graph was rewritten (a refused site may read positions from the length).
    """
    decode = [d for d in decisions if d.key.source is KVSource.GROWN]
    if not decode or any(d.phase != DECODE for d in decode):
        return None
    tensors = {}
    for d in decode:
        for past in (d.key.past, d.value.past):
            length = value_of(past).shape[2]
            if not isinstance(length, torch.SymInt) or not length.node.expr.is_symbol:
                return None
            tensors[placeholders.index(past)] = length.node.expr
    ints = {i: value_of(p).node.expr for i, p in enumerate(placeholders)
            if isinstance(value_of(p), torch.SymInt) and value_of(p).node.expr in tensors.values()}
    return {"tensors": tensors, "ints": ints}


def _copy_graph_module(gm: GraphModule) -> GraphModule:
    """A copy to rewrite: Dynamo still reads the graph it handed us after the backend returns.

    The copy keeps what Dynamo attached for AOTAutograd (the compile id, input sources): without
    it no input counts as static, and Inductor's CUDA graphs skip a graph that mutates its inputs
    (RocketKVCache's append) and would copy every weight into the graph at each replay."""
    graph = Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    copy = GraphModule(gm, graph)
    copy.meta.update(gm.meta)
    if hasattr(gm, "_param_name_to_source"):
        copy._param_name_to_source = gm._param_name_to_source
    for old, new in zip(gm.graph.find_nodes(op="placeholder"), graph.find_nodes(op="placeholder")):
        if hasattr(old, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source
    return copy


class RewrittenGraph:
    """A rewritten graph's runtime: moves plans and evictions between the cache tensors."""

    def __init__(self, gm: GraphModule, example_inputs: Sequence, config: RocketKVConfig,
                 decisions: list[SiteDecision], compiler: Compiler, decode_compiler: Compiler):
        self.config = config
        placeholders = list(gm.graph.find_nodes(op="placeholder"))
        self.num_outputs = len(gm.graph.output_node().args[0])
        self.prefill_plans = {d.site.name: d.plan for d in decisions if d.phase == PREFILL}
        self.decode_inputs = {d.site.name: (placeholders.index(d.key.past),
                                            placeholders.index(d.value.past))
                              for d in decisions if d.phase == DECODE}
        self.stateful = {d.site.name for d in decisions
                         if d.phase == DECODE and d.method.decode_state}
        self.viewing = [d.site.name for d in decisions
                        if d.phase == DECODE and d.method.keeps_history]
        # site name -> (input of its logical positions, query length, head dim, layer, layers,
        # the cache's room) of a new turn into a RocketKVCache: what plans it at run time
        self.turn_caches = [placeholders.index(d.key.past) for d in decisions if d.phase == TURN]
        self.turns = {d.site.name: (placeholders.index(d.key.cache.args[5]), int(d.query_len),
                                    int(d.head_dim), d.layer, d.layers, d.key.cache.args[8])
                      for d in decisions if d.phase == TURN}
        self.length_inputs = _length_inputs(placeholders, decisions)
        self.continued = _continued_caches(gm, decisions)
        self.padding_inputs = sorted({placeholders.index(m) for d in decisions
                                      if d.phase == DECODE and d.key.source in GROWING
                                      for m in d.padding_masks})
        # RocketKVCache decode: (its caches' key inputs, padding masks) — a cache the pass did
        # not store keeps the padding in its slots, so it decodes through the exact graph
        slot_sites = [d for d in decisions
                      if d.phase == DECODE and d.key.source is KVSource.ROCKETKV]
        self.unplanned_padding = (sorted({placeholders.index(d.key.past) for d in slot_sites}),
                                  sorted({placeholders.index(m) for d in slot_sites
                                          for m in d.padding_masks}))
        # masks of prompts stored in a RocketKVCache: a padded batch is stored row by row, if
        # the policy allows (else refused)
        self.padded_store_inputs = sorted({placeholders.index(m) for d in decisions
                                           if d.phase in (PREFILL, TURN)
                                           for m in d.padding_masks})
        # site name -> (head dim, layer, layers, the cache's room) of a prompt store into a
        # RocketKVCache: what plans each row of a padded batch
        self.row_stores = {d.site.name: (int(d.head_dim), d.layer, d.layers,
                                         d.plan.length - d.prompt_len)
                           for d in decisions if d.phase == PREFILL
                           and d.key.source is KVSource.NEW_ROCKETKV}
        # the exact graph, run as is (not compiled) for decode steps with padding
        self.original = _copy_graph_module(gm) \
            if self.padding_inputs or self.unplanned_padding[1] else None
        # site name -> output positions of its (key, value) caches
        self.cache_outputs = {d.site.name: (_output_positions(gm.graph, d.key.cache),
                                            _output_positions(gm.graph, d.value.cache))
                              for d in decisions if d.phase and d.key.source in GROWING}
        # site name -> output positions of the RocketKVCache layer state its prefill stores
        self.state_outputs = {d.site.name: _state_outputs(gm.graph, d.key.cache)
                              for d in decisions if d.phase in (PREFILL, TURN)
                              and d.key.source in ROCKETKV_STORES}
        proven = [d for d in decisions if isinstance(d.causal, CausalProof)]
        causal = frozenset(d.site.name for d in proven)
        # prefill inputs that must be all ones for the causal masks proven above to hold
        self.causal_padding = sorted({placeholders.index(m) for d in proven
                                      for m in d.causal.padding})
        # The rewritten graph as is (masks kept, plans as inputs), run uncompiled when the
        # compiled one does not apply: padding under a proven mask, or a decode plan it was
        # not compiled for.
        # Copies are analysed again (their own nodes); refusals beyond the graph's structure
        # (masks evaluated as not causal) carry over by site name.
        refused = {d.site.name: d.reason for d in decisions if not d.rewritten}
        self.uncompiled = _copy_graph_module(gm)
        self.storing = apply(self.uncompiled, analyse(self.uncompiled.graph, config, refused),
                             config)
        # A padded batch, row by row (its own copy, masks kept, uncompiled).
        self.by_row, self.row_sites = None, 0
        if rowwise(config.method, decisions) and \
                (self.padding_inputs or self.causal_padding or self.row_stores):
            self.by_row = _copy_graph_module(gm)
            rows = analyse(self.by_row.graph, config, refused)
            apply(self.by_row, rows, config, by_row=True)
            self.row_sites = sum(d.phase == DECODE and d.kernel != "exact" for d in rows)
        self.compiled, self.compiled_plans, self.warned = None, None, set()
        decode = [d for d in decisions if d.phase == DECODE]
        if decode and not compiles_decode(decode) or self.turns:
            # (a new turn's plan and buffer size are values known at run time: it runs uncompiled)
            return
        if decode:
            # Decode graphs are compiled here, inside Dynamo's compile (so the cache length stays
            # a symbol), for the plan of the caches this first call received: the plan is then
            # constant. A later call with another plan (a new prompt length) runs the rewritten
            # graph uncompiled with the plan as inputs (correct, slower), and says so once.
            # (A torch.compile nested in the returned callable is never traced: Dynamo runs
            # compiled graphs with itself disabled.)
            self.compiled_plans = {name: self._plan_of(example_inputs[k])
                                   for name, (k, _) in self.decode_inputs.items()}
        fast = _copy_graph_module(gm)
        apply(fast, analyse(fast.graph, config, refused), config, plans=self.compiled_plans,
              causal=causal)
        self.compiled = (decode_compiler if decode else compiler)(fast, example_inputs)

    def _plan_of(self, past: torch.Tensor) -> Plan:
        plan = getattr(past, PLAN_ATTR, None)
        if plan is None:  # a cache we did not prefill: plan as if its tokens were the prompt
            plan = self.config.plan(past.shape[2], past.shape[3])
        return plan

    @staticmethod
    def _view_of(key: torch.Tensor, value: torch.Tensor) -> tuple:
        view = getattr(key, VIEW_ATTR, None)
        return whole_view(key, value) if view is None else view

    @staticmethod
    def _state_of(past: torch.Tensor) -> torch.Tensor:
        state = getattr(past, STATE_ATTR, None)
        if state is None:  # a cache we did not prefill: every stored token starts at 0
            state = torch.zeros(past.shape[:3], device=past.device)
        return state

    def _commit_evictions(self, args: list) -> bool:
        """Swap prefill evictions in for the full caches, and their lengths for the old ones;
        whether any cache is shorter than its sequence."""
        lengths = {}
        for k, v in self.decode_inputs.values():
            for i in (k, v):
                evicted = getattr(args[i], EVICTED_ATTR, None)
                if evicted is not None:
                    symbol = self.length_inputs["tensors"][i]
                    if lengths.setdefault(symbol, evicted.shape[2]) != evicted.shape[2]:
                        raise RuntimeError("rocketkv: caches that share a traced length were "
                                           "evicted to different lengths")
                    args[i] = evicted
        for i, symbol in self.length_inputs["ints"].items():
            args[i] = lengths.get(symbol, args[i])
        return bool(lengths) or any(getattr(args[i], SHORTENED_ATTR, False)
                                    for k, v in self.decode_inputs.values() for i in (k, v))

    @staticmethod
    def _has_padding(args, inputs: list[int]) -> bool:
        """Whether a padding mask input masks a key: a 0 in a 2-D attention_mask, or a masked
        key in the last query row of a 4-D mask (a causal mask lets that row see every key)."""
        for i in inputs:
            mask = args[i][..., -1, :] if args[i].dim() == 4 else args[i]
            masked = torch.isneginf(additive_mask(mask)) if mask.is_floating_point() else mask == 0
            if bool(masked.any()):
                return True
        return False

    def _refuse_padded_store(self, args, padded: bool) -> None:
        """A padded prompt or turn into a RocketKVCache (`padded`: its mask shows padding) that
        cannot be stored row by row."""
        rows_apart = any(isinstance(getattr(args[k], PLAN_ATTR, None), tuple)
                         for k in self.turn_caches)
        if self.turns and (rows_apart or padded):
            raise NotImplementedError(
                "rocketkv: a new turn of a padded batch into a RocketKVCache is not supported "
                "(transformers masks the stored slots with one offset for every row): pass a "
                "DynamicCache with policy 'rocketkv-mt', or one conversation per call")
        if self.by_row is None and padded:
            raise NotImplementedError(
                f"rocketkv: a padded batch into a RocketKVCache: policy "
                f"{self.config.method.name!r} cannot evict rows apart. Pass a DynamicCache "
                "(padded batches run exactly there) or one prompt per call")

    def _warn_once(self, message: str, *args) -> None:
        if message not in self.warned:
            log.warning(message, *args)
            self.warned.add(message)

    def _rows(self, args) -> tuple | None:
        """A padded decode step's rows, if its prefill evicted them row by row."""
        return next((getattr(args[k], ROWS_ATTR) for k, _ in self.decode_inputs.values()
                     if hasattr(args[k], ROWS_ATTR)), None) if self.by_row is not None else None

    def _prompt_lengths(self, args) -> list[int]:
        """Each row's tokens in a padded prefill: the ones of its 2-D attention_mask, or the
        keys the last query of its 4-D mask attends to (generate's mask for a RocketKVCache)."""
        masks = [args[i] for i in self.causal_padding + self.padded_store_inputs]
        mask = next((m for m in masks if m.dim() == 2), None)
        if mask is not None:
            return (mask != 0).sum(-1).tolist()
        return attended_keys(masks[0]).sum(-1).tolist()

    def _stored_rows(self, args, outputs) -> tuple:
        """(prompt lengths, empty slots before each row's stored ones) of a padded prefill."""
        lengths = self._prompt_lengths(args)
        if not self.storing:   # nothing evicted: the cache keeps the batch's own padding
            return lengths, [args[self.causal_padding[0]].shape[-1] - n for n in lengths]
        positions = outputs[self.num_outputs + 2]   # the first store's: -1 in empty slots
        return lengths, (positions[:, 0] < 0).sum(-1).tolist()

    def _row_store_inputs(self, args, plans: dict) -> list:
        """A padded prefill's stores into RocketKVCaches: each row's plan (recorded in `plans`)
        and the buffer size that holds every row's, per site (ROW_STORE_INPUTS)."""
        lengths, extra = self._prompt_lengths(args), []
        for name, (head_dim, layer, layers, room) in self.row_stores.items():
            roomy = dataclasses.replace(self.config, max_new_tokens=room)
            rows = plans[name] = tuple(roomy.plan(n, head_dim, layer, layers) for n in lengths)
            extra += [list(rows), max(rocketkv_capacity(p, n) for p, n in zip(rows, lengths))]
        return extra

    def _unplanned_padding(self, args) -> bool:
        """A padded decode step over a RocketKVCache the pass did not store (its slots keep the
        padding, which only the model's own mask hides): a 0 in a 2-D attention_mask, or in a
        4-D mask a masked slot before an attended one (its empty slots are masked too)."""
        keys, masks = self.unplanned_padding
        if not masks or all(hasattr(args[k], PLAN_ATTR) for k in keys):
            return False
        for i in masks:
            if args[i].dim() == 2:
                padded = (args[i] == 0).any()
            else:
                attended = attended_keys(args[i])
                padded = (~attended[:, :-1] & attended[:, 1:]).any()
            if bool(padded):
                return True
        return False

    def _run_exact(self, args):
        """Padding in a decode step: the exact graph, over caches that were never evicted."""
        if any(getattr(args[k], DECODED_ATTR, False) for k, _ in self.decode_inputs.values()):
            raise RuntimeError("rocketkv: a padding mask appeared after the cache was evicted; "
                               "padded batches must be padded from the first decode step on")
        return self.original(*args)

    def __call__(self, *args):
        _refuse_shortened(args, self.continued)
        padded = self._has_padding(args, self.causal_padding)
        if self.padded_store_inputs or self.turn_caches:
            store_padded = self._has_padding(args, self.padded_store_inputs)
            self._refuse_padded_store(args, store_padded)
            padded = padded or bool(self.row_stores) and store_padded
        rows = None
        if self.padding_inputs and self._has_padding(args, self.padding_inputs):
            rows = self._rows(args)
            if rows is None:
                return self._run_exact(args)
        if self._unplanned_padding(args):
            return self.original(*args)
        args = list(args)
        plans = dict(self.prefill_plans)
        decode_plans = {name: self._plan_of(args[k]) for name, (k, _) in self.decode_inputs.items()}
        plans.update(decode_plans)
        shortened = self.length_inputs is not None and self._commit_evictions(args)
        if rows is not None:   # a padded batch's decode step, row by row
            for i in self.padding_inputs:   # each row's stored slots, not its logical positions
                args[i] = torch.ones_like(args[i])
                for b, empty in enumerate(rows[1]):
                    args[i][b, :empty] = 0
            outputs = self.by_row(*args, *[rows[0]] * self.row_sites)
        elif padded and self.by_row is not None and not self.decode_inputs:
            self._warn_once("rocketkv: a padded prompt: the prefill keeps its attention mask and "
                            "runs uncompiled, each row evicted over its own tokens")
            outputs = self.by_row(*args, *self._row_store_inputs(args, plans))
            rows = self._stored_rows(args, outputs) if self.cache_outputs else None
        elif self.compiled is not None and not padded and \
                (not decode_plans or decode_plans == self.compiled_plans):
            outputs = self.compiled(*args)
        else:
            if padded:
                self._warn_once("rocketkv: a padded prompt: the prefill keeps its attention mask "
                                "and runs uncompiled")
            elif self.compiled_plans is not None:
                self._warn_once("rocketkv: a decode graph compiled for plan %s got plan %s (a new "
                                "prompt length?): it runs uncompiled", self.compiled_plans,
                                decode_plans)
            extra = []
            for name, (positions, turn, head_dim, layer, layers, room) in self.turns.items():
                length = int(args[positions][0]) + turn   # the conversation's, after the turn
                roomy = dataclasses.replace(self.config, max_new_tokens=room)
                plan = plans[name] = roomy.plan(length, head_dim, layer, layers)
                extra += [plan, rocketkv_capacity(plan, length)]
            for name, plan in decode_plans.items():
                extra += plan_inputs(plan)
                if name in self.stateful:
                    extra.append(self._state_of(args[self.decode_inputs[name][0]]))
                if name in self.viewing:
                    extra += self._view_of(*(args[i] for i in self.decode_inputs[name]))
            outputs = self.uncompiled(*args, *extra)
        stored, outputs = outputs[self.num_outputs:], list(outputs[:self.num_outputs])
        for name, positions in self.cache_outputs.items():
            for i in positions[0] + positions[1]:
                # Contiguous, as every later cat will be: decode graphs then see one layout.
                outputs[i] = outputs[i].contiguous()
                setattr(outputs[i], PLAN_ATTR, plans[name])
                setattr(outputs[i], DECODED_ATTR, name in self.decode_inputs)
                setattr(outputs[i], SHORTENED_ATTR, shortened)
                if rows is not None:
                    setattr(outputs[i], ROWS_ATTR, rows)
                torch._dynamo.maybe_mark_dynamic(outputs[i], 2)
        for name, positions in self.state_outputs.items():
            _mark_state([outputs[i] for i in positions], plans[name], self.config)
        for j, name in enumerate(self.storing):
            key, value, positions, state = stored[4 * j: 4 * j + 4]
            if self.config.method.keeps_history:   # the cache stays whole; decode reads a view
                for i in self.cache_outputs[name][0]:
                    setattr(outputs[i], VIEW_ATTR, (key, value, positions))
                continue
            if state.numel():
                setattr(key, STATE_ATTR, state)
            for kind, kept in enumerate((key, value)):
                for i in self.cache_outputs[name][kind]:
                    setattr(outputs[i], EVICTED_ATTR, kept)
        stored = stored[4 * len(self.storing):]
        stateful = [n for n in self.decode_inputs if n in self.stateful]
        for name, state in zip(stateful, stored):
            for i in self.cache_outputs[name][0]:
                setattr(outputs[i], STATE_ATTR, state)
        views = stored[len(stateful):]
        for j, name in enumerate(self.viewing):
            for i in self.cache_outputs[name][0]:
                setattr(outputs[i], VIEW_ATTR, tuple(views[3 * j: 3 * j + 3]))
        return outputs


def _mark_state(state: list[torch.Tensor], plan: Plan, config: RocketKVConfig) -> None:
    """A RocketKVCache layer's new state: it carries its plan."""
    for tensor in state:
        setattr(tensor, PLAN_ATTR, plan)
        # A new prompt length means new buffer sizes: Dynamo recompiles the decode graph for its
        # plan instead of generalising the sizes (which would run it uncompiled).
        torch._dynamo.mark_static(tensor)
        if config.cudagraphs:  # fixed buffers, updated in place: no copies per replay
            torch._dynamo.mark_static_address(tensor, guard=False)


def _keeping_plans(compiled: Callable, gm: GraphModule, decisions: list[SiteDecision],
                   config: RocketKVConfig) -> Callable:
    """`compiled`, where a new turn into a RocketKVCache stays exact (every stored token kept):
    its new buffers carry the plan the old ones had (their summaries' chunk is the plan's)."""
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    turns = [(placeholders.index(d.key.past), _state_outputs(gm.graph, d.key.cache))
             for d in decisions if d.key.source is KVSource.ROCKETKV_TURN]
    if not turns:
        return compiled

    def run(*args):
        outputs = compiled(*args)
        for past, state in turns:
            plan = getattr(args[past], PLAN_ATTR, None)
            if plan is not None:
                _mark_state([outputs[i] for i in state], plan, config)
        return outputs

    return run


def _continued_caches(gm: GraphModule, decisions: list[SiteDecision]) -> list[int]:
    """The inputs of caches that get several new tokens (a new turn, a prompt's later chunk)."""
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    return sorted({placeholders.index(d.key.past) for d in decisions
                   if d.key.source is KVSource.GROWN and
                   (isinstance(d.query_len, torch.SymInt) or (d.query_len or 1) > 1)})


def _refuse_shortened(args, inputs: list[int]) -> None:
    """New tokens over a cache that eviction shortened are refused: transformers derives their
    positions from the stored length, which no longer counts the evicted tokens."""
    if any(getattr(args[i], SHORTENED_ATTR, False) for i in inputs):
        raise NotImplementedError(
            "rocketkv: new tokens over a cache that eviction shortened (a new turn or a chunked "
            "prefill after decoding) are not supported: transformers would derive their "
            "positions from the stored length. Pass a RocketKVCache (it keeps each sequence's "
            "logical length: a new turn is evicted again) or use policy 'rocketkv-mt'")


def _refusing_shortened(compiled: Callable, gm: GraphModule, decisions: list[SiteDecision]
                        ) -> Callable:
    """`compiled`, refusing at run time new tokens over a shortened cache."""
    inputs = _continued_caches(gm, decisions)
    if not inputs:
        return compiled

    def run(*args):
        _refuse_shortened(args, inputs)
        return compiled(*args)

    return run


def make_backend(compiler: Compiler | None = None, on_analysis: Callable | None = None,
                 decode_compiler: Compiler | None = None):
    """A Dynamo backend running the RocketKV pass before `compiler` (by default Inductor; for
    decode graphs tuned, with CUDA graphs if the options ask for them; `decode_compiler`, if
    given, compiles the decode graphs instead)."""

    def backend(gm: GraphModule, example_inputs: Sequence, options=None, mode=None):
        config = RocketKVConfig.from_options(options)
        if mode not in (None, "default"):
            raise ValueError(f"rocketkv: unsupported mode {mode!r}")
        decisions = analyse(gm.graph, config)
        proofs = {}   # one proof per mask: a model's layers share theirs
        for d in decisions:
            if d.phase == PREFILL and d.site.mask is not None and not d.site.is_causal:
                key = (d.site.mask, d.site.kind, str(value_of(d.site.query).shape))
                if key not in proofs:
                    proofs[key] = prove_causal(gm, d.site, example_inputs)
                d.causal = proofs[key]
            if d.causal == NOT_CAUSAL:
                d.refuse(NOT_CAUSAL_PREFILL)
        if on_analysis is not None:
            on_analysis(decisions)
        for d in decisions:
            log.debug("rocketkv site %s: %s", d.site.name, d.phase or d.reason)
        for reason in sorted({d.reason for d in decisions if d.reason and
                              d.reason.startswith(UNSUPPORTED)} - _WARNED):
            _WARNED.add(reason)   # once per process: a prefill and a decode graph share it
            warnings.warn(f"rocketkv: {reason}", RuntimeWarning, stacklevel=2)
        plain = compiler or inductor
        if not any(d.phase for d in decisions):
            return _keeping_plans(_refusing_shortened(plain(gm, example_inputs), gm, decisions),
                                  gm, decisions, config)
        # CUDA graphs only for decode graphs: a prefill runs once per prompt.
        decode = decode_compiler or compiler or functools.partial(
            inductor, decode=True, cudagraphs=config.cudagraphs)
        return RewrittenGraph(gm, example_inputs, config, decisions, plain, decode)

    return backend


rocketkv = make_backend()
