"""Learner -> rollout weight sync through the Ray object store.

Every learner rank takes part in gathering the ZeRO-3 shards (a collective); rank 0 returns the full
state dict as numpy arrays, which Ray stores once. The driver hands that ObjectRef, never the data,
to every rollout worker's load_weights; Ray resolves it there zero-copy (numpy, not torch: ~10x
faster to put and get). The ref is also remembered by the rollout group, so a restarted worker
loads the current weights before it generates again.

On GPU clusters an NCCL broadcast from learner rank 0 to the engines (rollout.weight_sync=nccl) avoids
the host round trip; it is a later step, behind this same function.
"""

from __future__ import annotations

import time
from typing import Any

import ray


def sync_weights(learner: Any, rollout: Any) -> dict[str, float]:
    """learner, rollout: ActorGroups of PolicyLearner and RolloutWorker. Returns timings and size."""
    start = time.perf_counter()
    state_refs = learner.call_all("gather_state_dict")
    ray.wait(state_refs, num_returns=len(state_refs), fetch_local=False)  # ready, but not pulled here
    gathered = time.perf_counter()
    _, loads = rollout.run("load_weights", [state_refs[0]] * rollout.num_workers)
    rollout.remember("load_weights", state_refs[0])
    return {
        "sync/gather_s": gathered - start,
        "sync/load_s": time.perf_counter() - gathered,
        "sync/megabytes": loads[0]["bytes"] / 2**20,
        "time/sync": time.perf_counter() - start,
    }
