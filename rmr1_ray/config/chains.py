"""Config of the reasoning-chain generator, `jobs/generate_chains` (`rmr1 chains`)."""

from __future__ import annotations

from pydantic import Field, model_validator

from rmr1_ray.config.sections import Strict


class TeacherConfig(Strict):
    """An OpenAI-compatible chat-completions endpoint: OpenAI, Anthropic, a local vLLM server."""

    base_url: str = Field(description="up to and including /v1, e.g. http://127.0.0.1:8000/v1")
    model: str = Field(description="model name sent in every request (vLLM: the --served-model-name)")
    api_key_env: str | None = Field(
        None, description="name of the environment variable holding the API key (null: send no key)"
    )
    max_tokens: int | None = Field(8192, ge=1, description="per completion (null: leave it to the server)")
    temperature: float | None = Field(None, ge=0, description="null: the server's default (some models allow no other)")
    extra_body: dict = Field(default_factory=dict, description="more request fields, e.g. {max_completion_tokens: 8192}")
    timeout_s: float = Field(600.0, gt=0, description="per request; a timeout is retried")
    price_input_per_mtok: float = Field(0.0, ge=0, description="USD per 1M prompt tokens (cost accounting)")
    price_output_per_mtok: float = Field(0.0, ge=0, description="USD per 1M completion tokens")

    @model_validator(mode="after")
    def _url(self) -> TeacherConfig:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"teacher.base_url={self.base_url!r} must start with http:// or https://")
        return self


class RetryConfig(Strict):
    """Retries of one request on 429, 5xx, timeouts and dropped connections."""

    max_attempts: int = Field(8, ge=1, description="attempts per request, the first included")
    initial_backoff_s: float = Field(1.0, ge=0, description="wait before the first retry; doubles each time")
    max_backoff_s: float = Field(60.0, ge=0, description="cap of any wait, Retry-After included")


class ChainsConfig(Strict):
    teacher: TeacherConfig
    retry: RetryConfig = RetryConfig()
    input_path: str = Field(description="prepared preference parquet (file or directory, e.g. OUT/train of `rmr1 prepare`)")
    output_dir: str = Field("runs/chains", description="chains.jsonl, rejected.jsonl, failures.jsonl, stats.json")
    concurrency: int = Field(16, ge=1, description="requests in flight at once")
    limit: int | None = Field(None, ge=1, description="only the first N input rows (a trial run; raise it to continue)")
    second_pass: bool = Field(True, description="send wrong pass-1 chains back with the label (RM-R1's pass 2)")
    require_valid_format: bool = Field(True, description="keep only chains in the chain-of-rubrics format")
    max_failure_fraction: float = Field(
        0.05, ge=0, le=1, description="exit non-zero when more than this share of the rows sent failed"
    )
    seed: int = Field(0, description="retry jitter")
