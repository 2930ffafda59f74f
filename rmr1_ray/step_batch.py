"""Join the pieces of one GRPO step into the batch the learner trains on, and add GRPO advantages.

The pieces come from different actor groups, each in its own order and padding: rollout batches (one
per rollout worker), rewards (one per rollout batch), reference and old log-probs (one slice per
worker or rank; when the learner ranks hold the reference, the same slices carry both). Every piece
carries `data_index`, the sample's place in the step batch, and the join checks that each key covers
every sample exactly once: a sample lost or counted twice (say, by a retried rollout) is an error here,
not a silent bias in the update.

The driver has a rewarder worker run it, so the tensors never pass through the driver.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from rmr1_ray.algorithms import grpo_advantages
from rmr1_ray.batch import DataProto, concat


def _indices(batch: DataProto) -> np.ndarray:
    return np.asarray(batch.non_tensor_batch["data_index"], dtype=np.int64)


def _check_cover(indices: np.ndarray, size: int, what: str) -> None:
    counts = np.bincount(indices, minlength=size) if len(indices) else np.zeros(size, dtype=np.int64)
    if len(counts) > size or (counts != 1).any():
        lost = np.flatnonzero(counts[:size] == 0).tolist()
        twice = np.flatnonzero(counts > 1).tolist()
        raise ValueError(f"{what}: samples must cover data_index 0..{size - 1} once; missing {lost[:10]}, repeated {twice[:10]}")


def _join(batch: DataProto, parts: list[DataProto], key: str) -> None:
    """Put parts' [b, r] `key` tensors into batch at their data_index rows (right-padded to R)."""
    width = batch.batch["responses"].shape[1]
    out = torch.zeros(len(batch), width, dtype=parts[0].batch[key].dtype)
    indices = np.concatenate([_indices(p) for p in parts])
    _check_cover(indices, len(batch), key)
    for part in parts:
        values = part.batch[key]
        out[torch.as_tensor(_indices(part))] = F.pad(values, (0, width - values.shape[1]))
    batch.batch[key] = out


def assemble(
    rollouts: list[DataProto],
    rewards: list[DataProto],
    ref_log_probs: list[DataProto],
    old_log_probs: list[DataProto],
    norm_adv_by_std: bool,
) -> tuple[DataProto, dict[str, float]]:
    """-> (step batch sorted by data_index with token_level_rewards, ref/old log-probs, advantages and
    returns; diagnostics). Sorting keeps a prompt's n samples contiguous, so the learner's equal
    rank slices hold whole GRPO groups."""
    batch = concat(rollouts)
    order = np.argsort(_indices(batch), kind="stable")
    batch = batch[order]
    _check_cover(_indices(batch), len(batch), "rollout samples")
    _join(batch, rewards, "token_level_rewards")
    if ref_log_probs:  # absent when the KL loss is off
        _join(batch, ref_log_probs, "ref_log_probs")
    _join(batch, old_log_probs, "old_log_probs")

    t = batch.batch
    advantages = grpo_advantages(t["token_level_rewards"], t["response_mask"], batch.non_tensor_batch["uid"], norm_adv_by_std)
    t["advantages"] = advantages
    t["returns"] = advantages

    mask = t["response_mask"].bool()
    # The engine's log-probs of its own samples vs the learner's before the update: equal up to
    # numerics when the weight sync is right (fp32: ~1e-6; bf16 vLLM vs DeepSpeed: ~0.1).
    diff = (t["rollout_log_probs"] - t["old_log_probs"])[mask].abs()
    seq_adv = advantages[:, 0]  # GRPO broadcasts one value over a sequence's tokens
    stats = {
        "rollout/logprob_diff_max": diff.max().item(),
        "rollout/logprob_diff_mean": diff.mean().item(),
        "advantages/mean": seq_adv.mean().item(),
        "advantages/abs_max": seq_adv.abs().max().item(),
    }
    if ref_log_probs:  # how far the policy has moved from the reference: shows the sync above is not trivial
        stats["policy/ref_logprob_diff_max"] = (t["old_log_probs"] - t["ref_log_probs"])[mask].abs().max().item()
    return batch, stats


def assemble_from_refs(
    rollouts: list, rewards: list, ref_log_probs: list, old_log_probs: list, norm_adv_by_std: bool
) -> tuple[DataProto, dict[str, float]]:
    """`assemble` for lists of ObjectRefs (Ray resolves only top-level arguments), inside an actor."""
    import ray

    return assemble(ray.get(rollouts), ray.get(rewards), ray.get(ref_log_probs), ray.get(old_log_probs), norm_adv_by_std)
