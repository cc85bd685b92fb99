"""Plot end_to_end.py JSONs (one run or several, e.g. one per context): batch-1 decode ms/token vs
context beside the weight-read floor, and decode throughput vs batch. A later file's row replaces
an earlier one for the same setup, context and batch (a re-run supersedes).

    python3 benchmarks/plot_end_to_end.py benchmarks/results/end_to_end_h100.png \
        benchmarks/results/end_to_end_h100_*.json
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402


def main(target: str, *sources: str) -> None:
    runs = [json.load(open(s)) for s in sources]
    latest = {(r["setup"], r["context"], r["batch"]): r for run in runs for r in run["rows"]}
    rows = [r for r in latest.values() if r["status"] == "ok"]
    setups = sorted({r["setup"] for r in rows},   # generate, static, then rocketkv by budget
                    key=lambda s: (s.startswith("rocketkv"), int(s.split("-")[-1]) if "-" in s else 0, s))
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    contexts = sorted({r["context"] for r in rows})
    for setup in setups:
        single = sorted((r for r in rows if r["setup"] == setup and r["batch"] == 1),
                        key=lambda r: r["context"])
        line, = left.plot([r["context"] // 1024 for r in single],
                          [r["decode_ms_per_token"] for r in single], "-o", label=setup)
        for context, marker in zip(contexts, "os^D"):
            pair = sorted((r for r in rows if r["setup"] == setup and r["context"] == context),
                          key=lambda r: r["batch"])
            right.plot([r["batch"] for r in pair], [r["tokens_per_s"] for r in pair], "-",
                       marker=marker, color=line.get_color(), alpha=0.8)
    floor = runs[0]["weight_read_floor_ms"]
    left.axhline(floor, color="k", ls=":", label=f"weight-read floor ({floor:.2f} ms)")
    ks = [c // 1024 for c in contexts]
    left.set(xscale="log", yscale="log", xlabel="context (K tokens)", ylabel="ms per token",
             title="decode, batch 1")
    left.set_xticks(ks, [str(k) for k in ks])
    left.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    left.legend(fontsize=8)
    for context, marker in zip(contexts, "os^D"):
        right.plot([], [], "k", marker=marker, ls="", label=f"{context // 1024}K context")
    right.set(xscale="log", yscale="log", xlabel="batch (1, and the largest that fits)",
              ylabel="tokens / s", title="decode throughput (colours as left)")
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"Llama-3.1-8B shape, bf16, random weights - {runs[0]['device']}, "
                 f"{runs[0]['date']}")
    fig.tight_layout()
    fig.savefig(target, dpi=110)


if __name__ == "__main__":
    main(*sys.argv[1:])
