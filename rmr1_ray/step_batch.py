"""Join the pieces of one GRPO step into the batch the learner trains on, and add GRPO advantages.

The pieces come from different actor groups, each in its own order and padding: rollout batches (one
per rollout worker), rewards (one per rollout batch), reference and old log-probs (one slice per
worker or rank; when the learner ranks hold the reference, the same slices carry both). Every piece
carries `data_index`, the sample's place in the step batch, and the join checks that each key covers
every sample exactly once: a sample lost or counted twice (say, by a retried rollout) is an error here,
not a silent bias in the update.

A step may have several generation rounds (algorithm.dynamic_sampling refills the batch with more
prompts); each round's pieces cover that round's samples, joined round by round, and the step batch is
the samples the driver chose to keep (rmr1_ray.dynamic_sampling).

The driver has a rewarder worker run it, so the tensors never pass through the driver.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

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


def join_round(
    rollouts: list[DataProto], rewards: list[DataProto], ref_log_probs: list[DataProto], old_log_probs: list[DataProto]
) -> DataProto:
    """One generation round's pieces -> its samples sorted by data_index, with token_level_rewards and
    ref/old log-probs. Sorting keeps a prompt's n samples contiguous."""
    batch = concat(rollouts)
    order = np.argsort(_indices(batch), kind="stable")
    batch = batch[order]
    _check_cover(_indices(batch), len(batch), "rollout samples")
    _join(batch, rewards, "token_level_rewards")
    if ref_log_probs:  # absent when the KL loss is off
        _join(batch, ref_log_probs, "ref_log_probs")
    _join(batch, old_log_probs, "old_log_probs")
    return batch


Pieces = tuple[list, list, list, list]  # one round's rollouts, rewards, ref and old log-probs (join_round)


def assemble(
    rounds: Iterable[Pieces],
    keep: list[list[int]] | None,
    norm_adv_by_std: bool,
    overlong_filtering: bool = False,
) -> tuple[DataProto, dict[str, float]]:
    """The pieces of one or more generation rounds (more with algorithm.dynamic_sampling) -> (step batch
    with token_level_rewards, ref/old log-probs, advantages and returns; diagnostics).

    keep: per round, the data_index of the samples to train on, whole groups in order (None: all). GRPO
    advantages are taken per round, before the selection: a group never spans rounds, and a prompt drawn
    in two rounds (a small prompt pool) makes two groups, not one. The kept samples are renumbered
    data_index 0..B-1 in round order, so the learner's equal rank slices hold whole GRPO groups. Rounds
    are taken one at a time (`rounds` may be a generator): only the kept rows of earlier rounds stay.
    overlong_filtering: the samples the engine cut off (non-tensor `truncated`) leave the loss (response
    mask 0); they still counted in their group's advantages (DAPO).
    """
    batches = []
    rows_of_rounds = itertools.repeat(None) if keep is None else keep
    for pieces, rows in zip(rounds, rows_of_rounds, strict=keep is not None):  # keep: one entry per round
        batch = join_round(*pieces)
        t = batch.batch
        t["advantages"] = grpo_advantages(t["token_level_rewards"], t["response_mask"], batch.non_tensor_batch["uid"],
                                          norm_adv_by_std)
        t["returns"] = t["advantages"]
        if rows is None:
            batches.append(batch)
        elif len(rows):  # sorted and complete: row i holds data_index i
            batches.append(batch[np.asarray(rows, dtype=np.int64)])
    batch = concat(batches)
    batch.non_tensor_batch["data_index"] = np.array(list(range(len(batch))), dtype=object)

    t = batch.batch
    advantages = t["advantages"]
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
    if "ref_log_probs" in t:  # how far the policy has moved from the reference: shows the sync above is not trivial
        stats["policy/ref_logprob_diff_max"] = (t["old_log_probs"] - t["ref_log_probs"])[mask].abs().max().item()
    if overlong_filtering:
        # verl has no overlong filtering (its DAPO recipe only shapes the reward): masking the response is
        # the whole of it, since the learner's losses and their normalisers all read the response mask.
        truncated = torch.as_tensor(batch.non_tensor_batch["truncated"].astype(bool))
        t["response_mask"] = t["response_mask"] * (~truncated).to(t["response_mask"].dtype)[:, None]
        stats["overlong/filtered"] = int(truncated.sum())
    return batch, stats


def assemble_from_refs(
    rounds: list[Pieces], keep: list[list[int]] | None, norm_adv_by_std: bool, overlong_filtering: bool = False
) -> tuple[DataProto, dict[str, float]]:
    """`assemble` for lists of ObjectRefs (Ray resolves only top-level arguments), inside an actor."""
    import ray

    fetched = (tuple(ray.get(list(refs)) for refs in pieces) for pieces in rounds)  # a round at a time
    return assemble(fetched, keep, norm_adv_by_std, overlong_filtering)
