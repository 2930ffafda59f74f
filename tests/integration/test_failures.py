"""A learner or reference rank that dies ends the GRPO job at once with a message that names it, what
it was doing and where to resume, and exit code 3: never a healthy group blamed, restarted or left
hanging. Each case runs the real job (tiny config) with one real process dying inside one real method:
the actor class is the shipped one with that method wrapped to exit the process first."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import ray
from servers import write_prompt_rows

import jobs.train_rlvr as train_rlvr
from rmr1_ray.tiny import make_tiny

pytestmark = pytest.mark.integration

CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "tiny-cpu" / "train.yaml")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inputs")
    (root / "train").mkdir()
    write_prompt_rows(root / "train" / "part-00000.parquet", 8, seed=0, fmt="instruct")
    return {"model": make_tiny(root / "model", seed=0), "train": root / "train"}


@pytest.fixture(scope="module")
def cluster():
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def dying(base: type, method: str, rank: int | None) -> type:
    """`base` whose `method` first ends its process (on rank `rank` only, for learner ranks)."""

    def die_then_run(self, *args, **kwargs):
        if rank is None or self.rank == rank:
            os._exit(1)
        return getattr(base, method)(self, *args, **kwargs)

    return type(f"Dying{base.__name__}", (base,), {method: die_then_run})


@pytest.mark.timeout(600)
@pytest.mark.parametrize(("group", "rank", "method", "extra"), [
    *(("learner", rank, method, extra) for rank in (0, 1) for method, extra in (
        ("compute_log_probs", []),
        ("update", []),
        ("gather_state_dict", []),  # the object-store sync after step 1
        ("send_weights", ["rollout.weight_sync=collective"]),
        ("save_checkpoint", []),
    )),
    ("reference", None, "compute_log_probs", []),
])
def test_a_dead_rank_ends_the_run_naming_it(cluster, inputs, tmp_path, monkeypatch, capsys, group, rank, method, extra):
    classes = dict(train_rlvr.ACTOR_CLASSES)
    classes[group] = dying(classes[group], method, rank)
    monkeypatch.setattr(train_rlvr, "ACTOR_CLASSES", classes)
    with pytest.raises(SystemExit) as exit_info:
        train_rlvr.main(["--config", CONFIG, f"model.path={inputs['model']}", f"data.train_path={inputs['train']}",
                         f"trainer.output_dir={tmp_path}", "trainer.total_steps=2", "tracking.wandb_mode=disabled",
                         *extra])
    err = capsys.readouterr().err
    who = f"learner rank {rank}" if group == "learner" else "reference rank 0"
    assert exit_info.value.code == 3, err
    assert f"{who} died during {method}" in err
    assert "resume with --resume from the start (no checkpoint yet)" in err
    assert "rewarder" not in err and "restarting" not in capsys.readouterr().out
    assert not [n for n in ray.util.list_named_actors() if n.startswith("rmr1-")]  # nothing left running


@pytest.mark.timeout(600)
def test_a_full_disk_at_a_checkpoint_ends_the_run_naming_path_and_space(cluster, inputs, tmpfs, capsys):
    """The run's output on a 3 MiB tmpfs: metrics fit, the first checkpoint (DeepSpeed shards + HF model of
    the tiny judge, ~10 MB) does not."""
    small_disk = tmpfs("3m")
    with pytest.raises(SystemExit) as exit_info:
        train_rlvr.main(["--config", CONFIG, f"model.path={inputs['model']}", f"data.train_path={inputs['train']}",
                         f"trainer.output_dir={small_disk}", "trainer.total_steps=2", "tracking.wandb_mode=disabled"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 3, err
    assert f"checkpoint step 1 could not be written to {small_disk}/checkpoints/step_000001.tmp: no space left" in err
    assert "resume with --resume from the start (no checkpoint yet)" in err
    assert sorted(p.name for p in (small_disk / "checkpoints").iterdir()) == []  # no partial directory left
    assert (small_disk / "metrics.jsonl").read_text().count("\n") == 1  # step 1 was logged before the save
