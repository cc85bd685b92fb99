"""The state a compressed cache layer carries between graphs, held in the layer's own tensors.

A compressed layer keeps two tensors, where transformers keeps a layer's keys and values (a
DynamicCache layer's `keys`/`values`, or a RocketKVCache layer's): integers as wide as the
model's dtype whose bits are the model's numbers ("packed"), of one length S along the token
axis (attention over `cat([past, new])` needs keys and values of one length):

    keys:    [ slots | state (R) | header (Hr) ]
    values:  [ slots | unused (R + Hr)         ]

- slots: the stored tokens' keys and values, left-aligned per row, room for the new ones after
  them (rounded up to a few sizes, `slot_bucket`);
- state: 4 bytes per slot and KV head for a policy that carries one (H2O's accumulated scores,
  float32; rocketkv-mt's view, int32 slot indices), else none;
- header: per row, the `Word`s below as int32 (every KV head holds the same copy).

Why the cache's own tensors: transformers moves a cache along the batch (beam search's
`reorder_cache`, `batch_select_indices`, `batch_repeat_interleave`) by indexing dim 0 of exactly
these two tensors, so every row's stored tokens, state, lengths and plan move together, on
either cache, with nothing to keep in step. And Dynamo guards a graph input's dtype, so a
decode graph traced over a packed cache is never run over plain keys, or the reverse.
A quantized layer (`kv_bits`, Flag.CODED) keeps its prompt's tokens as codes in the last rows of
the slot region (`Coded`); its slots before them hold the generated tokens exactly, STORED
counting those. `Layout` derives the regions from the length S alone (a code region is inside
`slots`: its size is in the header). Rows past a row's stored slots are never
attended: exact attention can run over all S rows with the mask `slot < stored`.
"""
from __future__ import annotations

import dataclasses
import enum
import math
from typing import Callable

import torch
from torch import Tensor

# The integer type that holds a model dtype's bits, and a code for each in the header.
PACKED_DTYPES = {torch.float32: torch.int32, torch.float16: torch.int16,
                 torch.bfloat16: torch.int16}
DTYPE_CODES = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}
MAGIC = 0x524B5632   # "RKV2"
NOT_SELECTED = 1 << 30   # a topk that keeps every stored slot (an exact layer)


class Word(enum.IntEnum):
    """The header's int32 words, per row."""

    MAGIC = 0
    STORED = 1     # slots filled (the row's stored tokens)
    POSITION = 2   # the row's logical length: positions continue from it
    CHUNK = 3      # the decode plan: consecutive slots that share one key bound
    DIMS = 4       #   query dims stage 2 reads
    TOPK = 5       #   tokens a decode step attends to (NOT_SELECTED: all of them)
    PROMPT = 6     # the tokens the last prefill or turn planned from
    FLAGS = 7
    DTYPE = 8      # DTYPE_CODES of the model's numbers
    VIEW = 9       # rocketkv-mt: the view's length (its slot indices are the state)
    CODED = 10     # a quantized layer (Flag.CODED): the row's prompt tokens kept as codes
    CODED_CAPACITY = 11   # tokens the code region holds (every row alike)
    BITS = 12      #   bits per code
    GROUP = 13     #   entries sharing a step and a zero point
    CODE_ROW = 14  #   the slot row where the code region starts (the exact slots before it)


HEADER_WORDS = len(Word)


class Flag(enum.IntFlag):
    EXACT = 1   # stored whole, without the pass (a RocketKVCache prefilled eagerly)
    STATE = 2   # the layout has a state region
    VIEW = 4    # ... holding a view's slots (rocketkv-mt), not scores
    # Stored by a prefill that computed its positions instead of taking them as an input: a
    # decode step that cannot prove its positions do not derive from the stored length must
    # not read it.
    PROBE = 8
    CODED = 16  # the prompt's kept tokens are codes (`Coded`); STORED counts the exact slots


def packed_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype not in PACKED_DTYPES:
        raise ValueError(f"rocketkv: no packed layout for {dtype}")
    return PACKED_DTYPES[dtype]


def is_packed(t) -> bool:
    """Whether a cache tensor (or its example value) is a packed layer's."""
    return isinstance(t, torch.Tensor) and t.dtype in (torch.int16, torch.int32) and t.dim() == 4


def can_pack(head_dim: int, itemsize: int) -> bool:
    """A layer whose key rows hold whole int32 words can be packed."""
    return head_dim * itemsize % 4 == 0


def words_per_row(head_dim: int, itemsize: int) -> int:
    return head_dim * itemsize // 4


def header_rows(head_dim: int, itemsize: int) -> int:
    per_row = words_per_row(head_dim, itemsize)
    return -(-HEADER_WORDS // per_row)


def slot_bucket(needed: int, head_dim: int = 1, itemsize: int = 4, stateful: bool = False
                ) -> int:
    """Slots for a layer that must hold `needed`: rounded up to 16 sizes per power of two (at
    most 1/16 more), so prompts of nearby lengths share buffer sizes, and so compiled decode
    graphs and recorded CUDA graphs; for a layer with a state region, to whole state rows."""
    step = max(16, 1 << max(needed.bit_length() - 5, 0))
    if stateful:
        step = step * words_per_row(head_dim, itemsize) // math.gcd(step, words_per_row(
            head_dim, itemsize))
    return -(-max(needed, 1) // step) * step


@dataclasses.dataclass(frozen=True)
class Layout:
    """The regions of a packed layer (see the module docstring), in token rows."""

    slots: object        # int or SymInt
    state: object
    header: int

    @classmethod
    def of(cls, keys: Tensor, stateful: bool) -> "Layout":
        """The layout of packed `keys` (or values), from its length alone (`stateful`: the
        policy keeps a state region, one row per `words_per_row` slots)."""
        head_dim, itemsize = keys.shape[-1], keys.element_size()
        header = header_rows(head_dim, itemsize)
        rows = keys.shape[2] - header
        if not stateful:
            return cls(rows, 0, header)
        per_row = words_per_row(head_dim, itemsize)
        slots = rows * per_row // (per_row + 1)
        return cls(slots, rows - slots, header)

    @classmethod
    def new(cls, slots: int, stateful: bool, head_dim: int, itemsize: int) -> "Layout":
        per_row = words_per_row(head_dim, itemsize)
        if stateful and slots % per_row:
            raise ValueError(f"rocketkv: {slots} slots are not whole state rows of {per_row}")
        return cls(slots, slots // per_row if stateful else 0, header_rows(head_dim, itemsize))

    @property
    def rows(self):
        return self.slots + self.state + self.header


@dataclasses.dataclass
class LayerState:
    """Typed views into a packed layer (no copies: writing them writes the cache)."""

    keys: Tensor       # (B, H, slots, D), the model's dtype
    values: Tensor     # (B, H, slots, Dv)
    state: Tensor      # (B, H, slots) int32 (a view's slots; .view(float32): scores); or empty
    header: Tensor     # (B, H, words) int32
    layout: Layout

    def word(self, field: Word) -> Tensor:
        """(B,) int32: one header word of every row (head 0's copy)."""
        return self.header[:, 0, field]

    @property
    def stored(self) -> Tensor:
        return self.word(Word.STORED)

    @property
    def position(self) -> Tensor:
        return self.word(Word.POSITION)

    def set_word(self, field: Word, value) -> None:
        """Write a header word of every row, in every head's copy (`value`: int or (B,))."""
        if isinstance(value, Tensor):
            value = value.to(torch.int32).view(-1, 1)
        self.header[:, :, field] = value

    def valid(self, rows=None) -> Tensor:
        """(B, 1, 1, rows) bool: the stored slots among the first `rows` (all slots by
        default) of each row (True = attend)."""
        rows = self.keys.shape[2] if rows is None else rows
        slots = torch.arange(rows, device=self.keys.device)
        return slots < self.stored.view(-1, 1, 1, 1)


def unpack(keys: Tensor, values: Tensor, stateful: bool, dtype: torch.dtype) -> LayerState:
    """The views of packed `keys`/`values` holding numbers of `dtype`."""
    layout = Layout.of(keys, stateful)
    s, r = layout.slots, layout.state
    slots, state, header = keys.split([s, r, layout.header], dim=2)
    head_dim = keys.shape[-1]
    # (rows, head_dim) is contiguous in each region: it views as one run of int32 words
    state = state.view(*keys.shape[:2], r * head_dim).view(torch.int32)[..., :s] if r else \
        keys.new_empty(0, dtype=torch.int32)
    header = header.view(*keys.shape[:2], layout.header * head_dim).view(torch.int32)
    return LayerState(slots.view(dtype), values.narrow(2, 0, s).view(dtype), state, header,
                      layout)


class BufferPool:
    """The packed tensors of compressed caches, kept when their cache is dropped and handed out
    again, zeroed, for the next cache of the same shape. An evaluation loop's generate calls
    then store their caches at the same addresses, and the decode graphs that the first call
    recorded as CUDA graphs replay in every later one (a cache at a new address is recorded
    again: a recording per call, each costing time at every later step, and memory).

    A buffer is free when no tensor but the pool's uses its storage, so a cache someone still
    holds (a returned past_key_values, an earlier turn) is never handed out. Only the free
    buffers of the shape last asked for are kept: asking for a new shape releases the others,
    so the pool holds at most what the last dropped cache held (`release` frees that too).
    A recycled storage is a new cache: `on_recycle` tells whoever keys state by storage."""

    def __init__(self):
        self.buffers: dict[tuple, list[Tensor]] = {}   # by shape, the last asked for last
        self.on_recycle: list[Callable[[torch.UntypedStorage], None]] = []
        self.recycled = 0   # buffers handed out again, ever

    def zeros(self, shape: tuple[int, ...], dtype: torch.dtype, device) -> Tensor:
        device = torch.device(device)
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return torch.zeros(shape, dtype=dtype, device=device)   # a CUDA graph's own pool
        # an inference tensor takes no in-place write outside inference mode: kept apart
        key = (tuple(shape), dtype, device, torch.is_inference_mode_enabled())
        buffers = self.buffers.pop(key, [])
        self.buffers[key] = buffers
        for buffer in buffers:
            if _unshared(buffer):
                self.recycled += 1
                for forget in self.on_recycle:
                    forget(buffer.untyped_storage())
                return buffer.zero_().view(shape)   # a new tensor: its holders count
        for other in list(self.buffers)[:-1]:
            held = [b for b in self.buffers[other] if not _unshared(b)]
            if held:
                self.buffers[other] = held   # still someone's: kept to hand out when freed
            else:
                del self.buffers[other]
        buffer = torch.zeros(shape, dtype=dtype, device=device)
        buffers.append(buffer)
        return buffer.view(shape)

    def release(self) -> None:
        """Forget every buffer (the memory of those no cache uses is freed)."""
        self.buffers.clear()

    def free_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for buffers in self.buffers.values()
                   for b in buffers if _unshared(b))


def _unshared(buffer: Tensor) -> bool:
    """No tensor but `buffer` uses its storage (the count includes the storage's Python object,
    which lives as long as the storage does)."""
    return torch._C._storage_Use_Count(buffer.untyped_storage()._cdata) <= 2


POOL = BufferPool()


def allocate(batch: int, heads: int, head_dim: int, value_dim: int, slots: int, state: str,
             dtype: torch.dtype, device, code: Coded | None = None
             ) -> tuple[Tensor, Tensor, LayerState]:
    """Zeroed packed tensors for `slots` slots (a state region if `state`, "scores" or
    "view"; `code`'s region after them for a quantized layer), their views, and a header with
    the magic word, the dtype and the flags filled (and the code's words), its topk
    NOT_SELECTED (every stored token attended) until a plan is written. The tensors come
    from `POOL` (a dropped cache's memory)."""
    stateful = bool(state)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    layout = Layout.new(slots + (code.rows if code else 0), stateful, head_dim, itemsize)
    int_dtype = packed_dtype(dtype)
    keys = POOL.zeros((batch, heads, layout.rows, head_dim), int_dtype, device)
    values = POOL.zeros((batch, heads, layout.rows, value_dim), int_dtype, device)
    layer = unpack(keys, values, stateful, dtype)
    layer.set_word(Word.MAGIC, MAGIC)
    layer.set_word(Word.DTYPE, DTYPE_CODES[dtype])
    flags = (Flag.STATE if stateful else 0) | (Flag.VIEW if state == "view" else 0) | \
        (Flag.CODED if code else 0)
    layer.set_word(Word.FLAGS, int(flags))
    layer.set_word(Word.TOPK, NOT_SELECTED)
    if code:
        for word, value in ((Word.CODED_CAPACITY, code.capacity), (Word.BITS, code.bits),
                            (Word.GROUP, code.group), (Word.CODE_ROW, slots)):
            layer.set_word(word, value)
    return keys, values, layer


def model_dtype(keys: Tensor) -> torch.dtype:
    """The dtype of a packed layer's numbers, read from its header (on the host)."""
    code = int(_header_words(keys)[0, Word.DTYPE])
    return {v: k for k, v in DTYPE_CODES.items()}[code]


def _header_words(keys: Tensor) -> Tensor:
    """(B, words) int32: every row's header (head 0), read without knowing the policy."""
    rows = header_rows(keys.shape[-1], keys.element_size())
    return keys[:, 0, -rows:].reshape(keys.shape[0], -1).view(torch.int32)


def stored_counts(keys: Tensor) -> tuple[list[int], int]:
    """Each row's stored slots, and the flags of all rows (or'ed), read from a packed layer's
    header (on the host)."""
    words = _header_words(keys)[:, [Word.STORED, Word.FLAGS]].tolist()
    flags = 0
    for _, f in words:
        flags |= f
    return [stored for stored, _ in words], flags


def read(keys: Tensor, values: Tensor) -> LayerState:
    """The views of a packed layer whose policy is not known (its header says)."""
    words = _header_words(keys)
    if words.shape[0] and int(words[0, Word.MAGIC]) != MAGIC:
        raise ValueError("rocketkv: not a packed cache layer (no header)")
    stateful = bool(int(words[0, Word.FLAGS]) & Flag.STATE) if words.shape[0] else False
    return unpack(keys, values, stateful, model_dtype(keys))


CODE_BITS = (2, 4, 8)   # widths that pack whole codes into bytes


@dataclasses.dataclass(frozen=True)
class Coded:
    """Where a quantized layer keeps its prompt's tokens (KVComp, arXiv 2509.00579; KIVI's
    grouping): `rows` rows at the end of the slot region of both tensors, after the `exact`
    slots that hold the generated tokens. Per row and KV head, as bytes:

        keys:    [ key codes (capacity x D) | steps, zeros: fp16 (capacity / group x D) each ]
        values:  [ value codes (capacity x Dv) | steps, zeros: fp16 (capacity x Dv / group) each ]

    A token's codes are contiguous, `8 / bits` to a byte, the lower channel in the lower bits;
    keys share a step and zero per channel over `group` tokens, values per token over `group`
    channels (`reference.quantize`). The capacity is a multiple of the group and of 16 tokens
    (whole bytes, fp16-aligned steps)."""

    capacity: int
    bits: int
    group: int
    head_dim: int
    value_dim: int
    itemsize: int

    @classmethod
    def new(cls, tokens: int, bits: int, group: int, head_dim: int, value_dim: int,
            itemsize: int) -> "Coded":
        assert bits in CODE_BITS, bits   # the policy checks the option
        unit = 16 * group // math.gcd(16, group)
        return cls(-(-max(tokens, 1) // unit) * unit, bits, group, head_dim, value_dim, itemsize)

    @property
    def key_parts(self) -> tuple[int, int]:
        """(code bytes, fp16 steps) of the keys' region (as many zeros as steps)."""
        return (self.capacity * self.head_dim * self.bits // 8,
                self.capacity // self.group * self.head_dim)

    @property
    def value_parts(self) -> tuple[int, int]:
        """(code bytes, fp16 steps) of the values' region."""
        return (self.capacity * self.value_dim * self.bits // 8,
                self.capacity * -(-self.value_dim // self.group))

    @property
    def rows(self) -> int:
        def rows_of(parts, dim):
            return -(-(parts[0] + 4 * parts[1]) // (dim * self.itemsize))
        return max(rows_of(self.key_parts, self.head_dim),
                   rows_of(self.value_parts, self.value_dim))

    def regions(self, keys: Tensor, values: Tensor, exact: int):
        """Views of the (codes as bytes, steps, zeros) of keys and of values: (B, H, ...)."""
        out = []
        for tensor, (code_bytes, scales) in ((keys, self.key_parts), (values, self.value_parts)):
            region = tensor.narrow(2, exact, self.rows).view(torch.uint8).flatten(2)
            fp16 = region.narrow(2, code_bytes, 4 * scales).view(torch.float16)
            out.append((region.narrow(2, 0, code_bytes), fp16.narrow(2, 0, scales),
                        fp16.narrow(2, scales, scales)))
        return out

    def write(self, keys: Tensor, values: Tensor, exact: int, row: int, key, value) -> None:
        """Row `row`'s quantized keys and values (`reference.Quantized`, (1, H, n, D), n <=
        capacity) into the region after `exact` slots."""
        for (codes, steps, zeros), q in zip(self.regions(keys, values, exact), (key, value)):
            packed = _pack_codes(q.codes[0], self.bits)          # H, n * dim * bits / 8
            codes[row, :, :packed.shape[-1]] = packed
            step, zero = q.step[0].flatten(1), q.zero[0].flatten(1)
            steps[row, :, :step.shape[-1]] = step
            zeros[row, :, :zero.shape[-1]] = zero

    def read(self, keys: Tensor, values: Tensor, exact: int, dtype: torch.dtype
             ) -> tuple[Tensor, Tensor]:
        """Every row's coded keys and values, dequantized: (B, H, capacity, D) and (..., Dv)
        (rows past a row's own count hold whatever was there: mask them)."""
        from .kernels.reference import Quantized, dequantize   # (the kernels import state)
        (kc, ks, kz), (vc, vs, vz) = self.regions(keys, values, exact)
        B, H = keys.shape[:2]
        D, Dv, n, G = self.head_dim, self.value_dim, self.capacity, self.group
        key = Quantized(_unpack_codes(kc, self.bits).view(B, H, n, D),
                        ks.view(B, H, n // G, D), kz.view(B, H, n // G, D), self.bits, G, 2)
        value = Quantized(_unpack_codes(vc, self.bits).view(B, H, n, Dv),
                          vs.view(B, H, n, -1), vz.view(B, H, n, -1), self.bits, G, 3)
        return dequantize(key, dtype), dequantize(value, dtype)


def _pack_codes(codes: Tensor, bits: int) -> Tensor:
    """(..., n, dim) uint8 codes < 2**bits as bytes (..., n * dim * bits / 8)."""
    per_byte = 8 // bits
    flat = codes.flatten(-2).to(torch.int32)
    flat = torch.nn.functional.pad(flat, (0, -flat.shape[-1] % per_byte)) \
        .unflatten(-1, (-1, per_byte))
    shifts = torch.arange(per_byte, device=codes.device, dtype=torch.int32) * bits
    return (flat << shifts).sum(-1).to(torch.uint8)


def _unpack_codes(packed: Tensor, bits: int) -> Tensor:
    """Bytes (..., m) as their codes (..., m * 8 / bits), uint8."""
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, device=packed.device, dtype=torch.int32) * bits
    return ((packed.to(torch.int32).unsqueeze(-1) >> shifts) & (2**bits - 1)) \
        .flatten(-2).to(torch.uint8)


def coded(keys: Tensor, values: Tensor, stateful: bool = False) -> tuple[Coded, int] | None:
    """A quantized layer's `Coded` and its exact slots, from its header (on the host); None for
    a layer without codes."""
    words = _header_words(keys)
    if not words.shape[0] or not int(words[0, Word.FLAGS]) & Flag.CODED:
        return None
    code = Coded(int(words[0, Word.CODED_CAPACITY]), int(words[0, Word.BITS]),
                 int(words[0, Word.GROUP]), keys.shape[-1], values.shape[-1],
                 keys.element_size())
    return code, int(words[0, Word.CODE_ROW])


def exact_slots(keys: Tensor, values: Tensor, stateful: bool) -> int:
    """The slots a layer has for exact tokens (a quantized layer's codes take the rest), read
    on the host."""
    found = coded(keys, values, stateful)
    return Layout.of(keys, stateful).slots if found is None else found[1]


def tokens(keys: Tensor, values: Tensor, stateful: bool, dtype: torch.dtype
           ) -> tuple[Tensor, Tensor, Tensor]:
    """Every stored token's keys and values as numbers of `dtype` and which are stored: for a
    layer without codes its slots and `valid()`; for a quantized one its coded tokens
    dequantized, then its exact slots, (B, H, capacity + exact, D), and (B, 1, 1, capacity +
    exact) bool, True at each row's coded tokens and stored exact slots."""
    layer = unpack(keys, values, stateful, dtype)
    found = coded(keys, values, stateful)
    if found is None:
        return layer.keys, layer.values, layer.valid()
    code, exact = found
    k, v = code.read(keys, values, exact, dtype)
    slots = torch.arange(code.capacity + exact, device=keys.device)
    counts = layer.word(Word.CODED).view(-1, 1, 1, 1)
    valid = (slots < counts) | (slots >= code.capacity) & \
        (slots < code.capacity + layer.stored.view(-1, 1, 1, 1))
    return (torch.cat([k, layer.keys[:, :, :exact]], 2),
            torch.cat([v, layer.values[:, :, :exact]], 2), valid)


def token_rows(keys: Tensor, values: Tensor, stateful: bool, dtype: torch.dtype
               ) -> list[tuple[Tensor, Tensor]]:
    """Each row's stored tokens in order, (1, H, n, D) and (1, H, n, Dv): its coded ones
    dequantized (if any; the header read and the codes dequantized once for all rows), then
    its exact slots."""
    k, v, valid = tokens(keys, values, stateful, dtype)
    index = [row.nonzero().squeeze(1) for row in valid[:, 0, 0]]
    return [(k[b:b + 1, :, i], v[b:b + 1, :, i]) for b, i in enumerate(index)]


@dataclasses.dataclass
class StoredLayer:
    """What a compressed layer holds, for people and tests (`stored`): per row, the stored
    tokens' keys and values (the first `lengths[b]` slots), the logical length, and the plan
    decode runs with."""

    keys: Tensor
    values: Tensor
    lengths: list[int]
    positions: list[int]
    chunk: list[int]
    dims: list[int]
    topk: list[int]

    @property
    def slots(self) -> int:
        return self.keys.shape[2]


def stored(cache) -> list[StoredLayer | None]:
    """The compressed layers of a transformers cache (or of a list of (keys, values) pairs), as
    `StoredLayer`s; None for a layer that is not compressed (it holds plain keys and values)."""
    pairs = [(layer.keys, layer.values) for layer in cache.layers] if hasattr(cache, "layers") \
        else list(cache)
    out = []
    for keys, values in pairs:
        if not is_packed(keys):
            out.append(None)
            continue
        state = read(keys, values)
        words = {w: state.word(w).tolist() for w in Word}
        k, v, lengths = state.keys, state.values, words[Word.STORED]
        if coded(keys, values, state.layout.state > 0) is not None:   # codes dequantized
            k, v, lengths = _left_aligned(keys, values, state.keys.dtype)
        out.append(StoredLayer(k, v, lengths, words[Word.POSITION], words[Word.CHUNK],
                               words[Word.DIMS], words[Word.TOPK]))
    return out


def _left_aligned(keys: Tensor, values: Tensor, dtype: torch.dtype
                  ) -> tuple[Tensor, Tensor, list[int]]:
    """A quantized layer's tokens, each row's first (coded, dequantized, then exact), and
    their counts."""
    rows = token_rows(keys, values, False, dtype)
    width = max(k.shape[2] for k, _ in rows)
    pad = [(k.new_zeros(1, k.shape[1], width - k.shape[2], k.shape[3]),
            v.new_zeros(1, v.shape[1], width - v.shape[2], v.shape[3])) for k, v in rows]
    return (torch.cat([torch.cat([k, p], 2) for (k, _), (p, _) in zip(rows, pad)]),
            torch.cat([torch.cat([v, p], 2) for (_, v), (_, p) in zip(rows, pad)]),
            [k.shape[2] for k, _ in rows])
