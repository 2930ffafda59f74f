"""The demo's closing output: a summary table and a plot of reward and accuracy per GRPO step."""

from __future__ import annotations

import json
from pathlib import Path

HELD_OUT = "eval/rewardbench/absolute"  # held-out verdict accuracy, logged every trainer.eval_every steps


def plot_grpo_curve(metrics_file: Path, out_png: Path) -> Path:
    """Left: mean reward of the GRPO samples per step. Right: their verdict accuracy (sampled at the
    rollout temperature) and the held-out greedy accuracy at each evaluation (step 0: before GRPO)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_file.open()]
    train = [r for r in rows if "reward/mean" in r]
    held_out = [r for r in rows if HELD_OUT in r]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot([r["step"] for r in train], [r["reward/mean"] for r in train], marker="o", label="reward mean (+1 / -1)")
    left.set_ylim(-1.05, 1.05)
    left.set_ylabel("reward")
    right.plot([r["step"] for r in train], [r["verdict/accuracy"] for r in train], marker="s", alpha=0.6,
               label="GRPO samples (temperature 1)")
    right.plot([r["step"] for r in held_out], [r[HELD_OUT] for r in held_out], marker="D", lw=2,
               label="held-out questions (greedy)")
    right.axhline(0.5, color="grey", ls=":", label="chance")
    right.set_ylim(0, 1)
    right.set_ylabel("verdict accuracy")
    for ax in (left, right):
        ax.set_xlabel("GRPO step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("rmr1 demo: GRPO on the tiny judge after SFT")
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
