"""Loopback only: what keeps every test's traffic on 127.0.0.1, and the watch that proves it.

Ray 2.60 rewrites a node IP of 127.0.0.1 (`ray.init(_node_ip_address=...)`, `ray start
--node-ip-address=...`) to the machine's interface address unless Ray is told the machine is a
single-node host: `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` (ray_constants.ENABLE_RAY_CLUSTER, read when
`ray` is imported). Then `get_node_ip_address()` is 127.0.0.1, and Ray's gRPC servers, its agents and
the workers bind 127.0.0.1 only. gloo picks its interface from GLOO_SOCKET_IFNAME (else from the
hostname), vLLM its internal sockets from VLLM_HOST_IP. Every process the tests start inherits these.

`ray start` refuses to add a worker node while that setting is off; tests that need a second node
start it the way Ray's own fake multi-node provider does (tests/integration/test_cluster.py).

One listener cannot be pinned: every Ray Serve 2.60 replica serves its inter-deployment gRPC on "[::]:0",
hard-coded (ray/serve/_private/replica.py, `_on_initialized`), with no setting. Its peers reach it at the
node IP (127.0.0.1), so no traffic leaves loopback; the watch accepts that listener and nothing else.
"""

from __future__ import annotations

import ipaddress
import os
import threading
from collections.abc import Callable, Iterable

import psutil

LOOPBACK_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "GLOO_SOCKET_IFNAME": "lo",
    "VLLM_HOST_IP": "127.0.0.1",
}


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


SERVE_REPLICA_TITLE = "ray::ServeReplica:"  # the process title of a Serve replica


def _title(pid: int) -> str:
    try:
        return " ".join(psutil.Process(pid).cmdline()).strip()
    except psutil.Error:
        return "?"


def foreign_sockets(pids: Iterable[int]) -> list[str]:
    """The inet sockets of `pids` bound to, listening on or connected to a non-loopback address
    (a socket on 0.0.0.0 or :: counts: it listens on every interface)."""
    pids = set(pids)
    found = []
    for conn in psutil.net_connections(kind="inet"):
        if conn.pid not in pids:
            continue
        ends = [("local", conn.laddr)] if conn.laddr and conn.laddr.port else []
        ends += [("remote", conn.raddr)] if conn.raddr else []
        for end, addr in ends:
            if is_loopback(addr.ip):
                continue
            title = _title(conn.pid)
            serve_grpc = (end == "local" and conn.status == psutil.CONN_LISTEN and addr.ip == "::"
                          and title.startswith(SERVE_REPLICA_TITLE))
            if not serve_grpc:
                found.append(f"pid {conn.pid} ({title[:100]}): {conn.status} {end} {addr.ip}:{addr.port}")
    return found


def descendants() -> set[int]:
    me = psutil.Process()
    return {me.pid, *(child.pid for child in me.children(recursive=True))}


class LoopbackWatch:
    """Samples the sockets of `pids()` every `interval_s` in a thread until stopped; `violations`
    collects every socket that was not on loopback."""

    def __init__(self, pids: Callable[[], set[int]] = descendants, interval_s: float = 0.5) -> None:
        self.pids, self.interval_s = pids, interval_s
        self.violations: list[str] = []
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="loopback-watch")

    def _run(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self.interval_s):
                return

    def sample(self) -> None:
        try:
            found = foreign_sockets(self.pids())
        except (psutil.Error, OSError):  # a process ended while we looked
            return
        self.samples += 1
        self.violations.extend(v for v in found if v not in self.violations)

    def __enter__(self) -> LoopbackWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.sample()


def apply_loopback_env() -> None:
    """Set LOOPBACK_ENV in this process (before `ray` is imported), whatever the caller's shell had."""
    os.environ.update(LOOPBACK_ENV)
