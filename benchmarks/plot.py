"""Plot a decode_attention.py JSON: per-layer decode attention time vs context (log scale).

    python3 benchmarks/plot.py benchmarks/results/decode_attention_h100.json benchmarks/results/decode_attention_h100.png
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.ticker  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402


def main(source: str, target: str) -> None:
    result = json.load(open(source))
    rows = result["decode"]
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.5), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        mine = [r for r in rows if r["batch"] == batch]
        contexts = sorted({r["context"] for r in mine})
        first = [next(r for r in mine if r["context"] == c) for c in contexts]
        ks = [c // 1024 for c in contexts]
        ax.plot(ks, [r["dense_sdpa_ms"] for r in first], "k-o", label="dense SDPA")
        ax.plot(ks, [r["kv_read_floor_ms"] for r in first], "k:", label="full-KV read floor")
        for budget in sorted({r["budget"] for r in mine}):
            pts = sorted((r for r in mine if r["budget"] == budget), key=lambda r: r["context"])
            line, = ax.plot(ks, [r["cache_step_cudagraph_ms"] for r in pts], "-s",
                            label=f"RocketKVCache step, B={budget} (append + stage 2, CUDA graph)")
            ax.plot(ks, [r["stage2_reference_ms"] for r in pts], "--", color=line.get_color(),
                    alpha=0.5, label=f"B={budget} PyTorch reference")
        ax.set(xscale="log", yscale="log", xlabel="context (K tokens)", ylabel="ms per layer",
               title=f"batch {batch}")
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"Decode attention, Llama-3.1-8B shape, bf16 - {result['device']}, {result['date']}")
    fig.tight_layout()
    fig.savefig(target, dpi=110)


if __name__ == "__main__":
    main(*sys.argv[1:3])
