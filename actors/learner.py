"""PolicyLearner: one DeepSpeed rank (ZeRO-3 by default) of the policy being trained with GRPO.

With reference.on_learner each rank also holds its shard of the frozen reference model (the starting
policy), as verl does: a second ZeRO-3 engine over the same ranks, without an optimizer. In bf16 it adds
2 bytes x params / ranks to each rank (a 32B reference: ~8 GB per rank over 8 ranks, where the separate
reference group needs the whole ~65 GB on every one of its GPUs), and its gathers reuse the same
prefetch buckets, one engine at a time. Its log-probs come from the same call and the same rows as the
old log-probs. It is never checkpointed: it is always model.path, on a fresh start and on a resume alike.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict

import numpy as np
import ray
import torch
import torch.distributed as dist

from rmr1_ray import algorithms as algo
from rmr1_ray.batch import DataProto, fetch, with_data_index
from rmr1_ray.config.sections import ModelConfig
from rmr1_ray.config.train import AlgorithmConfig, LearnerConfig
from rmr1_ray.process_group import Rendezvous
from rmr1_ray.weight_sync import SyncGroup, WeightLayout, model_layout, pack_state, send_weights
from rmr1_ray.zero import (
    build_engine,
    engine_config,
    full_tensors,
    inference_config,
    inference_engine,
    init_distributed,
    save_hf,
)


class PolicyLearner:
    """One rank of the trained policy: log-probs, PPO updates, full weights for sync and checkpoints.

    A plain class: the driver wraps it with `ray.remote(num_cpus=..., num_gpus=...)` and places rank i
    on bundle i of a placement group. Rendezvous (torch.distributed) goes through rank 0:

        ranks = [Remote.options(...).remote(config, i, world_size) for i in range(world_size)]
        addr, port = ray.get(ranks[0].get_master_addr_port.remote())   # rank 0 listens on its node IP
        ray.get([r.setup.remote(addr, port) for r in ranks])

    Every method below that touches the model is collective: call it on ALL ranks together.
    """

    def __init__(self, config: dict, rank: int, world_size: int) -> None:
        self.config = config  # TrainConfig.model_dump(); nothing heavy happens before setup()
        self.rank, self.world_size = rank, world_size
        self.rendezvous: Rendezvous | None = None  # of the learner ranks' own group
        self.weight_group: SyncGroup | None = None  # rank 0: with the rollout workers (collective sync)
        self._weight_rendezvous: Rendezvous | None = None
        self.engine = None
        self.reference = None  # the frozen reference's ZeRO-3 engine, with reference.on_learner
        self.model_config: ModelConfig | None = None  # validated in setup()
        self.algorithm = AlgorithmConfig.model_validate(config["algorithm"])
        self.device = torch.device("cpu")
        self.timings: dict[str, float] = {}

    def get_master_addr_port(self) -> tuple[str, int]:
        """Rank 0 only: this node's IP and a port rank 0 now listens on for the process-group rendezvous."""
        if self.rank != 0:
            raise RuntimeError("get_master_addr_port() must be asked of rank 0")
        if self.rendezvous is None:
            self.rendezvous = Rendezvous.open(ray.util.get_node_ip_address())
        return self.rendezvous.endpoint()

    # --- setup ----------------------------------------------------------------------------------

    def setup(self, master_addr: str, master_port: int) -> dict:
        start = time.perf_counter()
        cfg = self.config
        if self.rank != 0:
            self.rendezvous = Rendezvous(master_addr, master_port)
        elif self.rendezvous is None or self.rendezvous.endpoint() != (master_addr, master_port):
            raise ValueError("rank 0's setup() needs the address its get_master_addr_port() returned")
        threads = cfg["cluster"]["omp_num_threads"]
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)
        gpu = cfg["cluster"]["device"] == "gpu"
        if gpu:
            torch.cuda.set_device(0)
            self.device = torch.device("cuda", 0)
        # Ray gives each GPU actor its own CUDA_VISIBLE_DEVICES, so the local device is always index 0.
        init_distributed(gpu, self.rendezvous, self.rank, self.world_size, local_rank=0)
        settings = LearnerConfig.model_validate(cfg["learner"])
        # One optimizer step per PPO mini-batch: its sequences, spread over the ranks, in micro-batches.
        mini_batch_sequences = cfg["algorithm"]["ppo_mini_batch_size"] * cfg["rollout"]["n_samples_per_prompt"]
        grad_accum = mini_batch_sequences // (self.world_size * settings.micro_batch_size)
        ds_config = engine_config(settings, cfg["model"]["dtype"], grad_accum, self.world_size, gpu)
        self.model_config = ModelConfig.model_validate(cfg["model"])
        self.engine = build_engine(self.model_config, settings, ds_config, self.device, self._lr_lambda())
        if cfg["reference"]["on_learner"]:  # the same weights, sharded over the same ranks, frozen
            ref_config = inference_config(settings, cfg["reference"]["micro_batch_size"], cfg["model"]["dtype"],
                                          self.world_size, gpu)
            self.reference = inference_engine(self.model_config, ref_config, self.device)
        num_params = sum(getattr(p, "ds_numel", p.numel()) for p in self.engine.module.parameters())
        self.timings["setup_s"] = time.perf_counter() - start
        return {
            "node_id": self.node_id(),
            "rank": self.rank,
            "num_params": num_params,
            "setup_seconds": self.timings["setup_s"],
        }

    def _optimizer_steps_per_step(self) -> int:
        """Optimizer steps of a GRPO step with a full batch (algorithm.train_batch_size prompts)."""
        a = self.algorithm
        return a.train_batch_size // a.ppo_mini_batch_size * a.ppo_epochs

    def _lr_lambda(self):
        """DeepSpeed steps the scheduler once per optimizer step; the schedule is in GRPO steps
        (trainer.total_steps, learner.lr_warmup_steps), so the LR is constant within a step. A step with
        fewer optimizer steps (dynamic sampling's short or skipped batches) steps the scheduler up to a
        full step's count (`_finish_schedule_step`), so the schedule stays in GRPO steps."""
        learner, per_step = self.config["learner"], self._optimizer_steps_per_step()
        warmup, total, kind = learner["lr_warmup_steps"], self.config["trainer"]["total_steps"], learner["lr_scheduler"]
        return lambda opt_step: algo.lr_lambda(opt_step // per_step, warmup, total, kind)

    def _finish_schedule_step(self, optimizer_steps: int) -> None:
        for _ in range(self._optimizer_steps_per_step() - optimizer_steps):
            self.engine.lr_scheduler.step()

    # --- log-probs and updates ------------------------------------------------------------------

    def _temperature(self, batch: DataProto) -> float:
        return algo.logprob_temperature(batch.meta_info, self.config["rollout"]["temperature"])

    def compute_log_probs(self, shares: list, with_reference: bool = False) -> DataProto:
        """This rank's shares of the samples (payloads from batch.rank_payloads, or their refs; every rank
        gets as many sequences) -> {"old_log_probs": [b, R]}, and with `with_reference` (the ranks hold the
        reference: reference.on_learner) also {"ref_log_probs": [b, R]} of the same rows, in forwards of
        reference.micro_batch_size (+ data_index, which places the rows in the step batch)."""
        start = time.perf_counter()
        batch = fetch(shares)
        temperature = self._temperature(batch)
        self.engine.eval()  # as verl: no dropout when scoring (the update runs in train mode)
        micro = self.config["learner"]["micro_batch_size"]
        out = {"old_log_probs": algo.response_log_probs(self.engine, batch, micro, temperature, self.device)}
        self.timings["log_probs_s"] = time.perf_counter() - start
        if with_reference:
            if self.reference is None:
                raise RuntimeError("ref log-probs asked of a learner without the reference (reference.on_learner=false)")
            start = time.perf_counter()
            micro = self.config["reference"]["micro_batch_size"]
            out["ref_log_probs"] = algo.response_log_probs(self.reference, batch, micro, temperature, self.device)
            self.timings["ref_log_probs_s"] = time.perf_counter() - start
        return with_data_index(out, like=batch)

    def update(self, share) -> dict[str, float]:
        """PPO epochs over this rank's share of the step batch (a payload from batch.rank_payloads); one
        optimizer step per mini-batch.

        Metrics are mini-batch values (token-weighted over all ranks' micro-batches), averaged over
        the mini-batches of all epochs; grad_norm is the pre-clip norm; lr the LR of this step. A share may
        hold fewer mini-batches than a full step's (dynamic sampling trains on the groups it kept).
        """
        start = time.perf_counter()
        cfg, a = self.config, self.config["algorithm"]
        batch = fetch(share)
        mini_size = a["ppo_mini_batch_size"] * cfg["rollout"]["n_samples_per_prompt"] // self.world_size
        if len(batch) % mini_size:
            raise ValueError(
                f"each rank got {len(batch)} sequences, not a multiple of its PPO mini-batch share "
                f"{mini_size} (algorithm.ppo_mini_batch_size * rollout.n_samples_per_prompt / ranks)"
            )
        temperature = self._temperature(batch)
        lr = self.engine.get_lr()[0]
        self.engine.train()
        sums: dict[str, float] = defaultdict(float)
        grad_norms = []
        for _ in range(a["ppo_epochs"]):
            # Seeded by the optimizer step count, which checkpoints restore: a resumed run reshuffles alike.
            gen = torch.Generator().manual_seed(cfg["trainer"]["seed"] * 1_000_003 + self.engine.global_steps)
            shuffled = batch[torch.randperm(len(batch), generator=gen)]
            for mini in shuffled.split(mini_size):
                tokens, sequences = self._global_counts(mini)
                for micro in mini.split(cfg["learner"]["micro_batch_size"]):
                    for name, value in self._train_micro_batch(micro, tokens, sequences, temperature).items():
                        sums[name] += value
                norm = self.engine.get_global_grad_norm()  # None when fp16 overflow skipped the step
                grad_norms.append(float("nan") if norm is None else float(norm))
        names = sorted(sums)
        totals = torch.tensor([sums[name] for name in names], dtype=torch.float64, device=self.device)
        dist.all_reduce(totals)  # micro-batch shares of every rank add up to mini-batch values
        metrics = {name: value / len(grad_norms) for name, value in zip(names, totals.tolist(), strict=True)}
        metrics["actor/grad_norm"] = float(np.mean(grad_norms))
        metrics["actor/lr"] = lr
        self._finish_schedule_step(len(grad_norms))  # one optimizer step per mini-batch
        self.timings["update_s"] = time.perf_counter() - start
        return metrics

    def skip_update(self) -> dict[str, float]:
        """ALL ranks call, in place of update() on a step without a batch (dynamic sampling kept no
        group): no optimizer step, but the LR schedule moves on by one GRPO step."""
        lr = self.engine.get_lr()[0]
        self._finish_schedule_step(0)
        return {"actor/lr": lr}

    def _global_counts(self, mini: DataProto) -> tuple[float, float]:
        """Valid tokens and non-empty sequences of a mini-batch over all ranks (loss normalisers), at
        least 1: with algorithm.overlong_filtering a mini-batch of truncated samples has no loss token, and
        its loss is then 0, not 0 / 0."""
        mask = mini.batch["response_mask"]
        counts = torch.tensor([mask.sum(), (mask.sum(-1) > 0).sum()], dtype=torch.float64, device=self.device)
        dist.all_reduce(counts)
        return max(counts[0].item(), 1.0), max(counts[1].item(), 1.0)

    def _train_micro_batch(self, micro: DataProto, tokens: float, sequences: float, temperature: float) -> dict:
        a = self.config["algorithm"]
        data = micro.batch.to(self.device)
        mask = data["response_mask"]
        logits = algo.response_logits(self.engine, data, mask.shape[1])
        # The entropy comes from the same chunked pass as the log-probs: a loss term only with a
        # coefficient, otherwise a metric without gradient.
        entropy_mode = "loss" if a["entropy_coeff"] > 0 else "metric"
        log_probs, entropies = algo.response_token_stats(logits, data["responses"], temperature, entropy_mode)
        # Each micro-batch loss is its share of the mini-batch loss (times world size: DeepSpeed
        # averages gradients over ranks); backward without 1/GA scaling sums the shares.
        # seq-mean-token-sum-norm divides by a constant: the longest response there can be (Dr.GRPO).
        share = {"dp_size": self.world_size, "batch_num_tokens": tokens, "global_batch_size": sequences,
                 "loss_scale_factor": self.config["rollout"]["max_new_tokens"]}
        mode = a["loss_agg_mode"]
        pg_loss, pg_metrics = algo.policy_loss(
            data["old_log_probs"], log_probs, data["advantages"], mask, self.algorithm.clip_range(), mode,
            loss_mode=a["policy_loss"], **share
        )
        loss = pg_loss
        token_share = mask.sum().item() / tokens  # weight of this micro-batch's token means
        metrics = {"actor/pg_loss": pg_loss.item() / self.world_size}
        # clipfrac: either bound; _high / _low: each bound apart; _lower: verl's dual clip (ratio > 3, A < 0)
        for name in ("pg_clipfrac", "pg_clipfrac_high", "pg_clipfrac_low", "pg_clipfrac_lower", "ppo_kl"):
            metrics[f"actor/{name}"] = pg_metrics[f"actor/{name}"] * token_share
        if a["use_kl_loss"]:
            kl = algo.kl_loss(log_probs, data["ref_log_probs"], mask, a["kl_loss_type"], mode, **share)
            loss = loss + a["kl_loss_coef"] * kl
            metrics["actor/kl_loss"] = kl.item() / self.world_size
        entropy = algo.entropy_loss(entropies, mask, mode, **share)
        if a["entropy_coeff"] > 0:
            loss = loss - a["entropy_coeff"] * entropy
        metrics["actor/entropy"] = entropy.item() / self.world_size
        self.engine.backward(loss, scale_wrt_gas=False)
        self.engine.step()  # optimizer step (with grad clipping) only at the accumulation boundary
        return metrics

    # --- weights and checkpoints ------------------------------------------------------------------

    def gather_state_dict(self) -> dict | None:
        """ALL ranks call. Rank 0 returns the full weights packed for the object store (weight_sync.pack_state)."""
        start = time.perf_counter()
        tensors = full_tensors(self.engine, self.rank)
        state = pack_state(tensors, self.weight_layout()) if self.rank == 0 else None
        for _ in tensors:  # the other ranks take part in the gathers (collective), and ship nothing
            pass
        self.timings["gather_s"] = time.perf_counter() - start
        return state

    def weight_layout(self) -> WeightLayout:
        return model_layout(self.engine.module)

    def open_weight_group(self) -> tuple[str, int]:
        """Rank 0: where the rollout workers meet it for collective weight sync (a port it listens on)."""
        self._weight_rendezvous = Rendezvous.open(ray.util.get_node_ip_address())
        return self._weight_rendezvous.endpoint()

    def join_weight_group(self, address: str, port: int, rank: int, world_size: int, backend: str) -> None:
        """Rank 0 joins the weight-sync group it opened as its rank 0 (leaving an earlier one)."""
        if self.weight_group is not None:
            self.weight_group.close()
        self.weight_group = SyncGroup(backend, self._weight_rendezvous, rank, world_size, self.device)

    def send_weights(self, bucket_bytes: int) -> int:
        """ALL ranks call (the gathers are collective); rank 0 broadcasts the buckets to the rollout
        workers, which call receive_weights at the same time. Returns the bytes sent."""
        start = time.perf_counter()
        group = self.weight_group if self.rank == 0 else None
        # gathered a few parameters at a time (an eighth of a bucket), so that they add little to the buckets
        tensors = full_tensors(self.engine, self.rank, group_bytes=bucket_bytes // 8, relay_above=bucket_bytes)
        try:
            sent = send_weights(tensors, self.weight_layout(), group, bucket_bytes)
        except Exception:
            if group is not None:  # a receiver is gone: break the others' wait instead of leaving them hanging
                group.close()
                self.weight_group = None
                # The other learner ranks still gather and relay to this one: finish the walk with them, or
                # they wait forever (and the next collective of this group would pair with the wrong call).
                for _ in tensors:
                    pass
            raise
        self.timings["send_weights_s"] = time.perf_counter() - start
        return sent

    def save_hf(self, directory: str) -> None:
        """ALL ranks call. Rank 0 writes an HF model (safetensors) + tokenizer into `directory`."""
        save_hf(self.engine, directory, self.rank, self.model_config)
        dist.barrier()

    def save_checkpoint(self, directory: str) -> None:
        """ALL ranks call. DeepSpeed state (ZeRO shards, optimizer, scheduler, step) + HF model in
        directory/hf. The directory must be reachable from every rank (shared storage on clusters).
        The policy only: a reference held here is model.path, which setup() loads again on a resume."""
        self.engine.save_checkpoint(directory)
        self.save_hf(os.path.join(directory, "hf"))

    def load_checkpoint(self, directory: str) -> None:
        """ALL ranks call, after setup(): restores what save_checkpoint wrote."""
        path, _ = self.engine.load_checkpoint(directory)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint found in {directory!r}")

    def last_timings(self) -> dict[str, float]:
        """Seconds of the last setup / compute_log_probs (policy, reference) / update / gather_state_dict
        on this rank."""
        return dict(self.timings)

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()
