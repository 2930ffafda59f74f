"""The memory plan (`rmr1 plan`) against what the GRPO job really uses, on this CPU machine.

For each model size (a 135M model shaped like SmolLM2-135M and a ~500M model shaped like Qwen2.5-0.5B,
random weights built on the spot, fp32) it runs one GRPO step of configs/tiny-cpu/train.yaml (2 DeepSpeed
ZeRO-3 learner ranks over gloo, 1 hf rollout worker, 1 reference worker) on a local Ray cluster, samples
the peak RSS (VmHWM) of every actor process while it runs, and prints it next to the plan's peak per
worker for the same config, with the ratio. Prompt and response lengths are set so that the longest
sequence of the step is the length the plan assumes (the plan always counts the maximum).

It also prints the RSS of an idle actor of each class (libraries imported, no model): the measurement
behind memory_plan.CPU_RUNTIME_BYTES.

    OMP_NUM_THREADS=1 python benchmarks/bench_memory_plan.py [--sizes 135m 500m] [--max-new-tokens 48]
"""

from __future__ import annotations

import argparse
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

    @ray.remote(num_cpus=0)
    def rss_after_import(module: str) -> int:
        import importlib

        importlib.import_module(module)
        return psutil.Process().memory_info().rss

    modules = {"learner": "actors.learner", "reference": "actors.reference", "rollout": "actors.rollout"}
    return {group: ray.get(rss_after_import.options(max_calls=1).remote(module)) for group, module in modules.items()}


def run_size(size: str, root: Path, max_new_tokens: int) -> list[tuple[str, int, int]]:
    model = build_model(size, root)
    data = root / f"data-{size}"
    data.mkdir()
    rows = write_prompt_rows(data / "part-00000.parquet", 4, seed=0, fmt="instruct")
    tokenizer = load_tokenizer(str(model))
    longest = max(map(len, chat_prompts_ids(tokenizer, [row["messages"] for row in rows])))
    overrides = [f"model.path={model}", f"data.train_path={data}", f"data.max_prompt_length={longest}",
                 f"rollout.max_new_tokens={max_new_tokens}", "trainer.total_steps=1",
                 f"trainer.output_dir={root / f'run-{size}'}", "tracking.wandb_mode=disabled"]
    plan = memory_plan(load_config(TrainConfig, CONFIG, overrides))
    with PeakSampler() as sampler:
        if train(["--config", CONFIG, *overrides]) != 0:
            raise RuntimeError(f"the GRPO step on the {size} model failed")
    return [(g.group, g.peak, sampler.peak(g.group)) for g in plan.groups]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["135m", "500m"], choices=["tiny", "135m", "500m"])
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()
    init_ray("local", num_cpus=2)
    idle = idle_actor_rss()
    print("idle actor RSS (libraries, no model) vs memory_plan.CPU_RUNTIME_BYTES:")
    for group, rss in idle.items():
        print(f"  {group:<10} measured {rss / GIB:.2f} GiB   plan {CPU_RUNTIME_BYTES[group] / GIB:.2f} GiB")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            results += [(size, *row) for row in run_size(size, Path(tmp), args.max_new_tokens)]
    print(f"\n{'model':<6} {'group':<10} {'plan GiB':>9} {'measured GiB':>13} {'measured/plan':>14}")
    for size, group, planned, measured in results:
        print(f"{size:<6} {group:<10} {planned / GIB:9.2f} {measured / GIB:13.2f} {measured / planned:14.2f}")
    ray.shutdown()


if __name__ == "__main__":
    main()
