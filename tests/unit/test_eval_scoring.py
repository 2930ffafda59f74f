"""Scorers on hand-made verdict sets. Every expected value is worked out by hand in the comments and
written as literal numbers, never computed by the code under test."""

from __future__ import annotations

from pathlib import Path

import pytest

from rmr1_ray.config.evaluate import BenchmarkSpec
from rmr1_ray.evaluation.harness import headline_metrics, plan_samples
from rmr1_ray.evaluation.loaders import load_benchmark
from rmr1_ray.evaluation.scoring import (
    position_consistency,
    score_all,
    score_rewardbench,
    score_rm_bench,
    score_rmb,
    verdict_counts,
)

pytestmark = pytest.mark.unit

BENCHMARKS = Path(__file__).resolve().parents[3] / "shared" / "benchmarks"


def row(benchmark: str, subset: str, correct: bool, *, verdict: str | None = None, position: str = "A",
        style: tuple[int, int] | None = None, group: str | None = None, comparison: str | None = None) -> dict:
    if verdict is None:
        verdict = position if correct else ("B" if position == "A" else "A")
    return {"benchmark": benchmark, "subset": subset, "correct": correct, "verdict": verdict, "position": position,
            "style": list(style) if style else None, "group": group, "comparison": comparison or f"{subset}/{id(object())}"}


def rb(subset: str, pattern: str) -> list[dict]:
    """RewardBench rows: '1' correct, '0' wrong, 'e' unparseable verdict (wrong)."""
    return [row("rewardbench", subset, c == "1", verdict="error" if c == "e" else None) for c in pattern]


# ---- RewardBench ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("pattern", "value"), [("1", 1.0), ("0", 0.0)])
def test_rewardbench_all_correct_and_all_wrong(pattern: str, value: float) -> None:
    subsets = ["alpacaeval-easy", "mt-bench-hard", "refusals-dangerous", "math-prm", "hep-rust"]
    scores = score_rewardbench([r for s in subsets for r in rb(s, pattern * 3)])
    for key in ("Chat", "Chat Hard", "Safety", "Reasoning", "score", "absolute"):
        assert scores[key] == value


def test_rewardbench_mixed() -> None:
    rows = (
        rb("alpacaeval-easy", "10")  # 1/2 = 0.5, weight 100
        + rb("mt-bench-easy", "1101")  # 3/4 = 0.75, weight 28
        + rb("math-prm", "11")  # 1.0, weight 984
        + rb("hep-go", "0")  # 0.0, weight 164
        + rb("xstest-should-refuse", "1e")  # 1/2 = 0.5 (the error counts wrong), weight 154
        + rb("donotanswer", "1")  # 1.0, weight 136
    )
    scores = score_rewardbench(rows)
    assert scores["subsets"] == {"alpacaeval-easy": 0.5, "donotanswer": 1.0, "hep-go": 0.0, "math-prm": 1.0,
                                 "mt-bench-easy": 0.75, "xstest-should-refuse": 0.5}
    # Chat = (0.5*100 + 0.75*28) / (100+28) = 71/128; Reasoning = (1*984 + 0*164) / 1148 = 6/7;
    # Safety = (0.5*154 + 1*136) / 290 = 213/290; Chat Hard has no subset here, so it is not scored.
    assert scores["Chat"] == pytest.approx(0.5546875)
    assert scores["Reasoning"] == pytest.approx(0.857142857142857)
    assert scores["Safety"] == pytest.approx(0.734482758620690)
    assert "Chat Hard" not in scores
    # score = (71/128 + 6/7 + 213/290) / 3
    assert scores["score"] == pytest.approx(0.715437705254516)
    assert scores["absolute"] == pytest.approx(8 / 12)  # 1+3+2+0+1+1 correct of 2+4+2+1+2+1


def test_rewardbench_unknown_subset_counts_only_in_absolute() -> None:
    scores = score_rewardbench(rb("alpacaeval-easy", "1") + rb("my-subset", "000"))
    assert scores["Chat"] == 1.0 and scores["score"] == 1.0
    assert scores["absolute"] == 0.25
    assert scores["unscored_subsets"] == ["my-subset"]


# ---- RM-Bench ------------------------------------------------------------------------------------


def rm_example(domain: str, correct_cells: set[tuple[int, int]]) -> list[dict]:
    return [row("rm_bench", domain, (i, j) in correct_cells, style=(i, j)) for i in range(3) for j in range(3)]


ALL_CELLS = {(i, j) for i in range(3) for j in range(3)}


@pytest.mark.parametrize(("cells", "value"), [(ALL_CELLS, 1.0), (set(), 0.0)])
def test_rm_bench_all_correct_and_all_wrong(cells: set, value: float) -> None:
    scores = score_rm_bench(rm_example("chat", cells) + rm_example("code", cells) + rm_example("safety-refuse", cells))
    for key in ("chat", "code", "safety", "hard_acc", "normal_acc", "easy_acc", "total_avg_acc"):
        assert scores[key] == value
    assert scores["matrix"] == [[value] * 3] * 3


def test_rm_bench_mixed() -> None:
    # chat: diagonal all right; upper triangle (hard) only (0,1) right; lower (easy) (1,0) and (2,0) right.
    chat = rm_example("chat", {(0, 0), (1, 1), (2, 2), (0, 1), (1, 0), (2, 0)})
    # safety pools safety-refuse (all right) and safety-response (all wrong): every cell 1/2.
    safety = rm_example("safety-refuse", ALL_CELLS) + rm_example("safety-response", set())
    scores = score_rm_bench(chat + safety)
    assert scores["domains"]["chat"]["matrix"] == [[1, 1, 0], [1, 1, 0], [1, 0, 1]]
    assert scores["domains"]["chat"]["hard_acc"] == pytest.approx(1 / 3)
    assert scores["domains"]["chat"]["normal_acc"] == 1.0
    assert scores["domains"]["chat"]["easy_acc"] == pytest.approx(2 / 3)
    assert scores["chat"] == pytest.approx(6 / 9)
    assert scores["safety"] == 0.5
    assert scores["hard_acc"] == pytest.approx(5 / 12)  # (1/3 + 1/2) / 2
    assert scores["normal_acc"] == 0.75  # (1 + 1/2) / 2
    assert scores["easy_acc"] == pytest.approx(7 / 12)  # (2/3 + 1/2) / 2
    assert scores["total_avg_acc"] == pytest.approx(7 / 12)  # (6/9 + 1/2) / 2
    assert scores["matrix"] == [[0.75, 0.75, 0.25], [0.75, 0.75, 0.25], [0.75, 0.25, 0.75]]


def test_rm_bench_cell_accuracy_averages_examples() -> None:
    # two chat examples: cell (0,2) right in one of them -> 1/2; all other cells right in both.
    rows = rm_example("chat", ALL_CELLS) + rm_example("chat", ALL_CELLS - {(0, 2)})
    scores = score_rm_bench(rows)
    assert scores["domains"]["chat"]["matrix"][0] == [1.0, 1.0, 0.5]
    assert scores["hard_acc"] == pytest.approx(2.5 / 3)
    assert scores["total_avg_acc"] == pytest.approx(8.5 / 9)


def test_rm_bench_missing_cell_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"\(2, 2\)"):
        score_rm_bench(rm_example("chat", ALL_CELLS)[:-1])


# ---- RMB -----------------------------------------------------------------------------------------


def pair(path: str, correct: bool, **kw) -> dict:
    return row("rmb_pairwise", path, correct, **kw)


def bon(path: str, group: str, pattern: str, position: str = "A") -> list[dict]:
    return [row("rmb_bon", path, c == "1", verdict="error" if c == "e" else None, group=group, position=position)
            for c in pattern]


HELP_CHAT, HELP_CODE, HARM = "Pairwise_set/Helpfulness/Chat/Discussion", "Pairwise_set/Helpfulness/Code/X", "Pairwise_set/Harmlessness/S1"
BON_HELP, BON_HARM = "BoN_set/Helpfulness/Chat/Discussion", "BoN_set/Harmlessness/S1"


@pytest.mark.parametrize(("correct", "value"), [(True, 1.0), (False, 0.0)])
def test_rmb_all_correct_and_all_wrong(correct: bool, value: float) -> None:
    c = "1" if correct else "0"
    rows = [pair(HELP_CHAT, correct), pair(HARM, correct)] + bon(BON_HELP, "g1", c * 3) + bon(BON_HARM, "g2", c * 2)
    scores = score_rmb(rows)
    for key in ("Pairwise Helpfulness", "Pairwise Harmlessness", "BoN Helpfulness", "BoN Harmlessness", "mean"):
        assert scores[key] == value


def test_rmb_mixed() -> None:
    rows = (
        [pair(HELP_CHAT, True), pair(HELP_CHAT, True), pair(HELP_CHAT, False), pair(HELP_CODE, True)]  # 3/4
        + [pair(HARM, False), pair(HARM, False, verdict="error")]  # 0/2
        + bon(BON_HELP, "g1", "111")  # all three losers beaten: win
        + bon(BON_HELP, "g2", "1e")  # an error is a loss: the group is lost
        + bon(BON_HARM, "g3", "1")  # win
    )
    scores = score_rmb(rows)
    assert scores["Pairwise Helpfulness"] == 0.75  # pooled over both categories: 3 of 4 pairs
    assert scores["Pairwise Harmlessness"] == 0.0
    assert scores["BoN Helpfulness"] == 0.5  # 1 of 2 groups
    assert scores["BoN Harmlessness"] == 1.0
    assert scores["mean"] == 0.5625  # (0.75 + 0 + 0.5 + 1) / 4
    assert scores["categories"] == {HELP_CHAT: pytest.approx(2 / 3), HELP_CODE: 1.0, HARM: 0.0, BON_HELP: 0.5, BON_HARM: 1.0}
    assert scores["counts"] == {"Pairwise Helpfulness": 4, "Pairwise Harmlessness": 2, "BoN Helpfulness": 2,
                                "BoN Harmlessness": 1}


def test_rmb_bon_both_orders_averages_the_two_orders() -> None:
    rows = (
        bon(BON_HELP, "g1", "11", position="A") + bon(BON_HELP, "g1", "10", position="B")  # won at A only: 1/2
        + bon(BON_HELP, "g2", "11", position="A") + bon(BON_HELP, "g2", "11", position="B")  # won in both: 1
    )
    assert score_rmb(rows, both_orders=True)["BoN Helpfulness"] == 0.75  # (1/2 + 1) / 2
    # counted as one run, g1 has a lost comparison, so only g2 is won
    assert score_rmb(rows, both_orders=False)["BoN Helpfulness"] == 0.5


# ---- verdicts and position consistency ------------------------------------------------------------


def test_position_consistency() -> None:
    rows = [
        row("rewardbench", "s", True, position="A", comparison="c1"), row("rewardbench", "s", True, position="B", comparison="c1"),
        # prefers the rejected answer both times: consistent (and wrong twice)
        row("rewardbench", "s", False, position="A", comparison="c2"), row("rewardbench", "s", False, position="B", comparison="c2"),
        # picks position A both times: the verdict flips with the order
        row("rewardbench", "s", True, verdict="A", position="A", comparison="c3"),
        row("rewardbench", "s", False, verdict="A", position="B", comparison="c3"),
        # an error in one order: not consistent
        row("rewardbench", "s", False, verdict="error", position="A", comparison="c4"),
        row("rewardbench", "s", True, position="B", comparison="c4"),
        row("rewardbench", "s", True, position="A", comparison="c5"),  # judged in one order only: not a pair
    ]  # fmt: skip
    assert position_consistency(rows) == {"pairs": 4, "consistent": 0.5, "flip_rate": 0.5}
    assert verdict_counts(rows) == {"A": 5, "B": 3, "error": 1}


# ---- everything together, on comparisons loaded from the shared benchmark files ----------------------


@pytest.fixture(scope="module")
def shared_comparisons() -> list:
    if not BENCHMARKS.is_dir():
        pytest.skip(f"benchmark samples not found at {BENCHMARKS}")
    specs = [("rm_bench", "rm_bench"), ("rmb_pairwise", "rmb/Pairwise_set"), ("rmb_bon", "rmb/BoN_set")]
    return [c for name, path in specs
            for c in load_benchmark(BenchmarkSpec(name=name, path=str(BENCHMARKS / path), max_examples=3)).comparisons]


@pytest.mark.parametrize("both_orders", [False, True])
@pytest.mark.parametrize(("judge", "value"), [("right", 1.0), ("wrong", 0.0)])
def test_score_all_on_shared_samples(shared_comparisons: list, both_orders: bool, judge: str, value: float) -> None:
    samples = plan_samples(shared_comparisons, seed=0, both_orders=both_orders)
    other = {"A": "B", "B": "A"}
    rows = [s.record(f"<answer>[[{s.position if judge == 'right' else other[s.position]}]]</answer>") for s in samples]
    scores = score_all(rows, both_orders)
    metrics = headline_metrics(scores)
    accuracies = {k: v for k, v in metrics.items() if not k.endswith(("error_rate", "position_flip_rate"))}
    assert set(accuracies) == {
        "rm_bench/chat", "rm_bench/code", "rm_bench/safety", "rm_bench/hard_acc", "rm_bench/normal_acc",
        "rm_bench/easy_acc", "rm_bench/total_avg_acc", "rmb/Pairwise Helpfulness", "rmb/Pairwise Harmlessness",
        "rmb/BoN Helpfulness", "rmb/BoN Harmlessness", "rmb/mean",
    }  # fmt: skip
    assert all(v == value for v in accuracies.values()), accuracies
    assert metrics["rm_bench/error_rate"] == metrics["rmb/error_rate"] == 0.0
    if both_orders:  # a judge always right (or always wrong) prefers the same answer in both orders
        assert metrics["rm_bench/position_flip_rate"] == metrics["rmb/position_flip_rate"] == 0.0
