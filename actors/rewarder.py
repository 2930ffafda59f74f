"""VerdictRewarder: RM-R1's rule-based reward for a batch of judgements (no model).

The rewarder group also assembles each step's training batch (the join of all stages' pieces plus
GRPO advantages, rmr1_ray.step_batch) and cuts sample tables: it is the group that holds no model,
and a long-lived actor spares the driver a fresh Python process (torch + verl imports, seconds) per
step, which is what a Ray task costs once placement groups hold every CPU.
"""

from __future__ import annotations

import time

import ray
import torch

from rmr1_ray.algorithms import overlong_penalty
from rmr1_ray.batch import UPDATE_KEYS, DataProto, rank_payloads, with_data_index
from rmr1_ray.config.train import AlgorithmConfig, RewardConfig
from rmr1_ray.step_batch import assemble_from_refs
from rmr1_ray.verdict import parse_judgement, rm_r1_reward, verdict_reward


class VerdictRewarder:
    """A plain class: the driver wraps it with `ray.remote` in a placement group."""

    def __init__(self, config: dict, worker_index: int) -> None:
        self.spec = RewardConfig.model_validate(config["reward"]).spec()
        self.algorithm = AlgorithmConfig.model_validate(config["algorithm"])
        self.max_new_tokens = config["rollout"]["max_new_tokens"]
        self.worker_index = worker_index

    def setup(self) -> dict:
        return {"node_id": self.node_id(), "worker_index": self.worker_index}

    def _rewards(self, batch: DataProto) -> tuple[list[float], torch.Tensor | None]:
        """Each sample's reward: the verdict reward, plus DAPO's soft overlong penalty when
        algorithm.overlong_buffer_len is set -> (rewards, penalties or None)."""
        nt = batch.non_tensor_batch
        rewards = [verdict_reward(text, winner, self.spec)
                   for text, winner in zip(nt["response_text"], nt["winner"], strict=True)]
        if not self.algorithm.overlong_buffer_len:
            return rewards, None
        penalties = overlong_penalty(batch.batch["response_mask"].sum(-1), self.max_new_tokens,
                                     self.algorithm.overlong_buffer_len, self.algorithm.overlong_penalty_factor)
        return [r + p for r, p in zip(rewards, penalties.tolist(), strict=True)], penalties

    def score(self, batch: DataProto) -> tuple[DataProto, dict]:
        """A rollout batch -> ({token_level_rewards [B, R]} + data_index, per-sample stats).

        The sequence reward sits on the last response token (0 elsewhere), as GRPO's outcome
        advantage expects. Stats: reward (what the advantages see), correct (RM-R1's verdict check),
        format_valid (the strict chain-of-rubrics parse), data_index, uid; with the soft overlong
        penalty also overlong_penalty (its part of the reward).
        """
        start = time.perf_counter()
        nt = batch.non_tensor_batch
        texts, winners = nt["response_text"], nt["winner"]
        rewards, penalties = self._rewards(batch)
        mask = batch.batch["response_mask"]
        token_level = torch.zeros(mask.shape, dtype=torch.float32)
        last = (mask.sum(-1) - 1).clamp(min=0)
        token_level[torch.arange(len(batch)), last] = torch.tensor(rewards, dtype=torch.float32)
        stats = {
            "reward": rewards,
            "correct": [rm_r1_reward(text, winner) > 0 for text, winner in zip(texts, winners, strict=True)],
            "format_valid": [parse_judgement(text).format_valid for text in texts],
            "data_index": [int(i) for i in nt["data_index"]],
            "uid": [str(u) for u in nt["uid"]],
            "seconds": time.perf_counter() - start,
        }
        if penalties is not None:
            stats["overlong_penalty"] = penalties.tolist()
        return with_data_index({"token_level_rewards": token_level}, like=batch), stats

    def assemble(
        self, rounds: list, keep: list | None, norm_adv_by_std: bool, overlong_filtering: bool, learner_ranks: int
    ) -> tuple:
        """The step's pieces, one tuple of lists of ObjectRefs per generation round, and the samples of
        each round to train on (None: all) -> (the step batch's share of every learner rank, as payloads
        with what an update reads; diagnostics). See step_batch.assemble."""
        batch, stats = assemble_from_refs(rounds, keep, norm_adv_by_std, overlong_filtering)
        return *rank_payloads(batch, learner_ranks, UPDATE_KEYS), stats

    def sample_rows(self, batch: DataProto, max_prompts: int) -> list[dict]:
        """The scored generations of a rollout batch's first `max_prompts` prompts (for the samples table)."""
        nt = batch.non_tensor_batch
        keep = set(list(dict.fromkeys(nt["uid"]))[:max_prompts])  # the first prompts, in batch order
        rewards, _ = self._rewards(batch)
        lengths = batch.batch["response_mask"].sum(-1).tolist()
        return [
            {"uid": uid, "data_index": int(index), "winner": winner, "reward": reward, "response_tokens": length,
             "truncated": bool(truncated), "response": text}
            for uid, index, winner, reward, length, truncated, text in zip(
                nt["uid"], nt["data_index"], nt["winner"], rewards, lengths, nt["truncated"], nt["response_text"],
                strict=True)
            if uid in keep
        ]

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()
