"""ActorGroup: N Ray actors of one plain class, pinned to the bundles of a placement group.

The driver talks to a group, never to single actors:
- `call_all(method, *args)`: the same call on every worker (collective work: learner ranks);
- `dispatch(method, items)` + `collect(calls)`: one item per call, round-robin over the workers;
  collect waits, and when a worker has died it restarts it (same bundle, setup again, replayed
  state such as the current weights) and re-runs that worker's items. Dispatched methods return
  (result, summary) or just a small summary: collect fetches only the summary, which also shows
  whether the call failed, and hands back the result as an ObjectRef.

Placement groups come from rmr1_ray.placement plans; `create_placement_groups` reserves them, and
several groups share one when colocated. Learner ranks and the reference are not restarted: a
ZeRO-3 rank cannot rejoin a running process group (resume from a checkpoint instead).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rmr1_ray.faults import WorkerDied
from rmr1_ray.placement import PlacementError, PlacementPlan
from rmr1_ray.ray_utils import default_torch_extensions_dir


def worker_env(omp_num_threads: int) -> dict[str, str]:
    """Environment of every actor: one thread pool size per actor (Ray places actors by CPU count, so
    library defaults of one thread per core would oversubscribe the node)."""
    return {
        "OMP_NUM_THREADS": str(omp_num_threads),
        "TOKENIZERS_PARALLELISM": "false",
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", default_torch_extensions_dir()),
    }


def create_placement_groups(plans: Sequence[PlacementPlan], prefix: str, timeout_s: float) -> dict[str, PlacementGroup]:
    """Reserve one placement group per plan; returns actor-group name -> its placement group."""
    by_group: dict[str, PlacementGroup] = {}
    created = []
    for plan in plans:
        pg = placement_group(list(plan.bundles), strategy=plan.strategy, name=f"{prefix}{plan.name}")
        created.append(pg)
        try:
            ray.get(pg.ready(), timeout=timeout_s)
        except GetTimeoutError:
            for other in created:
                remove_placement_group(other)
            raise PlacementError(
                f"placement group {plan.name!r} ({len(plan.bundles)} bundles of {plan.bundles[0]}, {plan.strategy}) "
                f"was not placed within {timeout_s:g} s: the resources exist but not free or not on suitable nodes"
            ) from None
        by_group.update({g.name: pg for g in plan.groups})
    return by_group


# Every worker of every group by its actor id: an ActorDiedError names the actor that died, which may
# belong to another group than the call that saw it (a dead learner's result passed to a rewarder).
_MEMBERS: dict[str, tuple[ActorGroup, int]] = {}


def _dead_actor_id(exc: RayActorError) -> str | None:
    cause = exc.cause if isinstance(exc, RayTaskError) else exc  # RayTaskError(ActorDiedError): from an argument
    return getattr(cause, "actor_id", None) or getattr(exc, "actor_id", None)


@dataclass
class Calls:
    """Dispatched calls in flight: item i went to worker `workers[i]` (the handle `handles[i]`)."""

    method: str
    items: list[tuple]
    workers: list[int]
    handles: list[Any]
    refs: list[Any]  # per item: an ObjectRef, or a list of them when num_returns > 1
    num_returns: int


class ActorGroup:
    def __init__(
        self,
        name: str,
        actor_cls: type,
        num_workers: int,
        per_worker: dict[str, float],
        pg: PlacementGroup,
        make_args: Callable[[int], tuple],
        env_vars: dict[str, str],
        prefix: str = "",
        max_restarts: int = 0,
    ) -> None:
        self.name, self.num_workers, self.per_worker = name, num_workers, per_worker
        self.pg, self.make_args, self.env_vars, self.prefix = pg, make_args, env_vars, prefix
        self.max_restarts, self.restarts = max_restarts, 0
        self._remote = ray.remote(actor_cls)
        self._setup_args: tuple = ()
        self._replay: dict[str, Callable[[], tuple]] = {}  # method -> its args, re-applied to a restarted worker
        self.last_call: list[str | None] = [None] * num_workers  # what each worker was last asked to do
        self.actors = [self._create(i) for i in range(num_workers)]

    def actor_name(self, index: int) -> str:
        # A restarted worker gets a new name: the dead one's name may not be released yet.
        suffix = f".{self.restarts}" if self.restarts else ""
        return f"{self.prefix}{self.name}-{index}{suffix}"

    def _create(self, index: int):
        custom = {k: v for k, v in self.per_worker.items() if k not in ("CPU", "GPU")}
        actor = self._remote.options(
            name=self.actor_name(index),
            num_cpus=self.per_worker.get("CPU", 0),
            num_gpus=self.per_worker.get("GPU", 0),
            resources=custom or None,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=index),
            runtime_env={"env_vars": self.env_vars},
        ).remote(*self.make_args(index))
        _MEMBERS[actor._actor_id.hex()] = (self, index)
        return actor

    # --- calls --------------------------------------------------------------------------------

    def setup(self, *args) -> list:
        """Start every worker's setup(*args) (also re-run on a restarted worker) -> refs of their infos.
        Not blocking, so the groups load their models at the same time."""
        self._setup_args = args
        return self.call_all("setup", *args)

    def call_all(self, method: str, *args, num_returns: int = 1) -> list:
        self.last_call = [method] * self.num_workers
        return [getattr(a, method).options(num_returns=num_returns).remote(*args) for a in self.actors]

    def call_each(self, method: str, args_per_worker: Sequence[tuple]) -> list:
        """Worker i runs `method(*args_per_worker[i])` (collective work with per-rank inputs) -> refs."""
        self.last_call = [method] * self.num_workers
        return [getattr(a, method).remote(*args) for a, args in zip(self.actors, args_per_worker, strict=True)]

    def get(self, refs: list) -> list:
        """ray.get of calls made with call_all / call_each. A worker that died raises WorkerDied naming it
        and its call (also when the first error seen is a survivor's, e.g. its collective losing the peer)."""
        try:
            return ray.get(refs)
        except RayActorError as exc:
            member = died(exc)
            if member is None:
                raise
            raise member from exc
        except RayTaskError as exc:  # a survivor's error, e.g. its collective lost a peer: is a worker dead?
            raise_dead_member(exc)
            raise

    def dead_workers(self) -> list[int]:
        """The workers that no longer answer (each is asked for its node id)."""
        dead = []
        for index, actor in enumerate(self.actors):
            try:
                ray.get(actor.node_id.remote(), timeout=60)
            except RayActorError:
                dead.append(index)
            except GetTimeoutError:  # busy, not dead
                pass
        return dead

    def dispatch(self, method: str, items: Sequence, num_returns: int = 1) -> Calls:
        """Call `method(item)` for each item, item i on worker i % num_workers (a tuple item is the
        argument list). ObjectRefs in items are resolved by Ray on the worker."""
        args = [item if isinstance(item, tuple) else (item,) for item in items]
        workers = [i % self.num_workers for i in range(len(args))]
        for w in set(workers):
            self.last_call[w] = method
        handles = [self.actors[w] for w in workers]
        refs = [getattr(h, method).options(num_returns=num_returns).remote(*a) for h, a in zip(handles, args, strict=True)]
        return Calls(method, args, workers, handles, refs, num_returns)

    def collect(self, calls: Calls) -> tuple[list, list]:
        """Wait for dispatched calls -> (result refs, summaries), in item order.

        With num_returns=k > 1 a call's last return is its summary, fetched, and its result the list of
        its first k - 1 refs (left in the object store); with num_returns=1 the results are None and the
        summaries the return values. A call whose worker died is re-run on the restarted worker.
        """
        results: list = [None] * len(calls.items)
        summaries: list = [None] * len(calls.items)
        pending = list(range(len(calls.items)))
        while pending:
            failed = []
            for i in pending:
                refs = calls.refs[i] if calls.num_returns > 1 else [calls.refs[i]]
                try:
                    summaries[i] = ray.get(refs[-1])
                    results[i] = refs[:-1] if calls.num_returns > 1 else None
                except RayActorError as exc:
                    member = _MEMBERS.get(_dead_actor_id(exc))
                    if member is not None and member != (self, calls.workers[i]):
                        raise died(exc) from exc  # an upstream worker died, not this healthy one
                    failed.append(i)
                    print(f"[{self.name}] worker {calls.workers[i]} died during {calls.method}: {type(exc).__name__}; "
                          "restarting it and retrying its work", flush=True)
                except RayTaskError as exc:  # an upstream survivor's error (a lost peer)? then name the dead one
                    raise_dead_member(exc)
                    raise
            for i in failed:
                worker = calls.workers[i]
                if calls.handles[i] is self.actors[worker]:  # not replaced yet by an earlier failure
                    self.restart(worker, calls.method)
                calls.handles[i] = self.actors[worker]
                method = getattr(self.actors[worker], calls.method).options(num_returns=calls.num_returns)
                calls.refs[i] = method.remote(*calls.items[i])
            pending = failed
        return results, summaries

    def run(self, method: str, items: Sequence, num_returns: int = 1) -> tuple[list, list]:
        return self.collect(self.dispatch(method, items, num_returns))

    # --- faults -------------------------------------------------------------------------------

    def remember_lazily(self, method: str, make_args: Callable[[], tuple]) -> None:
        """Re-apply `method(*make_args())` to a restarted worker before it works again (the latest call
        per method wins); make_args runs only then, e.g. to fetch the current weights."""
        self._replay[method] = make_args

    def restart(self, index: int, method: str) -> None:
        if self.restarts >= self.max_restarts:
            raise WorkerDied(self.name, index, method, f"its group has used all {self.max_restarts} restarts: "
                                                       "trainer.max_actor_restarts")
        start = time.perf_counter()
        ray.kill(self.actors[index], no_restart=True)  # it may still be alive but unreachable
        self.restarts += 1
        actor = self._create(index)
        ray.get(actor.setup.remote(*self._setup_args))
        for method, make_args in self._replay.items():
            ray.get(getattr(actor, method).remote(*make_args()))
        self.actors[index] = actor
        print(f"[{self.name}] worker {index} restarted as {self.actor_name(index)} in {time.perf_counter() - start:.1f} s",
              flush=True)

    # --- info and teardown --------------------------------------------------------------------

    def node_ids(self) -> list[str]:
        return ray.get(self.call_all("node_id"))

    def shutdown(self) -> None:
        """Kill the workers. The placement group is released by `remove_placement_groups` (it may be
        shared with other groups)."""
        for actor in self.actors:
            _MEMBERS.pop(actor._actor_id.hex(), None)
            ray.kill(actor, no_restart=True)
        self.actors = []


def raise_dead_member(error: Exception) -> None:
    """Raise WorkerDied for a worker of any group that no longer answers (with what it was last asked to
    do), caused by `error`; return when every worker answers."""
    for group in {id(g): g for g, _ in _MEMBERS.values()}.values():
        dead = group.dead_workers()
        if dead:
            raise WorkerDied(group.name, dead[0], group.last_call[dead[0]]) from error


def died(exc: RayActorError) -> WorkerDied | None:
    """The WorkerDied of the group member an ActorDiedError names (what it was last asked to do); None for
    an actor of no group."""
    group, index = _MEMBERS.get(_dead_actor_id(exc), (None, None))
    return None if group is None else WorkerDied(group.name, index, group.last_call[index])


def remove_placement_groups(pgs: dict[str, PlacementGroup]) -> None:
    for pg in {id(pg): pg for pg in pgs.values()}.values():
        remove_placement_group(pg)
