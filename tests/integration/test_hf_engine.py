"""The hf generation engine on the tiny model (no Ray): layout, seeding, stops, log-probs, weight loads."""

from __future__ import annotations

import pytest
import torch

from rmr1_ray import algorithms as algo
from rmr1_ray.engines import SamplingParams, make_engine
from rmr1_ray.tiny import make_tiny

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = make_tiny(tmp_path_factory.mktemp("tiny") / "model", seed=0)
    model = {"path": str(path), "tokenizer_path": None, "dtype": "float32", "trust_remote_code": False,
             "attn_implementation": None}
    return make_engine("hf", model, {}, "cpu")


@pytest.fixture(scope="module")
def prompts(engine):
    tok = engine.tokenizer
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
             for q in ("What is 2 + 2?", "Which is larger, 3.5 or 12? Explain the answer step by step.")]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def texts(engine, batch) -> list[str]:
    lengths = batch.batch["response_mask"].sum(-1).tolist()
    return [engine.tokenizer.decode(ids[:n]) for ids, n in zip(batch.batch["responses"], lengths, strict=True)]


def test_n_samples_per_prompt_are_contiguous_and_seeded(engine, prompts):
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=12, seed=5)
    batch = engine.generate(prompts, params)
    assert len(batch) == 6 and batch.meta_info["temperature"] == 1.0
    for i in range(6):  # left-padded prompts, each sample under its own prompt
        prompt = prompts[i // 3]
        assert batch.batch["prompts"][i, -len(prompt):].tolist() == prompt
    assert torch.equal(engine.generate(prompts, params).batch["responses"], batch.batch["responses"])
    other = engine.generate(prompts, SamplingParams(n=3, temperature=1.0, max_new_tokens=12, seed=6))
    assert not torch.equal(other.batch["responses"], batch.batch["responses"])


def test_rollout_log_probs_equal_a_full_forward_pass(engine, prompts):
    """What the learner computes for the PPO ratio: raw logits at the sampling temperature, even
    though top-p/top-k shaped the sampling."""
    params = SamplingParams(n=4, temperature=0.7, top_p=0.9, top_k=50, max_new_tokens=16, seed=1)
    batch = engine.generate(prompts, params)
    full = algo.response_log_probs(engine.model, batch, 3, 0.7, "cpu")
    mask = batch.batch["response_mask"].bool()
    assert (full - batch.batch["rollout_log_probs"])[mask].abs().max() < 1e-5
    assert (batch.batch["rollout_log_probs"][~mask] == 0).all()


def test_stop_strings_and_stop_token_ids_end_a_sample(engine, prompts):
    free = engine.generate(prompts, SamplingParams(n=4, max_new_tokens=24, seed=3))
    stopped = engine.generate(prompts, SamplingParams(n=4, max_new_tokens=24, seed=3, stop=("e",)))
    decode = engine.tokenizer.decode
    cut_any = False
    for i, before in enumerate(texts(engine, free)):
        n = int(stopped.batch["response_mask"][i].sum())
        ids = stopped.batch["responses"][i, :n].tolist()
        assert ids == free.batch["responses"][i, :n].tolist()  # same seed: the same tokens, up to the stop
        if "e" in before:  # ...ending with the token that completes the first "e" (kept in the response)
            assert "e" in decode(ids) and "e" not in decode(ids[:-1])
            cut_any = True
        else:
            assert decode(ids) == before
        # truncated: cut off at max_new_tokens (the random tiny model never writes its EOS in 24 tokens)
        assert free.non_tensor_batch["truncated"][i] and stopped.non_tensor_batch["truncated"][i] == ("e" not in before)
    assert cut_any
    greedy = engine.generate(prompts[:1], SamplingParams(temperature=0.0, max_new_tokens=8))
    first = greedy.batch["responses"][0, 0].item()
    cut = engine.generate(prompts[:1], SamplingParams(temperature=0.0, max_new_tokens=8, stop_token_ids=(first,)))
    assert cut.batch["responses"][0].tolist() == [first] and cut.batch["response_mask"].sum() == 1
    assert cut.non_tensor_batch["truncated"].tolist() == [False]  # ended on its stop token


def test_load_weights_replaces_the_model(engine, prompts):
    state = {name: t.detach().clone() for name, t in engine.model.state_dict().items()}
    params = SamplingParams(temperature=0.0, max_new_tokens=6)
    before = engine.generate(prompts, params).batch["rollout_log_probs"]
    engine.load_weights((name, t * 0.5) for name, t in state.items() if name != "lm_head.weight")  # tied: once
    assert not torch.allclose(engine.generate(prompts, params).batch["rollout_log_probs"], before)
    with pytest.raises(ValueError, match="missing from the update"):
        engine.load_weights((name, t) for name, t in state.items() if name != "model.norm.weight")
    engine.load_weights(state.items())
    assert torch.equal(engine.generate(prompts, params).batch["rollout_log_probs"], before)
