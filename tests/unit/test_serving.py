"""The judge service's pure parts: winner rules, tournaments and rankings, request schemas, ServeConfig."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError

from rmr1_ray.config.serve import ServeConfig
from rmr1_ray.serving import judging
from rmr1_ray.serving.schemas import JudgeRequest, RankRequest

pytestmark = pytest.mark.unit


def generation(verdict: str) -> dict:
    text = f"<answer>[[{verdict}]]</answer>" if verdict in "AB" else "no verdict here"
    return {"text": text, "prompt_tokens": 10, "completion_tokens": 5, "batch_size": 1}


def response(first: str, swapped: str | None = None):
    runs = [judging.make_run("AB", generation(first))]
    if swapped is not None:  # `swapped` is what the judge said with the responses swapped
        runs.append(judging.make_run("BA", generation(swapped)))
    return judging.combine(runs[0], runs[1] if swapped is not None else None, 0.1, "m")


def test_swapped_run_reports_verdicts_in_request_labels():
    assert judging.make_run("BA", generation("A")).verdict == "B"
    assert judging.make_run("BA", generation("none")).verdict == "none"


@pytest.mark.parametrize(
    ("first", "swapped", "winner", "consistent"),
    [
        ("A", None, "A", None),
        ("none", None, "none", None),
        ("A", "B", "A", True),  # response_a wins in both orders
        ("B", "A", "B", True),
        ("A", "A", "inconsistent", False),  # the judge picked whatever sat at position A
        ("A", "none", "none", False),
    ],
)
def test_winner_rules(first, swapped, winner, consistent):
    result = response(first, swapped)
    assert (result.winner, result.consistent) == (winner, consistent)


def by_index(prefer_low: bool, undecided: frozenset = frozenset()):
    """A judge_pair that prefers the lower (or higher) index, or cannot decide for the given pairs."""
    seen = []

    async def judge_pair(a: int, b: int):
        seen.append((a, b))
        if frozenset((a, b)) in undecided:
            return response("none")
        return response("A" if (a < b) == prefer_low else "B")

    return judge_pair, seen


def test_round_robin_scores_table_and_balanced_seats():
    judge_pair, seen = by_index(prefer_low=True)
    matches = asyncio.run(judging.round_robin(4, judge_pair))
    assert len(matches) == 6
    ranking = judging.ranking("round_robin", 4, matches)
    assert [(e.index, e.score) for e in ranking] == [(0, 3.0), (1, 2.0), (2, 1.0), (3, 0.0)]
    grid = judging.table(4, matches)
    assert grid[0] == [None, 1.0, 1.0, 1.0] and grid[3] == [0.0, 0.0, 0.0, None]
    # Each response sits at position A in one or two of its three matches, never always or never.
    assert sorted(sum(a == i for a, _ in seen) for i in range(4)) == [1, 1, 2, 2]


def test_round_robin_undecided_counts_half():
    judge_pair, _ = by_index(prefer_low=True, undecided=frozenset({frozenset((0, 1))}))
    matches = asyncio.run(judging.round_robin(2, judge_pair))
    assert matches[0].winner is None
    assert [(e.index, e.score) for e in judging.ranking("round_robin", 2, matches)] == [(0, 0.5), (1, 0.5)]


def test_knockout_with_a_bye():
    judge_pair, _ = by_index(prefer_low=False)
    matches = asyncio.run(judging.knockout(5, judge_pair))
    # round 1: 0v1, 2v3 (4 has a bye); round 2: 1v3 (4 has a bye); round 3: 3v4
    assert [(m.round, {m.a, m.b}, m.advanced) for m in matches] == [
        (1, {0, 1}, 1), (1, {2, 3}, 3), (2, {1, 3}, 3), (3, {3, 4}, 4)
    ]
    ranking = judging.ranking("knockout", 5, matches)
    assert [(e.index, e.score) for e in ranking] == [(4, 3.0), (3, 2.0), (1, 1.0), (0, 0.0), (2, 0.0)]


def test_knockout_undecided_match_advances_the_lower_index():
    judge_pair, _ = by_index(prefer_low=False, undecided=frozenset({frozenset((0, 1))}))
    (match,) = asyncio.run(judging.knockout(2, judge_pair))
    assert (match.winner, match.advanced) == (None, 0)
    assert judging.table(2, [match]) == [[None, 0.5], [0.5, None]]


@pytest.mark.parametrize(
    "body",
    [
        {"response_a": "a", "response_b": "b"},  # no question
        {"question": "q", "messages": [{"role": "user", "content": "q"}], "response_a": "a", "response_b": "b"},
        {"question": "q", "response_a": "a", "response_b": 1},
        {"question": "q", "response_a": "a", "response_b": "b", "both_orders": "true"},
        {"question": "q", "response_a": "a", "response_b": "b", "seed": 1},
        {"question": "", "response_a": "a", "response_b": "b"},
        {"messages": [{"role": "system", "content": "s"}], "response_a": "a", "response_b": "b"},
    ],
)
def test_judge_request_rejects(body):
    with pytest.raises(ValidationError):
        JudgeRequest.model_validate(body)


def test_requests_accept_both_prompt_forms():
    assert JudgeRequest.model_validate({"question": "q", "response_a": "a", "response_b": "b"}).context() == [
        {"role": "user", "content": "q"}
    ]
    rank = RankRequest.model_validate(
        {"messages": [{"role": "user", "content": "q"}], "responses": ["a", "b"], "temperature": 1}
    )
    assert rank.method == "round_robin" and rank.temperature == 1.0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"replicas": {"max_batch_size": 16, "max_ongoing_requests": 8}}, "never hold enough"),
        ({"engine": "vllm", "vllm": {"tensor_parallel_size": 2}, "replicas": {"num_gpus": 1}}, "num_gpus >= 2"),
        ({"engine": "vllm", "vllm": {"max_model_len": 4096}}, "exceeds vllm.max_model_len"),
        ({"sampling": {"max_new_tokens": 100}, "limits": {"max_new_tokens": 50}}, "exceeds limits.max_new_tokens"),
        ({"http": {"api_key_env": "sk-abc123"}}, "not an environment variable name"),
        ({"http": {"route_prefix": "judge"}}, "must start with '/'"),
        ({"replicas": {"autoscaling": {"min_replicas": 3, "max_replicas": 2}}}, "min_replicas=3 > max_replicas=2"),
    ],
)
def test_serve_config_rejects(tmp_path, overrides, message):
    with pytest.raises(ValidationError, match=message):
        ServeConfig.model_validate({"model": {"path": str(tmp_path)}, **overrides})
