"""Evaluate a judge on RewardBench, RM-Bench and RMB: `python -m jobs.evaluate --config FILE key=value ...`
(also `rmr1 eval`). The judge is a local model (Ray Data over hf/vllm engines) or an OpenAI-compatible endpoint.

    1. load     each benchmark's own files -> comparisons; malformed rows -> OUT/rejects.jsonl
    2. judge    every comparison not yet in OUT/samples.jsonl (a stopped run resumes where it stopped)
    3. score    as each benchmark defines it (rmr1_ray/evaluation/scoring.py)
    4. report   OUT/summary.json, OUT/report.md (beside RM-R1's published numbers), OUT/*.png
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

from rmr1_ray.config import job_parser, parse_job_config, save_resolved
from rmr1_ray.config.evaluate import EvalConfig
from rmr1_ray.data.readers import ReadError
from rmr1_ray.evaluation.harness import claim_output_dir, judge_identity, judge_samples, plan_samples
from rmr1_ray.evaluation.judging import JudgeError, make_judge
from rmr1_ray.evaluation.loaders import load_benchmark
from rmr1_ray.evaluation.report import write_report
from rmr1_ray.evaluation.scoring import score_all

EXAMPLE = "python -m jobs.evaluate --config configs/tiny-cpu/eval.yaml both_orders=true output_dir=runs/tiny-cpu/eval2"


def main(argv: list[str] | None = None) -> int:
    parser = job_parser("python -m jobs.evaluate", "Evaluate a judge on RewardBench, RM-Bench and RMB.", EvalConfig, EXAMPLE)
    config, _ = parse_job_config(parser, EvalConfig, argv)
    out = Path(config.output_dir)
    identity = judge_identity(config)
    try:
        judge = make_judge(config)  # first: an unavailable engine fails before anything is read
        claim_output_dir(out, identity)
    except ValueError as exc:
        parser.exit(2, f"{parser.prog}: config error: {exc}\n")
    save_resolved(config, out)

    # 1. load
    seen: set[str] = set()
    try:
        loaded = [load_benchmark(spec, seen) for spec in config.benchmarks]
    except ReadError as exc:
        print(f"cannot read a benchmark: {exc}", file=sys.stderr)
        return 1
    with (out / "rejects.jsonl").open("w") as f:
        for source in loaded:
            f.writelines(json.dumps(asdict(r), ensure_ascii=False) + "\n" for r in source.rejects)
    for source in loaded:
        print(f"{source.spec.name} ({source.spec.path}): {source.rows} rows, {len(source.rejects)} rejected")
        for subset, n in source.counts().items():
            print(f"  {subset:<58} {n['examples']:>6} examples {n['comparisons']:>7} comparisons")
    too_bad = [s for s in loaded if s.reject_fraction > config.max_reject_fraction]
    if too_bad:
        for s in too_bad:
            print(f"{s.spec.name} ({s.spec.path}): {s.reject_fraction:.1%} of rows rejected > max_reject_fraction="
                  f"{config.max_reject_fraction}; see {out / 'rejects.jsonl'}", file=sys.stderr)
        return 1

    # 2. judge
    samples = plan_samples([c for s in loaded for c in s.comparisons], config.seed, config.both_orders)
    try:
        rows, judged_now = judge_samples(samples, judge, config.prompt_format, out / "samples.jsonl")
    except JudgeError as exc:
        print(f"judging stopped: {exc}\n(finished samples are kept in {out / 'samples.jsonl'}; rerun to resume)",
              file=sys.stderr)
        return 1
    print(f"judged {judged_now} samples, {len(samples) - judged_now} resumed from {out / 'samples.jsonl'}")

    # 3. score, 4. report
    scores = score_all(rows, config.both_orders)
    summary = {
        "judge": identity,
        "both_orders": config.both_orders,
        "seed": config.seed,
        "partial": any(spec.max_examples is not None for spec in config.benchmarks),
        "benchmarks": [{"name": s.spec.name, "path": s.spec.path, "rows": s.rows, "rejected": len(s.rejects),
                        "subsets": s.counts()} for s in loaded],
        "rejected_rows": sum(len(s.rejects) for s in loaded),
        "samples": {"total": len(samples), "judged_now": judged_now, "resumed": len(samples) - judged_now},
        "scores": scores,
    }
    paths = write_report(out, summary)
    for bench, result in scores.items():
        headline = {k: round(v, 4) for k, v in result.items() if isinstance(v, float)}
        print(f"{bench}: {headline}  unparseable verdicts: {result['verdicts']['error']}/{result['samples']}")
    print("wrote " + ", ".join(str(p) for p in [out / "samples.jsonl", out / "rejects.jsonl", *paths]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
