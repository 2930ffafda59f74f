"""Learner -> vLLM weight sync over NCCL (rollout.weight_sync=nccl; GPU only).

The object-store path (gather a numpy state dict on learner rank 0, one `ray.put`, every rollout
worker loads it) copies the whole model through host memory. For large models this module instead
broadcasts the parameters GPU to GPU, in packed buckets, from learner rank 0 to every vLLM worker.
The inference side is vLLM's built-in NCCL weight-transfer engine (`weight_transfer_config=
{"backend": "nccl"}`, driven by VLLMEngine.init_weight_sync / receive_weights); this file is the
sender, written against the same vLLM helpers so the wire format cannot drift:
`trainer_init` (StatelessProcessGroup + PyNcclCommunicator) and `packed_nccl_broadcast_producer`.

Who calls what (the driver wires it; every call pair must run concurrently, so use .remote + ray.get):

    once, after both groups are up (world = 1 + sum of the engines' tensor-parallel sizes):
        addr, port  = learner rank 0's node IP and a free port
        rollout[i].init_weight_sync(addr, port, rank_offset=1 + i * tp, world_size=world)
        learner rank 0: comm = open_sender(addr, port, world)
    every sync:
        info = describe(model)                       learner rank 0 (cheap, no gathering)
        rollout[i].receive_weights(info)             all engines
        send(comm if rank == 0 else None, full_parameters(model))   ALL learner ranks (ZeRO-3 gathers
                                                     are collective; only rank 0 broadcasts)

Importing this module needs neither CUDA nor vLLM; the functions that use them import them lazily.
It cannot be exercised on CPU (NCCL needs GPUs).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator

# One packing geometry on both ends: the receivers unpack with exactly these sizes (vLLM's defaults).
PACKED = True
BUCKET_BYTES = 1024**3
NUM_BUCKETS = 2


def worker_init_info(master_address: str, master_port: int, rank_offset: int, world_size: int) -> dict[str, Any]:
    """What each vLLM engine passes to `LLM.init_weight_transfer_engine` (NCCLWeightTransferInitInfo)."""
    return {
        "master_address": master_address,
        "master_port": master_port,
        "rank_offset": rank_offset,
        "world_size": world_size,
        "packed": PACKED,
        "packed_buffer_size_bytes": BUCKET_BYTES,
        "packed_num_buffers": NUM_BUCKETS,
    }


def _state_entries(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    # state_dict order and names (incl. a tied lm_head.weight, excl. non-persistent buffers such as
    # rotary inv_freq): the same full dict the object-store path sends, in the same order on every rank.
    return list(model.state_dict(keep_vars=True).items())


def _full_shape(tensor: torch.Tensor) -> list[int]:
    # A ZeRO-3 partitioned parameter is an empty local shard; ds_shape is its full shape.
    return list(getattr(tensor, "ds_shape", tensor.shape))


def describe(model: torch.nn.Module) -> dict[str, list]:
    """The per-sync update info the receivers need before the bytes arrive: names, dtypes, full shapes,
    in send order. Cheap (no gathering); call on learner rank 0 and pass it to every engine."""
    entries = _state_entries(model)
    return {
        "names": [name for name, _ in entries],
        "dtype_names": [str(t.dtype).removeprefix("torch.") for _, t in entries],
        "shapes": [_full_shape(t) for _, t in entries],
    }


def full_parameters(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, full tensor) in `describe` order. Under ZeRO-3 each parameter is gathered (a
    collective: every learner rank must iterate this together); a tied weight is gathered once.

    The yielded tensors are copies: the packer holds up to a bucket of them while ZeRO-3 re-partitions
    (frees) a parameter as soon as its gather context closes.
    """
    import deepspeed

    entries = _state_entries(model)
    last_name = {id(t): name for name, t in entries}  # tied tensors appear under several names
    copies: dict[int, torch.Tensor] = {}
    for name, tensor in entries:
        key = id(tensor)
        if key not in copies:
            if hasattr(tensor, "ds_id"):  # a ZeRO-3 partitioned parameter
                with deepspeed.zero.GatheredParameters([tensor], modifier_rank=None):
                    copies[key] = tensor.detach().clone()
            else:
                copies[key] = tensor.detach()
        # Drop our reference after the tensor's last name, so at most a bucket of copies is alive.
        yield name, copies.pop(key) if last_name[key] == name else copies[key]


def open_sender(master_address: str, master_port: int, world_size: int) -> PyNcclCommunicator:
    """Learner rank 0: join the NCCL group as rank 0 on the current CUDA device.

    Blocks until every engine has called init_weight_sync with the same address and world size.
    """
    from vllm.distributed.weight_transfer.nccl_common import trainer_init

    return trainer_init({"master_address": master_address, "master_port": master_port, "world_size": world_size})


def send(comm: PyNcclCommunicator | None, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Broadcast one full set of weights (`describe` order) in packed buckets.

    Every learner rank calls this with the same iterator (full_parameters is collective); rank 0 passes
    its communicator and broadcasts, the others pass None and only take part in the gathers.
    """
    if comm is None:
        for _ in named_tensors:
            pass
        return
    from vllm.distributed.weight_transfer.packed_tensor import packed_nccl_broadcast_producer

    packed_nccl_broadcast_producer(
        iterator=iter(named_tensors),
        group=comm,
        src=0,
        post_iter_func=lambda item: item[1],
        buffer_size_bytes=BUCKET_BYTES,
        num_buffers=NUM_BUCKETS,
    )
