"""Alike layers compiled once (passes/repeated_layers.py): the outlined graph computes what the
graph did, shares a subgraph exactly among the layers that are alike, and a decode step on the
CUDA path (forced on the CPU) compiled so gives the oracle's tokens."""
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

from rkv_compile.passes.repeated_layers import outline_repeated_layers

# (activation, hidden width): a block's kind; blocks of one kind are alike
KINDS = [("relu", 8), ("gelu", 8), ("relu", 12)]


class Block(nn.Module):
    def __init__(self, kind: int, dim: int = 16):
        super().__init__()
        self.act, width = KINDS[kind]
        self.up, self.down = nn.Linear(dim, width), nn.Linear(width, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        h = self.up(self.norm(x))
        h = torch.relu(h) if self.act == "relu" else torch.nn.functional.gelu(h)
        return x + self.down(h)


class Stack(nn.Module):
    def __init__(self, kinds: list[int]):
        super().__init__()
        self.embed = nn.Linear(16, 16)
        self.layers = nn.ModuleList(Block(k) for k in kinds)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x).softmax(-1)


def dynamo_graph(model: nn.Module, args):
    """The graph Dynamo hands a backend for `model(*args)`, and its inputs."""
    captured = []
    torch._dynamo.reset()
    torch.compile(model, backend=lambda gm, ex: captured.append((gm, ex)) or gm.forward,
                  dynamic=False)(*args)
    return captured[0]


def invoke_calls(gm) -> list:
    return [n for n in gm.graph.nodes if n.target is torch.ops.higher_order.invoke_subgraph]


@settings(max_examples=8, deadline=None)
@given(kinds=st.lists(st.integers(0, len(KINDS) - 1), min_size=1, max_size=6),
       seed=st.integers(0, 2**16))
def test_alike_layers_share_a_subgraph_and_compute_the_same(kinds, seed):
    torch.manual_seed(seed)
    model = Stack(kinds).eval()
    x = torch.randn(2, 3, 16)
    gm, inputs = dynamo_graph(model, (x,))
    want = model(x)
    outlined = outline_repeated_layers(gm, inputs)
    alike = sum(kinds.count(k) for k in set(kinds) if kinds.count(k) > 1)
    assert outlined == alike
    calls = invoke_calls(gm)
    assert len(calls) == alike
    assert len({c.args[1] for c in calls}) == sum(kinds.count(k) > 1 for k in set(kinds))
    torch.testing.assert_close(gm(*inputs)[0], want)


def test_a_graph_of_symbolic_sizes_stays_inline():
    """invoke_subgraph takes no symbolic sizes: such a graph (Dynamo's dynamic shapes) is left
    as it was."""
    model = Stack([0, 0, 0]).eval()
    gm, inputs = dynamo_graph(model, (torch.randn(2, 3, 16),))
    before = str(gm.graph)
    assert outline_repeated_layers(gm, [*inputs, 3]) == 0
    assert str(gm.graph) == before


def test_a_mutating_op_stays_between_subgraphs():
    """A layer writing into a tensor it is given (the cache's append) is cut there: the write
    stays in the graph, its two sides are outlined (AOTAutograd cannot functionalize a custom
    op's writes inside a subgraph)."""
    class Writes(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(16, 16)

        def forward(self, x, cache):
            h = self.proj(x)
            cache.add_(h.sum(0))
            return x + torch.tanh(h) * cache.mean()

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(Writes() for _ in range(3))

        def forward(self, x, caches):
            for layer, cache in zip(self.layers, caches):
                x = layer(x, cache)
            return x

    model = Model()
    x = torch.randn(4, 16)
    caches = [torch.zeros(3, 16) for _ in range(3)]
    gm, inputs = dynamo_graph(model, (x, [c.clone() for c in caches]))
    want = model(x, caches)
    cache_inputs = [i for i in inputs if i.shape == (3, 16)]
    for cache in cache_inputs:   # as before the call Dynamo traced
        cache.zero_()
    assert outline_repeated_layers(gm, inputs) == 6
    writes = [n for n in gm.graph.nodes if n.target == "add_"]
    calls = invoke_calls(gm)
    assert len(writes) == 3 and len(calls) == 6 and len({c.args[1] for c in calls}) == 2
    order = list(gm.graph.nodes).index
    assert all(order(calls[2 * i]) < order(w) < order(calls[2 * i + 1])
               for i, w in enumerate(writes))
    for cache in cache_inputs:
        cache.zero_()
    torch.testing.assert_close(gm(*inputs)[0], want)
    for got, cache in zip(cache_inputs, caches):
        torch.testing.assert_close(got, cache)
