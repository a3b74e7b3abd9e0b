"""Plots fused-model speedups per model from a bench_cpu.py result file.

    python benchmarks/plot.py benchmarks/results/cpu_1thread_b16.json   # writes <same name>.png
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(path):
    with open(path) as f:
        result = json.load(f)
    rows, meta = result["models"], result["meta"]
    baselines = [k for k in rows[0]["img_per_s"] if k != "fused"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(baselines)
    for i, base in enumerate(baselines):
        speedups = [r["img_per_s"]["fused"] / r["img_per_s"][base] for r in rows]
        xs = [j + (i - (len(baselines) - 1) / 2) * width for j in range(len(rows))]
        ax.bar(xs, speedups, width, label=f"vs {base}")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(rows)), [r["model"] for r in rows])
    ax.set_ylabel("fused speedup (x)")
    ax.set_title(f"Fused EfficientViT, CPU {meta['threads']} thread, batch {meta['batch']}, fp32 "
                 f"({meta['date'][:10]})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path.removesuffix(".json") + ".png", dpi=110)


if __name__ == "__main__":
    main(sys.argv[1])
