"""A synthetic judging task with checkable answers: the built-in default for the demo and tests.

Every question has one correct and one wrong answer that the generator computes itself, so a
judge's verdict can be scored without any human label. For SFT the generator also writes the
Reasoning-format chain RM-R1 trains on (<type>, <solution>, <eval> with quotes, <answer>).
Splits are by question: a question's text lands on exactly one side.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from rmr1_ray.prompts import PreferencePair, PromptFormat, balanced_positions, position_for, render_pair

# Every check is sized for a tiny model trained for minutes on a CPU: each one generalises from a
# small table the model can learn (digit order, digit successor, place value, a word order), so
# held-out questions are answerable without memorising them. Numbers are tokenised digit by digit.
WORDS = ("apple", "banana", "cherry", "desert", "eagle", "forest", "grape", "honey", "island", "jungle",
         "kite", "lemon", "mango", "night", "ocean", "peach", "quartz", "river", "sugar", "tiger",
         "umbrella", "valley", "winter", "xylophone", "yellow", "zebra")  # one word per first letter
UNITS = (("meters", "centimeters", 100), ("kilograms", "grams", 1000), ("kilometers", "meters", 1000),
         ("liters", "milliliters", 1000), ("centimeters", "millimeters", 10))


@dataclass(frozen=True)
class JudgingItem:
    question: str
    correct: str
    wrong: str
    solution: str  # the judge's own solution, written into the Reasoning chain
    kind: str


def _arithmetic(rng: random.Random) -> JudgingItem:
    """Add or subtract 1, 10 or 100 from a three-digit number, without carry: one digit moves by one."""
    step = rng.choice((1, 10, 100))
    op = rng.choice("+-")
    while True:
        a = rng.randint(100, 999)
        digit = a // step % 10
        if (op == "+" and digit < 9) or (op == "-" and digit > 0 and a - step >= 100):
            break
    value = a + step if op == "+" else a - step
    wrong = value + rng.choice([d for d in (-100, -10, -1, 1, 10, 100) if abs(d) != step])
    question = f"What is {a} {op} {step}?"
    return JudgingItem(question, f"{a} {op} {step} = {value}.", f"{a} {op} {step} = {wrong}.",
                       f"{a} {op} {step} = {value}", "arithmetic")


def _comparison(rng: random.Random) -> JudgingItem:
    a, b = rng.sample(range(1, 1000), 2)
    big, small = max(a, b), min(a, b)
    question = f"Which number is larger, {a} or {b}?"
    return JudgingItem(question, f"{big} is larger than {small}.", f"{small} is larger than {big}.", f"{big} > {small}", "comparison")


def _unit_conversion(rng: random.Random) -> JudgingItem:
    """Powers of ten: the answer is the amount followed by zeros; the wrong one has a zero too many or
    too few."""
    big_unit, small_unit, factor = rng.choice(UNITS)
    amount = rng.randint(2, 99)
    value = amount * factor
    wrong = rng.choice((value * 10, value // 10))
    question = f"How many {small_unit} are in {amount} {big_unit}?"
    return JudgingItem(question, f"There are {value} {small_unit}.", f"There are {wrong} {small_unit}.",
                       f"{amount} x {factor} = {value} {small_unit}", "unit_conversion")


def _string_fact(rng: random.Random) -> JudgingItem:
    """Alphabetical order of two words."""
    x, y = rng.sample(WORDS, 2)
    first, second = sorted((x, y))
    question = f"Which word comes first in alphabetical order, '{x}' or '{y}'?"
    return JudgingItem(question, f"'{first}' comes before '{second}'.", f"'{second}' comes before '{first}'.",
                       f"{first} < {second}", "string_fact")


GENERATORS: tuple[Callable[[random.Random], JudgingItem], ...] = (_arithmetic, _comparison, _unit_conversion, _string_fact)


def generate_items(count: int, seed: int) -> Iterator[JudgingItem]:
    """`count` distinct questions (a repeated question is drawn again), reproducible from `seed`."""
    rng = random.Random(seed)
    seen: set[str] = set()
    for _ in range(100 * count + 100):
        if len(seen) == count:
            return
        item = rng.choice(GENERATORS)(rng)
        if item.question in seen or item.correct == item.wrong:
            continue
        seen.add(item.question)
        yield item
    if len(seen) < count:
        raise ValueError(f"only {len(seen)} distinct questions could be drawn, {count} were asked for")


def split_of(question: str, seed: int, test_fraction: float) -> str:
    """'train' or 'test', decided by a hash of the question so a question never lands on both sides."""
    digest = hashlib.blake2b(f"{seed}:{question}".encode(), digest_size=8).digest()
    return "test" if int.from_bytes(digest, "big") / 2**64 < test_fraction else "train"


def reasoning_chain(item: JudgingItem, correct_position: str) -> str:
    """The RM-R1 Reasoning-format chain that judges `item` with the correct answer at `correct_position`."""
    answer_a, answer_b = (item.correct, item.wrong) if correct_position == "A" else (item.wrong, item.correct)
    verdict_a = "matches" if correct_position == "A" else "does not match"
    verdict_b = "matches" if correct_position == "B" else "does not match"
    return (
        "<type>Reasoning</type>\n\n"
        f"<solution> {item.solution} </solution>\n\n"
        "<eval>\n"
        f"  <quote_A>{answer_a}</quote_A> {verdict_a} the solution.\n"
        f"  <quote_B>{answer_b}</quote_B> {verdict_b} the solution.\n"
        "</eval>\n\n"
        f"<answer>[[{correct_position}]]</answer>"
    )


def pairwise_row(item: JudgingItem) -> dict[str, str]:
    """A row in the generic pairwise schema that `rmr1 prepare` reads (prompt, chosen, rejected)."""
    return {"prompt": item.question, "chosen": item.correct, "rejected": item.wrong, "kind": item.kind}


def write_task_files(out_dir: str | Path, num_questions: int, test_fraction: float, seed: int,
                     prompt_format: PromptFormat) -> dict[str, Path]:
    """Write the task in the formats the real jobs read; returns their paths.

    - pairs.jsonl:   train questions in the generic pairwise schema (`rmr1 prepare` -> GRPO prompts)
    - chains.jsonl:  train questions as teacher chains (`rmr1 prepare` chain_sources -> SFT rows)
    - test.json:     test questions in RewardBench's format, subset = task kind (`rmr1 eval`)
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"pairs": out / "pairs.jsonl", "chains": out / "chains.jsonl", "test": out / "test.json"}
    train, test = [], []
    for item in generate_items(num_questions, seed):
        (test if split_of(item.question, seed, test_fraction) == "test" else train).append(item)
    with paths["pairs"].open("w") as pairs, paths["chains"].open("w") as chains:
        for item in train:
            pairs.write(json.dumps(pairwise_row(item)) + "\n")
            uid = hashlib.blake2b(item.question.encode(), digest_size=8).hexdigest()
            position = position_for(uid, seed)
            pair = PreferencePair(({"role": "user", "content": item.question},), item.correct, item.wrong)
            messages, winner = render_pair(pair, position, prompt_format)
            chain = {"uid": uid, "messages": messages, "winner": winner, "chain": reasoning_chain(item, position),
                     "source": f"synthetic-{item.kind}", "pass": 1}
            chains.write(json.dumps(chain) + "\n")
    rewardbench = [{"id": i, "subset": item.kind, "prompt": item.question, "chosen": item.correct,
                    "rejected": item.wrong} for i, item in enumerate(test)]
    paths["test"].write_text(json.dumps(rewardbench))
    return paths


def write_prompt_rows(path: str | Path, count: int, seed: int = 0, fmt: str = "distilled") -> list[dict]:
    """A judge-prompt parquet like `rmr1 prepare`'s OUT/train (uid, messages, winner, source) from the
    synthetic task; returns the rows with their JudgingItem under "item" (not written)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    items = list(generate_items(count, seed))
    uids = [f"syn-{seed}-{i:04d}" for i in range(count)]
    rows = []
    for uid, item, position in zip(uids, items, balanced_positions(uids, seed), strict=True):
        pair = PreferencePair(context=({"role": "user", "content": item.question},), chosen=item.correct,
                              rejected=item.wrong)
        messages, winner = render_pair(pair, position, fmt)
        rows.append({"uid": uid, "messages": messages, "winner": winner, "source": "synthetic", "item": item})
    table = pa.Table.from_pylist([{k: v for k, v in row.items() if k != "item"} for row in rows])
    pq.write_table(table, path)
    return rows
