"""Connecting a job to Ray: one place, so every job behaves the same on a laptop and on a cluster."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from pathlib import Path

import ray

# Threads per worker process: Ray runs one task per CPU, so library thread pools (OpenMP, the
# tokenizers' Rayon pool) would only oversubscribe the cores. A value set by the user wins.
WORKER_ENV_DEFAULTS = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def default_torch_extensions_dir() -> str:
    """DeepSpeed JIT-builds its shared-memory comm op (~30-55 s) into $TORCH_EXTENSIONS_DIR on its first
    init_distributed; this stable default makes every later actor, job and test run reuse the build. One
    folder per Python environment: a build is tied to its torch, and two venvs sharing one folder would
    rebuild it each time the other one ran."""
    env = hashlib.sha256(sys.prefix.encode()).hexdigest()[:12]
    return str(Path("~/.cache/rmr1-ray/torch_extensions").expanduser() / env)


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to `address` (else RAY_ADDRESS), or start a local cluster with `num_cpus` CPUs
    (also when `address` is "local", whatever RAY_ADDRESS says: what tests use).

    Idempotent: does nothing when Ray is already initialised (tests and callers that set Ray up
    themselves keep their cluster). A local cluster binds to 127.0.0.1 and runs no dashboard.
    """
    if ray.is_initialized():
        return
    # Under `ray job submit`, env vars the job's own runtime env sets win; repeating them in
    # ray.init makes Ray refuse to merge the two runtime envs.
    job_env = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("runtime_env", {}).get("env_vars", {})
    env_vars = {key: os.environ.get(key, value) for key, value in WORKER_ENV_DEFAULTS.items() if key not in job_env}
    common = {"runtime_env": {"env_vars": env_vars}, "logging_level": logging.WARNING}
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        ray.init(address=address, **common)
    else:
        common["runtime_env"]["worker_process_setup_hook"] = "rmr1_ray.local_worker_setup.setup_worker"
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1", **common)
