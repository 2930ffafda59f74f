"""Loopback only: a local cluster started the way every job starts one (`init_ray`), with two actors in a
gloo process group formed the way every trainer forms one (rmr1_ray.process_group), has every socket on
127.0.0.1. (Every other integration test runs under the same check: tests/conftest.py.)"""

from __future__ import annotations

import psutil
import pytest
import ray
from loopback import descendants, foreign_sockets, is_loopback

from rmr1_ray.ray_utils import init_ray

pytestmark = pytest.mark.integration


def test_a_local_cluster_and_a_gloo_group_use_only_loopback():
    # Defined here, not at module level: Ray pickles a local class by value (workers cannot import tests).
    class GlooRank:
        def __init__(self, rank: int) -> None:
            self.rank = rank

        def rendezvous(self) -> tuple[str, int]:
            from rmr1_ray.process_group import Rendezvous

            self.meeting = Rendezvous.open(ray.util.get_node_ip_address())  # as PolicyLearner's rank 0
            return self.meeting.endpoint()

        def join(self, address: str, port: int) -> float:
            import torch
            import torch.distributed as dist

            from rmr1_ray.process_group import Rendezvous, init_default_group

            meeting = self.meeting if self.rank == 0 else Rendezvous(address, port)
            init_default_group("gloo", meeting, self.rank, 2)
            total = torch.tensor([float(self.rank + 1)])
            dist.all_reduce(total)
            return total.item()

        def sockets(self) -> list[tuple[str, str]]:
            """(local ip, remote ip) of this process's inet sockets, while the group is up."""
            return [(c.laddr.ip, c.raddr.ip if c.raddr else "") for c in psutil.Process().net_connections(kind="inet")]

    init_ray("local", num_cpus=2)
    try:
        assert {node["NodeManagerAddress"] for node in ray.nodes()} == {"127.0.0.1"}
        ranks = [ray.remote(num_cpus=1)(GlooRank).remote(i) for i in range(2)]
        address, port = ray.get(ranks[0].rendezvous.remote())
        assert address == "127.0.0.1"
        assert ray.get([r.join.remote(address, port) for r in ranks]) == [3.0, 3.0]
        gloo = ray.get(ranks[1].sockets.remote())
        assert len(gloo) >= 2 and all(is_loopback(local) for local, _ in gloo), gloo  # gloo pairs + Ray's own
        cluster = descendants()  # GCS, raylet, agents, the two workers: all started by init_ray
        assert len(cluster) >= 5
        assert foreign_sockets(cluster) == []
    finally:
        ray.shutdown()
