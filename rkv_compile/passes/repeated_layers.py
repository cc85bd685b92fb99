"""Compile a model's repeated layers once: each decoder layer of a graph becomes calls of
subgraphs all layers share (`torch.ops.higher_order.invoke_subgraph`), which AOTAutograd traces
and Inductor lowers once for all of them, as `torch.compiler.nested_compile_region` does when a
model marks its layers (transformers does not).

Why: a decode graph holds every layer (32 for an 8B model) and Inductor's cost grows with them:
on the H200 its decode graph took 41 s of the 90-s first call at 32K (BENCHMARKS.md). The
kernels and their launches are the same either way (a layer's kernels are already shared);
what is lost is fusion across a layer boundary (the residual add into the next norm).

A layer is the run of nodes, in graph order, from the first to the last whose module stack
names one child of the model's largest `nn.ModuleList` (`model.layers.N`); the nodes between
(the rewrite's ops, a function the layer calls) belong to it. A node that writes to a tensor
it is given (the cache's append) cuts its layer into pieces and stays in the graph. Pieces
whose nodes, constants and input shapes are the same share a subgraph; anything else (a
piece of its own kind, a graph with symbolic sizes, a piece reading or returning something
other than tensors) stays inline.
"""
from __future__ import annotations

import operator
import re
from collections import defaultdict

import torch
from torch.fx import Graph, GraphModule, Node
from torch.fx.node import map_aggregate

from ..diagnostics import log

_CHILD = re.compile(r"^(.*)\.(\d+)$")
stats = {"outlined": 0}   # pieces replaced by a shared subgraph's call, over the process


def outline_repeated_layers(gm: GraphModule, example_inputs) -> int:
    """Replace the pieces of `gm`'s layers that repeat by calls of shared subgraphs, in place;
    the number of pieces replaced (0: the graph is left as it was)."""
    if not all(isinstance(x, torch.Tensor) for x in example_inputs):
        return 0    # invoke_subgraph takes no symbolic sizes as operands
    pieces = _pieces(gm.graph)
    if len(pieces) < 2:
        return 0
    values = _fake_values(gm, example_inputs)
    groups: dict[tuple, list[_Piece]] = defaultdict(list)
    for piece in pieces:
        signature = piece.signature(values)
        if signature is not None:
            groups[signature].append(piece)
    shared = {}
    for index, group in enumerate(g for g in groups.values() if len(g) > 1):
        shared.update({id(piece): f"rocketkv_layer_{index}" for piece in group})
        gm.add_submodule(f"rocketkv_layer_{index}", group[0].subgraph(gm))
    renamed: dict[Node, Node] = {}   # an outlined piece's outputs, by the nodes they replace
    for piece in pieces:
        if id(piece) in shared:
            piece.replace_by_call(gm.graph, shared[id(piece)], renamed)
    replaced = len(shared)
    stats["outlined"] += replaced
    if replaced:
        gm.graph.lint()
        gm.recompile()
    log.debug("rocketkv: %d of %d layer pieces outlined into %d subgraphs", replaced, len(pieces),
              sum(len(g) > 1 for g in groups.values()))
    return replaced


class _Piece:
    """A run of one layer's nodes, what they read from before it and what is read of them
    after."""

    def __init__(self, nodes: list[Node]):
        self.nodes = nodes
        inside = set(nodes)
        self.inputs: list[Node] = []
        for node in nodes:
            for used in node.all_input_nodes:
                if used not in inside and used not in self.inputs:
                    self.inputs.append(used)
        self.outputs = [n for n in nodes if any(u not in inside for u in n.users)]

    def signature(self, values: dict) -> tuple | None:
        """What two pieces must share to share a subgraph (None: this one cannot be outlined)."""
        local = {n: i for i, n in enumerate(self.nodes)}
        ins = {n: i for i, n in enumerate(self.inputs)}

        def key(arg):
            if isinstance(arg, Node):
                return ("local", local[arg]) if arg in local else ("in", ins[arg])
            return ("const", type(arg), arg)

        metas = []
        for n in self.inputs + self.outputs:
            v = values.get(n)
            if not isinstance(v, torch.Tensor):
                return None
            metas.append((tuple(v.shape), v.stride(), v.dtype, v.device, v.storage_offset()))
        ops = tuple((n.op, n.target, map_aggregate(n.args, key), map_aggregate(n.kwargs, key))
                    for n in self.nodes)
        try:
            hash(ops)
        except TypeError:   # a constant Python cannot hash (a list): compare it as text
            ops = repr(ops)
        return ops, tuple(metas), tuple(local[n] for n in self.outputs)

    def subgraph(self, gm: GraphModule) -> GraphModule:
        graph = Graph()
        env = {n: graph.placeholder(n.name) for n in self.inputs}
        for n in self.inputs:
            env[n].meta = dict(n.meta)
        for n in self.nodes:
            env[n] = graph.node_copy(n, lambda x: env[x])
        graph.output(tuple(env[n] for n in self.outputs))
        return GraphModule(gm, graph)

    def replace_by_call(self, graph: Graph, name: str, renamed: dict[Node, Node]) -> None:
        with graph.inserting_before(self.nodes[0]):
            subgraph = graph.get_attr(name)
            inputs = [renamed.get(n, n) for n in self.inputs]
            call = graph.call_function(torch.ops.higher_order.invoke_subgraph,
                                       (subgraph, name, *inputs))
            results = [graph.call_function(operator.getitem, (call, i))
                       for i in range(len(self.outputs))]
        for old, new in zip(self.outputs, results):
            new.meta = dict(old.meta)
            old.replace_all_uses_with(new)
            renamed[old] = new
        for node in reversed(self.nodes):
            graph.erase_node(node)


def _layer_of(node: Node) -> tuple[str, int] | None:
    """(the ModuleList, the child's index) of the outermost list child in `node`'s module stack."""
    for path, _ in (node.meta.get("nn_module_stack") or {}).values():
        match = _CHILD.match(path)
        if match:
            return match.group(1), int(match.group(2))
    return None


def _pieces(graph: Graph) -> list[_Piece]:
    """The children of the module list the most nodes belong to, each as its run of nodes cut
    at the nodes that write to their inputs."""
    body = [n for n in graph.nodes if n.op in ("call_function", "call_method", "call_module")]
    owners = [_layer_of(n) for n in body]
    counts: dict[str, set] = defaultdict(set)
    for owner in owners:
        if owner is not None:
            counts[owner[0]].add(owner[1])
    if not counts:
        return []
    container = max(counts, key=lambda c: len(counts[c]))
    spans: dict[int, list[int]] = {}
    for position, owner in enumerate(owners):
        if owner is not None and owner[0] == container:
            span = spans.setdefault(owner[1], [position, position])
            span[1] = position
    ordered = sorted(spans.values())
    if any(a[1] >= b[0] for a, b in zip(ordered, ordered[1:])):
        return []   # layers interleave: no clean cut
    pieces = []
    for first, last in ordered:
        piece: list[Node] = []
        for node in body[first:last + 1]:
            if _mutates(node):
                pieces.append(piece)
                piece = []
            else:
                piece.append(node)
        pieces.append(piece)
    return [_Piece(piece) for piece in pieces if piece]


def _mutates(node: Node) -> bool:
    """Whether `node` writes to a tensor it is given (the cache's append, an in-place method,
    an item assignment): such a node stays between subgraphs, since AOTAutograd functionalizes
    the writes of a subgraph's custom op only if it makes none."""
    target = node.target
    if target is operator.setitem:
        return True
    schema = getattr(target, "_schema", None)
    if schema is not None:
        return schema.is_mutable
    name = target if node.op == "call_method" else getattr(target, "__name__", "")
    return isinstance(name, str) and name.endswith("_") and not name.startswith("__")


def _fake_values(gm: GraphModule, example_inputs) -> dict[Node, object]:
    """Every node's value for `example_inputs`' sizes (the graph's metadata has Dynamo's
    symbolic sizes, which differ from layer to layer by name only)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    values: dict[Node, object] = {}

    class Recording(FakeTensorProp):
        def run_node(self, n):
            result = super().run_node(n)
            values[n] = result
            return result

    Recording(gm, mode).propagate(*[mode.from_tensor(x) for x in example_inputs])
    return values
