"""Rows/s of `rmr1 prepare`'s preference pipeline (Ray Data) against a plain one-process loop.

    OMP_NUM_THREADS=1 python benchmarks/bench_prepare.py [--rows 20000 40000] [--words 120]

Both sides do the same work with the same functions on the same synthetic files (the four source
schemas, equal shares): readers.read_table; preference.parse_batch (JSON parse, adapter,
validation, uid, render, chat template, one batched fast-tokenizer call per batch);
preference.decide (dedup, length filter, split, balanced positions); preference.render_batch;
a parquet write. The loop calls them batch by batch in this process, with the tokenizers'
own thread pool off (TOKENIZERS_PARALLELISM=false), so it uses one core. The pipeline is the
job's own code (preference.plan + preference.write) on a local Ray cluster with all CPUs.

Not timed: starting Ray, building the tiny tokenizer, writing the input files, and one small
warm-up run of each side (it imports transformers and loads the tokenizer in every worker
process, ~5 s once per process; Ray keeps task workers, so later runs reuse them).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq

from rmr1_ray.config.prepare import PrepareConfig
from rmr1_ray.data import preference, samples
from rmr1_ray.data.pipeline import cluster_cpus
from rmr1_ray.data.readers import read_table
from rmr1_ray.ray_utils import init_ray
from rmr1_ray.tiny import make_tiny

KINDS = {"skywork": (samples.skywork_rows, samples.write_jsonl, "jsonl"),
         "code_pref": (samples.code_pref_rows, samples.write_jsonl, "jsonl"),
         "math_step_dpo": (samples.math_step_dpo_rows, samples.write_parquet, "parquet"),
         "pairwise": (samples.pairwise_rows, samples.write_json, "json")}


def make_config(root: Path, tokenizer: str, rows: int, words: int, batch_size: int) -> PrepareConfig:
    """Write `rows` synthetic rows (a quarter per schema) and the config that reads them."""
    sources = []
    for i, (kind, (make_rows, write, suffix)) in enumerate(KINDS.items()):
        path = write(root / f"{rows}" / f"{kind}.{suffix}", make_rows(rows // len(KINDS), seed=i, words=words))
        sources.append({"name": kind, "kind": kind, "path": str(path), "drop_sources": []})
    return PrepareConfig.model_validate({
        "output_dir": str(root / f"out-{rows}"), "tokenizer": {"path": tokenizer}, "sources": sources,
        "max_prompt_length": 8192, "batch_size": batch_size,
    })


def loop_prepare(config: PrepareConfig, out: Path) -> int:
    """The same work in one process: the pipeline's functions, called batch by batch."""
    outcomes, reads = [], {}
    for source in config.sources:
        table = read_table(source.path, source.split, source.sample_size, source.seed)
        reads[source.name] = table.num_rows
        options = preference.parse_options(source, config)
        for start in range(0, table.num_rows, config.batch_size):
            outcomes.append(preference.parse_batch(table.slice(start, config.batch_size), **options))
    prepared = preference.decide(pa.concat_tables(outcomes), reads, config)
    for split, table in prepared.splits.items():
        (out / split).mkdir(parents=True, exist_ok=True)
        rendered = [preference.render_batch(table.slice(start, config.batch_size), prompt_format=config.prompt_format)
                    for start in range(0, table.num_rows, config.batch_size)]
        pq.write_table(pa.concat_tables(rendered) if rendered else preference.OUTPUT_SCHEMA.empty_table(),
                       out / split / "part-0.parquet")
    return sum(reads.values())


def ray_prepare(config: PrepareConfig, out: Path, concurrency: int) -> int:
    """The job's pipeline: pass 1 on Ray Data, the driver's decisions, pass 2 on Ray Data."""
    prepared = preference.plan(config, concurrency)
    preference.write(prepared, out, config, concurrency)
    return sum(s.read for s in prepared.triage.stats.values())


def cpu_seconds() -> float:
    """CPU time of this process and its descendants: the local Ray cluster (raylet, workers) is one of them."""
    total = 0.0
    for process in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = process.cpu_times()
            total += times.user + times.system
    return total


def timed(fn, *args) -> tuple[float, float, int]:
    """(wall s, CPU s, rows): CPU seconds do not depend on what else runs on the machine, wall seconds do."""
    started, cpu = time.perf_counter(), cpu_seconds()
    rows = fn(*args)
    return time.perf_counter() - started, cpu_seconds() - cpu, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[20000, 40000])
    parser.add_argument("--words", type=int, default=120, help="words per answer (question: half)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--cpus", type=int, default=None, help="local Ray cluster CPUs (default: all)")
    parser.add_argument("--repeat", type=int, default=1, help="best of N alternating runs per side (busy machines)")
    args = parser.parse_args()
    # One thread per process on both sides (torch and the tokenizers read these when first used; Ray
    # workers inherit them through init_ray), so the loop is one core and the pipeline one task per CPU.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    load_at_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_prepare_") as tmp:
        root = Path(tmp)
        tokenizer = str(make_tiny(root / "tiny"))
        started = time.perf_counter()
        init_ray(num_cpus=args.cpus)
        print(f"ray start: {time.perf_counter() - started:.1f} s (not timed below)")
        cpus = cluster_cpus()
        warm = make_config(root, tokenizer, 2000, args.words, args.batch_size)
        loop_prepare(warm, root / "warm-loop")
        ray_prepare(warm, root / "warm-ray", cpus)

        results = []
        for rows in args.rows:
            config = make_config(root, tokenizer, rows, args.words, args.batch_size)
            loop_runs, ray_runs = [], []
            for _ in range(args.repeat):  # alternate, so that a burst of load elsewhere hits both sides
                loop_runs.append(timed(loop_prepare, config, root / f"loop-{rows}"))
                ray_runs.append(timed(ray_prepare, config, root / f"ray-{rows}", cpus))
                assert loop_runs[-1][2] == ray_runs[-1][2] == rows, (loop_runs[-1], ray_runs[-1], rows)
            results.append((rows, min(loop_runs), min(ray_runs)))

    print(f"\npreference pipeline, {args.words}-word answers, batch {args.batch_size}, Ray CPUs {cpus}, "
          f"os.cpu_count() {os.cpu_count()}, best of {args.repeat}, load average at start {load_at_start:.1f}, "
          f"at end {os.getloadavg()[0]:.1f}")
    print(f"{'rows':>7} {'loop s':>8} {'loop rows/s':>12} {'ray s':>8} {'ray rows/s':>11} {'speedup':>8}"
          f" {'loop cpu s':>11} {'ray cpu s':>10} {'ray cores':>10}")
    for rows, (loop_s, loop_cpu, _), (ray_s, ray_cpu, _) in results:
        print(f"{rows:>7} {loop_s:>8.2f} {rows / loop_s:>12.0f} {ray_s:>8.2f} {rows / ray_s:>11.0f} {loop_s / ray_s:>7.2f}x"
              f" {loop_cpu:>11.1f} {ray_cpu:>10.1f} {ray_cpu / ray_s:>10.2f}")
    if len(results) > 1:
        (r0, (l0, _, _), (y0, _, _)), (r1, (l1, _, _), (y1, _, _)) = results[0], results[-1]
        print(f"time({r1}) / time({r0}) for {r1 / r0:.1f}x the rows: loop {l1 / l0:.2f}, ray {y1 / y0:.2f}")
    print("cpu s: CPU time of this process and its Ray processes (driver, raylet, workers) during the run;\n"
          "ray cores: ray cpu s / ray s, the cores the pipeline actually got (other work on the machine takes the rest)")


if __name__ == "__main__":
    main()
