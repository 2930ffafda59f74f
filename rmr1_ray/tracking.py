"""Where a run's numbers go: W&B (online / offline / disabled), OUT/metrics.jsonl (one JSON object
per step) and one console line per step. Sample generations go to OUT/samples/ and a W&B table."""

from __future__ import annotations

import datetime
import json
import time
import uuid
from pathlib import Path

import numpy as np

from rmr1_ray.config.sections import TrackingConfig

METRICS_FILE = "metrics.jsonl"


def new_run_id() -> str:
    return uuid.uuid4().hex[:8]


def _plain(value):
    """numpy / torch scalars -> Python numbers, so every metric is JSON."""
    return value.item() if hasattr(value, "item") else value


class Tracker:
    def __init__(
        self,
        out_dir: str | Path,
        tracking: TrackingConfig,
        config: dict,
        run_id: str,
        total_steps: int,
        start_step: int = 0,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.tracking, self.total_steps = tracking, total_steps
        self.metrics_path = self.out_dir / METRICS_FILE
        self._drop_lines_after(start_step)
        self._step_seconds: list[float] = []
        self.wandb_run = None
        mode = tracking.resolved_wandb_mode
        if mode != "disabled":
            import wandb  # lazy: slow to import, and optional

            self.wandb_run = wandb.init(
                project=tracking.project,
                entity=tracking.entity,
                name=tracking.run_name,
                dir=str(self.out_dir),
                mode=mode,
                config=config,
                id=run_id,
                resume="allow",  # a resumed run keeps logging into the same W&B run
            )

    def _drop_lines_after(self, step: int) -> None:
        """A resumed run repeats the steps after its checkpoint: drop their earlier lines."""
        if not self.metrics_path.exists():
            return
        lines = self.metrics_path.read_text().splitlines(keepends=True)
        self.metrics_path.write_text("".join(line for line in lines if json.loads(line)["step"] <= step))

    def log(self, metrics: dict, step: int) -> None:
        metrics = {key: _plain(value) for key, value in metrics.items()}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)
        if "time/step" in metrics:
            self._step_seconds.append(metrics["time/step"])
        if step % self.tracking.log_every == 0 or step == self.total_steps:
            line = self.console_line(metrics, step)
            if line:
                print(line, flush=True)

    def console_line(self, m: dict, step: int) -> str:
        """One line per GRPO step; empty for an entry without one (the evaluation before step 1 prints its own)."""
        if "reward/mean" not in m:
            return ""
        eta = "-"
        if self._step_seconds:
            remaining = (self.total_steps - step) * sum(self._step_seconds) / len(self._step_seconds)
            eta = str(datetime.timedelta(seconds=round(remaining)))
        parts = [
            f"step {step}/{self.total_steps}",
            f"reward {m.get('reward/mean', float('nan')):+.3f} ± {m.get('reward/std', float('nan')):.3f}",
            f"acc {m.get('verdict/accuracy', float('nan')):.3f}",
            f"format {m.get('verdict/format_valid', float('nan')):.2f}",
            f"kl {m.get('actor/kl_loss', float('nan')):.4f}",
            f"len {m.get('response_length/mean', float('nan')):.0f}",
            *([f"groups {m['dynamic_sampling/groups_kept']} ({m['dynamic_sampling/refill_rounds']} refills)"]
              if "dynamic_sampling/groups_kept" in m else []),
            f"{m.get('perf/gen_tokens_per_s', float('nan')):,.0f} tok/s",
            f"{m.get('time/step', float('nan')):.1f} s/step",
            f"ETA {eta}",
        ]
        return " | ".join(parts)

    def should_log_samples(self, step: int) -> bool:
        every = self.tracking.samples_table_every
        return every > 0 and step % every == 0

    def log_samples(self, rows: list[dict], step: int) -> None:
        """Generations of one step (dicts with the same keys) -> OUT/samples/step_000003.jsonl and W&B."""
        directory = self.out_dir / "samples"
        directory.mkdir(exist_ok=True)
        with (directory / f"step_{step:06d}.jsonl").open("w") as f:
            f.writelines(json.dumps({key: _plain(v) for key, v in row.items()}) + "\n" for row in rows)
        if self.wandb_run is not None and rows:
            import wandb

            columns = list(rows[0])
            table = wandb.Table(columns=columns, data=[[_plain(row[c]) for c in columns] for row in rows])
            self.wandb_run.log({"samples": table}, step=step)

    def finish(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def rollout_metrics(generated: list[dict], scored: list[dict]) -> dict[str, float]:
    """Step metrics from the rollout workers' summaries and the rewarders' per-sample stats."""
    rewards = np.concatenate([s["reward"] for s in scored]).astype(float)
    lengths = np.concatenate([g["response_lengths"] for g in generated])
    overlong = {}
    if "overlong_penalty" in scored[0]:  # algorithm.overlong_buffer_len: part of the reward above
        penalties = np.concatenate([s["overlong_penalty"] for s in scored]).astype(float)
        overlong = {"overlong/penalty_mean": penalties.mean(), "overlong/penalized": int((penalties < 0).sum())}
    return {
        **overlong,
        "reward/mean": rewards.mean(),
        "reward/std": rewards.std(),
        "verdict/accuracy": np.concatenate([s["correct"] for s in scored]).mean(),
        "verdict/format_valid": np.concatenate([s["format_valid"] for s in scored]).mean(),
        "response_length/mean": lengths.mean(),
        "response_length/max": lengths.max(),
        "response_length/truncated_share": sum(g["truncated"] for g in generated) / len(lengths),
        "response_length/truncated": sum(g["truncated"] for g in generated),
        "data/num_samples": len(rewards),
        "data/num_prompts": len({uid for s in scored for uid in s["uid"]}),
        "perf/gen_tokens": int(lengths.sum()),
    }


def wait_timed(start: float, stages: dict[str, list]) -> dict[str, float]:
    """Wait for the ObjectRefs of stages running at the same time (without fetching them) ->
    {"time/<stage>": seconds from `start` until the stage's last ref was ready}."""
    import ray

    owner = {ref: stage for stage, refs in stages.items() for ref in refs}
    left = {stage: len(refs) for stage, refs in stages.items()}
    seconds = {f"time/{stage}": 0.0 for stage, refs in stages.items() if not refs}
    while owner:
        ready, _ = ray.wait(list(owner), num_returns=1, fetch_local=False)
        for ref in ready:
            stage = owner.pop(ref)
            left[stage] -= 1
            if not left[stage]:
                seconds[f"time/{stage}"] = time.perf_counter() - start
    return seconds
