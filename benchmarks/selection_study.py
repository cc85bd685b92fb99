"""How close stage 2's selection comes to exact attention on a real model, by plan (chunk, dims).

An offline study for issue 21's "a selection that closes the gap": no generation under a
policy, only attention outputs compared. For each sample prompt, full KV greedily answers S
tokens; the prompt and those tokens are prefilled exactly once, recording every layer's keys,
values and last queries. Then, per layer and decode step j (the query of answer token j, the
keys of the prompt and of the answer so far), RocketKV's stage 1 evicts the prompt to its
capacity, as generate would, and each stage-2 variant attends over what is stored. The score
is the relative error ||o - o_full|| / ||o_full|| of the layer's attention output against exact
attention over every token (mean over query heads, layers, steps and samples), beside the
entries of K/V each variant reads per step and KV head (what `Policy.read_bytes` counts: r
dims of every stored key, then the top-k tokens' keys and values).

The variants share stage 1, so only the selection differs: "stage 1 exact" (no stage 2:
attention over all stored tokens), "oracle top-k" (the best B / 2 by exact scores), RocketKV's
selection at the plan's (chunk, dims) and at other chunks and dims with the plan's top-k, and
at chunk 1 with fewer dims and a larger top-k that reads as many entries as the plan. On our kernels a chunk's bound is built from its keys every step, so the bytes read do
not depend on the chunk: a smaller chunk costs selection work, not traffic.

    python3 benchmarks/selection_study.py --model smollm2 --context 4000 --samples 4
A proxy: it says which selection keeps the attention outputs closest, not what a task scores.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, ".")
from rkv_compile import eager, hf, tasks  # noqa: E402
from rkv_compile.kernels import reference  # noqa: E402
from rkv_compile.policies.oracle_topk import OracleTopK  # noqa: E402
from rkv_compile.policies.rocketkv import RocketKV  # noqa: E402
from rkv_compile.policies.rocketkv_fine import RocketKVFine  # noqa: E402


def variants(policy: RocketKV, prompt_len: int, head_dim: int) -> list[tuple[str, int, int, int]]:
    """(name, chunk, dims, top-k) of the stage-2 selections tried, named relative to RocketKV's
    plan (c, r, k: its chunk, dims and top-k for the prompt): its own, its neighbours at top-k
    k, and rocketkv-fine's plans (chunk 1, fewer dims, the top-k their reads leave room for)."""
    plan = policy.plan(prompt_len, head_dim)
    out = []
    for chunk_name, chunk in (("1", 1), ("2", 2), ("c", plan.chunk)):
        for dims_name, dims in (("r/2", max(plan.dims // 2, 1)), ("r", plan.dims),
                                ("2r", min(2 * plan.dims, head_dim))):
            name = f"chunk {chunk_name}, dims {dims_name}"
            out.append((name + (" (RocketKV)" if name == "chunk c, dims r" else ""), chunk,
                        dims, plan.topk))
    for dims_name, divisor in (("r/2", 2), ("r/4", 4), ("r/8", 8)):
        fine = RocketKVFine(policy.token_budget, policy.max_new_tokens,
                            dims_divisor=divisor).plan(prompt_len, head_dim)
        out.append((f"chunk 1, dims {dims_name}, top-k for equal reads", fine.chunk, fine.dims,
                    fine.topk))
    return out


def relative_error(out, want) -> float:
    """Mean over query heads of ||out - want|| / ||want|| (out, want: (1, Hq, 1, D))."""
    diff = (out.float() - want.float()).flatten(2).norm(dim=-1)
    return float((diff / want.float().flatten(2).norm(dim=-1).clamp_min(1e-30)).mean())


def study_sample(model, tokenizer, sample, steps: int, budget: int):
    """Per variant, the errors of every layer and step of one sample, and what it reads."""
    prompt = tokenizer(sample.prompt, return_tensors="pt").input_ids   # as `rkv eval` does
    T = prompt.shape[1]
    with torch.no_grad():
        answer = model.generate(prompt, max_new_tokens=steps, do_sample=False,
                                min_new_tokens=steps)[:, T:T + steps]
    policy = RocketKV(token_budget=budget, max_new_tokens=sample.max_new_tokens)   # as eval plans
    window = policy.observed_queries(T)
    record = eager.prefill(model, torch.cat([prompt, answer], 1), window + steps)
    errors: dict[str, list[float]] = {}
    reads: dict[str, int] = {}
    for keys, values, queries, scale in zip(record.keys, record.values, record.queries,
                                            record.scales):
        D = keys.shape[-1]
        plan = policy.plan(T, D)
        stored_k, stored_v, _, _ = policy.compress(
            queries[:, :, :window], keys[:, :, :T], values[:, :, :T], None, scale,
            min(plan.prompt_budget, T))
        oracle = OracleTopK(token_budget=plan.topk)
        for j in range(steps):
            q = queries[:, :, window + j:window + j + 1]
            n = T + j + 1
            full = F.scaled_dot_product_attention(q, keys[:, :, :n], values[:, :, :n],
                                                  scale=scale, enable_gqa=True)
            k = torch.cat([stored_k, keys[:, :, T:n]], 2)
            v = torch.cat([stored_v, values[:, :, T:n]], 2)
            stored = k.shape[2]
            tried = {"stage 1 exact": (F.scaled_dot_product_attention(
                q, k, v, scale=scale, enable_gqa=True), stored * 2 * D),
                "oracle top-k": (oracle.decode(q, k, v, None, scale, 1, D, plan.topk),
                                 stored * D + min(plan.topk, stored) * D)}
            for name, chunk, dims, topk in variants(policy, T, D):
                tried[name] = (reference.sparse_decode(q, k, v, None, scale, chunk, dims, topk),
                               stored * dims + min(topk, stored) * 2 * D)
            for name, (out, read) in tried.items():
                errors.setdefault(name, []).append(relative_error(out, full))
                reads[name] = read   # the last layer's last step: the largest
    return errors, reads, plan, T


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2", choices=sorted(hf.MODELS))
    parser.add_argument("--context", type=int, default=4000)
    parser.add_argument("--tasks", default="passkey,multikey,multivalue")
    parser.add_argument("--samples", type=int, default=2, help="per task")
    parser.add_argument("--steps", type=int, default=8, help="answer tokens studied")
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = hf.load_model(args.model)
    result = {"date": datetime.date.today().isoformat(), "command": " ".join(sys.argv),
              "model": args.model, "device": "cpu", "torch": torch.__version__, "rows": []}
    errors: dict[str, list[float]] = {}
    start = time.time()
    for task in args.tasks.split(","):
        for i in range(args.samples):
            depth = i / max(args.samples - 1, 1)
            sample = tasks.TASKS[task](tokenizer, args.context, depth, seed=i)
            got, reads, plan, T = study_sample(model, tokenizer, sample, args.steps, args.budget)
            for name, e in got.items():
                errors.setdefault(name, []).extend(e)
            row = {"task": task, "sample": i, "prompt_tokens": T, "plan": dataclasses.asdict(plan),
                   "mean_error": {name: round(statistics.fmean(e), 5) for name, e in got.items()},
                   "entries_read": reads}
            result["rows"].append(row)
            print(json.dumps(row), f"({time.time() - start:.0f} s)", flush=True)
    result["mean_error"] = {name: round(statistics.fmean(e), 5) for name, e in errors.items()}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print("\nvariant: mean relative error of the attention output, K/V entries read a step "
          "(the last sample's last step)")
    for name, e in sorted(result["mean_error"].items(), key=lambda kv: kv[1]):
        print(f"{name:48s} {e:.4f} {result['rows'][-1]['entries_read'][name]:>8d}")


if __name__ == "__main__":
    main()
