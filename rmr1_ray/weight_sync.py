"""Learner -> rollout weight sync, two ways (`rollout.weight_sync`):

- `object_store`: every learner rank takes part in gathering the ZeRO-3 shards; rank 0 packs the full
  weights (`pack_state`: the model's own dtype, bf16 as its 2 raw bytes, a tied weight once) and Ray
  stores them once. The driver hands that ObjectRef, never the data, to every rollout worker, which
  resolves it zero-copy. Simple and robust; costs a host copy of the model per sync and object-store
  space, and every rollout node pulls the whole model.
- `collective` (`nccl` is the same on GPUs): one torch.distributed group joins learner rank 0 and every
  rollout worker (NCCL on GPU, gloo on CPU). All learner ranks walk the parameters in state_dict order
  and gather each ZeRO-3 parameter; rank 0 packs them into buckets of `rollout.weight_sync_bucket_mb`
  and broadcasts each bucket as it fills (while the next fills), in the model's dtype, a tied weight once.
  Receivers unpack a bucket into views and hand them to the engine while the next bucket arrives. A
  ZeRO-3 parameter larger than a bucket (an embedding) is never gathered whole: learner rank 0 relays
  each rank's partition of it as it comes. Peak extra memory on learner rank 0 stays within two
  buckets of `rollout.weight_sync_bucket_mb`, the parameters being gathered included: no full copy.

The bucket geometry is a pure function of the layout (`plan_buckets`), computed by the sender and every
receiver from the same `WeightLayout`, so nothing but raw bytes crosses the group.

`WeightSync` drives either path from the driver. A rollout worker that Ray restarted cannot rejoin a
formed group: its replay loads the current weights through the object store (gathered on demand), and
the group is formed again, with fresh ranks, before the next collective sync.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch
import torch.distributed as dist
from ray.exceptions import RayTaskError

from rmr1_ray.faults import WorkerDied
from rmr1_ray.process_group import DEFAULT_TIMEOUT, Rendezvous

# numpy has no bfloat16: such tensors travel as their raw 2-byte words and are viewed back on arrival.
_RAW_VIEWS = {torch.bfloat16: torch.int16}


# --- layout and buckets ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # torch dtype name without "torch."
    shape: tuple[int, ...]
    partition_numel: int = 0  # a ZeRO-3 parameter: the elements of one rank's partition (0: not partitioned)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.torch_dtype.itemsize


@dataclass(frozen=True)
class WeightLayout:
    """What is sent, in order (each distinct tensor once), and the names that share a tensor (tied
    weights: {"lm_head.weight": "model.embed_tokens.weight"})."""

    tensors: tuple[TensorSpec, ...]
    aliases: dict[str, str]

    @property
    def nbytes(self) -> int:
        return sum(spec.nbytes for spec in self.tensors)


def model_layout(model: torch.nn.Module) -> WeightLayout:
    """The layout of a model's state_dict (a ZeRO-3 parameter by its full `ds_shape`; non-persistent
    buffers such as rotary inv_freq are not in state_dict and are not sent)."""
    first_name: dict[int, str] = {}
    tensors, aliases = [], {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in first_name:
            aliases[name] = first_name[id(tensor)]
            continue
        first_name[id(tensor)] = name
        shape = tuple(getattr(tensor, "ds_shape", tensor.shape))
        partition = tensor.ds_tensor.ds_numel if hasattr(tensor, "ds_tensor") else 0
        tensors.append(TensorSpec(name, str(tensor.dtype).removeprefix("torch."), shape, partition))
    return WeightLayout(tuple(tensors), aliases)


@dataclass(frozen=True)
class Bucket:
    nbytes: int
    entries: tuple[tuple[int, int], ...]  # (index into layout.tensors, byte offset in the bucket)
    # Byte ranges broadcast one after the other: the whole bucket, or, for a ZeRO-3 parameter larger than
    # a bucket, each rank's partition of it (learner rank 0 relays them; nobody gathers the whole tensor).
    pieces: tuple[tuple[int, int], ...] = ()


def partition_pieces(spec: TensorSpec) -> tuple[tuple[int, int], ...]:
    """The (byte offset, bytes) of each rank's partition of a ZeRO-3 parameter, in rank order: rank r holds
    elements [r * partition_numel, (r + 1) * partition_numel) of the flattened tensor, the last one padded."""
    numel, item = spec.nbytes // spec.torch_dtype.itemsize, spec.torch_dtype.itemsize
    starts = range(0, numel, spec.partition_numel)
    return tuple((start * item, (min(start + spec.partition_numel, numel) - start) * item) for start in starts)


def sent_in_partitions(spec: TensorSpec, bucket_bytes: int) -> bool:
    """A ZeRO-3 parameter larger than a bucket travels partition by partition (the rule sender and
    receivers share)."""
    return bool(spec.partition_numel) and spec.nbytes > bucket_bytes


def plan_buckets(layout: WeightLayout, bucket_bytes: int) -> list[Bucket]:
    """Consecutive tensors packed up to `bucket_bytes` (a larger tensor gets a bucket of its own, sent in
    its ZeRO-3 partitions when it has them)."""
    buckets: list[Bucket] = []
    entries: list[tuple[int, int]] = []
    used = 0

    def close() -> None:
        spec = layout.tensors[entries[0][0]]
        split = len(entries) == 1 and sent_in_partitions(spec, bucket_bytes)
        buckets.append(Bucket(used, tuple(entries), partition_pieces(spec) if split else ((0, used),)))

    for index, spec in enumerate(layout.tensors):
        if entries and used + spec.nbytes > bucket_bytes:
            close()
            entries, used = [], 0
        entries.append((index, used))
        used += spec.nbytes
    if entries:
        close()
    return buckets


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


# --- the collective group -----------------------------------------------------------------------------


class SyncGroup:
    """One torch.distributed process group of its own (outside the learner ranks' default group), formed
    through a Rendezvous: rank 0 is learner rank 0, ranks 1.. the rollout workers."""

    def __init__(self, backend: str, rendezvous: Rendezvous, rank: int, world_size: int, device: torch.device) -> None:
        store = dist.PrefixStore("weight-sync", rendezvous.store(rank, world_size))
        if backend == "nccl":  # on the current CUDA device; the class exists in CUDA builds of torch only
            self.group = dist.ProcessGroupNCCL(store, rank, world_size, dist.ProcessGroupNCCL.Options())
        else:
            self.group = dist.ProcessGroupGloo(store, rank, world_size, DEFAULT_TIMEOUT)
        self.device = device

    def broadcast(self, tensor: torch.Tensor):
        """Start broadcasting `tensor` from rank 0 -> a Work to wait() on before touching the tensor."""
        return self.group.broadcast(tensor, 0)

    def close(self) -> None:
        """Leave the group, breaking any collective still waiting in it (its store, and rank 0's listening
        socket with it, goes too)."""
        if self.group is not None:
            self.group.abort()
        self.group = None


def send_weights(named_tensors: Iterable[tuple[str, torch.Tensor | None]], layout: WeightLayout,
                 group: SyncGroup | None, bucket_bytes: int) -> int:
    """Every learner rank iterates `named_tensors` (layout order: gathering is collective); rank 0 passes
    its group and its tensors, the others None for both. A tensor sent in partitions
    (`sent_in_partitions`) comes as one item per partition, in rank order. Returns the bytes broadcast.

    A bucket is broadcast while the next one fills (two buckets in memory at most); a tensor, or a
    partition, that has a bucket to itself is broadcast from where it lies, without a copy, before the
    next is asked for.
    """
    buckets = plan_buckets(layout, bucket_bytes)
    index_of = {spec.name: i for i, spec in enumerate(layout.tensors)}
    bucket_of = {index: (b, offset) for b, bucket in enumerate(buckets) for index, offset in bucket.entries}
    in_flight, buffer, filled, sent = None, None, 0, 0
    pieces_sent: dict[int, int] = {}
    for name, tensor in named_tensors:
        if group is None:
            continue
        b, offset = bucket_of[index_of[name]]
        data = _as_bytes(tensor)
        if len(buckets[b].entries) == 1:  # valid only until the next item is asked for: send it now
            piece = pieces_sent.get(b, 0)
            if data.numel() != buckets[b].pieces[piece][1]:  # the receivers would wait for other sizes
                raise ValueError(f"weight sync: {name} piece {piece} has {data.numel()} bytes, the layout says "
                                 f"{buckets[b].pieces[piece][1]}")
            pieces_sent[b] = piece + 1
            group.broadcast(data).wait()
            sent += data.numel()
            continue
        if buffer is None:
            buffer, filled = torch.empty(buckets[b].nbytes, dtype=torch.uint8, device=group.device), 0
        buffer[offset : offset + data.numel()].copy_(data)
        filled += 1
        if filled == len(buckets[b].entries):
            if in_flight is not None:
                in_flight.wait()
            in_flight, sent, buffer = group.broadcast(buffer), sent + buffer.numel(), None
    if in_flight is not None:
        in_flight.wait()
    return sent


def receive_weights(layout: WeightLayout, group: SyncGroup, bucket_bytes: int) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of the layout, bucket by bucket. The next bucket is received while
    the consumer takes this one's tensors, so a consumer that copies as it goes holds two buckets at most."""
    buckets = plan_buckets(layout, bucket_bytes)

    def start(bucket: Bucket):
        buffer = torch.empty(bucket.nbytes, dtype=torch.uint8, device=group.device)
        return buffer, [group.broadcast(buffer[start : start + size]) for start, size in bucket.pieces]

    upcoming = start(buckets[0]) if buckets else None
    for k, bucket in enumerate(buckets):
        buffer, works = upcoming
        for work in works:
            work.wait()
        upcoming = start(buckets[k + 1]) if k + 1 < len(buckets) else None
        for index, offset in bucket.entries:
            spec = layout.tensors[index]
            yield spec.name, buffer[offset : offset + spec.nbytes].view(spec.torch_dtype).view(spec.shape)
        del buffer  # a consumer that copied its tensors has released this bucket


# --- the object-store form --------------------------------------------------------------------------


def pack_state(named_tensors: Iterable[tuple[str, torch.Tensor]], layout: WeightLayout) -> dict[str, Any]:
    """Full weights as numpy arrays for one `ray.put`: each distinct tensor once, in its own dtype (bf16 as
    raw int16 words), with the layout to undo both. The tensors are copied as they come (zero.full_tensors
    hands out each one only until the next)."""
    arrays = {}
    for name, tensor in named_tensors:
        tensor = tensor.detach().to("cpu", copy=True)
        arrays[name] = (tensor.view(_RAW_VIEWS[tensor.dtype]) if tensor.dtype in _RAW_VIEWS else tensor).numpy()
    return {"layout": layout, "arrays": arrays}


def unpack_state(packed: dict[str, Any]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) per distinct tensor of a packed state; arrays from the object store are read-only
    views, wrapped without copying (consumers only read them)."""
    import warnings

    layout: WeightLayout = packed["layout"]
    for spec in layout.tensors:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            tensor = torch.from_numpy(packed["arrays"][spec.name])
        yield spec.name, tensor.view(spec.torch_dtype) if tensor.dtype != spec.torch_dtype else tensor


def packed_bytes(packed: dict[str, Any]) -> int:
    return sum(array.nbytes for array in packed["arrays"].values())


# --- the driver's side -----------------------------------------------------------------------------


class WeightSync:
    """learner, rollout: ActorGroups of PolicyLearner and RolloutWorker. `sync()` moves the learner's
    current weights to every rollout worker by the configured path and returns timings and size."""

    def __init__(self, learner: Any, rollout: Any, method: str, backend: str, bucket_bytes: int) -> None:
        self.learner, self.rollout = learner, rollout
        self.collective = method in ("collective", "nccl")
        # rollout.weight_sync_bucket_mb is learner rank 0's budget for a collective sync: one bucket in
        # flight, one filling and the parameters gathered into it (groups of an eighth of a bucket,
        # PolicyLearner.send_weights) take at most 2 x 15/16 + 15/128 < 2 budgets.
        self.backend, self.bucket_bytes = backend, bucket_bytes - bucket_bytes // 16
        self.formed_at_restarts: int | None = None
        # A restarted rollout worker loads the current weights through the object store before it works
        # again (gathered only then); a formed group cannot take it back in.
        rollout.remember_lazily("load_weights", lambda: (self._gather_to_object_store(),))

    def _gather_to_object_store(self):
        refs = self.learner.call_all("gather_state_dict")
        ray.wait(refs, num_returns=len(refs), fetch_local=False)  # ready, but not pulled here
        self.learner.get(refs[1:])  # the other ranks return None: a cheap check for a death
        return refs[0]

    def _form_group(self) -> None:
        """Learner rank 0 and every rollout worker join a new group (after a restart: the survivors leave
        the old one first)."""
        rank0, workers = self.learner.actors[0], self.rollout.actors
        address, port = ray.get(rank0.open_weight_group.remote())
        layout, world = rank0.weight_layout.remote(), 1 + len(workers)
        ray.get([rank0.join_weight_group.remote(address, port, 0, world, self.backend),
                 *(w.join_weight_group.remote(address, port, 1 + i, world, self.backend, layout)
                   for i, w in enumerate(workers))])
        self.formed_at_restarts = self.rollout.restarts

    def _broadcast(self) -> int:
        """One collective sync -> bytes sent. A rollout worker that dies during it is restarted (it loads
        the weights through the object store), and the survivors get them from a new group."""
        sends = self.learner.call_all("send_weights", self.bucket_bytes)
        receives = self.rollout.call_all("receive_weights", self.bucket_bytes)
        try:
            nbytes = self.learner.get(sends)[0]  # first: a dead learner rank is the cause
            self.rollout.get(receives)
            return nbytes
        except (RayTaskError, WorkerDied) as exc:  # the broadcast lost a peer: a rollout worker can come back
            if isinstance(exc, WorkerDied) and exc.group != "rollout":
                raise
            ray.wait(receives, num_returns=len(receives), timeout=120)  # the survivors' receives fail too
            dead = self.rollout.dead_workers()
            if not dead:
                raise
        for index in dead:
            self.rollout.restart(index, "receive_weights")
        self._form_group()
        return self._broadcast()

    def sync(self) -> dict[str, float]:
        start = time.perf_counter()
        if not self.collective:
            state_ref = self._gather_to_object_store()
            gathered = time.perf_counter()
            _, loads = self.rollout.run("load_weights", [state_ref] * self.rollout.num_workers)
            nbytes = loads[0]["bytes"]
            metrics = {"sync/gather_s": gathered - start, "sync/load_s": time.perf_counter() - gathered}
        else:
            if self.formed_at_restarts != self.rollout.restarts:
                self._form_group()
            formed = time.perf_counter()
            nbytes = self._broadcast()
            metrics = {"sync/group_s": formed - start, "sync/broadcast_s": time.perf_counter() - formed}
        return {**metrics, "sync/megabytes": nbytes / 2**20, "time/sync": time.perf_counter() - start}
