"""A quantized cache (kv_bits) keeps its prompt as codes (state.Coded): what it reads back is
`reference.fake_quantize` of what it kept, exactly; decode reads codes then exact new tokens;
the bytes held are the codes' (issue 22)."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from models import VOCAB, generate, tiny_hf

import rkv_compile.kernels  # noqa: F401  (registers torch.ops.rocketkv)
from rkv_compile import RocketKVConfig, state as S
from rkv_compile.backend import make_backend
from rkv_compile.kernels import cache_ops, reference
from rkv_compile.state import Word

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@settings(deadline=None, max_examples=30)
@given(counts=st.lists(st.integers(1, 70), min_size=1, max_size=3), H=st.integers(1, 3),
       D=st.sampled_from([4, 8, 12, 64]), Dv=st.sampled_from([4, 8, 64]),
       bits=st.sampled_from([2, 4, 8]), group=st.integers(1, 40),
       dtype=st.sampled_from(DTYPES), room=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_codes_read_back_as_fake_quantize(counts, H, D, Dv, bits, group, dtype, room, seed):
    """Rows of different counts written as codes read back, each row's tokens in order, as
    fake_quantize of them, bit for bit; the exact slots left for new tokens are `room`
    bucketed; an appended token reads back exactly, after the codes."""
    g = torch.Generator().manual_seed(seed)
    kept = [((torch.randn(1, H, n, D, generator=g) * 4).to(dtype),
             (torch.randn(1, H, n, Dv, generator=g) * 4).to(dtype)) for n in counts]
    itemsize = torch.empty(0, dtype=dtype).element_size()
    code = S.Coded.new(S.slot_bucket(max(counts)), bits, group, D, Dv, itemsize)
    exact = S.slot_bucket(room)
    keys, values, layer = S.allocate(len(counts), H, D, Dv, exact, "", dtype, "cpu", code)
    for b, (k, v) in enumerate(kept):
        code.write(keys, values, exact, b, reference.quantize(k, bits, group, 2),
                   reference.quantize(v, bits, group, 3))
        layer.header[b, :, Word.CODED] = k.shape[2]
    assert S.exact_slots(keys, values, False) == exact
    new_k, new_v = torch.randn(len(counts), H, 1, D).to(dtype), torch.randn(
        len(counts), H, 1, Dv).to(dtype)
    cache_ops.append(keys, values, new_k, new_v, "")
    for b, ((k, v), (got_k, got_v)) in enumerate(zip(kept, S.token_rows(keys, values, False,
                                                                         dtype))):
        want_k = torch.cat([reference.fake_quantize(k, bits, group, 2), new_k[b:b + 1]], 2)
        want_v = torch.cat([reference.fake_quantize(v, bits, group, 3), new_v[b:b + 1]], 2)
        assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)


@pytest.mark.parametrize("triton", [False, True])
def test_a_full_quantized_layer_refuses_a_token_rather_than_overwrite_its_codes(triton):
    """Once a quantized layer's exact slots are full, an append leaves the codes (next in the
    same rows) untouched: cache_ops' raises; the Triton kernel's writes nothing (its device
    assert fires only in Triton's debug mode)."""
    from rkv_compile.kernels import triton_decode

    k = torch.randn(1, 2, 20, 16)
    code = S.Coded.new(20, 4, 4, 16, 16, 4)
    exact = S.slot_bucket(1)
    keys, values, layer = S.allocate(1, 2, 16, 16, exact, "", torch.float32, "cpu", code)
    code.write(keys, values, exact, 0, reference.quantize(k, 4, 4, 2),
               reference.quantize(k, 4, 4, 3))
    layer.header[:, :, Word.CODED] = 20
    layer.set_word(Word.STORED, exact)
    before = keys.clone()
    append = triton_decode.append_packed if triton else \
        lambda *a: cache_ops.append(*a, "")
    if triton:
        append(keys, values, k[:, :, :1], k[:, :, :1])
    else:
        with pytest.raises(RuntimeError, match="full"):
            append(keys, values, k[:, :, :1], k[:, :, :1])
    assert torch.equal(keys, before)


@pytest.mark.parametrize("policy", ["kvquant", "rocketkv"])
def test_a_compressed_prompt_is_stored_as_codes(policy):
    """Through the pass, a kv_bits cache holds codes: what `stored` reads back is fake_quantize
    of what the same policy keeps without kv_bits, its new tokens are exact, and its tensors
    hold a quarter of the bytes plus the steps and zeros (measured from the tensors)."""
    model = tiny_hf("llama")
    model.generation_config.eos_token_id = None
    ids = torch.randint(0, VOCAB, (1, 400), generator=torch.Generator().manual_seed(3))
    rewrite = make_backend(compiler=lambda gm, _: gm.forward)
    caches = {}
    for bits in (None, 4):
        options = {"policy": policy, "token_budget": 96, "max_new_tokens": 4, "kv_bits": bits}
        if policy == "kvquant" and bits is None:
            options["policy"] = "full"
        torch._dynamo.reset()
        with torch.no_grad():
            _, caches[bits] = generate(model, ids, 4, None,
                                       lambda gm, ex, o=options: rewrite(gm, ex, options=o))
    group = RocketKVConfig.from_options({"kv_bits": 4}).method.kv_group_size
    for exact, coded in zip(S.stored(caches[None]), S.stored(caches[4])):
        n = exact.lengths[0]
        assert coded.lengths == [n]
        prompt = n - 3   # 4 tokens generated: the last is not stored yet
        torch.testing.assert_close(
            coded.keys[:, :, :prompt],
            reference.fake_quantize(exact.keys[:, :, :prompt], 4, group, 2), rtol=0, atol=0)
        torch.testing.assert_close(
            coded.values[:, :, :prompt],
            reference.fake_quantize(exact.values[:, :, :prompt], 4, group, 3), rtol=0, atol=0)
    for layer in caches[4].layers:
        assert int(S.read(layer.keys, layer.values).word(Word.FLAGS)[0]) & S.Flag.CODED

    def held(cache):
        return sum(t.numel() * t.element_size() for layer in cache.layers
                   for t in (layer.keys, layer.values))
    # float32 tiny model: 4-bit codes are 1/8 of the numbers; steps and zeros, new-token
    # slots, the header and the capacity's rounding take the rest
    assert held(caches[4]) < 0.45 * held(caches[None])


@pytest.mark.parametrize("options, match", [
    ({"kv_bits": 3}, "kv_bits"), ({"kv_bits": 16}, "kv_bits"),
    ({"policy": "h2o", "kv_bits": 4}, "kv_bits"), ({"policy": "rocketkv-mt", "kv_bits": 4},
                                                    "kv_bits")])
def test_unsupported_code_settings_are_named(options, match):
    with pytest.raises(ValueError, match=match):
        RocketKVConfig.from_options({"token_budget": 64, **options})


def test_a_turn_over_codes_is_refused():
    """A new turn re-selects over the stored tokens, which no op reads as codes yet: refused,
    not decoded over the wrong numbers."""
    method = RocketKVConfig.from_options({"policy": "kvquant", "kv_bits": 4,
                                          "token_budget": 64}).method
    q, k, v = (torch.randn(1, 2, 40, 8) for _ in range(3))
    keys, values, _ = cache_ops.compress(q, k[:, :1].expand(1, 2, 40, 8).contiguous(), v, None,
                                         8 ** -0.5, 4, method, 0, 1, False)
    with pytest.raises(NotImplementedError, match="kv_bits"):
        cache_ops.turn(q[:, :, :5], k[:, :, :5], v[:, :, :5], keys, values, 8 ** -0.5, 4,
                       method, 0, 1)


def test_exact_decode_over_codes_is_attention_over_fake_quantized_tokens():
    """A kvquant decode step (two rows of different counts, left padding) equals SDPA over
    each row's fake-quantized prompt and its exact new token."""
    method = RocketKVConfig.from_options({"policy": "kvquant", "kv_bits": 2, "kv_group_size": 8,
                                          "token_budget": 64}).method
    g = torch.Generator().manual_seed(0)
    B, H, n, D = 2, 2, 50, 16
    q = torch.randn(B, 2 * H, n, D, generator=g)
    k, v = (torch.randn(B, H, n, D, generator=g) for _ in range(2))
    mask = torch.ones(B, 1, n, n, dtype=torch.bool).tril()
    mask[1, :, :, :7] = False   # row 1: 7 padding tokens
    keys, values, _ = cache_ops.compress(q, k, v, mask, D ** -0.5, 3, method, 0, 1, False)
    new_k, new_v = torch.randn(B, H, 1, D, generator=g), torch.randn(B, H, 1, D, generator=g)
    cache_ops.append(keys, values, new_k, new_v, "")
    query = torch.randn(B, 2 * H, 1, D, generator=g)
    got = cache_ops.decode(query, keys, values, D ** -0.5, method)
    for b, start in ((0, 0), (1, 7)):
        kk = torch.cat([reference.fake_quantize(k[b:b + 1, :, start:], 2, 8, 2),
                        new_k[b:b + 1]], 2)
        vv = torch.cat([reference.fake_quantize(v[b:b + 1, :, start:], 2, 8, 3),
                        new_v[b:b + 1]], 2)
        want = F.scaled_dot_product_attention(query[b:b + 1], kk, vv, scale=D ** -0.5,
                                              enable_gqa=True)
        torch.testing.assert_close(got[b:b + 1], want)
