"""Prefill masks proven to be the plain causal mask, so the site can run SDPA with is_causal=True.

Why: transformers cannot read a padding mask's values while it is traced, so a compiled prefill
materialises its causal mask as a (batch, 1, L, L) tensor even when nothing is padded. SDPA then
cannot use its flash kernel, and its memory-efficient kernel expands the mask into an L x L bias:
at 128K tokens that is 16 GiB of mask plus 32 GiB of bias (out of memory on an H100 with an 8B
model), and from 16K on the prefill is 1.5-2.7x slower than with is_causal (BENCHMARKS.md).

The proof is an evaluation, which settles it because the mask can depend on nothing else: it
must be computed from constants, concrete sizes and 2-D integer inputs (padding masks) alone.
Evaluated with those padding inputs all ones, it must equal the causal mask everywhere. At run
time the backend checks that the padding inputs are all ones, and runs the site with its mask
when they are not. A large mask is checked by an Inductor-compiled reduction, which never
materialises it.
"""
from __future__ import annotations

import dataclasses

import torch
from torch.fx import Graph, GraphModule, Node

from .sites import AttentionSite, value_of

NOT_CAUSAL = "the mask is not the causal mask (with no padding)"
# A prefill whose mask is evaluated as not causal stays exact: its keys may not be the queries'
# own tokens (cross-attention), and later steps' masks are laid out by position.
NOT_CAUSAL_PREFILL = ("the prefill mask is not causal (cross-attention, a bidirectional prefix or a "
                      "window): what stage 1 kept could not be lined up with the masks of later "
                      "steps, which are laid out by position; attention stays exact")

# Masks with more elements than this are checked by a compiled reduction, not materialised.
EAGER_CHECK_ELEMENTS = 1 << 26


@dataclasses.dataclass
class CausalProof:
    padding: list[Node]        # inputs that must be all ones for the proof to hold


def prove_causal(gm: GraphModule, site: AttentionSite, example_inputs) -> CausalProof | str:
    """A proof that the site's mask is the plain causal one, or why there is none."""
    if site.kind != "sdpa":
        return "hand-written attention: its mask is kept"
    mask, q = value_of(site.mask), value_of(site.query)
    n = q.shape[2]
    if not isinstance(mask, torch.Tensor) or mask.dim() < 2 or not _concrete(mask.shape) \
            or not _concrete(q.shape) or tuple(mask.shape[-2:]) != (n, n):
        return "the mask is not a concrete (queries x keys) tensor"
    upstream = _upstream(site.mask)
    inputs = _mask_inputs(upstream)
    if isinstance(inputs, str):
        return inputs
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    values = []
    for node in inputs:
        example = example_inputs[placeholders.index(node)]
        values.append(torch.ones_like(example) if isinstance(example, torch.Tensor)
                      else value_of(node).node.maybe_as_int())
    check = _mismatch_module(gm, site, upstream, inputs)
    if mask.numel() <= EAGER_CHECK_ELEMENTS:
        mismatch = check(*values)[0]
    else:
        from torch._inductor.compile_fx import compile_fx
        mismatch = compile_fx(check, values)(*values)[0]
    if bool(mismatch):
        return NOT_CAUSAL
    return CausalProof([node for node in inputs if isinstance(value_of(node), torch.Tensor)])


def _concrete(shape) -> bool:
    return all(isinstance(s, int) or s.node.maybe_as_int() is not None for s in shape)


def _mask_inputs(upstream: set[Node]) -> list[Node] | str:
    """The graph inputs the mask is computed from (`upstream`: the nodes it depends on), if all
    are concrete sizes or padding masks."""
    inputs = []
    for node in upstream:
        if node.op in ("get_attr", "call_module"):
            return f"the mask reads module state ({node.target})"
        if node.op == "placeholder":
            v = value_of(node)
            padding = isinstance(v, torch.Tensor) and v.dim() == 2 and not v.is_floating_point() \
                and _concrete(v.shape)
            concrete_int = isinstance(v, torch.SymInt) and v.node.maybe_as_int() is not None
            if not (padding or concrete_int):
                return f"the mask reads input {node.name}, which is no 2-D padding mask"
            inputs.append(node)
    return sorted(inputs, key=lambda node: node.name)


def _mismatch_module(gm: GraphModule, site: AttentionSite, upstream: set[Node],
                     inputs: list[Node]) -> GraphModule:
    """A module computing any(mask != causal) from the mask's inputs (one-element tuple)."""
    graph, env = Graph(), {}
    for node in inputs:
        env[node] = graph.placeholder(node.name)
    for node in gm.graph.nodes:
        if node in upstream and node.op != "placeholder":
            env[node] = graph.node_copy(node, lambda arg: env[arg])
    mask, example = env[site.mask], value_of(site.mask)
    n = example.shape[-1]
    positions = graph.call_function(torch.arange, (n,), {"device": example.device})
    rows = graph.call_function(torch.unsqueeze, (positions, 1))
    causal = graph.call_function(torch.ge, (rows, positions))   # query i attends keys <= i
    if example.dtype == torch.bool:
        attend = graph.call_function(torch.logical_not, (mask,)) if site.mask_is_fill else mask
        # xor, not ne: Inductor's value ranges for a boolean ne fail in torch 2.11
        wrong = graph.call_function(torch.logical_xor, (attend, causal))
    else:   # additive: 0 where attended, -inf (or the dtype's lowest value) where masked
        attended = graph.call_function(torch.ne, (mask, 0))
        kept = graph.call_function(torch.gt, (mask, torch.finfo(example.dtype).min))
        wrong = graph.call_function(torch.where, (causal, attended, kept))
    graph.output((graph.call_function(torch.any, (wrong,)),))
    return GraphModule(gm, graph)


def _upstream(node: Node) -> set[Node]:
    seen, stack = set(), [node]
    while stack:
        current = stack.pop()
        if current not in seen:
            seen.add(current)
            stack += current.all_input_nodes
    return seen
