"""The config loader: YAML + extends + dotted overrides, typed, with errors that name the key."""

import pytest
import yaml

from rmr1_ray.config import ConfigError, apply_overrides, load_config, save_resolved
from rmr1_ray.config.train import TrainConfig

pytestmark = pytest.mark.unit


@pytest.fixture()
def model_dir(tmp_path):
    path = tmp_path / "model"
    path.mkdir()
    return path


@pytest.fixture()
def train_yaml(tmp_path, model_dir):
    def write(extra: dict | None = None, name: str = "train.yaml"):
        tree = {
            "model": {"path": str(model_dir)},
            "data": {"train_path": str(tmp_path / "data")},
            "rollout": {"n_samples_per_prompt": 4},
            "learner": {"group": {"num_workers": 2}, "micro_batch_size": 2},
            "algorithm": {"train_batch_size": 8, "ppo_mini_batch_size": 4},
        }
        for key, value in (extra or {}).items():
            tree[key] = {**tree.get(key, {}), **value}
        path = tmp_path / name
        path.write_text(yaml.safe_dump(tree))
        return path

    return write


def test_loads_yaml_and_overrides(train_yaml):
    cfg = load_config(TrainConfig, train_yaml(), ["trainer.total_steps=2", "learner.lr=3e-6", "rollout.stop=[a, b]"])
    assert cfg.trainer.total_steps == 2
    assert cfg.learner.lr == pytest.approx(3e-6)
    assert cfg.rollout.stop == ["a", "b"]
    # RM-R1 defaults where the file is silent
    assert cfg.algorithm.kl_loss_type == "low_var_kl"
    assert cfg.algorithm.kl_loss_coef == pytest.approx(0.001)
    assert cfg.algorithm.clip_ratio == pytest.approx(0.2)


def test_unknown_key_names_key_file_and_closest(train_yaml):
    path = train_yaml({"trainer": {"total_step": 3}})
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, path)
    message = str(err.value)
    assert "unknown key 'trainer.total_step'" in message
    assert str(path) in message
    assert "did you mean 'trainer.total_steps'?" in message


def test_unknown_override_key_is_an_error(train_yaml):
    with pytest.raises(ConfigError, match=r"unknown key 'rollout\.temprature'.*did you mean 'rollout\.temperature'"):
        load_config(TrainConfig, train_yaml(), ["rollout.temprature=0.7"])


def test_batch_size_mismatch_is_explained(train_yaml):
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, train_yaml(), ["algorithm.ppo_mini_batch_size=3"])
    assert "algorithm.train_batch_size=8 is not divisible by algorithm.ppo_mini_batch_size=3" in str(err.value)


def test_evaluation_during_training_needs_something_to_evaluate(train_yaml):
    with pytest.raises(ConfigError, match="trainer.eval_every=5 but there is nothing to evaluate"):
        load_config(TrainConfig, train_yaml(), ["trainer.eval_every=5"])
    config = load_config(TrainConfig, train_yaml(), ["trainer.eval_every=5", "data.val_path=data/val",
                                                     "evaluation.benchmarks=[{name: rmb_pairwise, path: x.json}]"])
    assert config.evaluation.benchmarks[0].name == "rmb_pairwise" and config.evaluation.max_examples == 16


def test_mini_batch_must_split_over_ranks_and_micro_batches(train_yaml):
    # 1 prompt x 4 samples = 4 sequences per mini-batch; 2 ranks x micro 4 = 8 per step
    with pytest.raises(ConfigError, match="does not divide"):
        load_config(TrainConfig, train_yaml(), ["algorithm.ppo_mini_batch_size=1", "learner.micro_batch_size=4"])


def test_grpo_needs_two_samples(train_yaml):
    with pytest.raises(ConfigError, match="at least 2"):
        load_config(TrainConfig, train_yaml(), ["rollout.n_samples_per_prompt=1"])


def test_missing_and_nonexistent_model_path(tmp_path, train_yaml):
    with pytest.raises(ConfigError, match="missing required key 'model.path'"):
        load_config(TrainConfig, None, [f"data.train_path={tmp_path}", "model.dtype=float32"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(TrainConfig, train_yaml(), [f"model.path={tmp_path}/nope"])


def test_wrong_type_names_key(train_yaml):
    with pytest.raises(ConfigError, match=r"bad value for 'trainer\.total_steps'"):
        load_config(TrainConfig, train_yaml(), ["trainer.total_steps=many"])


def test_extends_merges_and_detects_cycles(tmp_path, train_yaml):
    base = train_yaml(name="base.yaml")
    child = tmp_path / "child.yaml"
    child.write_text(f"extends: {base.name}\ntrainer:\n  total_steps: 7\n")
    cfg = load_config(TrainConfig, child)
    assert cfg.trainer.total_steps == 7 and cfg.learner.group.num_workers == 2
    loop = tmp_path / "loop.yaml"
    loop.write_text("extends: loop.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(TrainConfig, loop)


def test_malformed_override():
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["trainer.total_steps"])


def test_resolved_config_round_trips(tmp_path, train_yaml):
    cfg = load_config(TrainConfig, train_yaml(), ["trainer.seed=5"])
    saved = save_resolved(cfg, tmp_path / "run")
    again = load_config(TrainConfig, saved)
    assert again == cfg


@pytest.mark.parametrize(("overrides", "message"), [
    (["rollout.sleep_when_idle=true"], "rollout.sleep_when_idle=true is not supported yet"),
    (["cluster.colocate=true", "cluster.device=gpu"], "cluster.colocate=true with cluster.device=gpu is not supported"),
    (["rollout.weight_sync=nccl"], "rollout.weight_sync=nccl needs cluster.device=gpu"),
    (["rollout.tensor_parallel_size=2"], "rollout.tensor_parallel_size=2 needs rollout.engine=vllm"),
    (["rollout.engine=vllm", "rollout.tensor_parallel_size=4", "cluster.device=gpu", "rollout.group.num_gpus_per_worker=1"],
     "rollout.group.num_gpus_per_worker=1 must equal rollout.tensor_parallel_size=4"),
])
def test_settings_without_a_tested_path_are_rejected_by_name(train_yaml, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TrainConfig, train_yaml(), overrides)


def test_collective_weight_sync_runs_on_cpu_and_nccl_names_it_on_gpu(train_yaml):
    assert load_config(TrainConfig, train_yaml(), ["rollout.weight_sync=collective"]).rollout.weight_sync == "collective"
    gpu = load_config(TrainConfig, train_yaml(), ["rollout.weight_sync=nccl", "cluster.device=gpu"])
    assert gpu.rollout.weight_sync_bucket_mb == 256


def test_rollout_batches_must_split_over_learner_ranks(train_yaml):
    with pytest.raises(ConfigError, match="learner.group.num_workers=4 does not divide"):
        load_config(TrainConfig, train_yaml(), ["learner.group.num_workers=4", "learner.micro_batch_size=1",
                                                "rollout.group.num_workers=8", "rollout.n_samples_per_prompt=2",
                                                "algorithm.ppo_mini_batch_size=8"])


def test_reference_on_learner_has_no_group_and_needs_the_kl_loss_and_zero3(train_yaml):
    config = load_config(TrainConfig, train_yaml(), ["reference.on_learner=true", "reference.micro_batch_size=2"])
    assert config.reference.on_learner and config.reference.micro_batch_size == 2
    # a reference group's settings would be silently unused: rejected, naming the key and the way out
    with pytest.raises(ConfigError, match=r"reference.on_learner=true puts the reference on the learner ranks.*"
                                          r"remove reference.group \(it is set to \{'num_workers': 2\}\)"):
        load_config(TrainConfig, train_yaml(), ["reference.on_learner=true", "reference.group.num_workers=2"])
    yaml_group = train_yaml({"reference": {"group": {"num_cpus_per_worker": 0.25}}})
    with pytest.raises(ConfigError, match="remove reference.group"):
        load_config(TrainConfig, yaml_group, ["reference.on_learner=true"])
    assert load_config(TrainConfig, yaml_group, ["reference.on_learner=true", "reference.group={}"]).reference.on_learner
    with pytest.raises(ConfigError, match="reference.on_learner=true but algorithm.use_kl_loss=false"):
        load_config(TrainConfig, train_yaml(), ["reference.on_learner=true", "algorithm.use_kl_loss=false"])
    with pytest.raises(ConfigError, match="needs learner.zero_stage=3 \\(got 2\\)"):
        load_config(TrainConfig, train_yaml(), ["reference.on_learner=true", "learner.zero_stage=2"])


def test_grpo_variant_keys(train_yaml):
    """algorithm.*: DAPO (clip-higher, overlong penalty and filtering, dynamic sampling), Dr.GRPO, GSPO."""
    plain = load_config(TrainConfig, train_yaml()).algorithm
    assert plain.clip_range() == (0.2, 0.2) and plain.policy_loss == "vanilla" and not plain.dynamic_sampling
    dapo = load_config(TrainConfig, train_yaml(), [
        "algorithm.clip_ratio_high=0.28", "algorithm.overlong_buffer_len=4", "algorithm.overlong_penalty_factor=0.5",
        "algorithm.overlong_filtering=true", "algorithm.dynamic_sampling=true", "algorithm.dynamic_sampling_max_rounds=2",
    ]).algorithm
    assert dapo.clip_range() == (0.2, 0.28)  # an unset bound is clip_ratio
    assert (dapo.overlong_buffer_len, dapo.overlong_penalty_factor, dapo.dynamic_sampling_max_rounds) == (4, 0.5, 2)
    assert load_config(TrainConfig, train_yaml(), ["algorithm.clip_ratio=0.3", "algorithm.clip_ratio_low=0.1"]
                       ).algorithm.clip_range() == (0.1, 0.3)
    dr_grpo = load_config(TrainConfig, train_yaml(), ["algorithm.norm_adv_by_std=false",
                                                      "algorithm.loss_agg_mode=seq-mean-token-sum-norm"]).algorithm
    assert dr_grpo.loss_agg_mode == "seq-mean-token-sum-norm" and not dr_grpo.norm_adv_by_std
    gspo = load_config(TrainConfig, train_yaml(), ["algorithm.policy_loss=gspo",
                                                   "algorithm.loss_agg_mode=seq-mean-token-mean"]).algorithm
    assert gspo.policy_loss == "gspo"
    assert load_config(TrainConfig, train_yaml(), ["algorithm.loss_agg_mode=token-sum"]).algorithm.loss_agg_mode == "token-sum"


@pytest.mark.parametrize(("overrides", "message"), [
    # a key that would be accepted and ignored
    (["algorithm.clip_ratio=0.3", "algorithm.clip_ratio_low=0.1", "algorithm.clip_ratio_high=0.2"],
     "algorithm.clip_ratio=0.3 is not used: algorithm.clip_ratio_low and algorithm.clip_ratio_high are both set"),
    (["algorithm.overlong_penalty_factor=0.5"],
     "algorithm.overlong_penalty_factor=0.5 has no effect without the soft overlong penalty: set algorithm.overlong_buffer_len"),
    (["algorithm.dynamic_sampling_max_rounds=2"],
     "algorithm.dynamic_sampling_max_rounds=2 has no effect without algorithm.dynamic_sampling=true"),
    # impossible values
    (["algorithm.clip_ratio=1.5"], "algorithm.clip_ratio=1.5 is also the lower clip range"),
    (["algorithm.clip_ratio_low=1.0"], r"bad value for 'algorithm\.clip_ratio_low'"),
    (["algorithm.overlong_buffer_len=9", "rollout.max_new_tokens=8"],
     "algorithm.overlong_buffer_len=9 is longer than rollout.max_new_tokens=8"),
    (["algorithm.policy_loss=grpo"], r"bad value for 'algorithm\.policy_loss'"),
    (["algorithm.loss_agg_mode=seq-sum"], r"bad value for 'algorithm\.loss_agg_mode'"),
])
def test_grpo_variant_keys_reject_ignored_and_impossible_settings_by_name(train_yaml, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TrainConfig, train_yaml(), overrides)


def test_grpo_variant_keys_round_trip_through_the_resolved_config(tmp_path, train_yaml):
    """The resolved config holds every key at its value, defaults included: it must load again as it is."""
    cfg = load_config(TrainConfig, train_yaml(), ["algorithm.clip_ratio_low=0.1", "algorithm.clip_ratio_high=0.3"])
    assert load_config(TrainConfig, save_resolved(cfg, tmp_path / "run")) == cfg
