"""`rmr1 plan`: architecture numbers from config.json, DeepSpeed's estimator as the model-states term,
every shipped large-model config fitting 80 GiB GPUs, and impossible ones failing with the group, the
term and the setting to change. (Measured RSS against the plan: benchmarks/bench_memory_plan.py.)"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from deepspeed.runtime.zero.stage3 import (
    estimate_zero3_model_states_mem_needs,
    estimate_zero3_model_states_mem_needs_all_live,
    model_to_params,
)

from jobs.plan import main as plan_main
from rmr1_ray.architecture import ArchitectureError, architecture, shipped_models
from rmr1_ray.config import load_config
from rmr1_ray.config.train import TrainConfig
from rmr1_ray.memory_plan import GIB, kv_bytes_per_token, plan_train, zero_terms
from rmr1_ray.models import load_causal_lm
from rmr1_ray.tiny import make_tiny

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
RM_R1 = sorted((ROOT / "configs" / "rm-r1").glob("*-grpo.yaml")) + sorted((ROOT / "configs" / "rm-r1").glob("*-distill.yaml"))
QWEN_32B_GRPO = str(ROOT / "configs" / "rm-r1" / "qwen2.5-32b-instruct-grpo.yaml")
QWEN_32B_SFT = str(ROOT / "configs" / "rm-r1" / "qwen2.5-32b-instruct-distill.yaml")
# Published sizes: Qwen2.5-7B 7.61B, 14B 14.7B, 32B 32.5B ("32.76B" counting the untied LM head).
PUBLISHED = {"7B": 7_615_616_512, "14B": 14_770_033_664, "32B": 32_763_876_352}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tiny") / "model", seed=0)


def test_shipped_hub_models_have_their_published_sizes():
    assert len(shipped_models()) == 6
    for name in shipped_models():
        arch = architecture(name)
        size = re.search(r"(\d+B)", name).group(1)
        assert arch.num_params == PUBLISHED[size], name
        assert arch.largest_layer_params == arch.vocab * arch.hidden  # the (untied) embedding
    # Qwen2.5-7B's KV cache: 28 layers x 4 KV heads x 128 x (K, V) x 2 bytes = 56 KiB per token
    assert kv_bytes_per_token(architecture("Qwen/Qwen2.5-7B-Instruct"), 2) == 56 * 1024


def test_a_model_without_shipped_config_names_what_ships():
    with pytest.raises(ArchitectureError, match=r"no config.json shipped.*Qwen/Qwen2.5-7B-Instruct.*--skip-plan"):
        architecture("someorg/unknown-7b")
    with pytest.raises(ArchitectureError, match="config.json does not exist"):
        architecture("/nonexistent/model")


def test_local_model_counts_equal_deepspeeds_own(tiny):
    arch = architecture(str(tiny))
    model = load_causal_lm(str(tiny))
    assert (arch.num_params, arch.largest_layer_params) == model_to_params(model)
    assert arch.num_params == sum(p.numel() for p in model.parameters())  # the tied embedding once


@pytest.mark.parametrize("ranks", [1, 8, 32])
@pytest.mark.parametrize("offload", [(False, False), (True, False), (True, True)])
def test_model_states_term_is_deepspeeds_estimate(tiny, ranks, offload):
    for arch in (architecture(str(tiny)), architecture("Qwen/Qwen2.5-32B-Instruct")):
        states = zero_terms(arch, "bfloat16", 3, ranks, *offload, gpu=True, where="learner")[0]
        _, expected, _ = estimate_zero3_model_states_mem_needs(
            arch.num_params, arch.largest_layer_params, num_gpus_per_node=ranks, num_nodes=1,
            cpu_offload=offload[0], cpu_offload_params=offload[1])
        assert states.bytes == expected


def test_model_states_term_matches_deepspeeds_table_for_a_live_model(tmp_path, capsys):
    """DeepSpeed's user-facing estimator, given a real model (SmolLM2-135M's shape, built here), prints the
    per-GPU numbers the plan computes from config.json alone."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)
    config.save_pretrained(tmp_path)
    estimate_zero3_model_states_mem_needs_all_live(LlamaForCausalLM(config), num_gpus_per_node=2, num_nodes=1)
    table = capsys.readouterr().out
    arch = architecture(str(tmp_path))
    assert arch.num_params == 134_515_008  # SmolLM2-135M
    for offload, options in [((False, False), r"offload_param=none, offload_optimizer=none, zero_init=1"),
                             ((True, False), r"offload_param=none, offload_optimizer=\S*cpu\s*, zero_init=1")]:
        [row] = [line for line in table.splitlines() if re.search(options + "$", line)]
        per_gpu_gb = float(row.split("|")[1].strip().removesuffix("GB"))
        states = zero_terms(arch, "bfloat16", 3, 2, *offload, gpu=True, where="learner")[0]
        assert per_gpu_gb > 0.1
        assert states.bytes / 2**30 == pytest.approx(per_gpu_gb, abs=0.006)


@pytest.mark.parametrize("config", RM_R1, ids=lambda p: p.name)
def test_every_shipped_large_model_config_fits_80_gib_gpus(config, capsys):
    assert plan_main(["--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "on 80 GiB GPUs" in out and out.rstrip().endswith("verdict: fits")
    peaks = [float(value) for value in re.findall(r"peak per GPU\s+([\d.]+) GiB", out)]
    assert peaks and all(0 < peak <= 80 for peak in peaks)


@pytest.mark.parametrize("name", ["train.yaml", "distill.yaml"])
def test_the_tiny_cpu_configs_fit_this_machine(tiny, name, capsys):
    assert plan_main(["--config", str(ROOT / "configs" / "tiny-cpu" / name), f"model.path={tiny}"]) == 0
    assert "this machine" in capsys.readouterr().out


@pytest.mark.parametrize(("overrides", "config", "expected"), [
    (["model.gradient_checkpointing=false"], QWEN_32B_GRPO,
     r"learner needs 2\d\d\.\d GiB per GPU of 80 GiB; the term that decides it is activations .*"
     r"to fix: model.gradient_checkpointing=true"),
    (["rollout.tensor_parallel_size=1", "rollout.group.num_gpus_per_worker=1"], QWEN_32B_GRPO,
     r"rollout has no room for the KV cache of one max-length sequence; the term that decides it is weights per "
     r"TP rank \(61\.0 GiB.*to fix: raise rollout.tensor_parallel_size"),
    (["reference.on_learner=false", "reference.group={num_workers: 8, num_gpus_per_worker: 1}",
      "reference.micro_batch_size=8"], QWEN_32B_GRPO,
     r"reference needs \d+\.\d GiB per GPU of 80 GiB; the term that decides it is weights \(61\.0 GiB\); "
     r"to fix: reference.on_learner=true"),
    (["trainer.zero_stage=2", "trainer.offload_optimizer=false"], QWEN_32B_SFT,
     r"sft needs \d+\.\d GiB per GPU of 80 GiB; the term that decides it is model states \(ZeRO-2\)"),
])
def test_impossible_configs_fail_naming_the_group_the_term_and_the_fix(overrides, config, expected, capsys):
    assert plan_main(["--config", config, *overrides]) == 2
    [verdict] = [line for line in capsys.readouterr().out.splitlines() if line.startswith("verdict")]
    assert re.search(expected, verdict), verdict


def test_on_cpu_all_actors_share_this_machine(tiny):
    config = load_config(TrainConfig, ROOT / "configs" / "tiny-cpu" / "train.yaml", [f"model.path={tiny}"])
    plan = plan_train(config, architecture(str(tiny)), capacity_bytes=GIB // 4)
    [failure] = plan.failures
    total = sum(g.peak * g.workers for g in plan.groups)
    assert f"all actors together need {total / GIB:.1f} GiB of this machine's 0.2 GiB" in failure
    assert "the largest group is learner (2 x" in failure  # 2 ranks, each with its libraries and model states


@pytest.mark.parametrize("job", ["train", "distill"])
def test_jobs_check_the_plan_before_starting_anything(job, tiny, tmp_path):
    """A config that cannot fit (the tiny model on 10 MiB GPUs) ends `rmr1 train`/`rmr1 distill` at once with
    exit 2, before Ray or any output; --skip-plan goes past the check, here to the next error (no data)."""
    common = [sys.executable, "-m", "rmr1_ray.cli", job, "--config", str(ROOT / "configs" / "tiny-cpu" / f"{job}.yaml"),
              f"model.path={tiny}", "cluster.device=gpu", "cluster.gpu_memory_gib=0.01",
              f"trainer.output_dir={tmp_path / 'out'}", f"data.train_path={tmp_path / 'missing'}"]
    if job == "distill":
        common.append("workers.num_gpus_per_worker=1")
    refused = subprocess.run(common, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert refused.returncode == 2
    assert re.search(r"verdict: does not fit: (learner|sft) needs [\d.]+ GiB per GPU of 0 GiB", refused.stdout)
    assert "the memory plan does not fit (--skip-plan starts anyway)" in refused.stderr
    assert not (tmp_path / "out").exists()
    skipped = subprocess.run([*common, "--skip-plan"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert "memory plan" not in skipped.stdout + skipped.stderr
    assert skipped.returncode == 2 and str(tmp_path / "missing") in skipped.stderr


def test_fp32_model_states_count_fp32_weights_and_gradients(tiny):
    """DeepSpeed's estimator assumes 16-bit weights and gradients; in fp32 both are 2 bytes wider."""
    arch = architecture(str(tiny))
    half, *_ = zero_terms(arch, "bfloat16", 3, 2, False, False, gpu=False, where="learner")
    full, *_ = zero_terms(arch, "float32", 3, 2, False, False, gpu=False, where="learner")
    assert full.bytes - half.bytes == 4 * arch.num_params // 2


def test_gpu_memory_on_a_cpu_cluster_is_an_error_not_ignored():
    from pydantic import ValidationError

    from rmr1_ray.config.sections import ClusterConfig

    assert ClusterConfig(device="gpu", gpu_memory_gib=40).gpu_memory_gib == 40
    with pytest.raises(ValidationError, match="cluster.gpu_memory_gib is set but cluster.device=cpu"):
        ClusterConfig(gpu_memory_gib=40)
