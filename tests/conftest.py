"""Loopback only, for every test: the environment that pins Ray, gloo and vLLM to 127.0.0.1 is set before
anything imports `ray`, and every integration or end-to-end test runs under a socket watch that fails
it when a process it started binds or connects to another address (see loopback.py)."""

from __future__ import annotations

from loopback import apply_loopback_env

apply_loopback_env()  # before `ray` is imported: Ray reads it into a module constant

import os  # noqa: E402
import subprocess  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from loopback import LoopbackWatch  # noqa: E402
from ray._private import ray_constants  # noqa: E402

assert not ray_constants.ENABLE_RAY_CLUSTER, "ray was imported before tests/conftest.py set the loopback env"


@pytest.fixture(autouse=True)
def loopback_only(request):
    if not any(request.node.get_closest_marker(m) for m in ("integration", "e2e")):
        yield
        return
    with LoopbackWatch() as watch:
        yield
    assert not watch.violations, "sockets off loopback:\n" + "\n".join(watch.violations[:20])


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size) -> a fresh tmpfs of that size ("1m", "3m"): a real disk that fills up. Root only."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        path = tmp_path / f"disk{len(mounted)}"
        path.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                              text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", str(path)], check=True)


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """build(dtype) -> the SmolLM2-135M-Instruct directory made by `rmr1 make-smollm2` (a subprocess: the command
    users run), converted once per session and dtype and reused by every real-model test after that."""
    import sys

    root = tmp_path_factory.mktemp("smollm2")

    def build(dtype: str = "float32") -> Path:
        out = root / dtype
        done = subprocess.run([sys.executable, "-m", "rmr1_ray.cli", "make-smollm2", "--out", str(out), "--dtype", dtype],
                              capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert done.returncode == 0, f"rmr1 make-smollm2 failed:\n{done.stdout}\n{done.stderr}"
        print(done.stdout.strip())
        return out

    return build
