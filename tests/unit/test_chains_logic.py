"""Chain generator logic with real files and a real (scripted) HTTP teacher: retries and backoff,
the two passes, where every row ends up, resume without duplicates, a crash-truncated result file."""

from __future__ import annotations

import json
import random
from collections import Counter
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import pytest
from servers import ChatServer, chat_response, write_prompt_rows

from jobs.generate_chains import main
from rmr1_ray.chains import CORRECTION_PROMPT, JsonlWriter, correction_messages, read_uids, select_rows
from rmr1_ray.data.sft import parse_chain
from rmr1_ray.synthetic import reasoning_chain
from rmr1_ray.teacher import backoff_s, retry_after_s

pytestmark = pytest.mark.unit

EARLIER = "[The Start of the Earlier Judgement]"
OTHER = {"A": "B", "B": "A"}


def test_backoff_doubles_with_jitter_and_cap():
    rng = random.Random(0)
    for retry in range(8):
        nominal = min(10.0, 0.5 * 2**retry)
        waits = [backoff_s(retry, 0.5, 10.0, rng) for _ in range(200)]
        assert all(nominal / 2 <= w <= nominal for w in waits)
        assert max(waits) - min(waits) > nominal / 4  # jittered, not constant


def test_retry_after_seconds_and_http_date():
    assert retry_after_s("3") == 3.0
    assert retry_after_s(" 0.5 ") == 0.5
    assert retry_after_s("-4") == 0.0
    assert retry_after_s(None) is None
    assert retry_after_s("soon") is None
    now = datetime(2025, 5, 1, 12, 0, 0, tzinfo=UTC)
    date = format_datetime(now + timedelta(seconds=7), usegmt=True)
    assert retry_after_s(date, now=now.timestamp()) == pytest.approx(7.0)


def test_correction_prompt_carries_label_and_flawed_chain():
    messages = [{"role": "system", "content": "rules"}, {"role": "user", "content": "the pair"}]
    fixed = correction_messages(messages, "model_b", "my flawed chain <answer>[[A]]</answer>")
    assert messages[1]["content"] == "the pair"  # the original prompt is not modified
    assert fixed[0] == messages[0]
    assert fixed[1]["role"] == "user"
    assert fixed[1]["content"] == "the pair" + CORRECTION_PROMPT.format(
        label="B", other="A", chain="my flawed chain <answer>[[A]]</answer>")
    assert "[[B]]" in fixed[1]["content"] and "my flawed chain" in fixed[1]["content"]


def test_read_uids_repairs_a_truncated_last_line(tmp_path):
    path = tmp_path / "chains.jsonl"
    path.write_text('{"uid": "a"}\n{"uid": "b"}\n{"uid": "c", "cha')  # killed mid-write
    assert read_uids(path) == {"a", "b"}
    assert path.read_text() == '{"uid": "a"}\n{"uid": "b"}\n'  # the next append starts a fresh line
    path.write_text('{"uid": "a"}\n{"uid": "b"}')  # complete record, newline lost
    assert read_uids(path) == {"a", "b"}
    assert path.read_text().endswith('{"uid": "b"}\n')
    path.write_text('{"uid": "a"}\nnot json\n{"uid": "b"}\n')  # damage inside: refuse to guess
    with pytest.raises(ValueError, match=":2:"):
        read_uids(path)
    assert read_uids(tmp_path / "missing.jsonl") == set()


def test_writer_never_appends_to_half_a_line(tmp_path):
    path = tmp_path / "failures.jsonl"
    path.write_text('{"uid": "a", "reason": "x"}\n{"uid": "b", "rea')
    writer = JsonlWriter(path)
    writer.write({"uid": "c", "reason": "y"})
    writer.close()
    assert [json.loads(line)["uid"] for line in path.read_text().splitlines()] == ["a", "c"]


def test_select_rows_skips_done_duplicates_and_malformed():
    user = [{"role": "user", "content": "q"}]
    rows = [
        {"uid": "done", "messages": user, "winner": "model_a", "source": "s"},
        {"uid": "new", "messages": user, "winner": "model_b", "source": "s"},
        {"uid": "new", "messages": user, "winner": "model_b", "source": "s"},
        {"uid": "bad", "messages": user, "winner": "tie", "source": "s"},
        {"uid": "ends-assistant", "messages": [*user, {"role": "assistant", "content": "a"}], "winner": "model_a",
         "source": "s"},
    ]
    todo, malformed, counts = select_rows(rows, {"done"})
    assert [r["uid"] for r in todo] == ["new"]
    assert [m["uid"] for m in malformed] == ["bad", "ends-assistant"]
    assert "winner" in malformed[0]["reason"] and "user message" in malformed[1]["reason"]
    assert counts == {"read": 5, "already_done": 1, "duplicate_uid": 1, "malformed": 2}


# --- the whole job against a scripted teacher ---------------------------------------------------------

SCRIPTS = ["right", "fix", "never", "format", "bad_request", "flaky"]


class ScriptedTeacher:
    """Answers each row by its script; knows the row from the question in the prompt."""

    def __init__(self, rows: list[dict]) -> None:
        self.by_question = {row["item"].question: (script, row) for script, row in zip(SCRIPTS, rows, strict=True)}
        self.calls: Counter = Counter()

    async def __call__(self, n: int, body: dict) -> tuple[int, dict, dict]:
        content = body["messages"][-1]["content"]
        script, row = next(v for q, v in self.by_question.items() if q in content)
        self.calls[row["uid"]] += 1
        label = "A" if row["winner"] == "model_a" else "B"
        right, wrong = reasoning_chain(row["item"], label), reasoning_chain(row["item"], OTHER[label])
        second = EARLIER in content
        if script == "bad_request":
            return 400, {"error": {"message": "prompt too long"}}, {}
        if script == "flaky" and self.calls[row["uid"]] == 1:
            return 503, {"error": {"message": "overloaded"}}, {}
        if script == "flaky" and self.calls[row["uid"]] == 2:
            return 429, {"error": {"message": "slow down"}}, {"Retry-After": "0.2"}
        text = {
            "right": right,
            "flaky": right,
            "fix": right if second else wrong,
            "never": wrong,
            "format": right if second else f"I pick [[{label}]]",  # right verdict, no chain-of-rubrics
        }[script]
        return 200, chat_response(text, prompt_tokens=100, completion_tokens=50), {}


def job_args(url: str, data: Path, out: Path, **extra: str) -> list[str]:
    args = {
        "teacher.base_url": url, "teacher.model": "scripted", "teacher.max_tokens": "512",
        "teacher.price_input_per_mtok": "2.0", "teacher.price_output_per_mtok": "8.0",
        "retry.initial_backoff_s": "0.01", "retry.max_backoff_s": "1", "retry.max_attempts": "4",
        "input_path": str(data), "output_dir": str(out), "concurrency": "3", "max_failure_fraction": "0.5",
        **extra,
    }
    return [f"{key}={value}" for key, value in args.items()]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_two_passes_outcomes_retries_cost_and_resume(tmp_path):
    data, out = tmp_path / "prompts.parquet", tmp_path / "out"
    rows = write_prompt_rows(data, len(SCRIPTS), seed=3)
    uid = {script: row["uid"] for script, row in zip(SCRIPTS, rows, strict=True)}
    teacher = ScriptedTeacher(rows)
    with ChatServer(teacher) as server:
        assert main(job_args(server.url, data, out)) == 0

        kept = {r["uid"]: r for r in read_jsonl(out / "chains.jsonl")}
        assert set(kept) == {uid["right"], uid["fix"], uid["format"], uid["flaky"]}
        assert {u: kept[u]["pass"] for u in kept} == {uid["right"]: 1, uid["flaky"]: 1, uid["fix"]: 2, uid["format"]: 2}
        by_uid = {row["uid"]: row for row in rows}
        for u, record in kept.items():  # the SFT loader's contract: the ORIGINAL prompt, the label, the chain
            assert set(record) == {"uid", "messages", "winner", "chain", "source", "pass", "usage"}
            assert record["messages"] == by_uid[u]["messages"] and record["winner"] == by_uid[u]["winner"]
            assert record["usage"]["prompt_tokens"] == 100 * record["pass"]
            assert parse_chain(record, require_valid_format=True)["response"] == record["chain"]  # `rmr1 prepare` takes it
        rejected = read_jsonl(out / "rejected.jsonl")
        assert [r["uid"] for r in rejected] == [uid["never"]]
        assert [a["reason"] for a in rejected[0]["attempts"]] == ["wrong verdict " + OTHER[rows[2]["winner"][-1].upper()]] * 2
        failures = read_jsonl(out / "failures.jsonl")
        assert [(f["uid"], f["pass"]) for f in failures] == [(uid["bad_request"], 1)]
        assert "HTTP 400" in failures[0]["reason"]

        # pass 2 saw the label and the flawed pass-1 chain
        fix_row = rows[1]
        label = "A" if fix_row["winner"] == "model_a" else "B"
        second = [e for e in server.exchanges if EARLIER in e["request"]["messages"][-1]["content"]
                  and fix_row["item"].question in e["request"]["messages"][-1]["content"]]
        assert len(second) == 1
        content = second[0]["request"]["messages"][-1]["content"]
        assert f"The correct verdict for this example is [[{label}]]" in content
        assert reasoning_chain(fix_row["item"], OTHER[label]) in content

        stats = json.loads((out / "stats.json").read_text())
        assert stats["passes"]["1"] == {
            "sent": 6, "answered": 5, "correct": 3, "format_valid": 4, "kept": 2, "failed": 1,
            "prompt_tokens": 500, "completion_tokens": 250, "cost_usd": 0.003,
        }
        assert {k: stats["passes"]["2"][k] for k in ("sent", "answered", "correct", "kept", "failed")} == {
            "sent": 3, "answered": 3, "correct": 2, "kept": 2, "failed": 0}
        assert stats["requests"]["retries"] == {"429": 1, "503": 1}
        assert stats["requests"]["retry_wait_s"] >= 0.2  # Retry-After honoured
        assert stats["cost_usd"] == pytest.approx(8 * 0.0006)
        assert stats["rows"] == {"kept": 4, "rejected": 1, "failed": 1}

        # rerun: only the failed row is sent again; nothing is written twice
        before = len(server.exchanges)
        assert main(job_args(server.url, data, out)) == 1  # 1 failed of 1 sent > 0.5
        assert [e["request"]["messages"][-1]["content"] for e in server.exchanges[before:]] == [
            rows[4]["messages"][-1]["content"]]
        stats = json.loads((out / "stats.json").read_text())
        assert stats["input"] == {"read": 6, "already_done": 5, "duplicate_uid": 0, "malformed": 0, "sent": 1}
        all_uids = [r["uid"] for r in read_jsonl(out / "chains.jsonl") + read_jsonl(out / "rejected.jsonl")]
        assert sorted(all_uids) == sorted(set(all_uids)) and len(all_uids) == 5


def test_auth_error_stops_the_job(tmp_path):
    data, out = tmp_path / "prompts.parquet", tmp_path / "out"
    write_prompt_rows(data, 5, seed=1)

    async def unauthorized(n: int, body: dict) -> tuple[int, dict, dict]:
        return 401, {"error": {"message": "invalid api key"}}, {}

    with ChatServer(unauthorized) as server:
        assert main(job_args(server.url, data, out, concurrency="1")) == 1
    stats = json.loads((out / "stats.json").read_text())
    assert "HTTP 401" in stats["fatal"]
    assert stats["requests"]["attempts"] == 1  # no retries, no further rows
    assert read_uids(out / "chains.jsonl") == set() and read_uids(out / "rejected.jsonl") == set()
