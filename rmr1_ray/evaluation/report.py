"""Run outputs: summary.json, report.md (our numbers beside RM-R1's published ones) and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rmr1_ray.evaluation.loaders import STYLES
from rmr1_ray.evaluation.published import HEADLINE_METRIC, PAPER_HEADLINES, PUBLISHED

TITLES = {"rewardbench": "RewardBench", "rm_bench": "RM-Bench", "rmb": "RMB"}
PUBLISHED_NAMES = {"RM-R1-Qwen2.5-Instruct-32B": "RM-R1 Qwen2.5-Instruct-32B",
                   "RM-R1-DeepSeek-Distilled-Qwen-32B": "RM-R1 DeepSeek-Distilled-Qwen-32B"}


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def breakdown(bench: str, result: dict[str, Any]) -> dict[str, float]:
    """Per-subset accuracy: RewardBench subsets, RM-Bench domains, RMB categories."""
    if bench == "rm_bench":
        return {d: s["avg_acc"] for d, s in result["domains"].items()}
    return result["subsets"] if bench == "rewardbench" else result["categories"]


def markdown(summary: dict[str, Any]) -> str:
    scores, judge = summary["scores"], summary["judge"]
    lines = [
        "# RM-R1 evaluation", "",
        f"Judge: `{judge['name']}` · prompt format `{judge['prompt_format']}` · "
        f"max_new_tokens {judge['sampling']['max_new_tokens']} · temperature {judge['sampling']['temperature']} · "
        f"{'both orders' if summary['both_orders'] else 'preferred answer at a random position (seed ' + str(summary['seed']) + ')'}",
        "",
        f"Samples: {summary['samples']['total']} ({summary['samples']['judged_now']} judged in this run, "
        f"{summary['samples']['resumed']} resumed). Rejected rows: {summary['rejected_rows']} (rejects.jsonl).",
        "",
    ]  # fmt: skip
    if summary["partial"]:
        lines += ["> **Partial run** (`max_examples` set): scores cover only the first examples of each subset and "
                  "are not comparable with the published numbers.", ""]
    lines += ["Scores in percent. Published: RM-R1's released results (see rmr1_ray/evaluation/published.py).", ""]
    models = list(PUBLISHED)
    for bench, result in scores.items():
        lines += [f"## {TITLES[bench]}", "", "| metric | ours | " + " | ".join(PUBLISHED_NAMES[m] for m in models) + " |",
                  "|---|---:|" + "---:|" * len(models)]
        for metric in PUBLISHED[models[0]][bench]:
            published = " | ".join(_pct(PUBLISHED[m][bench][metric]) for m in models)
            lines.append(f"| {metric} | {_pct(result.get(metric))} | {published} |")
        lines += ["", f"Unparseable verdicts (counted wrong): {result['verdicts']['error']} of {result['samples']} "
                  f"samples · verdicts A/B: {result['verdicts']['A']}/{result['verdicts']['B']}"]
        if "position" in result and result["position"]["pairs"]:
            pos = result["position"]
            lines.append(f"Position consistency (both orders): {_pct(pos['consistent'])}% of {pos['pairs']} pairs; "
                         f"flip rate {_pct(pos['flip_rate'])}%")
        lines += ["", "| subset | accuracy |", "|---|---:|"]
        lines += [f"| {name} | {_pct(value)} |" for name, value in breakdown(bench, result).items()]
        if bench == "rm_bench":
            lines += ["", "Style matrix (rows: chosen style, columns: rejected style; mean over domains):", "",
                      "| chosen \\ rejected | " + " | ".join(STYLES) + " |", "|---|---:|---:|---:|"]
            lines += [f"| {STYLES[i]} | " + " | ".join(_pct(v) for v in row) + " |" for i, row in enumerate(result["matrix"])]
        lines.append("")
    lines += ["## Headline scores beside the paper (Table 1)", "",
              "| model | RewardBench | RM-Bench | RMB |", "|---|---:|---:|---:|"]
    ours = [_pct(scores[b].get(HEADLINE_METRIC[b])) if b in scores else "—" for b in HEADLINE_METRIC]
    lines.append(f"| **ours: {judge['name']}** | " + " | ".join(ours) + " |")
    for model in models:
        lines.append(f"| {model} | " + " | ".join(_pct(PUBLISHED[model][b][HEADLINE_METRIC[b]]) for b in HEADLINE_METRIC) + " |")
    for model, row in PAPER_HEADLINES.items():
        lines.append(f"| {model} | " + " | ".join(f"{row[b]:.1f}" for b in HEADLINE_METRIC) + " |")
    return "\n".join(lines) + "\n"


def plot_subsets(scores: dict[str, Any], path: Path) -> Path:
    """One horizontal bar chart per benchmark: accuracy per subset."""
    import matplotlib

    matplotlib.use("Agg")  # no display on clusters and CI
    import matplotlib.pyplot as plt

    parts = [(bench, breakdown(bench, result)) for bench, result in scores.items()]
    heights = [max(1.5, 0.3 * len(values) + 0.8) for _, values in parts]
    fig, axes = plt.subplots(len(parts), 1, figsize=(9, sum(heights)), gridspec_kw={"height_ratios": heights},
                             squeeze=False)
    for ax, (bench, values) in zip(axes[:, 0], parts, strict=True):
        names = list(values)
        bars = ax.barh(names, [values[n] for n in names], color="tab:blue")
        ax.bar_label(bars, fmt="%.2f", padding=2, fontsize=7)  # a 0.00 bar is otherwise invisible
        ax.set_xlim(0, 1)
        ax.invert_yaxis()  # first subset on top
        ax.axvline(0.5, color="grey", linestyle=":", linewidth=1)  # chance for a pairwise judge
        ax.set_title(TITLES[bench], loc="left")
        ax.tick_params(axis="y", labelsize=8)
    axes[-1, 0].set_xlabel("accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_rm_bench_matrix(rm_bench: dict[str, Any], path: Path) -> Path:
    """Heatmaps of the 3x3 style matrix: one per domain, and their mean (the totals' matrix)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(d, s["matrix"]) for d, s in rm_bench["domains"].items()] + [("mean over domains", rm_bench["matrix"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels) + 1.2, 3.8), squeeze=False)
    labels = ["concise", "detailed\nplain", "detailed\nmarkdown"]
    for ax, (title, matrix) in zip(axes[0], panels, strict=True):
        image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
        for i in range(3):
            for j in range(3):
                ax.text(j, i, f"{matrix[i][j]:.2f}", ha="center", va="center", color="white" if matrix[i][j] < 0.6 else "black")
        ax.set_xticks(range(3), labels, fontsize=7)
        ax.set_yticks(range(3), labels if ax is axes[0][0] else [], fontsize=7)  # rows share the first panel's labels
        ax.set_xlabel("rejected style")
        ax.set_title(title)
    axes[0][0].set_ylabel("chosen style")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="accuracy")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def write_report(out_dir: Path, summary: dict[str, Any]) -> list[Path]:
    """summary.json, report.md, subsets.png and (with RM-Bench) rm_bench_matrix.png; returns their paths."""
    paths = [out_dir / "summary.json", out_dir / "report.md"]
    paths[0].write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    paths[1].write_text(markdown(summary))
    if summary["scores"]:
        paths.append(plot_subsets(summary["scores"], out_dir / "subsets.png"))
    if "rm_bench" in summary["scores"]:
        paths.append(plot_rm_bench_matrix(summary["scores"]["rm_bench"], out_dir / "rm_bench_matrix.png"))
    return paths
