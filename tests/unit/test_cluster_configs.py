"""configs/cluster/ and the README's cluster commands, checked by real validators and by our own config
and placement code:

- the AWS cluster-launcher YAML by Ray's own validation (ray-schema.json + prepare_config), as `ray up` does;
- the KubeRay RayCluster / RayJob manifests by jsonschema against tests/data/kuberay_schema.json, a minimal
  schema written from KubeRay's v1 Go types (the CRDs are not on this machine; see its $comment);
- the commands in the README's "Running on a cluster" and the RayJob's entrypoint: each job's config and
  overrides load and validate, and the GRPO placement fits the cluster configs at their largest.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from rmr1_ray.cluster_capacity import NodeType, node_types_from_launcher_config, unreachable
from rmr1_ray.config import load_config
from rmr1_ray.config.chains import ChainsConfig
from rmr1_ray.config.distill import DistillConfig
from rmr1_ray.config.evaluate import EvalConfig
from rmr1_ray.config.prepare import PrepareConfig
from rmr1_ray.config.serve import ServeConfig
from rmr1_ray.config.train import TrainConfig
from rmr1_ray.placement import find_shortfall, group_specs, plan_placement

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "configs" / "cluster"
SCHEMA = json.loads((ROOT / "tests" / "data" / "kuberay_schema.json").read_text())
JOB_CONFIGS = {"prepare_data": PrepareConfig, "generate_chains": ChainsConfig, "distill": DistillConfig,
               "train_rlvr": TrainConfig, "evaluate": EvalConfig, "serve_judge": ServeConfig}
GRPO_CONFIGS = sorted((ROOT / "configs" / "rm-r1").glob("*-grpo.yaml"))


def read_yaml(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def kuberay_errors(manifest: dict) -> list[str]:
    # The kind's own definition (not the top-level oneOf), so that errors name the field, not the branch.
    schema = {"$defs": SCHEMA["$defs"], "$ref": f"#/$defs/{manifest['kind']}"}
    validator = jsonschema.Draft202012Validator(schema)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(manifest)]


def grpo_plans(config: Path, *overrides: str):
    train = load_config(TrainConfig, config, list(overrides))
    return plan_placement(group_specs(train), train.cluster.colocate)


def kuberay_node_types(cluster_spec: dict) -> list[NodeType]:
    """Worker groups -> node types: Ray on KubeRay takes a pod's CPUs and GPUs from its container limits."""
    types = []
    for group in cluster_spec["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        resources = {"CPU": float(limits["cpu"]), "GPU": float(limits.get("nvidia.com/gpu", 0))}
        types.append(NodeType(group["groupName"], {k: v for k, v in resources.items() if v},
                              group["maxReplicas"] * group.get("numOfHosts", 1)))
    return types


# --- the AWS cluster launcher config --------------------------------------------------------------


def test_aws_config_passes_rays_own_validation():
    raw = read_yaml("aws-gpu.yaml")
    validate_config(raw)  # what `ray up` runs first...
    prepared = prepare_config(copy.deepcopy(raw))  # ...then the defaults and per-type limits it fills in
    validate_config(prepared)
    types = prepared["available_node_types"]
    assert prepared["head_node_type"] == "head" and types["head"]["resources"] == {"CPU": 0}
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU")}
    assert set(gpu_types) == {"gpu.p4d", "gpu.p5", "gpu.g5"}
    for name, t in gpu_types.items():
        assert t["min_workers"] == 0 < t["max_workers"], name  # scale from zero
        assert t["resources"]["GPU"] == 8, name
    assert sum(t["min_workers"] for t in types.values()) <= prepared["max_workers"]
    # every node installs this project with its pinned GPU stack and runs Ray from that venv
    assert any("make setup-gpu" in cmd for cmd in prepared["worker_setup_commands"])
    assert any("make setup-gpu" in cmd for cmd in prepared["head_setup_commands"])
    assert any("--autoscaling-config=~/ray_bootstrap_config.yaml" in cmd for cmd in prepared["head_start_ray_commands"])


def test_rays_validation_rejects_a_misspelt_key():
    """The validator above is live: a typo in a top-level key is an error."""
    raw = read_yaml("aws-gpu.yaml")
    raw["max_worker"] = raw.pop("max_workers")
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        validate_config(raw)


@pytest.mark.parametrize("config", GRPO_CONFIGS, ids=lambda p: p.stem)
def test_every_rm_r1_grpo_config_fits_the_aws_cluster_only_after_scaling_up(config):
    plans = grpo_plans(config)
    head = {"CPU": 0.0}
    assert find_shortfall(plans, head, [head])  # the head alone cannot hold it: the autoscaler must add nodes
    node_types = node_types_from_launcher_config(read_yaml("aws-gpu.yaml"))
    assert unreachable(plans, [head], node_types) == []


# --- the KubeRay manifests ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["kuberay-raycluster.yaml", "kuberay-rayjob.yaml"])
def test_kuberay_manifests_match_the_crd_schema(name):
    manifest = read_yaml(name)
    assert manifest["apiVersion"] == "ray.io/v1"
    assert kuberay_errors(manifest) == []
    jsonschema.validate(manifest, SCHEMA)  # the whole schema too: exactly one of RayCluster / RayJob
    spec = manifest["spec"] if manifest["kind"] == "RayCluster" else manifest["spec"]["rayClusterSpec"]
    assert spec["enableInTreeAutoscaling"] is True and spec["rayVersion"] == "2.60.0"
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # the head runs no actors
    names = [g["groupName"] for g in spec["workerGroupSpecs"]]
    assert len(names) == len(set(names))
    gpu_groups = 0
    for group in spec["workerGroupSpecs"]:
        # what KubeRay's webhook checks, and scale-from-zero
        assert 0 == group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
        resources = group["template"]["spec"]["containers"][0]["resources"]
        assert resources["requests"] == resources["limits"], group["groupName"]  # Ray counts the limits
        gpu_groups += "nvidia.com/gpu" in resources["limits"]
    assert gpu_groups >= 1


@pytest.mark.parametrize(
    ("path", "value", "error"),
    [
        (("spec", "headGroupSpec", "rayStartParams", "num-cpus"), 0, "is not of type 'string'"),
        (("spec", "workerGroupSpecs", 0, "maxReplica"), 3, "Additional properties are not allowed"),
        (("spec", "autoscalerOptions", "upscalingMode"), "Fast", "is not one of"),
    ],
)
def test_the_kuberay_schema_rejects_real_mistakes(path, value, error):
    manifest = read_yaml("kuberay-raycluster.yaml")
    node = manifest
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert any(error in e for e in kuberay_errors(manifest))


def test_rayjob_runs_the_7b_grpo_job_which_fits_its_cluster(tmp_path):
    manifest = read_yaml("kuberay-rayjob.yaml")
    argv = shlex.split(manifest["spec"]["entrypoint"].split("&&", 1)[1])
    assert argv[:3] == ["python", "-m", "jobs.train_rlvr"] and argv[-1] == "--resume"
    config = ROOT / argv[argv.index("--config") + 1]
    assert config.name == "qwen2.5-7b-instruct-grpo.yaml"
    overrides = [arg.replace("/mnt/shared", str(tmp_path)) for arg in argv[5:-1]]
    (tmp_path / "runs" / "qwen2.5-7b-instruct-distill" / "final").mkdir(parents=True)  # the distilled model
    train = load_config(TrainConfig, config, overrides)
    assert train.cluster.device == "gpu" and train.cluster.wait_for_resources_s > 0
    assert train.tracking.wandb_mode == "online"
    plans = plan_placement(group_specs(train), train.cluster.colocate)
    node_types = kuberay_node_types(manifest["spec"]["rayClusterSpec"])
    assert unreachable(plans, [{"CPU": 0.0}], node_types) == []
    # ...and not with one GPU pod fewer: maxReplicas is the size the job needs
    smaller = [NodeType(t.name, t.resources, t.max_workers - 1) for t in node_types]
    assert unreachable(plans, [{"CPU": 0.0}], smaller)


# --- the README's commands ------------------------------------------------------------------------


def readme_commands() -> list[list[str]]:
    """The `ray job submit ... -- python -m jobs.X ...` commands of the README's cluster section, as argv."""
    section = (ROOT / "README.md").read_text().split("## Running on a cluster", 1)[1]
    block = section.split("**The RM-R1 pipeline", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [c for c in block.replace("\\\n", " ").splitlines() if c.startswith("ray job submit")]
    return [shlex.split(command) for command in commands]


def test_readme_pipeline_has_every_stage_in_order():
    modules = [argv[argv.index("-m") + 1] for argv in readme_commands()]
    assert modules == ["jobs.prepare_data", "jobs.generate_chains", "jobs.prepare_data", "jobs.distill",
                       "jobs.train_rlvr", "jobs.evaluate", "jobs.serve_judge"]


def test_readme_commands_use_real_configs_and_valid_overrides(tmp_path):
    shared = tmp_path / "shared"
    # The model each stage reads was written by the stage before it.
    for run in ("qwen2.5-7b-instruct-distill", "qwen2.5-7b-instruct-grpo"):
        (shared / "runs" / run / "final").mkdir(parents=True)
    for argv in readme_commands():
        split = argv.index("--")
        submit, job = argv[:split], argv[split + 1 :]
        assert submit[:3] == ["ray", "job", "submit"] and submit[submit.index("--working-dir") + 1] == "."
        assert job[:2] == ["python", "-m"]
        config = ROOT / job[job.index("--config") + 1]
        assert config.is_file(), config
        overrides = [a.replace("$SHARED", str(shared)) for a in job[job.index("--config") + 2 :] if a != "--resume"]
        assert all(re.fullmatch(r"[\w.]+=.+", o, re.S) for o in overrides), overrides
        loaded = load_config(JOB_CONFIGS[job[2].removeprefix("jobs.")], config, overrides)
        if job[2] == "jobs.train_rlvr":
            assert loaded.cluster.device == "gpu" and loaded.tracking.wandb_mode == "online"
            assert "--resume" in job


def test_readme_runtime_env_excludes_what_must_not_be_uploaded():
    section = (ROOT / "README.md").read_text().split("## Running on a cluster", 1)[1]
    template = re.search(r"printf '(\{.*?\})'", section).group(1)
    runtime_env = json.loads(template.replace("%s", "x"))
    assert {".git", ".venv", "runs", "data"} <= set(runtime_env["excludes"])
    # the jobs set these for their actors; a job-level value would make ray.init refuse to merge
    assert not {"OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM"} & set(runtime_env["env_vars"])


# --- cluster_capacity: never fits vs fits after scaling up ------------------------------------------


def test_a_group_no_node_type_can_hold_is_reported_with_its_key():
    plans = grpo_plans(GRPO_CONFIGS[0], "learner.group.num_gpus_per_worker=16")  # a worker wanting 16 GPUs
    problems = unreachable(plans, [{"CPU": 0.0}], node_types_from_launcher_config(read_yaml("aws-gpu.yaml")))
    assert any("learner" in p and "GPU: 16" in p and "no node has that" in p for p in problems), problems
    assert all("up to 4 x gpu.p4d {CPU: 96, GPU: 8}" in p for p in problems)


def test_node_types_with_resources_left_to_the_provider_are_unknown():
    """AWS fills a node type's resources from its instance type at launch: no verdict without them."""
    config = read_yaml("aws-gpu.yaml")
    for spec in config["available_node_types"].values():
        spec["resources"] = {}
    plans = grpo_plans(GRPO_CONFIGS[0], "learner.group.num_gpus_per_worker=16")
    assert unreachable(plans, [{"CPU": 0.0}], node_types_from_launcher_config(config)) == []
