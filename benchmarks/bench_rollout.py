"""Rollout engines and GRPO steps, side by side, in one run on the tiny fp32 judge:

1. generation: tokens/s of the vllm engine against the hf engine (same prompts, model, sampling);
2. GRPO step time of the real job (jobs/train_rlvr, configs/tiny-cpu/train.yaml) with each engine;
3. the peer anchor: TRL's GRPOTrainer (use_vllm=False, CPU) on the same model, prompts, samples per
   prompt, response length and batch sizes, with rmr1_ray.verdict.rm_r1_reward as its reward.

    OMP_NUM_THREADS=1 python benchmarks/bench_rollout.py [--steps 4] [--gen 4x4x32 16x8x128]

Both engines run in this process, one after the other; each is warmed up once (vLLM's first batch
builds its kernels: several seconds) and then timed over --repeats runs. tokens/s counts generated
tokens (incl. EOS) over wall time. A random tiny judge rarely emits EOS, so responses run to the limit.

GRPO: samples/s = train_batch_size * n_samples_per_prompt / median step time, step 1 left out (it
includes the engine's warm-up). Our job runs its 5 actors (2 ZeRO-3 learner ranks over gloo, the
rollout worker, the reference, the rewarder) on a local Ray cluster; TRL runs in this one process.
TRL is matched as: generation_batch_size = train_batch_size * n (one GRPO step), per-device batch =
learner.micro_batch_size, gradient_accumulation so that one optimizer step holds ppo_mini_batch_size
prompts, beta = kl_loss_coef (a reference model), the same lr, temperature and max tokens; its
"GRPO step" is one generation batch, timed with a callback.

Not timed: building the tiny model, starting Ray and the actor groups, loading models.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import yaml

from rmr1_ray.config.train import TrainConfig
from rmr1_ray.engines.base import SamplingParams
from rmr1_ray.tiny import make_tiny

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu" / "train.yaml"


# --- inputs --------------------------------------------------------------------------------------


def judge_rows(count: int) -> list[dict]:
    """`count` RM-R1 judge prompts (instruct format) in the prepared-parquet layout."""
    from rmr1_ray.prompts import PreferencePair, balanced_positions, render_pair
    from rmr1_ray.synthetic import generate_items

    items = list(generate_items(count, seed=0))
    uids = [f"q{i:03d}" for i in range(count)]
    rows = []
    for uid, item, position in zip(uids, items, balanced_positions(uids, seed=0), strict=True):
        pair = PreferencePair([{"role": "user", "content": item.question}], item.correct, item.wrong)
        messages, winner = render_pair(pair, position, "instruct")
        rows.append({"uid": uid, "messages": messages, "winner": winner, "source": "synthetic"})
    return rows


def write_train_dir(rows: list[dict], root: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = root / "train"
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), out / "part-00000.parquet")
    return out


# --- 1. generation throughput ------------------------------------------------------------------------


def time_generation(engine, prompts: list[list[int]], params: SamplingParams, repeats: int) -> dict:
    start = time.perf_counter()
    engine.generate(prompts, params)  # warm-up
    warmup = time.perf_counter() - start
    seconds, tokens = [], []
    for r in range(repeats):
        start = time.perf_counter()
        batch = engine.generate(prompts, dataclasses.replace(params, seed=r))
        seconds.append(time.perf_counter() - start)
        tokens.append(int(batch.batch["response_mask"].sum()))
    return {"tokens_per_s": sum(tokens) / sum(seconds), "seconds": statistics.median(seconds), "warmup_s": warmup,
            "tokens": sum(tokens) // repeats}


def bench_generation(model: str, rows: list[dict], shapes: list[tuple[int, int, int]], repeats: int) -> list[dict]:
    from rmr1_ray.engines.hf import HFEngine
    from rmr1_ray.engines.vllm import VLLMEngine

    hf = HFEngine(model)
    tok = hf.tokenizer
    all_prompts = [list(tok.apply_chat_template(r["messages"], add_generation_prompt=True, tokenize=True,
                                                return_dict=True)["input_ids"]) for r in rows]
    results = []
    workloads = [(p, n, t, all_prompts[:p]) for p, n, t in shapes]
    for p, n, t, prompts in workloads:
        results.append({"shape": (p, n, t), "hf": time_generation(hf, prompts, SamplingParams(n=n, max_new_tokens=t), repeats),
                        "prompt_tokens": statistics.mean(map(len, prompts))})
    hf.shutdown()
    engine = VLLMEngine(model, max_model_len=4096)
    try:
        for result, (_, n, t, prompts) in zip(results, workloads, strict=True):
            result["vllm"] = time_generation(engine, prompts, SamplingParams(n=n, max_new_tokens=t), repeats)
    finally:
        engine.shutdown()
    return results


# --- 2. GRPO steps through the job --------------------------------------------------------------------


def job_overrides(model: str, train_dir: Path, out: Path, steps: int, engine: str) -> list[str]:
    return ["--config", str(CONFIG), f"model.path={model}", f"data.train_path={train_dir}",
            f"trainer.output_dir={out}", f"trainer.total_steps={steps}", f"rollout.engine={engine}",
            "trainer.save_every=0", "tracking.wandb_mode=disabled", "tracking.samples_table_every=0"]


def bench_job(model: str, train_dir: Path, root: Path, steps: int, engine: str) -> dict:
    from jobs.train_rlvr import main
    from rmr1_ray.engines import AVAILABLE

    if engine not in AVAILABLE:
        return {"error": f"rollout.engine={engine} is not wired into rmr1_ray.engines.make_engine"}
    out = root / f"job-{engine}"
    start = time.perf_counter()
    code = main(job_overrides(model, train_dir, out, steps, engine))
    wall = time.perf_counter() - start
    if code != 0:
        return {"error": f"job exited with {code}"}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = rows[1:] or rows  # step 1 includes the engine's warm-up
    return {"step_s": statistics.median(r["time/step"] for r in timed),
            "generate_s": statistics.median(r["time/generate"] for r in timed),
            "gen_tokens_per_s": statistics.median(r["perf/gen_tokens_per_s"] for r in timed),
            "first_step_s": rows[0]["time/step"], "wall_s": wall}


# --- 3. TRL GRPOTrainer ---------------------------------------------------------------------------------


def bench_trl(model: str, rows: list[dict], cfg: TrainConfig, root: Path, steps: int) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rmr1_ray.verdict import rm_r1_reward

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    algo, rollout, learner = cfg.algorithm, cfg.rollout, cfg.learner
    n = rollout.n_samples_per_prompt
    samples_per_step = algo.train_batch_size * n
    mini_samples = algo.ppo_mini_batch_size * n

    def reward(completions, winner, **_):
        return [rm_r1_reward(c[0]["content"] if isinstance(c, list) else c, w) for c, w in zip(completions, winner, strict=True)]

    class StepClock(TrainerCallback):
        """Wall time per generation batch (= one of our GRPO steps)."""

        def __init__(self) -> None:
            self.marks = [time.perf_counter()]
            self.per_generation = samples_per_step // mini_samples  # optimizer steps per generation batch

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % self.per_generation == 0:
                self.marks.append(time.perf_counter())

    dataset = Dataset.from_list([{"prompt": r["messages"], "winner": r["winner"]} for r in rows])
    args = GRPOConfig(
        output_dir=str(root / "trl"), use_cpu=True, gradient_checkpointing=False, use_vllm=False,
        num_generations=n, max_completion_length=rollout.max_new_tokens, temperature=rollout.temperature,
        generation_batch_size=samples_per_step, per_device_train_batch_size=learner.micro_batch_size,
        gradient_accumulation_steps=mini_samples // learner.micro_batch_size, num_iterations=algo.ppo_epochs,
        beta=algo.kl_loss_coef if algo.use_kl_loss else 0.0, epsilon=algo.clip_ratio, learning_rate=learner.lr,
        lr_scheduler_type="constant", max_grad_norm=learner.grad_clip, max_steps=steps * samples_per_step // mini_samples,
        logging_steps=1, save_strategy="no", report_to=[], seed=cfg.trainer.seed, dataloader_num_workers=0,
        bf16=False, fp16=False,
    )
    clock = StepClock()
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32), reward_funcs=reward, args=args,
        train_dataset=dataset, processing_class=AutoTokenizer.from_pretrained(model), callbacks=[clock],
    )
    clock.marks = [time.perf_counter()]
    trainer.train()
    step_times = [b - a for a, b in zip(clock.marks, clock.marks[1:], strict=False)]
    timed = step_times[1:] or step_times
    return {"step_s": statistics.median(timed), "first_step_s": step_times[0]}


# --- report ---------------------------------------------------------------------------------------------


def table(header: list[str], rows: list[list]) -> str:
    cells = [header, *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gen", nargs="+", default=["4x4x32", "16x8x128"],
                        help="generation workloads PROMPTSxNxMAX_NEW_TOKENS (the first is one tiny-config GRPO step)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="GRPO steps per job / TRL run (step 1 not timed)")
    parser.add_argument("--engines", nargs="+", default=["hf", "vllm"], choices=["hf", "vllm"],
                        help="job runs, in this order (swap it to check for drift in a shared machine's load)")
    parser.add_argument("--skip-jobs", action="store_true")
    parser.add_argument("--skip-trl", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory(prefix="bench-rollout-") as tmp:  # tiny model, data, job and TRL outputs
        run(args, Path(tmp))


def run(args: argparse.Namespace, root: Path) -> None:
    shapes = [tuple(int(x) for x in spec.split("x")) for spec in args.gen]
    base = TrainConfig.model_validate({**yaml.safe_load(CONFIG.read_text()),
                                       "model": {"path": "."}, "data": {"train_path": "."}})
    samples_per_step = base.algorithm.train_batch_size * base.rollout.n_samples_per_prompt
    model = str(make_tiny(root / "model", seed=0))
    rows = judge_rows(max(max(p for p, _, _ in shapes), base.algorithm.train_batch_size * args.steps))
    train_dir = write_train_dir(rows, root)
    print(f"tiny model {model}; {os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}, "
          f"load average at start {os.getloadavg()[0]:.1f}", flush=True)

    gen = bench_generation(model, rows, shapes, args.repeats)
    jobs = {}
    if not args.skip_jobs:
        from rmr1_ray.ray_utils import init_ray

        init_ray(num_cpus=2)  # one local cluster for both runs
        try:
            for engine in args.engines:
                jobs[engine] = bench_job(model, train_dir, root, args.steps, engine)
        finally:
            import ray

            ray.shutdown()
    trl = None if args.skip_trl else bench_trl(model, rows[: base.algorithm.train_batch_size * args.steps], base, root, args.steps)

    print(f"\nload average at the end {os.getloadavg()[0]:.1f} (timings are only comparable on an otherwise idle machine)")
    print("\n== generation (same prompts, model fp32, temperature 1.0; median of repeats after one warm-up)")
    print(table(
        ["prompts x n x max_new", "prompt tok", "hf tok/s", "vllm tok/s", "vllm / hf", "hf warm-up s", "vllm warm-up s"],
        [[f"{p}x{n}x{t}", f"{r['prompt_tokens']:.0f}", f"{r['hf']['tokens_per_s']:.0f}", f"{r['vllm']['tokens_per_s']:.0f}",
          f"{r['vllm']['tokens_per_s'] / r['hf']['tokens_per_s']:.2f}x", f"{r['hf']['warmup_s']:.1f}",
          f"{r['vllm']['warmup_s']:.1f}"] for r, (p, n, t) in zip(gen, shapes, strict=True)],
    ))
    step_rows = []
    for name, result in [*((f"rmr1-ray job, rollout.engine={k}", v) for k, v in jobs.items()), ("TRL 1.16 GRPOTrainer", trl)]:
        if result is None:
            continue
        if "error" in result:
            step_rows.append([name, result["error"], "", "", "", ""])
            continue
        generate = f"{result['generate_s']:.2f}" if "generate_s" in result else "-"
        step_rows.append([name, f"{result['step_s']:.2f}", generate,
                          f"{samples_per_step / result['step_s']:.2f}", f"{result['first_step_s']:.1f}", ""])
    if trl is not None:
        for row, result in zip(step_rows, [*jobs.values(), trl], strict=False):
            if "error" not in result:
                row[5] = f"{trl['step_s'] / result['step_s']:.2f}x"
    print(f"\n== GRPO step ({base.algorithm.train_batch_size} prompts x {base.rollout.n_samples_per_prompt} samples x "
          f"{base.rollout.max_new_tokens} tokens, {base.algorithm.train_batch_size // base.algorithm.ppo_mini_batch_size} "
          f"optimizer steps; median over steps 2..{args.steps})")
    print(table(["run", "step s", "generate s", "samples/s", "step 1 s", "samples/s vs TRL"], step_rows))


if __name__ == "__main__":  # vLLM may spawn processes: the guard keeps them from re-running this script
    main()
