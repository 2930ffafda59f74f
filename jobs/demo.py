"""`rmr1 demo`: the RM-R1 pipeline end to end on a tiny model, on this machine.

Every stage runs the real job (its `main()`, with the shipped tiny-cpu config plus overrides) on one
local Ray cluster; nothing is a shortcut version:

    1. make-tiny   a random tiny Qwen2 judge and its tokenizer
    2. data        a synthetic judging task with checkable answers (train/test split by question)
    3. prepare     Ray Data: pairs -> GRPO prompts, teacher chains -> SFT rows
    4. distill     SFT on the chains: Ray Train + DeepSpeed ZeRO-3 (2 ranks)
    5. eval        held-out verdict accuracy of the SFT judge
    6. GRPO        rollout / learner / reference / rewarder actor groups
    7. eval        held-out verdict accuracy of the GRPO judge
    8. serve       the judge behind Ray Serve, one HTTP request

    rmr1 demo                                  # defaults: ~6-7 minutes on 2 cores
    rmr1 demo grpo_steps=48 sft_epochs=6       # a longer run
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from rmr1_ray.config import job_parser, parse_job_config, save_resolved
from rmr1_ray.config.demo import DemoConfig

EXAMPLE = "rmr1 demo grpo_steps=10"
TINY = "configs/tiny-cpu"
DEMO_MARKER = ".rmr1-demo"


def run_stage(results: list[dict], name: str, stage: Callable[[], str]) -> None:
    """Run one stage, time it, and keep its key metric (the string it returns) for the summary."""
    print(f"\n=== {name} ===", flush=True)
    start = time.perf_counter()
    metric = stage()
    results.append({"stage": name, "seconds": time.perf_counter() - start, "metric": metric})
    print(f"--- {name}: {metric} ({results[-1]['seconds']:.0f} s)", flush=True)


def run_job(module_main: Callable[[list[str]], int], args: list[str]) -> None:
    code = module_main(args)
    if code:
        raise SystemExit(f"demo: stage failed with exit code {code}: {' '.join(args)}")


def held_out_accuracy(eval_dir: Path) -> tuple[float, int]:
    scores = json.loads((eval_dir / "summary.json").read_text())["scores"]["rewardbench"]
    return scores["absolute"], scores["verdicts"]["error"]


def reward_thirds(metrics_file: Path) -> tuple[float, float]:
    """Mean GRPO reward over the first and the last third of the steps: one step's 64 samples are too
    few to read a trend from (the per-step std of the mean is ~0.12)."""
    rewards = [row["reward/mean"] for row in map(json.loads, metrics_file.open()) if "reward/mean" in row]
    third = max(1, len(rewards) // 3)
    return sum(rewards[:third]) / third, sum(rewards[-third:]) / third


def start_fresh(out: Path) -> None:
    """A demo always runs every stage from scratch: an earlier demo's outputs are removed (the jobs refuse
    to mix with an earlier run's checkpoints). A directory the demo did not write is never touched."""
    if out.exists() and any(out.iterdir()):
        if not (out / DEMO_MARKER).is_file():
            raise SystemExit(f"demo: {out} is not empty and holds no earlier demo run; choose another output_dir")
        print(f"removing the earlier demo run in {out}", flush=True)
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / DEMO_MARKER).write_text("written by rmr1 demo, which removes this directory when it runs again\n")


def main(argv: list[str] | None = None) -> int:
    parser = job_parser("rmr1 demo", __doc__.split("\n\n")[0], DemoConfig, EXAMPLE)
    config, _ = parse_job_config(parser, DemoConfig, argv)

    from jobs import distill, evaluate, make_tiny, prepare_data, serve_judge, train_rlvr
    from rmr1_ray.demo_report import plot_grpo_curve, print_summary
    from rmr1_ray.ray_utils import init_ray
    from rmr1_ray.synthetic import write_task_files

    out = Path(config.output_dir).resolve()
    start_fresh(out)
    save_resolved(config, out)
    init_ray()  # one local cluster for every stage (or RAY_ADDRESS)
    model, data, fmt = out / "model", out / "data", config.prompt_format
    results: list[dict] = []

    def tiny_model() -> str:
        run_job(make_tiny.main, ["--out", str(model), "--seed", str(config.seed)])
        return f"model in {model}"

    def task_data() -> str:
        paths = write_task_files(out / "raw", config.num_questions, config.test_fraction, config.seed, fmt)
        test_rows = len(json.loads(paths["test"].read_text()))
        return f"{sum(1 for _ in paths['pairs'].open())} train questions, {test_rows} test questions"

    def prepare() -> str:
        run_job(prepare_data.main, [
            "--config", f"{TINY}/prepare.yaml", f"output_dir={data}", f"tokenizer.path={model}",
            f"prompt_format={fmt}", f"seed={config.seed}",
            f"sources=[{{name: synthetic, kind: pairwise, path: {out / 'raw' / 'pairs.jsonl'}, "
            f"sample_size: {config.grpo_prompts}, seed: {config.seed}}}]",
            f"chain_sources=[{{name: synthetic-chains, path: {out / 'raw' / 'chains.jsonl'}}}]",
        ])
        stats = json.loads((data / "stats.json").read_text())
        return f"{stats['preference']['rows']['train']} GRPO prompts, {stats['sft']['rows']['train']} SFT rows"

    def sft() -> str:
        run_job(distill.main, [
            "--config", f"{TINY}/distill.yaml", f"model.path={model}", f"data.train_path={data}/sft/train",
            f"data.val_path={data}/sft/val", f"trainer.output_dir={out}/distill", f"trainer.epochs={config.sft_epochs}",
            f"trainer.lr={config.sft_lr}", f"trainer.seed={config.seed}",
            "trainer.micro_batch_size=4",  # the batch of 8 in one micro-step per rank: fewer ZeRO-3 gathers
            "trainer.save_every=0",  # one checkpoint, at the end (the tiny config's every 4 steps would write 200)
            "tracking.log_every=100",
        ])
        rows = [json.loads(line) for line in (out / "distill" / "metrics.jsonl").open()]
        losses = [r["train/loss"] for r in rows if "train/loss" in r]
        return f"train loss {losses[0]:.3f} -> {losses[-1]:.3f}"

    def evaluate_on_test(judge: Path, name: str) -> str:
        run_job(evaluate.main, [
            "--config", f"{TINY}/eval.yaml", f"model.path={judge}", f"prompt_format={fmt}",
            f"benchmarks=[{{name: rewardbench, path: {out / 'raw' / 'test.json'}}}]",
            f"output_dir={out}/{name}", f"sampling.max_new_tokens={config.eval_max_new_tokens}",
            f"seed={config.seed}",
        ])
        accuracy, errors = held_out_accuracy(out / name)
        return f"held-out verdict accuracy {accuracy:.3f} ({errors} unparseable)"

    def grpo() -> str:
        run_job(train_rlvr.main, [
            "--config", f"{TINY}/train.yaml", f"model.path={out}/distill/final", f"data.train_path={data}/train",
            f"trainer.output_dir={out}/grpo", f"trainer.total_steps={config.grpo_steps}",
            f"rollout.max_new_tokens={config.grpo_max_new_tokens}", f"trainer.seed={config.seed}",
            f"trainer.save_every={config.grpo_steps}", f"learner.lr={config.grpo_lr}",
            f"algorithm.entropy_coeff={config.grpo_entropy_coeff}",
            f"algorithm.train_batch_size={config.grpo_prompts_per_step}", "algorithm.ppo_mini_batch_size=4",
            # held-out accuracy during GRPO: the test questions, through rmr1 eval's loader and scorer
            f"trainer.eval_every={config.eval_every}", f"evaluation.prompt_format={fmt}",
            f"evaluation.benchmarks=[{{name: rewardbench, path: {out / 'raw' / 'test.json'}}}]",
            f"evaluation.max_examples={config.eval_examples_per_kind}",
            f"evaluation.max_new_tokens={config.eval_max_new_tokens}", f"evaluation.seed={config.seed}",
        ])
        first, last = reward_thirds(out / "grpo" / "metrics.jsonl")
        return f"mean reward {first:+.3f} (first third of the steps) -> {last:+.3f} (last third)"

    def serve() -> str:
        from rmr1_ray.config import load_config
        from rmr1_ray.config.serve import ServeConfig
        from rmr1_ray.process_group import free_port
        from rmr1_ray.serving.client import JudgeClient

        serve_config = load_config(ServeConfig, f"{TINY}/serve.yaml", [
            f"model.path={out}/grpo/final", f"prompt_format={fmt}", "http.api_key_env=null",
            f"http.port={free_port()}", f"sampling.max_new_tokens={config.eval_max_new_tokens}",
        ])
        url = serve_judge.deploy(serve_config)
        try:  # a question of the task's kind, new to the judge
            answer = JudgeClient(url, timeout=120).judge(question="Which number is larger, 318 or 642?",
                                                         response_a="318 is larger than 642.",
                                                         response_b="642 is larger than 318.")
        finally:
            from ray import serve as ray_serve

            ray_serve.delete(serve_config.app_name)
        print(json.dumps(answer, indent=2)[:1500])
        return f"POST {url}/v1/judge -> winner {answer['winner']!r} in {answer['latency_s']:.2f} s"

    run_stage(results, "1. make-tiny", tiny_model)
    run_stage(results, "2. synthetic task", task_data)
    run_stage(results, "3. prepare (Ray Data)", prepare)
    run_stage(results, "4. distill (SFT, ZeRO-3)", sft)
    run_stage(results, "5. eval after SFT", lambda: evaluate_on_test(out / "distill" / "final", "eval_sft"))
    run_stage(results, "6. GRPO", grpo)
    run_stage(results, "7. eval after GRPO", lambda: evaluate_on_test(out / "grpo" / "final", "eval_grpo"))
    if config.serve:
        run_stage(results, "8. serve", serve)

    plot = plot_grpo_curve(out / "grpo" / "metrics.jsonl", out / "grpo_curve.png")
    print_summary(results, out, plot)
    (out / "summary.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
