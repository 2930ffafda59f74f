"""The architecture numbers a memory plan needs, read offline from a model's `config.json`.

A local model directory is read directly. For the hub models the shipped configs name, the
architecture fields of their `config.json` (public facts) ship as package resources under
`resources/model_configs/`, so `rmr1 plan` works on a machine that has neither the weights nor a hub.
Parameter counts come from transformers itself: the model is built on the meta device (no memory,
~0.2 s for 32B), so every architecture transformers knows is counted exactly, tied weights once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from rmr1_ray.config.sections import looks_local

RESOURCE_DIR = "model_configs"
CHECKPOINT_WIDTH = {"float32": 4, "bfloat16": 2, "float16": 2}  # config.json's dtype; unknown: fp32


class ArchitectureError(ValueError):
    """No config.json for a model: the message names the path and what is shipped."""


@dataclass(frozen=True)
class Architecture:
    name: str  # the model path or hub name it was read for
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_positions: int  # the context length vLLM serves when rollout.max_model_len is unset
    checkpoint_width: int  # bytes per value of the stored weights (config.json's dtype)
    num_params: int  # distinct parameters (a tied embedding once)
    largest_layer_params: int  # the biggest module's own parameters: what ZeRO-3 gathers at once

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def shipped_models() -> list[str]:
    """Hub names whose config.json ships with the package."""
    folder = resources.files("rmr1_ray.resources").joinpath(RESOURCE_DIR)
    return sorted(item.name.removesuffix(".json").replace("__", "/") for item in folder.iterdir()
                  if item.name.endswith(".json"))


def read_model_config(path: str) -> dict:
    """config.json of a local model directory, or the shipped copy for a hub name."""
    if looks_local(path):
        file = Path(path).expanduser() / "config.json"
        if not file.is_file():
            raise ArchitectureError(f"{file} does not exist: the memory plan reads the model's architecture from it")
        return json.loads(file.read_text())
    shipped = resources.files("rmr1_ray.resources").joinpath(RESOURCE_DIR, path.replace("/", "__") + ".json")
    if not shipped.is_file():
        raise ArchitectureError(
            f"model {path!r}: no config.json shipped for this hub model (shipped: {', '.join(shipped_models())}); "
            "point model.path at a local copy of the model, or skip the memory plan (--skip-plan)"
        )
    return json.loads(shipped.read_text())


def architecture(path: str) -> Architecture:
    """The architecture of the model at `path` (a local directory or a hub name)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = read_model_config(path)
    fields = {key: value for key, value in raw.items() if key != "model_type"}
    config = AutoConfig.for_model(raw["model_type"], **fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    num_params = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    largest = max(sum(p.numel() for p in module.parameters(recurse=False)) for module in model.modules())
    heads = config.num_attention_heads
    return Architecture(
        name=path,
        hidden=config.hidden_size,
        intermediate=config.intermediate_size,
        layers=config.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        vocab=config.vocab_size,
        max_positions=config.max_position_embeddings,
        checkpoint_width=CHECKPOINT_WIDTH.get(str(raw.get("dtype") or raw.get("torch_dtype")), 4),
        num_params=num_params,
        largest_layer_params=largest,
    )
