"""Per-layer decode attention on the GPU: dense SDPA, the KV-read floor, and RocketKV stage 2.

Llama-3.1-8B attention shape (32 query / 8 KV heads, head_dim 128), bf16. For each batch,
context and token budget, in one run: dense SDPA with enable_gqa over the full cache; dense on
our stack (`packed_exact_decode`: flash-decoding over a packed layer's stored slots, as a CUDA
graph); the floor for reading that cache once at the copy bandwidth measured here; and stage 2
over the compressed cache RocketKV keeps (its plan's capacity): the Triton kernels launched one
by one, the same replayed as a CUDA graph, a compressed cache's whole step (append + stage 2
over the packed layout: three launches) as a CUDA graph, the same step as it ran before its
kernels were fused (torch ops for the mask and plan, five launches), and the plain-PyTorch
reference. Quest at the same budget over the whole context (it evicts nothing): its page
kernels (`packed_page_decode`, pages of 16 per query head) as a CUDA graph; SparQ and oracle
top-k the same way (`packed_sparq_decode`, `packed_sparse_decode` at chunk 1 over every dim),
each with the KV bytes its step reads (`Policy.read_bytes`), so the sparse-decode baselines
are timed side by side with RocketKV at their traffic (issue 20). Also stage 1 (Triton and
reference) against exact causal prefill attention.
Medians of triton.testing.do_bench / do_bench_cudagraph.

    python3 benchmarks/decode_attention.py --out results.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys

import torch
import triton
import torch.nn.functional as F
from triton.testing import do_bench, do_bench_cudagraph

sys.path.insert(0, ".")
from rkv_compile import state as S  # noqa: E402
from rkv_compile.kernels import reference as R  # noqa: E402
from rkv_compile.kernels import triton_compress as TC  # noqa: E402
from rkv_compile.kernels import triton_decode as T  # noqa: E402
from rkv_compile.policies import OracleTopK, Quest, RocketKV, SparQ  # noqa: E402

HQ, HKV, D = 32, 8, 128
NEW_TOKENS = 128


def copy_bandwidth() -> float:
    """Bytes read + written per second by a large device-to-device copy."""
    src = torch.randn(1 << 30, device="cuda", dtype=torch.bfloat16)   # 2 GiB
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def randn(*shape):
    return torch.randn(*shape, device="cuda", dtype=torch.bfloat16)


def decode_row(batch: int, context: int, budgets: list[int], bandwidth: float) -> list[dict]:
    q = randn(batch, HQ, 1, D)
    k, v = randn(batch, HKV, context, D), randn(batch, HKV, context, D)
    dense = do_bench(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
                     warmup=25, rep=200, return_mode="median")
    floor = 2 * k.numel() * k.element_size() / bandwidth * 1e3
    # dense decode on our stack: flash-decoding over a packed layer holding the whole context,
    # reading exactly its stored slots (the fair dense row), against SDPA's output
    packed_k, packed_v, packed = S.allocate(batch, HKV, D, D, S.slot_bucket(context), "",
                                            torch.bfloat16, "cuda")
    packed.keys[:, :, :context], packed.values[:, :, :context] = k, v
    packed.set_word(S.Word.STORED, context)

    def dense_ours():
        return T.packed_exact_decode(q, packed_k, packed_v, D**-0.5)

    sdpa = F.scaled_dot_product_attention(q, k, v, enable_gqa=True).float()
    dense_ours_error = float((dense_ours().float() - sdpa).norm() / sdpa.norm())
    dense_ours_ms = do_bench_cudagraph(dense_ours, rep=200, return_mode="median")
    rows = []
    for budget in budgets:
        # Quest over the whole context (the packed layer above, its pages in the header)
        quest = Quest(budget, NEW_TOKENS).plan(context - NEW_TOKENS, D, layer=2, layers=32)
        packed.set_word(S.Word.CHUNK, quest.chunk)
        packed.set_word(S.Word.DIMS, quest.dims)
        pages = quest.topk // quest.chunk

        def quest_ours():
            return T.packed_page_decode(q, packed_k, packed_v, D**-0.5, pages, quest.chunk)

        quest_ms = do_bench_cudagraph(quest_ours, rep=200, return_mode="median")
        quest_error = None
        if batch == 1:   # the reference repeats K and V per query head: one row only
            want = Quest(budget, NEW_TOKENS).decode(q.float(), k.float(), v.float(), None,
                                                    D**-0.5, quest.chunk, quest.dims, quest.topk)
            quest_error = float((quest_ours().float() - want).norm() / want.norm())

        baselines = {name: keep_all_row(policy(budget, NEW_TOKENS), q, k, v, packed_k,
                                        packed_v, packed, context, batch)
                     for name, policy in (("sparq", SparQ), ("oracle_topk", OracleTopK))}

        plan = RocketKV(budget, NEW_TOKENS).plan(context - NEW_TOKENS, D)
        n = plan.capacity
        kc, vc = randn(batch, HKV, n, D), randn(batch, HKV, n, D)
        scale = D**-0.5

        def ours():
            return T.sparse_decode(q, kc, vc, None, scale, plan.chunk, plan.dims, plan.topk)

        # A compressed cache's step (either cache: the packed layout, rkv_compile.state):
        # append the new token, then stage 2 over the stored slots with the plan in the header.
        # The stored counts are put back after each step so that replays never fill the cache
        # (one tiny copy kernel, included in the time).
        keys, values, layer = S.allocate(batch, HKV, D, D, S.slot_bucket(n), "", torch.bfloat16,
                                         "cuda")
        layer.keys[:, :, :n - 1], layer.values[:, :, :n - 1] = kc[:, :, :n - 1], vc[:, :, :n - 1]
        for word, value in ((S.Word.STORED, n - 1), (S.Word.CHUNK, plan.chunk),
                            (S.Word.DIMS, plan.dims), (S.Word.TOPK, plan.topk)):
            layer.set_word(word, value)
        start = layer.header.clone()
        new_k, new_v = randn(batch, HKV, 1, D), randn(batch, HKV, 1, D)

        def cache_step():
            T.append_packed(keys, values, new_k, new_v)
            out = T.packed_sparse_decode(q, keys, values, scale, plan.topk)
            layer.header.copy_(start)
            return out

        def cache_step_unfused():
            # the same step as it ran before the fused kernel (to 2026-12-05): the mask and the
            # plan made by torch ops, then four kernels (logits, select, attention, combine)
            T.append_packed(keys, values, new_k, new_v)
            valid = layer.valid()[:, 0, 0].to(torch.uint8).contiguous()
            per_row = torch.stack([layer.word(S.Word.CHUNK), layer.word(S.Word.DIMS)],
                                  1).contiguous()
            logits = T.chunk_logits(q, layer.keys, 1, 1, valid, per_row)
            slots = T.select_slots(logits, layer.keys.shape[2], 1, plan.topk, valid, per_row)
            out = T.sparse_attention(q, layer.keys, layer.values, slots, scale, valid)
            layer.header.copy_(start)
            return out

        unfused = cache_step_unfused().float()
        fused_vs_unfused = float((cache_step().float() - unfused).norm() / unfused.norm())
        want = R.sparse_decode(q.float(), kc.float(), vc.float(), None, scale, plan.chunk,
                               plan.dims, plan.topk)
        error = float((ours().float() - want).norm() / want.norm())
        triton_ms = do_bench(ours, warmup=25, rep=200, return_mode="median")
        graph_ms = do_bench_cudagraph(ours, rep=200, return_mode="median")
        step_ms = do_bench_cudagraph(cache_step, rep=200, return_mode="median")
        unfused_ms = do_bench_cudagraph(cache_step_unfused, rep=200, return_mode="median")
        reference_ms = do_bench(lambda: R.sparse_decode(q, kc, vc, None, scale, plan.chunk,
                                                        plan.dims, plan.topk),
                                warmup=10, rep=100, return_mode="median")
        # what stage 2 must read at least: K once (summaries built on the fly) + top-k V rows
        ours_floor = (kc.numel() + batch * HKV * plan.topk * D) * 2 / bandwidth * 1e3
        rows.append(dict(batch=batch, context=context, budget=budget, cache_tokens=n,
                         chunk=plan.chunk, dims=plan.dims, topk=plan.topk,
                         dense_sdpa_ms=dense, kv_read_floor_ms=floor,
                         dense_packed_triton_cudagraph_ms=dense_ours_ms,
                         dense_packed_triton_vs_sdpa_rel_error=dense_ours_error,
                         stage2_triton_ms=triton_ms, stage2_triton_cudagraph_ms=graph_ms,
                         cache_step_cudagraph_ms=step_ms,
                         cache_step_unfused_cudagraph_ms=unfused_ms,
                         cache_step_fused_vs_unfused_rel_error=fused_vs_unfused,
                         stage2_reference_ms=reference_ms, stage2_read_floor_ms=ours_floor,
                         stage2_rel_error_vs_fp32_reference=error,
                         quest_pages=pages, quest_page_size=quest.chunk,
                         quest_triton_cudagraph_ms=quest_ms,
                         quest_rel_error_vs_fp32_reference=quest_error,
                         rocketkv_read_bytes_per_head=RocketKV(budget, NEW_TOKENS).read_bytes(
                             n - NEW_TOKENS, NEW_TOKENS, plan, D, 2, HQ // HKV),
                         **{f"{name}_{key}": value for name, row in baselines.items()
                            for key, value in row.items()}))
        print(f"B={batch:2} ctx={context // 1024:4}K budget={budget:5} cache={n:5} | dense "
              f"{dense:7.3f} ms  ours {dense_ours_ms:7.3f} ({dense_ours_error:.1e})  floor "
              f"{floor:7.3f} | ours triton {triton_ms:7.3f}  graph "
              f"{graph_ms:7.3f}  append+stage2 {step_ms:7.3f} (unfused {unfused_ms:7.3f}, "
              f"diff {fused_vs_unfused:.1e})  "
              f"reference {reference_ms:7.3f} ms  (err {error:.1e}) | quest {quest_ms:7.3f} "
              f"(err {quest_error if quest_error is None else f'{quest_error:.1e}'})"
              + "".join(f" | {name} {row['triton_cudagraph_ms']:7.3f}"
                        for name, row in baselines.items()), flush=True)
    del packed_k, packed_v, packed
    return rows


def keep_all_row(policy, q, k, v, packed_k, packed_v, packed, context: int, batch: int
                 ) -> dict:
    """A policy that evicts nothing (SparQ, oracle top-k) decoding over the whole-context
    packed layer through its Triton path, as a CUDA graph: its time, the KV bytes its step
    reads per KV head, and at batch 1 its error against its own float32 reference."""
    plan = policy.plan(context - NEW_TOKENS, D)
    packed.set_word(S.Word.CHUNK, plan.chunk)
    packed.set_word(S.Word.DIMS, plan.dims)
    packed.set_word(S.Word.TOPK, plan.topk)
    decode = T.packed_sparq_decode if isinstance(policy, SparQ) else T.packed_sparse_decode

    def ours():
        return decode(q, packed_k, packed_v, D**-0.5, plan.topk)

    error = None
    if batch == 1:
        want = policy.decode(q.float(), k.float(), v.float(), None, D**-0.5, plan.chunk,
                             plan.dims, plan.topk)
        error = float((ours().float() - want).norm() / want.norm())
    return dict(triton_cudagraph_ms=do_bench_cudagraph(ours, rep=200, return_mode="median"),
                topk=plan.topk, dims=plan.dims, rel_error_vs_fp32_reference=error,
                read_bytes_per_head=policy.read_bytes(context - NEW_TOKENS, NEW_TOKENS, plan,
                                                      D, 2, HQ // HKV))


def stage1_row(context: int, budget: int) -> dict:
    q, k, v = randn(1, HQ, context, D), randn(1, HKV, context, D), randn(1, HKV, context, D)
    plan = RocketKV(budget, NEW_TOKENS).plan(context, D)
    keep = plan.prompt_budget - 32
    prefill = do_bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                              enable_gqa=True),
                       warmup=5, rep=50, return_mode="median")
    reference = do_bench(lambda: R.compress(q[:, :, -32:], k, v, None, D**-0.5, keep, 63),
                         warmup=5, rep=50, return_mode="median")
    fused = do_bench(lambda: TC.compress(q[:, :, -32:], k, v, D**-0.5, keep, 63),
                     warmup=5, rep=50, return_mode="median")
    same = all(torch.equal(a, b) for a, b in zip(
        TC.compress(q[:, :, -32:], k, v, D**-0.5, keep, 63),
        R.compress(q[:, :, -32:], k, v, None, D**-0.5, keep, 63)))
    print(f"stage 1 ctx={context // 1024}K budget={budget}: prefill attention {prefill:.3f} ms,"
          f" stage 1 Triton {fused:.3f} ms ({100 * fused / prefill:.1f}%), reference "
          f"{reference:.3f} ms ({100 * reference / prefill:.1f}%), same tokens kept: {same}",
          flush=True)
    return dict(context=context, budget=budget, prefill_attention_ms=prefill,
                stage1_triton_ms=fused, stage1_reference_ms=reference,
                same_kept_as_reference=same)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="decode_attention.json")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--contexts", default="16,32,64,128", help="K tokens")
    parser.add_argument("--budgets", default="256,1024,4096")
    parser.add_argument("--stage1-contexts", default="8,16,32,64,128", help="K tokens")
    args = parser.parse_args()
    torch.manual_seed(0)
    bandwidth = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    budgets = [int(b) for b in args.budgets.split(",")]
    decode = [row for batch in map(int, args.batches.split(","))
              for context in (int(c) * 1024 for c in args.contexts.split(","))
              for row in decode_row(batch, context, budgets, bandwidth)]
    stage1 = [stage1_row(int(c) * 1024, budget) for c in args.stage1_contexts.split(",")
              for budget in budgets]
    result = dict(device=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(),
                  torch=torch.__version__, triton=triton.__version__,
                  copy_bandwidth_bytes_per_s=bandwidth, command=" ".join(sys.argv),
                  decode=decode, stage1=stage1)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
