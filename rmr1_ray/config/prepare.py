"""Config of the data preparation job, `jobs/prepare_data` (`rmr1 prepare`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from rmr1_ray.config.sections import ModelConfig, Strict

SourceKind = Literal["skywork", "code_pref", "math_step_dpo", "pairwise"]

# RM-R1 drops Skywork's magpie_ultra subset; the other schemas carry no sub-source field by default.
DEFAULT_DROP_SOURCES: dict[str, list[str]] = {"skywork": ["magpie_ultra"]}


class SourceConfig(Strict):
    """One preference dataset of the mix."""

    name: str = Field(description="short name: written into every row's `source` and into stats.json")
    kind: SourceKind = Field(description="schema: skywork | code_pref | math_step_dpo | pairwise")
    path: str = Field(description="local .json/.jsonl/.parquet file or a directory of them, or a hub dataset name")
    split: str = Field("train", description="hub split (ignored for local files)")
    sample_size: int | None = Field(None, ge=1, description="keep this many raw rows, drawn with `seed` (None: all)")
    seed: int = Field(0, description="sampling seed; the draw equals datasets' shuffle(seed).select(range(n))")
    drop_sources: list[str] | None = Field(
        None, description="rows whose own `source` field is one of these are dropped (None: skywork -> [magpie_ultra])"
    )

    @property
    def dropped_sources(self) -> frozenset[str]:
        chosen = DEFAULT_DROP_SOURCES.get(self.kind, []) if self.drop_sources is None else self.drop_sources
        return frozenset(chosen)


class ChainSourceConfig(Strict):
    """A JSONL file of teacher reasoning chains (from `rmr1 chains`), turned into SFT rows."""

    name: str
    path: str = Field(description="local .jsonl file or a directory of .jsonl files")


class PrepareConfig(Strict):
    output_dir: str = Field(
        "runs/prepare",
        description="OUT: train/, val/, sft/, rejects.jsonl, stats.json; on a multi-node cluster a path all nodes share",
    )
    tokenizer: ModelConfig | None = Field(
        None, description="the judge model whose tokenizer and chat template measure prompt lengths"
    )
    prompt_format: Literal["instruct", "distilled"] = "instruct"
    max_prompt_length: int = Field(4096, ge=1, description="drop prompts longer than this many tokens")
    val_fraction: float = Field(0.05, ge=0, lt=1, description="share of uids (by hash) in the validation split")
    seed: int = Field(0, description="answer positions and the train/val split")
    max_reject_fraction: float = Field(
        0.05, ge=0, le=1, description="fail when a source's share of malformed rows is above this"
    )
    sources: list[SourceConfig] = Field(default_factory=list)
    chain_sources: list[ChainSourceConfig] = Field(default_factory=list)
    require_valid_format: bool = Field(True, description="SFT: reject chains that break the chain-of-rubrics format")
    batch_size: int = Field(256, ge=1, description="rows per map_batches call (one batched tokenizer call)")
    concurrency: int | None = Field(None, ge=1, description="parallel tasks per stage (None: the cluster's CPUs)")
    ray_address: str | None = Field(None, description="None: RAY_ADDRESS if set, else start a local cluster")

    @model_validator(mode="after")
    def _consistent(self) -> PrepareConfig:
        if not self.sources and not self.chain_sources:
            raise ValueError("nothing to do: set `sources` (preference data), `chain_sources` (SFT chains) or both")
        if self.sources and self.tokenizer is None:
            raise ValueError("`tokenizer.path` is required to measure prompt lengths of preference `sources`")
        names = [s.name for s in self.sources] + [c.name for c in self.chain_sources]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"source names must be unique across sources and chain_sources: {duplicates}")
        return self
