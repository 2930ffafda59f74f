"""Config of the evaluation job, `jobs/evaluate` (`rmr1 eval`). Defaults follow RM-R1's evaluation harness."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field, model_validator

from rmr1_ray.config.sections import ModelConfig, Strict
from rmr1_ray.config.serve import VLLMSettings

BenchmarkName = Literal["rewardbench", "rm_bench", "rmb_pairwise", "rmb_bon"]


class BenchmarkSpec(Strict):
    """One benchmark source: a local file/directory in the benchmark's own format, or a hub dataset."""

    name: BenchmarkName
    path: str = Field(description="local .json/.jsonl/.parquet file or directory of them, or a hub dataset name")
    split: str | None = Field(None, description="hub split (None: 'filtered' for rewardbench, else 'train')")
    max_examples: int | None = Field(
        None, ge=1, description="keep the first N valid examples of each subset (None: all); for quick runs"
    )


class EndpointConfig(Strict):
    """An OpenAI-compatible chat-completions server used as the judge instead of a local model."""

    base_url: str = Field(description="e.g. http://127.0.0.1:8000/v1 (the job POSTs to BASE_URL/chat/completions)")
    model: str = Field(description="the `model` field sent with every request")
    api_key_env: str | None = Field("OPENAI_API_KEY", description="environment variable holding the key (None: no key)")
    concurrency: int = Field(8, ge=1, description="requests in flight at once")
    timeout_s: float = Field(600.0, gt=0, description="per request")
    max_retries: int = Field(5, ge=0, description="retries on 429, 5xx, timeouts and connection errors")
    retry_backoff_s: float = Field(1.0, ge=0, description="first retry wait, doubled each retry (or Retry-After)")

    @property
    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None


class SamplingConfig(Strict):
    # RM-R1's harness decodes greedily (temperature 0, top_p 1).
    max_new_tokens: int = Field(8192, ge=1)
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(-1, description="-1: off")


class EvalConfig(Strict):
    model: ModelConfig | None = Field(None, description="a local judge (HF dir or hub name); or set `endpoint`")
    endpoint: EndpointConfig | None = None
    benchmarks: list[BenchmarkSpec] = Field(min_length=1)
    prompt_format: Literal["instruct", "distilled"] = "instruct"
    both_orders: bool = Field(False, description="judge every pair with the preferred answer at A and at B")
    seed: int = Field(0, description="answer positions and sampling")
    sampling: SamplingConfig = SamplingConfig()
    engine: Literal["hf", "vllm"] = "hf"
    vllm: VLLMSettings = Field(default_factory=VLLMSettings, description="engine=vllm: parallelism, memory, context")
    num_workers: int = Field(1, ge=1, description="judge engines (Ray Data actors), one model copy each")
    num_cpus_per_worker: float = Field(1.0, ge=0)
    num_gpus_per_worker: float = Field(0.0, ge=0)
    batch_size: int = Field(8, ge=1, description="prompts per engine.generate call")
    max_reject_fraction: float = Field(
        0.05, ge=0, le=1, description="fail when a benchmark's share of malformed rows is above this"
    )
    output_dir: str = Field("runs/eval", description="OUT: samples.jsonl, rejects.jsonl, summary.json, report.md, *.png")
    ray_address: str | None = Field(None, description="None: RAY_ADDRESS if set, else start a local cluster")

    @model_validator(mode="after")
    def _one_judge(self) -> EvalConfig:
        if (self.model is None) == (self.endpoint is None):
            raise ValueError("set exactly one of `model` (a local judge) and `endpoint` (an OpenAI-compatible server)")
        seen = set()
        for spec in self.benchmarks:
            if (spec.name, spec.path) in seen:
                raise ValueError(f"benchmark {spec.name} with path {spec.path!r} is listed twice")
            seen.add((spec.name, spec.path))
        return self
