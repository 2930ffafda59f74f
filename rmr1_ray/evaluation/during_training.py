"""Evaluation during GRPO (`trainer.eval_every`): the policy judges held-out prompts and benchmark
subsets greedily, on the rollout workers, between steps.

The rollout workers already hold the current weights after a step's sync, so no extra model copy is
needed; the benchmarks go through `run_benchmark_subset`, the same loaders, prompts and scorers as
`rmr1 eval`, so a number logged here means what it means in an `rmr1 eval` report.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pyarrow.dataset as pads

from rmr1_ray.config.train import TrainConfig
from rmr1_ray.evaluation.harness import run_benchmark_subset
from rmr1_ray.evaluation.judging import FunctionJudge
from rmr1_ray.prompts import Message
from rmr1_ray.verdict import eval_verdict, verdict_reward

Generate = Callable[[list[list[Message]]], list[str]]


def rollout_judge(rollout, max_new_tokens: int) -> Generate:
    """`generate(message lists) -> texts` on the rollout ActorGroup: the prompts are split into one
    contiguous share per worker (a worker that dies is restarted and its share re-run)."""

    def generate(message_lists: list[list[Message]]) -> list[str]:
        size = -(-len(message_lists) // rollout.num_workers)
        shares = [(message_lists[i : i + size], max_new_tokens) for i in range(0, len(message_lists), size)]
        _, texts = rollout.run("judge", shares)
        return [text for share in texts for text in share]

    return generate


def read_val_prompts(path: str | Path, limit: int | None) -> list[dict]:
    """The first `limit` rows (messages, winner) of a prepared parquet directory such as OUT/val."""
    table = pads.dataset(str(path), format="parquet").to_table(columns=["messages", "winner"])
    return table.slice(0, limit).to_pylist() if limit is not None else table.to_pylist()


def evaluate_policy(generate: Generate, config: TrainConfig, val_prompts: list[dict]) -> dict[str, float]:
    """val/* (verdict accuracy, unparseable share and the training reward on the held-out prompts)
    and eval/<benchmark>/<metric> (run_benchmark_subset's headline metrics), plus time/eval."""
    start = time.perf_counter()
    ev = config.evaluation
    metrics: dict[str, float] = {}
    if val_prompts:
        texts = generate([row["messages"] for row in val_prompts])
        spec = config.reward.spec()
        verdicts = [eval_verdict(text) for text in texts]
        labels = ["A" if row["winner"] == "model_a" else "B" for row in val_prompts]
        rewards = [verdict_reward(text, row["winner"], spec) for text, row in zip(texts, val_prompts, strict=True)]
        metrics.update({
            "val/accuracy": sum(v == label for v, label in zip(verdicts, labels, strict=True)) / len(labels),
            "val/error_rate": verdicts.count("error") / len(verdicts),
            "val/reward_mean": sum(rewards) / len(rewards),
            "val/num_prompts": float(len(val_prompts)),
        })
    if ev.benchmarks:
        scores = run_benchmark_subset(FunctionJudge(generate), ev.benchmarks, ev.max_examples, ev.prompt_format,
                                      ev.seed, ev.both_orders)
        metrics.update({f"eval/{name}": value for name, value in scores.items()})
    metrics["time/eval"] = time.perf_counter() - start
    return metrics
