"""Can an autoscaling cluster ever hold a job's placement groups?

`placement.ensure_resources` waits up to cluster.wait_for_resources_s for the autoscaler to add nodes.
That wait only makes sense when the autoscaler's node types could hold the groups: a worker asking
for 16 GPUs, or a custom resource no node type has, would wait the whole timeout and then fail. This
module tells the two apart before the wait, from the node types the autoscaler may launch:

- `node_types_from_launcher_config`: a cluster-launcher YAML (what `ray up` and the autoscaler read);
- `autoscaler_node_types`: the running cluster's, from the GCS (where a platform reports them) or from
  the autoscaling config file of this cluster's autoscaler process (`ray up` clusters: the head's
  ~/ray_bootstrap_config.yaml). None when they cannot be known (e.g. KubeRay: the autoscaler runs in a
  side container and reads the RayCluster object), and the caller then just waits as before.
- `unreachable`: pure logic, the reasons why even the largest cluster the autoscaler may build could
  not hold the plans (optimistic: it ignores the global max_workers, so it never fails a job that
  could fit).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rmr1_ray.placement import PlacementError, PlacementPlan, find_shortfall

MONITOR_SCRIPTS = ("autoscaler/_private/monitor.py", "autoscaler/v2/monitor.py")


@dataclass(frozen=True)
class NodeType:
    name: str
    resources: dict[str, float]
    max_workers: int  # nodes of this type the autoscaler may run


def node_types_from_launcher_config(config: dict) -> list[NodeType]:
    """Worker node types of a cluster-launcher config. A type without max_workers may use the global
    max_workers (as Ray's prepare_config fills it in); the head type adds no node (it is running)."""
    head, global_max = config.get("head_node_type"), config.get("max_workers", 0)
    return [
        NodeType(name, {k: float(v) for k, v in spec.get("resources", {}).items()}, spec.get("max_workers", global_max))
        for name, spec in config.get("available_node_types", {}).items()
        if name != head
    ]


def _total(nodes: Sequence[dict[str, float]]) -> dict[str, float]:
    total: dict[str, float] = {}
    for node in nodes:
        for key, value in node.items():
            total[key] = total.get(key, 0.0) + value
    return total


def _show(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items())) + "}"


def unreachable(plans: list[PlacementPlan], nodes: list[dict[str, float]], node_types: list[NodeType]) -> list[str]:
    """Why `plans` cannot be placed even after the autoscaler adds every node it may; [] if they could.

    The largest cluster is the running nodes plus max_workers nodes of every type (capped at one node
    per bundle: no plan can use more new nodes than it has bundles). A type with no resources listed
    (auto-detected by the provider at launch) makes the answer unknown: [].
    """
    if any(not t.resources for t in node_types):
        return []  # a type's resources are filled in by the cloud provider at launch: unknown here
    bundles = sum(len(plan.bundles) for plan in plans)
    added = [t.resources for t in node_types for _ in range(min(max(t.max_workers, 0), bundles))]
    problems = find_shortfall(plans, _total(nodes + added), nodes + added)
    if not problems:
        return []
    types = ", ".join(f"up to {t.max_workers} x {t.name} {_show(t.resources)}" for t in node_types) or "none"
    return [f"{p} (counting every node the autoscaler may add: {types})" for p in problems]


def _monitor_config_path(gcs_port: int) -> str | None:
    """The --autoscaling-config of this cluster's autoscaler process, when it runs on this machine (on
    `ray up` clusters the job driver and the autoscaler both run on the head). "" when the autoscaler
    runs without one (a fixed-size cluster); None when no autoscaler process of this cluster is here."""
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        args = proc.info["cmdline"] or []
        if not any(arg.endswith(MONITOR_SCRIPTS) for arg in args):
            continue
        if not any(arg.startswith("--gcs-address=") and arg.endswith(f":{gcs_port}") for arg in args):
            continue  # another cluster's autoscaler on the same machine
        return next((arg.split("=", 1)[1] for arg in args if arg.startswith("--autoscaling-config=")), "")
    return None


def autoscaler_node_types() -> tuple[list[NodeType], str] | None:
    """(node types the connected cluster's autoscaler may launch, where they were read), or None when
    unknown. Needs a connected Ray driver."""
    import ray
    import ray._private.state
    import yaml

    reported = ray._private.state.state.get_cluster_config()  # set where the platform reports it
    if reported is not None and reported.node_group_configs:
        return [
            NodeType(g.name, dict(g.resources), g.max_count if g.max_count >= 0 else 2**31 - 1)
            for g in reported.node_group_configs
        ], "the GCS cluster config"
    path = _monitor_config_path(int(ray.get_runtime_context().gcs_address.rsplit(":", 1)[1]))
    if path is None:
        return None
    if path == "":
        return [], "the autoscaler (no autoscaling config: the cluster has a fixed size)"
    config = yaml.safe_load(Path(path).expanduser().read_text())
    return node_types_from_launcher_config(config), path


def check_reachable(plans: list[PlacementPlan], nodes: list[dict[str, float]] | None = None) -> None:
    """Raise PlacementError at once when the plans can never fit, even on the largest cluster the
    autoscaler may build; return when they fit now, could fit after scaling up, or the node types are
    unknown (then `ensure_resources` waits as configured)."""
    import ray

    if nodes is None:
        nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    if not find_shortfall(plans, _total(nodes), nodes):
        return
    known = autoscaler_node_types()
    if known is None:
        return
    node_types, source = known
    problems = unreachable(plans, nodes, node_types)
    if problems:
        raise PlacementError(
            f"the cluster cannot hold the configured actor groups, now or after scaling up (node types from "
            f"{source}):\n  " + "\n  ".join(problems)
            + "\nLower the groups' num_workers or per-worker resources, or add a node type that fits."
        )
