"""Cluster operations on real multi-node Ray clusters on this machine, started with `ray start`:

- a head (custom resource node_a) and a second node (node_b): the tiny GRPO job goes in with
  `ray job submit --working-dir`, its rollout group pinned to node_b and its learner to node_a; it
  succeeds, its actor groups ran on both nodes, and its offline W&B run holds the metrics, the resolved
  config, system metrics and the samples table. A job asking for more than the cluster has fails before
  any actor starts, with the group and the shortfall named;
- an autoscaling head (Ray's fake multi-node provider: it launches worker "nodes" as local raylets):
  the job's placement check, run by a driver script (the GRPO job does not call
  rmr1_ray.cluster_capacity yet), fails at once for a group no node type can hold and waits with a
  progress message for a group the autoscaler can make room for, until the node is up.

Every process these clusters and their jobs start carries this module's temp dir in its command line,
or belongs to the process group of one that does or of a `ray start`; the fixtures end exactly those,
also when a test fails. Two clusters, because the autoscaling one must be started as such. Never
`ray stop`: it would end every Ray process on the machine. Every node is on 127.0.0.1 (tests/loopback.py) and a
watch checks every socket of these processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml
from loopback import LoopbackWatch
from ray.job_submission import JobStatus, JobSubmissionClient
from ray.util.state import list_actors, list_nodes
from servers import free_port, write_prompt_rows

from rmr1_ray.tiny import make_tiny

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")  # the venv's CLI: its raylets start the venv's python
CONFIG = "configs/tiny-cpu/train.yaml"  # relative: the job runs in the uploaded working dir
EXCLUDES = [".git", ".venv", "runs", "wandb", ".hypothesis", ".pytest_cache", ".ruff_cache"]
ACTOR_CLASSES = {"PolicyLearner": "learner", "RolloutWorker": "rollout", "ReferenceModel": "reference",
                 "VerdictRewarder": "rewarder"}
# Auth off for these private clusters: the machine's shared ~/.ray/auth_token would otherwise switch
# some processes to token mode and not others.
BASE_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}



# What `ray start --address=... --node-ip-address=127.0.0.1` would do, but `ray start` refuses a worker node
# while RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (tests/loopback.py), and without it rewrites 127.0.0.1 to the
# interface address. Ray's own fake multi-node provider and ray.cluster_utils add nodes the same way: a Node
# given its IP directly, left running when this script exits (its processes keep this session).
NODE_LAUNCHER = """
import json, sys
from ray._private.node import Node
from ray._private.parameter import RayParams
config = json.loads(sys.argv[1])
params = RayParams(node_ip_address="127.0.0.1", object_store_memory=300_000_000, min_worker_port=0,
                   max_worker_port=0, include_log_monitor=True, **config)
Node(params, head=False, shutdown_at_exit=False, spawn_reaper=False)
"""


class LocalCluster:
    """The Ray processes of one test cluster (under `root`) and of its jobs; stop() ends exactly those:
    the process groups of its `ray start`s and of every process whose command line holds `marker` (this
    module's temp dir: the Ray temp dirs, the jobs' inputs and outputs)."""

    def __init__(self, root: Path, marker: Path) -> None:
        self.root, self.marker, self.groups = root, str(marker), set()
        self.port, self.dashboard_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"

    def ray_start(self, node: str, *args: str, env: dict | None = None) -> None:
        # One temp dir per node, as on separate machines: nodes sharing one would share (and clobber)
        # the unpacked working dirs of the jobs' runtime envs.
        common = ["--node-ip-address=127.0.0.1", f"--temp-dir={self.root / node}", "--object-store-memory=300000000",
                  f"--dashboard-agent-listen-port={free_port()}", "--disable-usage-stats"]
        # Its own session: the daemons it leaves behind keep this process group, which stop() ends.
        proc = subprocess.Popen([RAY, "start", *args, *common], env={**BASE_ENV, **(env or {})},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.groups.add(proc.pid)
        output, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0, output

    def add_node(self, node: str, num_cpus: int, resources: dict[str, float]) -> None:
        """A second node on 127.0.0.1 (NODE_LAUNCHER: `ray start --address` refuses one on a loopback-only
        host), in its own session and temp dir like the `ray start` ones."""
        config = {"gcs_address": self.address, "temp_dir": str(self.root / node), "num_cpus": num_cpus,
                  "resources": resources, "dashboard_agent_listen_port": free_port()}
        proc = subprocess.Popen([sys.executable, "-c", NODE_LAUNCHER, json.dumps(config)], env=BASE_ENV,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.groups.add(proc.pid)
        output, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0, output

    def start_head(self, *args: str, env: dict | None = None) -> None:
        self.ray_start("head", "--head", f"--port={self.port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                       f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={free_port()}", *args,
                       env=env)

    def wait_for_dashboard(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"{self.dashboard}/api/version", timeout=5):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)

    def pids(self) -> set[int]:
        """Every process of this cluster and its jobs (see stop())."""
        pids = set()
        for proc in psutil.process_iter(["pid", "cmdline"]):
            with contextlib.suppress(ProcessLookupError, psutil.Error):
                if self.marker in " ".join(proc.info["cmdline"] or []) or os.getpgid(proc.pid) in self.groups:
                    pids.add(proc.pid)
        return pids

    def stop(self) -> None:
        """SIGTERM the process groups (raylets, workers, job drivers in their own sessions), then SIGKILL
        what is left. Never our own process group."""
        for proc in psutil.process_iter(["pid", "cmdline"]):
            if self.marker in " ".join(proc.info["cmdline"] or []):
                with contextlib.suppress(ProcessLookupError):
                    self.groups.add(os.getpgid(proc.pid))
        self.groups.discard(os.getpgid(0))
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for group in self.groups:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(group, sig)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and self._alive():
                time.sleep(0.5)

    def _alive(self) -> bool:
        for proc in psutil.process_iter(["pid"]):
            try:
                if os.getpgid(proc.pid) in self.groups and proc.status() != psutil.STATUS_ZOMBIE:
                    return True
            except (ProcessLookupError, psutil.NoSuchProcess):
                pass
        return False


@pytest.fixture(scope="module")
def root():
    # Short and unique: Ray's socket paths live under it (Unix sockets allow ~107 characters).
    path = Path(tempfile.mkdtemp(prefix="rmr1-cl-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)  # after the clusters (requested later, so stopped first)


@pytest.fixture(scope="module")
def inputs(root) -> dict[str, Path]:
    """The tiny judge and 8 prepared prompts (2 steps' worth) in the prepared-parquet layout."""
    model = make_tiny(root / "model", seed=0)
    (root / "train").mkdir()
    write_prompt_rows(root / "train" / "part-00000.parquet", 8, seed=0, fmt="instruct")
    return {"model": model, "train": root / "train"}


@pytest.fixture(scope="module")
def cluster(root):
    """Head: 2 CPUs + node_a; second node: 2 CPUs + node_b. Job submission via the head's dashboard."""
    c = LocalCluster(root / "two-node", marker=root)
    try:
        with LoopbackWatch(c.pids) as c.watch:
            c.start_head("--num-cpus=2", '--resources={"node_a": 4}')
            c.add_node("b", num_cpus=2, resources={"node_b": 4})
            c.wait_for_dashboard()
            yield c
    finally:
        c.stop()


def submit(cluster: LocalCluster, submission_id: str, *overrides: str) -> None:
    """`ray job submit` as a user runs it: upload the repo (minus excludes), run the job's module."""
    runtime_env = json.dumps({"excludes": EXCLUDES})
    cmd = [RAY, "job", "submit", "--address", cluster.dashboard, "--submission-id", submission_id, "--no-wait",
           "--working-dir", str(REPO), "--runtime-env-json", runtime_env, "--",
           sys.executable, "-m", "jobs.train_rlvr", "--config", CONFIG, *overrides]
    done = subprocess.run(cmd, env=BASE_ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def wait_for_job(cluster: LocalCluster, submission_id: str, timeout_s: float) -> tuple[JobStatus, float, str]:
    client = JobSubmissionClient(cluster.dashboard)
    start = time.monotonic()
    while (status := client.get_job_status(submission_id)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                                   JobStatus.STOPPED):
        assert time.monotonic() - start < timeout_s, client.get_job_logs(submission_id)[-3000:]
        time.sleep(2)
    return status, time.monotonic() - start, client.get_job_logs(submission_id)


def job_args(inputs: dict[str, Path], out: Path) -> list[str]:
    return [f"model.path={inputs['model']}", f"data.train_path={inputs['train']}", f"trainer.output_dir={out}"]


@pytest.fixture(scope="module")
def grpo_job(cluster, inputs, root) -> tuple[str, Path]:
    """One GRPO step, W&B offline, rollout pinned to node_b and learner to node_a; submitted, not waited for."""
    out = root / "grpo"
    submit(cluster, "rmr1-grpo", *job_args(inputs, out), "trainer.total_steps=1", "rollout.group.resources={node_b: 1}",
           "learner.group.resources={node_a: 1}", "tracking.wandb_mode=offline", "tracking.samples_table_every=1")
    return "rmr1-grpo", out


@pytest.fixture(scope="module")
def grpo_done(cluster, grpo_job) -> tuple[Path, str]:
    status, _, logs = wait_for_job(cluster, grpo_job[0], timeout_s=600)
    assert status == JobStatus.SUCCEEDED, logs[-5000:]
    return grpo_job[1], logs


# Runs while the GRPO job is under way (it asks for the grpo_job fixture): the check reads the cluster's
# totals, which a running job does not change.
def test_a_job_asking_for_more_than_the_cluster_fails_before_any_actor_starts(cluster, inputs, root, grpo_job):
    overrides = ["learner.group.num_workers=16", "learner.micro_batch_size=1", "algorithm.ppo_mini_batch_size=4"]
    submit(cluster, "rmr1-too-big", *job_args(inputs, root / "too-big"), *overrides)
    status, seconds, logs = wait_for_job(cluster, "rmr1-too-big", timeout_s=300)
    assert status == JobStatus.FAILED, logs
    # 16 learner ranks x 0.5 CPU, plus the other groups' 1 CPU, on a cluster of 2 + 2 CPUs
    assert "learner wants 8 (16 workers x 0.5, learner.group)" in logs, logs
    assert "9 in total, but the cluster has 4" in logs, logs
    assert seconds < 120, seconds  # the driver's imports and the check; no model was loaded
    job_id = JobSubmissionClient(cluster.dashboard).get_job_info("rmr1-too-big").job_id
    assert not list_actors(address=cluster.dashboard, filters=[("job_id", "=", job_id)])


def test_grpo_job_submitted_with_ray_job_submit_runs_its_groups_on_both_nodes(cluster, grpo_done):
    out, logs = grpo_done
    assert "step 1/1 | reward -1.000" in logs and "final model:" in logs
    nodes = list_nodes(address=cluster.dashboard, detail=True)
    node_b = {n.node_id for n in nodes if "node_b" in n.resources_total}
    node_a = {n.node_id for n in nodes if "node_a" in n.resources_total}
    assert len(node_a) == len(node_b) == 1 and node_a != node_b
    placed: dict[str, set[str]] = {}
    for actor in list_actors(address=cluster.dashboard, detail=True, limit=1000):
        if actor.class_name in ACTOR_CLASSES and actor.name.startswith("rmr1-"):
            placed.setdefault(ACTOR_CLASSES[actor.class_name], set()).add(actor.node_id)
    assert set(placed) == {"learner", "rollout", "reference", "rewarder"}
    assert placed["rollout"] == node_b  # pinned by rollout.group.resources={node_b: 1}
    assert placed["learner"] == node_a  # pinned by learner.group.resources={node_a: 1}
    assert "actor groups up in" in logs  # the job's own placement line (it counts nodes per group)
    assert (out / "final" / "model.safetensors").is_file()


def test_every_socket_of_the_two_node_cluster_and_its_job_is_on_loopback(cluster, grpo_done):
    """Both nodes, the job's driver and its actor groups (gloo between the learner ranks) were watched
    from the head's start to the job's end."""
    nodes = list_nodes(address=cluster.dashboard, detail=True)
    assert {n.node_ip for n in nodes} == {"127.0.0.1"} and len(nodes) == 2
    assert cluster.watch.samples >= 10 and cluster.watch.violations == [], cluster.watch.violations[:20]


def wandb_records(run_dir: Path) -> list[dict]:
    """The records of an offline W&B run, read by wandb's own reader (`wandb leet inspect`, wandb 0.31)."""
    done = subprocess.run([str(Path(sys.executable).parent / "wandb"), "leet", "inspect", str(run_dir), "--json"],
                          capture_output=True, text=True, timeout=120, check=True)
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def test_offline_wandb_run_holds_metrics_config_system_stats_and_samples_table(grpo_done):
    out, _ = grpo_done
    [run_dir] = (out / "wandb").glob("offline-run-*")
    records = wandb_records(run_dir)
    by_type: dict[str, list[dict]] = {}
    for record in records:
        by_type.setdefault(record["type"], []).append(record)

    run = by_type["run"][0]["run"]
    config = run["config"]["update"]  # the resolved config, as the job ran it
    assert config["rollout"]["group"]["resources"] == {"node_b": 1}
    assert config["trainer"]["total_steps"] == 1 and config["tracking"]["wandb_mode"] == "offline"
    state = json.loads((out / "checkpoints" / "step_000001" / "trainer_state.json").read_text())
    assert run["run_id"] == state["wandb_run_id"]  # what `--resume` passes back to wandb.init(id=...)

    [history] = [r["history"]["item"] for r in by_type["history"]]
    assert history["_step"] == 1 and history["reward/mean"] == -1 and history["verdict/accuracy"] == 0
    assert history["actor/kl_loss"] > 0
    for stage in ("generate", "reward", "reference", "old_log_prob", "advantages", "update", "sync", "step"):
        assert history[f"time/{stage}"] > 0, stage
    assert history["samples._type"] == "table-file" and history["samples.nrows"] == 16  # 4 prompts x 4 samples

    stats = by_type["stats"][0]["stats"]["item"]  # system metrics sampled by W&B
    assert stats["proc.memory.rssMB"] > 0 and "memory_percent" in stats

    table = json.loads((run_dir / "files" / history["samples.path"]).read_text())
    assert {"prompt", "uid", "winner", "reward", "response"} <= set(table["columns"])
    rewards = [row[table["columns"].index("reward")] for row in table["data"]]
    assert len(rewards) == 16 and set(rewards) == {-1.0}


# --- autoscaling ----------------------------------------------------------------------------------

PLACEMENT_DRIVER = """
import json, sys, time
from rmr1_ray.cluster_capacity import check_reachable
from rmr1_ray.config import load_config
from rmr1_ray.config.train import TrainConfig
from rmr1_ray.placement import PlacementError, ensure_resources, group_specs, plan_placement
from rmr1_ray.ray_utils import init_ray

config, model, train = sys.argv[1:4]
init_ray()  # RAY_ADDRESS: the autoscaling cluster

def plans(node_b):  # the GRPO job's own path from config to placement plans
    cfg = load_config(TrainConfig, config, [f"model.path={model}", f"data.train_path={train}",
                                            f"rollout.group.resources={{node_b: {node_b}}}"])
    return plan_placement(group_specs(cfg), cfg.cluster.colocate)

start = time.monotonic()
try:
    check_reachable(plans(2))  # no node type has 2 node_b
    print(json.dumps({"never": None}))
except PlacementError as exc:
    print(json.dumps({"never": str(exc), "seconds": time.monotonic() - start}), flush=True)
fits_later = plans(1)
check_reachable(fits_later)  # the worker type can hold it: no error, the wait decides
start = time.monotonic()
ensure_resources(fits_later, wait_s=120, poll_s=0.5,
                 log=lambda line: print(json.dumps({"log": line, "at": time.monotonic() - start}), flush=True))
import ray
print(json.dumps({"ready_after": time.monotonic() - start,
                  "nodes": [n["Resources"] for n in ray.nodes() if n["Alive"]]}), flush=True)
"""


@pytest.fixture(scope="module")
def autoscaling_cluster(root):
    """A head with 2 CPUs and no node_b; the fake provider may add one worker node {CPU: 1, node_b: 1}."""
    c = LocalCluster(root / "autoscaling", marker=root)
    config = {
        "cluster_name": "rmr1-test", "max_workers": 1, "upscaling_speed": 1.0, "idle_timeout_minutes": 5,
        "provider": {"type": "fake_multinode", "disable_launch_config_check": True, "disable_node_updaters": True,
                     "gcs_address": c.address},
        "auth": {"ssh_user": "ubuntu"}, "docker": {},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 2}, "node_config": {}, "max_workers": 0},
            "worker_b": {"resources": {"CPU": 1, "node_b": 1}, "node_config": {}, "min_workers": 0, "max_workers": 1},
        },
        "head_node_type": "ray.head.default", "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }
    (c.root).mkdir(parents=True)
    path = c.root / "autoscaling.yaml"
    path.write_text(yaml.safe_dump(config))
    try:
        c.start_head("--num-cpus=2", f"--autoscaling-config={path}",
                     env={"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"})
        yield c, path
    finally:
        c.stop()


def test_placement_fails_at_once_when_no_node_type_fits_and_waits_for_the_autoscaler_when_one_does(
    autoscaling_cluster, inputs
):
    c, autoscaling_config = autoscaling_cluster
    driver = subprocess.run(
        [sys.executable, "-c", PLACEMENT_DRIVER, str(REPO / CONFIG), str(inputs["model"]), str(inputs["train"])],
        env={**BASE_ENV, "RAY_ADDRESS": c.address}, cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert driver.returncode == 0, driver.stdout + driver.stderr
    lines = [json.loads(line) for line in driver.stdout.splitlines() if line.startswith("{")]

    never = lines[0]
    assert never["never"] is not None and never["seconds"] < 10  # no waiting for what can never come
    assert "rollout: one worker needs {CPU: 0.5, node_b: 2} on a single node; no node has that" in never["never"]
    assert f"node types from {autoscaling_config}" in never["never"]
    assert "up to 1 x worker_b {CPU: 1, node_b: 1}" in never["never"]

    logs = [line for line in lines if "log" in line]
    assert logs and logs[0]["log"].startswith("waiting up to 120 s for the cluster to grow: node_b: rollout wants 1")
    ready = lines[-1]
    assert 0 < ready["ready_after"] < 120
    [added] = [node for node in ready["nodes"] if "node_b" in node]  # the fake provider's new raylet
    assert added["node_b"] == 1 and added["CPU"] == 1
