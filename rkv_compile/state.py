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
`Layout` derives the regions from the length S alone. Rows past a row's stored slots are never
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


HEADER_WORDS = len(Word)


class Flag(enum.IntFlag):
    EXACT = 1   # stored whole, without the pass (a RocketKVCache prefilled eagerly)
    STATE = 2   # the layout has a state region
    VIEW = 4    # ... holding a view's slots (rocketkv-mt), not scores
    # Stored by a prefill that computed its positions instead of taking them as an input: a
    # decode step that cannot prove its positions do not derive from the stored length must
    # not read it.
    PROBE = 8


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
             dtype: torch.dtype, device) -> tuple[Tensor, Tensor, LayerState]:
    """Zeroed packed tensors for `slots` slots (a state region if `state`, "scores" or
    "view"), their views, and a header with the magic word, the dtype and the flags filled.
    The tensors come from `POOL` (a dropped cache's memory)."""
    stateful = bool(state)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    layout = Layout.new(slots, stateful, head_dim, itemsize)
    int_dtype = packed_dtype(dtype)
    keys = POOL.zeros((batch, heads, layout.rows, head_dim), int_dtype, device)
    values = POOL.zeros((batch, heads, layout.rows, value_dim), int_dtype, device)
    layer = unpack(keys, values, stateful, dtype)
    layer.set_word(Word.MAGIC, MAGIC)
    layer.set_word(Word.DTYPE, DTYPE_CODES[dtype])
    flags = (Flag.STATE if stateful else 0) | (Flag.VIEW if state == "view" else 0)
    layer.set_word(Word.FLAGS, int(flags))
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
        out.append(StoredLayer(state.keys, state.values, words[Word.STORED],
                               words[Word.POSITION], words[Word.CHUNK], words[Word.DIMS],
                               words[Word.TOPK]))
    return out
