"""Placement of the actor groups: what each placement group asks for, and whether the cluster can
hold all of them. Checked before any actor starts, so a config the cluster cannot hold fails in
seconds with the groups and resources named, instead of hanging on a pending placement group.

Separate placement (default): one placement group per actor group, one bundle per worker.
Colocated (`cluster.colocate`): learner, reference and rollout share one placement group; bundle i
holds worker i of each of them, so its resources are the sum of theirs (fractional GPUs, e.g. 0.6 for
the learner, 0.3 for vLLM, 0.1 for the reference).
With `reference.on_learner` the learner ranks hold the reference and there is no reference group.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from rmr1_ray.config.train import TrainConfig

COLOCATED = ("learner", "reference", "rollout")
_EPS = 1e-9


class PlacementError(RuntimeError):
    """The cluster cannot hold the configured actor groups; the message says which and what is missing."""


@dataclass(frozen=True)
class GroupSpec:
    name: str  # learner | reference | rollout | rewarder; the config key is `<name>.group`
    num_workers: int
    per_worker: dict[str, float]  # Ray resources of one worker: CPU, GPU, custom
    strategy: str


@dataclass(frozen=True)
class PlacementPlan:
    """One placement group: the actor groups it holds and its bundles."""

    groups: tuple[GroupSpec, ...]
    bundles: tuple[dict[str, float], ...]
    strategy: str

    @property
    def name(self) -> str:
        return "+".join(g.name for g in self.groups)


def _resources(num_cpus: float, num_gpus: float, custom: dict[str, float]) -> dict[str, float]:
    out = {"CPU": num_cpus, "GPU": num_gpus, **custom}
    return {key: value for key, value in out.items() if value > 0}


def group_specs(config: TrainConfig) -> list[GroupSpec]:
    """The actor groups a GRPO run starts: no reference group when the KL loss is off (no reference model)
    or when the learner ranks hold the reference (reference.on_learner)."""
    groups = {"learner": config.learner.group, "reference": config.reference.group,
              "rollout": config.rollout.group, "rewarder": config.reward.group}
    if not config.algorithm.use_kl_loss or config.reference.on_learner:
        del groups["reference"]
    specs = []
    for name, g in groups.items():
        per_worker = _resources(g.num_cpus_per_worker, g.num_gpus_per_worker, g.resources)
        if not per_worker:  # Ray cannot reserve an empty bundle
            raise PlacementError(f"{_key(name)}: a worker must ask for some resource (CPU, GPU or custom)")
        specs.append(GroupSpec(name, g.num_workers, per_worker, g.strategy))
    return specs


def _key(name: str) -> str:
    return f"{'reward' if name == 'rewarder' else name}.group"


def plan_placement(specs: list[GroupSpec], colocate: bool) -> list[PlacementPlan]:
    if not colocate:
        return [PlacementPlan((s,), tuple(dict(s.per_worker) for _ in range(s.num_workers)), s.strategy) for s in specs]
    shared = [s for s in specs if s.name in COLOCATED]
    bundles = []
    for i in range(max(s.num_workers for s in shared)):
        bundle: dict[str, float] = {}
        for s in shared:
            if i < s.num_workers:
                for key, value in s.per_worker.items():
                    bundle[key] = bundle.get(key, 0.0) + value
        bundles.append(bundle)
    # The learner is the group that needs its bundles packed (ZeRO-3 collectives); its strategy rules.
    learner = next(s for s in shared if s.name == "learner")
    shared_plan = PlacementPlan(tuple(shared), tuple(bundles), learner.strategy)
    return [shared_plan, *plan_placement([s for s in specs if s.name not in COLOCATED], colocate=False)]


def _fmt(value: float) -> str:
    return f"{value:g}"


def find_shortfall(plans: list[PlacementPlan], total: dict[str, float], nodes: list[dict[str, float]]) -> list[str]:
    """Human-readable reasons why `plans` cannot be placed on a cluster with `total` resources and
    these per-node resources; empty when they fit (as far as totals and single nodes can tell)."""
    problems = []
    wanted: dict[str, float] = {}
    for plan in plans:
        for bundle in plan.bundles:
            for key, value in bundle.items():
                wanted[key] = wanted.get(key, 0.0) + value
    for key, value in sorted(wanted.items()):
        have = total.get(key, 0.0)
        if value > have + _EPS:
            parts = [
                f"{s.name} wants {_fmt(s.num_workers * s.per_worker[key])} ({s.num_workers} workers x "
                f"{_fmt(s.per_worker[key])}, {_key(s.name)})"
                for plan in plans for s in plan.groups if key in s.per_worker
            ]
            problems.append(f"{key}: {'; '.join(parts)}: {_fmt(value)} in total, but the cluster has {_fmt(have)}")

    def fits(need: dict[str, float], node: dict[str, float]) -> bool:
        return all(node.get(key, 0.0) + _EPS >= value for key, value in need.items())

    for plan in plans:
        if plan.strategy == "STRICT_PACK":
            need: dict[str, float] = {}
            for bundle in plan.bundles:
                for key, value in bundle.items():
                    need[key] = need.get(key, 0.0) + value
            if not any(fits(need, node) for node in nodes):
                problems.append(f"{plan.name}: strategy STRICT_PACK needs {_show(need)} on one node; no node has that")
        for bundle in {tuple(sorted(b.items())) for b in plan.bundles}:
            if not any(fits(dict(bundle), node) for node in nodes):
                problems.append(f"{plan.name}: one worker needs {_show(dict(bundle))} on a single node; no node has that")
    return problems


def _show(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{key}: {_fmt(value)}" for key, value in sorted(resources.items())) + "}"


def _cluster_view() -> tuple[dict[str, float], list[dict[str, float]]]:
    import ray

    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    return dict(ray.cluster_resources()), nodes


def ensure_resources(
    plans: list[PlacementPlan],
    wait_s: float = 0.0,
    log: Callable[[str], None] = print,
    view: Callable[[], tuple[dict[str, float], list[dict[str, float]]]] = _cluster_view,
    poll_s: float = 2.0,
) -> None:
    """Return when the cluster can hold `plans`; else raise PlacementError naming what is missing.

    With `wait_s` > 0 (autoscaling clusters) the bundles are requested from the autoscaler and the
    check is repeated until they fit or wait_s has passed, with a progress line every ~10 s.
    """
    problems = find_shortfall(plans, *view())
    if problems and wait_s > 0:
        from ray.autoscaler.sdk import request_resources

        # Nothing is pending yet (no actor has started), so ask the autoscaler for the bundles explicitly.
        request_resources(bundles=[bundle for plan in plans for bundle in plan.bundles])
        start = last_note = time.monotonic()
        log(f"waiting up to {wait_s:g} s for the cluster to grow: {problems[0]}")
        while problems and time.monotonic() - start < wait_s:
            time.sleep(poll_s)
            problems = find_shortfall(plans, *view())
            if problems and time.monotonic() - last_note >= 10:
                last_note = time.monotonic()
                log(f"still waiting for resources ({time.monotonic() - start:.0f}/{wait_s:g} s): {problems[0]}")
        request_resources(bundles=[])  # the placement groups hold the nodes from here; drop the standing request
    if problems:
        waited = f" after waiting {wait_s:g} s (cluster.wait_for_resources_s)" if wait_s > 0 else ""
        raise PlacementError(
            "the cluster cannot hold the configured actor groups" + waited + ":\n  " + "\n  ".join(problems)
            + "\nLower the groups' num_workers or per-worker resources, or add nodes "
            "(on an autoscaling cluster, set cluster.wait_for_resources_s)."
        )
