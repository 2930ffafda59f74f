"""Config sections shared by several jobs. Every section forbids unknown keys."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Strict(BaseModel):
    """Base of every config section: unknown keys are errors, values are type-checked."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def looks_local(path: str) -> bool:
    """A hub name is 'org/name'; anything starting like a filesystem path, or existing, is local."""
    return path.startswith(("/", ".", "~")) or os.path.exists(path)


class ModelConfig(Strict):
    path: str = Field(description="HF model directory or hub name")
    tokenizer_path: str | None = Field(None, description="defaults to `path`")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    attn_implementation: str | None = Field(None, description="None: flash_attention_2 on GPU when installed, else sdpa")
    gradient_checkpointing: bool = False

    @field_validator("path")
    @classmethod
    def _path_exists(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("model path is empty")
        if value.startswith(("/", ".", "~")) and not Path(value).expanduser().exists():
            raise ValueError(f"model path {value!r} does not exist (run `rmr1 make-tiny --out {value}` for a tiny one)")
        return value

    @property
    def tokenizer(self) -> str:
        return self.tokenizer_path or self.path


class GroupConfig(Strict):
    """One Ray actor group: N workers, each with these resources, in its own placement group."""

    num_workers: int = Field(1, ge=1)
    num_cpus_per_worker: float = Field(1.0, ge=0)
    num_gpus_per_worker: float = Field(0.0, ge=0)
    resources: dict[str, float] = Field(default_factory=dict, description="custom resources per worker, e.g. {node_b: 1}")
    strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"


class ClusterConfig(Strict):
    device: Literal["cpu", "gpu"] = "cpu"
    address: str | None = Field(None, description="Ray address; None: RAY_ADDRESS if set, else a new local cluster")
    colocate: bool = Field(False, description="learner, reference and rollout share GPUs (one placement group)")
    wait_for_resources_s: float = Field(0.0, ge=0, description="how long to wait for an autoscaler to add nodes")
    omp_num_threads: int = Field(1, ge=1, description="OMP/torch threads per actor")
    gpu_memory_gib: float = Field(80.0, gt=0, description="memory of one GPU of the cluster's GPU nodes: what the "
                                  "memory plan checks every group's peak per GPU against (cluster.device=gpu)")

    @model_validator(mode="after")
    def _gpu_memory_needs_gpus(self) -> ClusterConfig:
        # a value other than the default (a resolved config repeats the default, which is harmless)
        if self.device == "cpu" and self.gpu_memory_gib != type(self).model_fields["gpu_memory_gib"].default:
            raise ValueError("cluster.gpu_memory_gib is set but cluster.device=cpu: the CPU plan checks this "
                             "machine's memory, so the setting would do nothing; remove it or set cluster.device=gpu")
        return self


class TrackingConfig(Strict):
    project: str = "rmr1-ray"
    entity: str | None = None
    run_name: str | None = None
    wandb_mode: Literal["online", "offline", "disabled"] | None = Field(
        None, description="None: the WANDB_MODE environment variable if set, else offline"
    )

    @property
    def resolved_wandb_mode(self) -> str:
        return self.wandb_mode or os.environ.get("WANDB_MODE") or "offline"
    log_every: int = Field(1, ge=1)
    samples_table_every: int = Field(0, ge=0, description="log a W&B table of sample generations every K steps (0: off)")
