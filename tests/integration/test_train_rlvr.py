"""The GRPO job end to end on a local 2-CPU Ray cluster: 2 DeepSpeed learner ranks, 1 rollout worker
(hf engine), 1 reference, 1 rewarder, a tiny random judge, fp32.

Two launches are shared by the tests: a 3-step run (collective weight sync over gloo) during which the
rollout worker is killed after step 1, and a resume of that run from its step-2 checkpoint (object-store
sync). Both evaluate during training (held-out
prompts and an RM-Bench subset, before step 1, every 2 steps and at the end). Sampling is seeded per (step, batch), so
a restarted worker and a resumed run must reproduce the numbers exactly (up to float noise).

A random tiny judge never writes a verdict, so every reward is -1 and GRPO's advantages are 0; the
tiny config's entropy bonus gives the update a gradient, so weights, the KL term and the sync move.
The GRPO variants (algorithm.*: clip-higher, GSPO, the overlong penalty and filter, dynamic sampling)
get two launches of their own: one where a stop string makes the penalised rewards differ within
groups, and one where nothing differs, so dynamic sampling has no group to train on.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
import yaml
from safetensors.torch import load_file
from servers import write_prompt_rows

from jobs.train_rlvr import main
from rmr1_ray.data.prompt_batches import PromptBatches, read_prompt_table
from rmr1_ray.tiny import make_tiny

pytestmark = pytest.mark.integration

CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "tiny-cpu" / "train.yaml")
STEPS, PROMPTS, N = 3, 4, 4  # steps, prompts per step, samples per prompt (as in the tiny config)
VAL_PROMPTS = 4
RM_BENCH_CHAT = Path(__file__).resolve().parents[3] / "shared" / "benchmarks" / "rm_bench" / "chat_filtered.json"
EVALUATION = ["trainer.eval_every=2", "evaluation.max_examples=1", "evaluation.max_new_tokens=16",
              f"evaluation.benchmarks=[{{name: rm_bench, path: {RM_BENCH_CHAT}}}]"]
# Per-step numbers that depend only on data, seeds and weights (not on timing or faults).
DETERMINISTIC = ["reward/mean", "reward/std", "response_length/mean", "perf/gen_tokens", "actor/pg_loss",
                 "actor/kl_loss", "actor/entropy", "actor/ppo_kl", "actor/grad_norm", "actor/lr",
                 "policy/ref_logprob_diff_max"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tiny") / "model", seed=0)


def prepared_prompts(out: Path, count: int, seed: int) -> Path:
    """`count` judge prompts in the prepared-parquet layout (uid, messages, winner, source) under `out`."""
    out.mkdir()
    write_prompt_rows(out / "part-00000.parquet", count, seed, fmt="instruct")
    return out


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory) -> Path:
    return prepared_prompts(tmp_path_factory.mktemp("data") / "train", 12, seed=0)  # 3 steps' worth


@pytest.fixture(scope="module")
def val_dir(tmp_path_factory) -> Path:
    return prepared_prompts(tmp_path_factory.mktemp("data") / "val", VAL_PROMPTS, seed=1)


@pytest.fixture(scope="module")
def cluster():
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1")
    yield
    ray.shutdown()


def args(tiny: Path, train_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", CONFIG, f"model.path={tiny}", f"data.train_path={train_dir}", f"trainer.output_dir={out}", *extra]


def metrics(out: Path) -> dict[int, dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return {row["step"]: row for row in map(json.loads, lines)}


def after_first_step(out: Path, action) -> threading.Thread:
    """Run `action()` in a thread as soon as the run writing to `out` has logged step 1."""

    def watch() -> None:
        while not (out / "metrics.jsonl").exists() or 1 not in metrics(out):
            time.sleep(0.05)
        action()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def kill_rollout_after_first_step(out: Path) -> threading.Thread:
    """Kill the rollout worker (by its actor name) as soon as step 1 is logged: step 2 then finds it dead."""

    def kill() -> None:
        [name] = [n for n in ray.util.list_named_actors() if n.endswith("-rollout-0")]
        ray.kill(ray.get_actor(name), no_restart=True)

    return after_first_step(out, kill)


@pytest.fixture(scope="module")
def run(cluster, tiny, train_dir, val_dir, tmp_path_factory) -> Path:
    """3 steps, a checkpoint per step (the last 2 kept), W&B offline, rollout worker killed after step 1,
    weights synced over the collective group (gloo)."""
    out = tmp_path_factory.mktemp("run")
    killer = kill_rollout_after_first_step(out)
    assert main(args(tiny, train_dir, out, "tracking.wandb_mode=offline", f"data.val_path={val_dir}", *EVALUATION,
                     "rollout.weight_sync=collective")) == 0
    killer.join(timeout=5)
    assert not killer.is_alive()
    return out


@pytest.fixture(scope="module")
def resumed(run, tiny, train_dir, val_dir, tmp_path_factory) -> Path:
    """A new launch that continues the run from its step-2 checkpoint, syncing through the object store."""
    out = tmp_path_factory.mktemp("resumed")
    shutil.copytree(run / "checkpoints" / "step_000002", out / "checkpoints" / "step_000002")
    assert main(args(tiny, train_dir, out, "tracking.wandb_mode=disabled", f"data.val_path={val_dir}", *EVALUATION,
                     "--resume")) == 0
    return out


@pytest.fixture(scope="module")
def reference_on_learner(cluster, tiny, train_dir, tmp_path_factory) -> tuple[Path, list[str]]:
    """2 steps with the reference held by the 2 learner ranks (reference.on_learner) -> (output dir, the
    names of the actors alive during step 2)."""
    out = tmp_path_factory.mktemp("on_learner")
    alive: list[str] = []
    watcher = after_first_step(out, lambda: alive.extend(ray.util.list_named_actors()))
    assert main(args(tiny, train_dir, out, "tracking.wandb_mode=disabled", "trainer.total_steps=2",
                     "tracking.samples_table_every=0", "learner.group.num_workers=2", "reference.on_learner=true",
                     "reference.group={}")) == 0
    watcher.join(timeout=5)
    return out, alive


def test_three_steps_train_the_policy(run, tiny):
    logged = metrics(run)
    assert sorted(logged) == [0, 1, 2, 3]  # step 0: the evaluation before training
    for row in (logged[step] for step in (1, 2, 3)):
        assert row["data/num_samples"] == PROMPTS * N and row["data/num_prompts"] == PROMPTS
        assert row["reward/mean"] == -1.0 and row["verdict/accuracy"] == 0.0  # a random judge never wins
        assert 0 < row["response_length/mean"] <= 32
        assert row["actor/grad_norm"] > 0 and row["actor/lr"] == pytest.approx(1e-3)
        assert row["perf/gen_tokens_per_s"] > 0
        for stage in ("generate", "reward", "reference", "old_log_prob", "advantages", "update", "sync", "step"):
            assert row[f"time/{stage}"] > 0
    assert logged[3]["actor/kl_loss"] > 0  # the policy has left the reference

    before, after = load_file(tiny / "model.safetensors"), load_file(run / "final" / "model.safetensors")
    assert before.keys() == after.keys()
    moved = max((after[k] - before[k]).abs().max().item() for k in before)
    assert moved > 1e-3, f"final weights equal the initial ones (max change {moved})"
    assert (run / "config.resolved.yaml").is_file() and list((run / "wandb").glob("offline-run-*"))
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step_000002", "step_000003"]


def test_evaluation_during_training(run):
    logged = metrics(run)
    evaluated = [step for step, row in logged.items() if "val/accuracy" in row]
    assert evaluated == [0, 2, 3]  # before training, every 2 steps, and at the end
    for step in evaluated:
        row = logged[step]
        assert row["val/num_prompts"] == VAL_PROMPTS
        # A random judge writes no verdict: every held-out judgement is unparseable and earns the wrong reward.
        assert (row["val/accuracy"], row["val/error_rate"], row["val/reward_mean"]) == (0.0, 1.0, -1.0)
        # RM-Bench through rmr1 eval's scorers: 1 example = 9 style comparisons, none with a verdict.
        assert row["eval/rm_bench/error_rate"] == 1.0
        for metric in ("easy_acc", "normal_acc", "hard_acc", "chat", "total_avg_acc"):
            assert row[f"eval/rm_bench/{metric}"] == 0.0, metric
        assert row["time/eval"] > 0
    assert "reward/mean" not in logged[0] and "eval/rm_bench/chat" not in logged[1]


def test_rollout_log_probs_match_the_learner_after_each_sync(run):
    for step, row in ((s, r) for s, r in metrics(run).items() if s > 0):
        # Steps 2 and 3 sample with synced weights (step 2 on a restarted worker that replayed them).
        assert row["rollout/logprob_diff_max"] < 1e-4, step
    # ...and the weights did move away from the start, so the agreement is not trivial.
    assert metrics(run)[3]["policy/ref_logprob_diff_max"] > 1e-2


def test_killed_rollout_worker_is_restarted_and_no_prompt_is_lost_or_repeated(run, train_dir):
    logged = metrics(run)
    assert [logged[s]["faults/rollout_restarts"] for s in (1, 2, 3)] == [0, 1, 1]
    # Every step trained on exactly its own prompts, each with n samples numbered 0..B*n-1 once.
    expected = PromptBatches(read_prompt_table(train_dir), PROMPTS, seed=0)
    for step in (1, 2, 3):
        samples = [json.loads(line) for line in (run / "samples" / f"step_{step:06d}.jsonl").read_text().splitlines()]
        want = list(expected.next().non_tensor_batch["uid"])
        assert [s["uid"] for s in samples] == [uid for uid in want for _ in range(N)]
        assert [s["data_index"] for s in samples] == list(range(PROMPTS * N))


def test_resume_reproduces_step_three(run, resumed):
    uninterrupted, again = metrics(run), metrics(resumed)
    assert sorted(again) == [3]  # no step-0 evaluation on a resume
    assert again[3]["faults/rollout_restarts"] == 1  # the restart before the checkpoint still counts
    for key in [*DETERMINISTIC, "val/accuracy", "eval/rm_bench/error_rate"]:
        assert again[3][key] == pytest.approx(uninterrupted[3][key], rel=1e-4, abs=1e-6), key
    first, second = load_file(run / "final" / "model.safetensors"), load_file(resumed / "final" / "model.safetensors")
    assert max((first[k] - second[k]).abs().max().item() for k in first) < 1e-5


def test_more_learner_ranks_than_cpus_fails_before_any_actor_starts(cluster, tiny, train_dir, tmp_path, capsys):
    placement_groups = len(ray.util.placement_group_table())
    with pytest.raises(SystemExit) as exit_info:
        main(args(tiny, train_dir, tmp_path, "learner.group.num_workers=4", "learner.group.num_cpus_per_worker=1"))
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert "learner wants 4 (4 workers x 1, learner.group)" in message
    assert "the cluster has 2" in message
    assert len(ray.util.placement_group_table()) == placement_groups  # nothing was reserved...
    assert not [n for n in ray.util.list_named_actors() if "-learner-" in n]  # ...and no actor started


def test_reference_on_the_learner_ranks(reference_on_learner):
    out, alive = reference_on_learner
    assert [n for n in alive if n.endswith("-learner-1")] and not [n for n in alive if "-reference-" in n]
    logged = metrics(out)
    assert sorted(logged) == [1, 2]
    # Step 1: the policy is the starting model, so its old log-probs are the reference's.
    assert logged[1]["policy/ref_logprob_diff_max"] < 1e-6
    # Step 2: the policy has moved; the reference has not.
    assert logged[2]["policy/ref_logprob_diff_max"] > 1e-3
    assert logged[1]["actor/kl_loss"] >= 0 and logged[2]["actor/kl_loss"] > 0
    assert "time/reference" not in logged[1] and logged[1]["time/old_log_prob"] > 0  # one call computes both
    saved = yaml.safe_load((out / "config.resolved.yaml").read_text())
    assert saved["reference"]["on_learner"] is True


def test_reference_on_the_learner_ranks_trains_as_the_reference_group(run, reference_on_learner):
    """The same data, seeds and starting weights: the same two steps as with the reference group."""
    with_group, on_learner = metrics(run), metrics(reference_on_learner[0])
    for step in (1, 2):
        for key in DETERMINISTIC:
            assert on_learner[step][key] == pytest.approx(with_group[step][key], rel=1e-4, abs=1e-6), (step, key)


# --- GRPO variants (algorithm.*) ---------------------------------------------------------------------

# GSPO with its paper's clip ranges (sequence ratios stay close to 1), higher above than below
VARIANTS = ["algorithm.clip_ratio_low=0.0003", "algorithm.clip_ratio_high=0.0004", "algorithm.policy_loss=gspo",
            "algorithm.loss_agg_mode=seq-mean-token-mean",
            "algorithm.overlong_filtering=true", "algorithm.overlong_buffer_len=4", "algorithm.overlong_penalty_factor=0.5",
            "algorithm.dynamic_sampling=true", "tracking.wandb_mode=disabled", "trainer.save_every=0"]


def penalty(tokens: int, max_new_tokens: int) -> float:
    """DAPO's soft overlong penalty with the buffer 4 and factor 0.5 of VARIANTS."""
    return min(-(tokens - (max_new_tokens - 4)) / 4 * 0.5, 0.0)


def dropped_groups(out: Path) -> list[dict]:
    path = out / "dropped_groups.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def variants(cluster, tiny, train_dir, tmp_path_factory) -> Path:
    """2 steps with DAPO's clip-higher, GSPO's loss, overlong penalty and filtering, and dynamic sampling.
    A stop string the random judge often writes ends its samples at varied lengths, some cut off at 8
    tokens: the penalty makes rewards differ within most groups, and not within some."""
    out = tmp_path_factory.mktemp("variants")
    assert main(args(tiny, train_dir, out, *VARIANTS, "algorithm.dynamic_sampling_max_rounds=2", "rollout.stop=[a]",
                     "rollout.max_new_tokens=8", "trainer.total_steps=2")) == 0
    return out


def test_grpo_variants_train_on_the_groups_with_varied_rewards(variants):
    logged, dropped = metrics(variants), dropped_groups(variants)
    for step in (1, 2):
        row = logged[step]
        samples = [json.loads(line) for line in (variants / "samples" / f"step_{step:06d}.jsonl").read_text().splitlines()]
        # every generated sample: reward = the verdict's -1 + the soft overlong penalty of its length
        assert len(samples) == row["data/num_samples"] == row["dynamic_sampling/groups_generated"] * N
        for s in samples:
            assert s["reward"] == pytest.approx(-1.0 + penalty(s["response_tokens"], 8)), s
            assert s["response_tokens"] == 8 or not s["truncated"]  # cut off at max_new_tokens, or ended by "a"
        assert row["overlong/penalty_mean"] == pytest.approx(np.mean([s["reward"] + 1 for s in samples]))
        assert row["overlong/penalized"] == sum(s["response_tokens"] > 4 for s in samples)
        assert row["response_length/truncated"] == sum(s["truncated"] for s in samples)

        # groups: kept + dropped = generated; a dropped group is in dropped_groups.jsonl with its reason
        mine = [d for d in dropped if d["step"] == step]
        kept = row["dynamic_sampling/groups_kept"]
        assert kept + len(mine) == row["dynamic_sampling/groups_generated"]
        assert row["dynamic_sampling/groups_filtered"] == sum(d["reason"] == "equal_rewards" for d in mine)
        assert all(len(set(d["rewards"])) == 1 for d in mine if d["reason"] == "equal_rewards")
        groups = {}
        for s in samples:
            groups.setdefault((s["round"], s["uid"]), []).append(s)
        varied = {key for key, group in groups.items() if len({s["reward"] for s in group}) > 1}
        assert row["dynamic_sampling/groups_filtered"] == len(groups) - len(varied)
        # a full batch, or after the last round whole PPO mini-batches of 2 prompts
        assert kept == (PROMPTS if len(varied) >= PROMPTS else len(varied) - len(varied) % 2)

        # overlong filtering: the kept samples that were cut off are out of the loss
        dropped_keys = {(d["round"], d["uid"]) for d in mine}
        trained = [s for key, group in groups.items() if key not in dropped_keys for s in group]
        assert len(trained) == kept * N and row["overlong/filtered"] == sum(s["truncated"] for s in trained)

        # the update ran with clip-higher and GSPO: the two bounds' clip fractions add up to verl's one
        assert row["dynamic_sampling/skipped_update"] == 0 and row["actor/grad_norm"] > 0
        assert row["actor/pg_clipfrac_high"] + row["actor/pg_clipfrac_low"] == pytest.approx(row["actor/pg_clipfrac"])
        assert row["actor/pg_clipfrac_lower"] == 0.0  # GSPO has no dual clip
        assert row["time/update"] > 0 and row["time/sync"] > 0
    assert any(logged[step]["dynamic_sampling/groups_filtered"] for step in (1, 2))  # the filter did filter
    assert any(logged[step]["actor/pg_clipfrac"] > 0 for step in (1, 2))  # and the clip did clip
    saved = yaml.safe_load((variants / "config.resolved.yaml").read_text())["algorithm"]
    assert (saved["clip_ratio_low"], saved["clip_ratio_high"], saved["policy_loss"]) == (0.0003, 0.0004, "gspo")


def test_dynamic_sampling_without_any_varied_group_skips_the_update(cluster, tiny, train_dir, tmp_path, capsys):
    """The random judge never ends a sample before max_new_tokens and never writes a verdict: every
    sample's reward is -1 - 0.5, every group is filtered, in the first round and the one refill round.
    The step then trains on nothing: it says so, skips the update and the sync, and the run ends normally."""
    assert main(args(tiny, train_dir, tmp_path, *VARIANTS, "algorithm.dynamic_sampling_max_rounds=1",
                     "trainer.total_steps=1", "tracking.samples_table_every=0")) == 0
    row = metrics(tmp_path)[1]
    assert row["reward/mean"] == pytest.approx(-1.5) and row["reward/std"] == 0.0
    assert row["overlong/penalized"] == row["response_length/truncated"] == 2 * PROMPTS * N
    assert (row["dynamic_sampling/refill_rounds"], row["dynamic_sampling/groups_generated"],
            row["dynamic_sampling/groups_filtered"], row["dynamic_sampling/groups_kept"],
            row["dynamic_sampling/skipped_update"]) == (1, 2 * PROMPTS, 2 * PROMPTS, 0, 1)
    assert row["actor/lr"] == pytest.approx(1e-3)
    assert not [key for key in row if key.startswith(("actor/pg_", "time/update", "time/sync", "overlong/filtered"))]
    assert "update skipped" in capsys.readouterr().out
    assert [(d["round"], d["reason"]) for d in dropped_groups(tmp_path)] == [(0, "equal_rewards")] * PROMPTS + \
        [(1, "equal_rewards")] * PROMPTS
    before, after = load_file(tiny / "model.safetensors"), load_file(tmp_path / "final" / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing was trained
