"""SFT tokenization: the loss mask token by token on the tiny model's real ChatML tokenizer; batch plans."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch

from rmr1_ray.models import load_causal_lm, load_tokenizer
from rmr1_ray.prompts import PreferencePair, render_pair
from rmr1_ray.sft import (
    IGNORE_INDEX,
    PrefixError,
    SftExample,
    collate,
    lr_multiplier,
    plan_epoch,
    plan_eval,
    summed_nll,
    tokenize_example,
)
from rmr1_ray.synthetic import generate_items, reasoning_chain
from rmr1_ray.tiny import make_tiny

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(make_tiny(tmp_path_factory.mktemp("tiny") / "model", seed=0))


@pytest.fixture(scope="module")
def tokenizer(tiny):
    return load_tokenizer(tiny)


def judge_example(seed: int = 0, fmt: str = "distilled") -> tuple[list[dict], str]:
    item = next(generate_items(1, seed))
    pair = PreferencePair(context=({"role": "user", "content": item.question},), chosen=item.correct, rejected=item.wrong)
    messages, winner = render_pair(pair, "B", fmt)
    return messages, reasoning_chain(item, "B")


@pytest.mark.parametrize("fmt", ["distilled", "instruct"])
def test_labels_cover_exactly_the_assistant_reply_and_its_end_token(tokenizer, fmt):
    messages, response = judge_example(fmt=fmt)
    example = tokenize_example(tokenizer, messages, response)
    ids = example.input_ids.tolist()
    labels = example.labels()

    prompt_text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    full_text = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": response}], tokenize=False)
    assert full_text == prompt_text + response + "<|im_end|>\n"  # ChatML, as the tiny template renders it
    assert ids == tokenizer(full_text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids[: example.label_start]) == prompt_text
    assert ids[example.label_start - 3 : example.label_start] == tokenizer.convert_tokens_to_ids(
        ["<|im_start|>", "assistant", "\u010a"])  # the generation prompt "<|im_start|>assistant\n" is not trained
    assert ids[example.label_end - 1] == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.decode(ids[example.label_start : example.label_end]) == response + "<|im_end|>"
    assert tokenizer.decode(ids[example.label_end :]) == "\n"  # written by the template, never generated
    for position, (token, label) in enumerate(zip(ids, labels, strict=True)):
        trained = example.label_start <= position < example.label_end
        assert label == (token if trained else IGNORE_INDEX), f"position {position}"
    assert example.num_label_tokens == int((labels != IGNORE_INDEX).sum())


def test_a_template_that_changes_the_prompt_is_refused(tokenizer):
    messages, response = judge_example()
    original = tokenizer.chat_template
    # A generation prompt that opens a <think> block which rendered replies do not have (as some
    # reasoning models' templates do): prompt tokens are no longer a prefix of prompt + reply.
    tokenizer.chat_template = original.replace("'<|im_start|>assistant\\n' }}{%- endif %}",
                                               "'<|im_start|>assistant\\n<think>\\n' }}{%- endif %}")
    try:
        assert tokenizer.chat_template != original
        with pytest.raises(PrefixError, match="not a prefix"):
            tokenize_example(tokenizer, messages, response)
    finally:
        tokenizer.chat_template = original


def test_collate_pads_right_and_masks_padding(tokenizer):
    examples = [tokenize_example(tokenizer, *judge_example(seed)) for seed in (0, 1, 2)]
    batch = collate(examples, tokenizer.pad_token_id)
    width = max(len(e) for e in examples)
    assert batch["input_ids"].shape == batch["labels"].shape == (3, width)
    for row, example in enumerate(examples):
        n = len(example)
        assert batch["input_ids"][row, :n].tolist() == example.input_ids.tolist()
        assert (batch["input_ids"][row, n:] == tokenizer.pad_token_id).all()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
        assert batch["labels"][row, :n].tolist() == example.labels().tolist()
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()


def test_summed_nll_matches_the_models_own_loss(tiny, tokenizer):
    model = load_causal_lm(tiny)
    batch = collate([tokenize_example(tokenizer, *judge_example(seed)) for seed in (0, 1)], tokenizer.pad_token_id)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    nll, count = summed_nll(out.logits, batch["labels"])
    assert count == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert (nll / count).item() == pytest.approx(out.loss.item(), rel=1e-5)


def fake_examples(lengths: list[int]) -> list[SftExample]:
    return [SftExample(np.arange(n, dtype=np.int32), n // 2, n) for n in lengths]


def test_plan_epoch_deals_each_example_once_in_length_grouped_micro_batches():
    rng = np.random.default_rng(0)
    examples = fake_examples(rng.integers(10, 200, size=37).tolist())
    steps = plan_epoch(examples, global_batch=8, micro_batch=2, world_size=2, seed=3, epoch=0)
    assert len(steps) == 37 // 8  # the incomplete last step is dropped
    used = Counter()
    for step in steps:
        assert [len(rank) for rank in step.micro_batches] == [2, 2]  # gradient accumulation 2 on each rank
        flat = [i for rank in step.micro_batches for mb in rank for i in mb]
        assert len(flat) == 8 and all(len(mb) == 2 for rank in step.micro_batches for mb in rank)
        used.update(flat)
        assert step.label_tokens == sum(examples[i].num_label_tokens for i in flat)
        # length grouping: micro-batches dealt in length order, so rank 0's k-th is no longer than rank 1's
        for first, second in zip(*step.micro_batches, strict=True):
            assert max(len(examples[i]) for i in first) <= min(len(examples[i]) for i in second)
    assert max(used.values()) == 1
    again = plan_epoch(examples, 8, 2, 2, seed=3, epoch=0)
    assert [s.micro_batches for s in again] == [s.micro_batches for s in steps]  # every rank computes the same plan
    other = plan_epoch(examples, 8, 2, 2, seed=3, epoch=1)
    assert [s.micro_batches for s in other] != [s.micro_batches for s in steps]  # reshuffled each epoch
    with pytest.raises(ValueError):
        plan_epoch(examples, global_batch=6, micro_batch=4, world_size=2, seed=0, epoch=0)


def test_plan_eval_covers_everything_with_equal_rounds_per_rank():
    examples = fake_examples([30, 10, 50, 20, 40])
    ranks = plan_eval(examples, micro_batch=2, world_size=2)
    assert [len(r) for r in ranks] == [2, 2]
    covered = sorted(i for r in ranks for mb in r for i in mb)
    assert covered == [0, 1, 2, 3, 4]
    assert ranks[1][-1] == []  # the stand-in round of the rank with less work


def test_lr_warms_up_linearly_then_decays_to_the_floor():
    values = [lr_multiplier(s, 4, 20, 0.1) for s in range(21)]
    assert values[:5] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(values[4:], values[5:], strict=False))
    assert values[20] == pytest.approx(0.1)
    assert values[12] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
