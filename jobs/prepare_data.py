"""`rmr1 prepare`: preference datasets -> judge prompts (parquet), teacher chains -> SFT rows.

Reads top to bottom: connect to Ray; pass 1 over every source (parse, validate, measure, in
parallel); decide on the driver (dedup, length, split, positions); write rejects.jsonl and stop
if a source is mostly broken; pass 2 (render, write parquet); write stats.json and a summary.

Outputs under output_dir: train/ and val/ (judge prompts), sft/train/ and sft/val/ (chains),
rejects.jsonl (every malformed row: source, file, row, reason, detail), stats.json and
config.resolved.yaml.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from rmr1_ray.config import job_parser, parse_job_config, save_resolved
from rmr1_ray.config.prepare import PrepareConfig
from rmr1_ray.data import preference, sft
from rmr1_ray.data.outcomes import over_threshold, summary_lines, write_rejects
from rmr1_ray.data.pipeline import cluster_cpus
from rmr1_ray.data.readers import ReadError
from rmr1_ray.ray_utils import init_ray

EXAMPLE = "rmr1 prepare --config configs/tiny-cpu/prepare.yaml output_dir=runs/tiny-cpu/data"
log = logging.getLogger("rmr1_ray.prepare")


def _log_to_stderr() -> None:
    """Our progress lines (rmr1_ray.* loggers) on stderr; other libraries keep their own logging."""
    package = logging.getLogger("rmr1_ray")
    if not package.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[prepare] %(message)s"))
        package.addHandler(handler)
    package.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    parser = job_parser("rmr1 prepare", __doc__, PrepareConfig, EXAMPLE)
    config, _ = parse_job_config(parser, PrepareConfig, argv)
    _log_to_stderr()
    started = time.perf_counter()
    out = Path(config.output_dir)
    save_resolved(config, out)
    init_ray(config.ray_address)
    concurrency = config.concurrency or cluster_cpus()

    # Pass 1 and the driver's decisions; nothing is written to train/val yet.
    try:
        prefs = preference.plan(config, concurrency) if config.sources else None
        chains = sft.plan(config, concurrency) if config.chain_sources else None
    except ReadError as exc:
        sys.stderr.write(f"rmr1 prepare: {exc}\n")
        return 1
    log.info("pass 1 (parse, validate, measure) done at %.1f s", time.perf_counter() - started)
    triages = [plan.triage for plan in (prefs, chains) if plan is not None]
    write_rejects(out / "rejects.jsonl", [reject for t in triages for reject in t.rejects])
    failure = over_threshold({name: s for t in triages for name, s in t.stats.items()}, config.max_reject_fraction)

    # Pass 2: only when every source is healthy enough (a failed run leaves earlier outputs as they were).
    if failure is None and prefs is not None:
        preference.write(prefs, out, config, concurrency)
    if failure is None and chains is not None:
        sft.write(chains, out / "sft", concurrency)

    elapsed = time.perf_counter() - started
    if failure is None:
        log.info("pass 2 (render, write) done at %.1f s", elapsed)
    stats = {
        "preference": preference.report(prefs) if prefs is not None else None,
        "sft": sft.report(chains) if chains is not None else None,
        "failed": failure,
        "elapsed_s": round(elapsed, 2),
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")

    read = sum(section["rows"]["read"] for section in (stats["preference"], stats["sft"]) if section)
    print(f"{'checked' if failure else 'prepared'} {read} rows in {elapsed:.1f} s ({read / elapsed:.0f} rows/s) -> {out}")
    for name in ("preference", "sft"):
        if stats[name]:
            print(f"{name}:\n" + "\n".join(summary_lines(stats[name])))
    if failure:
        sys.stderr.write(f"rmr1 prepare: failed: {failure}\n")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
