"""Serve the judge over HTTP: `python -m jobs.serve_judge --config FILE key=value ...` (also `rmr1 serve`).

    1. connect   to RAY_ADDRESS / ray_address, or start a local Ray cluster
    2. deploy    Serve's HTTP proxy on http.host:http.port, then the judge application
                 (rmr1_ray/serving/app.py: FastAPI ingress -> batched JudgeModel replicas)
    3. serve     print the URL and run until Ctrl-C or SIGTERM; then delete the application

API (OpenAPI at URL/docs): POST /v1/judge, POST /v1/rank, GET /v1/model, GET /healthz, GET /readyz.
Clients: rmr1_ray/serving/client.py (JudgeClient) and, for RL reward functions, serving/reward_fn.py.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from rmr1_ray.config import job_parser, parse_job_config
from rmr1_ray.config.serve import ServeConfig
from rmr1_ray.ray_utils import init_ray

EXAMPLE = "python -m jobs.serve_judge --config configs/tiny-cpu/serve.yaml http.port=8001"


def url_of(config: ServeConfig) -> str:
    host = config.http.host
    if host in ("0.0.0.0", "::"):  # listening everywhere; this machine reaches itself on loopback
        host = "127.0.0.1"
    return f"http://{host}:{config.http.port}{config.http.route_prefix.rstrip('/')}"


def deploy(config: ServeConfig) -> str:
    """Start Serve's proxy and the judge app on the connected Ray cluster; returns the base URL once
    every replica is up (an engine that fails to load fails here)."""
    from ray import serve

    from rmr1_ray.serving.app import build_app

    serve.start(http_options={"host": config.http.host, "port": config.http.port})
    serve.run(build_app(config), name=config.app_name, route_prefix=config.http.route_prefix)
    return url_of(config)


def main(argv: list[str] | None = None) -> int:
    parser = job_parser("python -m jobs.serve_judge", "Serve the judge over HTTP with Ray Serve.", ServeConfig, EXAMPLE)
    config, _ = parse_job_config(parser, ServeConfig, argv)
    key_env = config.http.api_key_env
    if key_env and not os.environ.get(key_env):
        parser.exit(2, f"{parser.prog}: http.api_key_env={key_env}, but ${key_env} is not set; export the key first\n")

    from ray import serve

    # 1. connect
    init_ray(config.ray_address)
    # 2. deploy
    try:
        url = deploy(config)
    except RuntimeError as exc:
        print(f"the judge application failed to start: {exc}", file=sys.stderr)
        return 1
    # 3. serve
    print(f"judge ready at {url}  (docs: {url}/docs; Ctrl-C stops)", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C; `ray job stop` and kill send SIGTERM
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    print("stopping the judge", flush=True)
    # Delete only this application: a shared cluster may serve others.
    serve.delete(config.app_name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
