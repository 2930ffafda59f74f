"""Config of the judge service, `jobs/serve_judge` (`rmr1 serve`): a Ray Serve app over HTTP.

Sections: the judge (model, engine, prompt format, sampling defaults, vLLM settings), the engine
replicas (resources, batching, autoscaling), the HTTP front (address, API key, ingress sizing) and
the limits every request is held to.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from rmr1_ray.config.sections import ModelConfig, Strict


class SamplingDefaults(Strict):
    """Used when a request leaves them out. RM-R1 judges decode greedily (temperature 0, top_p 1)."""

    max_new_tokens: int = Field(8192, ge=1, description="default for a request's max_tokens")
    temperature: float = Field(0.0, ge=0, description="default for a request's temperature")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(-1, description="-1: off")
    seed: int | None = Field(None, description="None: fresh samples per call when temperature > 0")


class VLLMSettings(Strict):
    """vLLM engine settings (engine=vllm); the names and meanings of RolloutConfig's."""

    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per engine; replicas.num_gpus must cover it")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    max_model_len: int | None = None
    enforce_eager: bool = Field(False, description="True skips CUDA graph capture (faster start, slower decode)")
    enable_prefix_caching: bool = Field(True, description="the long judge system prompt is shared by every request")


class AutoscalingSettings(Strict):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(
        8.0, gt=0, description="prompts in flight per replica that Serve aims for when it scales"
    )

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingSettings:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas={self.min_replicas} > max_replicas={self.max_replicas}")
        return self


class ReplicaSettings(Strict):
    """The JudgeModel deployment: one engine (one model copy) per replica."""

    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0, description="> 0: the engine runs on CUDA")
    max_batch_size: int = Field(8, ge=1, description="prompts per engine call (serve.batch); 1 turns batching off")
    batch_wait_timeout_s: float = Field(0.05, ge=0, description="how long a batch waits to fill up")
    max_ongoing_requests: int = Field(
        32, ge=1, description="prompts a replica accepts at once; >= max_batch_size, or batches never fill"
    )
    autoscaling: AutoscalingSettings = AutoscalingSettings()

    @model_validator(mode="after")
    def _batches_can_fill(self) -> ReplicaSettings:
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(
                f"max_ongoing_requests={self.max_ongoing_requests} < max_batch_size={self.max_batch_size}: "
                "a replica would never hold enough prompts to fill a batch"
            )
        return self


class HttpSettings(Strict):
    host: str = Field("127.0.0.1", description="0.0.0.0 to accept connections from other machines")
    port: int = Field(8000, ge=1, le=65535)
    route_prefix: str = "/"
    api_key_env: str | None = Field(
        None, description="environment variable holding the bearer key for /v1/*; None: no key required"
    )
    ingress_replicas: int = Field(1, ge=1, description="FastAPI ingress replicas (parsing and fan-out only)")
    max_ongoing_requests: int = Field(256, ge=1, description="HTTP requests one ingress replica handles at once")

    @field_validator("route_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"route_prefix {value!r} must start with '/'")
        return value

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
            raise ValueError(f"api_key_env {value!r} is not an environment variable name (the key itself goes there)")
        return value


class RequestLimits(Strict):
    max_request_bytes: int = Field(1_000_000, ge=1024, description="larger bodies get 413")
    request_timeout_s: float = Field(300.0, gt=0, description="a request still running after this gets 504")
    max_new_tokens: int = Field(8192, ge=1, description="the largest max_tokens a request may ask for")
    max_prompt_tokens: int = Field(8192, ge=1, description="longer judge prompts get 422")
    max_rank_responses: int = Field(8, ge=2, description="responses per /v1/rank request")


class ServeConfig(Strict):
    model: ModelConfig
    engine: Literal["hf", "vllm"] = "hf"
    prompt_format: Literal["instruct", "distilled"] = "instruct"
    sampling: SamplingDefaults = SamplingDefaults()
    vllm: VLLMSettings = VLLMSettings()
    replicas: ReplicaSettings = ReplicaSettings()
    http: HttpSettings = HttpSettings()
    limits: RequestLimits = RequestLimits()
    app_name: str = Field("rmr1-judge", min_length=1, description="Serve application name")
    served_model_name: str | None = Field(
        None, description="the `model` of /v1/chat/completions and /v1/models; None: model.path (as vLLM does)"
    )

    @property
    def openai_model_name(self) -> str:
        return self.served_model_name or self.model.path
    ray_address: str | None = Field(None, description="None: RAY_ADDRESS if set, else start a local cluster")

    @model_validator(mode="after")
    def _consistent(self) -> ServeConfig:
        if self.sampling.max_new_tokens > self.limits.max_new_tokens:
            raise ValueError(
                f"sampling.max_new_tokens={self.sampling.max_new_tokens} exceeds "
                f"limits.max_new_tokens={self.limits.max_new_tokens}"
            )
        context = self.vllm.max_model_len
        needed = self.limits.max_prompt_tokens + self.limits.max_new_tokens
        if self.engine == "vllm" and context is not None and needed > context:
            # vLLM rejects such a prompt with an error that would fail every request batched with it.
            raise ValueError(
                f"limits.max_prompt_tokens + limits.max_new_tokens = {needed} exceeds vllm.max_model_len={context}"
            )
        tp = self.vllm.tensor_parallel_size
        if self.engine == "vllm" and tp > 1 and self.replicas.num_gpus < tp:
            raise ValueError(
                f"vllm.tensor_parallel_size={tp} needs replicas.num_gpus >= {tp} (got {self.replicas.num_gpus})"
            )
        return self

    @property
    def device(self) -> str:
        return "cuda" if self.replicas.num_gpus > 0 else "cpu"
