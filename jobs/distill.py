"""`rmr1 distill`: SFT of a judge on teacher reasoning chains (RM-R1's distillation stage), on Ray Train
with DeepSpeed ZeRO-3 (gloo on CPU, NCCL on GPU).

Reads top to bottom. The driver tokenizes the SFT parquet of `rmr1 prepare` (OUT/sft/train, OUT/sft/val)
with the model's chat template, loss only on the assistant's tokens, and hands the examples to the Ray
Train workers through the object store. Each worker is one DeepSpeed rank: it builds the model sharded
(ZeRO-3), then loops over optimizer steps (length-grouped micro-batches, gradient accumulation, LR warmup
then cosine), evaluates the held-out loss, and saves checkpoints (DeepSpeed state + an HF model in hf/).

    rmr1 distill --config configs/tiny-cpu/distill.yaml            # a new run (output_dir must hold no checkpoint)
    rmr1 distill --config configs/tiny-cpu/distill.yaml --resume   # continue from the latest checkpoint, if any

Outputs under trainer.output_dir: checkpoints/step_NNNNNN/{hf/, trainer_state.json, DeepSpeed files},
final/ (the last checkpoint's HF model: `rmr1 train model.path=OUT/final` starts GRPO from it),
metrics.jsonl (+ W&B), data_stats.json, config.resolved.yaml.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
import ray.train.torch
import torch
from ray.train.backend import Backend, BackendConfig
from ray.train.collective import broadcast_from_rank_zero

from jobs.plan import add_plan_option, check_memory
from rmr1_ray.checkpoint import latest_checkpoint, load_trainer_state, save_checkpoint
from rmr1_ray.config import job_parser, parse_job_config, save_resolved
from rmr1_ray.config.distill import DistillConfig
from rmr1_ray.models import load_tokenizer
from rmr1_ray.process_group import Rendezvous
from rmr1_ray.ray_utils import init_ray
from rmr1_ray.sft import (
    SftExample,
    collate,
    lr_multiplier,
    plan_epoch,
    plan_eval,
    summed_nll,
    tokenize_example,
)
from rmr1_ray.tracking import Tracker, new_run_id
from rmr1_ray.zero import build_engine, engine_config, init_distributed, save_hf

EXAMPLE = "rmr1 distill --config configs/tiny-cpu/distill.yaml trainer.max_steps=4"


# --- driver: data ---------------------------------------------------------------------------------


def tokenize_split(path: str, tokenizer, max_length: int) -> tuple[list[SftExample], dict]:
    """SFT parquet rows (messages, response) -> examples no longer than max_length, and counts."""
    import pyarrow.parquet as pq

    rows = pq.read_table(path, columns=["messages", "response"]).to_pylist()
    examples, too_long = [], 0
    for row in rows:
        example = tokenize_example(tokenizer, row["messages"], row["response"])
        if len(example) > max_length:
            too_long += 1  # truncating would train a chain without its verdict
            continue
        examples.append(example)
    lengths = [len(e) for e in examples] or [0]
    stats = {"rows": len(rows), "kept": len(examples), "too_long": too_long,
             "tokens": int(sum(lengths)), "label_tokens": sum(e.num_label_tokens for e in examples),
             "length_max": max(lengths), "length_mean": round(float(np.mean(lengths)), 1)}
    return examples, stats


# --- worker: one DeepSpeed rank -------------------------------------------------------------------


class SftTracker(Tracker):
    def console_line(self, m: dict, step: int) -> str:
        eta = "-"
        if self._step_seconds:
            eta = f"{(self.total_steps - step) * float(np.mean(self._step_seconds)):.0f} s"
        parts = [f"step {step}/{self.total_steps}"]
        if "train/loss" in m:
            parts += [f"loss {m['train/loss']:.4f}", f"lr {m['train/lr']:.2e}", f"grad {m['train/grad_norm']:.3f}",
                      f"{m['perf/tokens_per_s']:,.0f} tok/s", f"{m['time/step']:.2f} s/step"]
        if "val/loss" in m:
            parts.append(f"val loss {m['val/loss']:.4f}")
        return " | ".join([*parts, f"ETA {eta}"])


def train_step(engine, examples: list[SftExample], plan, rank: int, world: int, pad_id: int,
               device: torch.device) -> dict:
    """One optimizer step: this rank's micro-batches, each backward its share of the step's token-mean loss."""
    import torch.distributed as dist

    start = time.perf_counter()
    totals = torch.zeros(2, dtype=torch.float64)  # summed nll, input tokens
    for indices in plan.micro_batches[rank]:
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in indices], pad_id).items()}
        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        nll, _ = summed_nll(logits, batch["labels"])
        # x world: DeepSpeed averages gradients over ranks; no 1/GA scaling: the shares already add up.
        engine.backward(nll / plan.label_tokens * world, scale_wrt_gas=False)
        engine.step()  # the optimizer steps at the accumulation boundary, i.e. after the last micro-batch
        totals += torch.tensor([nll.item(), batch["attention_mask"].sum().item()], dtype=torch.float64)
    dist.all_reduce(totals)
    seconds = time.perf_counter() - start
    return {
        "train/loss": totals[0].item() / plan.label_tokens,
        "train/grad_norm": float(engine.get_global_grad_norm()),
        "train/label_tokens": plan.label_tokens,
        "perf/tokens_per_s": totals[1].item() / seconds,
        "time/step": seconds,
    }


def evaluate(engine, examples: list[SftExample], rank: int, world: int, micro: int, pad_id: int,
             device: torch.device) -> float:
    """Token-mean loss over all held-out examples (every rank runs the same number of forwards)."""
    import torch.distributed as dist

    engine.eval()
    totals = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for indices in plan_eval(examples, micro, world)[rank]:
            batch = collate([examples[i] for i in indices or [0]], pad_id)  # [] -> a stand-in, not counted
            logits = engine(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
            if indices:
                nll, count = summed_nll(logits, batch["labels"].to(device))
                totals += torch.tensor([nll.item(), count], dtype=torch.float64)
    dist.all_reduce(totals)
    engine.train()
    return totals[0].item() / max(1.0, totals[1].item())


def save(engine, out: Path, step: int, trainer_state: dict, rank: int, config: DistillConfig) -> None:
    """ALL ranks: an atomic checkpoint (rmr1_ray.checkpoint) of DeepSpeed state + hf/ + trainer state."""
    import torch.distributed as dist

    def save_rank(directory: str | None) -> None:
        holder = [directory]
        dist.broadcast_object_list(holder, src=0)  # rank 0 has made the temporary directory: tell the others
        engine.save_checkpoint(holder[0])
        save_hf(engine, os.path.join(holder[0], "hf"), rank, config.model)
        dist.barrier()

    if rank == 0:
        save_checkpoint(out, step, trainer_state, save_rank, config.trainer.keep_last)
    else:
        save_rank(None)
    dist.barrier()  # renamed before anyone reads or saves again


class RanksBackend(Backend):
    """Ray Train's part of the set-up: every rank sees the node's GPUs, as under TorchTrainer (NCCL's
    peer-to-peer paths need them). The process group is formed by train_loop itself, through
    rmr1_ray.process_group: TorchTrainer's own rendezvous store listens on every network interface."""

    share_cuda_visible_devices = True


class RanksConfig(BackendConfig):
    @property
    def backend_cls(self) -> type[Backend]:
        return RanksBackend


def train_loop(loop_config: dict) -> None:
    """Ray Train's per-worker function: one DeepSpeed rank."""
    config = DistillConfig.model_validate(loop_config["config"])
    out, t = Path(loop_config["output_dir"]), config.trainer
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(config.cluster.omp_num_threads)
    started = time.perf_counter()
    gpu = config.cluster.device == "gpu"
    device = ray.train.torch.get_device() if gpu else torch.device("cpu")
    if gpu:
        torch.cuda.set_device(device)
    # Rank 0 listens on its node IP, the others learn where (our group, not Ray Train's: see RanksBackend).
    rendezvous = Rendezvous.open(ray.util.get_node_ip_address()) if rank == 0 else None
    address, port = broadcast_from_rank_zero(rendezvous.endpoint() if rendezvous else None)
    init_distributed(gpu, rendezvous or Rendezvous(address, port), rank, world, context.get_local_rank())
    train, val = ray.get(loop_config["train"]), ray.get(loop_config["val"])
    steps_per_epoch = len(train) // t.global_batch_size  # plan_epoch drops the last incomplete step
    total_steps = min(t.epochs * steps_per_epoch, t.max_steps or sys.maxsize)
    warmup = int(t.warmup_ratio * total_steps)
    ds_config = engine_config(t, config.model.dtype, config.gradient_accumulation_steps, world, gpu)
    engine = build_engine(config.model, t, ds_config, device,
                          lambda opt_step: lr_multiplier(opt_step, warmup, total_steps, t.min_lr_ratio))
    pad_id = loop_config["pad_token_id"]

    # Resume: the driver allowed checkpoints only with --resume, so any checkpoint here is this run's
    # (an earlier launch, or this launch before Ray Train restarted the workers).
    step, run_id = 0, loop_config["run_id"]
    checkpoint = latest_checkpoint(out)
    if checkpoint is not None:
        state = load_trainer_state(checkpoint)
        if state["steps_per_epoch"] != steps_per_epoch:
            raise ValueError(f"{checkpoint}: made with {state['steps_per_epoch']} steps per epoch, now {steps_per_epoch}: "
                             "the data or batch sizes changed, so its data position does not apply")
        path, _ = engine.load_checkpoint(str(checkpoint))
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed state in {checkpoint}")
        step, run_id = state["step"], state["run_id"]
    tracker = None
    if rank == 0:
        tracker = SftTracker(out, config.tracking, config.model_dump(mode="json"), run_id, total_steps, start_step=step)
        print(f"rank 0: {'resuming at' if step else 'starting'} step {step}/{total_steps} "
              f"({steps_per_epoch} steps per epoch, {world} ranks x {config.gradient_accumulation_steps} micro-batches "
              f"of {t.micro_batch_size}; set up in {time.perf_counter() - started:.1f} s)", flush=True)

    def log(metrics: dict, at: int) -> None:
        if tracker is not None:
            tracker.log(metrics, at)

    if val and step == 0:
        log({"val/loss": evaluate(engine, val, rank, world, t.micro_batch_size, pad_id, device)}, 0)
    plans, plans_epoch = [], -1
    while step < total_steps:
        epoch, index = divmod(step, steps_per_epoch)
        if epoch != plans_epoch:
            plans, plans_epoch = plan_epoch(train, t.global_batch_size, t.micro_batch_size, world, t.seed, epoch), epoch
        lr = engine.get_lr()[0]
        metrics = train_step(engine, train, plans[index], rank, world, pad_id, device)
        step += 1
        metrics.update({"train/lr": lr, "train/epoch": step / steps_per_epoch})
        if val and (step == total_steps or (t.eval_every and step % t.eval_every == 0)):
            metrics["val/loss"] = evaluate(engine, val, rank, world, t.micro_batch_size, pad_id, device)
        log(metrics, step)
        if step == total_steps or (t.save_every and step % t.save_every == 0):
            state = {"run_id": run_id, "epoch": epoch, "step_in_epoch": index + 1, "steps_per_epoch": steps_per_epoch}
            save(engine, out, step, state, rank, config)
    if tracker is not None:
        tracker.finish()


# --- driver ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = job_parser("rmr1 distill", __doc__, DistillConfig, EXAMPLE)
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in trainer.output_dir")
    add_plan_option(parser)
    config, args = parse_job_config(parser, DistillConfig, argv)
    check_memory(parser, config, args, "rmr1 distill")  # a plan that cannot fit ends here, before any worker
    out = Path(config.trainer.output_dir).expanduser().resolve()
    # --resume with no checkpoint yet starts afresh, so a preemptible job can always be launched with it.
    existing = latest_checkpoint(out)
    if existing is not None and not args.resume:
        parser.exit(2, f"rmr1 distill: {out} already holds checkpoints (latest: {existing.name}); "
                       "pass --resume to continue that run, or choose another trainer.output_dir\n")
    save_resolved(config, out)

    tokenizer = load_tokenizer(config.model.tokenizer, config.model.trust_remote_code)
    splits = {"train": config.data.train_path, "val": config.data.val_path}
    tokenized = {}
    for split, path in splits.items():
        try:
            tokenized[split] = tokenize_split(path, tokenizer, config.data.max_length) if path else ([], None)
        except (FileNotFoundError, pa.ArrowInvalid) as exc:  # a missing path, or not SFT parquet
            reason = "does not exist" if isinstance(exc, FileNotFoundError) else str(exc)
            parser.exit(2, f"rmr1 distill: data.{split}_path={path}: {reason}\n")
    (train, train_stats), (val, val_stats) = tokenized["train"], tokenized["val"]
    (out / "data_stats.json").write_text(json.dumps({"train": train_stats, "val": val_stats}, indent=2) + "\n")
    print(f"rmr1 distill: train {json.dumps(train_stats)}\n  val {json.dumps(val_stats)}", flush=True)
    if len(train) < config.trainer.global_batch_size:
        sys.stderr.write(f"rmr1 distill: {len(train)} training examples, fewer than one batch "
                         f"(trainer.global_batch_size={config.trainer.global_batch_size})\n")
        return 1

    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    init_ray(config.cluster.address)
    workers, gpu = config.workers, config.cluster.device == "gpu"
    resources = {"CPU": workers.num_cpus_per_worker, **workers.resources}
    if gpu:
        resources["GPU"] = workers.num_gpus_per_worker
    trainer = DataParallelTrainer(
        train_loop,
        train_loop_config={
            "config": config.model_dump(mode="json"),
            "output_dir": str(out),
            "train": ray.put(train),
            "val": ray.put(val),
            "pad_token_id": tokenizer.pad_token_id,
            "run_id": new_run_id(),  # W&B run id of a new run; a resumed run takes its checkpoint's
        },
        scaling_config=ScalingConfig(num_workers=workers.num_workers, use_gpu=gpu, resources_per_worker=resources,
                                     placement_strategy=workers.strategy),
        backend_config=RanksConfig(),
        run_config=RunConfig(
            name=f"distill-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=str(out / "ray_train"),
            failure_config=FailureConfig(max_failures=config.trainer.max_failures),
            worker_runtime_env={"env_vars": {
                "OMP_NUM_THREADS": str(config.cluster.omp_num_threads),
                "TOKENIZERS_PARALLELISM": "false",
                # Ray Train's print patch logs each print AND tees it to stdout: every console line twice.
                "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
            }},
        ),
    )
    trainer.fit()
    last = latest_checkpoint(out)
    final = export_final(last, out)
    print(f"rmr1 distill: done ({last.name}); the distilled judge: {final}", flush=True)
    return 0


def export_final(checkpoint: Path, out: Path) -> Path:
    """OUT/final: the last checkpoint's HF model, where `rmr1 train model.path=...` starts from.
    Hard links, not copies: no second copy of the weights, and pruning old checkpoints leaves it intact."""
    final, tmp = out / "final", out / "final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(checkpoint / "hf", tmp, copy_function=os.link)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


if __name__ == "__main__":
    raise SystemExit(main())
