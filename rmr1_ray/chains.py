"""Two-pass reasoning-chain generation (RM-R1's distillation data), resumable.

Pass 1 sends the judge prompt as it is. A chain is kept when its verdict (RM-R1's eval_verdict)
matches the label and, unless switched off, it follows the chain-of-rubrics format (parse_judgement).
Pass 2 sends the rows pass 1 got wrong back to the teacher with the correct verdict and the flawed
chain appended to the prompt (CORRECTION_PROMPT), and checks the new chain the same way.

Every input row ends in exactly one of three files of OUT (JSON lines, append-only, one line per row
written and flushed as soon as the row is finished):
  chains.jsonl    kept: {"uid", "messages", "winner", "chain", "source", "pass", "usage"}
                  (the contract of rmr1_ray.data.sft: `messages` is the original judge prompt)
  rejected.jsonl  answered, but no pass gave a right, well-formed chain (with each pass's chain and why)
  failures.jsonl  a request failed for good (after its retries): the reason. Not finished: a rerun
                  sends the row again, so this file is a log and may name a uid more than once.
A rerun skips every uid already in chains.jsonl or rejected.jsonl, so it never pays for a row twice
and never writes a uid twice.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from rmr1_ray.config.chains import TeacherConfig
from rmr1_ray.teacher import Completion, TeacherClient, TeacherError
from rmr1_ray.verdict import eval_verdict, parse_judgement

CHAINS_FILE, REJECTED_FILE, FAILURES_FILE = "chains.jsonl", "rejected.jsonl", "failures.jsonl"
VERDICT_OF = {"model_a": "A", "model_b": "B"}

# Pass 2, appended to the last user message of the judge prompt (RM-R1 appends its hint to the user
# message too, so the system prompt with the format rules stays intact). Why each part:
# - the correct verdict, named by the label the judge must output, so the teacher can aim at it;
# - the flawed chain, so the teacher sees which reasoning went wrong and does not repeat it;
# - "as if ... for the first time" and "do not mention": the new chain becomes an SFT target for the
#   ORIGINAL prompt, which has neither hint nor earlier judgement. A chain that says "as the note
#   says, B is correct" would teach the student to cite information it never gets;
# - "exactly the format above": pass 2 must produce the same chain-of-rubrics layout as pass 1.
CORRECTION_PROMPT = """

[Note for this example]
The correct verdict for this example is [[{label}]]: Chatbot {label}'s response is better than Chatbot {other}'s.
Below is an earlier judgement of this example that reached the wrong conclusion or broke the required format.
Write a new, complete judgement in exactly the format required above, as if you were judging the example for the first time: reason carefully and honestly to why Chatbot {label} is better, and end with <answer>[[{label}]]</answer>.
Do not mention this note, the correct verdict being given, or the earlier judgement.

[The Start of the Earlier Judgement]
{chain}
[The End of the Earlier Judgement]"""


def correction_messages(messages: list[dict], winner: str, chain: str) -> list[dict]:
    """The pass-2 prompt: the judge prompt with CORRECTION_PROMPT appended to its last (user) message."""
    label = VERDICT_OF[winner]
    other = "B" if label == "A" else "A"
    note = CORRECTION_PROMPT.format(label=label, other=other, chain=chain)
    return [*messages[:-1], {**messages[-1], "content": messages[-1]["content"] + note}]


@dataclass(frozen=True)
class Check:
    verdict: str  # A | B | error (eval_verdict)
    correct: bool
    format_valid: bool
    problems: tuple[str, ...]

    def kept(self, require_valid_format: bool) -> bool:
        return self.correct and (self.format_valid or not require_valid_format)

    def reason(self) -> str:
        if not self.correct:
            return f"wrong verdict {self.verdict}"
        return "invalid format: " + ", ".join(self.problems)


def check_chain(chain: str, winner: str) -> Check:
    judgement = parse_judgement(chain)
    verdict = eval_verdict(chain)
    return Check(verdict, verdict == VERDICT_OF[winner], judgement.format_valid, judgement.missing)


# --- the result files -----------------------------------------------------------------------------


def repair_tail(path: Path) -> None:
    """Make a result file end on a line break after a crash: a complete record whose newline was lost
    gets it back; a record cut short is removed (its row was not finished, so it is sent again)."""
    if not path.exists():
        return
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return
    cut = data.rfind(b"\n") + 1
    try:
        json.loads(data[cut:])
    except ValueError:
        os.truncate(path, cut)
        return
    with path.open("ab") as f:
        f.write(b"\n")


def read_uids(path: Path) -> set[str]:
    """uids of a result file (repaired first); an unreadable line other than the last is an error."""
    if not path.exists():
        return set()
    repair_tail(path)
    uids = set()
    for number, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            uids.add(json.loads(line)["uid"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{number}: not a result line ({exc!r}); fix or remove the line") from None
    return uids


class JsonlWriter:
    """Append-only JSON lines; each record is one write + flush, so a kill loses at most the line being written."""

    def __init__(self, path: Path) -> None:
        repair_tail(path)  # never append to half a line
        self._file = path.open("a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


# --- statistics -----------------------------------------------------------------------------------


@dataclass
class PassStats:
    sent: int = 0  # rows sent in this pass
    answered: int = 0  # rows with a completion back
    correct: int = 0  # verdict matches the label
    format_valid: int = 0
    kept: int = 0  # written to chains.jsonl
    failed: int = 0  # request failed for good (failures.jsonl)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0

    def as_dict(self) -> dict:
        return {**self.__dict__, "cost_usd": round(self.cost_usd, 6)}


@dataclass
class RunStats:
    passes: dict[int, PassStats] = field(default_factory=lambda: {1: PassStats(), 2: PassStats()})
    kept: int = 0
    rejected: int = 0
    failed: int = 0

    @property
    def cost_usd(self) -> float:
        return sum(p.cost_usd for p in self.passes.values())


def request_cost(completion: Completion, teacher: TeacherConfig) -> float:
    """USD of one answered request at the configured prices."""
    return (
        completion.prompt_tokens * teacher.price_input_per_mtok
        + completion.completion_tokens * teacher.price_output_per_mtok
    ) / 1e6


# --- the two passes -------------------------------------------------------------------------------


@dataclass
class Generator:
    """Runs rows through the passes and writes each finished row to its file."""

    client: TeacherClient
    teacher: TeacherConfig
    out_dir: Path
    second_pass: bool = True
    require_valid_format: bool = True
    stats: RunStats = field(default_factory=RunStats)
    _chains: JsonlWriter = field(init=False)
    _rejected: JsonlWriter = field(init=False)
    _failures: JsonlWriter = field(init=False)

    async def _ask(self, pass_no: int, uid: str, messages: list[dict], winner: str) -> tuple[Completion, Check] | None:
        """One pass for one row; None when the request failed for good (recorded in failures.jsonl)."""
        stats = self.stats.passes[pass_no]
        stats.sent += 1
        try:
            completion = await self.client.complete(messages)
        except TeacherError as exc:
            stats.failed += 1
            self._failures.write({"uid": uid, "pass": pass_no, "reason": str(exc)})
            return None
        check = check_chain(completion.text, winner)
        stats.answered += 1
        stats.correct += check.correct
        stats.format_valid += check.format_valid
        stats.prompt_tokens += completion.prompt_tokens
        stats.completion_tokens += completion.completion_tokens
        stats.cost_usd += request_cost(completion, self.teacher)
        return completion, check

    async def judge_row(self, row: dict) -> str:
        """Both passes for one row -> "kept" | "rejected" | "failed"."""
        uid, messages, winner = row["uid"], row["messages"], row["winner"]
        attempts: list[dict] = []
        usage = {"prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0}
        prompt = messages
        for pass_no in (1, 2) if self.second_pass else (1,):
            answer = await self._ask(pass_no, uid, prompt, winner)
            if answer is None:
                return "failed"
            completion, check = answer
            usage["prompt_tokens"] += completion.prompt_tokens
            usage["completion_tokens"] += completion.completion_tokens
            usage["cost_usd"] = round(usage["cost_usd"] + request_cost(completion, self.teacher), 8)
            if check.kept(self.require_valid_format):
                self.stats.passes[pass_no].kept += 1
                self._chains.write(
                    {"uid": uid, "messages": messages, "winner": winner, "chain": completion.text,
                     "source": row["source"], "pass": pass_no, "usage": usage}
                )
                return "kept"
            attempts.append({"pass": pass_no, "chain": completion.text, "reason": check.reason(),
                             "finish_reason": completion.finish_reason})
            prompt = correction_messages(messages, winner, completion.text)
        self._rejected.write({"uid": uid, "winner": winner, "source": row["source"], "attempts": attempts, "usage": usage})
        return "rejected"

    async def run(self, rows: list[dict]) -> RunStats:
        """Judge every row (concurrency is the client's), showing progress."""
        self._chains = JsonlWriter(self.out_dir / CHAINS_FILE)
        self._rejected = JsonlWriter(self.out_dir / REJECTED_FILE)
        self._failures = JsonlWriter(self.out_dir / FAILURES_FILE)
        tasks = [asyncio.ensure_future(self.judge_row(row)) for row in rows]
        try:
            with tqdm(total=len(rows), desc="chains", unit="row", dynamic_ncols=True) as bar:
                for done in asyncio.as_completed(tasks):
                    outcome = await done
                    setattr(self.stats, outcome, getattr(self.stats, outcome) + 1)
                    bar.set_postfix(kept=self.stats.kept, rejected=self.stats.rejected,
                                    failed=self.stats.failed, usd=f"{self.stats.cost_usd:.2f}", refresh=False)
                    bar.update()
        finally:
            for task in tasks:  # a fatal error stops the rest; their rows stay unfinished for a rerun
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for writer in (self._chains, self._rejected, self._failures):
                writer.close()
        return self.stats


# --- input ----------------------------------------------------------------------------------------

INPUT_COLUMNS = ("uid", "messages", "winner", "source")


def input_problem(row: dict) -> str | None:
    """Why a prepared row cannot be sent to the teacher, or None."""
    if not isinstance(row["uid"], str) or not row["uid"]:
        return "uid: empty or not a string"
    if row["winner"] not in VERDICT_OF:
        return f"winner: {row['winner']!r} is not model_a or model_b"
    messages = row["messages"]
    if not messages or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
        return "messages: empty, or a message without text content"
    if messages[-1].get("role") != "user":
        return "messages: the judge prompt must end with a user message"
    return None


def read_input(path: str, limit: int | None) -> list[dict]:
    """The first `limit` rows (all if None) of a prepared preference parquet file or directory."""
    import pyarrow.parquet as pq

    schema_names = pq.ParquetDataset(path).schema.names
    missing = [c for c in INPUT_COLUMNS if c not in schema_names]
    if missing:
        raise ValueError(f"{path}: missing columns {missing} (expected the judge-prompt parquet of `rmr1 prepare`)")
    table = pq.read_table(path, columns=list(INPUT_COLUMNS))
    if limit is not None:
        table = table.slice(0, limit)
    return table.to_pylist()


def select_rows(rows: list[dict], done: set[str]) -> tuple[list[dict], list[dict], dict[str, int]]:
    """(rows to send, malformed rows with their `reason`, counts): rows an earlier run finished
    (uid in `done`) are skipped, a uid seen twice is sent once, malformed rows are set aside."""
    todo, malformed, seen = [], [], set()
    counts = {"read": len(rows), "already_done": 0, "duplicate_uid": 0, "malformed": 0}
    for row in rows:
        problem = input_problem(row)
        if problem is not None:
            counts["malformed"] += 1
            malformed.append({"uid": row["uid"], "pass": 0, "reason": f"malformed input: {problem}"})
        elif row["uid"] in done:
            counts["already_done"] += 1
        elif row["uid"] in seen:
            counts["duplicate_uid"] += 1
        else:
            seen.add(row["uid"])
            todo.append(row)
    return todo, malformed, counts


def finished_uids(out_dir: Path) -> set[str]:
    """Rows an earlier run finished (kept or rejected); failed rows are not finished."""
    return read_uids(out_dir / CHAINS_FILE) | read_uids(out_dir / REJECTED_FILE)
