"""The synthetic judging task: every correct answer is right and every wrong one wrong (checked here by
re-solving the question from its text), splits never share a question, and the chains are valid
Reasoning-format judgements with the right verdict."""

from __future__ import annotations

import json
import re

import pytest

from rmr1_ray.synthetic import generate_items, reasoning_chain, split_of, write_task_files
from rmr1_ray.verdict import parse_judgement

pytestmark = pytest.mark.unit
ITEMS = list(generate_items(400, seed=3))


def solve(question: str) -> str:
    """The right answer's key fact, worked out from the question text alone."""
    if m := re.fullmatch(r"What is (\d+) ([+-]) (\d+)\?", question):
        a, op, b = int(m[1]), m[2], int(m[3])
        return str(a + b if op == "+" else a - b)
    if m := re.fullmatch(r"Which number is larger, (\d+) or (\d+)\?", question):
        return f"{max(int(m[1]), int(m[2]))} is larger"
    if m := re.fullmatch(r"How many (\w+) are in (\d+) (\w+)\?", question):
        factor = {("centimeters", "meters"): 100, ("grams", "kilograms"): 1000, ("meters", "kilometers"): 1000,
                  ("milliliters", "liters"): 1000, ("millimeters", "centimeters"): 10}[(m[1], m[3])]
        return f"There are {int(m[2]) * factor} {m[1]}"
    if m := re.fullmatch(r"Which word comes first in alphabetical order, '(\w+)' or '(\w+)'\?", question):
        return f"'{min(m[1], m[2])}' comes before"
    raise AssertionError(f"unknown question {question!r}")


def test_every_kind_is_drawn_and_answers_are_checkable():
    assert {item.kind for item in ITEMS} == {"arithmetic", "comparison", "unit_conversion", "string_fact"}
    for item in ITEMS:
        fact = solve(item.question)
        if item.kind == "arithmetic":
            assert item.correct.endswith(f"= {fact}.") and not item.wrong.endswith(f"= {fact}."), item
        else:
            assert item.correct.startswith(fact) and not item.wrong.startswith(fact), item
        assert item.correct != item.wrong


def test_arithmetic_moves_one_digit_by_one():
    for item in (i for i in ITEMS if i.kind == "arithmetic"):
        a, value = int(item.question.split()[2]), int(solve(item.question))
        changed = [x != y for x, y in zip(f"{a:03d}", f"{value:03d}", strict=True)]
        assert sum(changed) == 1 and 100 <= value <= 999, item.question


def test_seeded_and_distinct():
    assert [i.question for i in generate_items(50, seed=3)] == [i.question for i in ITEMS[:50]]
    assert [i.question for i in generate_items(50, seed=4)] != [i.question for i in ITEMS[:50]]
    assert len({item.question for item in ITEMS}) == len(ITEMS)


@pytest.mark.parametrize("position", ["A", "B"])
def test_chains_are_valid_reasoning_judgements(position):
    for item in ITEMS[:40]:
        judgement = parse_judgement(reasoning_chain(item, position))
        assert judgement.format_valid, judgement.missing
        assert (judgement.task_type, judgement.answer) == ("Reasoning", position)
        shown_a = item.correct if position == "A" else item.wrong
        assert judgement.quotes_a == (shown_a,) and judgement.solution == item.solution


def test_task_files_split_by_question(tmp_path):
    paths = write_task_files(tmp_path, 300, test_fraction=0.2, seed=1, prompt_format="distilled")
    pairs = [json.loads(line) for line in paths["pairs"].read_text().splitlines()]
    chains = [json.loads(line) for line in paths["chains"].read_text().splitlines()]
    test = json.loads(paths["test"].read_text())
    train_questions, test_questions = {p["prompt"] for p in pairs}, {t["prompt"] for t in test}
    assert len(pairs) + len(test) == 300 and not train_questions & test_questions
    assert 0.12 < len(test) / 300 < 0.28
    assert all(split_of(q, 1, 0.2) == "test" for q in test_questions)
    # The chain of each train question judges it with its correct answer at the recorded winner's position.
    assert len(chains) == len(pairs)
    for chain in chains:
        verdict = parse_judgement(chain["chain"]).answer
        assert verdict == {"model_a": "A", "model_b": "B"}[chain["winner"]]
    positions = [c["winner"] for c in chains]
    assert 0.35 < positions.count("model_a") / len(positions) < 0.65
