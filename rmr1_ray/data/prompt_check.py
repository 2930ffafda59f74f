"""GRPO prompt rows checked before any actor starts: every shard's schema, every row's label and
conversation, and every prompt's length under the policy's own tokenizer and chat template.

A shard without the required columns stops the job with the file named (every row of it would be
bad). A bad row is skipped, counted and written to rejects.jsonl with its file, row number, uid and
reason; the job fails only when the bad rows pass `data.max_bad_prompt_fraction`, as `rmr1 prepare`
does. Found at start-up, a bad row can no longer crash a run at the step that draws it, nor again on
every `--resume`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args

import pyarrow as pa

from rmr1_ray.data.outcomes import write_rejects
from rmr1_ray.data.prompt_batches import prompt_files, read_shard
from rmr1_ray.engines.base import chat_prompts_ids
from rmr1_ray.prompts import Winner

WINNERS = get_args(Winner)


class PromptDataError(ValueError):
    """The prompt data cannot be trained on; the message names the file, row and uid or the share."""


def _conversation_problem(messages: Any) -> str | None:
    if not isinstance(messages, list) or not messages:
        return "empty_conversation"
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) or not message.get("role"):
            return "bad_message"
    if messages[-1]["role"] != "user":
        return "last_turn_not_user"
    return None


def check_shard(table: pa.Table, file: str, tokenizer: Any, max_prompt_length: int) -> tuple[list[int], list[dict]]:
    """-> (indices of the good rows, one reject record per bad row)."""
    rows = table.to_pylist()
    rejects: list[dict] = []
    candidates = []
    for index, row in enumerate(rows):
        problem = _conversation_problem(row["messages"])
        if problem is None and row["winner"] not in WINNERS:
            problem = "bad_label"
        detail = {"bad_label": f"winner {row['winner']!r} is not one of {list(WINNERS)}"}.get(problem, problem)
        if problem:
            rejects.append({"file": file, "row": index, "uid": row["uid"], "reason": problem, "detail": detail})
        else:
            candidates.append(index)
    lengths = [len(ids) for ids in chat_prompts_ids(tokenizer, [rows[i]["messages"] for i in candidates])]
    good = []
    for index, length in zip(candidates, lengths, strict=True):
        if length > max_prompt_length:
            rejects.append({"file": file, "row": index, "uid": rows[index]["uid"], "reason": "prompt_too_long",
                            "detail": f"{length} tokens > data.max_prompt_length={max_prompt_length}"})
        else:
            good.append(index)
    return good, sorted(rejects, key=lambda r: r["row"])


def load_checked_prompts(path: str | Path, tokenizer: Any, max_prompt_length: int, max_bad_fraction: float,
                         rejects_path: Path) -> pa.Table:
    """The good rows (uid, messages, winner) of every shard under `path`, in file and row order. Writes
    rejects_path (empty when nothing was rejected); raises PromptDataError past the threshold."""
    good_tables, rejects, read = [], [], 0
    for file in prompt_files(path):
        table = read_shard(file)
        good, bad = check_shard(table, str(file), tokenizer, max_prompt_length)
        good_tables.append(table.take(good))
        rejects += bad
        read += table.num_rows
    write_rejects(rejects_path, rejects)
    if read and len(rejects) / read > max_bad_fraction:
        first = rejects[0]
        raise PromptDataError(
            f"{len(rejects)} of {read} prompts are bad ({len(rejects) / read:.1%} > data.max_bad_prompt_fraction "
            f"{max_bad_fraction:.1%}); first: {first['file']} row {first['row']} (uid {first['uid']!r}): "
            f"{first['detail']}. Every bad row, with its reason: {rejects_path}")
    return pa.concat_tables(good_tables)
