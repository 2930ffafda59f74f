"""`rmr1 plan`: the memory plan of a GRPO or SFT config, checked offline before anything launches.

    rmr1 plan --config configs/rm-r1/qwen2.5-7b-instruct-grpo.yaml [key=value ...]

Prints every actor group's estimated peak memory per device, term by term (rmr1_ray.memory_plan), and
the verdict against cluster.gpu_memory_gib (or this machine's memory on CPU). Exit 0: it fits; exit 2:
it does not (the message names the group, the term and the setting to change) or the config is bad.
`rmr1 train` and `rmr1 distill` run the same check before they start (--skip-plan skips it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pydantic import BaseModel

from rmr1_ray.architecture import ArchitectureError, architecture
from rmr1_ray.config import ConfigError, apply_overrides, load_config, read_yaml_tree
from rmr1_ray.config.distill import DistillConfig
from rmr1_ray.config.train import TrainConfig
from rmr1_ray.memory_plan import GIB, MemoryPlan, format_plan, plan_distill, plan_train

EXAMPLE = "rmr1 plan --config configs/rm-r1/qwen2.5-32b-instruct-grpo.yaml learner.micro_batch_size=2"


def memory_plan(config: BaseModel) -> MemoryPlan:
    """The plan of a TrainConfig or DistillConfig, against the configured GPU size or this machine."""
    import psutil

    arch = architecture(config.model.path)
    gpu = config.cluster.device == "gpu"
    capacity = int(config.cluster.gpu_memory_gib * GIB) if gpu else psutil.virtual_memory().total
    plan = plan_train if isinstance(config, TrainConfig) else plan_distill
    return plan(config, arch, capacity)


def add_plan_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--skip-plan", action="store_true",
                        help="start without checking the memory plan first (see `rmr1 plan`)")


def check_memory(parser: argparse.ArgumentParser, config: BaseModel, args: argparse.Namespace, title: str) -> None:
    """Before a job starts: print its memory plan and end the program (exit 2) when it does not fit."""
    if args.skip_plan:
        return
    try:
        plan = memory_plan(config)
    except ArchitectureError as exc:
        parser.exit(2, f"{parser.prog}: memory plan: {exc}\n")
    format_plan(plan, title, lambda line: print(line, flush=True))
    if not plan.fits:
        parser.exit(2, f"{parser.prog}: the memory plan does not fit (--skip-plan starts anyway)\n")


def job_of(tree: dict) -> type[BaseModel]:
    """Which job a config tree is for: GRPO configs have the actor-group sections, SFT ones `workers`."""
    if any(section in tree for section in ("learner", "rollout", "algorithm", "reference")):
        return TrainConfig
    if "workers" in tree:
        return DistillConfig
    raise ConfigError("cannot tell the job: a GRPO config has learner/rollout sections, an SFT config `workers`")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="rmr1 plan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Example:\n  {EXAMPLE}")
    parser.add_argument("--config", metavar="FILE", required=True, help="a `rmr1 train` or `rmr1 distill` config")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    args = parser.parse_args(argv)
    try:
        model = job_of(apply_overrides(read_yaml_tree(Path(args.config)), args.overrides))
        config = load_config(model, args.config, args.overrides)
        plan = memory_plan(config)
    except (ConfigError, ArchitectureError) as exc:
        parser.exit(2, f"{parser.prog}: {exc}\n")
    format_plan(plan, args.config, lambda line: sys.stdout.write(line + "\n"))
    return 0 if plan.fits else 2


if __name__ == "__main__":
    raise SystemExit(main())
