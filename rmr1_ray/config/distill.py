"""Config of the distillation (SFT) job, `jobs/distill` (`rmr1 distill`).

Defaults follow RM-R1's published SFT script for Qwen2.5-7B-Instruct (OpenRLHF train_sft: lr 5e-6,
1 epoch, batch 128, micro-batch 1, max_len 12288, ZeRO-3, bf16, gradient checkpointing) and
OpenRLHF's defaults for what the script leaves out (cosine_with_min_lr with min 0.1 x lr, warmup
3% of the steps, Adam betas (0.9, 0.95), no weight decay, gradient clipping 1.0).
"""

from __future__ import annotations

from pydantic import Field, model_validator

from rmr1_ray.config.sections import ClusterConfig, GroupConfig, ModelConfig, Strict, TrackingConfig


class SftDataConfig(Strict):
    train_path: str = Field(description="SFT parquet (file or directory): OUT/sft/train of `rmr1 prepare`")
    val_path: str | None = Field(None, description="held-out SFT parquet (OUT/sft/val) for the evaluation loss")
    max_length: int = Field(12288, ge=2, description="prompt + chain tokens; longer rows are skipped and counted")


class SftTrainerConfig(Strict):
    output_dir: str = Field("runs/distill", description="checkpoints/, metrics.jsonl, config.resolved.yaml")
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps (the LR schedule ends there)")
    global_batch_size: int = Field(128, ge=1, description="sequences per optimizer step, over all ranks")
    micro_batch_size: int = Field(1, ge=1, description="sequences per rank per forward/backward")
    lr: float = Field(5e-6, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="the cosine decays to lr x this")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="share of the steps with linear warmup from 0")
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = Field(1.0, gt=0)
    zero_stage: int = Field(3, ge=0, le=3)
    offload_optimizer: bool = Field(False, description="GPU only: optimizer states in CPU memory")
    offload_params: bool = Field(False, description="GPU only, ZeRO-3: parameters in CPU memory")
    eval_every: int = Field(0, ge=0, description="evaluation loss every K steps (0: only before and after training)")
    save_every: int = Field(0, ge=0, description="checkpoint every K steps (0: only at the end)")
    keep_last: int = Field(2, ge=1, description="checkpoints kept")
    seed: int = Field(0, description="data order")
    max_failures: int = Field(0, ge=0, description="Ray Train restarts of the worker group; each resumes from the latest checkpoint")


class DistillConfig(Strict):
    model: ModelConfig
    data: SftDataConfig
    trainer: SftTrainerConfig = SftTrainerConfig()
    workers: GroupConfig = Field(default_factory=GroupConfig, description="the Ray Train workers (DeepSpeed ranks)")
    cluster: ClusterConfig = ClusterConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _batches_divide(self) -> DistillConfig:
        t, ranks = self.trainer, self.workers.num_workers
        per_micro_step = ranks * t.micro_batch_size
        if t.global_batch_size % per_micro_step:
            raise ValueError(
                f"trainer.global_batch_size={t.global_batch_size} is not divisible by workers.num_workers * "
                f"trainer.micro_batch_size = {ranks} * {t.micro_batch_size} = {per_micro_step}"
            )
        if self.cluster.device == "gpu" and self.workers.num_gpus_per_worker <= 0:
            raise ValueError("cluster.device=gpu needs workers.num_gpus_per_worker > 0 (one GPU per DeepSpeed rank)")
        return self

    @property
    def gradient_accumulation_steps(self) -> int:
        return self.trainer.global_batch_size // (self.workers.num_workers * self.trainer.micro_batch_size)
