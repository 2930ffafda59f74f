"""The `hf` engine: transformers' generate, batched with left padding. Runs anywhere torch runs.

Slower than vLLM (no paged attention, no continuous batching) but exact: in fp32 its log-probs equal
the learner's forward pass to ~1e-6, which makes it the reference point for the vLLM engine.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from rmr1_ray.batch import DataProto, pad_and_assemble
from rmr1_ray.engines.base import SamplingParams
from rmr1_ray.models import load_causal_lm, load_tokenizer


class _FinishRecorder:
    """A stopping criterion that also records where each row stopped.

    transformers pads a finished row with pad tokens, and the pad token is often an EOS token itself
    (<|endoftext|> for Qwen), so the output alone cannot tell where a stop-string match ended a row.
    This criterion decides EOS and stop-string stops itself and remembers the first stop per row.
    """

    def __init__(self, prompt_width: int, batch_size: int, eos_ids: list[int], stop: list[str], tokenizer) -> None:
        from transformers.generation.stopping_criteria import EosTokenCriteria, StopStringCriteria

        self.prompt_width = prompt_width
        self.criteria = [EosTokenCriteria(eos_ids)]
        if stop:
            self.criteria.append(StopStringCriteria(tokenizer, stop))
        self.lengths = torch.full((batch_size,), -1, dtype=torch.long)  # -1: still running

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for criterion in self.criteria:
            done |= criterion(input_ids, scores)
        newly = done.cpu() & (self.lengths < 0)
        self.lengths[newly] = input_ids.shape[1] - self.prompt_width
        return done


class HFEngine:
    def __init__(
        self,
        path: str,
        *,
        tokenizer_path: str | None = None,
        dtype: str = "float32",
        trust_remote_code: bool = False,
        attn_implementation: str | None = None,
        device: str = "cpu",
    ) -> None:
        self.device = device
        self.tokenizer = load_tokenizer(tokenizer_path or path, trust_remote_code=trust_remote_code)
        self.model = load_causal_lm(
            path, dtype=dtype, trust_remote_code=trust_remote_code, attn_implementation=attn_implementation, device=device
        )
        self.model.requires_grad_(False)
        first_name: dict[int, str] = {}  # tensor -> the first state_dict name that holds it (tied weights)
        self._owner = {name: first_name.setdefault(id(t), name) for name, t in self.model.state_dict(keep_vars=True).items()}
        self.pad_id = self.tokenizer.pad_token_id
        configured = self.model.generation_config.eos_token_id
        configured = [] if configured is None else [configured] if isinstance(configured, int) else list(configured)
        self.eos_ids = sorted({*configured, self.tokenizer.eos_token_id})

    @torch.no_grad()
    def generate(self, prompt_token_ids: list[list[int]], params: SamplingParams) -> DataProto:
        from transformers import GenerationConfig, StoppingCriteriaList

        prompts = [list(ids) for ids in prompt_token_ids for _ in range(params.n)]
        width = max(map(len, prompts))
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for i, ids in enumerate(prompts):  # left padding: every row's last prompt token is at the same column
            input_ids[i, width - len(ids) :] = torch.as_tensor(ids)
            attention_mask[i, width - len(ids) :] = 1

        sample = params.temperature > 0
        eos_ids = sorted({*self.eos_ids, *params.stop_token_ids})
        recorder = _FinishRecorder(width, len(prompts), eos_ids, list(params.stop), self.tokenizer)
        # A fresh GenerationConfig, not the model's: a saved one may carry repetition penalties or
        # default top-k/top-p, and RL must sample from the policy's own distribution.
        config = GenerationConfig(
            max_new_tokens=params.max_new_tokens,
            do_sample=sample,
            temperature=params.temperature if sample else None,
            top_p=params.top_p if sample else None,
            top_k=max(params.top_k, 0) if sample else None,  # 0 switches top-k off in transformers
            eos_token_id=eos_ids,
            pad_token_id=self.pad_id,
            output_logits=True,
            return_dict_in_generate=True,
        )
        if params.seed is not None:
            torch.manual_seed(params.seed)  # generate samples from the global generator
        out = self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            generation_config=config,
            stopping_criteria=StoppingCriteriaList([recorder]),
        )
        tokens = out.sequences[:, width:].cpu()
        # Log-probs of the sampled tokens under the raw logits at the sampling temperature: the
        # distribution the learner's forward pass gives (top-p/top-k only shape the sampling).
        scale = params.temperature if sample else 1.0
        log_probs = torch.stack(
            [
                torch.log_softmax(step.float() / scale, dim=-1).gather(1, tokens[:, t : t + 1].to(step.device))[:, 0].cpu()
                for t, step in enumerate(out.logits)
            ],
            dim=1,
        )
        truncated = recorder.lengths < 0  # never stopped: cut off at max_new_tokens
        lengths = torch.where(truncated, tokens.shape[1], recorder.lengths).tolist()
        return pad_and_assemble(
            prompts,
            [tokens[i, :n].tolist() for i, n in enumerate(lengths)],
            self.pad_id,
            rollout_log_probs=[log_probs[i, :n].tolist() for i, n in enumerate(lengths)],
            non_tensors={"truncated": truncated.tolist()},
            meta_info={"temperature": params.temperature},
        )

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copies tensor by tensor into the model's own, so at most the tensor being copied exists twice.
        A tied weight is one storage: either of its names loads it. Every distinct tensor must come."""
        params, loaded = self.model.state_dict(), set()  # views of the model's weights
        for name, tensor in named_tensors:
            if name not in self._owner:
                raise KeyError(f"hf engine: weight {name!r} is not a tensor of this model")
            params[name].copy_(tensor)
            del tensor  # a view of a received bucket: let the bucket go before the next one arrives
            loaded.add(self._owner[name])
        if loaded != (expected := set(self._owner.values())):
            raise ValueError(f"hf engine: weights missing from the update: {sorted(expected - loaded)[:5]}")

    def shutdown(self) -> None:
        self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
