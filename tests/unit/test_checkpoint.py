"""Checkpoints on a disk that fills up, and checkpoint directories left by interrupted saves and deletions.
The small disk is a real 1 MiB tmpfs (root only; skipped elsewhere)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rmr1_ray.checkpoint import CheckpointError, latest_checkpoint, save_checkpoint

pytestmark = pytest.mark.unit


@pytest.fixture
def small_disk(tmpfs):
    return tmpfs("1m")


def writer(size: int):
    def save_learner(directory: str) -> None:
        with open(Path(directory) / "shard.bin", "wb") as f:
            f.write(b"x" * size)
    return save_learner


def test_a_save_that_fills_the_disk_fails_naming_step_path_and_space_and_leaves_nothing(small_disk):
    with pytest.raises(CheckpointError) as err:
        save_checkpoint(small_disk, 1, {}, writer(2_000_000), keep_last=2)
    message = str(err.value)
    assert f"checkpoint step 1 could not be written to {small_disk}/checkpoints/step_000001.tmp: no space left" in message
    assert list((small_disk / "checkpoints").iterdir()) == []  # the partial directory is gone
    assert latest_checkpoint(small_disk) is None


def test_a_save_without_room_for_another_checkpoint_fails_before_writing(small_disk):
    first = save_checkpoint(small_disk, 1, {}, writer(600_000), keep_last=2)
    calls = []
    with pytest.raises(CheckpointError, match=r"checkpoint step 2 could not be written to .*step_000002.tmp: no space "
                                              r"left \(needs ~6\d\d,\d+ bytes, the size of step_000001; \d[\d,]* free\)"):
        save_checkpoint(small_disk, 2, {}, lambda d: calls.append(d), keep_last=2)
    assert calls == [] and sorted(p.name for p in first.parent.iterdir()) == ["step_000001"]


def test_other_failures_keep_their_cause(tmp_path):
    def broken(directory: str) -> None:
        (Path(directory) / "part").write_text("half")
        raise RuntimeError("learner rank 1 died")

    with pytest.raises(CheckpointError, match=r"step_000001.tmp: RuntimeError: learner rank 1 died"):
        save_checkpoint(tmp_path, 1, {}, broken, keep_last=2)
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_an_interrupted_deletion_never_counts_and_is_cleaned_up(tmp_path):
    for step in (1, 2):
        save_checkpoint(tmp_path, step, {}, writer(10), keep_last=2)
    root = tmp_path / "checkpoints"
    # A deletion killed midway: renamed first, so the half-removed directory is no checkpoint.
    os.replace(root / "step_000001", root / "step_000001.deleting")
    (root / "step_000001.deleting" / "shard.bin").unlink()
    (root / "step_000003.tmp").mkdir()  # and a save killed midway
    assert latest_checkpoint(tmp_path).name == "step_000002"
    for step in (3, 4, 5):
        save_checkpoint(tmp_path, step, {}, writer(10), keep_last=2)
    assert sorted(p.name for p in root.iterdir()) == ["step_000004", "step_000005"]
