"""The explain report: what the pass did at every attention site of a call, and why.

Runs `generate` once under the pass (rewritten graphs run uncompiled, so it is quick) and
prints one row per site and graph: its kind, where its keys come from, the query length, and
the action (or the reason it stays exact). Then the same for options that keep a site exact.
CPU: about 15 s.

    python examples/explain_report.py
"""
import torch
from _tiny import random_prompt, tiny_llama

import rkv_compile


def main() -> dict:
    model, ids = tiny_llama(), random_prompt(400)
    with torch.no_grad():
        report = rkv_compile.explain(model.generate, ids, max_new_tokens=3,
                                     options={"token_budget": 128, "max_new_tokens": 3})
        exact = rkv_compile.explain(model.generate, ids, max_new_tokens=3,
                                    options={"token_budget": None})
    print(report)
    print("\nwith token_budget=None (every site exact, each with its reason):")
    print(exact)
    return {"report": report, "exact": exact}


if __name__ == "__main__":
    main()
