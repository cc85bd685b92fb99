"""The ``rkv`` command."""
from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rkv", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="passkey retrieval on SmolLM2-135M: full KV cache vs RocketKV (CPU)")
    demo.add_argument("--context", type=int, default=2000, help="prompt length in tokens")
    demo.add_argument("--budget", type=int, default=256, help="RocketKV token_budget")
    demo.add_argument("--max-new-tokens", type=int, default=12)
    demo.add_argument("--depth", type=float, default=0.5, help="passkey position, 0..1")
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never reach for the hub
    from .demo import run_demo

    ok = run_demo(args.context, args.budget, args.max_new_tokens, args.depth, args.seed)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
