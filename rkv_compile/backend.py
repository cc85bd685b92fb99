"""The ``rocketkv`` torch.compile backend: the pass, Inductor, and what runs around each call.

Dynamo hands the backend one FX graph per compiled frame: for an LLM under `generate`, a
prefill graph (a prompt into a new cache), decode graphs (one token over a compressed cache)
and, for a conversation or a chunked prefill, turn graphs. `rocketkv` analyses the graph and
rewrites the sites that read a cache (passes/rewrite.py), compiles it, and returns a `Runtime`,
which does around each call what a graph cannot:
- a prefill whose padding mask holds padding runs with its mask (uncompiled, each row planned
  for its own tokens); one without runs is_causal, compiled;
- a decode step checks that every compressed cache has a free slot (`Mirror`): a DynamicCache
  grows, a full RocketKVCache is an error naming its `max_new_tokens`;
- a turn checks that it continues each row's logical positions (transformers slices a new turn
  from a DynamicCache by its stored length, which eviction shortened);
- the compressed caches it returns are marked for Dynamo (their length dynamic) and, on CUDA,
  as static addresses (CUDA graphs replay decode steps over them in place).
Every compressed layer's state is in its cache's own tensors (`rkv_compile.state`): nothing is
carried on the side, so transformers' cache operations keep it right.
On CUDA, decode graphs whose ops CUDA graphs can hold are compiled for each size of the caches
they read (a size holds many prompt lengths: `state.slot_bucket`) and replayed as CUDA graphs;
elsewhere, and for a step whose other inputs change size every step, one graph with symbolic
sizes serves them all. Prefill and turn graphs run as traced (op by op: the first call then
compiles only the decode step), or compiled by Inductor with the `compile_prefill` option;
the plan is computed inside the ops at run time, so a graph of symbolic prompt length (once
Dynamo has seen two) serves every prompt.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import weakref
from typing import Callable, Sequence

import torch
from torch.fx import Graph, GraphModule
from torch.fx.node import map_arg

from . import state as S
from .config import RocketKVConfig
from .diagnostics import log, warn_once
from .kernels import kernel_analysis, tuning
from .passes.causal_mask import NOT_CAUSAL, NOT_CAUSAL_PREFILL, CausalProof, prove_causal
from .passes.kv_source import KVSource
from .passes.repeated_layers import outline_repeated_layers
from .passes.rewrite import (DECODE, PREFILL, TURN, UNSUPPORTED, CacheIO, SiteDecision, analyse,
                             apply, computes_positions, eliminate_dead_code)
from .passes.sites import value_of

Compiler = Callable[[GraphModule, Sequence], Callable]
# Dynamo stops compiling a function after `recompile_limit` graphs (8), then runs it eagerly.
# transformers 5.24 routes every model's forward through one decorator frame, and a model takes
# a few graphs per options set (prefill, decode, turn), so the backend raises it to this.
RECOMPILE_LIMIT = 64


def inductor(gm: GraphModule, example_inputs: Sequence, decode: bool = False,
             cudagraphs: bool = False, layers_once: bool = False) -> Callable:
    """Inductor. A decode graph is tuned (coordinate descent over its Triton kernels' configs, as
    gpt-fast does): at batch 1 its weight GEMVs become tuned Triton reductions fused with their
    neighbours, 7.96 -> 7.46 ms per 8B-shaped step on the H100 (BENCHMARKS.md); only the kernels
    that read weights are tuned (`tuning.weight_reads_only`). With `layers_once`, alike layers
    share one compiled subgraph (passes/repeated_layers.py)."""
    from torch._inductor.compile_fx import compile_fx

    patches = {"coordinate_descent_tuning": True} if decode else {}
    patches["triton.cudagraphs"] = cudagraphs

    def compile_(graph: GraphModule) -> Callable:
        with kernel_analysis.memoized(), tuning.weight_reads_only():
            return compile_fx(graph, list(example_inputs), config_patches=patches)

    if layers_once:
        outlined = _copy_graph_module(gm)
        if outline_repeated_layers(outlined, example_inputs):
            try:
                return compile_(outlined)
            except Exception as error:   # Inductor's own limits: the whole graph still compiles
                warn_once(f"rocketkv: compiling a decode graph's layers once failed "
                          f"({type(error).__name__}: {str(error)[:200]}); it compiles whole "
                          f"(a slower first call). The option compile_layers_once=False "
                          f"skips the attempt")
    return compile_(gm)


def _copy_graph_module(gm: GraphModule) -> GraphModule:
    """A copy to rewrite: Dynamo still reads the graph it handed us after the backend returns.

    The copy keeps what Dynamo attached for AOTAutograd (the compile id, input sources): without
    it no input counts as static, and Inductor's CUDA graphs skip a graph that mutates its inputs
    (the caches' append) and would copy every weight into the graph at each replay."""
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


def _fakes(example_inputs: Sequence) -> list:
    """Dynamo's fake tensors for a graph's real example inputs (symbolic sizes and all), where
    Dynamo's fake mode is found; else the inputs."""
    fake_mode = torch._guards.detect_fake_mode(example_inputs)
    if fake_mode is None:
        return list(example_inputs)
    return [fake_mode.from_tensor(x) if isinstance(x, torch.Tensor) else x
            for x in example_inputs]


def _allow_dynamic_output_shapes(example_inputs) -> None:
    """The cache ops' outputs have sizes of their own (the plan's, decided at run time). Dynamo
    allows such ops in the graphs it traces only if told to (its
    capture_dynamic_output_shape_ops); the backend allows them in the graphs it compiles."""
    fake_mode = torch._guards.detect_fake_mode(example_inputs)
    shape_env = getattr(fake_mode, "shape_env", None)
    if shape_env is not None and not shape_env.allow_dynamic_output_shape_ops:
        shape_env.settings = dataclasses.replace(shape_env.settings,
                                                 allow_dynamic_output_shape_ops=True)


class Mirror:
    """The host's copy of each compressed cache's fullness (the most slots a row has filled)
    and flags, keyed by the cache's storage, so a decode step knows without reading the device
    whether a slot is free. It is only a copy: a cache it has not seen (transformers' batch
    operations make new tensors) is read from its header once."""

    def __init__(self):
        self.entries: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def entry(self, keys: torch.Tensor) -> list[int]:
        """[filled, flags] of a packed cache (a list: a decode step advances it in place)."""
        storage = keys.untyped_storage()
        entry = self.entries.get(storage)
        if entry is None:
            stored, flags = S.stored_counts(keys)
            entry = self.entries[storage] = [max(stored or [0]), flags]
        return entry


MIRROR = Mirror()
# The whole prompt of a prefill whose positions may derive from the cache length, by its
# compressed keys' storage, until a decode step proves they do not (or runs exactly over it).
WHOLE_PROMPTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _forget(storage: torch.UntypedStorage) -> None:
    """A dropped cache's storage is handed to a new cache (`state.POOL`): what was known of
    the old one is not true of the new."""
    MIRROR.entries.pop(storage, None)
    WHOLE_PROMPTS.pop(storage, None)


S.POOL.on_recycle.append(_forget)


@dataclasses.dataclass
class Variant:
    """A rewritten graph and how it runs: compiled (`run`), or as FX (`compiled` is None)."""

    gm: GraphModule
    ios: list[CacheIO]
    run: Callable


@dataclasses.dataclass
class CheckedCaches:
    """The compressed caches a decode step last read and found room in: their storages
    (weakly held: a step's cache tensors are new views of the same storages each step), their
    Mirror entries and their slots."""

    storages: list[weakref.ref]
    entries: list[list[int]]
    slots: list[int]
    recycled: int   # state.POOL's count then: a recycled storage is another cache


class Runtime:
    """A rewritten graph at run time (see the module docstring)."""

    def __init__(self, gm: GraphModule, example_inputs: Sequence, config: RocketKVConfig,
                 decisions: list[SiteDecision], compile_graph: Callable[..., Callable],
                 on_cuda: bool):
        self.config, self.decisions = config, decisions
        self.original = gm
        self.compile_graph = compile_graph
        rewritten = [d for d in decisions if d.rewritten]
        self.phase = TURN if any(d.phase == TURN for d in rewritten) else \
            PREFILL if any(d.phase == PREFILL for d in rewritten) else DECODE
        self.fatal = [d for d in decisions if d.fatal]
        self.sizes_of = _size_inputs(gm)
        self.unproven = [d for d in decisions if d.positions_unproven]
        proofs = [d.causal for d in rewritten if isinstance(d.causal, CausalProof)]
        placeholders = list(gm.graph.find_nodes(op="placeholder"))
        self.padding = sorted({placeholders.index(n) for p in proofs for n in p.padding})
        self.probe = self.phase == PREFILL and computes_positions(gm.graph, decisions)
        causal = frozenset(d.site.name for d in rewritten if isinstance(d.causal, CausalProof))
        self.padded = None   # the variant keeping the prefill masks: built on first need
        self.last: CheckedCaches | None = None
        if self.fatal:       # it never runs rewritten
            return
        self.main = self._variant(causal)
        self.ios = self.main.ios
        # for a symbolic graph compiled later: fakes, since the real inputs are the first
        # call's, and holding them would hold its caches (and their memory) for ever
        self.example_inputs = _fakes(example_inputs)
        # On CUDA a decode step CUDA graphs can hold is compiled for each size of its caches
        # (CUDA graphs take static shapes), replayed as a CUDA graph (unless the options turn
        # CUDA graphs off).
        self.per_size = on_cuda and config.cudagraphs is not False and \
            self.phase == DECODE and _capturable(rewritten)
        if self.per_size:
            self.sizes: dict[tuple, list[tuple[Callable, dict]]] = {}
        else:
            self._compile_symbolic(example_inputs)

    def _compile_symbolic(self, example_inputs: Sequence | None = None) -> None:
        """One graph for every size (Dynamo's symbolic shapes), without CUDA graphs."""
        self.per_size = False
        self.main.run = self.compile_graph(self.main.gm, example_inputs or self.example_inputs,
                                           self.phase, False)

    def _variant(self, causal: frozenset[str]) -> Variant:
        gm = _copy_graph_module(self.original)
        decisions = analyse(gm.graph, self.config)
        for mine, theirs in zip(decisions, self.decisions):
            mine.causal = theirs.causal
            if not theirs.rewritten and mine.rewritten:
                mine.refuse(theirs.reason)
        ios = apply(gm, decisions, causal, self.probe)
        return Variant(gm, ios, gm.forward)

    # -- before a call ---------------------------------------------------------------------

    def _has_padding(self, args) -> bool:
        """Whether a padding mask input masks a token (a 0 in a 2-D attention_mask)."""
        return any(bool((args[i] == 0).any()) for i in self.padding)

    def _entries(self, args: list) -> list[list[int]]:
        """The Mirror entry of each compressed cache the graph reads. A decode step mostly reads
        the caches the step before it read (checked by `_make_room`, `self.last`): their
        entries are reused, no lookup (the run time's host cost is per layer, every step)."""
        last = self.last
        if last is not None and last.recycled == S.POOL.recycled and \
                all(ref() is args[io.inputs[0]].untyped_storage()
                    for io, ref in zip(self.ios, last.storages)):
            return last.entries
        self.last = None
        return [MIRROR.entry(args[io.inputs[0]]) for io in self.ios]

    def _make_room(self, args: list, entries: list[list[int]]) -> None:
        """Every compressed cache a decode step appends to gets a free slot: a DynamicCache's
        is grown (twice its slots); a RocketKVCache's is sized by its max_new_tokens. A
        DynamicCache cropped along its tokens (not a size the pass makes) is refused."""
        if self.last is not None and all(e[0] < n for e, n in zip(entries, self.last.slots)):
            return
        stateful = bool(self.config.method.state)
        for io, entry in zip(self.ios, entries):
            k, v = io.inputs
            keys = args[k]
            slots = self._exact_slots(keys, args[v])
            if io.source is KVSource.PACKED and \
                    S.slot_bucket(slots, keys.shape[-1], keys.element_size(), stateful) != slots:
                raise NotImplementedError(
                    "rocketkv: a compressed DynamicCache was cut along its tokens (crop: "
                    "assisted generation, or DoLa), which its packed layout does not take; "
                    "pass a RocketKVCache, which crops its stored tokens")
            if entry[0] < slots:
                continue
            if io.source is KVSource.ROCKETKV:
                raise RuntimeError(
                    "rocketkv: the RocketKVCache is full: generate more tokens than its "
                    "max_new_tokens only with a cache built with a larger one, "
                    "RocketKVCache(config, max_new_tokens=...)")
            for i, tensor in zip((k, v), _grown(keys, args[v], self.config.method.state)):
                self._swap(args, i, tensor)
            MIRROR.entries[args[k].untyped_storage()] = entry
        keys = [args[io.inputs[0]] for io in self.ios]
        self.last = CheckedCaches([weakref.ref(k.untyped_storage()) for k in keys], entries,
                                  [self._exact_slots(args[io.inputs[0]], args[io.inputs[1]])
                                   for io in self.ios],
                                  S.POOL.recycled)

    def _exact_slots(self, keys: torch.Tensor, values: torch.Tensor) -> int:
        """The slots a compressed cache has for new tokens (a quantized cache's header says how
        many rows its codes take: read only when the policy quantizes)."""
        stateful = bool(self.config.method.state)
        if self.config.method.kv_bits is None:
            return S.Layout.of(keys, stateful).slots
        return S.exact_slots(keys, values, stateful)

    def _swap(self, args: list, index: int, tensor: torch.Tensor) -> None:
        """Another cache tensor in input `index`, and its length in the symbolic-size inputs
        Dynamo passes beside it."""
        args[index] = tensor
        for i in self.sizes_of.get(index, ()):
            args[i] = tensor.shape[2]

    def _check_turn(self, args) -> None:
        """A turn must continue every row's logical positions: some integer input of the graph
        (the positions) holds them. transformers slices a new turn off a DynamicCache by its
        stored length, which eviction shortened: that turn's positions start elsewhere."""
        io = self.ios[0]
        keys = args[io.inputs[0]]
        layer = S.read(keys, args[io.inputs[1]])
        start = layer.position.to(torch.int64).view(-1, 1)
        if len(set(start.view(-1).tolist())) > 1:
            raise NotImplementedError(
                "rocketkv: a new turn of a padded batch is not supported (transformers slices "
                "one turn for every row): pass one conversation per call")
        for arg in args:
            if isinstance(arg, torch.Tensor) and not arg.is_floating_point() and \
                    arg.dim() == 2 and arg.shape[0] in (1, keys.shape[0]) and \
                    torch.equal(arg.to(start), start[:arg.shape[0]] + torch.arange(
                        arg.shape[-1], device=start.device)):
                return
        raise NotImplementedError(
            "rocketkv: a new turn over a compressed cache must continue its positions, but "
            "transformers takes a new turn's tokens and positions from a DynamicCache's stored "
            "length, which eviction shortened. Pass a RocketKVCache (it keeps each sequence's "
            "logical length) for conversations, or use chunked prefill (prefill_chunk_size)")

    # -- a call ----------------------------------------------------------------------------

    def __call__(self, *args):
        args = list(args)
        if self.fatal:
            return self._refused(args, self.fatal[0].reason, self.fatal)
        entries = [] if self.phase == PREFILL else self._entries(args)
        flags = 0
        for entry in entries:
            flags |= entry[1]
        if self.unproven and flags & S.Flag.PROBE:
            return self._refused(args, "its positions may derive from the stored cache "
                                 "length, which this graph cannot check (it is static here)",
                                 self.unproven)
        if flags & S.Flag.EXACT:
            # a RocketKVCache prefilled without the pass keeps every token at its position:
            # the graph as traced attends to it exactly, through transformers' mask
            return self.original(*args)
        variant = self.main
        if self.phase == PREFILL and self.padding and self._has_padding(args):
            log.warning("rocketkv: a padded prompt: the prefill keeps its attention mask and "
                        "runs uncompiled, each row evicted over its own tokens")
            variant = self.padded = self.padded or self._variant(frozenset())
        elif self.phase == DECODE:
            self._make_room(args, entries)
        elif self.phase == TURN:
            self._check_turn(args)
        outputs = self._run(variant, args)
        if self.phase == DECODE:
            for entry in entries:   # one token appended to every row
                entry[0] += 1
        return self._returned(variant, args, list(outputs))

    def _run(self, variant: Variant, args: list):
        if not self.per_size:
            return variant.run(*args)
        # a graph per size of the caches, and per size of the other inputs it reads whose size
        # Dynamo left symbolic (and per value of its integer inputs)
        size = tuple(args[io.inputs[1]].shape[:3] for io in variant.ios)
        graphs = self.sizes.setdefault(size, [])
        for run, fixed in graphs:
            if all(_size_key(args[i]) == key for i, key in fixed.items()):
                return run(*args)
        if len(graphs) == PER_SIZE_GRAPHS:
            placeholders = list(variant.gm.graph.find_nodes(op="placeholder"))
            changing = sorted({placeholders[i].name for _, fixed in graphs for i in fixed
                               if fixed[i] != graphs[0][1].get(i)})
            warn_once(f"rocketkv: a decode step's inputs {changing} change size from step to "
                      "step: it runs as one graph of symbolic sizes, without CUDA graphs")
            self._compile_symbolic()
            return self.main.run(*args)
        compiled = _with_sizes_fixed(variant.gm, args, lambda gm, inputs: (
            self.compile_graph(gm, inputs, DECODE, True)))
        graphs.append(compiled)
        return compiled[0](*args)

    def _returned(self, variant: Variant, args: list, outputs: list) -> list:
        """The outputs, their compressed caches marked (and mirrored) for the steps after."""
        for io in variant.ios:
            if io.phase == DECODE:   # appended in place (its Mirror entry advanced)
                continue
            keys = [outputs[i] for i in io.outputs[0]]
            for tensor in keys + [outputs[i] for i in io.outputs[1]]:
                _mark_cache(tensor, self.config)
            if io.whole is not None and keys:
                WHOLE_PROMPTS[keys[0].untyped_storage()] = tuple(outputs[i] for i in io.whole)
        if variant.ios and variant.ios[0].whole is not None:
            del outputs[len(outputs) - 2 * len(variant.ios):]
        if self.phase == DECODE and WHOLE_PROMPTS:   # proven: positions do not derive from the
            for io in variant.ios:                     # stored length
                WHOLE_PROMPTS.pop(args[io.inputs[0]].untyped_storage(), None)
        return outputs

    def _refused(self, args: list, reason: str, sites: list[SiteDecision]):
        """A graph that reads a compressed cache but cannot decode it (`reason`): it runs
        exactly over the whole prompts its caches were compressed from, if their prefill kept
        them, or raises."""
        placeholders = list(self.original.graph.find_nodes(op="placeholder"))
        pairs = [(placeholders.index(d.key.past), placeholders.index(d.value.past))
                 for d in sites if d.key.past is not None]
        wholes = [WHOLE_PROMPTS.get(args[k].untyped_storage()) for k, _ in pairs]
        if not pairs or any(w is None for w in wholes):
            raise NotImplementedError(
                f"rocketkv: a graph reads a compressed cache that it cannot decode ({reason}), "
                "and the cache cannot be restored. Pass explicit positions (position_ids) to "
                "compress this model, or compile it with token_budget=None")
        warn_once(f"rocketkv: the model's decode cannot read a compressed cache ({reason}): "
                  "it runs exactly, over the whole prompt")
        for (k, v), (keys, values) in zip(pairs, wholes):
            self._swap(args, k, keys)
            self._swap(args, v, values)
        return self.original(*args)


def _size_inputs(gm: GraphModule) -> dict[int, list[int]]:
    """For each tensor input whose token length is symbolic, the integer inputs holding that
    length: Dynamo passes each symbolic size twice, inside the tensor and as an input of its
    own, and a cache swapped in must update both."""
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    ints: dict = {}
    for i, node in enumerate(placeholders):
        v = value_of(node)
        if isinstance(v, torch.SymInt):
            ints.setdefault(v.node.expr, []).append(i)
    sizes = {}
    for i, node in enumerate(placeholders):
        v = value_of(node)
        if isinstance(v, torch.Tensor) and v.dim() == 4 and isinstance(v.shape[2], torch.SymInt):
            sizes[i] = ints.get(v.shape[2].node.expr, [])
    return sizes


def _capturable(rewritten: list[SiteDecision]) -> bool:
    """Whether CUDA graphs hold these decode sites' ops: those that read their plan on the
    device (the Triton kernels, exact attention), not the PyTorch reference of a sparse policy,
    which reads it on the host."""
    return bool(rewritten) and all(d.kernel in ("triton", "exact") and not d.method.state
                                   for d in rewritten)


# Graphs a decode step compiles for one size of its caches (its other inputs changing size)
# before it runs as one graph of symbolic sizes instead.
PER_SIZE_GRAPHS = 2


def _size_key(arg):
    return tuple(arg.shape) if isinstance(arg, torch.Tensor) else arg


def _with_sizes_fixed(gm: GraphModule, args: list, compile_graph: Compiler) -> tuple:
    """`gm` compiled for the sizes of `args`, and what it was specialized to: {input index:
    its value (an integer input) or its shape (a tensor input of symbolic size)}, for the
    inputs it reads.

    Inductor's CUDA graphs take only tensor inputs (an int among them skips them without a
    word), so the integer inputs (the symbolic sizes Dynamo passes beside dynamic tensors) become
    constants of the graph and are dropped from its inputs. Most are dead once the pass has
    rewritten attention (the attention mask, whose length grows every step): those inputs are
    dropped too (Inductor checks the size of every input it is given), so that a graph serves
    every step.

    An input the graph returns as it is (a DynamicCache's packed layer, appended in place) is
    returned by `run`, not by the compiled graph: a CUDA-graph recording keeps every output
    that lies in a static input's memory for as long as it lives, so each call's caches
    would stay allocated for good (one recording per call of an evaluation loop)."""
    gm = _copy_graph_module(gm)
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    output = gm.graph.output_node()
    returned = output.args[0]
    inputs_returned = {}   # output position: input index
    if isinstance(returned, (tuple, list)):   # as Dynamo's graphs return
        inputs_returned = {at: placeholders.index(out) for at, out in enumerate(returned)
                           if getattr(out, "op", None) == "placeholder"}
        output.args = (tuple(out for at, out in enumerate(returned)
                             if at not in inputs_returned),)
    eliminate_dead_code(gm.graph)
    read = [i for i, p in enumerate(placeholders) if p.users]
    fixed = {i: _size_key(args[i]) for i in read if not isinstance(args[i], torch.Tensor) or any(
        isinstance(n, torch.SymInt) for n in getattr(value_of(placeholders[i]), "shape", ()))}
    constants = {placeholders[i]: args[i] for i in read
                 if not isinstance(args[i], torch.Tensor)}
    for node in gm.graph.nodes:
        node.args = map_arg(node.args, lambda n: constants.get(n, n))
        node.kwargs = map_arg(node.kwargs, lambda n: constants.get(n, n))
    for p in placeholders:
        if not p.users:
            gm.graph.erase_node(p)
    gm.recompile()
    tensors = [i for i in read if isinstance(args[i], torch.Tensor)]
    compiled = compile_graph(gm, [args[i] for i in tensors])

    def run(*call_args):
        outputs = compiled(*[call_args[i] for i in tensors])
        if inputs_returned:
            outputs = list(outputs)
            for at, i in inputs_returned.items():   # by position: each lands where it was
                outputs.insert(at, call_args[i])
        return outputs
    return run, fixed


def _grown(keys: torch.Tensor, values: torch.Tensor, state: str) -> tuple:
    """A compressed DynamicCache layer with twice the slots (its state and header copied), for
    generating past the option's max_new_tokens."""
    old = S.read(keys, values)
    coded = S.coded(keys, values, bool(state))
    n = old.keys.shape[2] if coded is None else coded[1]
    slots = S.slot_bucket(2 * n, keys.shape[3], old.keys.element_size(), bool(state))
    new_keys, new_values, new = S.allocate(keys.shape[0], keys.shape[1], keys.shape[3],
                                           values.shape[3], slots, state, old.keys.dtype,
                                           keys.device, None if coded is None else coded[0])
    new.keys[:, :, :n], new.values[:, :, :n] = old.keys[:, :, :n], old.values[:, :, :n]
    if coded is not None:   # the codes, after the new exact slots
        rows = coded[0].rows
        new_keys[:, :, slots:slots + rows] = keys[:, :, n:n + rows]
        new_values[:, :, slots:slots + rows] = values[:, :, n:n + rows]
    if old.layout.state:
        new.state[..., :n] = old.state
    new.header.copy_(old.header)
    if coded is not None:
        new.set_word(S.Word.CODE_ROW, slots)
    return new_keys, new_values


def _mark_cache(tensor: torch.Tensor, config: RocketKVConfig) -> None:
    """A compressed cache's tensors: Dynamo traces their length as a symbol (one decode graph
    for every size), and on CUDA they are static addresses (updated in place, so a CUDA graph
    replays over them without a copy)."""
    torch._dynamo.maybe_mark_dynamic(tensor, 2)
    if tensor.is_cuda and config.cudagraphs is not False:
        torch._dynamo.mark_static_address(tensor, guard=False)


def _concatenates_packed(graph: Graph) -> bool:
    """Whether the graph concatenates a compressed cache input as numbers (a DynamicCache's
    update with no attention over it in this graph)."""
    return any(user.op == "call_function" and user.target is torch.cat
               for p in graph.find_nodes(op="placeholder") if S.is_packed(value_of(p))
               for user in p.users)


def _raising(error: Exception) -> Callable:
    """A compiled function that raises `error` when called: an error of the options reaches
    the user as itself at the first call (Dynamo wraps what a backend raises)."""
    def run(*args):
        raise error
    return run


def _warn_refusals(decisions: list[SiteDecision], config: RocketKVConfig) -> None:
    """One warning per reason a site that reads a cache stays exact (the explain report
    lists them all)."""
    if not config.compresses:
        return
    for d in decisions:
        # a cache no prefill compressed was warned about at its prefill (or its rollback)
        quiet = d.key.source in (KVSource.NONE, KVSource.EXTERNAL, KVSource.GROWN)
        if d.reason and d.reason.startswith(UNSUPPORTED):   # one warning for every graph
            warn_once(f"rocketkv: {d.reason}")
        elif not (d.rewritten or d.fatal or quiet):
            warn_once(f"rocketkv: attention over {d.key.source.value} stays exact: {d.reason}")


def _keep_room_for_decode(decisions: list[SiteDecision]) -> None:
    """A prompt is compressed only if Dynamo can still compile this function's decode step:
    past `recompile_limit` graphs Dynamo runs it eagerly, and an eager decode step cannot read
    a compressed cache. Near the limit, prefills stay exact (and the user is told)."""
    compile_id = torch._guards.CompileContext.current_compile_id()
    compiled = getattr(compile_id, "frame_compile_id", None) or 0
    limit = torch._dynamo.config.recompile_limit
    if compiled + 2 < limit:
        return
    reason = (f"Dynamo has compiled this function {compiled} times, and runs it eagerly after "
              f"its recompile_limit ({limit}): a compressed cache could meet an eager decode "
              "step. Raise torch._dynamo.config.recompile_limit or call torch._dynamo.reset()")
    for d in decisions:
        if d.rewritten and d.phase == PREFILL:
            d.refuse(reason)


def _install_recompile_limit() -> None:
    if torch._dynamo.config.recompile_limit < RECOMPILE_LIMIT:
        log.debug("rocketkv: raising torch._dynamo.config.recompile_limit to %d",
                  RECOMPILE_LIMIT)
        torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT
    _RecompileLimitWatch.install()


class _RecompileLimitWatch(logging.Filter):
    """Dynamo runs a function eagerly once it has compiled it `recompile_limit` times: exact,
    uncompressed. It says so in its log; this turns that into the backend's warning."""

    installed = False

    @classmethod
    def install(cls) -> None:
        if not cls.installed:
            logging.getLogger("torch._dynamo.convert_frame").addFilter(cls())
            cls.installed = True

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "hit config" in message and "recompile_limit" in message:
            warn_once("rocketkv: Dynamo reached its recompile limit for a function and runs it "
                      "eagerly from now on: exact, uncompressed. Raise "
                      "torch._dynamo.config.recompile_limit or call torch._dynamo.reset()")
        return True


def make_backend(compiler: Compiler | None = None, on_analysis: Callable | None = None,
                 decode_compiler: Compiler | None = None):
    """A Dynamo backend running the RocketKV pass before `compiler` (by default Inductor: for
    decode graphs tuned, with CUDA graphs on CUDA unless the options turn them off; prefill
    and turn graphs only with the `compile_prefill` option, otherwise they run as traced;
    `decode_compiler`, if given, compiles the decode graphs instead)."""

    def backend(gm: GraphModule, example_inputs: Sequence, options=None, mode=None):
        try:
            config = RocketKVConfig.from_options(options)
            if mode not in (None, "default"):
                raise ValueError(f"rocketkv: unsupported mode {mode!r}")
        except ValueError as error:
            return _raising(error)
        _install_recompile_limit()
        decisions = analyse(gm.graph, config)
        proofs = {}   # one proof per mask: a model's layers share theirs
        for d in decisions:
            if d.phase == PREFILL and d.rewritten and d.site.mask is not None \
                    and not d.site.is_causal:
                key = (d.site.mask, d.site.kind, str(value_of(d.site.query).shape))
                if key not in proofs:
                    proofs[key] = prove_causal(gm, d.site, example_inputs)
                d.causal = proofs[key]
                if d.causal == NOT_CAUSAL:
                    d.refuse(NOT_CAUSAL_PREFILL)
        _keep_room_for_decode(decisions)
        if on_analysis is not None:
            on_analysis(decisions)
        for d in decisions:
            log.debug("rocketkv site %s: %s", d.site.name, d.phase if d.rewritten else d.reason)
        _warn_refusals(decisions, config)
        on_cuda = any(isinstance(x, torch.Tensor) and x.is_cuda for x in example_inputs)
        cudagraphs = on_cuda and config.cudagraphs is not False

        def compile_graph(graph: GraphModule, inputs: Sequence, phase: str,
                          capturable: bool = False) -> Callable:
            if phase == DECODE and decode_compiler is not None:
                return decode_compiler(graph, inputs)
            if compiler is not None:
                return compiler(graph, inputs)
            if phase in (PREFILL, TURN) and not config.compile_prefill:
                return graph.forward
            _allow_dynamic_output_shapes(inputs)
            decode = phase == DECODE
            return inductor(graph, inputs, decode=decode,
                            cudagraphs=cudagraphs and decode and capturable,
                            layers_once=config.compile_layers_once and decode and capturable)

        if not any(d.rewritten or d.fatal for d in decisions):
            if _concatenates_packed(gm.graph):
                return _raising(NotImplementedError(
                    "rocketkv: a graph extends a compressed cache but holds no attention over "
                    "it (a graph break between a cache update and its attention?): it cannot "
                    "run; the explain report shows where"))
            return compile_graph(gm, example_inputs, "plain")
        return Runtime(gm, example_inputs, config, decisions, compile_graph,
                       on_cuda)

    return backend


rocketkv = make_backend()


@contextlib.contextmanager
def forward_compiled(model: torch.nn.Module, backend: Callable):
    """`model.forward` compiled with `backend` for the block (`model.forward =
    torch.compile(model.forward, backend=...)`, the README's usage), then as it was: the
    class's forward again, or the instance's own if it had one."""
    own = "forward" in vars(model)
    forward = model.forward
    model.forward = torch.compile(forward, backend=backend)
    try:
        yield
    finally:
        if own:
            model.forward = forward
        else:
            del model.forward
