"""The GRPO driver's pure parts: placement plans and checks, prompt batches, the step-batch join,
checkpoint files. No Ray cluster, no model."""

from __future__ import annotations

import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from rmr1_ray.batch import pad_and_assemble, with_data_index
from rmr1_ray.checkpoint import latest_checkpoint, load_trainer_state, save_checkpoint
from rmr1_ray.config.train import LearnerConfig, TrainConfig
from rmr1_ray.data.prompt_batches import DataPosition, PromptBatches, read_prompt_table
from rmr1_ray.placement import PlacementError, ensure_resources, find_shortfall, group_specs, plan_placement
from rmr1_ray.step_batch import assemble
from rmr1_ray.zero import engine_config, inference_config

pytestmark = pytest.mark.unit


def train_config(tmp_path, **sections) -> TrainConfig:
    sections.setdefault("algorithm", {"train_batch_size": 8, "ppo_mini_batch_size": 8})
    return TrainConfig(model={"path": str(tmp_path)}, data={"train_path": str(tmp_path)}, **sections)


# --- placement ------------------------------------------------------------------------------------


def test_separate_placement_has_one_group_per_actor_group(tmp_path):
    config = train_config(tmp_path, learner={"group": {"num_workers": 2, "num_cpus_per_worker": 2}})
    plans = plan_placement(group_specs(config), colocate=False)
    assert [p.name for p in plans] == ["learner", "reference", "rollout", "rewarder"]
    assert plans[0].bundles == ({"CPU": 2.0}, {"CPU": 2.0})


def test_colocated_bundles_hold_one_worker_of_each_colocated_group(tmp_path):
    gpu = {"num_cpus_per_worker": 1}
    config = train_config(
        tmp_path,
        learner={"group": {**gpu, "num_workers": 2, "num_gpus_per_worker": 0.5}},
        reference={"group": {**gpu, "num_workers": 1, "num_gpus_per_worker": 0.2}},
        rollout={"group": {**gpu, "num_workers": 2, "num_gpus_per_worker": 0.3}},
    )
    plans = plan_placement(group_specs(config), colocate=True)
    assert [p.name for p in plans] == ["learner+reference+rollout", "rewarder"]
    assert plans[0].bundles[0] == pytest.approx({"CPU": 3.0, "GPU": 1.0})
    assert plans[0].bundles[1] == pytest.approx({"CPU": 2.0, "GPU": 0.8})


def test_no_reference_group_without_the_kl_loss(tmp_path):
    config = train_config(tmp_path, algorithm={"train_batch_size": 8, "ppo_mini_batch_size": 8, "use_kl_loss": False})
    assert [s.name for s in group_specs(config)] == ["learner", "rollout", "rewarder"]


def test_no_reference_group_when_the_learner_ranks_hold_it(tmp_path):
    config = train_config(tmp_path, reference={"on_learner": True})
    assert [s.name for s in group_specs(config)] == ["learner", "rollout", "rewarder"]
    assert [p.name for p in plan_placement(group_specs(config), colocate=True)] == ["learner+rollout", "rewarder"]


def test_reference_engine_config_is_zero3_sharded_like_the_policy_without_an_optimizer():
    learner = LearnerConfig(micro_batch_size=2, offload_optimizer=True, offload_params=True)
    policy = engine_config(learner, "bfloat16", 4, 8, gpu=True)
    frozen = inference_config(learner, 3, "bfloat16", 8, gpu=True)
    assert frozen["zero_optimization"] == {"stage": 3, "stage3_gather_16bit_weights_on_model_save": False,
                                           "offload_param": {"device": "cpu", "pin_memory": True}}
    assert "offload_optimizer" in policy["zero_optimization"]
    assert (frozen["train_micro_batch_size_per_gpu"], frozen["gradient_accumulation_steps"], frozen["train_batch_size"]) \
        == (3, 1, 24)
    assert frozen["bf16"] == {"enabled": True} and learner.micro_batch_size == 2  # the policy's settings stay
    with pytest.raises(ValueError, match="ZeRO-3 only"):
        inference_config(LearnerConfig(zero_stage=2), 3, "float32", 2, gpu=False)


def test_shortfall_names_the_groups_and_what_is_missing(tmp_path):
    config = train_config(tmp_path, learner={"group": {"num_workers": 4, "num_gpus_per_worker": 1}})
    plans = plan_placement(group_specs(config), colocate=False)
    problems = find_shortfall(plans, {"CPU": 16, "GPU": 2}, [{"CPU": 16, "GPU": 2}])
    assert problems == ["GPU: learner wants 4 (4 workers x 1, learner.group): 4 in total, but the cluster has 2"]
    # enough in total, but no single node can hold one 2-GPU worker
    config = train_config(tmp_path, learner={"group": {"num_workers": 1, "num_gpus_per_worker": 2}})
    problems = find_shortfall(plan_placement(group_specs(config), False), {"CPU": 8, "GPU": 2},
                              [{"CPU": 4, "GPU": 1}, {"CPU": 4, "GPU": 1}])
    assert problems == ["learner: one worker needs {CPU: 1, GPU: 2} on a single node; no node has that"]


def test_ensure_resources_waits_for_the_cluster_to_grow(tmp_path):
    plans = plan_placement(group_specs(train_config(tmp_path)), colocate=False)  # 4 CPUs in all
    views = iter([({"CPU": 2}, [{"CPU": 2}])] * 3)  # the cluster never grows
    with pytest.raises(PlacementError, match="the cluster has 2"):
        ensure_resources(plans, 0.0, log=lambda _: None, view=lambda: next(views))
    ensure_resources(plans, 0.0, view=lambda: ({"CPU": 4}, [{"CPU": 4}]))


# --- prompt batches -------------------------------------------------------------------------------


@pytest.fixture
def prompts_dir(tmp_path):
    rows = [{"uid": f"u{i}", "messages": [{"role": "user", "content": f"q{i}"}], "winner": "model_a", "source": "s"}
            for i in range(10)]
    pq.write_table(pa.Table.from_pylist(rows[:6]), tmp_path / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist(rows[6:]), tmp_path / "part-1.parquet")
    return tmp_path


def uids(batch) -> list[str]:
    return list(batch.non_tensor_batch["uid"])


def test_prompt_batches_are_seeded_epochs_without_partial_batches(prompts_dir):
    batches = PromptBatches(read_prompt_table(prompts_dir), batch_size=4, seed=7)
    epoch0 = [uids(batches.next()) for _ in range(2)]
    assert len(set(epoch0[0] + epoch0[1])) == 8  # no prompt twice within an epoch
    third = batches.next()  # 2 rows left in epoch 0: dropped, epoch 1 starts
    assert third.meta_info == {"epoch": 1, "offset": 0} and batches.position == DataPosition(1, 4)
    assert uids(third) != epoch0[0]  # a new permutation per epoch
    assert [uids(PromptBatches(read_prompt_table(prompts_dir), 4, seed=7).next()) for _ in range(1)] == epoch0[:1]
    assert list(third.non_tensor_batch["data_index"]) == [0, 1, 2, 3]
    assert third.non_tensor_batch["messages"][0][0]["role"] == "user"


def test_prompt_batches_continue_from_a_position(prompts_dir):
    straight = PromptBatches(read_prompt_table(prompts_dir), batch_size=3, seed=1)
    for _ in range(4):
        straight.next()
    resumed = PromptBatches(read_prompt_table(prompts_dir), batch_size=3, seed=1, position=straight.position)
    assert uids(resumed.next()) == uids(straight.next())


# --- the step batch -------------------------------------------------------------------------------


def rollout_batch(indices: list[int], uid_of, response_lengths: list[int]):
    batch = pad_and_assemble(
        [[5, 6, 7]] * len(indices),
        [[9] * n for n in response_lengths],
        pad_id=0,
        rollout_log_probs=[[-1.0] * n for n in response_lengths],
        non_tensors={"uid": [uid_of(i) for i in indices], "data_index": indices},
        meta_info={"temperature": 1.0},
    )
    return batch


def piece(batch, key: str, fill) -> object:
    return with_data_index({key: torch.full(batch.batch["responses"].shape, fill, dtype=torch.float32)}, like=batch)


def test_assemble_joins_pieces_by_data_index_and_normalises_per_group():
    # two rollout batches with different response widths, handed in out of order
    first, second = rollout_batch([2, 3], lambda i: "p1", [2, 2]), rollout_batch([0, 1], lambda i: "p0", [1, 3])
    rewards = []
    for b, values in ((first, [1.0, -1.0]), (second, [1.0, 1.0])):
        t = torch.zeros(b.batch["responses"].shape)
        t[torch.arange(len(b)), b.batch["response_mask"].sum(-1) - 1] = torch.tensor(values)
        rewards.append(with_data_index({"token_level_rewards": t}, like=b))
    old = [piece(first, "old_log_probs", -1.0), piece(second, "old_log_probs", -1.0)]
    ref = [piece(second, "ref_log_probs", -2.0), piece(first, "ref_log_probs", -2.0)]
    batch, stats = assemble([([first, second], rewards, ref, old)], None, norm_adv_by_std=True)
    assert list(batch.non_tensor_batch["data_index"]) == [0, 1, 2, 3]
    assert batch.batch["responses"].shape == (4, 3)
    adv = batch.batch["advantages"][:, 0].tolist()
    assert adv[:2] == [0.0, 0.0]  # p0: equal rewards
    assert adv[2] == pytest.approx(1 / np.std([1, -1], ddof=1), rel=1e-5) and adv[3] == pytest.approx(-adv[2])
    assert stats["rollout/logprob_diff_max"] == 0.0 and stats["policy/ref_logprob_diff_max"] == 1.0
    assert not batch.batch["advantages"][batch.batch["response_mask"] == 0].any()  # 0 on padding


def test_assemble_takes_ref_and_old_log_probs_from_the_same_pieces():
    """The learner ranks holding the reference return both keys in one piece per rank; the driver hands
    the same pieces in as ref and old log-probs."""
    first, second = rollout_batch([0, 1], lambda i: "p", [2, 1]), rollout_batch([2, 3], lambda i: "q", [1, 2])
    rewards = [piece(b, "token_level_rewards", 0.0) for b in (first, second)]
    both = []
    for b, ref in ((second, -1.5), (first, -1.25)):
        shape = b.batch["responses"].shape
        both.append(with_data_index({"old_log_probs": torch.full(shape, -1.0), "ref_log_probs": torch.full(shape, ref)},
                                    like=b))
    batch, stats = assemble([([first, second], rewards, both, both)], None, norm_adv_by_std=True)
    assert batch.batch["ref_log_probs"][:, 0].tolist() == [-1.25, -1.25, -1.5, -1.5]
    assert stats["policy/ref_logprob_diff_max"] == 0.5 and stats["rollout/logprob_diff_max"] == 0.0


def test_assemble_refuses_a_lost_or_repeated_sample():
    batch = rollout_batch([0, 1], lambda i: "p", [1, 1])
    twice = rollout_batch([1], lambda i: "p", [1])
    with pytest.raises(ValueError, match="repeated"):
        assemble([([batch, twice], [piece(batch, "token_level_rewards", 0.0)], [],
                   [piece(batch, "old_log_probs", 0.0)])], None, True)
    with pytest.raises(ValueError, match=r"old_log_probs.*missing \[1\]"):
        assemble([([batch], [piece(batch, "token_level_rewards", 0.0)], [],
                   [piece(batch[[0]], "old_log_probs", 0.0)])], None, True)


# --- checkpoints ----------------------------------------------------------------------------------


def test_checkpoints_are_renamed_when_complete_and_pruned(tmp_path):
    def save_learner(directory: str) -> None:
        (tmp_path / "seen").write_text(directory)  # where the learner was told to write
        (tmp_path.joinpath(directory) / "shard.bin").write_bytes(b"x")

    for step in (1, 2, 3):
        random.random()
        path = save_checkpoint(tmp_path, step, {"data": {"epoch": 0, "offset": 4 * step}}, save_learner, keep_last=2)
        assert (tmp_path / "seen").read_text().endswith(f"step_{step:06d}.tmp")
        assert path.name == f"step_{step:06d}" and (path / "shard.bin").is_file()
    (tmp_path / "checkpoints" / "step_000004.tmp").mkdir()  # a save that crashed half-way
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000002", "step_000003", "step_000004.tmp"]
    latest = latest_checkpoint(tmp_path)
    assert latest.name == "step_000003"
    state = load_trainer_state(latest)
    assert state["step"] == 3 and state["data"] == {"epoch": 0, "offset": 12}
    assert set(state["rng"]) == {"python", "numpy", "torch"}
    json.dumps(state)  # plain JSON all the way down


def scored_round(batch, rewards: list[float]):
    """A round's rewards piece, with `rewards` on each sample's last response token."""
    t = torch.zeros(batch.batch["responses"].shape)
    t[torch.arange(len(batch)), batch.batch["response_mask"].sum(-1) - 1] = torch.tensor(rewards)
    return with_data_index({"token_level_rewards": t}, like=batch)


def test_assemble_keeps_the_chosen_groups_of_every_round():
    """Dynamic sampling: two rounds with the same uid (a prompt drawn again in a new epoch) stay two
    groups; the kept samples are renumbered 0..B-1 in round order."""
    first = rollout_batch([0, 1, 2, 3], lambda i: "pa" if i < 2 else "pb", [1, 2, 1, 2])
    second = rollout_batch([0, 1], lambda i: "pa", [3, 3])
    rounds = [([first], [scored_round(first, [1.0, -1.0, 1.0, 1.0])], [], [piece(first, "old_log_probs", -1.0)]),
              ([second], [scored_round(second, [1.0, 0.0])], [], [piece(second, "old_log_probs", -1.0)])]
    batch, _ = assemble(rounds, [[0, 1], [0, 1]], norm_adv_by_std=False)  # round 0's "pb" (all equal) dropped
    assert list(batch.non_tensor_batch["data_index"]) == [0, 1, 2, 3]
    assert list(batch.non_tensor_batch["uid"]) == ["pa"] * 4
    assert batch.batch["response_mask"].sum(-1).tolist() == [1, 2, 3, 3]
    # advantages per round: round 0's "pa" is +-1, round 1's "pa" is +-0.5 (not one group of four)
    assert batch.batch["advantages"][:, 0].tolist() == pytest.approx([1.0, -1.0, 0.5, -0.5])
    only_second, _ = assemble(rounds, [[], [0, 1]], norm_adv_by_std=False)  # a round may keep nothing
    assert list(only_second.non_tensor_batch["data_index"]) == [0, 1]
    assert only_second.batch["advantages"][:, 0].tolist() == pytest.approx([0.5, -0.5])
    with pytest.raises(ValueError, match="shorter"):  # keep names fewer rounds than the step has
        assemble(rounds, [[0, 1]], norm_adv_by_std=False)


def test_overlong_filtering_masks_truncated_samples_out_of_the_loss():
    batch = rollout_batch([0, 1, 2, 3], lambda i: "p", [3, 1, 3, 2])
    batch.non_tensor_batch["truncated"] = np.array([True, False, True, False], dtype=object)
    rounds = [([batch], [scored_round(batch, [-1.0, 1.0, -1.0, 1.0])], [], [piece(batch, "old_log_probs", -1.0)])]
    kept, stats = assemble(rounds, None, norm_adv_by_std=True, overlong_filtering=True)
    assert kept.batch["response_mask"].sum(-1).tolist() == [0, 1, 0, 2] and stats["overlong/filtered"] == 2
    # the truncated samples still count in their group's advantages (DAPO), only their loss is masked
    plain, _ = assemble(rounds, None, norm_adv_by_std=True)
    assert kept.batch["advantages"][:, 0].tolist() == plain.batch["advantages"][:, 0].tolist()
    assert plain.batch["advantages"][:, 0].tolist() == pytest.approx([-0.866, 0.866, -0.866, 0.866], abs=1e-3)
    assert "overlong/filtered" not in assemble(rounds, None, norm_adv_by_std=True)[1]
