"""RolloutWorker: samples judgements for a batch of judge prompts with a generation engine."""

from __future__ import annotations

import os
import time

import numpy as np
import ray
import torch

from rmr1_ray.batch import LOG_PROB_KEYS, DataProto, rank_payloads
from rmr1_ray.engines import SamplingParams, make_engine
from rmr1_ray.engines.base import chat_prompt_ids, response_texts
from rmr1_ray.models import load_tokenizer
from rmr1_ray.process_group import Rendezvous
from rmr1_ray.weight_sync import SyncGroup, WeightLayout, packed_bytes, receive_weights, unpack_state


def _object_array(values: list) -> np.ndarray:
    out = np.empty(len(values), dtype=object)  # np.array() would turn equal-length lists into a 2-D array
    out[:] = values
    return out


class RolloutWorker:
    """One engine replica. A plain class: the driver wraps it with `ray.remote` in a placement group."""

    def __init__(self, config: dict, worker_index: int) -> None:
        self.config = config  # TrainConfig.model_dump(); nothing heavy happens before setup()
        self.worker_index = worker_index
        self.engine = None
        self.tokenizer = None
        self.device = torch.device("cpu")  # set in setup()
        self.weight_group: SyncGroup | None = None  # collective weight sync with learner rank 0
        self.weight_layout: WeightLayout | None = None

    def setup(self) -> dict:
        start = time.perf_counter()
        threads = self.config["cluster"]["omp_num_threads"]
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)
        model = self.config["model"]
        self.tokenizer = load_tokenizer(model["tokenizer_path"] or model["path"], model["trust_remote_code"])
        self.device = torch.device("cuda", 0) if self.config["cluster"]["device"] == "gpu" else torch.device("cpu")
        self.engine = make_engine(self.config["rollout"]["engine"], model, self.config["rollout"], self.device.type)
        return {"node_id": self.node_id(), "worker_index": self.worker_index, "setup_seconds": time.perf_counter() - start}

    def _sampling_params(self, seed: int | None) -> SamplingParams:
        r = self.config["rollout"]
        return SamplingParams(
            n=r["n_samples_per_prompt"],
            temperature=r["temperature"],
            top_p=r["top_p"],
            top_k=r["top_k"],
            max_new_tokens=r["max_new_tokens"],
            stop=tuple(r["stop"]),
            stop_token_ids=tuple(r["stop_token_ids"]),
            seed=seed,
        )

    def generate(self, prompts: DataProto) -> tuple:
        """Prompt rows (non-tensor messages, uid, winner, data_index; meta_info seed) ->
        (n samples per prompt as a DataProto, one share of them per learner rank as a payload with just
        what a forward pass reads (batch.rank_payloads), a small summary for the driver).

        A sample's data_index is prompt data_index * n + k, so the samples of a step batch are
        numbered 0..B*n-1 whichever worker made them. The summary is what the driver reads (it never
        pulls the batch); it also tells the driver this worker is alive.
        """
        start = time.perf_counter()
        n = self.config["rollout"]["n_samples_per_prompt"]
        max_prompt = self.config["data"]["max_prompt_length"]
        nt = prompts.non_tensor_batch
        prompt_ids = []
        for uid, messages in zip(nt["uid"], nt["messages"], strict=True):
            ids = chat_prompt_ids(self.tokenizer, messages)
            if len(ids) > max_prompt:  # the prepare job filters these with the same tokenizer
                raise ValueError(f"prompt {uid!r} has {len(ids)} tokens > data.max_prompt_length={max_prompt}")
            prompt_ids.append(ids)

        batch = self.engine.generate(prompt_ids, self._sampling_params(prompts.meta_info.get("seed")))
        mask = batch.batch["response_mask"]
        lengths = mask.sum(-1)
        texts = [self.tokenizer.decode(ids[:n_tokens]) for ids, n_tokens in zip(batch.batch["responses"], lengths.tolist(), strict=True)]
        batch.non_tensor_batch.update(
            uid=np.repeat(nt["uid"], n),
            winner=np.repeat(nt["winner"], n),
            data_index=_object_array([int(i) * n + k for i in nt["data_index"] for k in range(n)]),
            response_text=_object_array(texts),
        )
        seconds = time.perf_counter() - start
        summary = {
            "num_samples": len(batch),
            "prompt_tokens": int(batch.batch["attention_mask"].sum() - lengths.sum()),
            "response_tokens": int(lengths.sum()),
            "response_lengths": lengths.tolist(),
            "truncated": int(sum(batch.non_tensor_batch["truncated"])),
            "seconds": seconds,
        }
        shares = rank_payloads(batch, self.config["learner"]["group"]["num_workers"], LOG_PROB_KEYS)
        return batch, *shares, summary

    def judge(self, message_lists: list[list[dict]], max_new_tokens: int) -> list[str]:
        """One greedy judgement per prompt with the current weights (evaluation during training)."""
        r = self.config["rollout"]
        params = SamplingParams(n=1, temperature=0.0, max_new_tokens=max_new_tokens, stop=tuple(r["stop"]),
                                stop_token_ids=tuple(r["stop_token_ids"]))
        batch = self.engine.generate([chat_prompt_ids(self.tokenizer, messages) for messages in message_lists], params)
        return [text for text, _ in response_texts(self.tokenizer, batch)]

    def load_weights(self, packed: dict) -> dict:
        """Full weights packed by weight_sync.pack_state (the driver passes the learner's ObjectRef; Ray
        resolves it here zero-copy) -> the engine's weights."""
        start = time.perf_counter()
        self.engine.load_weights(unpack_state(packed))
        return {"bytes": packed_bytes(packed), "seconds": time.perf_counter() - start}

    def join_weight_group(self, address: str, port: int, rank: int, world_size: int, backend: str,
                          layout: WeightLayout) -> None:
        """Join the collective weight-sync group of learner rank 0 (leaving an earlier one)."""
        if self.weight_group is not None:
            self.weight_group.close()
        self.weight_group = SyncGroup(backend, Rendezvous(address, port), rank, world_size, self.device)
        self.weight_layout = layout

    def receive_weights(self, bucket_bytes: int) -> dict:
        """One collective sync: the buckets learner rank 0 broadcasts (send_weights) -> the engine."""
        start = time.perf_counter()
        self.engine.load_weights(receive_weights(self.weight_layout, self.weight_group, bucket_bytes))
        return {"seconds": time.perf_counter() - start}

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
