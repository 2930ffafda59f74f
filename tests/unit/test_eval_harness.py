"""The evaluation harness: sample planning and prompts, resumable judging, in-training evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rmr1_ray.config.evaluate import BenchmarkSpec, EvalConfig
from rmr1_ray.evaluation.harness import (
    claim_output_dir,
    judge_identity,
    judge_samples,
    plan_samples,
    run_benchmark_subset,
)
from rmr1_ray.evaluation.judging import FunctionJudge, JudgeError
from rmr1_ray.evaluation.loaders import Comparison
from rmr1_ray.prompts import position_for

pytestmark = pytest.mark.unit

BENCHMARKS = Path(__file__).resolve().parents[3] / "shared" / "benchmarks"
CONTEXT = ({"role": "user", "content": "Which is larger, 3 or 5?"},)


def comparisons(n: int) -> list[Comparison]:
    return [Comparison(f"rewardbench/math-prm/{i}", "rewardbench", "math-prm", str(i), CONTEXT, f"5 (#{i})", f"3 (#{i})")
            for i in range(n)]


class CountingJudge(FunctionJudge):
    """Answers [[A]] when Chatbot A's response is the chosen one ('5 ...'): always right."""

    def __init__(self) -> None:
        super().__init__(self._generate, batch_size=4)
        self.prompts = 0

    def _generate(self, batch: list[list[dict]]) -> list[str]:
        self.prompts += len(batch)
        a_is_chosen = ["[The Start of Chatbot A's Response]\n5" in m[-1]["content"] for m in batch]
        return [f"<answer>[[{'A' if a else 'B'}]]</answer>" for a in a_is_chosen]


def test_positions_follow_position_for_and_both_orders_shows_both() -> None:
    single = plan_samples(comparisons(200), seed=3, both_orders=False)
    assert [s.position for s in single] == [position_for(c.key, 3) for c in comparisons(200)]
    assert 70 < sum(s.position == "A" for s in single) < 130  # p = 0.5 per comparison
    both = plan_samples(comparisons(3), seed=3, both_orders=True)
    assert [(s.comparison.key, s.position) for s in both] == [(c.key, p) for c in comparisons(3) for p in "AB"]
    assert len({s.key for s in both}) == 6


def test_request_shows_the_chosen_answer_at_its_position() -> None:
    sample_a, sample_b = plan_samples(comparisons(1), seed=0, both_orders=True)
    for sample, (first, second) in ((sample_a, ("5 (#0)", "3 (#0)")), (sample_b, ("3 (#0)", "5 (#0)"))):
        user = sample.request("instruct").messages[-1]["content"]
        assert f"[The Start of Chatbot A's Response]\n{first}\n" in user
        assert f"[The Start of Chatbot B's Response]\n{second}\n" in user
    assert len(sample_a.request("distilled").messages) == 1  # the distilled format has no system message


def test_judging_resumes_without_judging_done_samples_again(tmp_path: Path) -> None:
    out = tmp_path / "samples.jsonl"
    samples = plan_samples(comparisons(10), seed=0, both_orders=False)
    judge = CountingJudge()
    rows, judged = judge_samples(samples, judge, "instruct", out, progress=False)
    assert judged == judge.prompts == 10
    assert all(r["correct"] and r["verdict"] == r["position"] for r in rows)
    assert [r["key"] for r in rows] == [s.key for s in samples]

    again = CountingJudge()
    rows_again, judged = judge_samples(samples, again, "instruct", out, progress=False)
    assert judged == again.prompts == 0 and rows_again == rows

    # a run stopped mid-write: 6 complete lines and half of the 7th survive
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:6]) + lines[6][:20])
    resumed = CountingJudge()
    rows_resumed, judged = judge_samples(samples, resumed, "instruct", out, progress=False)
    assert judged == resumed.prompts == 4
    assert rows_resumed == rows
    assert len([json.loads(line) for line in out.read_text().splitlines()[7:]]) == 4  # appended after the cut line


def test_a_judge_that_drops_samples_is_an_error() -> None:
    judge = FunctionJudge(lambda batch: ["[[A]]"] * (len(batch) - 1))
    with pytest.raises(JudgeError, match="returned 1 texts for 2 prompts"):
        judge_samples(plan_samples(comparisons(2), 0, False), judge, "instruct", progress=False)


def test_output_dir_belongs_to_one_judge(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    config = EvalConfig(model={"path": str(model)}, benchmarks=[{"name": "rm_bench", "path": "x"}])
    claim_output_dir(tmp_path / "out", judge_identity(config))
    claim_output_dir(tmp_path / "out", judge_identity(config))  # same judge: resume
    other = config.model_copy(update={"prompt_format": "distilled"})
    with pytest.raises(ValueError, match="prompt_format differ"):
        claim_output_dir(tmp_path / "out", judge_identity(other))


@pytest.mark.skipif(not BENCHMARKS.is_dir(), reason=f"benchmark samples not found at {BENCHMARKS}")
def test_run_benchmark_subset_for_training() -> None:
    specs = [BenchmarkSpec(name="rm_bench", path=str(BENCHMARKS / "rm_bench")),
             {"name": "rmb_pairwise", "path": str(BENCHMARKS / "rmb" / "Pairwise_set")},
             {"name": "rmb_bon", "path": str(BENCHMARKS / "rmb" / "BoN_set")}]
    calls = []

    def always_a(batch: list[list[dict]]) -> list[str]:
        calls.append(len(batch))
        return ["<answer>[[A]]</answer>"] * len(batch)

    metrics = run_benchmark_subset(FunctionJudge(always_a), specs, max_examples=2, both_orders=True)
    # A judge that always answers A is right in exactly one of the two orders of every comparison:
    # every accuracy is 1/2 (best-of-N: all groups won with the best at A, none at B), and every verdict flips.
    # Samples: rm_bench 3 domains x 2 examples x 9 cells; rmb pairwise 7 categories x 2; BoN 7 x 2 groups.
    assert metrics["rm_bench/total_avg_acc"] == metrics["rm_bench/hard_acc"] == 0.5
    assert metrics["rmb/Pairwise Helpfulness"] == metrics["rmb/BoN Harmlessness"] == metrics["rmb/mean"] == 0.5
    assert metrics["rm_bench/position_flip_rate"] == metrics["rmb/position_flip_rate"] == 1.0
    assert metrics["rm_bench/error_rate"] == 0.0
    assert sum(calls) == 2 * (3 * 2 * 9 + 7 * 2) + 2 * sum(
        len(json.loads(p.read_text())[i]["loser_list"]) for p in (BENCHMARKS / "rmb" / "BoN_set").rglob("*.json") for i in range(2)
    )
