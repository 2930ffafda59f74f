"""Comparisons -> judged samples -> scores: the code path shared by `rmr1 eval` and in-training evaluation.

A Sample is one comparison shown to the judge with the preferred answer at one position. Its key,
`<comparison key>@<position>`, is stable across runs, so a stopped run resumes: samples.jsonl is
appended to as judgements arrive, and a rerun judges only the keys it does not hold yet.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from rmr1_ray.config.evaluate import BenchmarkSpec, EvalConfig
from rmr1_ray.evaluation.judging import Judge, JudgeError, JudgeRequest
from rmr1_ray.evaluation.loaders import Comparison, load_benchmark
from rmr1_ray.evaluation.scoring import score_all
from rmr1_ray.prompts import Position, PromptFormat, judge_messages, position_for
from rmr1_ray.verdict import eval_verdict

JUDGE_FILE = "judge.json"


@dataclass(frozen=True)
class Sample:
    comparison: Comparison
    position: Position  # where the preferred (chosen) answer is shown

    @property
    def key(self) -> str:
        return f"{self.comparison.key}@{self.position}"

    def request(self, fmt: PromptFormat) -> JudgeRequest:
        c = self.comparison
        a, b = (c.chosen, c.rejected) if self.position == "A" else (c.rejected, c.chosen)
        return JudgeRequest(self.key, judge_messages(c.context, a, b, fmt))

    def record(self, generation: str) -> dict[str, Any]:
        """One line of samples.jsonl: what the scorers read, plus the raw generation."""
        c, verdict = self.comparison, eval_verdict(generation)
        return {
            "key": self.key, "comparison": c.key, "id": c.example_id, "benchmark": c.benchmark, "subset": c.subset,
            "style": list(c.style) if c.style else None, "group": c.group, "position": self.position,
            "generation": generation, "verdict": verdict, "correct": verdict == self.position,
        }  # fmt: skip


def plan_samples(comparisons: Iterable[Comparison], seed: int, both_orders: bool) -> list[Sample]:
    """Both positions per comparison, or one drawn per comparison from (key, seed) with p=0.5."""
    return [Sample(c, p) for c in comparisons for p in (("A", "B") if both_orders else (position_for(c.key, seed),))]


def read_done(path: Path) -> dict[str, dict[str, Any]]:
    """Rows already in samples.jsonl by key. A line cut short by a crash is skipped (judged again)."""
    done: dict[str, dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[row["key"]] = row
    return done


def _append_to(path: Path):
    """Open samples.jsonl for appending; a partial last line (crash mid-write) is closed first."""
    needs_newline = path.exists() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
    handle = path.open("a")
    if needs_newline:
        handle.write("\n")
    return handle


def judge_samples(
    samples: Sequence[Sample], judge: Judge, fmt: PromptFormat, out: Path | None = None, progress: bool = True
) -> tuple[list[dict[str, Any]], int]:
    """Judge every sample whose key is not in `out` yet, appending each result there as it arrives.

    Returns (one row per sample in `samples` order, number judged in this call)."""
    rows = read_done(out) if out is not None else {}
    rows = {s.key: rows[s.key] for s in samples if s.key in rows}
    todo = {s.key: s for s in samples if s.key not in rows}
    judged = correct = errors = 0
    with (
        _append_to(out) if out is not None else nullcontext() as sink,
        tqdm(total=len(todo), desc="judging", unit="sample", disable=not progress, mininterval=2) as bar,
    ):
        for key, generation in judge.judge([s.request(fmt) for s in todo.values()]):
            row = todo[key].record(generation)
            rows[key] = row
            if sink is not None:
                sink.write(json.dumps(row, ensure_ascii=False) + "\n")
                sink.flush()
            judged += 1
            correct += row["correct"]
            errors += row["verdict"] == "error"
            bar.update()
            bar.set_postfix(acc=f"{correct / judged:.3f}", errors=errors, refresh=False)
    missing = [k for k in todo if k not in rows]
    if missing:
        raise JudgeError(f"the judge returned no judgement for {len(missing)} samples, e.g. {missing[:3]}")
    return [rows[s.key] for s in samples], len(todo)


def judge_identity(config: EvalConfig) -> dict[str, Any]:
    """What makes two runs' generations interchangeable: the judge, its prompt format and decoding."""
    if config.model is not None:
        judge = {"name": config.model.path, **config.model.model_dump(include={"path", "tokenizer_path", "dtype"})}
    else:
        judge = {"name": f"{config.endpoint.model} @ {config.endpoint.base_url}",
                 **config.endpoint.model_dump(include={"base_url", "model"})}
    return {**judge, "prompt_format": config.prompt_format, "sampling": config.sampling.model_dump()}


def claim_output_dir(out_dir: Path, identity: dict[str, Any]) -> None:
    """Record the judge in OUT/judge.json; refuse to resume into a directory judged by another set-up,
    whose generations would silently mix with ours."""
    path = out_dir / JUDGE_FILE
    if path.exists():
        previous = json.loads(path.read_text())
        differing = sorted(k for k in identity.keys() | previous.keys() if identity.get(k) != previous.get(k))
        if differing:
            raise ValueError(f"{out_dir} holds judgements of a different judge set-up ({', '.join(differing)} differ: "
                             f"was {[previous.get(k) for k in differing]}); choose another output_dir")
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(identity, indent=2) + "\n")


def headline_metrics(scores: dict[str, Any]) -> dict[str, float]:
    """Flat `benchmark/metric` numbers of score_all's output (for W&B / JSONL metrics): every scalar
    score, the unparseable-verdict rate and, in both_orders mode, the position flip rate."""
    flat = {}
    for bench, result in scores.items():
        flat.update({f"{bench}/{k}": float(v) for k, v in result.items() if isinstance(v, int | float) and k != "samples"})
        flat[f"{bench}/error_rate"] = result["verdicts"]["error"] / result["samples"]
        if "flip_rate" in result.get("position", {}):
            flat[f"{bench}/position_flip_rate"] = result["position"]["flip_rate"]
    return flat


def run_benchmark_subset(
    judge: Judge,
    benchmark_specs: Sequence[BenchmarkSpec | dict[str, Any]],
    max_examples: int | None = 8,
    prompt_format: PromptFormat = "instruct",
    seed: int = 0,
    both_orders: bool = False,
) -> dict[str, float]:
    """Evaluate `judge` on the first `max_examples` examples of every subset of each benchmark, through
    the same loaders, prompts and scorers as `rmr1 eval`; returns headline_metrics (e.g.
    {"rewardbench/score": 0.61, "rm_bench/hard_acc": 0.4, "rmb/mean": 0.55, ...}).

    For evaluation during training: the GRPO driver calls it every K steps with a FunctionJudge around
    its rollout workers (greedy, n=1), e.g.
        metrics = run_benchmark_subset(FunctionJudge(generate), config.eval.benchmarks, max_examples=8)
    Nothing is written to disk and rejected rows are skipped silently (rmr1 eval reports them); the
    benchmark files are re-read on every call (well under a second for the sample files).
    """
    seen: set[str] = set()
    comparisons = []
    for spec in benchmark_specs:
        spec = BenchmarkSpec.model_validate(spec).model_copy(update={"max_examples": max_examples})
        comparisons += load_benchmark(spec, seen).comparisons
    rows, _ = judge_samples(plan_samples(comparisons, seed, both_orders), judge, prompt_format, progress=False)
    return headline_metrics(score_all(rows, both_orders))
