"""What the cache ops do to a packed layer (`rkv_compile.state`), in PyTorch.

One function per phase a cache goes through: a prompt stored (`compress`: the policy's
selection; `store`: the whole prompt), a decode token appended (`append`), a decode step's
attention (`decode`, `evicting_decode`), and a new turn (`turn`: exact attention over the stored
tokens and the turn's, then the policy's selection again; `extend`: the turn kept whole). Rows
are independent: each row selects over its own tokens (a left-padded row over its real ones)
with the plan of its own length, is stored left-aligned, and decodes over its own stored slots
with its own plan, read from its header. These are the ops' implementations on the CPU, and
the oracle of the Triton kernels.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import state as S
from ..diagnostics import warn_once
from ..state import Word
from . import reference


@dataclasses.dataclass
class Row:
    """What one row stores: its kept keys and values (1, H, n, D), their positions among the
    row's tokens (1, H, n), its per-slot state ((1, H, n) or empty), the view's slots (for a
    policy that keeps the history: the kept tokens among the stored, (1, H, v)), and its plan."""

    keys: Tensor
    values: Tensor
    positions: Tensor
    state: Tensor
    view: Tensor | None
    plan: object
    position: int      # the row's logical length
    prompt: int        # the tokens its plan is for


def live_tokens(mask: Tensor | None, batch: int, n: int, device) -> Tensor:
    """(B, n) bool: the keys the last query row of a (B, 1, q, n) mask attends to (a
    left-padded row's real tokens); every key without a mask."""
    if mask is None:
        return torch.ones(batch, n, dtype=torch.bool, device=device)
    return torch.isfinite(reference.additive_mask(mask)[:, 0, -1]).expand(batch, n)


def select_row(method, query_window: Tensor, key: Tensor, value: Tensor, mask: Tensor | None,
               scale: float, plan, reuse: Tensor | None = None) -> Row:
    """What one row (batch 1) of n tokens stores under `plan`: the policy's selection, or every
    token where the plan keeps them all; for a policy that keeps the history, every token, and
    the selection as the view."""
    n = key.shape[2]
    positions = torch.arange(n, device=key.device).expand(1, key.shape[1], n)
    kept = (key, value, positions, key.new_empty(0, dtype=torch.float32))
    if method.rewrites_prompt(n, plan):
        observed = method.observed_queries(n)
        kept = method.compress(query_window[..., -observed:, :], key, value,
                               None if mask is None else mask[..., -observed:, :], scale,
                               min(plan.prompt_budget, n), reuse)
    if method.keeps_history:
        return Row(key, value, positions, kept[3], kept[2].to(torch.int32), plan, n, n)
    return Row(*kept, None, plan, n, n)


def pack(rows: list[Row], room: int, method, dtype: torch.dtype, probe: bool, widest: int
         ) -> tuple[Tensor, Tensor]:
    """Rows into new packed tensors: each row left-aligned, with room for `room` more tokens,
    its state, and its header (`probe`: its positions are unproven, Flag.PROBE). `widest`:
    the most tokens any row of any layer stores (every layer gets one size: transformers
    builds one mask for all layers)."""
    first = rows[0]
    B, H, D, Dv = len(rows), first.keys.shape[1], first.keys.shape[3], first.values.shape[3]
    itemsize = torch.empty(0, dtype=dtype).element_size()
    code = None
    if method.kv_bits is not None:   # the prompt's tokens as codes, the slots for new ones
        code = S.Coded.new(S.slot_bucket(widest), method.kv_bits, method.kv_group_size, D, Dv,
                           itemsize)
        slots = S.slot_bucket(room)
    else:
        slots = S.slot_bucket(widest + room, D, itemsize, bool(method.state))
    keys, values, layer = S.allocate(B, H, D, Dv, slots, method.state, dtype, first.keys.device,
                                     code)
    if probe:
        layer.set_word(Word.FLAGS, layer.word(Word.FLAGS) | S.Flag.PROBE)
    for b, row in enumerate(rows):
        n = row.keys.shape[2]
        if code is not None:
            code.write(keys, values, slots, b,
                       reference.quantize(row.keys, code.bits, code.group, dim=2),
                       reference.quantize(row.values, code.bits, code.group, dim=3))
            layer.header[b, :, Word.CODED] = n
        else:
            layer.keys[b, :, :n], layer.values[b, :, :n] = row.keys[0], row.values[0]
        if row.view is not None:
            layer.state[b, :, :row.view.shape[2]] = row.view[0]
            layer.header[b, :, Word.VIEW] = row.view.shape[2]
        elif row.state.numel():
            layer.state.view(torch.float32)[b, :, :n] = row.state[0]
        plan = row.plan
        for word, value in ((Word.STORED, 0 if code else n), (Word.POSITION, row.position),
                            (Word.CHUNK, plan.chunk), (Word.DIMS, plan.dims),
                            (Word.TOPK, plan.topk or S.NOT_SELECTED), (Word.PROMPT, row.prompt)):
            layer.header[b, :, word] = value
    return keys, values


def compress(query_window: Tensor, key: Tensor, value: Tensor, mask: Tensor | None,
             scale: float, room: int, method, layer: int, layers: int, probe: bool,
             reuse: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """A prefill's store under the policy: each row's selection over its own tokens with the
    plan of its own length (and `room` new tokens), packed; and the kept positions, (B, H, k)
    with -1 past a row's own (for layers that reuse them). `probe`: the prefill computed its
    positions (Flag.PROBE)."""
    B, H, n, _ = key.shape
    live = live_tokens(mask, B, n, key.device)
    roomy = dataclasses.replace(method, max_new_tokens=room)
    rows = []
    for b in range(B):
        index = live[b].nonzero().squeeze(1)
        own = reference.row_of(mask, b)
        plan = roomy.plan(len(index), key.shape[-1], layer, layers)
        own_reuse = None if reuse is None else reuse[b:b + 1, :, :int((reuse[b, 0] >= 0).sum())]
        rows.append(select_row(method, query_window[b:b + 1], key[b:b + 1, :, index],
                               value[b:b + 1, :, index], None if own is None else own[..., index],
                               scale, plan, own_reuse))
    packed = pack(rows, room, method, key.dtype, probe,
                  widest(roomy, rows, key.shape[-1], layers))
    return (*packed, _kept_positions(rows))


def widest(method, rows: list[Row], head_dim: int, layers: int) -> int:
    """The most tokens a row stores in any layer under the rows' plans' policy (layers may
    budget differently: PyramidKV)."""
    def kept(n: int, layer: int) -> int:
        plan = method.plan(n, head_dim, layer, layers)
        keeps = method.rewrites_prompt(n, plan) and not method.keeps_history
        return min(plan.prompt_budget, n) if keeps else n
    return max(kept(row.prompt, layer) for row in rows for layer in range(layers))


def _kept_positions(rows: list[Row]) -> Tensor:
    width = max(row.positions.shape[2] for row in rows)
    return torch.cat([F.pad(row.positions, (0, width - row.positions.shape[2]), value=-1)
                      for row in rows])


def store(key: Tensor, value: Tensor, room: int) -> tuple[Tensor, Tensor]:
    """The whole prompt, exactly, with room for `room` tokens (a RocketKVCache prefilled
    without the pass): every row's slots are its positions, decode attends to all of them. Its
    size follows from the shapes (Dynamo traces it inside RocketKVCache.update)."""
    warn_once("rocketkv: a RocketKVCache stores a prompt whole: the rocketkv pass did not "
              "compress this prefill (the forward is not compiled with backend='rocketkv', or "
              "its attention stays exact: see rkv_compile.explain), so decode attends to every "
              "token")
    B, H, n, D = key.shape
    keys, values, layer = S.allocate(B, H, D, value.shape[-1], n + room, "", key.dtype,
                                     key.device)
    layer.keys[:, :, :n], layer.values[:, :, :n] = key, value
    for word, v in ((Word.STORED, n), (Word.POSITION, n), (Word.DIMS, D),
                    (Word.TOPK, S.NOT_SELECTED), (Word.PROMPT, n), (Word.FLAGS, S.Flag.EXACT)):
        layer.set_word(word, v)
    return keys, values


def append(keys: Tensor, values: Tensor, new_key: Tensor, new_value: Tensor, state: str
           ) -> None:
    """One new token per row at slot stored[b], in place: its score starts at 0 (`state`
    "scores") or it joins the view ("view"), and stored and position grow by one. Tensor ops
    only (no host reads): it runs inside CUDA graphs."""
    layer = S.unpack(keys, values, bool(state), new_key.dtype)
    B = keys.shape[0]
    slots = layer.keys.shape[2]
    stored = layer.stored.long()
    # a quantized layer's exact slots end where its codes start (CODE_ROW, 0 without codes)
    code_row = layer.word(Word.CODE_ROW).long()
    limit = torch.where(code_row > 0, code_row, slots)
    torch._assert_async((stored < limit).all(), "rocketkv: the cache is full")
    rows = torch.arange(B, device=keys.device)
    slot = torch.minimum(stored, limit - 1)
    k, v = new_key[:, :, 0], new_value[:, :, 0]                               # B H D
    layer.keys[rows, :, slot] = k
    layer.values[rows, :, slot] = v
    if state == "scores":   # (the bits of 0.0)
        layer.state[rows, :, slot] = 0
    elif state == "view":
        views = layer.word(Word.VIEW).long()
        layer.state[rows, :, views.clamp_max(slots - 1)] = slot.to(torch.int32).view(B, 1)
        layer.set_word(Word.VIEW, views + 1)
    layer.set_word(Word.STORED, stored + 1)
    layer.set_word(Word.POSITION, layer.position + 1)


def _plans(layer: S.LayerState) -> list[tuple[int, int, int]]:
    """Each row's decode plan (chunk, dims, topk), read on the host."""
    return list(zip(*(layer.word(w).tolist() for w in (Word.CHUNK, Word.DIMS, Word.TOPK))))


def exact_attention(query: Tensor, keys: Tensor, values: Tensor, valid: Tensor, scale: float
                    ) -> Tensor:
    """Exact attention over each row's stored slots (`valid`; tensor ops only: CUDA graphs
    hold it)."""
    return F.scaled_dot_product_attention(query, keys, values, attn_mask=valid, scale=scale,
                                          enable_gqa=query.shape[1] != keys.shape[1])


def decode(query: Tensor, keys: Tensor, values: Tensor, scale: float, method) -> Tensor:
    """One decode step's attention over the stored slots: exact for a policy that decodes
    exactly (and for a layer stored whole, without selection), else the policy's `decode` for
    each row with its own plan (rows sharing a plan in one call)."""
    layer = S.unpack(keys, values, bool(method.state), query.dtype)
    # a policy that quantizes reads its layer's tokens as `state.tokens` gives them: a quantized
    # layer's codes dequantized, then its exact slots (the header read once, on the host)
    quantizes = method.kv_bits is not None
    if not method.sparse_decode:
        tokens = S.tokens(keys, values, False, query.dtype) if quantizes else \
            (layer.keys, layer.values, layer.valid())
        return exact_attention(query, *tokens, scale)
    plans, stored = _plans(layer), layer.stored.tolist()
    views = layer.word(Word.VIEW).tolist() if method.keeps_history else None
    rows = S.token_rows(keys, values, False, query.dtype) if quantizes else None
    out = torch.empty(*query.shape[:-1], values.shape[-1], dtype=query.dtype,
                      device=query.device)
    for b, (chunk, dims, topk) in enumerate(plans):
        q = query[b:b + 1]
        if views is not None:   # the view: kept prompt tokens and every decoded one
            index = layer.state[b:b + 1, :, :views[b]].long()
            k, v = (reference.gather_tokens(t[b:b + 1], index) for t in (layer.keys, layer.values))
        elif rows is not None:
            k, v = rows[b]
        else:
            k, v = layer.keys[b:b + 1, :, :stored[b]], layer.values[b:b + 1, :, :stored[b]]
        if topk >= S.NOT_SELECTED:
            out[b:b + 1] = F.scaled_dot_product_attention(q, k, v, scale=scale,
                                                          enable_gqa=q.shape[1] != k.shape[1])
        else:
            out[b:b + 1] = method.decode(q, k, v, None, scale, chunk, dims, topk)
    return out


def evicting_decode(query: Tensor, keys: Tensor, values: Tensor, scale: float, method
                    ) -> Tensor:
    """A decode step of a policy that evicts as it decodes: exact attention over each row's
    live slots (stored, not evicted), whose state (accumulated attention) it updates in place,
    evicting down to the row's live limit (its plan's topk). All rows at once, each with its
    own limit as a tensor: no host reads."""
    layer = S.unpack(keys, values, True, query.dtype)
    scores = layer.state.view(torch.float32)
    out, new_scores = method.evicting_decode(query, layer.keys, layer.values, layer.valid(),
                                             scale, layer.word(Word.TOPK), scores)
    scores.copy_(new_scores)
    return out


def turn_attention(query: Tensor, key: Tensor, value: Tensor, stored: int, scale: float
                   ) -> Tensor:
    """A turn's exact attention (batch 1): its queries see every stored token and the turn's
    own tokens causally."""
    T = query.shape[2]
    mask = torch.ones(T, stored + T, dtype=torch.bool, device=query.device).tril(stored)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale,
                                          enable_gqa=query.shape[1] != key.shape[1])


def turn(query: Tensor, key: Tensor, value: Tensor, keys: Tensor, values: Tensor, scale: float,
         room: int, method, layer_index: int, layers: int, reuse: Tensor | None = None
         ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A new turn (or a later prompt chunk) over a packed layer: (its attention, the new packed
    tensors, the kept positions). Each row attends exactly over its stored tokens and the
    turn's; then the policy selects again over all of them, voted by the turn's last queries,
    with the plan of the row's logical length after the turn. A turn with fewer tokens than the
    selection reads queries keeps every token (and the row's last plan)."""
    _refuse_codes(keys, values, "a new turn (or a later prompt chunk)")
    layer = S.unpack(keys, values, bool(method.state), query.dtype)
    roomy = dataclasses.replace(method, max_new_tokens=room)
    T = query.shape[2]
    out = torch.empty(*query.shape[:-1], value.shape[-1], dtype=query.dtype, device=query.device)
    rows = []
    stored, positions = layer.stored.tolist(), layer.position.tolist()
    old_plans = _plans(layer)
    short_turn = False
    for b in range(query.shape[0]):
        # (a policy that keeps the history stores every token: the view is set aside)
        k = torch.cat([layer.keys[b:b + 1, :, :stored[b]], key[b:b + 1]], 2)
        v = torch.cat([layer.values[b:b + 1, :, :stored[b]], value[b:b + 1]], 2)
        out[b:b + 1] = turn_attention(query[b:b + 1], k, v, stored[b], scale)
        n, length = k.shape[2], positions[b] + T
        plan = roomy.plan(length, k.shape[-1], layer_index, layers)
        if T < method.observed_queries(n):   # cannot vote as a prompt's window: keep all
            short_turn = True
            plan = dataclasses.replace(plan, prompt_budget=n)
            if not method.keeps_history:   # the stored tokens keep the plan they decode with
                chunk, dims, topk = old_plans[b]
                plan = dataclasses.replace(plan, chunk=chunk, dims=dims,
                                           topk=0 if topk >= S.NOT_SELECTED else topk)
        row = select_row(method, query[b:b + 1], k, v, None, scale, plan,
                         None if reuse is None else reuse[b:b + 1])
        row.position, row.prompt = length, length
        rows.append(row)
    probe = bool((layer.word(Word.FLAGS) & S.Flag.PROBE).any())
    packed = pack(rows, room, method, query.dtype, probe,
                  layer.layout.slots + T if short_turn else   # every layer's: one size
                  widest(roomy, rows, key.shape[-1], layers))
    return (out, *packed, _kept_positions(rows))


def extend(keys: Tensor, values: Tensor, key: Tensor, value: Tensor, room: int, dtype
           ) -> tuple[Tensor, Tensor]:
    """A new turn kept whole (a RocketKVCache without the pass): the stored slots and the
    turn's tokens, in tensors of `slots + turn + room` slots (a size that follows from the
    shapes, as the mask transformers builds for the turn must), decode still exact."""
    _refuse_codes(keys, values, "a new turn")
    layer = S.read(keys, values)
    B, H, T, D = key.shape
    slots = layer.keys.shape[2] + T + room
    new_keys, new_values, new = S.allocate(B, H, D, value.shape[-1], slots, "", dtype,
                                           key.device)
    for b, n in enumerate(layer.stored.tolist()):
        new.keys[b, :, :n + T] = torch.cat([layer.keys[b, :, :n], key[b]], 1)
        new.values[b, :, :n + T] = torch.cat([layer.values[b, :, :n], value[b]], 1)
    new.header.copy_(layer.header)
    new.set_word(Word.STORED, layer.stored + T)
    new.set_word(Word.POSITION, layer.position + T)
    return new_keys, new_values


def _refuse_codes(keys: Tensor, values: Tensor, what: str) -> None:
    if S.coded(keys, values) is not None:
        raise NotImplementedError(
            f"rocketkv: {what} over a cache whose prompt is stored as codes (kv_bits) is not "
            "supported yet; use one prompt per cache with kv_bits, or no kv_bits")
