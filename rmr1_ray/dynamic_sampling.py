"""Which generated groups a GRPO step trains on, and how many more prompts to generate: DAPO's dynamic
sampling (algorithm.dynamic_sampling).

A group (the n samples of one prompt) whose rewards are all equal has GRPO advantages of 0: it adds
nothing to the policy gradient but still dilutes the loss normalisers. With dynamic sampling such groups
are dropped, and the step generates more prompts (refill rounds, at most
algorithm.dynamic_sampling_max_rounds) until train_batch_size groups with varied rewards are left.
Without it, every group is kept and there is one round: the same bookkeeping with nothing to decide.

verl has no core_algos function for this: its DAPO trainers filter inside their fit loops, on a reward
field chosen by algorithm.filter_groups.metric (DAPO's recipe: acc). Here the filter reads the reward the
advantages are computed from (with the soft overlong penalty, if on), since that is what makes a group's
advantages all 0. Like verl, a full batch keeps the first groups and drops the surplus.

Where the cap is reached with too few groups, verl's DAPO trainer raises ("Generated too many. Please
check if your data are too difficult."). Here the step goes on with the groups it has: a long run should
not die on one hard batch, and a smaller batch still carries signal. They are cut to whole PPO
mini-batches (algorithm.ppo_mini_batch_size prompts: the learner steps its optimizer per mini-batch and
splits each evenly over its ranks, which the config already checks for a mini-batch); with fewer than
one mini-batch the step skips its update, and the learner's LR schedule still moves on by one step.

Every group that is not trained on is counted in the step's metrics and written with its reason
(equal_rewards, surplus, partial_mini_batch) to OUT/dropped_groups.jsonl.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

DROPPED_FILE = "dropped_groups.jsonl"


@dataclass(frozen=True)
class Group:
    round: int
    prompt: int  # the prompt's data_index in its round; its samples are prompt * n .. prompt * n + n - 1
    uid: str
    rewards: tuple[float, ...]

    @property
    def varied(self) -> bool:
        return len(set(self.rewards)) > 1


@dataclass
class Selection:
    keep: list[list[int]] | None  # per round, the data_index of the samples to train on (None: all)
    num_groups: int  # groups trained on
    dropped: list[dict] = field(default_factory=list)  # {round, uid, reason, rewards}
    metrics: dict[str, float] = field(default_factory=dict)


class StepGroups:
    """The groups of one step, round by round:

        groups = StepGroups(config.algorithm, n, round_unit)
        size = config.algorithm.train_batch_size
        while size:
            size = groups.add_round(score(generate(data.next(size))))   # prompts of the next round, 0: done
        selection = groups.select()
    """

    def __init__(self, algorithm, n: int, round_unit: int) -> None:
        """algorithm: AlgorithmConfig; n: samples per prompt; round_unit: a round's prompt count must be
        a multiple of it (the rollout workers and learner ranks split a round evenly)."""
        self.enabled = algorithm.dynamic_sampling
        self.target = algorithm.train_batch_size
        self.max_rounds = algorithm.dynamic_sampling_max_rounds
        self.mini_batch = algorithm.ppo_mini_batch_size
        self.n, self.round_unit = n, round_unit
        self.groups: list[Group] = []
        self.rounds = 0

    def add_round(self, scored: list[dict]) -> int:
        """A round's per-sample stats (the rewarder's score() stats: reward, uid, data_index) -> the number
        of prompts the next round should generate; 0 when the step has enough groups or no rounds left."""
        rewards: dict[int, list[float]] = {}
        uids: dict[int, str] = {}
        for part in scored:
            for reward, uid, index in zip(part["reward"], part["uid"], part["data_index"], strict=True):
                rewards.setdefault(index // self.n, []).append(float(reward))
                uids[index // self.n] = uid
        self.groups += [Group(self.rounds, p, uids[p], tuple(rewards[p])) for p in sorted(rewards)]
        self.rounds += 1
        if not self.enabled or self.rounds > self.max_rounds:
            return 0
        return refill_size(self.target, len(self._varied()), len(self.groups), self.round_unit)

    def _varied(self) -> list[Group]:
        return [g for g in self.groups if g.varied]

    def select(self) -> Selection:
        if not self.enabled:
            return Selection(keep=None, num_groups=len(self.groups))
        varied = self._varied()
        full = len(varied) >= self.target
        keep = varied[: self.target] if full else varied[: len(varied) - len(varied) % self.mini_batch]
        kept = {(g.round, g.prompt) for g in keep}
        dropped = [
            {"round": g.round, "uid": g.uid, "rewards": list(g.rewards),
             "reason": "equal_rewards" if not g.varied else "surplus" if full else "partial_mini_batch"}
            for g in self.groups if (g.round, g.prompt) not in kept
        ]
        rows: list[list[int]] = [[] for _ in range(self.rounds)]
        for g in keep:
            rows[g.round] += range(g.prompt * self.n, (g.prompt + 1) * self.n)
        reasons = [d["reason"] for d in dropped]
        metrics = {
            "dynamic_sampling/refill_rounds": self.rounds - 1,
            "dynamic_sampling/groups_generated": len(self.groups),
            "dynamic_sampling/groups_filtered": reasons.count("equal_rewards"),
            "dynamic_sampling/groups_surplus": reasons.count("surplus"),
            "dynamic_sampling/groups_partial_mini_batch": reasons.count("partial_mini_batch"),
            "dynamic_sampling/groups_kept": len(keep),
            "dynamic_sampling/skipped_update": int(not keep),
        }
        return Selection(keep=rows, num_groups=len(keep), dropped=dropped, metrics=metrics)


def refill_size(target: int, varied: int, generated: int, unit: int) -> int:
    """Prompts for the next round: enough for the missing groups at the share of varied groups seen so
    far in this step (a whole batch when none was varied yet), rounded up to `unit`, at most `target`;
    0 when nothing is missing."""
    missing = target - varied
    if missing <= 0:
        return 0
    wanted = target if varied == 0 else math.ceil(missing * generated / varied)
    return min(target, math.ceil(wanted / unit) * unit)


def round_unit(rollout_workers: int, learner_ranks: int, n: int) -> int:
    """The smallest prompt count a round can have: each rollout worker gets an equal share of the
    prompts, and cuts its n samples per prompt into equal shares for the learner ranks."""
    return rollout_workers * (learner_ranks // math.gcd(n, learner_ranks))


class DroppedLog:
    """OUT/dropped_groups.jsonl: one line per group a step did not train on. A resumed run repeats the
    steps after its checkpoint, so their earlier lines go first."""

    def __init__(self, out_dir: str | Path, start_step: int = 0) -> None:
        self.path = Path(out_dir) / DROPPED_FILE
        if self.path.exists():
            lines = self.path.read_text().splitlines(keepends=True)
            self.path.write_text("".join(line for line in lines if json.loads(line)["step"] <= start_step))

    def write(self, step: int, dropped: list[dict]) -> None:
        if dropped:
            with self.path.open("a") as f:
                f.writelines(json.dumps({"step": step, **row}) + "\n" for row in dropped)
