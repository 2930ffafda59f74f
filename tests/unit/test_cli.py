"""`rmr1` dispatches to the jobs, `--help` works on every command, and every shipped config validates."""

import subprocess
import sys
from pathlib import Path

import pytest

from rmr1_ray.cli import JOBS, main
from rmr1_ray.config import load_config

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]


def test_top_level_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name, (module, _) in JOBS.items():
        assert name in out and f"jobs.{module}" in out


def test_unknown_command_fails_with_usage(capsys):
    assert main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


@pytest.mark.parametrize("command", sorted(JOBS))
def test_every_command_has_help(command):
    # A real subprocess: the console script path users run, imports and all.
    result = subprocess.run([sys.executable, "-m", "rmr1_ray.cli", command, "--help"], capture_output=True,
                            text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:")


def test_config_error_exits_2_with_the_key(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "jobs.train_rlvr", "--config", "configs/rm-r1/qwen2.5-7b-instruct-grpo.yaml",
         "trainer.total_step=3"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert result.returncode == 2
    assert "unknown key 'trainer.total_step'" in result.stderr
    assert "did you mean 'trainer.total_steps'?" in result.stderr


def _config_class(path: Path):
    from rmr1_ray.config.chains import ChainsConfig
    from rmr1_ray.config.distill import DistillConfig
    from rmr1_ray.config.evaluate import EvalConfig
    from rmr1_ray.config.prepare import PrepareConfig
    from rmr1_ray.config.serve import ServeConfig
    from rmr1_ray.config.train import TrainConfig

    kinds = {"grpo": TrainConfig, "train": TrainConfig, "prepare": PrepareConfig, "distill": DistillConfig,
             "chains": ChainsConfig, "eval": EvalConfig, "serve": ServeConfig}
    for word, cls in kinds.items():
        if word in path.stem:
            return cls
    raise AssertionError(f"{path}: no job config matches its name")


SHIPPED = sorted(p for p in (REPO / "configs").rglob("*.yaml") if "cluster" not in p.parts and "base" not in p.stem)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_shipped_configs_validate(path, tmp_path, monkeypatch):
    # Tiny configs point at runs/... that tests and the demo create; validate them against a
    # stand-in directory layout so the check is about keys and values, not about prior runs.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "tiny-cpu" / "model").mkdir(parents=True)
    (tmp_path / "configs").symlink_to(REPO / "configs")
    (tmp_path / "shared").symlink_to(REPO.parent / "shared") if (REPO.parent / "shared").exists() else None
    load_config(_config_class(path), path)
