"""The RocketKV rewrite of a Dynamo graph.

`analyse` decides, site by site, what may change: a prefill site (fresh cache, every query of the
prompt) keeps its exact attention and gets stage-1 eviction inserted after it; a decode site (one
query over a grown cache) has its attention replaced by stage-2 sparse attention; a new turn into
a RocketKVCache keeps its exact attention and gets stage 1 again over every stored token. Anything
the pass cannot prove safe keeps its exact attention, and the decision says why.
"""
from __future__ import annotations

import dataclasses
import math
import operator
from typing import Mapping

import torch
from torch.fx import Graph, GraphModule, Node

from ..config import Plan, RocketKVConfig
from ..policies import Policy, from_spec
from ..policies.rocketkv_mt import whole_view
from ..kernels import ops, reference  # noqa: F401  (ops: torch.ops.rocketkv)
from .causal_mask import CausalProof
from .kv_source import KVOrigin, KVSource, kv_origin, returned_nodes
from .sites import SDPA_SIGNATURE, AttentionSite, find_sites, shape_of, value_of

PREFILL, DECODE, TURN = "prefill", "decode", "turn"
PLAN_INPUTS = ("chunk", "dims", "topk")  # the Plan fields a decode site reads at run time
TURN_INPUTS = ("plan", "capacity")       # what a new turn's stage 1 reads at run time
ROW_STORE_INPUTS = ("row_plans", "capacity")   # a padded prompt's store into a RocketKVCache
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
UNSUPPORTED = "unsupported:"   # a reason the backend also warns about


@dataclasses.dataclass
class SiteDecision:
    site: AttentionSite
    key: KVOrigin
    value: KVOrigin
    phase: str | None = None       # PREFILL, DECODE or TURN when rewritten
    reason: str | None = None      # why the site stays exact
    plan: Plan | None = None       # prefill: the plan its prompt length gives
    query_len: int | None = None
    prompt_len: int | None = None  # prefill: the tokens it stores from (past ones included)
    head_dim: int | None = None
    method: Policy | None = None   # the policy the options select
    layer: int = 0                 # prefill: its layer, of `layers`, in graph order
    layers: int = 1
    capacity: int | None = None    # prefill into a RocketKVCache: the slots of its buffers
    padding_masks: list[Node] = dataclasses.field(default_factory=list)  # checked at run time
    causal: CausalProof | str | None = None  # prefill: proof its mask is plain causal, or why not

    @property
    def kernel(self) -> str:
        """What runs a decode site: "exact" (the policy decodes exactly: the site is kept), the
        Triton kernels (RocketKV on CUDA; no mask or a boolean one) or the reference op."""
        if not (self.method.sparse_decode or self.method.decode_state):
            return "exact"
        on_cuda = value_of(self.site.query).device.type == "cuda"
        mask = value_of(self.site.mask)
        boolean = mask is None or self.site.mask_is_fill or mask.dtype == torch.bool or \
            self.key.source is KVSource.ROCKETKV   # it reads a boolean mask of stored slots
        triton = self.method.triton and on_cuda and boolean
        return "triton" if triton else "reference"

    @property
    def rewritten(self) -> bool:
        return self.reason is None

    def refuse(self, reason: str) -> None:
        """Keep the site exact after all, for `reason`."""
        self.phase, self.plan, self.reason = None, None, reason

    @property
    def scale(self) -> float:
        return self.site.scale if self.site.scale is not None else 1.0 / math.sqrt(self.head_dim)


def analyse(graph: Graph, config: RocketKVConfig, refused: Mapping[str, str] | None = None
            ) -> list[SiteDecision]:
    """Every attention site's decision. `refused` (site name -> reason) keeps sites exact that a
    check beyond the graph's structure refused (a prefill mask evaluated as not causal)."""
    returned = returned_nodes(graph.output_node())
    decisions = [SiteDecision(site, kv_origin(site.key, returned), kv_origin(site.value, returned),
                              method=config.method) for site in find_sites(graph)]
    # Every stored cache length: eviction shortens them all, so nothing may derive positions
    # from any of them.
    caches = {o.past for d in decisions for o in (d.key, d.value) if o.source is KVSource.GROWN}
    lengths = set()
    for past in caches:
        length = value_of(past).shape[2] if isinstance(value_of(past), torch.Tensor) else None
        if isinstance(length, torch.SymInt):
            lengths |= length.node.expr.free_symbols
    # The layers, in graph order: the attention sites over a cache this graph writes (some
    # policies budget layers differently, or reuse another layer's selection).
    layers = [id(d) for d in decisions if d.key.source in (
        KVSource.FRESH, KVSource.NEW_ROCKETKV, KVSource.GROWN, KVSource.ROCKETKV_TURN)]
    for d in decisions:
        d.layer, d.layers = (layers.index(id(d)), len(layers)) if id(d) in layers else (0, 1)
        d.reason = _refusal(graph, d, config, caches, lengths)
        if d.rewritten and d.site.name in (refused or {}):
            d.refuse(refused[d.site.name])
    return decisions


def _refusal(graph: Graph, d: SiteDecision, config: RocketKVConfig, caches: set[Node],
             lengths: set) -> str | None:
    """Why the site must stay exact, or None (and d.phase/d.plan set) if it can be rewritten."""
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
    rocketkv_cache = d.key.source in (KVSource.ROCKETKV, KVSource.NEW_ROCKETKV,
                                      KVSource.ROCKETKV_TURN)
    if not rocketkv_cache and d.key.source not in (KVSource.FRESH, KVSource.GROWN):
        return f"keys are {d.key.source.value}: nothing to compress" + (
            (" (a static cache written in place is not compressed; with transformers, pass "
             "a RocketKVCache for static shapes)")
            if d.key.source is KVSource.IN_PLACE else
            " (it keeps its own last tokens; this layer stays exact)"
            if d.key.source is KVSource.WINDOW else "")
    if q.shape[1] % k.shape[1] or q.shape[0] != k.shape[0]:
        return f"{q.shape[1]} query heads cannot be grouped over {k.shape[1]} KV heads"
    if site.mask is not None:
        mshape = shape_of(site.mask)
        if mshape is None or len(mshape) > 4 or len(mshape) >= 3 and mshape[-3] != 1:
            return f"mask of shape {mshape} is not one (batch, 1, q, kv) mask for all heads"
    if rocketkv_cache:
        if d.key.cache is not d.value.cache:
            return "keys and values are stored by different RocketKVCache calls"
        return _rocketkv_refusal(d, config)
    n = k.shape[2]
    if d.key.source is KVSource.FRESH:
        if not (site.is_causal or site.mask is not None):
            return "bidirectional attention over a new cache (no causal mask)"
        if site.is_causal and d.query_len != n:
            return "is_causal with fewer queries than keys (top-left aligned mask)"
        if not _same(d.query_len, n):
            return f"{d.query_len} queries over {n} new keys: not a prefill from an empty cache"
        return _prefill(d, config, n)
    if not _same(d.query_len, 1):
        return _continuation_refusal(d, config, n)
    if site.is_causal:
        return "is_causal with one query over a cache masks all but the first key"
    if not isinstance(value_of(d.key.past).shape[2], torch.SymInt):
        return ("the cache length is static in this graph, so it cannot be checked that "
                "positions do not derive from it")
    if site.mask is not None:
        strays = _logical_mask_inputs(site, d.query_len, caches)
        for stray in strays:
            v = value_of(stray)
            if v.dim() != 2 or v.is_floating_point() or not _same(v.shape[0], q.shape[0]):
                return (f"the mask reads input {stray.name}, indexed by logical position: after "
                        "eviction it would not line up with the cache")
        # A 2-D padding mask (transformers' attention_mask) is read over the first n slots: with
        # no padding it is all ones and lines up with any cache. The backend checks that at run
        # time and runs the exact graph on full caches when there is padding.
        d.padding_masks = strays
    if _depends_on_length(graph, lengths, targets={site.query, d.key.new}):
        return ("positions (or the query) derive from the stored cache length, which eviction "
                "shortens: pass explicit positions to compress this model")
    d.phase = DECODE
    return None


def _prefill(d: SiteDecision, config: RocketKVConfig, stored) -> str | None:
    """The site is a prefill into a growing cache that will hold `stored` tokens: plan it."""
    if d.method.per_layer:
        return (f"{d.method.name} budgets each layer differently, but one traced length "
                "serves every layer of a growing cache: pass a RocketKVCache to compress")
    d.phase = PREFILL
    # The plan needs the prompt length: int() specialises a symbolic length (a guard).
    d.prompt_len = int(stored)
    d.plan = config.plan(d.prompt_len, int(d.head_dim), d.layer, d.layers)
    return None


def _continuation_refusal(d: SiteDecision, config: RocketKVConfig, n) -> str | None:
    """Several new queries over a grown cache: a prompt's later chunk (chunked prefill) or a new
    turn. It is a prefill of the whole cache: exact attention, then the policy's selection over
    every stored token, voted by this chunk's last queries, as one prefill of the whole prompt
    would (the backend refuses at run time a cache that eviction already shortened)."""
    site, chunk = d.site, int(d.query_len)
    if site.is_causal or site.mask is None:
        return (f"{chunk} new queries over an existing cache " + (
            "with is_causal (a top-left aligned mask)" if site.is_causal else "with no mask"))
    observed = d.method.observed_queries(int(n))
    if observed > chunk:
        return (f"{chunk} new queries over an existing cache: {d.method.name} selects by the "
                f"last {observed} queries of the prompt, more than this chunk has; the cache is "
                "kept whole")
    return _prefill(d, config, n)


def _rocketkv_refusal(d: SiteDecision, config: RocketKVConfig) -> str | None:
    """RocketKVCache sites. Its prefill stores the prompt through one op that the pass turns into
    stage 1; its decode mask comes from the cache's own mask sizes (physical slots), and it
    tracks positions itself, so neither the logical-mask nor the length check applies."""
    site, k = d.site, value_of(d.site.key)
    if d.method.decode_state:
        return (f"{d.method.name} evicts during decode by a score it keeps per stored token, "
                "and RocketKVCache has no buffer for it: pass a DynamicCache to compress")
    if d.method.keeps_history:
        return (f"{d.method.name} keeps every token beside a compressed view, and RocketKVCache "
                "holds only what stage 1 keeps: pass a DynamicCache to compress")
    if d.key.source is KVSource.NEW_ROCKETKV:
        if not (site.is_causal or site.mask is not None) or not _same(d.query_len, k.shape[2]):
            return "not a causal prefill over the whole prompt"
        stored = d.key.cache.args[2]   # prompt + the cache's room, maybe a traced size
        prompt = int(k.shape[2])
        room = int(value_of(stored) if isinstance(stored, Node) else stored) - prompt
        # The cache says how many tokens will be generated: that sizes its plan.
        roomy = dataclasses.replace(config, max_new_tokens=room)
        d.prompt_len = prompt
        d.plan = roomy.plan(prompt, int(d.head_dim), d.layer, d.layers)
        # transformers builds one decode mask, as wide as the first layer's cache, for all
        # layers: per-layer plans get buffers of one size, the largest (decode then reads each
        # layer's own stored length).
        plans = [roomy.plan(prompt, int(d.head_dim), layer, d.layers)
                 for layer in range(d.layers)] if d.method.per_layer else [d.plan]
        d.capacity = max(rocketkv_capacity(plan, prompt) for plan in plans)
        # a padded batch is stored row by row (`rowwise_cache`), if the policy allows: checked at
        # run time
        d.padding_masks = [m for m in _mask_inputs(site) if value_of(m).dim() == 4] + \
            _padding_inputs(_mask_inputs(site)) if site.mask is not None else []
        d.phase = PREFILL
        return None
    if d.key.source is KVSource.ROCKETKV_TURN:
        return _turn_refusal(d)
    if site.mask is None or site.is_causal:
        return "no mask over the RocketKVCache's slots: its empty slots would be attended"
    # Decode attends to the layer's own stored slots (its lengths), not through the mask
    # transformers builds for every layer and row from the first layer's first row: per-layer
    # budgets and rows evicted apart store different numbers of tokens. A padding mask over a
    # cache the pass did not store (padding kept in its slots) sends the step to the exact
    # graph (checked at run time; generate passes a RocketKVCache model 4-D masks).
    d.padding_masks = [m for m in _mask_inputs(site) if value_of(m).dim() == 4] + \
        _padding_inputs(_logical_mask_inputs(site, d.query_len, set()))
    d.phase = DECODE
    return None


def _turn_refusal(d: SiteDecision) -> str | None:
    """A new turn into a RocketKVCache (its new buffers hold the stored tokens and the turn's):
    exact attention, then the policy's selection over every stored token, voted by the turn's
    last queries, as one prefill of the kept history and the turn would. Its plan depends on the
    conversation's length, a value in the cache, not a shape: the backend plans at run time."""
    site, turn = d.site, int(d.query_len)
    if site.mask is None or site.is_causal:
        return "no mask over the RocketKVCache's slots: its empty slots would be attended"
    if d.key.cache.args[5].op != "placeholder":
        return "the RocketKVCache's positions are not a graph input: the turn cannot be planned"
    if d.method.per_layer:
        return (f"{d.method.name} budgets each layer differently: a new turn into a "
                "RocketKVCache keeps every stored token")
    observed = d.method.observed_queries(int(value_of(d.key.past).shape[2]) + turn)
    if observed > turn:
        return (f"{turn} new tokens: {d.method.name} selects by the last {observed} queries, "
                "more than this turn has; the RocketKVCache keeps every stored token")
    d.padding_masks = _padding_inputs(_mask_inputs(site))  # one offset for every row: checked
    d.phase = TURN
    return None


def _same(a, b) -> bool:
    """a == b as a symbolic-shape fact (a guard-free check where possible)."""
    try:
        return bool(a == b)
    except Exception:  # an undecidable symbolic comparison is not proof
        return False


def _mask_inputs(site: AttentionSite) -> list[Node]:
    """The graph's tensor inputs the site's mask is built from."""
    seen, stack, found = set(), [site.mask], []
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        stack += node.all_input_nodes
        if node.op == "placeholder" and isinstance(value_of(node), torch.Tensor):
            found.append(node)
    return found


def _logical_mask_inputs(site: AttentionSite, query_len, caches: set[Node]) -> list[Node]:
    """The graph inputs the decode mask is built from that are neither caches nor per-query data.

    Such an input (a 2-D padding mask, a precomputed bias table) is laid out by logical position;
    after eviction slots no longer match logical positions. Per-query inputs (positions of the
    current step) and the caches themselves (their sizes) are fine.
    """
    batch = value_of(site.query).shape[0]
    return [node for node in _mask_inputs(site) if node not in caches
            and not _same(value_of(node).numel() <= batch * query_len, True)]


def _padding_inputs(inputs: list[Node]) -> list[Node]:
    """Of a mask's inputs, the 2-D integer ones (transformers' attention_mask)."""
    return [m for m in inputs if value_of(m).dim() == 2 and not value_of(m).is_floating_point()]


def _depends_on_length(graph: Graph, symbols: set, targets) -> bool:
    """Does any value derived from a symbolic cache length reach `targets`?

    Seeds are the graph's symbolic scalars that involve the lengths' symbols; taint flows to
    users, but not out of attention outputs (whose values rightly depend on the cache).
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


def _last_rows(graph: Graph, node: Node, count: int) -> Node:
    """node[..., -count:, :]: the last `count` queries (or mask rows)."""
    return graph.call_function(operator.getitem, (node, (Ellipsis, slice(-count, None), slice(None))))


def _mask_arg(graph: Graph, site: AttentionSite) -> Node | None:
    """The site's mask in the ops' convention: additive, or boolean with True = attend."""
    if site.mask is None or not site.mask_is_fill:
        return site.mask
    return graph.call_function(torch.logical_not, (site.mask,))


def _window_mask(graph: Graph, d: SiteDecision, window: int, causal: frozenset[str]
                 ) -> Node | None:
    """The prefill mask's last `window` rows for stage 1; None for a plain causal mask (the ops
    mask the window causally themselves)."""
    mask = None if d.site.name in causal else _mask_arg(graph, d.site)
    return None if mask is None else _last_rows(graph, mask, window)


def _make_causal(site: AttentionSite) -> None:
    """SDPA with its (proven plain causal) mask dropped for is_causal=True: the flash kernel."""
    bound = SDPA_SIGNATURE.bind(*site.output.args, **site.output.kwargs)
    arguments = dict(bound.arguments, attn_mask=None, is_causal=True)
    site.output.args = tuple(arguments.pop(name) for name in ("query", "key", "value"))
    site.output.kwargs = arguments


def stored_slots(key, lengths):
    """(B, 1, 1, slots) bool: the first `lengths` slots of each row of a RocketKVCache layer."""
    return torch.arange(key.shape[2], device=key.device) < lengths.view(-1, 1, 1, 1)


def stored_slots_attention(query, key, value, lengths, scale: float):
    """Exact attention of a decode query over the stored slots of a RocketKVCache layer."""
    return torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=stored_slots(key, lengths), scale=scale,
        enable_gqa=query.shape[1] != key.shape[1])


def _cache_lengths(d: SiteDecision) -> Node:
    """A RocketKVCache decode site's stored lengths, after its token is appended."""
    return d.key.cache.args[4]    # rocketkv.append_(keys, values, kmin, kmax, lengths, ...)


def _attend_stored_slots(graph: Graph, d: SiteDecision) -> None:
    """An exact decode site over a RocketKVCache attends to its layer's stored slots."""
    with graph.inserting_before(d.site.output.next):
        exact = graph.call_function(stored_slots_attention, (
            d.site.query, d.site.key, d.site.value, _cache_lengths(d), d.scale))
    d.site.output.replace_all_uses_with(exact)


def plan_inputs(plan: Plan | tuple[Plan, ...]) -> list[list[int]]:
    """A decode site's plan as its op reads it: each PLAN_INPUTS field as a list, one value for
    every row, or one per row (rows evicted apart carry a plan each)."""
    rows = plan if isinstance(plan, tuple) else (plan,)
    return [[getattr(row, field) for row in rows] for field in PLAN_INPUTS]


def view_decode(query, key, value, mask, scale, chunk, dims, topk, view_key, view_value,
                view_positions, policy: str):
    """A keeps_history policy's decode step (rocketkv-mt): its view_decode, from its spec."""
    return from_spec(policy).view_decode(query, key, value, mask, scale, chunk, dims, topk,
                                         view_key, view_value, view_positions)


def _row_store(method: Policy, query_window, key, value, mask, scale, plan: Plan, reuse=None
               ) -> tuple:
    """What one sequence (batch 1) stores of its `key`/`value` under `plan`: (keys, values,
    positions) of the policy's selection, or of every token if the plan keeps them all."""
    n = key.shape[2]
    if not method.rewrites_prompt(n, plan):
        return whole_view(key, value)
    return method.compress(query_window, key, value, mask, scale, min(plan.prompt_budget, n),
                           reuse)[:3]


def turn_store(query_window, keys, values, lengths, positions, mask, scale, plan: Plan,
               capacity: int, policy: str, reuse=None) -> tuple:
    """A new turn's RocketKVCache state under a policy (its spec): per sequence, the tokens its
    selection keeps of the stored ones (the kept history and the turn, `lengths` of them), voted
    by the turn's last queries, in `capacity` slots; and the positions kept (for layers that reuse
    them)."""
    method, rows = from_spec(policy), []
    for b, n in enumerate(lengths.tolist()):
        row_mask = None if mask is None else reference.row_of(mask, b)[..., :n]
        key, value, index = _row_store(method, query_window[b:b + 1], keys[b:b + 1, :, :n],
                                       values[b:b + 1, :, :n], row_mask, scale, plan,
                                       None if reuse is None else reuse[b:b + 1])
        rows.append((*reference.static_cache(key, value, capacity, plan.chunk, 0), index))
    *state, _, index = (torch.cat(parts) for parts in zip(*rows))
    return (*state, positions.clone(), index)


def rowwise(method: Policy, decisions: list[SiteDecision]) -> bool:
    """Whether a padded batch can be evicted and decoded row by row under the policy: one plan
    per row, from its own prompt length (not policies that evict during decode, keep the
    history, budget layers differently or reuse another layer's selection)."""
    return not (method.decode_state or method.keeps_history or method.per_layer) and all(
        method.reuses(d.layer) is None for d in decisions)


def attended_keys(mask: torch.Tensor) -> torch.Tensor:
    """(B, n) bool: the keys the last query row of a (B, 1, q, n) mask attends to."""
    return torch.isfinite(reference.additive_mask(mask)[:, 0, -1])


def _store_rows(method: Policy, query_window, key, value, mask, scale, plan_of) -> list:
    """Each row of a padded batch as its prompt alone would store it: the policy's selection
    over its own tokens (the keys its last query attends to: a left-padded row's real ones)
    with `plan_of(b, n)`, the plan of row b of n tokens; (keys, values, positions) per row."""
    live, rows = attended_keys(mask), []
    for b in range(key.shape[0]):
        index = live[b].nonzero().squeeze(1)
        n = len(index)
        row_mask = reference.row_of(mask, b)[..., index]
        observed = method.observed_queries(n)
        rows.append(_row_store(method, query_window[b:b + 1, :, -observed:],
                               key[b:b + 1, :, index], value[b:b + 1, :, index],
                               row_mask[..., -observed:, :], scale, plan_of(b, n)))
    return rows


def rowwise_store(query_window, key, value, mask, scale, policy: str, layer: int, layers: int
                  ) -> tuple:
    """A padded batch's prefill store into a growing cache: each row as its prompt alone would
    store it (`_store_rows`), with the plan of its own length; the rows right-aligned in one
    tensor, the slots before a row that keeps fewer tokens left empty (the backend masks them).
    What `compress` returns (no decode state; positions -1 in the empty slots)."""
    method = from_spec(policy)
    rows = _store_rows(method, query_window, key, value, mask, scale,
                       lambda b, n: method.plan(n, key.shape[-1], layer, layers))
    width = max(r[0].shape[2] for r in rows)
    pad = [width - r[0].shape[2] for r in rows]
    keys, values = (torch.cat([torch.nn.functional.pad(r[i], (0, 0, p, 0))
                               for r, p in zip(rows, pad)]) for i in (0, 1))
    positions = torch.cat([torch.nn.functional.pad(r[2], (p, 0), value=-1)
                           for r, p in zip(rows, pad)])
    return keys, values, positions, key.new_empty(0, dtype=torch.float32)


def rowwise_cache(query_window, key, value, mask, scale, plans: list[Plan], capacity: int,
                  policy: str, prompt_len: int) -> tuple:
    """A padded batch's prompt store into a RocketKVCache: each row as its prompt alone would
    store it (`_store_rows`) with its plan (`plans`, from its own length), left-aligned in
    `capacity` slots with its own stored length, as decode reads it (`stored_slots`). Chunk
    summaries if every row's plan has the same chunk (else the kernels build bounds from K).
    Every row's position is the padded prompt's length (transformers counts the padding)."""
    chunks = {plan.chunk for plan in plans}
    chunk = chunks.pop() if len(chunks) == 1 else 0
    rows = _store_rows(from_spec(policy), query_window, key, value, mask, scale,
                       lambda b, n: plans[b])
    return tuple(torch.cat(parts) for parts in zip(*(
        reference.static_cache(k, v, capacity, chunk, prompt_len) for k, v, _ in rows)))


def rowwise_decode(query, key, value, mask, scale, prompt_lens: list[int], policy: str,
                   layer: int, layers: int):
    """A padded batch's decode step: each row's policy decode over its own stored slots (the
    keys the backend's per-row mask leaves it) with the plan of its own prompt length."""
    method, live, out = from_spec(policy), attended_keys(mask), []
    for b, n in enumerate(prompt_lens):
        index = live[b].nonzero().squeeze(1)
        plan = method.plan(n, key.shape[-1], layer, layers)
        k, v = key[b:b + 1, :, index], value[b:b + 1, :, index]
        out.append(method.decode(query[b:b + 1], k, v, None, scale, plan.chunk, plan.dims,
                                 plan.topk))
    return torch.cat(out)


def _summaries(d: SiteDecision) -> tuple:
    """A RocketKVCache's chunk summaries for the Triton op (a cache stored exactly has none)."""
    if d.key.source is not KVSource.ROCKETKV:
        return ()
    key_min, key_max = d.key.cache.args[2:4]
    return (key_min, key_max) if value_of(key_min).shape[2] else ()


def rocketkv_capacity(plan: Plan, prompt_len: int) -> int:
    """Slots of a RocketKVCache layer: the prompt budget and every new token (the window can keep
    more than capacity - max_new_tokens), in whole chunks (if the policy keeps summaries)."""
    room = plan.prompt_budget + plan.length - prompt_len
    return -(-room // plan.chunk) * plan.chunk if plan.chunk else room


def _prompt_store(graph: Graph, d: SiteDecision, key: Node, value: Node, causal: frozenset[str],
                  selections: dict[int, Node]) -> Node:
    """The compress op of a prefill site: what its layer stores of the prompt `key`/`value`.
    Records the positions it selects in `selections` (layer -> node) for layers that reuse
    them."""
    method, n = d.method, d.prompt_len
    observed = method.observed_queries(n)
    source = method.reuses(d.layer)
    store = graph.call_function(
        torch.ops.rocketkv.compress.default,
        (_last_rows(graph, d.site.query, observed), key, value,
         _window_mask(graph, d, observed, causal), d.scale, min(d.plan.prompt_budget, n),
         method.spec, selections.get(source)))
    selections[d.layer] = graph.call_function(operator.getitem, (store, 2))
    return store


def _rewrite_rocketkv_prefill(graph: Graph, d: SiteDecision, causal: frozenset[str],
                              selections: dict[int, Node], first_op: Node, by_row: bool) -> None:
    """The cache's exact prompt store becomes the plan's: what the policy keeps (when it changes
    the prompt) in capacity-sized buffers, with chunk summaries and positions that continue at
    the prompt length. `by_row`: `rowwise_cache`'s store, whose row plans and buffer size are
    inputs (ROW_STORE_INPUTS)."""
    store, plan = d.key.cache, d.plan
    key, value = store.args[:2]
    if by_row:
        with graph.inserting_before(first_op):
            rows = [graph.placeholder(f"{d.site.name}_{field}") for field in ROW_STORE_INPUTS]
        observed = d.method.observed_queries(d.prompt_len)
        with graph.inserting_before(store):
            state = graph.call_function(rowwise_cache, (
                _last_rows(graph, d.site.query, observed), key, value,
                _window_mask(graph, d, observed, frozenset()), d.scale, *rows, d.method.spec,
                d.prompt_len))
        store.replace_all_uses_with(state)
        graph.erase_node(store)
        return
    with graph.inserting_before(store):
        if d.method.rewrites_prompt(d.prompt_len, plan):
            kept = _prompt_store(graph, d, key, value, causal, selections)
            key, value = (graph.call_function(operator.getitem, (kept, i)) for i in (0, 1))
        state = graph.call_function(torch.ops.rocketkv.static_cache.default,
                                    (key, value, d.capacity, plan.chunk, d.prompt_len))
    store.replace_all_uses_with(state)
    graph.erase_node(store)


def _rewrite_rocketkv_turn(graph: Graph, d: SiteDecision, first_op: Node,
                           selections: dict[int, Node]) -> None:
    """A new turn's stored state becomes `turn_store`'s; its plan and buffer size are inputs."""
    extend, output = d.key.cache, graph.output_node()
    with graph.inserting_before(first_op):
        plan = [graph.placeholder(f"{d.site.name}_{field}") for field in TURN_INPUTS]
    observed = d.method.observed_queries(int(d.query_len))
    with graph.inserting_before(d.site.output.next):
        lengths, positions = (graph.call_function(operator.getitem, (extend, i)) for i in (4, 5))
        store = graph.call_function(turn_store, (
            _last_rows(graph, d.site.query, observed), d.site.key, d.site.value, lengths,
            positions, _window_mask(graph, d, observed, frozenset()), d.scale, *plan,
            d.method.spec, selections.get(d.method.reuses(d.layer))))
        selections[d.layer] = graph.call_function(operator.getitem, (store, 6))
        stored = {i: graph.call_function(operator.getitem, (store, i)) for i in range(6)}
    output.args = (tuple(stored[out.args[1]] if isinstance(out, Node) and
                         out.target is operator.getitem and out.args[0] is extend else out
                         for out in output.args[0]),)


def _one(graph: Graph, values: list[int] | Node) -> int | Node:
    """A plan field's value for every row (`plan_inputs`), for the ops of policies that never
    decode rows apart."""
    if isinstance(values, list):
        return values[0]
    return graph.call_function(operator.getitem, (values, 0))


def _is_impure(node: Node) -> bool:
    """Kept by dead-code elimination: side effects, and ops that write their inputs, whose
    results may go unused: in-place tensor methods (Dynamo writes an in-place all_reduce back
    with `x.copy_(...)`, as under tensor parallelism; FX counts no method impure) and custom ops
    with mutable arguments (older torch versions' FX does not count them, e.g.
    rocketkv.append_)."""
    if node.op == "call_method" and node.target.endswith("_") and not node.target.startswith("_"):
        return True
    op = getattr(node.target, "default", node.target)
    return node.is_impure() or bool(getattr(getattr(op, "_schema", None), "is_mutable", False))


def apply(gm: GraphModule, decisions: list[SiteDecision], config: RocketKVConfig,
          plans: dict[str, Plan] | None = None, causal: frozenset[str] = frozenset(),
          by_row: bool = False) -> list[str]:
    """Rewrite the sites decided above; returns the names of the prefill sites that change
    what is stored.

    A prefill site keeps returning its full cache and gets the policy's compress op inserted:
    the keys, values, positions and decode state it stores are appended to the graph's outputs,
    four per such site, in the order returned. Whether they replace the full cache is decided by the
    decode graph (backend.py), the one place that can check that positions do not derive from
    the stored cache length.
    A decode site of a sparse-decode policy gets its op, whose plan (chunk, dims, topk) comes
    from `plans` (site name -> Plan) as constants, or else from three new int inputs appended to
    the graph's inputs, per decode site in graph order (the plan travels with the cache). A
    policy that evicts as it decodes also takes its state (a score per stored slot) as a fourth
    input, and its new state is appended to the outputs, one per such site. A policy that keeps
    the history (rocketkv-mt) decodes from a view (keys, values, positions: three more inputs
    per site), and its new view is appended to the outputs after the states, three per site.
    A new turn into a RocketKVCache returns `turn_store`'s state in place of the extended one;
    it takes its plan and buffer size as two new inputs per site (TURN_INPUTS).
    Other policies' decode sites keep their exact attention (over the evicted cache).
    The prefill sites named in `causal` (masks proven plain causal) drop their masks for
    is_causal=True.
    `by_row` (a padded batch, `rowwise` policies): prefill sites store `rowwise_store`'s rows,
    and sparse decode sites call `rowwise_decode`, whose one new input per site is each row's
    prompt length (instead of the plan's three).
    """
    graph = gm.graph
    output = graph.output_node()
    first_op = next(n for n in graph.nodes if n.op != "placeholder")
    stored: list[Node] = []
    storing: list[str] = []
    states: list[Node] = []
    views: list[Node] = []
    selections: dict[int, Node] = {}
    for d in decisions:
        if d.phase == PREFILL and d.key.source is KVSource.NEW_ROCKETKV:
            _rewrite_rocketkv_prefill(graph, d, causal, selections, first_op, by_row)
        elif d.phase == TURN:
            _rewrite_rocketkv_turn(graph, d, first_op, selections)
        elif d.phase == PREFILL and d.method.rewrites_prompt(d.prompt_len, d.plan):
            with graph.inserting_before(d.site.output.next):
                if by_row:
                    observed = d.method.observed_queries(d.prompt_len)
                    kept = graph.call_function(rowwise_store, (
                        _last_rows(graph, d.site.query, observed), d.site.key, d.site.value,
                        _window_mask(graph, d, observed, causal), d.scale, d.method.spec,
                        d.layer, d.layers))
                else:
                    kept = _prompt_store(graph, d, d.site.key, d.site.value, causal, selections)
                stored += [graph.call_function(operator.getitem, (kept, i)) for i in range(4)]
            storing.append(d.site.name)
        elif d.phase == DECODE and d.key.source is KVSource.ROCKETKV and d.kernel == "exact":
            _attend_stored_slots(graph, d)
        elif d.phase == DECODE and d.kernel != "exact" and by_row and \
                d.key.source is not KVSource.ROCKETKV:
            with graph.inserting_before(first_op):
                lengths = graph.placeholder(f"{d.site.name}_prompt_lens")
            with graph.inserting_before(d.site.output.next):
                sparse = graph.call_function(rowwise_decode, (
                    d.site.query, d.site.key, d.site.value, _mask_arg(graph, d.site), d.scale,
                    lengths, d.method.spec, d.layer, d.layers))
            d.site.output.replace_all_uses_with(sparse)
        elif d.phase == DECODE and d.kernel != "exact":
            if plans is not None:   # compiled for one plan: its ints are constants
                plan = plan_inputs(plans[d.site.name])
            else:
                with graph.inserting_before(first_op):
                    plan = [graph.placeholder(f"{d.site.name}_{field}") for field in PLAN_INPUTS]
                    if d.method.decode_state:
                        state = graph.placeholder(f"{d.site.name}_state")
                    if d.method.keeps_history:
                        view = [graph.placeholder(f"{d.site.name}_view_{part}")
                                for part in ("key", "value", "positions")]
            with graph.inserting_before(d.site.output.next):
                mask = graph.call_function(stored_slots, (d.site.key, _cache_lengths(d))) \
                    if d.key.source is KVSource.ROCKETKV else _mask_arg(graph, d.site)
                args = (d.site.query, d.site.key, d.site.value, mask, d.scale)
                if d.method.keeps_history:
                    step = graph.call_function(view_decode, args + (
                        *(_one(graph, value) for value in plan), *view, config.method.spec))
                    sparse = graph.call_function(operator.getitem, (step, 0))
                    views += [graph.call_function(operator.getitem, (step, i)) for i in (1, 2, 3)]
                elif d.method.decode_state:
                    step = graph.call_function(torch.ops.rocketkv.evicting_decode.default,
                                               args + (_one(graph, plan[2]), state,
                                                       config.method.spec))
                    sparse = graph.call_function(operator.getitem, (step, 0))
                    states.append(graph.call_function(operator.getitem, (step, 1)))
                elif d.kernel != "triton":
                    sparse = graph.call_function(torch.ops.rocketkv.sparse_decode.default,
                                                 args + (*plan, config.method.spec))
                else:
                    sparse = graph.call_function(torch.ops.rocketkv.sparse_decode_triton.default,
                                                 args + (*plan, *_summaries(d)))
            d.site.output.replace_all_uses_with(sparse)
        if d.phase == PREFILL and d.site.name in causal:
            _make_causal(d.site)
    if stored or states or views:
        output.args = (tuple(output.args[0]) + tuple(stored) + tuple(states) + tuple(views),)
    graph.eliminate_dead_code(is_impure_node=_is_impure)
    graph.lint()
    gm.recompile()
    return storing
