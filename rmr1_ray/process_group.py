"""torch.distributed groups whose rendezvous listens only on rank 0's node address.

Every group we form (the learner's ZeRO ranks, the SFT ranks, learner rank 0 + the rollout engines for
weight sync) meets through a c10d TCPStore that rank 0 serves. torch's own `init_method="tcp://..."` or
`env://` makes that server listen on every interface of the machine, whatever address it was given; on
a laptop that opens a port to the network, and tests may use loopback only. Here rank 0 binds a socket
to its node's address first (`Rendezvous.open`) and hands it to the store (`master_listen_fd`), which
also removes the race between picking a free port and binding it.

The backend (NCCL on GPU, gloo on CPU) is the caller's choice; nothing else differs. gloo's own
connections use the interface named by GLOO_SOCKET_IFNAME (else the one the hostname resolves to).
"""

from __future__ import annotations

import datetime
import random
import socket
from dataclasses import dataclass

import torch.distributed as dist

DEFAULT_TIMEOUT = datetime.timedelta(minutes=30)


@dataclass
class Rendezvous:
    """Where a group meets: rank 0's node address and a port it already listens on."""

    address: str
    port: int
    listener: socket.socket | None = None  # rank 0 only; never pickled to the other ranks

    @classmethod
    def open(cls, address: str) -> Rendezvous:
        """Rank 0: bind a free port on `address` (this node's IP, as the other ranks reach it)."""
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.bind((address, 0))
        listener.listen()
        return cls(address, listener.getsockname()[1], listener)

    def endpoint(self) -> tuple[str, int]:
        """What the other ranks are told."""
        return self.address, self.port

    def store(self, rank: int, world_size: int, timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> dist.TCPStore:
        """Rank 0 serves the store on its listening socket (once: the store takes the socket over and
        closes it when it is destroyed); the others connect to it."""
        fd = None
        if rank == 0:
            if self.listener is None:
                raise RuntimeError("rank 0 serves the store once, from the socket it opened (Rendezvous.open)")
            fd, self.listener = self.listener.detach(), None
        return dist.TCPStore(self.address, self.port, world_size, rank == 0, timeout, master_listen_fd=fd)


# Ports for services that must be told their port before they bind it (Serve's HTTP proxy, test servers):
# below Linux's ephemeral range (32768-60999), where the ports of sockets bound to port 0 come from, and
# above Ray's worker ports (10002-19999), so that nothing starting meanwhile takes the port first.
SERVICE_PORTS = range(20000, 32000)


def free_port(address: str = "127.0.0.1") -> int:
    """A TCP port on `address` that is free now, from SERVICE_PORTS."""
    for port in random.sample(SERVICE_PORTS, 200):
        with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((address, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {SERVICE_PORTS} on {address}")


def init_default_group(backend: str, rendezvous: Rendezvous, rank: int, world_size: int) -> None:
    """torch.distributed's default group (what DeepSpeed and our collectives use) through `rendezvous`."""
    store = rendezvous.store(rank, world_size)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=DEFAULT_TIMEOUT)
