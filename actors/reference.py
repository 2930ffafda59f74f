"""ReferenceModel: the frozen starting policy; its log-probs anchor the KL loss.

Where the reference lives is a config choice:
- here (default): a separate actor group, each worker one whole unsharded copy of the model. Simple and
  runs at the same time as the learner's old log-probs, but costs GPUs of its own and needs the whole
  model in one GPU's memory (a 32B judge: ~65 GB of bf16 weights, which an 80 GB GPU cannot hold with
  activations);
- reference.on_learner: on the learner ranks, as verl does: a second ZeRO-3 engine sharded like the
  policy (bf16: 2 bytes x params / ranks on each rank), no group and no GPUs of its own
  (actors/learner.py).
"""

from __future__ import annotations

import os
import time

import ray
import torch

from rmr1_ray.algorithms import logprob_temperature, response_log_probs
from rmr1_ray.batch import DataProto, fetch, with_data_index
from rmr1_ray.models import load_causal_lm


class ReferenceModel:
    """One frozen copy of the initial policy (plain HF model, no DeepSpeed: it never trains); the
    reference group's worker when reference.on_learner is false.

    A plain class: the driver wraps it with `ray.remote(num_cpus=..., num_gpus=...)`. Several
    reference workers can serve one step; the caller sends each a different subset of batch refs.
    """

    def __init__(self, config: dict) -> None:
        self.config = config  # TrainConfig.model_dump()
        self.model = None
        self.device = "cuda" if config["cluster"]["device"] == "gpu" else "cpu"

    def setup(self) -> dict:
        start = time.perf_counter()
        threads = self.config["cluster"]["omp_num_threads"]
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)
        model = self.config["model"]
        self.model = load_causal_lm(
            model["path"],
            dtype=model["dtype"],
            trust_remote_code=model["trust_remote_code"],
            attn_implementation=model["attn_implementation"],
            device=self.device,
        )
        self.model.requires_grad_(False)
        return {
            "node_id": self.node_id(),
            "num_params": sum(p.numel() for p in self.model.parameters()),
            "setup_seconds": time.perf_counter() - start,
        }

    def compute_log_probs(self, batch_refs: list) -> DataProto:
        """{"ref_log_probs": [B, R]} (+ data_index) for the concatenation of `batch_refs`."""
        batch = fetch(batch_refs)
        temperature = logprob_temperature(batch.meta_info, self.config["rollout"]["temperature"])
        micro = self.config["reference"]["micro_batch_size"]
        log_probs = response_log_probs(self.model, batch, micro, temperature, self.device)
        return with_data_index({"ref_log_probs": log_probs}, like=batch)

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()
