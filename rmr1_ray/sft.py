"""Supervised fine-tuning on reasoning chains: tokenization with loss masks, batch plans, the loss.

A training example is a judge prompt (chat messages) and the teacher's chain (the assistant reply),
rendered with the model's own chat template. Only the assistant's tokens are trained: the reply
and the end-of-turn token that closes it, never the prompt, the padding, or what a template writes
after the end-of-turn token (Qwen's trailing newline), which a model never generates.

Batches are planned per optimizer step: every rank computes the same plan from (seed, epoch), so a
step's token count is known everywhere without communication, and a resumed run continues from
exactly the same position.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rmr1_ray.algorithms import lr_lambda, response_token_stats

IGNORE_INDEX = -100  # label of untrained positions (torch's cross_entropy ignore_index)


class PrefixError(ValueError):
    """The chat template renders the prompt differently once a reply follows, so the reply's tokens
    cannot be told apart from the prompt's (e.g. templates that drop <think> blocks from replies)."""


@dataclass(frozen=True)
class SftExample:
    input_ids: np.ndarray  # int32 [length]: prompt with generation prompt, then the reply
    label_start: int  # first trained position: the first token of the reply
    label_end: int  # one past the last trained position: just after the end-of-turn token

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_label_tokens(self) -> int:
        return self.label_end - self.label_start

    def labels(self) -> np.ndarray:
        labels = np.full(len(self.input_ids), IGNORE_INDEX, dtype=np.int64)
        labels[self.label_start : self.label_end] = self.input_ids[self.label_start : self.label_end]
        return labels


def tokenize_example(tokenizer: Any, messages: Sequence[dict], response: str) -> SftExample:
    """Tokenize prompt-with-generation-prompt and prompt+reply; the first must be a prefix of the second."""
    prompt_text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    full_text = tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": response}], tokenize=False
    )
    # add_special_tokens=False: the template already wrote every special token (a BOS included).
    prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    full = tokenizer(full_text, add_special_tokens=False)["input_ids"]
    if full[: len(prompt)] != prompt:
        first = next((i for i, (a, b) in enumerate(zip(prompt, full, strict=False)) if a != b), len(full))
        raise PrefixError(
            f"the tokenized prompt (with generation prompt, {len(prompt)} tokens) is not a prefix of prompt + reply "
            f"({len(full)} tokens): they differ from token {first} on"
        )
    if len(full) == len(prompt):
        raise PrefixError("the reply adds no tokens")
    eos = tokenizer.eos_token_id
    end = len(full)
    if eos is not None and eos in full[len(prompt) :]:
        end = full.index(eos, len(prompt)) + 1
    return SftExample(np.asarray(full, dtype=np.int32), len(prompt), end)


def collate(examples: Sequence[SftExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels (IGNORE_INDEX on prompt and padding)."""
    width = max(len(e) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example)
        input_ids[row, :n] = torch.from_numpy(example.input_ids.astype(np.int64))
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.from_numpy(example.labels())
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def summed_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(sum of next-token negative log-likelihoods over labelled positions, their count).

    Through the GRPO learner's chunked log-probs, so the fp32 upcast of [b, L, V] never exists whole
    (for a 12k-token row of a 152k vocabulary that copy alone is 7 GiB)."""
    shifted = labels[:, 1:]
    labelled = shifted != IGNORE_INDEX
    log_probs, _ = response_token_stats(logits[:, :-1], shifted.masked_fill(~labelled, 0))
    return -(log_probs * labelled).sum(), int(labelled.sum())


# --- plans ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepPlan:
    micro_batches: list[list[list[int]]]  # [rank][micro-batch] -> example indices
    label_tokens: int  # trained tokens of the whole step, over all ranks (the loss normaliser)


def plan_epoch(
    examples: Sequence[SftExample], global_batch: int, micro_batch: int, world_size: int, seed: int, epoch: int
) -> list[StepPlan]:
    """The optimizer steps of one epoch. The examples are shuffled by (seed, epoch); each step's
    `global_batch` examples are sorted by length and cut into micro-batches (length grouping: little
    padding), dealt round-robin to the ranks so that each rank gets short and long ones alike.
    The gradient of a step does not depend on this arrangement: the loss is the token mean over the
    whole step. The last incomplete step is dropped (its examples come first in another epoch)."""
    per_rank = global_batch // world_size
    if global_batch % world_size or per_rank % micro_batch:
        raise ValueError(f"global batch {global_batch} does not split into {world_size} ranks x micro-batches of {micro_batch}")
    order = np.random.default_rng([seed, epoch]).permutation(len(examples))
    steps = []
    for start in range(0, len(order) - global_batch + 1, global_batch):
        chosen = sorted(order[start : start + global_batch].tolist(), key=lambda i: (len(examples[i]), i))
        chunks = [chosen[i : i + micro_batch] for i in range(0, global_batch, micro_batch)]
        ranks = [chunks[r::world_size] for r in range(world_size)]
        steps.append(StepPlan(ranks, sum(examples[i].num_label_tokens for i in chosen)))
    return steps


def plan_eval(examples: Sequence[SftExample], micro_batch: int, world_size: int) -> list[list[list[int]]]:
    """[rank][micro-batch] -> example indices covering every example once, grouped by length.
    Under ZeRO-3 a forward pass is collective, so every rank gets the same number of micro-batches:
    ranks with fewer get empty ones (run on a stand-in, not counted)."""
    chosen = sorted(range(len(examples)), key=lambda i: (len(examples[i]), i))
    chunks = [chosen[i : i + micro_batch] for i in range(0, len(chosen), micro_batch)]
    ranks = [chunks[r::world_size] for r in range(world_size)]
    rounds = math.ceil(len(chunks) / world_size)
    return [batches + [[]] * (rounds - len(batches)) for batches in ranks]


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup from 0, then cosine decay to min_lr_ratio (transformers' cosine_with_min_lr,
    which RM-R1's SFT trainer, OpenRLHF, uses)."""
    factor = lr_lambda(step, warmup_steps, total_steps, "cosine")
    return factor if step < warmup_steps else min_lr_ratio + (1 - min_lr_ratio) * factor
