"""Learner -> rollout weight sync, side by side, on real actor groups (2 DeepSpeed ZeRO-3 learner ranks over
gloo, 2 rollout workers with the hf engine) on a local Ray cluster:

- baseline: the object-store path as it was before collective sync (rank 0 gathers the whole model, bf16
  upcast to fp32 numpy, the tied lm_head sent a second time, one ray.put, every worker loads it);
- object_store: rollout.weight_sync=object_store now (the model's dtype, a tied weight once);
- collective: rollout.weight_sync=collective (gloo here; NCCL with cluster.device=gpu), buckets of
  --bucket-mb MiB broadcast as they fill.

For each model size (the tiny judge; a 135M model shaped like SmolLM2-135M; a ~500M model shaped like
Qwen2.5-0.5B, random weights built on the spot) and dtype (fp32, bf16) it prints seconds per sync (median
of --repeats after a warm-up), MiB moved per sync, and the extra peak RSS during syncs of learner rank 0
and of rollout worker 0 (VmHWM reset through /proc/PID/clear_refs before the timed syncs, minus VmRSS
then), with ratios against the baseline.

    OMP_NUM_THREADS=1 python benchmarks/bench_weight_sync.py [--sizes tiny 135m 500m] [--dtypes float32 bfloat16]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group

from actors.group import ActorGroup, worker_env
from actors.learner import PolicyLearner
from actors.rollout import RolloutWorker
from rmr1_ray.config.train import TrainConfig
from rmr1_ray.ray_utils import init_ray
from rmr1_ray.tiny import make_tiny
from rmr1_ray.weight_sync import WeightSync

# Qwen2 shapes: (hidden, layers, heads, kv heads, intermediate, vocab); all tie their embeddings.
SHAPES = {"135m": (576, 30, 9, 3, 1536, 49152), "500m": (896, 24, 14, 2, 4864, 151936)}
MIB = 2**20


def build_model(size: str, root: Path) -> Path:
    """The tiny judge, or a random model of one of SHAPES beside the tiny judge's tokenizer."""
    tiny = make_tiny(root / "tiny", seed=0)
    if size == "tiny":
        return tiny
    from transformers import Qwen2Config, Qwen2ForCausalLM

    hidden, layers, heads, kv, inter, vocab = SHAPES[size]
    config = Qwen2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, intermediate_size=inter, vocab_size=vocab, tie_word_embeddings=True,
                         max_position_embeddings=2048)
    torch.manual_seed(0)
    out = root / size
    Qwen2ForCausalLM(config).save_pretrained(out)
    for file in tiny.iterdir():  # the tokenizer (the model's vocabulary is larger: nothing is generated)
        if "token" in file.name or file.name == "chat_template.jinja":
            shutil.copy(file, out / file.name)
    return out


def train_config(model: Path, dtype: str) -> dict:
    return TrainConfig(
        model={"path": str(model), "dtype": dtype},
        data={"train_path": "unused"},
        rollout={"group": {"num_workers": 2, "num_cpus_per_worker": 0.5}, "n_samples_per_prompt": 2},
        learner={"group": {"num_workers": 2, "num_cpus_per_worker": 0.5}, "micro_batch_size": 1},
        algorithm={"train_batch_size": 2, "ppo_mini_batch_size": 2},
    ).model_dump()


def baseline_gather(learner) -> dict:
    """Rank 0's numpy state dict as the pre-collective path built it: bf16 upcast to fp32, tied lm_head too."""

    from rmr1_ray.zero import full_tensors

    state = {}
    for name, tensor in full_tensors(learner.engine, learner.rank):
        if tensor is not None:
            state[name] = (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy().copy()
    if learner.rank == 0 and "model.embed_tokens.weight" in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]  # state_dict() listed it: a second copy
    return state if learner.rank == 0 else None


def baseline_load(worker, state: dict) -> int:
    import warnings

    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")  # read-only views: only read
    worker.engine.load_weights((k, torch.from_numpy(v)) for k, v in state.items())
    return int(sum(array.nbytes for array in state.values()))


class BaselineSync:
    def __init__(self, learner, rollout) -> None:
        self.learner, self.rollout = learner, rollout

    def sync(self) -> dict:
        start = time.perf_counter()
        refs = [a.__ray_call__.remote(baseline_gather) for a in self.learner.actors]
        ray.wait(refs, num_returns=len(refs), fetch_local=False)
        loaded = ray.get([w.__ray_call__.remote(baseline_load, refs[0]) for w in self.rollout.actors])
        return {"sync/megabytes": loaded[0] / MIB, "time/sync": time.perf_counter() - start}


def pid_of(actor) -> int:
    return ray.get(actor.__ray_call__.remote(lambda _: os.getpid()))


def memory_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def measure(sync, pids: dict[str, int], repeats: int) -> dict:
    sync.sync()  # warm-up: groups formed, buffers allocated once
    base = {}
    for role, pid in pids.items():
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
        base[role] = memory_kib(pid, "VmRSS")
    seconds, megabytes = [], 0.0
    for _ in range(repeats):
        metrics = sync.sync()
        seconds.append(metrics["time/sync"])
        megabytes = metrics["sync/megabytes"]
    peaks = {role: (memory_kib(pid, "VmHWM") - base[role]) / 1024 for role, pid in pids.items()}
    return {"s": statistics.median(seconds), "MiB": megabytes, **{f"{r} peak MiB": v for r, v in peaks.items()}}


def run_size(size: str, dtype: str, root: Path, bucket_mb: int, repeats: int) -> list[dict]:
    model = build_model(size, root)
    cfg = train_config(model, dtype)
    pgs = [placement_group([{"CPU": 0.5}] * 2) for _ in range(2)]
    ray.get([pg.ready() for pg in pgs])
    env = worker_env(1)
    learner = ActorGroup("learner", PolicyLearner, 2, {"CPU": 0.5}, pgs[0], lambda i: (cfg, i, 2), env, "bench-")
    rollout = ActorGroup("rollout", RolloutWorker, 2, {"CPU": 0.5}, pgs[1], lambda i: (cfg, i), env, "bench-")
    try:
        master = ray.get(learner.actors[0].get_master_addr_port.remote())
        infos = ray.get([*learner.setup(*master), *rollout.setup()])
        params = infos[0]["num_params"]
        pids = {"learner0": pid_of(learner.actors[0]), "rollout0": pid_of(rollout.actors[0])}
        rows = []
        for method, sync in (
            ("baseline", BaselineSync(learner, rollout)),
            ("object_store", WeightSync(learner, rollout, "object_store", "gloo", bucket_mb * MIB)),
            ("collective", WeightSync(learner, rollout, "collective", "gloo", bucket_mb * MIB)),
        ):
            rows.append({"size": size, "params": params, "dtype": dtype, "method": method,
                         **measure(sync, pids, repeats)})
            print(format_row(rows[-1], rows[0]), flush=True)
        return rows
    finally:
        learner.shutdown()
        rollout.shutdown()
        for pg in pgs:
            remove_placement_group(pg)


HEADER = (f"{'size':>5} {'params':>11} {'dtype':>8} {'method':>12} {'s/sync':>8} {'MiB':>8} {'learner0 +MiB':>13} "
          f"{'rollout0 +MiB':>13} | {'time':>6} {'bytes':>6} {'l0 mem':>6} vs baseline")


def format_row(row: dict, baseline: dict) -> str:
    def ratio(key: str) -> str:
        return f"{row[key] / baseline[key]:6.2f}" if baseline[key] > 0 else "     -"

    return (f"{row['size']:>5} {row['params']:>11,} {row['dtype']:>8} {row['method']:>12} {row['s']:8.3f} "
            f"{row['MiB']:8.1f} {row['learner0 peak MiB']:13.1f} {row['rollout0 peak MiB']:13.1f} | "
            f"{ratio('s')} {ratio('MiB')} {ratio('learner0 peak MiB')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "135m", "500m"], choices=["tiny", *SHAPES])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--bucket-mb", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    init_ray("local", num_cpus=2)
    print(HEADER, flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-sync-") as tmp:
        for size in args.sizes:
            for dtype in args.dtypes:
                run_size(size, dtype, Path(tmp) / f"{size}-{dtype}", args.bucket_mb, args.repeats)
    ray.shutdown()


if __name__ == "__main__":
    main()
