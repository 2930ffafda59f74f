"""Throughput and latency of the judge service with dynamic batching against without, in one run.

    OMP_NUM_THREADS=1 python benchmarks/bench_serve.py [--requests 64] [--concurrency 16] [--max-tokens 16]
                                                       [--batch-sizes 1 8] [--model DIR]

For each replicas.max_batch_size it deploys the app (jobs/serve_judge.deploy: one JudgeModel replica,
hf engine, the tiny model unless --model is given) on 127.0.0.1, sends a fixed number of POST
/v1/judge requests (single order, greedy, distinct pairs) with a fixed number in flight, and stops.
requests/s = requests / wall time; latencies are per request, seen by the client. The mean batch is
the server's own count (/v1/model), which shows whether requests did share engine calls.

Not timed: starting Ray, building the tiny model, deploying (replicas load the model), and a warm-up
of `concurrency` requests per configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import tempfile
import time

import httpx
import ray
from ray import serve

from jobs.serve_judge import deploy
from rmr1_ray.config.serve import ServeConfig
from rmr1_ray.tiny import make_tiny


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(i: int) -> dict:
    a, b = 3 + i % 50, 7 + i // 50
    return {"question": f"What is {a} + {b}?", "response_a": f"{a} + {b} = {a + b}.", "response_b": f"It is {a + b + 1}."}


async def load(url: str, start: int, requests: int, concurrency: int) -> tuple[float, list[float], int]:
    """(wall seconds, per-request latencies, failures) for `requests` requests, `concurrency` in flight."""
    latencies: list[float] = []
    failures = 0
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def one(i: int) -> None:
            nonlocal failures
            async with gate:
                t = time.perf_counter()
                r = await client.post("/v1/judge", json=request(start + i))
                latencies.append(time.perf_counter() - t)
                failures += r.status_code != 200

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(requests)))
        return time.perf_counter() - t0, latencies, failures


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--batch-wait-s", type=float, default=0.05)
    parser.add_argument("--model", help="HF model directory (default: a tiny random one, built now)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        model = args.model or str(make_tiny(f"{tmp}/model"))
        rows = run(model, args)
    print_table(rows, args.model or "tiny random Qwen2 (rmr1_ray.tiny)", args)


def run(model: str, args: argparse.Namespace) -> list[tuple]:
    threads = os.environ.get("OMP_NUM_THREADS", "1")
    ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="WARNING",
             log_to_driver=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false"}})
    port = free_port()
    rows = []
    try:
        for size in args.batch_sizes:
            config = ServeConfig.model_validate({
                "model": {"path": model},
                "sampling": {"max_new_tokens": args.max_tokens, "temperature": 0.0},
                "replicas": {"max_batch_size": size, "batch_wait_timeout_s": args.batch_wait_s,
                             "max_ongoing_requests": max(size, args.concurrency)},
                "http": {"port": port},
                "limits": {"max_new_tokens": args.max_tokens},
                "app_name": f"bench-batch-{size}",
            })
            url = deploy(config)
            asyncio.run(load(url, 0, args.concurrency, args.concurrency))  # warm-up, not timed
            before = httpx.get(f"{url}/v1/model").json()["batching"]
            wall, latencies, failures = asyncio.run(load(url, 10_000, args.requests, args.concurrency))
            after = httpx.get(f"{url}/v1/model").json()["batching"]
            prompts, batches = after["prompts"] - before["prompts"], after["batches"] - before["batches"]
            rows.append((size, args.requests / wall, percentile(latencies, 50), percentile(latencies, 99),
                         prompts / max(batches, 1), failures))
            serve.delete(config.app_name)
    finally:
        serve.shutdown()
        ray.shutdown()
    return rows


def print_table(rows: list[tuple], model: str, args: argparse.Namespace) -> None:
    threads = os.environ.get("OMP_NUM_THREADS", "1")
    print(f"\njudge service, {args.requests} requests, {args.concurrency} in flight, max_tokens={args.max_tokens}, "
          f"1 replica, hf engine, OMP_NUM_THREADS={threads}, model={model}")
    print(f"{'max_batch_size':>14} {'requests/s':>11} {'p50 ms':>9} {'p99 ms':>9} {'mean batch':>11} {'failed':>7}")
    for size, rps, p50, p99, mean_batch, failures in rows:
        print(f"{size:>14} {rps:>11.2f} {p50 * 1000:>9.0f} {p99 * 1000:>9.0f} {mean_batch:>11.2f} {failures:>7}")
    base = rows[0][1]
    for size, rps, *_ in rows[1:]:
        print(f"max_batch_size={size}: {rps / base:.2f}x the requests/s of max_batch_size={rows[0][0]}")


if __name__ == "__main__":
    main()
