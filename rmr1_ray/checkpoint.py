"""Run checkpoints: OUT/checkpoints/step_000003/ holds everything needed to continue a run.

    step_000003/
      trainer_state.json   step, data position, RNG states, W&B run id (written last)
      <DeepSpeed tag>/     ZeRO shards + optimizer + LR scheduler (one file set per learner rank)
      latest               DeepSpeed's pointer to the tag
      hf/                  the policy as an HF model (safetensors + tokenizer)

Everything is first written to step_000003.tmp and renamed when complete, so a crash mid-save never
leaves a half-written checkpoint that `latest_checkpoint` would pick; an old checkpoint is renamed to
step_N.deleting before it is removed, so a crash mid-delete never leaves a partial one under its name.
Leftovers of either kind are removed at the next save. A save first checks that the disk has room for
another checkpoint the size of the last one, and a failed save says where and why (no space left, with
the bytes needed). The directory must be on storage every learner rank can reach (shared storage on a
multi-node cluster).
"""

from __future__ import annotations

import base64
import errno
import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d{6,})$")


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / CHECKPOINTS


def completed_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (unfinished .tmp directories are ignored)."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / TRAINER_STATE).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    done = completed_checkpoints(out_dir)
    return done[-1] if done else None


def rng_state() -> dict:
    """The driver's python / numpy / torch RNG states, as JSON-friendly values."""
    _, key, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": _jsonable(random.getstate()),
        "numpy": {"key": key.tolist(), "pos": pos, "has_gauss": has_gauss, "gauss": gauss},
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }


def restore_rng(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    mt = state["numpy"]
    np.random.set_state(("MT19937", np.array(mt["key"], dtype=np.uint32), mt["pos"], mt["has_gauss"], mt["gauss"]))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))


def _jsonable(value):
    return [_jsonable(v) for v in value] if isinstance(value, tuple | list) else value


class CheckpointError(RuntimeError):
    """A checkpoint could not be written; the message names the step, the path and the cause."""


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _remove_leftovers(root: Path) -> None:
    """Unfinished saves (.tmp) and interrupted deletions (.deleting) of earlier launches."""
    for leftover in [*root.glob("step_*.tmp"), *root.glob("step_*.deleting")]:
        shutil.rmtree(leftover, ignore_errors=True)


def _delete(checkpoint: Path) -> None:
    doomed = checkpoint.with_name(checkpoint.name + ".deleting")
    os.replace(checkpoint, doomed)  # atomic: from here on it no longer counts as a checkpoint
    shutil.rmtree(doomed)


def save_checkpoint(
    out_dir: str | Path,
    step: int,
    trainer_state: dict,
    save_learner: Callable[[str], None],
    keep_last: int,
) -> Path:
    """Write checkpoint `step` atomically and keep only the newest `keep_last`.

    save_learner(dir) writes the learner's state (all ranks: DeepSpeed shards + HF model) into dir.
    Raises CheckpointError, leaving no partial directory behind, when the disk cannot take it.
    """
    root = checkpoint_root(out_dir)
    final = root / f"step_{step:06d}"
    tmp = root / f"{final.name}.tmp"
    root.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(root)
    previous = latest_checkpoint(out_dir)
    needed = directory_bytes(previous) if previous is not None else 0
    free = shutil.disk_usage(root).free
    if needed > free:
        raise CheckpointError(f"checkpoint step {step} could not be written to {tmp}: no space left "
                              f"(needs ~{needed:,} bytes, the size of {previous.name}; {free:,} free)")
    tmp.mkdir()
    try:
        save_learner(str(tmp))
        state = {**trainer_state, "step": step, "rng": rng_state()}
        (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=2) + "\n")  # the completion marker: last
    except Exception as exc:
        # A writer in another process (a learner rank) reports a full disk in its own words (torch.save:
        # "unexpected pos ..."), so the disk is asked: (almost) nothing left means it was full.
        written, disk = directory_bytes(tmp), shutil.disk_usage(root)
        shutil.rmtree(tmp, ignore_errors=True)
        full = isinstance(exc, OSError) and exc.errno == errno.ENOSPC or disk.free < max(1 << 20, disk.total // 100)
        cause = f"no space left ({written:,} bytes written, {disk.free:,} free)" if full else f"{type(exc).__name__}: {exc}"
        raise CheckpointError(f"checkpoint step {step} could not be written to {tmp}: {cause}") from exc
    if final.exists():  # the same step saved again by a resumed run
        _delete(final)
    os.replace(tmp, final)  # atomic on one filesystem
    for old in completed_checkpoints(out_dir)[:-keep_last]:
        _delete(old)
    return final


def load_trainer_state(checkpoint: str | Path) -> dict:
    return json.loads((Path(checkpoint) / TRAINER_STATE).read_text())
