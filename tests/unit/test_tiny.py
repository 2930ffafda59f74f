"""The tiny offline model: reloads like a real HF model, ChatML template, judge prompts, determinism."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from jobs.make_tiny import main as make_tiny_main
from rmr1_ray import prompts
from rmr1_ray.models import load_causal_lm, load_tokenizer, torch_dtype
from rmr1_ray.tiny import TinySpec, make_tiny

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tiny") / "seed0", seed=0)


@pytest.fixture(scope="module")
def tokenizer(tiny_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def model(tiny_dir: Path):
    return AutoModelForCausalLM.from_pretrained(tiny_dir).eval()


def _judge_messages(fmt: prompts.PromptFormat = "instruct") -> list[dict[str, str]]:
    context = [{"role": "user", "content": "What is 17 + 25?"}]
    return prompts.judge_messages(
        context, "17 + 25 = 42. The answer is 42.", "17 + 25 = 32. The answer is 32.", fmt
    )


def _hashes(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_reloads_offline_with_matching_vocab(tiny_dir: Path, tokenizer, model) -> None:
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "rmr1_tiny.json",
    } <= {p.name for p in tiny_dir.iterdir()}
    assert len(tokenizer) == model.config.vocab_size == TinySpec().vocab_size
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids(
        ["<|im_end|>", "<|endoftext|>"]
    )
    assert model.dtype == torch.float32
    # Older transformers cannot load transformers 5's "TokenizersBackend" class name.
    assert (
        json.loads((tiny_dir / "tokenizer_config.json").read_text())["tokenizer_class"]
        == "PreTrainedTokenizerFast"
    )
    meta = json.loads((tiny_dir / "rmr1_tiny.json").read_text())
    assert meta["seed"] == 0 and meta["spec"]["hidden_size"] == 128
    assert meta["num_parameters"] == sum(p.numel() for p in model.parameters())


def test_auto_and_plain_fast_tokenizer_agree(tiny_dir: Path, tokenizer) -> None:
    # transformers 5 picks Qwen2Tokenizer for model_type qwen2; the plain class reads tokenizer.json as is.
    plain = PreTrainedTokenizerFast.from_pretrained(tiny_dir)
    text = tokenizer.apply_chat_template(_judge_messages(), add_generation_prompt=True, tokenize=False)
    text += " Café\u0301 ﬁne\t\n"
    assert tokenizer(text)["input_ids"] == plain(text)["input_ids"]


def test_chat_template_renders_chatml(tokenizer) -> None:
    messages = [{"role": "system", "content": "You are a judge."}, {"role": "user", "content": "Is 3 > 2?"}]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == (
        "<|im_start|>system\nYou are a judge.<|im_end|>\n"
        "<|im_start|>user\nIs 3 > 2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    without = tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assert without == rendered.removesuffix("<|im_start|>assistant\n")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")  # a single special token, not split


@pytest.mark.parametrize("fmt", ["instruct", "distilled"])
def test_judge_prompt_round_trips_and_is_compact(tokenizer, fmt: prompts.PromptFormat) -> None:
    messages = _judge_messages(fmt)
    for message in messages:
        ids = tokenizer(message["content"], add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == message["content"]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=False) == rendered
    # Trained on these prompts: well under the ~1 token per byte an untrained byte-level BPE would give.
    assert len(ids) < len(rendered) / 3.5
    assert len(tokenizer("<answer>[[A]]</answer>", add_special_tokens=False)["input_ids"]) <= 6


def test_same_seed_same_bytes_other_seed_other_weights(tiny_dir: Path, tmp_path: Path, capsys) -> None:
    assert make_tiny_main(["--out", str(tmp_path / "again"), "--seed", "0"]) == 0
    assert "parameters: 558,208" in capsys.readouterr().out
    assert _hashes(tmp_path / "again") == _hashes(tiny_dir)

    other = _hashes(make_tiny(tmp_path / "seed1", seed=1))
    first = _hashes(tiny_dir)
    assert other["model.safetensors"] != first["model.safetensors"]
    assert other["tokenizer.json"] == first["tokenizer.json"]  # one tokenizer for every seed


def test_head_dim_fits_vllm_cpu(model) -> None:
    assert model.config.hidden_size // model.config.num_attention_heads >= 32
    with pytest.raises(ValueError, match="head_dim"):
        TinySpec(hidden_size=64, num_heads=4)


def test_forward_gives_finite_logits(tokenizer, model) -> None:
    ids = tokenizer.apply_chat_template(_judge_messages(), add_generation_prompt=True, return_tensors="pt")[
        "input_ids"
    ]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()


def test_hf_generate(tokenizer, model) -> None:
    enc = tokenizer.apply_chat_template(_judge_messages(), add_generation_prompt=True, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=5, do_sample=False)
    assert out.shape[0] == 1 and enc["input_ids"].shape[1] < out.shape[1] <= enc["input_ids"].shape[1] + 5
    assert isinstance(tokenizer.decode(out[0, enc["input_ids"].shape[1] :]), str)


def test_loaders_on_tiny(tiny_dir: Path) -> None:
    tok = load_tokenizer(str(tiny_dir))
    assert tok.pad_token == "<|endoftext|>"
    lm = load_causal_lm(str(tiny_dir), dtype="bfloat16")
    assert lm.dtype == torch.bfloat16 and not lm.training
    assert lm.config._attn_implementation == "sdpa"  # CPU: never flash-attention
    assert torch_dtype("float32") is torch.float32
    with pytest.raises(ValueError, match="float64"):
        torch_dtype("float64")


@pytest.mark.parametrize("loader", [load_tokenizer, load_causal_lm])
def test_missing_local_path_names_it(tmp_path: Path, loader) -> None:
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(FileNotFoundError, match="no-such-model") as info:
        loader(missing)
    assert missing in str(info.value)
