"""Config of the GRPO (RLVR) job, `jobs/train_rlvr`. Defaults follow RM-R1's RL settings."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from rmr1_ray.config.evaluate import BenchmarkSpec
from rmr1_ray.config.sections import ClusterConfig, GroupConfig, ModelConfig, Strict, TrackingConfig
from rmr1_ray.verdict import RewardSpec


class DataConfig(Strict):
    train_path: str = Field(description="directory of prepared parquet shards (OUT/train of `rmr1 prepare`)")
    val_path: str | None = Field(None, description="held-out prepared prompts (OUT/val), judged every trainer.eval_every steps")
    shuffle: bool = True
    max_prompt_length: int = Field(4096, ge=1)
    max_bad_prompt_fraction: float = Field(
        0.0, ge=0, le=1, description="skip bad prompt rows (written to rejects.jsonl) up to this share; "
        "0: any bad row stops the job before it starts")


class RolloutConfig(Strict):
    engine: Literal["hf", "vllm"] = "hf"
    group: GroupConfig = GroupConfig()
    n_samples_per_prompt: int = Field(7, description="GRPO group size (RM-R1: 7)")
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(-1, description="-1: off")
    max_new_tokens: int = Field(8192, ge=1)
    stop: list[str] = Field(default_factory=list)
    stop_token_ids: list[int] = Field(default_factory=list)
    seed: int = 0
    # vLLM engine settings (ignored by the hf engine)
    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.6, gt=0, le=1)
    max_model_len: int | None = None
    enforce_eager: bool = True
    enable_prefix_caching: bool = True
    sleep_when_idle: bool = Field(False, description="not supported yet: must stay false")
    weight_sync: Literal["object_store", "collective", "nccl"] = Field(
        "object_store",
        description="learner -> rollout weights: through the Ray object store, or a torch.distributed group of "
        "learner rank 0 and the rollout workers (NCCL on GPU, gloo on CPU; `nccl` names the GPU case)",
    )
    weight_sync_bucket_mb: int = Field(256, ge=1, description="collective sync: bytes per broadcast bucket, in MiB")

    @model_validator(mode="after")
    def _grpo_needs_groups(self) -> RolloutConfig:
        if self.n_samples_per_prompt < 2:
            raise ValueError(
                f"rollout.n_samples_per_prompt={self.n_samples_per_prompt}: GRPO normalises rewards within a "
                "group of samples of one prompt, so it needs at least 2"
            )
        return self


class LearnerConfig(Strict):
    group: GroupConfig = GroupConfig()
    zero_stage: Literal[0, 1, 2, 3] = 3
    lr: float = Field(1e-6, gt=0)
    lr_scheduler: Literal["constant", "cosine", "linear"] = "constant"
    lr_warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = Field(1.0, gt=0)
    micro_batch_size: int = Field(1, ge=1, description="sequences per rank per forward/backward")
    offload_optimizer: bool = False
    offload_params: bool = False


class ReferenceConfig(Strict):
    """The frozen reference model (the starting policy, model.path) whose log-probs anchor the KL loss;
    used only with algorithm.use_kl_loss. It lives either in its own actor group (`group`, one whole
    unsharded model per worker) or, with `on_learner`, on the learner ranks as a second DeepSpeed
    ZeRO-3 model sharded like the policy (bf16: 2 bytes x params / ranks per GPU instead of a whole model
    per GPU, which is what lets a 32B judge's reference fit at all; and no GPUs of its own)."""

    group: GroupConfig = Field(
        GroupConfig(), description="the reference actor group; must stay at its defaults with on_learner=true")
    micro_batch_size: int = Field(
        4, ge=1, description="sequences per reference forward: per worker of the reference group, or per learner "
        "rank with on_learner=true")
    on_learner: bool = Field(
        False, description="hold the reference on the learner ranks, ZeRO-3-sharded like the policy (no "
        "optimizer), instead of in its own actor group; needs learner.zero_stage=3")

    @model_validator(mode="after")
    def _one_placement(self) -> ReferenceConfig:
        if self.on_learner and self.group != GroupConfig():
            raise ValueError(
                "reference.on_learner=true puts the reference on the learner ranks, so there is no reference "
                f"group: remove reference.group (it is set to {self.group.model_dump(exclude_defaults=True)}), e.g. "
                "with the override reference.group={}"
            )
        return self


class RewardConfig(Strict):
    group: GroupConfig = GroupConfig()
    correct: float = 1.0
    wrong: float = -1.0
    format_bonus: float = 0.0
    format_penalty: float = 0.0

    def spec(self) -> RewardSpec:
        return RewardSpec(correct=self.correct, wrong=self.wrong, format_bonus=self.format_bonus,
                          format_penalty=self.format_penalty)


class AlgorithmConfig(Strict):
    """GRPO and the variants the field uses on top of it (README: "GRPO variants"). The policy losses, loss
    aggregation and advantages are verl's `core_algos` (rmr1_ray.algorithms); dynamic sampling is
    rmr1_ray.dynamic_sampling; the overlong penalty is added by the rewarder, the overlong filter applied
    in rmr1_ray.step_batch."""

    train_batch_size: int = Field(1024, ge=1, description="prompts per GRPO step")
    ppo_mini_batch_size: int = Field(128, ge=1, description="prompts per optimizer step")
    ppo_epochs: int = Field(1, ge=1, description="passes over the step batch")
    clip_ratio: float = Field(0.2, gt=0, description="PPO clip range eps: the ratio is clipped to [1 - eps, 1 + eps]")
    clip_ratio_low: float | None = Field(
        None, gt=0, lt=1, description="the lower clip range alone, 1 - clip_ratio_low (None: clip_ratio)")
    clip_ratio_high: float | None = Field(
        None, gt=0, description="the upper clip range alone, 1 + clip_ratio_high (None: clip_ratio); DAPO's "
        "clip-higher: 0.28 with clip_ratio_low 0.2")
    policy_loss: Literal["vanilla", "gspo"] = Field(
        "vanilla", description="vanilla: PPO's token-level ratio, with verl's dual clip at 3 for A < 0; gspo: GSPO's "
        "sequence-level ratio (the geometric mean of the tokens' ratios), clipped to the same range; the GSPO "
        "paper uses loss_agg_mode=seq-mean-token-mean and clip ranges of ~3e-4 / 4e-4")
    use_kl_loss: bool = Field(True, description="a KL(policy || reference) loss term (needs the reference model)")
    kl_loss_type: Literal["kl", "abs", "mse", "low_var_kl"] = Field("low_var_kl", description="the KL estimator")
    kl_loss_coef: float = Field(0.001, ge=0, description="weight of the KL loss")
    entropy_coeff: float = Field(0.0, ge=0, description="weight of the entropy bonus (0: entropy is only logged)")
    loss_agg_mode: Literal[
        "token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean"
    ] = Field("token-mean", description="how per-token losses become one (verl's agg_loss): token-mean (DAPO), "
              "token-sum, seq-mean-token-mean (GRPO's paper, GSPO), seq-mean-token-sum, seq-mean-token-sum-norm "
              "(Dr.GRPO: sequence sums over the constant rollout.max_new_tokens)")
    norm_adv_by_std: bool = Field(
        True, description="divide GRPO advantages by the group's reward std (false: Dr.GRPO, mean-centred only)")
    overlong_filtering: bool = Field(
        False, description="DAPO's overlong filtering: samples the engine cut off (rollout.max_new_tokens, or the "
        "context length) are masked out of the loss; they still count in their group's advantages")
    overlong_buffer_len: int = Field(
        0, ge=0, description="DAPO's soft overlong punishment: a penalty that grows linearly over the last this "
        "many tokens before rollout.max_new_tokens, down to -overlong_penalty_factor (0: off)")
    overlong_penalty_factor: float = Field(
        1.0, gt=0, description="the soft overlong penalty of a sample of rollout.max_new_tokens tokens (needs "
        "overlong_buffer_len)")
    dynamic_sampling: bool = Field(
        False, description="DAPO's dynamic sampling: drop prompt groups whose rewards are all equal (their "
        "advantages are all 0) and generate more prompts until train_batch_size groups are left")
    dynamic_sampling_max_rounds: int = Field(
        4, ge=0, description="dynamic sampling: extra generation rounds per step at most; then the step trains on "
        "the groups it has, in whole PPO mini-batches, or skips its update when it has none")

    def clip_range(self) -> tuple[float, float]:
        """(low, high): the ratio is clipped to [1 - low, 1 + high]; an unset bound is clip_ratio."""
        low = self.clip_ratio if self.clip_ratio_low is None else self.clip_ratio_low
        high = self.clip_ratio if self.clip_ratio_high is None else self.clip_ratio_high
        return low, high

    @model_validator(mode="after")
    def _no_ignored_keys(self) -> AlgorithmConfig:
        def changed(key: str) -> bool:
            return getattr(self, key) != type(self).model_fields[key].default

        if self.clip_ratio_low is not None and self.clip_ratio_high is not None and changed("clip_ratio"):
            raise ValueError(f"algorithm.clip_ratio={self.clip_ratio} is not used: algorithm.clip_ratio_low and "
                             "algorithm.clip_ratio_high are both set; remove it (or one of the two, which then takes its value)")
        low, _ = self.clip_range()
        if low >= 1:
            raise ValueError(f"algorithm.clip_ratio={self.clip_ratio} is also the lower clip range, and a ratio "
                             f"bound of 1 - {low} <= 0 clips nothing; set algorithm.clip_ratio_low below 1")
        if not self.overlong_buffer_len and changed("overlong_penalty_factor"):
            raise ValueError(f"algorithm.overlong_penalty_factor={self.overlong_penalty_factor} has no effect without "
                             "the soft overlong penalty: set algorithm.overlong_buffer_len too")
        if not self.dynamic_sampling and changed("dynamic_sampling_max_rounds"):
            raise ValueError(f"algorithm.dynamic_sampling_max_rounds={self.dynamic_sampling_max_rounds} has no effect "
                             "without algorithm.dynamic_sampling=true")
        return self


class TrainerConfig(Strict):
    output_dir: str = "runs/train"
    total_steps: int = Field(1, ge=1)
    seed: int = 0
    save_every: int = Field(0, ge=0, description="checkpoint every K steps (0: only at the end)")
    keep_last: int = Field(2, ge=1)
    eval_every: int = Field(0, ge=0, description="run the `evaluation` section every K steps and at the end (0: never)")
    max_actor_restarts: int = Field(3, ge=0)


class EvaluationConfig(Strict):
    """Evaluation during training: the rollout workers judge greedily (n=1) with the current policy,
    after the step's weight sync. data.val_path gives validation verdict accuracy and reward; the
    benchmarks go through the same loaders, prompts and scorers as `rmr1 eval`."""

    benchmarks: list[BenchmarkSpec] = Field(default_factory=list)
    max_examples: int | None = Field(16, ge=1, description="first N examples of every benchmark subset (None: all)")
    max_val_prompts: int | None = Field(256, ge=1, description="first N prompts of data.val_path (None: all)")
    prompt_format: Literal["instruct", "distilled"] = Field(
        "instruct", description="the benchmarks' judge prompt format: the one the training data was prepared in"
    )
    max_new_tokens: int | None = Field(None, ge=1, description="None: rollout.max_new_tokens")
    both_orders: bool = Field(False, description="judge every benchmark pair in both positions")
    seed: int = Field(0, description="benchmark answer positions")
    before_training: bool = Field(True, description="also evaluate the starting policy, logged as step 0")


class TrainConfig(Strict):
    """A setting whose GPU path has no CPU twin running in CI is rejected (`_reject_untested_paths`)."""

    model: ModelConfig
    data: DataConfig
    rollout: RolloutConfig = RolloutConfig()
    learner: LearnerConfig = LearnerConfig()
    reference: ReferenceConfig = ReferenceConfig()
    reward: RewardConfig = RewardConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    trainer: TrainerConfig = TrainerConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    cluster: ClusterConfig = ClusterConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _batches_divide(self) -> TrainConfig:
        algo, n = self.algorithm, self.rollout.n_samples_per_prompt
        ranks = self.learner.group.num_workers
        if algo.train_batch_size % algo.ppo_mini_batch_size:
            raise ValueError(
                f"algorithm.train_batch_size={algo.train_batch_size} is not divisible by "
                f"algorithm.ppo_mini_batch_size={algo.ppo_mini_batch_size}"
            )
        mini_sequences = algo.ppo_mini_batch_size * n
        per_step = ranks * self.learner.micro_batch_size
        if mini_sequences % per_step:
            raise ValueError(
                f"a PPO mini-batch holds algorithm.ppo_mini_batch_size * rollout.n_samples_per_prompt = "
                f"{algo.ppo_mini_batch_size} * {n} = {mini_sequences} sequences, which learner.group.num_workers "
                f"* learner.micro_batch_size = {ranks} * {self.learner.micro_batch_size} = {per_step} does not divide"
            )
        if algo.train_batch_size % self.rollout.group.num_workers:
            raise ValueError(
                f"algorithm.train_batch_size={algo.train_batch_size} is not divisible by "
                f"rollout.group.num_workers={self.rollout.group.num_workers}"
            )
        per_worker = algo.train_batch_size // self.rollout.group.num_workers * n
        if per_worker % ranks:
            raise ValueError(
                f"each rollout worker's batch of algorithm.train_batch_size / rollout.group.num_workers * "
                f"rollout.n_samples_per_prompt = {per_worker} sequences goes to the learner ranks in equal shares, "
                f"which learner.group.num_workers={ranks} does not divide"
            )
        if self.trainer.eval_every and not (self.evaluation.benchmarks or self.data.val_path):
            raise ValueError(
                f"trainer.eval_every={self.trainer.eval_every} but there is nothing to evaluate: "
                "set data.val_path or evaluation.benchmarks"
            )
        self._reject_untested_paths()
        self._reference_on_learner_fits()
        self._overlong_buffer_fits()
        if self.learner.lr_warmup_steps > self.trainer.total_steps:
            raise ValueError(
                f"learner.lr_warmup_steps={self.learner.lr_warmup_steps} exceeds trainer.total_steps={self.trainer.total_steps}"
            )
        return self

    def _overlong_buffer_fits(self) -> None:
        buffer, max_new = self.algorithm.overlong_buffer_len, self.rollout.max_new_tokens
        if buffer > max_new:  # as verl's DAPO reward manager asserts
            raise ValueError(f"algorithm.overlong_buffer_len={buffer} is longer than rollout.max_new_tokens={max_new}: "
                             "the penalty's buffer is the last tokens before rollout.max_new_tokens")

    def _reference_on_learner_fits(self) -> None:
        if not self.reference.on_learner:
            return
        if not self.algorithm.use_kl_loss:
            raise ValueError("reference.on_learner=true but algorithm.use_kl_loss=false: without the KL loss there is "
                             "no reference model to place; remove reference.on_learner")
        if self.learner.zero_stage != 3:
            raise ValueError(f"reference.on_learner=true shards the reference with ZeRO-3 over the learner ranks, "
                             f"which needs learner.zero_stage=3 (got {self.learner.zero_stage})")

    def _reject_untested_paths(self) -> None:
        rollout, gpu = self.rollout, self.cluster.device == "gpu"
        if rollout.sleep_when_idle:
            raise ValueError("rollout.sleep_when_idle=true is not supported yet: nothing puts the engines to sleep "
                             "between steps, so the setting would do nothing; remove it")
        if self.cluster.colocate and gpu:
            raise ValueError("cluster.colocate=true with cluster.device=gpu is not supported yet: the groups would "
                             "share GPUs without the engines sleeping while the learner trains; use separate groups")
        tp, gpus = rollout.tensor_parallel_size, rollout.group.num_gpus_per_worker
        if tp > 1 and rollout.engine != "vllm":
            raise ValueError(f"rollout.tensor_parallel_size={tp} needs rollout.engine=vllm (the hf engine has none)")
        if gpu and rollout.engine == "vllm" and gpus != tp:
            raise ValueError(f"rollout.group.num_gpus_per_worker={gpus:g} must equal rollout.tensor_parallel_size={tp}: "
                             "each rollout worker runs one engine whose TP workers use exactly its GPUs")
        if rollout.weight_sync == "nccl" and not gpu:
            raise ValueError("rollout.weight_sync=nccl needs cluster.device=gpu; on CPU the same collective sync "
                             "runs over gloo: rollout.weight_sync=collective")
