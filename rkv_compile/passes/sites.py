"""Find attention in a Dynamo (torch-level) FX graph.

Two shapes of attention are recognised, each normalised to one `AttentionSite`:
- `scaled_dot_product_attention`, in any argument spelling (positional or keyword, `enable_gqa`);
- hand-written attention: matmul(q, k^T) -> scale -> mask -> softmax -> [cast/dropout] -> matmul(., v).
Keys and values are followed back through `repeat_kv` (expand + reshape, or repeat_interleave) to
the tensors the cache holds, so GQA sites are seen with their real KV heads.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
import operator

import torch
from torch.fx import Graph, Node


def _sdpa_signature(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                    enable_gqa=False):
    """The Python signature of scaled_dot_product_attention, to bind call arguments against."""


SDPA_SIGNATURE = inspect.signature(_sdpa_signature)
SDPA_TARGETS = {
    torch._C._nn.scaled_dot_product_attention,
    torch.nn.functional.scaled_dot_product_attention,
    torch.ops.aten.scaled_dot_product_attention.default,
}
MATMULS = {torch.matmul, operator.matmul, torch.Tensor.matmul}
SOFTMAXES = {torch.softmax, torch.nn.functional.softmax, torch.Tensor.softmax}
CASTS = {"to", "float", "half", "bfloat16", "type_as", "type", "contiguous"}
DROPOUTS = {torch.nn.functional.dropout, torch.dropout}


@dataclasses.dataclass
class AttentionSite:
    """One attention computation: out = softmax(q k^T * scale + mask) v, per head."""

    kind: str                 # "sdpa" or "manual"
    output: Node              # the node whose value is the attention output (B, Hq, S, Dv)
    query: Node
    key: Node                 # the cached keys, before any repeat_kv: (B, Hkv, n, D)
    value: Node
    mask: Node | None         # additive float, or boolean with True = attend
    mask_is_fill: bool        # mask is masked_fill's condition (True = masked out)
    is_causal: bool
    scale: float | None       # None: 1/sqrt(D)
    dropout: float

    @property
    def name(self) -> str:
        return self.output.name


def value_of(node):
    """The example value Dynamo recorded for a node (tensor, SymInt, or None)."""
    if not isinstance(node, Node):
        return node
    return node.meta.get("example_value", node.meta.get("val"))


def shape_of(node) -> tuple | None:
    v = value_of(node)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _is_call(node, functions=(), methods=()) -> bool:
    if not isinstance(node, Node):
        return False
    if node.op == "call_function":
        return node.target in functions
    return node.op == "call_method" and node.target in methods


def _arg(node: Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _strip_repeat_kv(node: Node) -> Node:
    """x repeated over a GQA group -> x. Recognises HF's repeat_kv and repeat_interleave(dim=1)."""
    if _is_call(node, (torch.repeat_interleave,), ("repeat_interleave",)):
        if _arg(node, 2, "dim") in (1, -3):
            return node.args[0]
    if _is_call(node, (torch.reshape,), ("reshape", "view")):
        expanded = node.args[0]
        if _is_call(expanded, (), ("expand",)):
            inner = expanded.args[0]
            if _is_call(inner, (operator.getitem,)) and _is_group_axis_index(inner.args[1]):
                return inner.args[0]
            if _is_call(inner, (torch.unsqueeze,), ("unsqueeze",)) and _arg(inner, 1, "dim") == 2:
                return inner.args[0]
    return node


def _is_group_axis_index(index) -> bool:
    """x[:, :, None] or x[:, :, None, :, :]: a new axis after the head axis."""
    if not isinstance(index, tuple) or len(index) < 3 or index[2] is not None:
        return False
    return all(isinstance(i, slice) and i == slice(None) for i in index[:2] + index[3:])


def _sdpa_site(node: Node) -> AttentionSite:
    bound = SDPA_SIGNATURE.bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    a = bound.arguments
    return AttentionSite("sdpa", node, a["query"], _strip_repeat_kv(a["key"]),
                         _strip_repeat_kv(a["value"]), a["attn_mask"], False, bool(a["is_causal"]),
                         a["scale"], float(a["dropout_p"]))


def _number(x) -> bool:
    return isinstance(x, numbers.Number) and not isinstance(x, bool)


def _manual_site(pv: Node) -> AttentionSite | None:
    """Walk back from matmul(probs, v) to matmul(q, k^T); None if the chain is not attention."""
    probs, value = pv.args[0], pv.args[1]
    dropout = 0.0
    node = probs
    while True:
        if _is_call(node, (), CASTS):
            node = node.args[0]
        elif _is_call(node, DROPOUTS):
            training = _arg(node, 2, "training", True)
            dropout = float(_arg(node, 1, "p", 0.5)) if training else 0.0
            node = node.args[0]
        else:
            break
    if not _is_call(node, SOFTMAXES, ("softmax",)) or _arg(node, 1, "dim") not in (-1, 3):
        return None
    node = node.args[0]
    scale, mask, mask_is_fill = 1.0, None, False
    while True:
        if _is_call(node, (), CASTS):
            node = node.args[0]
        elif _is_call(node, (operator.mul, torch.mul), ("mul",)) and \
                _number(node.args[1]):
            scale *= node.args[1]
            node = node.args[0]
        elif _is_call(node, (operator.mul, torch.mul), ("mul",)) and \
                _number(node.args[0]):
            scale *= node.args[0]
            node = node.args[1]
        elif _is_call(node, (operator.truediv, torch.div), ("div",)) and \
                _number(node.args[1]):
            scale /= node.args[1]
            node = node.args[0]
        elif scale == 1.0 and mask is None and _is_call(node, (operator.add, torch.add), ("add",)) and \
                isinstance(node.args[1], Node) and len(node.args) == 2 and not node.kwargs:
            mask = node.args[1]
            node = node.args[0]
        elif scale == 1.0 and mask is None and _is_call(node, (torch.masked_fill,), ("masked_fill",)) and \
                _number(node.args[2]) and math.isinf(node.args[2]) and node.args[2] < 0:
            mask, mask_is_fill = node.args[1], True
            node = node.args[0]
        else:
            break
    if not _is_call(node, MATMULS, ("matmul",)):
        return None
    query, key_t = node.args[0], node.args[1]
    key = _untranspose(key_t)
    if key is None:
        return None
    return AttentionSite("manual", pv, query, _strip_repeat_kv(key), _strip_repeat_kv(value), mask,
                         mask_is_fill, False, scale, dropout)


def _untranspose(node) -> Node | None:
    """k^T -> k, for transpose(-2, -1) / transpose(2, 3) / permute(0, 1, 3, 2) of a 4-D k."""
    if _is_call(node, (torch.transpose,), ("transpose",)):
        dims = {d % 4 for d in node.args[1:3]}
        return node.args[0] if dims == {2, 3} else None
    if _is_call(node, (torch.permute,), ("permute",)):
        order = node.args[1] if isinstance(node.args[1], (tuple, list)) else node.args[1:]
        return node.args[0] if tuple(order) == (0, 1, 3, 2) else None
    return None


def find_sites(graph: Graph) -> list[AttentionSite]:
    """Every attention site of the graph, in graph order."""
    sites = []
    for node in graph.nodes:
        if node.op == "call_function" and node.target in SDPA_TARGETS:
            sites.append(_sdpa_site(node))
        elif _is_call(node, MATMULS, ("matmul",)):
            site = _manual_site(node)
            if site is not None:
                sites.append(site)
    return sites
