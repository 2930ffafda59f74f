"""GRPO with verifiable rewards (RM-R1's RL stage) on separate Ray actor groups.

    python -m jobs.train_rlvr --config configs/tiny-cpu/train.yaml [key=value ...] [--resume]
    rmr1 train ...                                                    (the same)

One step, as data. The driver holds ObjectRefs; batches move between groups through the object store:

    prompts (parquet) -> rollout.generate          -> samples (n per prompt, with rollout log-probs)
    samples           -> rewarder.score            -> rewards          }
    samples           -> reference                 -> ref log-probs    } at the same time
    samples' shares   -> learner.compute_log_probs -> old log-probs    }  (each rank reads only its share)
    all of them       -> rewarder.assemble         -> step batch with GRPO advantages, one share per rank
    rank shares       -> learner.update            -> metrics (PPO mini-batches, clip, KL loss)
    learner           -> rollout workers           weights (rollout.weight_sync: object store or collective)

The reference (algorithm.use_kl_loss) is a group of its own, one whole unsharded model per worker, by
default. With reference.on_learner the learner ranks hold it instead, ZeRO-3-sharded like the policy (as
verl does): no reference group and no GPUs of its own; in bf16, 2 bytes x params / ranks on each rank
instead of a whole model per GPU (a 32B judge's reference fits no single GPU); learner.compute_log_probs
returns the ref log-probs with the old ones, from the same shares (time/old_log_prob then covers both):

    samples' shares   -> learner.compute_log_probs -> old and ref log-probs

With algorithm.dynamic_sampling (DAPO) the first four lines are a round, repeated with more prompts while
too few groups have varied rewards (at most algorithm.dynamic_sampling_max_rounds extra rounds), and
rewarder.assemble keeps the chosen groups of every round (rmr1_ray.dynamic_sampling); a step that keeps
none skips its update and weight sync.

Every trainer.eval_every steps (and at the end) the rollout workers judge data.val_path and the
`evaluation` benchmarks greedily with the just-synced weights; the scores are logged with the step.

Outputs in trainer.output_dir: config.resolved.yaml, metrics.jsonl, samples/, checkpoints/step_N/,
final/ (the trained judge as an HF model), wandb/, dropped_groups.jsonl (dynamic sampling).
"""

from __future__ import annotations

import dataclasses
import functools
import time
import uuid
from pathlib import Path

import numpy as np
import ray

from actors.group import ActorGroup, create_placement_groups, remove_placement_groups, worker_env
from actors.learner import PolicyLearner
from actors.reference import ReferenceModel
from actors.rewarder import VerdictRewarder
from actors.rollout import RolloutWorker
from jobs.plan import add_plan_option, check_memory
from rmr1_ray.batch import DataProto
from rmr1_ray.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_trainer_state,
    restore_rng,
    save_checkpoint,
)
from rmr1_ray.cluster_capacity import check_reachable
from rmr1_ray.config import job_parser, parse_job_config, save_resolved
from rmr1_ray.config.train import TrainConfig
from rmr1_ray.data.prompt_batches import DataPosition, PromptBatches
from rmr1_ray.data.prompt_check import load_checked_prompts
from rmr1_ray.dynamic_sampling import DroppedLog, StepGroups, round_unit
from rmr1_ray.engines import check_engine
from rmr1_ray.evaluation.during_training import evaluate_policy, read_val_prompts, rollout_judge
from rmr1_ray.faults import WorkerDied
from rmr1_ray.models import load_tokenizer
from rmr1_ray.placement import PlacementError, ensure_resources, group_specs, plan_placement
from rmr1_ray.ray_utils import init_ray
from rmr1_ray.tracking import Tracker, new_run_id, rollout_metrics, wait_timed
from rmr1_ray.weight_sync import WeightSync

SAMPLE_PROMPTS_PER_BATCH = 4  # prompts per rollout batch shown in the samples table
ACTOR_CLASSES = {"learner": PolicyLearner, "reference": ReferenceModel, "rollout": RolloutWorker,
                 "rewarder": VerdictRewarder}


def build_parser():
    parser = job_parser(
        "rmr1 train",
        "GRPO (RLVR) training of a reasoning reward model on Ray actor groups.",
        TrainConfig,
        "rmr1 train --config configs/tiny-cpu/train.yaml trainer.total_steps=3",
    )
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in trainer.output_dir")
    add_plan_option(parser)
    return parser


def constructor_args(group: str, cfg: dict, index: int, num_workers: int) -> tuple:
    if group == "learner":
        return cfg, index, num_workers  # rank, world size
    if group == "reference":
        return (cfg,)
    return cfg, index


def rollout_seed(base: int, step: int, chunk: int, round_index: int = 0) -> int:
    """Sampling seed of one rollout batch: fixed by (seed, step, batch, dynamic sampling's round), not by
    which worker runs it, so a retried batch and a resumed run sample exactly the same tokens."""
    entropy = [base, step, chunk] + ([round_index] if round_index else [])
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


@dataclasses.dataclass
class Round:
    """One generation round of a step: the prompts, ObjectRefs of what the groups made of them, and the
    small summaries the driver reads."""

    prompts: DataProto
    samples: list  # rollout batches, one per rollout worker
    rewards: list
    ref_log_probs: list  # absent without the KL loss; the old_log_probs refs with reference.on_learner
    old_log_probs: list
    generated: list[dict]  # the rollout workers' summaries
    scored: list[dict]  # the rewarder's per-sample stats
    times: dict[str, float]

    def pieces(self) -> tuple[list, list, list, list]:
        return self.samples, self.rewards, self.ref_log_probs, self.old_log_probs


def generate_round(groups: dict[str, ActorGroup], config: TrainConfig, prompts: DataProto, step: int,
                   index: int) -> Round:
    """Steps 1 and 2 for one batch of prompts: generate, then rewards, ref and old log-probs at the same time."""
    learner, rollout, rewarder = groups["learner"], groups["rollout"], groups["rewarder"]
    reference = groups.get("reference")
    start = time.perf_counter()
    # 1. generate: one equal share of the prompts per rollout worker
    chunks = prompts.chunk(rollout.num_workers)
    for i, chunk in enumerate(chunks):  # chunks share one meta_info dict: give each its own
        chunk.meta_info = {**chunk.meta_info, "seed": rollout_seed(config.rollout.seed, step, i, index)}
    # each rollout batch comes with one share per learner rank: a rank fetches only its own
    outputs, generated = rollout.run("generate", chunks, num_returns=2 + learner.num_workers)
    samples = [out[0] for out in outputs]
    shares = [[out[1 + rank] for out in outputs] for rank in range(learner.num_workers)]
    times = {"time/generate": time.perf_counter() - start}

    # 2. reward, reference and old log-probs: independent, so they run at the same time
    stage_start = time.perf_counter()
    reward_calls = rewarder.dispatch("score", samples, num_returns=2)
    ref_refs = []
    if reference is not None:
        batches_of = [samples[i :: reference.num_workers] for i in range(reference.num_workers)]
        ref_refs = reference.dispatch("compute_log_probs", [b for b in batches_of if b]).refs
    ref_on_learner = config.reference.on_learner  # (the config allows it only with the KL loss)
    old_refs = learner.call_each("compute_log_probs", [(own, ref_on_learner) for own in shares])
    stages = {"reward": [refs[-1] for refs in reward_calls.refs], "old_log_prob": old_refs}
    if ref_on_learner:
        ref_refs = old_refs  # each piece holds ref_log_probs next to old_log_probs
    else:
        stages["reference"] = ref_refs
    times.update(wait_timed(stage_start, stages))
    retry_start = time.perf_counter()
    rewards, scored = rewarder.collect(reward_calls)  # re-runs the work of a rewarder that died
    rewards = [first for first, in rewards]
    times["time/reward"] += time.perf_counter() - retry_start
    return Round(prompts, samples, rewards, ref_refs, old_refs, generated, scored, times)


def sample_rows(rewarder: ActorGroup, rounds: list[Round]) -> list[dict]:
    """The samples table of a step: the scored generations of each rollout batch's first prompts, with
    their judge prompt (its last user turn) and round."""
    rows = []
    for index, r in enumerate(rounds):
        _, parts = rewarder.run("sample_rows", [(s, SAMPLE_PROMPTS_PER_BATCH) for s in r.samples])
        nt = r.prompts.non_tensor_batch
        prompt_of = {uid: messages[-1]["content"] for uid, messages in zip(nt["uid"], nt["messages"], strict=True)}
        rows += [{"prompt": prompt_of[row["uid"]], "round": index, **row} for part in parts for row in part]
    return rows


def print_evaluation(metrics: dict, step: int) -> None:
    scores = {k: v for k, v in metrics.items() if k.startswith(("val/", "eval/"))}
    print(f"eval at step {step} ({metrics['time/eval']:.1f} s): "
          + ", ".join(f"{k} {v:.3f}" for k, v in sorted(scores.items())), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    config, args = parse_job_config(parser, TrainConfig, argv)
    check_memory(parser, config, args, "rmr1 train")  # a plan that cannot fit ends here, before any actor
    trainer = config.trainer
    out = Path(trainer.output_dir)

    # Resume: the latest complete checkpoint, or a fresh start when there is none yet (so a preemptible
    # job can always be launched with --resume). A fresh run never mixes with an earlier run's files.
    checkpoint = latest_checkpoint(out)
    if checkpoint is not None and not args.resume:
        parser.exit(2, f"{parser.prog}: {out} holds checkpoints of an earlier run ({checkpoint.name}); pass --resume "
                       "to continue it or choose another trainer.output_dir\n")
    state = load_trainer_state(checkpoint) if checkpoint is not None else {}
    start_step = state.get("step", 0)
    earlier_restarts = state.get("faults", {"rollout_restarts": 0, "rewarder_restarts": 0})  # counted over launches
    save_resolved(config, out)
    check_engine(config.rollout.engine)
    # Prompt data: every shard and row checked with the policy's tokenizer before anything starts.
    try:
        tokenizer = load_tokenizer(config.model.tokenizer, config.model.trust_remote_code)
        prompt_rows = load_checked_prompts(config.data.train_path, tokenizer, config.data.max_prompt_length,
                                           config.data.max_bad_prompt_fraction, out / "rejects.jsonl")
    except (ValueError, FileNotFoundError) as exc:
        parser.exit(2, f"{parser.prog}: {exc}\n")

    # Placement: the whole plan is checked against the cluster before any actor starts.
    init_ray(config.cluster.address)
    try:
        specs = group_specs(config)
        plans = plan_placement(specs, config.cluster.colocate)
        check_reachable(plans)  # an autoscaling cluster that can never fit the plan fails now, not after the wait
        ensure_resources(plans, config.cluster.wait_for_resources_s)
    except PlacementError as exc:
        parser.exit(2, f"{parser.prog}: {exc}\n")

    cfg = config.model_dump()
    run_id = state.get("wandb_run_id") or new_run_id()
    prefix = f"rmr1-{uuid.uuid4().hex[:6]}-"  # actor names of this launch (tests look them up)
    env = worker_env(config.cluster.omp_num_threads)
    pgs = create_placement_groups(plans, prefix, timeout_s=max(60.0, config.cluster.wait_for_resources_s))
    groups: dict[str, ActorGroup] = {}
    tracker = None
    try:
        for spec in specs:
            # Only rollout and rewarder workers are restarted: a ZeRO-3 rank cannot rejoin its group.
            restarts = trainer.max_actor_restarts if spec.name in ("rollout", "rewarder") else 0
            make_args = functools.partial(constructor_args, spec.name, cfg, num_workers=spec.num_workers)
            groups[spec.name] = ActorGroup(spec.name, ACTOR_CLASSES[spec.name], spec.num_workers, spec.per_worker,
                                           pgs[spec.name], make_args, env, prefix, restarts)
        learner, rollout, rewarder = groups["learner"], groups["rollout"], groups["rewarder"]
        reference = groups.get("reference")

        start = time.perf_counter()
        master = ray.get(learner.actors[0].get_master_addr_port.remote())  # rank 0's rendezvous address
        infos = ray.get([*learner.setup(*master), *rollout.setup(), *rewarder.setup(),
                         *(reference.setup() if reference else [])])
        nodes = {name: sorted(set(group.node_ids())) for name, group in groups.items()}
        print(f"actor groups up in {time.perf_counter() - start:.1f} s: "
              + ", ".join(f"{name} {g.num_workers} worker(s) on node(s) {','.join(n[:12] for n in nodes[name])}"
                          for name, g in groups.items())
              + f"; policy has {infos[0]['num_params']:,} parameters"
              + ("; the learner ranks hold the reference" if config.reference.on_learner else ""), flush=True)

        weights = WeightSync(learner, rollout, config.rollout.weight_sync, "nccl" if config.cluster.device == "gpu" else "gloo",
                             config.rollout.weight_sync_bucket_mb * 2**20)
        if checkpoint is not None:
            learner.get(learner.call_all("load_checkpoint", str(checkpoint)))
            weights.sync()  # the rollout engines start from the checkpointed policy
            restore_rng(state["rng"])
            print(f"resumed from {checkpoint} (step {start_step})", flush=True)

        data = PromptBatches(prompt_rows, config.algorithm.train_batch_size, trainer.seed,
                             config.data.shuffle, DataPosition(**state.get("data", {})))
        tracker = Tracker(out, config.tracking, cfg, run_id, trainer.total_steps, start_step)
        if trainer.eval_every:
            judge = rollout_judge(rollout, config.evaluation.max_new_tokens or config.rollout.max_new_tokens)
            val_path, max_val = config.data.val_path, config.evaluation.max_val_prompts
            val_prompts = read_val_prompts(val_path, max_val) if val_path else []
            if start_step == 0 and config.evaluation.before_training:
                initial = evaluate_policy(judge, config, val_prompts)
                print_evaluation(initial, 0)
                tracker.log(initial, 0)

        dropped = DroppedLog(out, start_step)
        unit = round_unit(rollout.num_workers, learner.num_workers, config.rollout.n_samples_per_prompt)
        for step in range(start_step + 1, trainer.total_steps + 1):
            step_start = time.perf_counter()

            # 1.-2. generate, then rewards, reference and old log-probs (generate_round). With
            #       algorithm.dynamic_sampling, groups whose rewards are all equal are dropped and refill
            #       rounds generate more prompts until the batch is full or the rounds run out.
            step_groups = StepGroups(config.algorithm, config.rollout.n_samples_per_prompt, unit)
            rounds, size = [], config.algorithm.train_batch_size
            while size:
                rounds.append(generate_round(groups, config, data.next(size), step, len(rounds)))
                size = step_groups.add_round(rounds[-1].scored)
            selection = step_groups.select()
            dropped.write(step, selection.dropped)
            times: dict[str, float] = {}
            for r in rounds:
                times.update({key: times.get(key, 0.0) + value for key, value in r.times.items()})

            algo = config.algorithm
            if selection.num_groups:
                # 3. join the pieces and add GRPO advantages, on a rewarder worker (the driver holds no
                #    tensors); it hands back the step batch as one share per learner rank
                stage_start = time.perf_counter()
                pieces = ([r.pieces() for r in rounds], selection.keep, algo.norm_adv_by_std, algo.overlong_filtering,
                          learner.num_workers)
                [update_shares], [batch_stats] = rewarder.run("assemble", [pieces], num_returns=1 + learner.num_workers)
                times["time/advantages"] = time.perf_counter() - stage_start

                # 4. PPO update on every learner rank, each on its own share
                stage_start = time.perf_counter()
                update = learner.get(learner.call_each("update", [(own,) for own in update_shares]))[0]  # all-reduced
                times["time/update"] = time.perf_counter() - stage_start

                # 5. weight sync learner -> rollout
                sync = weights.sync()
            else:  # dynamic sampling kept no group: nothing to train on, the weights stay as they are
                varied = selection.metrics["dynamic_sampling/groups_partial_mini_batch"]
                print(f"step {step}: {varied} group(s) with varied rewards after {len(rounds)} generation round(s), "
                      f"fewer than one PPO mini-batch (algorithm.ppo_mini_batch_size={algo.ppo_mini_batch_size}): "
                      "update skipped", flush=True)
                batch_stats, sync = {}, {}
                update = learner.get(learner.call_all("skip_update"))[0]

            generated = [summary for r in rounds for summary in r.generated]
            scored = [stats for r in rounds for stats in r.scored]
            metrics = {**rollout_metrics(generated, scored), **selection.metrics, **batch_stats, **update, **sync, **times}
            # 6. evaluation of the synced policy every trainer.eval_every steps and at the end
            if trainer.eval_every and (step % trainer.eval_every == 0 or step == trainer.total_steps):
                metrics.update(evaluate_policy(judge, config, val_prompts))
                print_evaluation(metrics, step)
            metrics["time/step"] = time.perf_counter() - step_start
            metrics["perf/gen_tokens_per_s"] = metrics["perf/gen_tokens"] / times["time/generate"]
            restarts = {"rollout_restarts": earlier_restarts["rollout_restarts"] + rollout.restarts,
                        "rewarder_restarts": earlier_restarts["rewarder_restarts"] + rewarder.restarts}
            epoch = rounds[-1].prompts.meta_info["epoch"]
            metrics.update({"data/epoch": epoch, **{f"faults/{k}": v for k, v in restarts.items()}})
            tracker.log(metrics, step)
            if tracker.should_log_samples(step):
                tracker.log_samples(sample_rows(rewarder, rounds), step)

            # 7. checkpoint every trainer.save_every steps and at the end
            if step == trainer.total_steps or (trainer.save_every and step % trainer.save_every == 0):
                saved_at = time.perf_counter()
                path = save_checkpoint(
                    out, step, {"data": dataclasses.asdict(data.position), "wandb_run_id": run_id, "faults": restarts},
                    lambda directory: learner.get(learner.call_all("save_checkpoint", directory)),
                    trainer.keep_last,
                )
                print(f"saved {path} in {time.perf_counter() - saved_at:.1f} s", flush=True)

        learner.get(learner.call_all("save_hf", str(out / "final")))
        print(f"final model: {out / 'final'}", flush=True)
        return 0
    except (WorkerDied, CheckpointError) as exc:
        # A rank of a ZeRO-3 group or the reference cannot rejoin a running step, and a group out of
        # restarts has no more: the run ends here, saying who died and where to resume from.
        last = latest_checkpoint(out)
        resume = f"from step {load_trainer_state(last)['step']}" if last else "from the start (no checkpoint yet)"
        parser.exit(3, f"{parser.prog}: {exc}; resume with --resume {resume}\n")
    finally:
        if tracker is not None:
            tracker.finish()
        for group in groups.values():
            group.shutdown()
        remove_placement_groups(pgs)


if __name__ == "__main__":
    raise SystemExit(main())
