"""The RocketKV rewrite of a Dynamo graph: which attention sites change, and into what.

`analyse` classifies every attention site (`sites.py`) by where its keys and values come from
(`kv_source.py`) and its phase, and looks the pair up in `REWRITES`, the catalogue: each entry
names the sites it matches, why it may still refuse one (`check`), how it rewrites one
(`rewrite`) and what the explain report says it did (`action`). Three phases:
- prefill: a prompt into a new cache. Attention stays exact; the cache the graph returns
  becomes what the policy's selection stores, packed (`rocketkv.compress`).
- decode: one token over a compressed cache. The token is appended in place
  (`rocketkv.append_`) and the policy's decode attends over the stored slots.
- turn: several tokens over a compressed cache (a new turn, a prompt's later chunk): exact
  attention over the stored tokens and the turn's, then the policy's selection again over all
  of them (`rocketkv.turn`).
A site no entry matches, or whose entry refuses it, keeps its exact attention, and the decision
says why. `apply` rewrites the sites decided so and returns the graph's `CacheIO`s: where each
rewritten layer's packed cache enters and leaves the graph, which the backend's run time needs.
"""
from __future__ import annotations

import dataclasses
import math
import operator
from typing import Callable

import torch
from torch.fx import Graph, GraphModule, Node

from .. import state
from ..config import RocketKVConfig
from ..kernels import ops  # noqa: F401  (torch.ops.rocketkv)
from ..policies import Policy
from .causal_mask import CausalProof
from .kv_source import KVOrigin, KVSource, kv_origin, returned_nodes
from .sites import SDPA_SIGNATURE, AttentionSite, find_sites, shape_of, value_of

PREFILL, DECODE, TURN = "prefill", "decode", "turn"
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
UNSUPPORTED = "unsupported:"   # a reason the backend also warns about
ARANGES = {torch.arange, torch.ops.aten.arange.default, torch.ops.aten.arange.start}


@dataclasses.dataclass
class SiteDecision:
    site: AttentionSite
    key: KVOrigin
    value: KVOrigin
    method: Policy                 # the policy the options select
    phase: str | None = None       # PREFILL, DECODE or TURN: the phase of the site
    rewrite: "Rewrite | None" = None   # the catalogue entry that rewrites it (None: exact)
    reason: str | None = None      # why the site stays exact
    # The site reads a compressed cache but cannot be rewritten: it cannot be exact either
    # (its evicted tokens are gone), so running the graph raises with `reason`.
    fatal: bool = False
    query_len: object = None
    head_dim: int | None = None
    layer: int = 0                 # its layer, of `layers`, in graph order
    layers: int = 1
    causal: CausalProof | str | None = None  # prefill: proof its mask is plain causal, or why not
    # decode over a DynamicCache or tuple cache whose length is static in the graph, with
    # positions the graph makes itself: that they do not derive from the length is not proven
    # (the run time checks the cache)
    positions_unproven: bool = False

    @property
    def rewritten(self) -> bool:
        return self.rewrite is not None

    @property
    def kernel(self) -> str:
        """What runs a decode step's attention: the Triton kernels (the policy has them, on
        CUDA), the policy's PyTorch decode ("reference") or exact attention ("exact")."""
        if not self.method.sparse_decode and self.method.state != "scores":
            return "exact"
        return "triton" if self.on_cuda and self.method.triton_at(self.scale, self.head_dim) \
            else "reference"

    @property
    def on_cuda(self) -> bool:
        return value_of(self.site.query).device.type == "cuda"

    def refuse(self, reason: str) -> None:
        """Keep the site exact after all, for `reason` (fatal if it reads a compressed cache)."""
        self.rewrite, self.reason = None, reason
        self.fatal = self.key.source in COMPRESSED

    @property
    def scale(self) -> float:
        return self.site.scale if self.site.scale is not None else 1.0 / math.sqrt(self.head_dim)

    @property
    def room(self):
        """The new tokens the layer's cache is sized for: the cache's own (RocketKVCache),
        else the backend option."""
        if self.key.source is KVSource.NEW_ROCKETKV:
            return self.key.cache.args[2]
        if self.key.source is KVSource.ROCKETKV_TURN:
            return self.key.cache.args[4]
        return self.method.max_new_tokens


COMPRESSED = (KVSource.PACKED, KVSource.ROCKETKV, KVSource.ROCKETKV_TURN)


@dataclasses.dataclass
class CacheIO:
    """Where one rewritten layer's packed cache enters and leaves its graph, by index."""

    site: str
    phase: str
    source: KVSource
    inputs: tuple[int, int] | None          # placeholders of the packed keys and values read
    outputs: tuple[list[int], list[int]]    # graph outputs of the packed keys and values
    # A prefill whose positions may derive from the cache length also returns the whole
    # prompt's keys and values, until a decode step proves they do not (`Rewriting.probe`).
    whole: tuple[int, int] | None = None


@dataclasses.dataclass
class Rewriting:
    """What the rewrites of one graph share."""

    graph: Graph
    causal: frozenset[str]            # prefill sites whose masks are proven plain causal
    probe: bool                       # prefills also return the whole prompt (see CacheIO)
    selections: dict[int, Node] = dataclasses.field(default_factory=dict)  # layer -> kept
    caches: list[tuple[SiteDecision, Node, Node, tuple | None]] = dataclasses.field(
        default_factory=list)        # (site, packed keys, packed values, whole prompt)

    def returns(self, old: Node, new: Node) -> None:
        """The graph returns `new` wherever it returned `old` (a cache)."""
        output = self.graph.output_node()
        output.args = (tuple(new if out is old else out for out in output.args[0]),)


# -- the catalogue's checks: why a matched site must stay exact after all --------------------

def check_prefill(d: SiteDecision, graph: Graph, lengths: set) -> str | None:
    site, n = d.site, value_of(d.site.key).shape[2]
    if not (site.is_causal or site.mask is not None):
        return "bidirectional attention over a new cache (no causal mask)"
    if site.is_causal and not _same(d.query_len, n):
        return "is_causal with fewer queries than keys (top-left aligned mask)"
    if not _same(d.query_len, n):
        return f"{d.query_len} queries over {n} new keys: not a prefill from an empty cache"
    return None


def check_decode(d: SiteDecision, graph: Graph, lengths: set) -> str | None:
    if d.site.is_causal:
        return "is_causal with one query over a cache masks all but the first key"
    return _positions_refusal(d, graph, lengths)


def check_turn(d: SiteDecision, graph: Graph, lengths: set) -> str | None:
    if d.method.state == "scores":
        return (f"{d.method.name} evicts during decode by a score per stored token: a new turn "
                "over its evicted cache is not supported (pass one prompt per generate call)")
    if d.site.is_causal:
        return f"{d.query_len} new queries over an existing cache with is_causal (top-left aligned)"
    return _positions_refusal(d, graph, lengths)


def _positions_refusal(d: SiteDecision, graph: Graph, lengths: set) -> str | None:
    """Over a DynamicCache or a tuple cache the model takes its positions from its inputs: they
    must not derive from the stored length, which eviction shortened (a RocketKVCache counts
    its sequences' positions itself)."""
    if d.key.source is not KVSource.PACKED:
        return None
    if not lengths:   # the cache length is static here: positions from it would be made here
        d.positions_unproven = _makes_positions(graph, {d.site.query, d.key.new})
        return None
    if _depends_on(graph, lengths, {d.site.query, d.key.new}):
        return ("positions (or the query) derive from the stored cache length, which eviction "
                "shortens: pass explicit positions to compress this model")
    return None


# -- the catalogue's rewrites ----------------------------------------------------------------

def rewrite_prefill(graph: Graph, d: SiteDecision, rw: Rewriting) -> None:
    """The prompt's cache the graph returns becomes the policy's packed selection of it (exact
    attention over the whole prompt first). A RocketKVCache's own whole-prompt store is
    replaced by it."""
    rocketkv = d.key.source is KVSource.NEW_ROCKETKV
    key, value = d.key.cache.args[:2] if rocketkv else (d.site.key, d.site.value)
    observed = d.method.observed_queries(d.query_len)
    # where the cache is written: in place of the RocketKVCache's store (the layer reads it
    # before attention), else after the attention
    with graph.inserting_before(d.key.cache if rocketkv else d.site.output.next):
        stored = graph.call_function(torch.ops.rocketkv.compress.default, (
            _last_rows(graph, d.site.query, observed), key, value,
            _window_mask(graph, d, observed, rw.causal), d.scale, d.room, d.method.spec,
            d.layer, d.layers, rw.probe, rw.selections.get(d.method.reuses(d.layer))))
        keys, values, kept = (graph.call_function(operator.getitem, (stored, i))
                              for i in range(3))
    rw.selections[d.layer] = kept
    if rocketkv:   # the store's own (keys, values) getitems now read the selection
        for user in list(d.key.cache.users):
            user.replace_all_uses_with(keys if user.args[1] == 0 else values)
            graph.erase_node(user)
        graph.erase_node(d.key.cache)
        rw.caches.append((d, keys, values, None))
        return
    rw.returns(d.key.cache, keys)
    rw.returns(d.value.cache, values)
    rw.caches.append((d, keys, values, (d.key.cache, d.value.cache) if rw.probe else None))


def rewrite_decode(graph: Graph, d: SiteDecision, rw: Rewriting) -> None:
    """The token goes into the packed cache in place, and the policy's decode attends over its
    stored slots. A DynamicCache's `cat` (the new cache) becomes the packed input itself; a
    RocketKVCache's own append is told the policy's state."""
    keys, values = d.key.past, d.value.past
    if d.key.source is KVSource.PACKED:
        with graph.inserting_before(d.site.output):
            graph.call_function(torch.ops.rocketkv.append_.default,
                                (keys, values, d.key.new, d.value.new, d.method.state))
        rw.returns(d.key.cache, keys)
        rw.returns(d.value.cache, values)
    else:
        d.key.cache.args = (*d.key.cache.args[:4], d.method.state)
    with graph.inserting_before(d.site.output):
        attention = _decode_attention(graph, d, keys, values)
    d.site.output.replace_all_uses_with(attention)
    rw.caches.append((d, keys, values, None))


def rewrite_turn(graph: Graph, d: SiteDecision, rw: Rewriting) -> None:
    """The turn's exact attention over the stored tokens and its own, and the policy's selection
    over all of them, in one op whose new packed tensors the graph returns as the cache."""
    rocketkv = d.key.source is KVSource.ROCKETKV_TURN
    if rocketkv:
        keys, values, new_key, new_value = d.key.cache.args[:4]
    else:
        keys, values, new_key, new_value = d.key.past, d.value.past, d.key.new, d.value.new
    # in place of the RocketKVCache's extend (the layer reads it before attention)
    with graph.inserting_before(d.key.cache if rocketkv else d.site.output):
        turn = graph.call_function(torch.ops.rocketkv.turn.default, (
            d.site.query, new_key, new_value, keys, values, d.scale, d.room, d.method.spec,
            d.layer, d.layers, rw.selections.get(d.method.reuses(d.layer))))
        attention, new_keys, new_values, kept = (
            graph.call_function(operator.getitem, (turn, i)) for i in range(4))
    d.site.output.replace_all_uses_with(attention)
    rw.selections[d.layer] = kept
    if not rocketkv:
        rw.returns(d.key.cache, new_keys)
        rw.returns(d.value.cache, new_values)
    else:   # the RocketKVCache's whole-turn tensors: every use takes the selection's instead
        for user in list(d.key.cache.users):
            user.replace_all_uses_with(new_keys if user.args[1] == 0 else new_values)
    rw.caches.append((d, new_keys, new_values, None))


# A policy's `triton`: the op its decode step runs on CUDA, and that op's static arguments
# from the layer's plan (at the budget's length) and its selection list's length.
TRITON_DECODE = {
    "stage2": (torch.ops.rocketkv.decode_triton.default, lambda plan, listed: (listed,)),
    "pages": (torch.ops.rocketkv.page_decode_triton.default,
              lambda plan, listed: (plan.topk // plan.chunk, plan.chunk)),
    "sparq": (torch.ops.rocketkv.sparq_decode_triton.default, lambda plan, listed: (listed,)),
}


def _decode_attention(graph: Graph, d: SiteDecision, keys: Node, values: Node) -> Node:
    if d.method.state == "scores":
        return graph.call_function(torch.ops.rocketkv.evicting_decode_.default, (
            d.site.query, keys, values, d.scale, d.method.spec))
    codes = (d.method.kv_bits, d.method.kv_group_size) if d.method.kv_bits else ()
    if d.kernel == "triton":
        plan = d.method.plan(d.method.token_budget, d.head_dim, d.layer, d.layers)
        if plan.topk < plan.length:
            op, arguments = TRITON_DECODE[d.method.triton]
            listed = d.method.selected_list_length(d.head_dim, d.layer, d.layers)
            return graph.call_function(op, (d.site.query, keys, values, d.scale,
                                            *arguments(plan, listed), *codes))
        # a layer that attends to every token (Quest's first layers): exact, below
    if d.kernel != "reference" and d.on_cuda:
        return graph.call_function(torch.ops.rocketkv.exact_decode_triton.default, (
            d.site.query, keys, values, d.scale, *codes))
    return graph.call_function(torch.ops.rocketkv.decode.default, (
        d.site.query, keys, values, d.scale, d.method.spec))


# -- what explain says each did ---------------------------------------------------------------

def prefill_action(d: SiteDecision) -> str:
    name = d.method.name
    quantized = f", quantized to {d.method.kv_bits} bits" if d.method.kv_bits else ""
    cache = "the RocketKVCache" if d.key.source is KVSource.NEW_ROCKETKV else "the cache"
    tokens = "the tokens"
    if isinstance(d.query_len, int) and isinstance(d.room, int):   # a traced prompt length
        roomy = dataclasses.replace(d.method, max_new_tokens=d.room)
        plan = roomy.plan(d.query_len, d.head_dim, d.layer, d.layers)
        tokens = f"the {min(plan.prompt_budget, d.query_len)} tokens"
    if d.method.keeps_history:
        kept = f"{cache} keeps every token, and decode reads a view of {tokens} {name} selects"
    else:
        kept = f"{cache} stores {tokens} {name} keeps{quantized}, packed"
    return f"prefill: exact attention; {kept}" + _mask_note(d)


def _why_no_triton(d: SiteDecision) -> str:
    if d.method.triton_at(d.scale, d.head_dim):
        return ""   # on the CPU
    if not d.method.triton:
        return f": {d.method.name} has no Triton kernel yet"
    return f": {d.method.name}'s Triton kernels take the scale 1/sqrt(head_dim), not {d.scale:.4g}"


def decode_action(d: SiteDecision) -> str:
    codes = " reading the codes" if d.method.kv_bits is not None else ""
    exact = "exact attention" + (", the Triton flash-decoding kernel" + codes if d.on_cuda else "")
    runs = {"triton": "Triton kernels" + codes, "exact": exact,
            "reference": "the PyTorch reference op" + _why_no_triton(d)}[d.kernel]
    return (f"decode: {d.method.name}, {d.method.decode_kind} over each row's stored slots "
            f"({runs}; plan read from the cache)")


def turn_action(d: SiteDecision) -> str:
    return (f"new turn: exact attention over the stored tokens and the turn's; then "
            f"{d.method.name} selects again over them all, voted by the turn's last "
            f"{d.method.window_size} queries (a shorter turn keeps them all), planned for the "
            "conversation's length")


def _mask_note(d: SiteDecision) -> str:
    if isinstance(d.causal, CausalProof):
        return ("; its mask is proven plain causal: SDPA runs is_causal (flash)"
                + (", while the padding mask is all ones" if d.causal.padding else ""))
    return f"; its mask is kept: {d.causal}" if d.causal else ""


@dataclasses.dataclass(frozen=True)
class Rewrite:
    """One entry of the catalogue."""

    phase: str
    sources: tuple[KVSource, ...]
    check: Callable[[SiteDecision, Graph, set], str | None]
    rewrite: Callable[[Graph, SiteDecision, Rewriting], None]
    action: Callable[[SiteDecision], str]


REWRITES = (
    Rewrite(PREFILL, (KVSource.FRESH, KVSource.NEW_ROCKETKV), check_prefill, rewrite_prefill,
            prefill_action),
    Rewrite(DECODE, (KVSource.PACKED, KVSource.ROCKETKV), check_decode, rewrite_decode,
            decode_action),
    Rewrite(TURN, (KVSource.PACKED, KVSource.ROCKETKV_TURN), check_turn, rewrite_turn,
            turn_action),
)


def _phase(source: KVSource, query_len) -> str | None:
    if source in (KVSource.FRESH, KVSource.NEW_ROCKETKV):
        return PREFILL
    if source is KVSource.ROCKETKV_TURN:
        return TURN
    if source in (KVSource.PACKED, KVSource.ROCKETKV, KVSource.GROWN):
        return DECODE if _same(query_len, 1) else TURN
    return None


# -- analysis ---------------------------------------------------------------------------------

def analyse(graph: Graph, config: RocketKVConfig) -> list[SiteDecision]:
    """Every attention site's decision, in graph order."""
    returned = returned_nodes(graph.output_node())
    decisions = [SiteDecision(site, kv_origin(site.key, returned), kv_origin(site.value, returned),
                              config.method) for site in find_sites(graph)]
    # The stored lengths of every compressed cache the graph reads (DynamicCache, tuple
    # caches): nothing may derive positions from any of them.
    lengths = set()
    for d in decisions:
        for origin in (d.key, d.value):
            if origin.source is KVSource.PACKED:
                for size in value_of(origin.past).shape[2:3]:
                    if isinstance(size, torch.SymInt):
                        lengths |= size.node.expr.free_symbols
    # The layers, in graph order: the sites over a cache this graph writes (some policies
    # budget layers differently, or reuse another layer's selection).
    layers = [id(d) for d in decisions if d.key.source in
              (KVSource.FRESH, KVSource.NEW_ROCKETKV, KVSource.ROCKETKV_TURN, KVSource.PACKED,
               KVSource.ROCKETKV)]
    for d in decisions:
        d.layer, d.layers = (layers.index(id(d)), len(layers)) if id(d) in layers else (0, 1)
        d.phase = _phase(d.key.source, value_of(d.site.query).shape[2]
                         if isinstance(value_of(d.site.query), torch.Tensor) else None)
        reason = _refusal(d, config)
        entry = next((r for r in REWRITES if r.phase == d.phase and d.key.source in r.sources),
                     None)
        if reason is None and entry is None:
            reason = _unmatched(d)
        if reason is None:
            reason = entry.check(d, graph, lengths)
        if reason is None:
            d.rewrite = entry
        else:
            d.refuse(reason)
    return decisions


def _refusal(d: SiteDecision, config: RocketKVConfig) -> str | None:
    """Why the site must stay exact whatever its phase, or None."""
    site = d.site
    q, k, v = (value_of(n) for n in (site.query, site.key, site.value))
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k, v)):
        return "query/key/value are not 4-D (batch, heads, tokens, head_dim)"
    d.query_len, d.head_dim = q.shape[2], k.shape[3]
    if not config.compresses:
        return "token_budget=None: compression is off"
    if q.dtype not in SUPPORTED_DTYPES or q.device.type not in ("cpu", "cuda"):
        return (f"{UNSUPPORTED} {q.dtype} on {q.device.type} (the ops take float32, float16 or "
                "bfloat16 on cpu or cuda): attention stays exact")
    if any(t.requires_grad for t in (q, k, v)):
        return "the graph needs gradients (training): attention stays exact"
    if site.dropout > 0:
        return f"attention dropout p={site.dropout}"
    if d.key.source != d.value.source:
        return f"keys ({d.key.source.value}) and values ({d.value.source.value}) differ in origin"
    if d.key.source in (KVSource.NEW_ROCKETKV, KVSource.ROCKETKV, KVSource.ROCKETKV_TURN) and \
            d.key.cache is not d.value.cache:
        return "keys and values are stored by different RocketKVCache calls"
    if q.shape[1] % k.shape[1] or q.shape[0] != k.shape[0]:
        return f"{q.shape[1]} query heads cannot be grouped over {k.shape[1]} KV heads"
    if site.mask is not None:
        mshape = shape_of(site.mask)
        if mshape is None or len(mshape) > 4 or len(mshape) >= 3 and mshape[-3] != 1:
            return f"mask of shape {mshape} is not one (batch, 1, q, kv) mask for all heads"
    if not state.can_pack(int(d.head_dim), q.element_size()):
        return (f"{UNSUPPORTED} head_dim {d.head_dim} in {q.dtype}: a packed cache row must "
                "hold whole 32-bit words")
    return None


def _unmatched(d: SiteDecision) -> str:
    """Why a site of no catalogue entry's source stays exact."""
    source = d.key.source
    if source is KVSource.GROWN:
        return ("the cache holds every token: no prefill compressed it (the prefill stayed "
                "exact, or ran without the rocketkv backend)")
    reason = f"keys are {source.value}: nothing to compress"
    if source is KVSource.IN_PLACE:
        reason += (" (a static cache written in place is not compressed; with transformers, "
                   "use the cache generate builds, or a RocketKVCache)")
    elif source is KVSource.WINDOW:
        reason += " (it keeps its own last tokens; this layer stays exact)"
    return reason


def computes_positions(graph: Graph, decisions: list[SiteDecision]) -> bool:
    """Whether a rewritten prefill's queries or keys take positions the graph makes itself
    (no input), which a decode step may take from the stored cache length."""
    return _makes_positions(graph, {n for d in decisions if d.rewritten and d.phase == PREFILL
                                    for n in (d.site.query, d.site.key)})


def _makes_positions(graph: Graph, targets: set) -> bool:
    """Whether `targets` depend on integer tensors the graph makes itself (an `arange`, a
    constant) rather than takes as inputs. The walk stops at attention outputs: their values
    depend on the cache, and the mask an attention reads (made from an arange) is no position."""
    sinks = {s.output for s in find_sites(graph)}
    seen, stack = set(), [t for t in targets if t is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "call_function" and node.target in ARANGES:
            return True
        v = value_of(node)
        made = node.op == "get_attr" or node.op == "call_function" and not node.all_input_nodes
        if made and isinstance(v, torch.Tensor) and not v.is_floating_point() \
                and v.dtype != torch.bool:
            return True
        if node not in sinks:
            stack += node.all_input_nodes
    return False


def _same(a, b) -> bool:
    """a == b as a symbolic-shape fact (a guard-free check where possible)."""
    try:
        return bool(a == b)
    except Exception:  # an undecidable symbolic comparison is not proof
        return False


def _depends_on(graph: Graph, symbols: set, targets) -> bool:
    """Does any value derived from the symbols (stored cache lengths) reach `targets`?

    Seeds are the graph's symbolic scalars that involve the symbols; taint flows to users, but
    not out of attention outputs (whose values rightly depend on the cache).
    """
    tainted: set[Node] = set()
    sinks = {s.output for s in find_sites(graph)}
    for node in graph.nodes:
        v = value_of(node)
        seeded = isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)) and \
            v.node.expr.free_symbols & symbols
        inherited = any(isinstance(a, Node) and a in tainted for a in node.all_input_nodes)
        if (seeded or inherited) and node not in sinks:
            tainted.add(node)
    return any(t in tainted for t in targets if t is not None)


def _last_rows(graph: Graph, node: Node, count) -> Node:
    """node[..., -count:, :]: the last `count` queries (or mask rows)."""
    return graph.call_function(operator.getitem, (node, (Ellipsis, slice(-count, None), slice(None))))


def _mask_arg(graph: Graph, site: AttentionSite) -> Node | None:
    """The site's mask in the ops' convention: additive, or boolean with True = attend."""
    if site.mask is None or not site.mask_is_fill:
        return site.mask
    return graph.call_function(torch.logical_not, (site.mask,))


def _window_mask(graph: Graph, d: SiteDecision, window, causal: frozenset[str]) -> Node | None:
    """The prefill mask's last `window` rows for the selection; None for a plain causal mask
    (the ops mask the window causally themselves)."""
    mask = None if d.site.name in causal else _mask_arg(graph, d.site)
    return None if mask is None else _last_rows(graph, mask, window)


def _make_causal(site: AttentionSite) -> None:
    """SDPA with its (proven plain causal) mask dropped for is_causal=True: the flash kernel."""
    bound = SDPA_SIGNATURE.bind(*site.output.args, **site.output.kwargs)
    arguments = dict(bound.arguments, attn_mask=None, is_causal=True)
    site.output.args = tuple(arguments.pop(name) for name in ("query", "key", "value"))
    site.output.kwargs = arguments


def eliminate_dead_code(graph: Graph) -> None:
    """FX's dead-code elimination, keeping the ops that write their inputs: in-place tensor
    methods (Dynamo writes an in-place all_reduce back with `x.copy_(...)`, as under tensor
    parallelism; FX counts no method impure) and custom ops with mutable arguments, whose
    results go unused (torch 2.11's FX does not count a call of the op packet Dynamo traces,
    `torch.ops.rocketkv.append_`, impure: a RocketKVCache's append would vanish)."""
    def impure(node: Node) -> bool:
        if node.op == "call_method" and node.target.endswith("_") \
                and not node.target.startswith("_"):
            return True
        op = getattr(node.target, "default", node.target)
        return node.is_impure() or bool(getattr(getattr(op, "_schema", None), "is_mutable",
                                                False))
    graph.eliminate_dead_code(is_impure_node=impure)


def apply(gm: GraphModule, decisions: list[SiteDecision], causal: frozenset[str] = frozenset(),
          probe: bool = False) -> list[CacheIO]:
    """Rewrite the sites decided so (the prefill sites named in `causal`, masks proven plain
    causal, run SDPA with is_causal and no mask); return each rewritten layer's CacheIO.
    `probe`: prefills also return the whole prompt's cache, after the graph's own outputs."""
    graph = gm.graph
    rw = Rewriting(graph, causal, probe)
    for d in decisions:
        if d.rewritten:
            d.rewrite.rewrite(graph, d, rw)
        if d.phase == PREFILL and d.site.name in causal and d.rewritten:
            _make_causal(d.site)
    output = graph.output_node()
    wholes = [node for _, _, _, whole in rw.caches if whole for node in whole]
    outputs = list(output.args[0]) + wholes
    output.args = (tuple(outputs),)
    eliminate_dead_code(graph)
    graph.lint()
    gm.recompile()
    placeholders = list(graph.find_nodes(op="placeholder"))
    base = len(outputs) - len(wholes)

    def positions(node):
        return [i for i, out in enumerate(outputs[:base]) if out is node]

    ios = []
    for d, keys, values, whole in rw.caches:
        reads = d.phase != PREFILL
        ios.append(CacheIO(
            d.site.name, d.phase, d.key.source,
            (placeholders.index(d.key.past), placeholders.index(d.value.past)) if reads else None,
            (positions(keys), positions(values)),
            (base + wholes.index(whole[0]), base + wholes.index(whole[1])) if whole else None))
    return ios
