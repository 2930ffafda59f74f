"""GRPO math: thin wrappers over verl's `core_algos` with this project's config names.

Loss aggregation across data-parallel ranks and micro-batches follows verl: pass `dp_size`, the
number of valid tokens in the whole mini-batch (`batch_num_tokens`, all ranks) and the number of
non-empty sequences in it (`global_batch_size`). Each micro-batch loss is then its share of the
mini-batch loss times dp_size; summing micro-batch gradients (no 1/GA scaling) and averaging over
ranks gives exactly the gradient of the mini-batch loss, however the mini-batch is partitioned.
Without them (the defaults) the loss is the plain local aggregate. "seq-mean-token-sum-norm" also
divides by `loss_scale_factor`: verl's default for it, the padded response width, would change from
step to step here (batches are padded to their longest response), so the learner passes the constant
rollout.max_new_tokens, Dr.GRPO's normaliser.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint
from verl.trainer.ppo import core_algos
from verl.utils import torch_functional as verl_F
from verl.workers.config.actor import ActorConfig


def _global_info(
    dp_size: int, batch_num_tokens: float | None, global_batch_size: float | None, loss_scale_factor: int | None = None
) -> dict:
    return {"dp_size": dp_size, "batch_num_tokens": batch_num_tokens, "global_batch_size": global_batch_size,
            "loss_scale_factor": loss_scale_factor}


def grpo_advantages(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    uid: np.ndarray | list,
    norm_by_std: bool = True,
    epsilon: float = 1e-6,
) -> torch.Tensor:
    """Outcome advantages: (reward - group mean) / (group std + eps), broadcast over response tokens.

    A group is the samples sharing a `uid`; std is the unbiased one (as verl and the GRPO paper).
    Returns [B, R], 0 on padding. For GRPO the returns equal the advantages.
    """
    advantages, _ = core_algos.compute_grpo_outcome_advantage(
        token_level_rewards=token_level_rewards,
        response_mask=response_mask,
        index=np.asarray(uid, dtype=object),
        epsilon=epsilon,
        norm_adv_by_std_in_grpo=norm_by_std,
    )
    return advantages


PolicyLoss = Literal["vanilla", "gspo"]


def policy_loss(
    old_log_probs: torch.Tensor,
    log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    clip_ratio: float | tuple[float, float],
    loss_agg_mode: str = "token-mean",
    *,
    loss_mode: PolicyLoss = "vanilla",
    dp_size: int = 1,
    batch_num_tokens: float | None = None,
    global_batch_size: float | None = None,
    loss_scale_factor: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """verl's clipped policy-gradient loss `loss_mode`: "vanilla" (PPO's token-level ratio, with verl's
    dual-clip bound of 3 for A < 0) or "gspo" (GSPO's sequence-level ratio, no dual clip).

    clip_ratio: eps, the ratio is clipped to [1 - eps, 1 + eps]; or (low, high) for [1 - low, 1 + high]
    (DAPO's clip-higher). loss_scale_factor: the constant that "seq-mean-token-sum-norm" divides by.
    Returns (loss, metrics): verl's actor/pg_clipfrac (clipped tokens, either bound), actor/ppo_kl and
    actor/pg_clipfrac_lower (the dual clip), plus actor/pg_clipfrac_high and actor/pg_clipfrac_low
    (`clip_fractions`), token means over this micro-batch.
    """
    low, high = (clip_ratio, clip_ratio) if isinstance(clip_ratio, int | float) else clip_ratio
    # verl reads the clip range and aggregation info from its ActorConfig; building one is ~0.1 ms.
    # (Its clip_ratio is only the fallback for an unset bound: both are set.)
    config = ActorConfig(
        strategy="deepspeed",
        rollout_n=1,
        ppo_micro_batch_size_per_gpu=1,
        clip_ratio=high,
        clip_ratio_low=low,
        clip_ratio_high=high,
        loss_agg_mode=loss_agg_mode,
        global_batch_info=_global_info(dp_size, batch_num_tokens, global_batch_size, loss_scale_factor),
    )
    loss_fn = core_algos.get_policy_loss_fn(loss_mode)
    loss, metrics = loss_fn(
        old_log_prob=old_log_probs,
        log_prob=log_probs,
        advantages=advantages,
        response_mask=response_mask,
        loss_agg_mode=loss_agg_mode,
        config=config,
    )
    with torch.no_grad():
        metrics.update(clip_fractions(old_log_probs, log_probs, advantages, response_mask, low, high, loss_mode))
    return loss, metrics


def clip_fractions(
    old_log_probs: torch.Tensor,
    log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    low: float,
    high: float,
    loss_mode: PolicyLoss = "vanilla",
) -> dict[str, float]:
    """Shares of the response tokens whose ratio the loss clips at 1 + high (A > 0) and at 1 - low (A < 0).

    verl reports one fraction for both bounds (pg_clipfrac, their sum); with clip-higher the two bounds
    differ, so they are counted apart here, from the ratio verl's loss of `loss_mode` clips: the token's
    (log-ratio clamped to +-20, as verl) or, for GSPO, its sequence's (exp of the mean log-ratio over the
    response, clamped at 10, as verl).
    """
    log_ratio = log_probs - old_log_probs
    if loss_mode == "gspo":
        per_sequence = (log_ratio * response_mask).sum(-1) / response_mask.sum(-1).clamp(min=1)
        log_ratio = per_sequence.unsqueeze(-1).expand_as(log_probs).clamp(max=10.0)
    else:
        log_ratio = log_ratio.clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)
    clipped_high = (advantages > 0) & (ratio > 1 + high)
    clipped_low = (advantages < 0) & (ratio < 1 - low)
    return {
        "actor/pg_clipfrac_high": verl_F.masked_mean(clipped_high.float(), response_mask).item(),
        "actor/pg_clipfrac_low": verl_F.masked_mean(clipped_low.float(), response_mask).item(),
    }


def overlong_penalty(
    response_lengths: torch.Tensor, max_response_length: int, buffer_length: int, penalty_factor: float
) -> torch.Tensor:
    """DAPO's soft overlong punishment, added to a sample's reward: 0 up to max_response_length -
    buffer_length tokens, then falling linearly to -penalty_factor at max_response_length. [B] -> [B] float.

    verl has it inline in its DAPO reward manager only (verl/workers/reward_manager/dapo.py,
    DAPORewardManager.__call__), not as a function; its formula, term by term:
        expected_len = max_resp_len - overlong_buffer_len
        exceed_len = valid_response_length - expected_len
        overlong_reward = min(-exceed_len / overlong_buffer_len * overlong_penalty_factor, 0)
    """
    expected_length = max_response_length - buffer_length
    exceed_length = response_lengths.float() - expected_length
    return torch.clamp(-exceed_length / buffer_length * penalty_factor, max=0.0)


def kl_loss(
    log_probs: torch.Tensor,
    ref_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    kl_type: str = "low_var_kl",
    loss_agg_mode: str = "token-mean",
    *,
    dp_size: int = 1,
    batch_num_tokens: float | None = None,
    global_batch_size: float | None = None,
    loss_scale_factor: int | None = None,
) -> torch.Tensor:
    """KL(policy || reference) estimate per token (kl | abs | mse | low_var_kl), aggregated."""
    if kl_type == "full":
        # verl's kl_penalty("full") needs full-vocabulary log-probs, which we never materialise.
        raise ValueError("algorithm.kl_loss_type='full' is not supported; use low_var_kl, kl, abs or mse")
    kl = core_algos.kl_penalty(log_probs, ref_log_probs, kl_penalty=kl_type)
    return core_algos.agg_loss(
        kl, response_mask, loss_agg_mode, **_global_info(dp_size, batch_num_tokens, global_batch_size, loss_scale_factor)
    )


def entropy_loss(
    entropy: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    *,
    dp_size: int = 1,
    batch_num_tokens: float | None = None,
    global_batch_size: float | None = None,
    loss_scale_factor: int | None = None,
) -> torch.Tensor:
    """Aggregated entropy of the policy at the response positions, from the per-token entropies
    [B, R] of `response_token_stats` (subtract coef * this from the loss)."""
    return core_algos.agg_loss(
        entropy, response_mask, loss_agg_mode,
        **_global_info(dp_size, batch_num_tokens, global_batch_size, loss_scale_factor),
    )


# fp32 bytes of logits upcast at once by `response_token_stats`: the only knob of its memory (the
# memory planner reads it). A chunk's fp32 temporaries peak at a few times this (measured on CPU:
# ~1x forward / ~4.5x backward for log-probs alone, ~3.5x / ~8x with the entropy as a loss term).
LOG_PROB_CHUNK_BYTES = 128 * 2**20

# What `response_token_stats` does with the entropy: skip it, a metric (no gradient), or a loss term.
EntropyMode = Literal["none", "metric", "loss"]


def log_prob_chunk_positions(batch_size: int, vocab_size: int) -> int:
    """Response positions per chunk: LOG_PROB_CHUNK_BYTES of fp32 logits, at least one position."""
    return max(1, LOG_PROB_CHUNK_BYTES // (batch_size * vocab_size * 4))


def _chunk_token_stats(
    logits: torch.Tensor, labels: torch.Tensor, entropy: EntropyMode
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (and entropies) of one chunk [b, c, V] -> [b, c] fp32, from one fp32 upcast
    (half-precision log-softmax loses ~2 digits)."""
    fp32 = logits.float()
    # inplace_backward=False: verl's flash-attn cross-entropy (its GPU path) would otherwise write its
    # gradient into `fp32`, which the entropy's backward may still read.
    log_probs = verl_F.logprobs_from_logits(fp32, labels, inplace_backward=False)
    if entropy == "none":
        return log_probs, None
    # Last, so a checkpoint recompute stops before a metric-only entropy (nothing it needs comes after).
    with torch.set_grad_enabled(torch.is_grad_enabled() and entropy == "loss"):
        return log_probs, verl_F.entropy_from_logits(fp32)


def _checkpointed_chunk_stats(
    logits: torch.Tensor, labels: torch.Tensor, entropy: EntropyMode
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`_chunk_token_stats` whose backward recomputes its fp32 upcast instead of keeping it."""
    # No RNG is drawn, so there is no RNG state to restore for the recompute.
    return checkpoint(
        _chunk_token_stats, logits, labels, entropy, use_reentrant=False, preserve_rng_state=False
    )


def response_token_stats(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0, entropy: EntropyMode = "none"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(logits / temperature)[labels] and, unless entropy="none", the entropy of each
    position's distribution: [B, R, V], [B, R] -> ([B, R], [B, R] or None), float32.

    Divides `logits` IN PLACE by the temperature (no second [B, R, V] copy). Walks the positions in
    chunks of LOG_PROB_CHUNK_BYTES of fp32, so fp32 [B, R, V] never exists: under autograd each chunk
    is checkpointed, and its backward recomputes the fp32 upcast instead of keeping it (only views of
    `logits` and the [B, c] results are kept).
    The chunking is ours: verl's chunked helpers do not fit. `entropy_from_logits_with_chunking` keeps
    every fp32 chunk for backward, and `FusedLinearForPPO` takes the hidden states and the LM-head
    weight (partitioned under ZeRO-3), not logits. verl's per-chunk maths is used as is.
    """
    if temperature != 1.0:
        logits.div_(temperature)
    size = log_prob_chunk_positions(logits.shape[0], logits.shape[-1])
    tracked = torch.is_grad_enabled() and logits.requires_grad
    stats_of = _checkpointed_chunk_stats if tracked else _chunk_token_stats
    # split, not slicing: its backward joins the chunk gradients once, where each slice's backward
    # would add a zero-filled [B, R, V] gradient.
    chunks = zip(logits.split(size, dim=1), labels.split(size, dim=1), strict=True)
    stats = [stats_of(chunk, chunk_labels, entropy) for chunk, chunk_labels in chunks]
    log_probs = torch.cat([lp for lp, _ in stats], dim=1)
    entropies = None if entropy == "none" else torch.cat([ent for _, ent in stats], dim=1)
    return log_probs, entropies


def response_logits(model: Any, batch: Any, response_length: int) -> torch.Tensor:
    """Forward a [B, P+R] batch (a TensorDict/dict with input_ids, attention_mask, position_ids) and
    return the logits that predict the R response tokens: [B, R, V].

    `logits_to_keep` makes the LM head skip the prompt positions (prompts are long: up to 4k tokens).
    """
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        logits_to_keep=response_length + 1,
        use_cache=False,
    )
    return out.logits[:, :-1]  # position t predicts token t+1: drop the prediction after the last token


@torch.no_grad()
def response_log_probs(
    model: Any, batch: Any, micro_batch_size: int, temperature: float, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """Log-probs of the response tokens of a DataProto, forward in micro-batches: [B, R] float32 on
    CPU, 0 on padding. Every caller runs the same number of forwards for the same batch size
    (ZeRO-3 ranks must: their parameter gathers are collective)."""
    width = batch.batch["responses"].shape[1]
    outs = []
    for micro in batch.split(micro_batch_size):
        data = micro.batch.to(device)
        logits = response_logits(model, data, width)
        log_probs, _ = response_token_stats(logits, data["responses"], temperature)
        outs.append((log_probs * data["response_mask"]).cpu())
    return torch.cat(outs)


def logprob_temperature(meta_info: dict, default: float) -> float:
    """The temperature log-probs are taken at: the batch's sampling temperature (greedy -> 1)."""
    temperature = float(meta_info.get("temperature", default))
    return temperature if temperature > 0 else 1.0


def lr_lambda(step: int, warmup_steps: int, total_steps: int, kind: str = "constant") -> float:
    """LR multiplier at `step` (0-based): linear warmup from 0, then constant / cosine / linear decay to 0.

    Same values as transformers' get_{constant,cosine,linear}_schedule_with_warmup (so step 0 of a
    warmup has lr 0, as in verl and HF).
    """
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if kind == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if kind == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    raise ValueError(f"unknown lr schedule {kind!r}; expected constant, cosine or linear")
