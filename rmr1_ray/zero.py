"""DeepSpeed ZeRO set-up shared by the two trainers: the SFT job (jobs/distill.py) and the GRPO learner
(actors/learner.py). DeepSpeed does the sharding, the optimizer step and the checkpoints; this module
holds what both trainers build around it in the same way: joining the process group, the engine
config, a model that is sharded while it loads, the optimizer, and full weights gathered from the
shards for export. It also builds the GRPO learner's frozen reference model when the learner ranks hold
it (reference.on_learner): a second ZeRO-3 engine, sharded alike, with no optimizer.

Both trainers' settings (SftTrainerConfig, LearnerConfig) have the fields `ZeroSettings` names.
"""

from __future__ import annotations

import itertools
import os
import warnings
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch

from rmr1_ray.config.sections import ModelConfig
from rmr1_ray.models import load_causal_lm, load_tokenizer, torch_dtype
from rmr1_ray.process_group import Rendezvous, init_default_group
from rmr1_ray.ray_utils import default_torch_extensions_dir
from rmr1_ray.weight_sync import model_layout, plan_buckets, sent_in_partitions


class ZeroSettings(Protocol):
    zero_stage: int
    lr: float
    betas: tuple[float, float]
    weight_decay: float
    grad_clip: float
    micro_batch_size: int
    offload_optimizer: bool
    offload_params: bool

    def model_copy(self, *, update: dict[str, Any] | None = None, deep: bool = False) -> Any: ...  # pydantic's


def init_distributed(gpu: bool, rendezvous: Rendezvous, rank: int, world_size: int, local_rank: int) -> None:
    """Join the trainer's process group (NCCL on GPU, gloo on CPU) through rank 0's `rendezvous`, then hand
    it to DeepSpeed, which wraps an existing group instead of forming its own (whose store would listen
    on every interface)."""
    # DeepSpeed 0.19's ZeRO-3 calls collectives torch has renamed: one FutureWarning per call, dozens per step.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", default_torch_extensions_dir())
    import deepspeed  # after TORCH_EXTENSIONS_DIR is set: DeepSpeed reads it when it builds the comm op

    backend = "nccl" if gpu else "gloo"
    # DeepSpeed reads these: LOCAL_RANK picks the engine's GPU, and its CPU shared-memory collectives name
    # their segment after MASTER_ADDR/PORT (so it is unique per group).
    os.environ.update(MASTER_ADDR=rendezvous.address, MASTER_PORT=str(rendezvous.port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank))
    init_default_group(backend, rendezvous, rank, world_size)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)


def engine_config(settings: ZeroSettings, dtype: str, gradient_accumulation_steps: int, world_size: int,
                  gpu: bool) -> dict:
    """DeepSpeed's config. Offloading is a GPU feature: on CPU everything already lives in CPU memory."""
    zero: dict[str, Any] = {"stage": settings.zero_stage, "stage3_gather_16bit_weights_on_model_save": False}
    if gpu and settings.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if gpu and settings.offload_params and settings.zero_stage == 3:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": settings.micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "train_batch_size": settings.micro_batch_size * gradient_accumulation_steps * world_size,
        "gradient_clipping": settings.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == "bfloat16"},
        "fp16": {"enabled": dtype == "float16"},
        "zero_allow_untested_optimizer": True,  # torch.optim.AdamW on CPU
        "steps_per_print": 10**9,
    }


def inference_config(settings: ZeroSettings, micro_batch_size: int, dtype: str, world_size: int, gpu: bool) -> dict:
    """DeepSpeed's config of a frozen model sharded like the trained one (`settings`, which must be ZeRO-3):
    the same rules as engine_config, with `micro_batch_size` sequences per forward and nothing of an
    optimizer (no optimizer state, so no optimizer offload; parameters offload as the trained model's)."""
    if settings.zero_stage != 3:
        raise ValueError(f"a frozen model is sharded with ZeRO-3 only (got zero_stage={settings.zero_stage})")
    frozen = settings.model_copy(update={"micro_batch_size": micro_batch_size, "offload_optimizer": False})
    return engine_config(frozen, dtype, 1, world_size, gpu)


def load_sharded(model_config: ModelConfig, ds_config: dict, device: torch.device) -> tuple[torch.nn.Module, Any]:
    """ALL ranks call. The HF model of `model_config`; with ZeRO-3 in `ds_config` it is built under zero.Init,
    so each rank materialises only its shard while the checkpoint loads. -> (model, the HfDeepSpeedConfig
    to keep alive as long as the model: tie it to the engine; None below ZeRO-3)."""
    import torch._dynamo  # noqa: F401 - must be imported before zero.Init patches module construction
    from transformers import AutoConfig
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    m = model_config
    # zero.Init wraps every nn.Module __init__; a model class imported lazily inside it fails with a
    # signature-mismatch TypeError, so trigger the (lazy) import of the model class first.
    hf_config = AutoConfig.from_pretrained(m.path, trust_remote_code=m.trust_remote_code)
    if type(hf_config) in MODEL_FOR_CAUSAL_LM_MAPPING:
        MODEL_FOR_CAUSAL_LM_MAPPING[type(hf_config)]
    # While this object lives, from_pretrained builds the model under zero.Init (each rank holds only
    # its shard) and loads the checkpoint into the shards. transformers keeps only a weak reference, to
    # the latest one made (the learner's policy and reference are both ZeRO-3: the same answer to
    # transformers' is_deepspeed_zero3_enabled, which is all it asks after loading).
    keep_alive = HfDeepSpeedConfig(ds_config) if ds_config["zero_optimization"]["stage"] == 3 else None
    model = load_causal_lm(m.path, m.dtype, m.trust_remote_code, m.attn_implementation, str(device))
    return model, keep_alive


def build_engine(model_config: ModelConfig, settings: ZeroSettings, ds_config: dict, device: torch.device,
                 lr_lambda: Callable[[int], float]) -> Any:
    """The model, sharded as it loads (ZeRO-3), with AdamW and a LambdaLR schedule, as a DeepSpeed engine.
    `lr_lambda` maps DeepSpeed's optimizer-step count to a multiplier of settings.lr."""
    import deepspeed

    model, keep_alive = load_sharded(model_config, ds_config, device)
    if model_config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=adamw(model, settings, gpu=device.type == "cuda"),
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda),
        config=ds_config,
        dist_init_required=False,
    )
    engine.hf_ds_config = keep_alive  # tied to the engine's lifetime
    return engine


def inference_engine(model_config: ModelConfig, ds_config: dict, device: torch.device) -> Any:
    """ALL ranks call. A frozen model (no gradients, eval mode) as a DeepSpeed ZeRO-3 engine without an
    optimizer (`ds_config` from inference_config): DeepSpeed then sets up only the parameter
    partitioning and its gather/release hooks around each forward (DeepSpeedZeRoOffload), so a rank
    holds its shard of the weights and nothing else. Every forward is collective: all ranks run the same
    number. The learner's reference model (reference.on_learner)."""
    import deepspeed

    model, keep_alive = load_sharded(model_config, ds_config, device)
    model.requires_grad_(False)
    model.eval()
    engine, *_ = deepspeed.initialize(model=model, config=ds_config, dist_init_required=False)
    engine.eval()
    engine.hf_ds_config = keep_alive  # tied to the engine's lifetime
    return engine


def adamw(model: torch.nn.Module, settings: ZeroSettings, gpu: bool) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay): DeepSpeed's fused or CPU-offload Adam on GPU, torch's on CPU."""
    params = [p for p in model.parameters() if p.requires_grad]
    kwargs = {"lr": settings.lr, "betas": tuple(settings.betas), "weight_decay": settings.weight_decay}
    if not gpu:
        # DeepSpeed's CPU Adam JIT-compiles (~70 s); torch's AdamW is as fast for what runs on CPU.
        return torch.optim.AdamW(params, **kwargs)
    from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam

    adam = DeepSpeedCPUAdam if settings.offload_optimizer else FusedAdam
    return adam(params, **kwargs)  # both default to AdamW; their flags for it are named differently


def full_tensors(engine: Any, rank: int, group_bytes: int = 64 * 2**20,
                 relay_above: int | None = None) -> Iterator[tuple[str, torch.Tensor | None]]:
    """ALL ranks iterate together. Each distinct tensor of the model's state_dict, in order (a tied weight
    once, under its first name). ZeRO-3 parameters are gathered a group of up to `group_bytes` at a time,
    grouped as the weight sync packs its buckets
    (one collective per group, which costs far less than one per parameter), so no rank ever holds more
    of the model than a group and the largest parameter. Rank 0 gets full tensors, valid until it asks
    for the next one after its group (copy them to keep them); the other ranks get None.

    With `relay_above` (the weight sync's bucket size), a ZeRO-3 parameter the sync sends in partitions
    (weight_sync.sent_in_partitions) is not gathered: it comes as one item per rank's partition, in rank
    order, each relayed to rank 0 alone, so not even rank 0 holds it whole."""
    import deepspeed

    tensors = {name: tensor for name, tensor in engine.module.state_dict(keep_vars=True).items()}
    layout = model_layout(engine.module)
    for group in plan_buckets(layout, group_bytes):
        specs = [layout.tensors[index] for index, _ in group.entries]
        relayed = (relay_above is not None and sent_in_partitions(spec, relay_above) for spec in specs)
        for relay, run in itertools.groupby(zip(specs, relayed, strict=True), key=lambda item: item[1]):
            names = [spec.name for spec, _ in run]
            if relay:
                for name in names:
                    yield from ((name, part) for part in _partitions_at_rank0(tensors[name], rank, engine.device))
                continue
            sharded = [tensors[name] for name in names if hasattr(tensors[name], "ds_id")]  # ZeRO-3 partitioned
            with deepspeed.zero.GatheredParameters(sharded, modifier_rank=None, enabled=bool(sharded)):
                for name in names:
                    yield name, tensors[name].detach() if rank == 0 else None


def _partitions_at_rank0(param: torch.nn.Parameter, rank: int, device: torch.device) -> Iterator[torch.Tensor | None]:
    """ALL ranks iterate. The valid part of every rank's ZeRO-3 partition of `param`, in rank order, on rank 0
    (its own in place, the others received point to point into one reused buffer); None elsewhere."""
    import torch.distributed as dist

    own = param.ds_tensor.detach().reshape(-1)
    if own.device != device:  # offloaded parameters live on the CPU; the group's collectives run on `device`
        own = own.to(device)
    size, numel, buffer = own.numel(), param.ds_numel, None
    for source, start in enumerate(range(0, numel, size)):
        valid = min(size, numel - start)
        if rank == 0 and source == 0:
            yield own[:valid]
        elif rank == 0:
            buffer = torch.empty_like(own) if buffer is None else buffer
            dist.recv(buffer[:valid].view(torch.uint8), src=source)  # as bytes: every dtype travels
            yield buffer[:valid]
        else:
            if rank == source:
                dist.send(own[:valid].view(torch.uint8), dst=0)
            yield None


def gather_full_state(engine: Any, rank: int) -> dict[str, torch.Tensor] | None:
    """ALL ranks call. Full CPU copies of the distinct tensors keyed like the HF state_dict on rank 0 (a
    tied weight under its first name only), None elsewhere."""
    state = {name: tensor.to("cpu", copy=True) for name, tensor in full_tensors(engine, rank) if tensor is not None}
    return state if rank == 0 else None


def save_hf(engine: Any, directory: str, rank: int, model_config: ModelConfig) -> None:
    """ALL ranks call. Rank 0 writes an HF model (safetensors, in the model's dtype) and its tokenizer."""
    state = gather_full_state(engine, rank)
    if state is None:
        return
    dtype = torch_dtype(model_config.dtype)
    engine.module.save_pretrained(directory, state_dict={k: v.to(dtype) if v.is_floating_point() else v
                                                         for k, v in state.items()})
    load_tokenizer(model_config.tokenizer, model_config.trust_remote_code).save_pretrained(directory)
