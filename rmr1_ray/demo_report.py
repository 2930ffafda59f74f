"""The demo's closing output: a summary table and a plot of reward and accuracy per GRPO step."""

from __future__ import annotations

import json
from pathlib import Path


def plot_grpo_curve(metrics_file: Path, out_png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_file.open()]
    rows = [r for r in rows if "reward/mean" in r]
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [r["reward/mean"] for r in rows], marker="o", label="reward mean (+1/-1)")
    ax.plot(steps, [2 * r["verdict/accuracy"] - 1 for r in rows], marker="s", label="2 x verdict accuracy - 1")
    ax.plot(steps, [2 * r["verdict/format_valid"] - 1 for r in rows], ls="--", label="2 x format-valid share - 1")
    ax.set_xlabel("GRPO step")
    ax.set_ylim(-1.05, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("rmr1 demo: GRPO on the tiny judge")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def print_summary(results: list[dict], out_dir: Path, plot: Path) -> None:
    width = max(len(r["stage"]) for r in results)
    print("\n" + "=" * 100)
    print(f"{'stage':<{width}}  {'time':>6}  key metric")
    for r in results:
        print(f"{r['stage']:<{width}}  {r['seconds']:>5.0f}s  {r['metric']}")
    print(f"{'total':<{width}}  {sum(r['seconds'] for r in results):>5.0f}s")
    print("=" * 100)
    print(f"outputs: {out_dir}   (plot: {plot})")
