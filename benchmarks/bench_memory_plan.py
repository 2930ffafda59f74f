"""The memory plan (`rmr1 plan`) against what the GRPO job really uses, on this CPU machine.

For each case (a 135M model shaped like SmolLM2-135M in fp32, with and without gradient checkpointing,
and a ~500M model shaped like Qwen2.5-0.5B in bf16 with checkpointing; random weights built on the spot)
it runs one GRPO step of configs/tiny-cpu/train.yaml (2 DeepSpeed ZeRO-3 learner ranks over gloo, 1 hf
rollout worker, 1 reference worker; 2 prompts x 2 samples) on a local Ray cluster, samples the peak RSS
(VmHWM) of every actor process while it runs, and prints it next to the plan's peak per worker for the
same config, with the ratio. Prompt and response lengths are set so that the longest sequence of the
step is the length the plan assumes (the plan always counts the maximum).

It also prints the RSS of an idle actor of each class (libraries imported, no model): the measurement
behind memory_plan.CPU_RUNTIME_BYTES.

    OMP_NUM_THREADS=1 python benchmarks/bench_memory_plan.py [--cases 135m:float32 ...] [--max-new-tokens 48]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
from pathlib import Path

import psutil
import ray
from bench_weight_sync import build_model

from jobs.plan import memory_plan
from jobs.train_rlvr import main as train
from rmr1_ray.config import load_config
from rmr1_ray.config.train import TrainConfig
from rmr1_ray.engines.base import chat_prompts_ids
from rmr1_ray.memory_plan import CPU_RUNTIME_BYTES, GIB
from rmr1_ray.models import load_tokenizer
from rmr1_ray.ray_utils import init_ray
from rmr1_ray.synthetic import write_prompt_rows

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu" / "train.yaml")
# The 500M model in fp32 would need more than this 23 GiB machine (its plan says so), and even in bf16 the
# object-store sync's full copies on learner rank 0 pass Ray's memory limit: bf16, checkpointed, the reference
# on the learner ranks (one process fewer) and the collective sync (two buckets instead of two copies).
DEFAULT_CASES = ["135m:float32", "135m:float32:checkpointing",
                 "500m:bfloat16:checkpointing:ref_on_learner:collective"]
ACTOR_GROUPS = {"PolicyLearner": "learner", "ReferenceModel": "reference", "RolloutWorker": "rollout"}


class PeakSampler:
    """Samples VmHWM (the kernel's peak RSS of a process) of every Ray actor process of ACTOR_GROUPS."""

    def __init__(self, interval_s: float = 0.2) -> None:
        self.peaks: dict[str, dict[int, int]] = {group: {} for group in ACTOR_GROUPS.values()}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval_s,), daemon=True)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            for process in psutil.process_iter(["pid", "cmdline"]):
                title = (process.info["cmdline"] or [""])[0]
                group = ACTOR_GROUPS.get(title.removeprefix("ray::").split(".")[0])
                if group is not None:
                    peak = vm_hwm_bytes(process.info["pid"])
                    if peak:
                        self.peaks[group][process.info["pid"]] = max(peak, self.peaks[group].get(process.info["pid"], 0))

    def peak(self, group: str) -> int:
        return max(self.peaks[group].values(), default=0)


def vm_hwm_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def idle_actor_rss() -> dict[str, int]:
    """RSS of a fresh actor process once it has imported its class's module, before any model."""

    @ray.remote(num_cpus=0, max_calls=1)  # a fresh worker process per call
    def rss_after_import(module: str) -> int:
        import importlib

        importlib.import_module(module)
        return psutil.Process().memory_info().rss

    modules = {"learner": "actors.learner", "reference": "actors.reference", "rollout": "actors.rollout"}
    return {group: ray.get(rss_after_import.remote(module)) for group, module in modules.items()}


def stored_in(model: Path, dtype: str) -> Path:
    """The model saved in `dtype`, as a user's checkpoint for a run in that dtype would be (a wider file
    would add the loading transient the plan counts as `loading`)."""
    if dtype == "float32":
        return model
    from transformers import AutoModelForCausalLM

    out = model.with_name(f"{model.name}-{dtype}")
    if not out.exists():
        shutil.copytree(model, out, ignore=shutil.ignore_patterns("*.safetensors"))
        AutoModelForCausalLM.from_pretrained(model, dtype=dtype).save_pretrained(out)
    return out


def run_case(case: str, root: Path, max_new_tokens: int) -> list[tuple[str, int, int]]:
    """One GRPO step for a case "SIZE:DTYPE[:checkpointing][:ref_on_learner][:collective]" -> (group, planned
    peak, measured peak) rows."""
    size, dtype, *flags = case.split(":")
    model = stored_in(build_model(size, root) if not (root / size).exists() else root / size, dtype)
    data = root / f"data-{case.replace(':', '-')}"
    data.mkdir()
    rows = write_prompt_rows(data / "part-00000.parquet", 2, seed=0, fmt="instruct")
    tokenizer = load_tokenizer(str(model))
    longest = max(map(len, chat_prompts_ids(tokenizer, [row["messages"] for row in rows])))
    overrides = [f"model.path={model}", f"model.dtype={dtype}", f"model.gradient_checkpointing={'checkpointing' in flags}",
                 *(["reference.on_learner=true", "reference.group={}"] if "ref_on_learner" in flags else []),
                 *(["rollout.weight_sync=collective"] if "collective" in flags else []),
                 f"data.train_path={data}", f"data.max_prompt_length={longest}",
                 f"rollout.max_new_tokens={max_new_tokens}", "trainer.total_steps=1",
                 # 2 prompts x 2 samples: one micro-batch of 2 per learner rank, the size the plan is for
                 "algorithm.train_batch_size=2", "algorithm.ppo_mini_batch_size=2", "rollout.n_samples_per_prompt=2",
                 f"trainer.output_dir={data}-run", "tracking.wandb_mode=disabled"]
    plan = memory_plan(load_config(TrainConfig, CONFIG, overrides))
    with PeakSampler() as sampler:
        if train(["--config", CONFIG, *overrides]) != 0:
            raise RuntimeError(f"the GRPO step of {case} failed")
    return [(g.group, g.peak, sampler.peak(g.group)) for g in plan.groups]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES,
                        help="SIZE:DTYPE[:checkpointing][:ref_on_learner][:collective]")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()
    # The 500M case needs ~22 GiB of this 23.5 GiB machine; Ray's default memory monitor would kill a
    # learner at 95% (its own processes and the page cache count too).
    os.environ.setdefault("RAY_memory_usage_threshold", "0.98")
    init_ray("local", num_cpus=2)
    idle = idle_actor_rss()
    print("idle actor RSS (libraries, no model) vs memory_plan.CPU_RUNTIME_BYTES:")
    for group, rss in idle.items():
        print(f"  {group:<10} measured {rss / GIB:.2f} GiB   plan {CPU_RUNTIME_BYTES[group] / GIB:.2f} GiB")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:
            results += [(case, *row) for row in run_case(case, Path(tmp), args.max_new_tokens)]
            print(f"\n{'case':<32} {'group':<10} {'plan GiB':>9} {'measured GiB':>13} {'measured/plan':>14}")
            for name, group, planned, measured in results:
                print(f"{name:<32} {group:<10} {planned / GIB:9.2f} {measured / GIB:13.2f} {measured / planned:14.2f}")
    ray.shutdown()


if __name__ == "__main__":
    main()
