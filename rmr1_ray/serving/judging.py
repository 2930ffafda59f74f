"""From judge generations to API answers: one pair (in one or both orders) and tournaments of N responses.

Pure asyncio: the caller passes `judge_pair(first, second) -> JudgeResponse`, a coroutine that shows
response `first` as Chatbot A. Every pair of a round is judged concurrently, so the engine replicas
see them together and batch them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Literal

from rmr1_ray.serving.schemas import JudgeResponse, JudgeRun, Match, RankEntry, Winner
from rmr1_ray.verdict import eval_verdict, parse_judgement

JudgePair = Callable[[int, int], Awaitable[JudgeResponse]]
_SWAP = {"A": "B", "B": "A", "none": "none"}


def make_run(order: Literal["AB", "BA"], generation: dict) -> JudgeRun:
    """A JudgeRun from one JudgeModel generation; the verdict is translated back to the request's labels."""
    text = generation["text"]
    said = eval_verdict(text)  # RM-R1's parse, so served verdicts match benchmark scoring
    verdict = "none" if said == "error" else said
    judgement = parse_judgement(text)
    return JudgeRun(
        order=order,
        verdict=verdict if order == "AB" else _SWAP[verdict],
        task_type=judgement.task_type,
        rubric=judgement.rubric,
        solution=judgement.solution,
        eval_text=judgement.eval_text,
        raw_text=text,
        format_valid=judgement.format_valid,
        format_problems=list(judgement.missing),
        prompt_tokens=generation["prompt_tokens"],
        completion_tokens=generation["completion_tokens"],
        batch_size=generation["batch_size"],
    )


def combine(first: JudgeRun, swapped: JudgeRun | None, latency_s: float, model: str) -> JudgeResponse:
    """The winner of one or two runs (see schemas' module docstring for the rules)."""
    winner: Winner
    consistent = None
    if swapped is None:
        winner = first.verdict
    else:
        consistent = first.verdict == swapped.verdict and first.verdict != "none"
        if "none" in (first.verdict, swapped.verdict):
            winner = "none"
        else:
            winner = first.verdict if consistent else "inconsistent"
    return JudgeResponse(
        **first.model_dump(), winner=winner, consistent=consistent, swapped=swapped, latency_s=latency_s, model=model
    )


def _seat(i: int, j: int) -> tuple[int, int]:
    # Alternate who is shown first, so a judge's position bias does not favour low indices.
    return (i, j) if (i + j) % 2 == 0 else (j, i)


def _winner_index(a: int, b: int, result: JudgeResponse) -> int | None:
    return {"A": a, "B": b}.get(result.winner)


async def round_robin(n: int, judge_pair: JudgePair) -> list[Match]:
    seats = [_seat(i, j) for i in range(n) for j in range(i + 1, n)]
    results = await asyncio.gather(*(judge_pair(a, b) for a, b in seats))
    return [
        Match(a=a, b=b, round=1, winner=_winner_index(a, b, r), advanced=None, result=r)
        for (a, b), r in zip(seats, results, strict=True)
    ]


async def knockout(n: int, judge_pair: JudgePair) -> list[Match]:
    """Single elimination: 0 v 1, 2 v 3, ... per round; an odd one out gets a bye to the next round."""
    alive, matches, round_no = list(range(n)), [], 1
    while len(alive) > 1:
        seats = [_seat(alive[k], alive[k + 1]) for k in range(0, len(alive) - 1, 2)]
        results = await asyncio.gather(*(judge_pair(a, b) for a, b in seats))
        survivors = []
        for (a, b), result in zip(seats, results, strict=True):
            winner = _winner_index(a, b, result)
            advanced = min(a, b) if winner is None else winner  # someone must go on; documented rule
            matches.append(Match(a=a, b=b, round=round_no, winner=winner, advanced=advanced, result=result))
            survivors.append(advanced)
        if len(alive) % 2:
            survivors.append(alive[-1])
        alive, round_no = survivors, round_no + 1
    return matches


def table(n: int, matches: list[Match]) -> list[list[float | None]]:
    """table[i][j]: i's result against j: 1 win, 0 loss, 0.5 undecided; None when they did not meet."""
    grid: list[list[float | None]] = [[None] * n for _ in range(n)]
    for m in matches:
        score_a = 0.5 if m.winner is None else float(m.winner == m.a)
        grid[m.a][m.b], grid[m.b][m.a] = score_a, 1.0 - score_a
    return grid


def ranking(method: Literal["round_robin", "knockout"], n: int, matches: list[Match]) -> list[RankEntry]:
    """round_robin: wins + half of undecided matches; knockout: rounds survived (a bye counts, the
    champion survives them all). Best first; equal scores keep input order."""
    if method == "round_robin":
        grid = table(n, matches)
        scores = [sum(v for v in row if v is not None) for row in grid]
    else:
        rounds = max((m.round for m in matches), default=0)
        scores = [float(rounds)] * n  # the champion never loses
        for m in matches:
            loser = m.b if m.advanced == m.a else m.a
            scores[loser] = float(m.round - 1)
    order = sorted(range(n), key=lambda i: -scores[i])  # sorted() is stable: ties keep input order
    return [RankEntry(index=i, score=scores[i]) for i in order]
