"""RocketKVCache: a transformers Cache whose layers are packed from the start, sized up front.

The zero-change path needs no custom cache: generate's DynamicCache holds the packed layers the
rocketkv pass stores in it (`rkv_compile.state`). A RocketKVCache is for what a DynamicCache
cannot do:
- conversations: it counts each sequence's logical length (`get_seq_length`), so transformers
  positions a new turn (`generate` again with the conversation so far) right, and the pass
  runs the policy's selection again over the kept history and the turn;
- sizing: its layers have room for its own `max_new_tokens` (the backend option sizes a
  DynamicCache's), and running out of room is an error that names it.
Its layers are packed whatever runs them. Without the rocketkv pass they are exact: the prompt
is stored whole (`rocketkv.store`), a decode token appended in place (`rocketkv.append_`), a
turn added whole (`rocketkv.extend`); each token stays at the slot of its position, and
attention reads every row of the packed tensors through transformers' mask, whose causal rule
hides the slots not filled yet. Under the pass, the prompt store becomes the policy's
selection, and decode steps and turns the policy's own, attending to each row's stored slots
(the mask transformers builds is not read). A compressed cache continued without the pass is
an error.
It is not compileable to transformers (`is_compileable`): `generate` would otherwise wrap the
forward in its own torch.compile, whose decode graphs the rocketkv pass never sees.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from . import state as S
from .kernels import ops  # noqa: F401  (torch.ops.rocketkv)


class RocketKVLayer(CacheLayerMixin):
    is_compileable = False
    is_sliding = False

    def __init__(self, max_new_tokens: int):
        super().__init__()
        self.max_new_tokens = max_new_tokens

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:   # the prompt: attended exactly, then stored
            self.lazy_initialization(key_states, value_states)
            self.keys, self.values = torch.ops.rocketkv.store(key_states, value_states,
                                                              self.max_new_tokens)
            return key_states, value_states
        eager = not torch.compiler.is_compiling()
        if eager:
            self._refuse_compressed()
        if key_states.shape[2] != 1:   # a new turn: attended over the stored tokens and its own
            self.keys, self.values = torch.ops.rocketkv.extend(
                self.keys, self.values, key_states, value_states, self.max_new_tokens)
        else:
            torch.ops.rocketkv.append_(self.keys, self.values, key_states, value_states)
        keys, values = self.keys.view(self.dtype), self.values.view(self.dtype)
        if eager:   # just the filled slots (traced, every row: the mask hides the rest)
            filled = int(self._word(S.Word.STORED))
            return keys[:, :, :filled], values[:, :, :filled]
        return keys, values

    def _refuse_compressed(self) -> None:
        """Run eagerly, a layer attends through transformers' mask, which cannot line up with
        the slots of a compressed layer (its tokens are no longer at their positions)."""
        if not int(self._word(S.Word.FLAGS)) & S.Flag.EXACT:
            raise RuntimeError("rocketkv: a compressed RocketKVCache is continued by a model "
                               "not compiled with backend='rocketkv'; compile it (as for the "
                               "prompt) to continue the cache")

    def _word(self, word: S.Word) -> torch.Tensor:
        """Row 0's header word, as a 0-dim tensor (usable inside a traced graph)."""
        rows = S.header_rows(self.keys.shape[-1], self.keys.element_size())
        return self.keys[0, 0, -rows:].reshape(-1).view(torch.int32)[word]

    def get_seq_length(self):
        """The logical length (positions continue from it), a 0-dim tensor once filled."""
        return self._word(S.Word.POSITION) if self.is_initialized else 0

    def get_mask_sizes(self, query_length: int):
        """Sizes for the mask of this step's attention (before its update): run eagerly, over
        the filled slots; traced, over every row of the layer's tensors (a layer stored whole
        keeps each token at the slot of its position, so the causal rule masks the empty slots,
        and the query offset, a tensor, keeps transformers from dropping the mask); the pass
        attends to a compressed layer's stored slots by its own rule."""
        if not self.is_initialized:
            return query_length, 0
        if not torch.compiler.is_compiling():   # eager: the filled slots after this update
            return int(self._word(S.Word.STORED)) + query_length, 0
        rows = self.keys.shape[2]
        if query_length > 1:   # a new turn is attended over `extend`'s new tensors
            slots = S.Layout.of(self.keys, False).slots + query_length + self.max_new_tokens
            rows = S.Layout.new(slots, False, self.keys.shape[-1], self.keys.element_size()).rows
        return rows, 0

    def get_max_length(self) -> int:
        return S.Layout.of(self.keys, False).slots if self.is_initialized else -1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self.keys = self.keys.index_select(0, beam_idx.to(self.keys.device))
            self.values = self.values.index_select(0, beam_idx.to(self.values.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Each sequence `repeats` times in the batch (several continuations of one prompt)."""
        if self.is_initialized:
            self.keys = self.keys.repeat_interleave(repeats, dim=0)
            self.values = self.values.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the sequences at `indices`."""
        if self.is_initialized:
            self.keys, self.values = self.keys[indices], self.values[indices]

    def crop(self, tokens_to_remove: int) -> None:
        """Forget each row's last `-tokens_to_remove` tokens (they are its last stored slots)."""
        if tokens_to_remove > 0:
            raise ValueError("RocketKVCache.crop takes the (negative) number of tokens to remove")
        if self.is_initialized and tokens_to_remove:
            layer = S.read(self.keys, self.values)
            if min(layer.stored.tolist()) < -tokens_to_remove:
                raise ValueError(f"RocketKVCache.crop: a row stores fewer than "
                                 f"{-tokens_to_remove} tokens")
            layer.set_word(S.Word.STORED, layer.stored + tokens_to_remove)
            layer.set_word(S.Word.POSITION, layer.position + tokens_to_remove)

    def reset(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False


class RocketKVCache(Cache):
    """A transformers Cache of packed layers, for `generate(..., cache=RocketKVCache(...))`
    (`past_key_values=` before transformers 5.24).

    max_new_tokens: the tokens generate will add (each turn); each layer has room for them.
    """

    def __init__(self, config, max_new_tokens: int):
        text = config.get_text_config(decoder=True)
        sliding = [t for t in getattr(text, "layer_types", None) or [] if t != "full_attention"]
        if sliding:
            raise NotImplementedError(f"RocketKVCache supports full-attention layers only "
                                      f"(this model has {sorted(set(sliding))})")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
                or max_new_tokens < 1:
            raise ValueError(f"RocketKVCache: max_new_tokens must be an int >= 1 "
                             f"(got {max_new_tokens!r})")
        super().__init__(layers=[RocketKVLayer(max_new_tokens)
                                 for _ in range(text.num_hidden_layers)])
