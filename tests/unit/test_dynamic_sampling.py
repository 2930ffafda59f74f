"""DAPO's dynamic sampling (rmr1_ray.dynamic_sampling): which groups a step keeps, how many prompts a
refill round generates, what is dropped and why; and the pieces around it: refill prompt batches, the
rewarder's soft overlong penalty, the learner's LR schedule on short steps."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import torch

from actors.rewarder import VerdictRewarder
from rmr1_ray.batch import pad_and_assemble
from rmr1_ray.config.train import AlgorithmConfig
from rmr1_ray.data.prompt_batches import DataPosition, PromptBatches
from rmr1_ray.dynamic_sampling import DroppedLog, StepGroups, refill_size, round_unit

pytestmark = pytest.mark.unit

N = 2  # samples per prompt


def scored(rewards: list[list[float]], tag: str = "") -> list[dict]:
    """One round's rewarder stats (two rollout batches) for groups with these rewards."""
    rows = [(r, f"{tag}p{p}", p * N + k) for p, group in enumerate(rewards) for k, r in enumerate(group)]
    half = len(rows) // 2
    return [{"reward": [r for r, _, _ in part], "uid": [u for _, u, _ in part], "data_index": [i for _, _, i in part]}
            for part in (rows[half:], rows[:half])]  # out of order, as workers may finish


def algorithm(**kwargs) -> AlgorithmConfig:
    return AlgorithmConfig(train_batch_size=4, ppo_mini_batch_size=2, **kwargs)


def test_without_dynamic_sampling_every_group_is_kept_in_one_round():
    groups = StepGroups(algorithm(), N, round_unit=1)
    assert groups.add_round(scored([[1, 1], [-1, 1], [0, 0], [1, -1]])) == 0
    selection = groups.select()
    assert selection.keep is None and selection.num_groups == 4 and not selection.dropped and not selection.metrics


def test_equal_groups_are_dropped_and_refilled_up_to_a_full_batch():
    groups = StepGroups(algorithm(dynamic_sampling=True), N, round_unit=2)
    # 1 of 4 varied: 3 missing at a share of 1/4 -> 12 prompts wanted, capped at a batch of 4
    assert groups.add_round(scored([[1, 1], [-1, 1], [-1, -1], [-1, -1]])) == 4
    # 3 of 8 varied: 1 missing at 3/8 -> 8/3 -> 3 prompts, rounded up to the round unit of 2
    assert groups.add_round(scored([[1, -1], [1, -1], [0.5, 0.5], [-1, -1]], "r1")) == 4
    assert groups.add_round(scored([[1, -1], [-1, 1], [1, 1], [1, 1]], "r2")) == 0  # 5 varied >= 4: done
    selection = groups.select()
    # the first 4 varied groups in round order (round 0 prompt 1, round 1 prompts 0 and 1, round 2 prompt 0)
    assert selection.keep == [[2, 3], [0, 1, 2, 3], [0, 1]] and selection.num_groups == 4
    reasons = [(d["round"], d["uid"], d["reason"]) for d in selection.dropped]
    assert reasons == [(0, "p0", "equal_rewards"), (0, "p2", "equal_rewards"), (0, "p3", "equal_rewards"),
                       (1, "r1p2", "equal_rewards"), (1, "r1p3", "equal_rewards"), (2, "r2p1", "surplus"),
                       (2, "r2p2", "equal_rewards"), (2, "r2p3", "equal_rewards")]
    assert selection.dropped[3]["rewards"] == [0.5, 0.5]
    assert selection.metrics == {
        "dynamic_sampling/refill_rounds": 2, "dynamic_sampling/groups_generated": 12,
        "dynamic_sampling/groups_filtered": 7, "dynamic_sampling/groups_surplus": 1,
        "dynamic_sampling/groups_partial_mini_batch": 0, "dynamic_sampling/groups_kept": 4,
        "dynamic_sampling/skipped_update": 0,
    }


def test_after_the_last_round_the_step_trains_on_whole_mini_batches():
    groups = StepGroups(algorithm(dynamic_sampling=True, dynamic_sampling_max_rounds=1), N, round_unit=1)
    assert groups.add_round(scored([[1, -1], [1, 1], [1, 1], [1, 1]])) == 4
    assert groups.add_round(scored([[1, -1], [-1, 1], [1, 1], [1, 1]], "r1")) == 0  # the cap: 1 extra round
    selection = groups.select()  # 3 varied groups: one mini-batch of 2; the third is dropped
    assert selection.keep == [[0, 1], [0, 1]] and selection.num_groups == 2
    assert [d["reason"] for d in selection.dropped].count("partial_mini_batch") == 1
    assert selection.metrics["dynamic_sampling/groups_partial_mini_batch"] == 1
    assert selection.metrics["dynamic_sampling/skipped_update"] == 0


def test_a_step_without_a_mini_batch_of_varied_groups_skips_its_update():
    """The tiny random judge: every reward -1, so every group is filtered, round after round."""
    groups = StepGroups(algorithm(dynamic_sampling=True, dynamic_sampling_max_rounds=2), N, round_unit=2)
    sizes = [groups.add_round(scored([[-1, -1]] * 4, f"r{i}")) for i in range(3)]
    assert sizes == [4, 4, 0]  # no varied group yet: a whole batch per refill round, then the cap
    selection = groups.select()
    assert selection.num_groups == 0 and selection.keep == [[], [], []]
    assert selection.metrics["dynamic_sampling/groups_filtered"] == 12
    assert selection.metrics["dynamic_sampling/skipped_update"] == 1
    assert selection.metrics["dynamic_sampling/refill_rounds"] == 2
    # no extra rounds at all: filter only
    groups = StepGroups(algorithm(dynamic_sampling=True, dynamic_sampling_max_rounds=0), N, round_unit=2)
    assert groups.add_round(scored([[1, -1], [1, 1], [1, -1], [-1, 1]])) == 0
    assert groups.select().keep == [[0, 1, 4, 5]]  # 3 varied -> 1 mini-batch of 2


@pytest.mark.parametrize(("target", "varied", "generated", "unit", "expected"), [
    (8, 8, 8, 2, 0),   # full
    (8, 0, 8, 2, 8),   # nothing varied yet: a whole batch
    (8, 4, 8, 2, 8),   # half varied: 4 missing -> 8 prompts
    (8, 6, 8, 4, 4),   # 2 missing at 3/4 -> 2.67 -> 3 -> the unit of 4
    (8, 1, 16, 2, 8),  # at most a batch
])
def test_refill_size(target, varied, generated, unit, expected):
    assert refill_size(target, varied, generated, unit) == expected


def test_round_unit_splits_over_rollout_workers_and_learner_ranks():
    assert round_unit(rollout_workers=1, learner_ranks=2, n=4) == 1  # 4 samples split over 2 ranks
    assert round_unit(rollout_workers=2, learner_ranks=4, n=2) == 4  # each worker needs 2 prompts for 4 ranks
    assert round_unit(rollout_workers=3, learner_ranks=8, n=7) == 24


def test_dropped_groups_are_written_and_a_resume_rewrites_its_steps(tmp_path):
    log = DroppedLog(tmp_path)
    for step in (1, 2, 3):
        log.write(step, [{"round": 0, "uid": f"u{step}", "reason": "equal_rewards", "rewards": [-1.0, -1.0]}])
    log.write(4, [])
    rows = [json.loads(line) for line in (tmp_path / "dropped_groups.jsonl").read_text().splitlines()]
    assert [(r["step"], r["uid"], r["reason"]) for r in rows] == [(1, "u1", "equal_rewards"), (2, "u2", "equal_rewards"),
                                                                  (3, "u3", "equal_rewards")]
    DroppedLog(tmp_path, start_step=2)  # resumed from the step-2 checkpoint: step 3 runs again
    assert [json.loads(line)["step"] for line in (tmp_path / "dropped_groups.jsonl").read_text().splitlines()] == [1, 2]


def test_refill_rounds_draw_fewer_prompts_from_the_same_epochs():
    table = pa.Table.from_pylist([{"uid": f"u{i}", "messages": [{"role": "user", "content": str(i)}], "winner": "model_a"}
                                  for i in range(10)])
    batches = PromptBatches(table, batch_size=4, seed=0)
    whole = [batches.next(), batches.next(2)]
    assert [len(b) for b in whole] == [4, 2] and list(whole[1].non_tensor_batch["data_index"]) == [0, 1]
    assert batches.position == DataPosition(0, 6)
    assert batches.next(4).meta_info == {"epoch": 0, "offset": 6}  # 4 more still fit epoch 0
    assert batches.next(1).meta_info == {"epoch": 1, "offset": 0}  # a batch never spans two epochs
    with pytest.raises(ValueError, match="1..4 prompts, not 5"):
        batches.next(5)


def test_rewarder_adds_the_soft_overlong_penalty_to_the_reward():
    config = {"reward": {}, "rollout": {"max_new_tokens": 8},
              "algorithm": {"overlong_buffer_len": 4, "overlong_penalty_factor": 0.5}}
    rewarder = VerdictRewarder(config, 0)
    lengths = [2, 4, 6, 8]
    batch = pad_and_assemble([[5]] * 4, [[9] * n for n in lengths], pad_id=0, non_tensors={
        "response_text": ["<answer>[[A]]</answer>"] * 4, "winner": ["model_a"] * 4, "uid": ["p"] * 4,
        "data_index": list(range(4)), "truncated": [False, False, False, True]})
    rewards, stats = rewarder.score(batch)
    assert stats["overlong_penalty"] == pytest.approx([0.0, 0.0, -0.25, -0.5])
    assert stats["reward"] == pytest.approx([1.0, 1.0, 0.75, 0.5]) and all(stats["correct"])
    token_level = rewards.batch["token_level_rewards"]
    assert token_level.sum(-1).tolist() == pytest.approx(stats["reward"])
    assert token_level[3, 7].item() == pytest.approx(0.5)  # on the last response token
    assert [row["reward"] for row in rewarder.sample_rows(batch, 1)] == pytest.approx(stats["reward"])
    # off: the verdict reward alone, no penalty stats
    plain = VerdictRewarder({**config, "algorithm": {}}, 0)
    assert "overlong_penalty" not in plain.score(batch)[1] and plain.score(batch)[1]["reward"] == [1.0] * 4


def test_learner_lr_schedule_stays_in_grpo_steps_on_short_and_skipped_steps():
    """A learner's scheduler counts optimizer steps; a step with fewer mini-batches (dynamic sampling) or
    none steps it up to a full step's count."""
    from actors.learner import PolicyLearner
    from rmr1_ray import algorithms as algo

    config = {"algorithm": {"train_batch_size": 8, "ppo_mini_batch_size": 2, "ppo_epochs": 1},
              "learner": {"lr_warmup_steps": 0, "lr_scheduler": "linear"}, "trainer": {"total_steps": 4}}
    learner = PolicyLearner(config, 0, 1)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, learner._lr_lambda())
    learner.engine = SimpleNamespace(lr_scheduler=scheduler, get_lr=scheduler.get_last_lr)
    lrs = []
    for optimizer_steps in (4, 2, None):  # a full step, a short one (half the groups), a skipped one
        lrs.append(scheduler.get_last_lr()[0])
        if optimizer_steps is None:
            assert learner.skip_update() == {"actor/lr": lrs[-1]}
            continue
        for _ in range(optimizer_steps):  # what DeepSpeed does per optimizer step
            optimizer.step()
            scheduler.step()
        learner._finish_schedule_step(optimizer_steps)
    lrs.append(scheduler.get_last_lr()[0])
    assert lrs == pytest.approx([algo.lr_lambda(step, 0, 4, "linear") for step in range(4)])
    assert np.allclose(lrs, [1.0, 0.75, 0.5, 0.25])
