"""Synthetic preference data in each source schema, for tests, the benchmark and the CPU demo.

`python -m rmr1_ray.data.samples OUT_DIR [ROWS_PER_SOURCE]` writes the four files that
configs/tiny-cpu/prepare.yaml reads: skywork.jsonl, code_pref.jsonl, math_step_dpo.parquet and
pairwise.json. Texts are random sentences (no meaning, realistic lengths); same seed, same bytes.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

_VOCABULARY = """the a of to and in is that for it with as on be by this are from or an at which answer question
number value function return list string because therefore first second then result code error step solve
equation total time water plant city people data model user should could would will example simple small
large correct wrong better reason explain compute check write read make use"""
_WORDS = tuple(_VOCABULARY.split())
SKYWORK_SUBSETS = ("helpsteer2", "offsetbias", "wildguard", "magpie_pro", "magpie_ultra")


def sentence(rng: random.Random, words: int) -> str:
    text = " ".join(rng.choice(_WORDS) for _ in range(max(1, words)))
    return text[0].upper() + text[1:] + "."


def skywork_rows(n: int, seed: int = 0, words: int = 30, multi_turn_every: int = 4) -> list[dict[str, Any]]:
    """`chosen`/`rejected` conversations (every `multi_turn_every`-th row has two exchanges) and `source`."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        context = [{"role": "user", "content": f"{i}: {sentence(rng, words // 2)}"}]
        if multi_turn_every and i % multi_turn_every == multi_turn_every - 1:
            context += [{"role": "assistant", "content": sentence(rng, words)},
                        {"role": "user", "content": sentence(rng, words // 2)}]
        rows.append({
            "chosen": context + [{"role": "assistant", "content": sentence(rng, words)}],
            "rejected": context + [{"role": "assistant", "content": sentence(rng, words)}],
            "source": SKYWORK_SUBSETS[i % len(SKYWORK_SUBSETS)],
        })
    return rows


def code_pref_rows(n: int, seed: int = 0, words: int = 30) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [{"input": f"{i}: {sentence(rng, words // 2)}", "accepted": f"def f():\n    return '{sentence(rng, words)}'",
             "rejected": f"def f():\n    return '{sentence(rng, words)}'"} for i in range(n)]


def math_step_dpo_rows(n: int, seed: int = 0, words: int = 30) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [{"dataset": "synthetic", "prompt": f"{i}: {sentence(rng, words // 2)}",
             "initial_reason_steps": f"Step 1: {sentence(rng, words // 3)}\nStep 2:",
             "full_chosen": f" {sentence(rng, words)} The answer is {i}.",
             "full_rejected": f" {sentence(rng, words)} The answer is {i + 1}.",
             "answer": str(i)} for i in range(n)]


def pairwise_rows(n: int, seed: int = 0, words: int = 30) -> list[dict[str, Any]]:
    """The generic schema in its three shapes: strings; a message-list prompt with string answers; full conversations."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = f"{i}: {sentence(rng, words // 2)}"
        chosen, rejected = sentence(rng, words), sentence(rng, words)
        if i % 3 == 0:
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        elif i % 3 == 1:
            rows.append({"prompt": [{"role": "user", "content": prompt}], "chosen": chosen, "rejected": rejected})
        else:
            context = [{"role": "user", "content": prompt}]
            rows.append({"prompt": context, "chosen": context + [{"role": "assistant", "content": chosen}],
                         "rejected": context + [{"role": "assistant", "content": rejected}]})
    return rows


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_json(path: Path, rows: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=1))
    return path


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_sample_mix(out_dir: str | Path, rows_per_source: int = 64, seed: int = 0) -> dict[str, Path]:
    """The four sample sources of configs/tiny-cpu/prepare.yaml, by source kind."""
    out = Path(out_dir)
    return {
        "skywork": write_jsonl(out / "skywork.jsonl", skywork_rows(rows_per_source, seed)),
        "code_pref": write_jsonl(out / "code_pref.jsonl", code_pref_rows(rows_per_source, seed + 1)),
        "math_step_dpo": write_parquet(out / "math_step_dpo.parquet", math_step_dpo_rows(rows_per_source, seed + 2)),
        "pairwise": write_json(out / "pairwise.json", pairwise_rows(rows_per_source, seed + 3)),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rmr1_ray.data.samples",
                                     description="Write the synthetic preference files of configs/tiny-cpu/prepare.yaml.")
    parser.add_argument("out_dir", help="folder for skywork.jsonl, code_pref.jsonl, math_step_dpo.parquet, pairwise.json")
    parser.add_argument("rows_per_source", nargs="?", type=int, default=64)
    args = parser.parse_args(argv)
    paths = write_sample_mix(args.out_dir, args.rows_per_source)
    print("\n".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    main()
