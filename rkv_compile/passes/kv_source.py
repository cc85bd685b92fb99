"""Where an attention site's keys and values come from.

Only a site whose K/V are a cache that this graph writes back can be compressed:
- a new cache: the prompt's keys, which the graph returns as its cache (HF DynamicCache's first
  `cat` onto an empty tensor, a tuple cache's `present`), or a RocketKVCache's `store`;
- a compressed cache: `cat([past, new])` where `past` is a graph input packed by an earlier
  graph (`rkv_compile.state`: an integer tensor), returned as the new cache, or a RocketKVCache's
  `append_` (a decode token) or `extend` (a new turn) over its packed input.
A cache grown by `cat` from plain keys holds a sequence no prefill of the pass compressed; it is
classified as such and stays exact. Buffers written in place (static caches), sliding-window
caches (the graph returns their last tokens, a slice of the keys attended) and keys that are
no cache stay exact too.
"""
from __future__ import annotations

import dataclasses
import enum
import operator

import torch
from torch.fx import Node

from .. import state
from ..kernels import ops  # noqa: F401  (torch.ops.rocketkv)
from .sites import _is_call, value_of

IN_PLACE_WRITES = {"index_copy_", "index_put_", "copy_", "scatter_", "__setitem__", "setitem"}
# A RocketKVCache layer hands attention views of its packed tensors (the slots, as numbers).
VIEWS = {"view", "narrow", "split", "__getitem__"}


class KVSource(enum.Enum):
    FRESH = "new cache"
    PACKED = "compressed cache"
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
    past: Node | None = None  # the (packed) cache the graph received


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


def calls(node, op) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in (op, op.default)


def _windowed(node: Node, returned: set[Node]) -> bool:
    """Is a slice of `node`, not node itself, what the graph stores (a sliding-window cache)?"""
    return node not in returned and any(
        user in returned and user.op == "call_function" and user.target is operator.getitem
        for user in node.users)


def _view_base(node: Node) -> Node:
    """The tensor a chain of views (RocketKVCache's slot views) starts from."""
    while (node.op == "call_method" and node.target in VIEWS) or (
            node.op == "call_function" and node.target in (operator.getitem, torch.narrow)):
        base = node.args[0]
        if not isinstance(base, Node) or calls(base, torch.ops.rocketkv.extend):
            return base
        node = base
    return node


def kv_origin(node: Node, returned: set[Node]) -> KVOrigin:
    rocketkv = _rocketkv_origin(node)
    if rocketkv is not None:
        return rocketkv
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
            packed = state.is_packed(value_of(past))
            return KVOrigin(KVSource.PACKED if packed else KVSource.GROWN, node, new=new,
                            past=past)
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


def _rocketkv_origin(node: Node) -> KVOrigin | None:
    """A RocketKVCache site (cache.py): its prompt goes into `rocketkv.store` (the site attends
    the prompt itself); a decode step's token into `rocketkv.append_` over the packed input,
    and the site attends views of it; a new turn's into `rocketkv.extend`, whose new tensors'
    views the site attends. `cache` is that call; `past` the packed input."""
    for user in node.users:
        if calls(user, torch.ops.rocketkv.store) and node in user.args[:2]:
            return KVOrigin(KVSource.NEW_ROCKETKV, user, new=node)
    base = _view_base(node)
    if calls(base, torch.ops.rocketkv.extend):
        return KVOrigin(KVSource.ROCKETKV_TURN, base, new=base.args[2], past=base.args[0])
    if base.op == "placeholder" and state.is_packed(value_of(base)):
        for append in base.users:
            if calls(append, torch.ops.rocketkv.append_) and base in append.args[:2]:
                index = 0 if append.args[0] is base else 1   # keys or values
                return KVOrigin(KVSource.ROCKETKV, append, new=append.args[2 + index], past=base)
    return None
