"""Run checkpoints: OUT/checkpoints/step_000003/ holds everything needed to continue a run.

    step_000003/
      trainer_state.json   step, data position, RNG states, W&B run id (written last)
      <DeepSpeed tag>/     ZeRO shards + optimizer + LR scheduler (one file set per learner rank)
      latest               DeepSpeed's pointer to the tag
      hf/                  the policy as an HF model (safetensors + tokenizer)

Everything is first written to step_000003.tmp and renamed when complete, so a crash mid-save never
leaves a half-written checkpoint that `latest_checkpoint` would pick. The directory must be on
storage every learner rank can reach (shared storage on a multi-node cluster).
"""

from __future__ import annotations

import base64
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


def save_checkpoint(
    out_dir: str | Path,
    step: int,
    trainer_state: dict,
    save_learner: Callable[[str], None],
    keep_last: int,
) -> Path:
    """Write checkpoint `step` atomically and keep only the newest `keep_last`.

    save_learner(dir) writes the learner's state (all ranks: DeepSpeed shards + HF model) into dir.
    """
    root = checkpoint_root(out_dir)
    final = root / f"step_{step:06d}"
    tmp = root / f"{final.name}.tmp"
    if tmp.exists():  # left by a crash during an earlier save of this step
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_learner(str(tmp))
    state = {**trainer_state, "step": step, "rng": rng_state()}
    (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=2) + "\n")
    if final.exists():  # the same step saved again by a resumed run
        shutil.rmtree(final)
    os.replace(tmp, final)  # atomic on one filesystem
    for old in completed_checkpoints(out_dir)[:-keep_last]:
        shutil.rmtree(old)
    return final


def load_trainer_state(checkpoint: str | Path) -> dict:
    return json.loads((Path(checkpoint) / TRAINER_STATE).read_text())
