"""`rmr1 chains`: two-pass reasoning-chain generation with an OpenAI-compatible teacher (RM-R1 distillation data).

Reads top to bottom: read the prepared judge prompts; skip the rows an earlier run finished; pass 1
(zero-shot judge prompt) and, for chains with a wrong verdict or a broken format, pass 2 (the prompt
plus the correct verdict and the flawed chain); write each finished row at once; report per-pass stats.

The teacher is any server with an OpenAI-compatible POST /v1/chat/completions: OpenAI (teacher.api_key_env:
OPENAI_API_KEY), Anthropic (configs/rm-r1/chains.yaml), or a local vLLM server started with
    python -m vllm.entrypoints.openai.api_server --model DIR --host 127.0.0.1 --port 8000
(teacher.base_url: http://127.0.0.1:8000/v1, teacher.model: DIR or its --served-model-name).

Outputs under output_dir: chains.jsonl (kept chains, the input of `rmr1 prepare`'s chain_sources),
rejected.jsonl, failures.jsonl, stats.json, config.resolved.yaml. Rerun the same command to resume:
finished rows are skipped, failed ones are sent again.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path

from rmr1_ray.chains import (
    CHAINS_FILE,
    FAILURES_FILE,
    REJECTED_FILE,
    Generator,
    JsonlWriter,
    finished_uids,
    read_input,
    read_uids,
    select_rows,
)
from rmr1_ray.config import job_parser, parse_job_config, save_resolved
from rmr1_ray.config.chains import ChainsConfig
from rmr1_ray.teacher import FatalTeacherError, TeacherClient

EXAMPLE = "rmr1 chains --config configs/tiny-cpu/chains.yaml teacher.base_url=http://127.0.0.1:8000/v1"


async def generate(config: ChainsConfig, rows: list[dict], api_key: str | None, out: Path) -> tuple[dict, str | None]:
    """Run the passes over `rows` -> (stats, fatal error or None)."""
    async with TeacherClient(config.teacher, config.retry, config.concurrency, api_key, config.seed) as client:
        generator = Generator(client, config.teacher, out, config.second_pass, config.require_valid_format)
        fatal = None
        try:
            await generator.run(rows)
        except FatalTeacherError as exc:
            fatal = str(exc)
        stats = generator.stats
        return {
            "passes": {str(n): p.as_dict() for n, p in stats.passes.items()},
            "rows": {"kept": stats.kept, "rejected": stats.rejected, "failed": stats.failed},
            "requests": client.stats.as_dict(),
            "cost_usd": round(stats.cost_usd, 6),
        }, fatal


def print_summary(stats: dict) -> None:
    columns = ("sent", "answered", "correct", "format_valid", "kept", "failed", "prompt_tokens", "completion_tokens", "cost_usd")
    print("pass " + " ".join(f"{c:>17}" for c in columns))
    for number, p in stats["passes"].items():
        print(f"{number:>4} " + " ".join(f"{p[c]:>17}" for c in columns))
    requests = stats["requests"]
    print(f"requests: {requests['attempts']} sent, retries {requests['retries']} "
          f"(waited {requests['retry_wait_s']} s), {requests['failed']} gave up; cost ${stats['cost_usd']:.4f}")
    print(f"rows: {json.dumps(stats['input'])}; this run: {json.dumps(stats['rows'])}; files: {json.dumps(stats['files'])}")


def main(argv: list[str] | None = None) -> int:
    parser = job_parser("rmr1 chains", __doc__, ChainsConfig, EXAMPLE)
    config, _ = parse_job_config(parser, ChainsConfig, argv)
    started = time.perf_counter()
    out = Path(config.output_dir)
    save_resolved(config, out)

    api_key = None
    if config.teacher.api_key_env:
        api_key = os.environ.get(config.teacher.api_key_env)
        if not api_key:
            sys.stderr.write(f"rmr1 chains: environment variable {config.teacher.api_key_env} "
                             "(teacher.api_key_env) is not set\n")
            return 2
    try:
        rows = read_input(config.input_path, config.limit)
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"rmr1 chains: cannot read teacher input: {exc}\n")
        return 1

    todo, malformed, counts = select_rows(rows, finished_uids(out))
    failures = JsonlWriter(out / FAILURES_FILE)  # malformed rows are never sent, but never vanish either
    for record in malformed:
        failures.write(record)
    failures.close()
    print(f"rmr1 chains: {len(todo)} rows to send to {config.teacher.model} at {config.teacher.base_url} "
          f"({json.dumps(counts)})", flush=True)

    stats, fatal = asyncio.run(generate(config, todo, api_key, out))
    stats["input"] = {**counts, "sent": len(todo)}
    stats["files"] = {name: len(read_uids(out / name)) for name in (CHAINS_FILE, REJECTED_FILE)}
    stats["elapsed_s"] = round(time.perf_counter() - started, 2)
    stats["fatal"] = fatal
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    print_summary(stats)

    if fatal:
        sys.stderr.write(f"rmr1 chains: stopped: {fatal}\n")
        return 1
    failed = stats["rows"]["failed"] + counts["malformed"]
    if failed > config.max_failure_fraction * max(1, len(todo) + counts["malformed"]):
        sys.stderr.write(f"rmr1 chains: {failed} rows failed, more than max_failure_fraction="
                         f"{config.max_failure_fraction}; see {out / FAILURES_FILE}. Rerun to retry them.\n")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
