"""The batch container of a GRPO step: verl's `DataProto`, with the keys below and three helpers.

A `DataProto` holds a TensorDict `batch` (tensors sharing dim 0), a `non_tensor_batch` of numpy object
arrays and a `meta_info` dict. B = sequences, P = prompt width, R = response width.

| key (batch)          | dtype   | shape    | meaning                                                        |
|----------------------|---------|----------|----------------------------------------------------------------|
| prompts              | int64   | [B, P]   | prompt ids, LEFT-padded with the pad id                        |
| responses            | int64   | [B, R]   | response ids, RIGHT-padded with the pad id                     |
| input_ids            | int64   | [B, P+R] | prompts ++ responses                                           |
| attention_mask       | int64   | [B, P+R] | 1 for real tokens (prompt and response), 0 for padding         |
| position_ids         | int64   | [B, P+R] | cumsum(attention_mask) - 1, clipped at 0                       |
| response_mask        | int64   | [B, R]   | 1 for generated tokens (incl. the EOS), 0 for padding          |
| rollout_log_probs    | float32 | [B, R]   | log-probs reported by the engine (optional)                    |
| old_log_probs        | float32 | [B, R]   | learner log-probs before the update (PPO ratio denominator)    |
| ref_log_probs        | float32 | [B, R]   | frozen reference model log-probs (KL loss)                     |
| token_level_rewards  | float32 | [B, R]   | the sequence reward on the last response token, 0 elsewhere    |
| advantages           | float32 | [B, R]   | GRPO advantages (0 on padding)                                 |
| returns              | float32 | [B, R]   | equal to advantages for GRPO (kept for verl compatibility)     |

| key (non_tensor_batch) | dtype  | shape | meaning                                               |
|------------------------|--------|-------|-------------------------------------------------------|
| uid                    | object | [B]   | id of the prompt a sample belongs to (its GRPO group) |
| winner                 | object | [B]   | preference label, "A" or "B"                          |
| response_text          | object | [B]   | decoded response                                      |
| truncated              | object | [B]   | bool: the engine cut it off (max_new_tokens), no stop |
| data_index             | object | [B]   | position of the sample in the step batch (re-ordering)|

meta_info: temperature (the sampling temperature; log-probs are computed at it), step, pad_token_id.

Samples of one prompt are laid out next to each other (the rollout emits n consecutive samples per
prompt), so contiguous splits keep GRPO groups whole whenever the split size is a multiple of n.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from verl.protocol import DataProto

__all__ = ["DataProto", "concat", "fetch", "from_payload", "pad_and_assemble", "rank_payloads", "split_for_ranks",
           "to_payload", "with_data_index"]

_JOINT_KEYS = ("input_ids", "attention_mask", "position_ids")  # [B, P+R]: pad left by P, right by R


def _left_pad(rows: Sequence[Sequence[int]], width: int, value: int) -> torch.Tensor:
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            out[i, width - len(row) :] = torch.as_tensor(row, dtype=torch.long)
    return out


def _right_pad(rows: Sequence[Sequence[float]], width: int, value: float, dtype: torch.dtype) -> torch.Tensor:
    out = torch.full((len(rows), width), value, dtype=dtype)
    for i, row in enumerate(rows):
        if len(row):
            out[i, : len(row)] = torch.as_tensor(row, dtype=dtype)
    return out


def pad_and_assemble(
    prompt_ids: list[list[int]],
    response_ids: list[list[int]],
    pad_id: int,
    *,
    rollout_log_probs: list[list[float]] | None = None,
    non_tensors: dict[str, Sequence] | None = None,
    meta_info: dict | None = None,
    prompt_length: int | None = None,
    response_length: int | None = None,
) -> DataProto:
    """Token lists from an engine -> a DataProto with the keys of the table above.

    `prompt_length` / `response_length` pad to at least that width (fixed widths let batches of
    different workers concatenate without re-padding); by default the widths are the longest row.
    """
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
    p_width = max([prompt_length or 0, *map(len, prompt_ids)])
    r_width = max([response_length or 1, *map(len, response_ids)])  # R >= 1 keeps shapes valid

    prompts = _left_pad(prompt_ids, p_width, pad_id)
    responses = _right_pad(response_ids, r_width, pad_id, torch.long)
    prompt_mask = _left_pad([[1] * len(p) for p in prompt_ids], p_width, 0)
    response_mask = _right_pad([[1] * len(r) for r in response_ids], r_width, 0, torch.long)
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
    tensors = {
        "prompts": prompts,
        "responses": responses,
        "input_ids": torch.cat([prompts, responses], dim=1),
        "attention_mask": attention_mask,
        "position_ids": (attention_mask.cumsum(dim=1) - 1).clamp(min=0),
        "response_mask": response_mask,
    }
    if rollout_log_probs is not None:
        tensors["rollout_log_probs"] = _right_pad(rollout_log_probs, r_width, 0.0, torch.float32)
    non_tensors = {key: np.array(list(values), dtype=object) for key, values in (non_tensors or {}).items()}
    meta = {"pad_token_id": pad_id, **(meta_info or {})}
    return DataProto.from_dict(tensors=tensors, non_tensors=non_tensors, meta_info=meta)


def _widths(batch: DataProto) -> tuple[int, int]:
    return batch.batch["prompts"].shape[1], batch.batch["responses"].shape[1]


def _repad(batch: DataProto, p_width: int, r_width: int) -> DataProto:
    """Widen a batch to prompt width p_width and response width r_width (pads only, never trims)."""
    p, r = _widths(batch)
    if (p, r) == (p_width, r_width):
        return batch
    pad_id = batch.meta_info.get("pad_token_id", 0)
    tensors = {}
    for key, t in batch.batch.items():
        id_like = key in ("prompts", "responses", "input_ids")
        value = pad_id if id_like else 0
        if key == "prompts":
            t = F.pad(t, (p_width - p, 0), value=value)
        elif key in _JOINT_KEYS:
            t = F.pad(t, (p_width - p, r_width - r), value=value)
        elif t.dim() == 2 and t.shape[1] == r:  # every other [B, R] key is response-aligned
            t = F.pad(t, (0, r_width - r), value=value)
        tensors[key] = t
    return DataProto.from_dict(tensors=tensors, non_tensors=dict(batch.non_tensor_batch), meta_info=batch.meta_info)


def concat(batches: Sequence[DataProto]) -> DataProto:
    """Concatenate along dim 0. Batches of different prompt/response widths are re-padded first
    (each rollout worker pads to its own longest row)."""
    batches = list(batches)
    if not batches:
        raise ValueError("concat needs at least one batch")
    if len(batches) == 1:
        return batches[0]
    if batches[0].batch is not None and batches[0].batch.get("prompts", None) is not None:
        p_width = max(_widths(b)[0] for b in batches)
        r_width = max(_widths(b)[1] for b in batches)
        batches = [_repad(b, p_width, r_width) for b in batches]
    return DataProto.concat(batches)


def split_for_ranks(batch: DataProto, world_size: int) -> list[DataProto]:
    """Contiguous, equal chunks, one per rank, in rank order.

    Equal chunks are required: ZeRO-3 ranks gather parameters collectively, so every rank must run
    the same number of forwards. GRPO groups stay whole when the chunk size is a multiple of the
    group size (samples of a prompt are contiguous, see the module docstring).
    """
    if len(batch) % world_size:
        raise ValueError(
            f"a batch of {len(batch)} sequences cannot be split evenly over {world_size} ranks; make the "
            "step batch (train_batch_size * n_samples_per_prompt) a multiple of learner.group.num_workers"
        )
    return batch.chunk(world_size)


# Keys a learner rank reads to score or train on its share, and their wire dtypes: token ids fit int32,
# masks int8 (4x and 8x smaller than int64). Anything else travels as it is.
_COMPACT = {"prompts": np.int32, "responses": np.int32, "input_ids": np.int32, "position_ids": np.int32,
            "attention_mask": np.int8, "response_mask": np.int8}
LOG_PROB_KEYS = ("prompts", "responses", "input_ids", "attention_mask", "position_ids", "response_mask")  # a forward pass (prompts: its widths)
UPDATE_KEYS = (*LOG_PROB_KEYS, "old_log_probs", "ref_log_probs", "advantages")  # a PPO update


def to_payload(batch: DataProto, keys: Sequence[str] | None = None) -> dict:
    """A batch (or its `keys`) as plain numpy arrays for the object store: each rank that gets it reads
    it zero-copy, where a DataProto (pickled through torch.save) is deserialised whole by every reader."""
    names = list(batch.batch.keys()) if keys is None else list(keys)
    tensors = {}
    for name in names:
        array = batch.batch[name].numpy()
        tensors[name] = array.astype(_COMPACT[name]) if name in _COMPACT else array
    return {"tensors": tensors, "data_index": np.asarray(batch.non_tensor_batch["data_index"], dtype=np.int64),
            "meta_info": dict(batch.meta_info)}


def from_payload(payload: dict) -> DataProto:
    """The inverse of to_payload: ids and masks back to int64."""
    tensors = {name: torch.tensor(array, dtype=torch.long if name in _COMPACT else None)  # a copy: the arrays
               for name, array in payload["tensors"].items()}                          # are read-only
    data_index = np.empty(len(payload["data_index"]), dtype=object)
    data_index[:] = payload["data_index"].tolist()
    return DataProto.from_dict(tensors=tensors, non_tensors={"data_index": data_index}, meta_info=payload["meta_info"])


def rank_payloads(batch: DataProto, world_size: int, keys: Sequence[str] | None = None) -> list[dict]:
    """split_for_ranks, each share as a payload: what rank r alone fetches."""
    return [to_payload(share, keys) for share in split_for_ranks(batch, world_size)]


def fetch(refs) -> DataProto:
    """A DataProto or payload (to_payload), an ObjectRef of one, or a list of these -> one concatenated
    DataProto.

    Ray resolves an ObjectRef passed directly as an actor-call argument but leaves refs inside a list
    unresolved, so callers can send either; the actor fetches them here.
    """
    import ray  # lazy: the rest of this module has no Ray dependency

    items = refs if isinstance(refs, list | tuple) else [refs]
    pending = [i for i, item in enumerate(items) if isinstance(item, ray.ObjectRef)]
    fetched = dict(zip(pending, ray.get([items[i] for i in pending]), strict=True))
    items = [fetched.get(i, item) for i, item in enumerate(items)]
    return concat([from_payload(item) if isinstance(item, dict) else item for item in items])


def with_data_index(tensors: dict[str, torch.Tensor], like: DataProto) -> DataProto:
    """A result batch (e.g. log-probs) that carries `like`'s data_index, so callers can re-order it."""
    non_tensors = {"data_index": like.non_tensor_batch["data_index"]} if "data_index" in like.non_tensor_batch else {}
    return DataProto.from_dict(tensors=tensors, non_tensors=non_tensors)
