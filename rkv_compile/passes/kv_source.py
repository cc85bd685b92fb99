"""Where an attention site's keys and values come from.

Only a site whose K/V are a cache that this graph writes back can be compressed: a fresh cache
(prefill: the graph returns the new keys, e.g. HF DynamicCache's first `cat` or a tuple cache's
`present`) or a grown one (decode: `cat([past, new])` with `past` a graph input, returned as the
new cache), and RocketKVCache's own ops (a new one at prefill, its buffers at decode, new
buffers for a new turn). Other
buffers written in place (static caches), sliding-window caches (the graph returns their last
tokens, a slice of the keys attended) and keys that are no cache stay exact.
"""
from __future__ import annotations

import dataclasses
import enum
import operator

import torch
from torch.fx import Node

from ..kernels import ops  # noqa: F401  (torch.ops.rocketkv)
from .sites import _is_call, value_of

IN_PLACE_WRITES = {"index_copy_", "index_put_", "copy_", "scatter_", "__setitem__", "setitem"}


class KVSource(enum.Enum):
    FRESH = "new cache"
    GROWN = "grown by cat"
    IN_PLACE = "written in place into a buffer"
    EXTERNAL = "graph input, not written"
    NONE = "no cache"
    WINDOW = "a sliding-window cache"
    NEW_ROCKETKV = "new RocketKVCache"
    ROCKETKV = "RocketKVCache"
    ROCKETKV_TURN = "RocketKVCache, new turn"


@dataclasses.dataclass
class KVOrigin:
    source: KVSource
    cache: Node              # the node whose value becomes (or is) the stored cache
    new: Node | None = None  # the keys this call adds
    past: Node | None = None  # GROWN: the cache the graph received


def returned_nodes(output: Node) -> set[Node]:
    """The nodes a graph returns (Dynamo returns a flat tuple)."""
    found: set[Node] = set()
    torch.fx.node.map_arg(output.args, found.add)
    return found


def _is_in_place_write(node: Node) -> bool:
    return node.op == "call_method" and node.target in IN_PLACE_WRITES or (
        node.op == "call_function" and getattr(node.target, "__name__", "") in IN_PLACE_WRITES)


def _written_in_place(node: Node) -> bool:
    """Is `node`, or the buffer it slices (a static cache read up to its length), written in
    place?"""
    while True:
        if _is_in_place_write(node) or any(_is_in_place_write(u) for u in node.users):
            return True
        if not (node.op == "call_function" and node.target is operator.getitem
                and isinstance(node.args[0], Node)):
            return False
        node = node.args[0]


def _calls(node: Node, op) -> bool:
    return node.op == "call_function" and node.target in (op, op.default)


def _windowed(node: Node, returned: set[Node]) -> bool:
    """Is a slice of `node`, not node itself, what the graph stores (a sliding-window cache)?"""
    return node not in returned and any(
        user in returned and user.op == "call_function" and user.target is operator.getitem
        for user in node.users)


def kv_origin(node: Node, returned: set[Node]) -> KVOrigin:
    # RocketKVCache (cache.py) stores a prompt through rocketkv.static_cache, appends to its
    # buffers through rocketkv.append_ and stores a new turn through rocketkv.extend_cache (whose
    # new buffers the turn attends to): `cache` is that call.
    if node.op == "call_function" and node.target is operator.getitem and \
            isinstance(node.args[0], Node) and node.args[1] in (0, 1) and \
            _calls(node.args[0], torch.ops.rocketkv.extend_cache):
        extend = node.args[0]
        return KVOrigin(KVSource.ROCKETKV_TURN, extend, new=extend.args[6 + node.args[1]],
                        past=extend.args[node.args[1]])
    for user in node.users:
        if _calls(user, torch.ops.rocketkv.static_cache) and user.args[:2].count(node):
            return KVOrigin(KVSource.NEW_ROCKETKV, user, new=node)
        if node.op == "placeholder" and _calls(user, torch.ops.rocketkv.append_) \
                and user.args[:2].count(node):
            return KVOrigin(KVSource.ROCKETKV, user, past=node)
    if _is_call(node, (torch.cat,)) and len(node.args[0]) == 2 and \
            (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)) in (2, -2):
        past, new = node.args[0]
        if _windowed(node, returned):
            return KVOrigin(KVSource.WINDOW, node)
        if node not in returned:
            return KVOrigin(KVSource.NONE, node)
        if isinstance(value_of(past), torch.Tensor) and value_of(past).numel() == 0:
            return KVOrigin(KVSource.FRESH, node, new=new)
        if past.op == "placeholder":
            return KVOrigin(KVSource.GROWN, node, new=new, past=past)
        return KVOrigin(KVSource.NONE, node)
    if _written_in_place(node):
        return KVOrigin(KVSource.IN_PLACE, node)
    if node.op == "placeholder":
        return KVOrigin(KVSource.EXTERNAL, node)
    if node in returned:
        return KVOrigin(KVSource.FRESH, node, new=node)
    if _windowed(node, returned):
        return KVOrigin(KVSource.WINDOW, node)
    return KVOrigin(KVSource.NONE, node)
