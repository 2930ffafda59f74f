"""PolicyLearner (2 DeepSpeed ZeRO-3 ranks over gloo) and ReferenceModel on a local Ray cluster.

Checked against plain single-process torch: log-probs, one GRPO update (loss, grad norm, new weights),
the gathered state dict, and checkpoint/resume determinism. And the reference held by the learner
ranks (reference.on_learner): sharded, frozen through updates and resumes, equal to the reference group.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import ray
import torch
from verl.utils import torch_functional as verl_F

from actors.learner import PolicyLearner
from actors.reference import ReferenceModel
from rmr1_ray import algorithms as algo
from rmr1_ray.batch import LOG_PROB_KEYS, UPDATE_KEYS, concat, pad_and_assemble, rank_payloads
from rmr1_ray.config.train import TrainConfig
from rmr1_ray.models import load_causal_lm
from rmr1_ray.ray_utils import default_torch_extensions_dir
from rmr1_ray.tiny import make_tiny
from rmr1_ray.weight_sync import unpack_state

pytestmark = pytest.mark.integration

WORLD = 2
LR = 1e-3
TEMPERATURE = 0.8
ENV = {
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TORCH_EXTENSIONS_DIR": default_torch_extensions_dir(),
}


def make_learner_group(config: dict, num_cpus: float = 1) -> tuple[list, list[dict]]:
    """What the driver's ActorGroup does, minus placement groups."""
    remote = ray.remote(num_cpus=num_cpus)(PolicyLearner).options(runtime_env={"env_vars": ENV})
    ranks = [remote.remote(config, rank, WORLD) for rank in range(WORLD)]
    addr, port = ray.get(ranks[0].get_master_addr_port.remote())
    infos = ray.get([r.setup.remote(addr, port) for r in ranks])
    return ranks, infos


def on_all(ranks, method: str, *args):
    return ray.get([getattr(r, method).remote(*args) for r in ranks])


def per_rank(ranks, method: str, batch, keys, *args):
    """`method(own share, *args)` on every rank, each getting its share of `batch` as the driver sends it."""
    shares = rank_payloads(batch, len(ranks), keys)
    return ray.get([getattr(r, method).remote(ray.put(share), *args) for r, share in zip(ranks, shares, strict=True)])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(make_tiny(tmp_path_factory.mktemp("tiny") / "model", seed=0))


@pytest.fixture(scope="module")
def config(tiny, tmp_path_factory):
    return TrainConfig(
        model={"path": tiny},
        data={"train_path": str(tmp_path_factory.mktemp("data"))},
        rollout={"n_samples_per_prompt": 2, "temperature": 1.0},
        learner={
            "group": {"num_workers": WORLD},
            "micro_batch_size": 1,
            "lr": LR,
            "lr_scheduler": "cosine",  # the LR differs per step: resume must restore the scheduler
            "grad_clip": 0.05,  # below the first step's grad norm: clipping is exercised
        },
        reference={"micro_batch_size": 3},
        algorithm={
            "train_batch_size": 2,
            "ppo_mini_batch_size": 2,  # 4 sequences: 2 per rank, 2 micro-batches of 1
            "use_kl_loss": True,
            "kl_loss_coef": 0.1,
            "entropy_coeff": 0.01,
            "ppo_epochs": 2,  # 2 optimizer steps per update; the LR schedule counts GRPO steps
        },
        trainer={"total_steps": 4, "seed": 0},
    ).model_dump()


@pytest.fixture(scope="module")
def cluster():
    ray.init(address="local", num_cpus=3, include_dashboard=False, runtime_env={"env_vars": ENV})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def group(cluster, config):
    start = time.perf_counter()
    ranks, infos = make_learner_group(config)
    print(f"\nlearner group setup: {time.perf_counter() - start:.1f} s ({[round(i['setup_seconds'], 1) for i in infos]})")
    assert [i["rank"] for i in infos] == [0, 1]
    assert infos[0]["num_params"] == sum(p.numel() for p in load_causal_lm(config["model"]["path"]).parameters())
    yield ranks
    for r in ranks:
        ray.kill(r)


@pytest.fixture(scope="module")
def reference(cluster, config):
    ref = ray.remote(num_cpus=1)(ReferenceModel).options(runtime_env={"env_vars": ENV}).remote(config)
    ray.get(ref.setup.remote())
    yield ref
    ray.kill(ref)


def hand_batch(seed: int):
    """2 prompts x 2 samples, ragged prompt and response lengths."""
    gen = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(3, 2000, (n,), generator=gen).tolist()

    prompts = [ids(7), ids(7), ids(4), ids(4)]
    responses = [ids(5), ids(2), ids(6), ids(3)]
    return pad_and_assemble(
        prompts,
        responses,
        pad_id=0,
        non_tensors={"uid": ["p0", "p0", "p1", "p1"], "data_index": list(range(4))},
        meta_info={"temperature": TEMPERATURE},
    )


def hf_log_probs(model, batch) -> list[torch.Tensor]:
    """Unpadded single-sequence forwards: the ground truth for the padded, sharded ones."""
    out = []
    for prompt, response, p_mask, r_mask in zip(
        batch.batch["prompts"], batch.batch["responses"], batch.batch["attention_mask"], batch.batch["response_mask"],
        strict=True,
    ):
        p = prompt[p_mask[: prompt.shape[0]].bool()]
        r = response[r_mask.bool()]
        with torch.no_grad():
            logits = model(input_ids=torch.cat([p, r])[None]).logits[0, p.shape[0] - 1 : -1] / TEMPERATURE
        out.append(torch.log_softmax(logits, -1).gather(-1, r[:, None])[:, 0])
    return out


def training_batch(batch, group, reference, rewards):
    """What the driver assembles: old/ref log-probs, rewards on the last token, GRPO advantages."""
    ref = ray.put(batch)
    old = concat(per_rank(group, "compute_log_probs", batch, LOG_PROB_KEYS))
    batch.batch["old_log_probs"] = old.batch["old_log_probs"]
    batch.batch["ref_log_probs"] = ray.get(reference.compute_log_probs.remote([ref])).batch["ref_log_probs"]
    mask = batch.batch["response_mask"]
    token_rewards = torch.zeros(mask.shape)
    token_rewards[torch.arange(len(rewards)), mask.sum(-1) - 1] = torch.tensor(rewards)
    batch.batch["token_level_rewards"] = token_rewards
    batch.batch["advantages"] = algo.grpo_advantages(token_rewards, mask, batch.non_tensor_batch["uid"])
    return batch


def gathered(group) -> dict[str, np.ndarray]:
    """The learner's full weights as the object-store sync ships them, unpacked: {name: array}."""
    packed, *others = on_all(group, "gather_state_dict")
    assert others == [None]  # only rank 0 ships weights
    return {name: t.numpy() for name, t in unpack_state(packed)}


def assert_states_equal(a: dict, b: dict, atol: float = 0.0):
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=0, atol=atol, err_msg=name)


def test_gathered_state_is_the_initial_hf_state(group, config):
    packed = on_all(group, "gather_state_dict")[0]
    assert packed["layout"].aliases == {"lm_head.weight": "model.embed_tokens.weight"}  # the tied weight goes once
    state = gathered(group)
    hf = load_causal_lm(config["model"]["path"]).state_dict()
    assert_states_equal(state, {k: v.numpy() for k, v in hf.items() if k != "lm_head.weight"})
    assert all(v.dtype == np.float32 for v in state.values())
    print(f"gather: {ray.get(group[0].last_timings.remote())['gather_s']:.3f} s")


def test_log_probs_match_reference_and_plain_hf(group, reference, config):
    batch = hand_batch(seed=1)
    parts = per_rank(group, "compute_log_probs", batch, LOG_PROB_KEYS)
    assert [len(p) for p in parts] == [2, 2]
    learner = concat(parts)
    assert learner.non_tensor_batch["data_index"].tolist() == [0, 1, 2, 3]  # rank order = batch order
    # the reference gets the batch as two refs (as when several rollout workers produced it)
    reference_out = ray.get(reference.compute_log_probs.remote([ray.put(batch[:3]), ray.put(batch[3:])]))
    truth = hf_log_probs(load_causal_lm(config["model"]["path"]), batch)
    mask = batch.batch["response_mask"].bool()
    for i, expected in enumerate(truth):
        for got in (learner.batch["old_log_probs"][i], reference_out.batch["ref_log_probs"][i]):
            torch.testing.assert_close(got[mask[i]], expected, rtol=0, atol=1e-5)
            assert torch.all(got[~mask[i]] == 0)


def test_update_matches_single_process_replica(group, reference, config):
    """One GRPO step on 2 ZeRO-3 ranks == the same step in one process with plain torch AdamW:
    2 PPO epochs over one mini-batch = 2 optimizer steps (the second with ratio != 1)."""
    a, learner = config["algorithm"], config["learner"]
    batch = training_batch(hand_batch(seed=2), group, reference, rewards=[1.0, -1.0, 1.0, -1.0])
    metrics = per_rank(group, "update", batch, UPDATE_KEYS)
    assert metrics[0] == metrics[1]  # all-reduced
    m = metrics[0]
    timings = ray.get(group[0].last_timings.remote())
    print(f"update: {timings['update_s']:.3f} s, old log-probs: {timings['log_probs_s']:.3f} s, metrics {m}")

    # the replica: the whole mini-batch in one forward per optimizer step, plain torch
    model = load_causal_lm(config["model"]["path"]).train()
    before = {k: v.detach().clone().numpy() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR * algo.lr_lambda(0, 0, 4, "cosine"),
                                  betas=learner["betas"], weight_decay=learner["weight_decay"])
    data, mask = batch.batch, batch.batch["response_mask"]
    steps = []
    for _ in range(a["ppo_epochs"]):
        optimizer.zero_grad()
        # verl's unchunked maths on the whole [b, R, V] tensor: the learner computes the same in chunks
        logits = algo.response_logits(model, data, mask.shape[1]) / TEMPERATURE
        log_probs = verl_F.logprobs_from_logits(logits, data["responses"])
        pg_loss, pg_metrics = algo.policy_loss(
            data["old_log_probs"], log_probs, data["advantages"], mask, a["clip_ratio"]
        )
        kl = algo.kl_loss(log_probs, data["ref_log_probs"], mask, a["kl_loss_type"])
        entropy = algo.entropy_loss(verl_F.entropy_from_logits(logits), mask)
        (pg_loss + a["kl_loss_coef"] * kl - a["entropy_coeff"] * entropy).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), learner["grad_clip"])
        optimizer.step()
        steps.append({"actor/pg_loss": pg_loss.item(), "actor/kl_loss": kl.item(), "actor/entropy": entropy.item(),
                      "actor/ppo_kl": pg_metrics["actor/ppo_kl"], "actor/pg_clipfrac": pg_metrics["actor/pg_clipfrac"],
                      "actor/grad_norm": grad_norm.item()})
    expected_metrics = {k: np.mean([s[k] for s in steps]) for k in steps[0]}

    assert m["actor/lr"] == pytest.approx(LR)
    # first step, ratio 1: the loss is minus the token-mean advantage (ragged lengths: non-zero)
    assert steps[0]["actor/pg_loss"] == pytest.approx(-(data["advantages"] * mask).sum().item() / mask.sum().item())
    assert abs(steps[0]["actor/pg_loss"]) > 0.1 and steps[1]["actor/kl_loss"] > 0
    for name in ("actor/pg_loss", "actor/kl_loss", "actor/entropy", "actor/ppo_kl", "actor/pg_clipfrac", "actor/grad_norm"):
        assert m[name] == pytest.approx(expected_metrics[name], rel=1e-4, abs=1e-7), name
    assert min(s["actor/grad_norm"] for s in steps) > learner["grad_clip"]  # clipping was active

    updated = gathered(group)
    expected = {k: v.detach().numpy() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    # Adam's first step is lr * g / (|g| + eps): where |g| ~ eps it amplifies the (1e-9) differences in
    # gradient summation order between the sharded and the single-process run. Hence a tolerance in
    # units of lr for single elements, and a tight one on average.
    assert_states_equal(updated, expected, atol=1e-2 * LR)
    mean_step = np.mean([np.abs(updated[k] - before[k]).mean() for k in updated])
    mean_error = np.mean([np.abs(updated[k] - expected[k]).mean() for k in updated])
    assert mean_step > LR  # two Adam steps move (almost) every weight by ~lr each
    assert mean_error < 1e-5 * mean_step


def test_checkpoint_resume_is_deterministic(group, reference, config, tmp_path):
    """save -> update; a NEW learner group loads the checkpoint -> same weights, same update."""
    batch = training_batch(hand_batch(seed=3), group, reference, rewards=[-1.0, 1.0, 1.0, -1.0])
    saved = gathered(group)
    start = time.perf_counter()
    on_all(group, "save_checkpoint", str(tmp_path / "ckpt"))
    print(f"save_checkpoint: {time.perf_counter() - start:.2f} s")
    expected_metrics = per_rank(group, "update", batch, UPDATE_KEYS)[0]
    expected_state = gathered(group)
    for r in group:  # free the CPUs for the new group
        ray.kill(r)

    hf_dir = load_causal_lm(str(tmp_path / "ckpt" / "hf")).state_dict()
    assert_states_equal(saved, {k: v.numpy() for k, v in hf_dir.items() if k != "lm_head.weight"})

    resumed, _ = make_learner_group(config)
    try:
        on_all(resumed, "load_checkpoint", str(tmp_path / "ckpt"))
        assert_states_equal(gathered(resumed), saved)
        metrics = per_rank(resumed, "update", batch, UPDATE_KEYS)[0]
        assert metrics == pytest.approx(expected_metrics, rel=1e-6, abs=1e-9)
        assert metrics["actor/lr"] < LR  # the cosine schedule resumed past step 0
        assert_states_equal(gathered(resumed), expected_state, atol=1e-7)
    finally:
        for r in resumed:
            ray.kill(r)


# --- the reference on the learner ranks (reference.on_learner) ----------------------------------------


def reference_state(rank) -> dict:
    """What rank `rank` holds of its reference engine."""

    def read(learner) -> dict:
        params = list(learner.reference.module.parameters())
        return {"shard": sum(p.ds_tensor.numel() for p in params), "full": sum(p.ds_numel for p in params),
                "trainable": any(p.requires_grad for p in params), "training": learner.reference.module.training,
                "optimizer": type(learner.reference.optimizer).__name__}

    return ray.get(rank.__ray_call__.remote(read))


def test_reference_on_learner_is_sharded_frozen_and_equals_the_reference_group(config, reference, tmp_path):
    """2 ranks holding the reference next to the policy: ref log-probs of the same rows as the reference
    group's, which neither an update nor a resume from a checkpoint moves."""
    on_learner = TrainConfig.model_validate({**config, "reference": {**config["reference"], "on_learner": True}})
    # num_cpus=0: the module's own learner group and reference may still hold the cluster's CPUs
    ranks, _ = make_learner_group(on_learner.model_dump(), num_cpus=0)
    try:
        states = [reference_state(r) for r in ranks]
        full = sum(p.numel() for p in load_causal_lm(config["model"]["path"]).parameters())
        for state in states:  # each rank holds half of the weights (ZeRO-3 pads a partition by a few elements)
            assert state["full"] == full and full / 2 <= state["shard"] < full / 2 + 64
            assert (state["trainable"], state["training"], state["optimizer"]) == (False, False, "DeepSpeedZeRoOffload")

        batch = hand_batch(seed=4)
        mask = batch.batch["response_mask"].bool()
        first = concat(per_rank(ranks, "compute_log_probs", batch, LOG_PROB_KEYS, True))
        group_ref = ray.get(reference.compute_log_probs.remote([ray.put(batch)])).batch["ref_log_probs"]
        # reference.micro_batch_size=3 here vs 4 rows in the group: other micro-batches, the same numbers
        torch.testing.assert_close(first.batch["ref_log_probs"], group_ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(first.batch["old_log_probs"], first.batch["ref_log_probs"], rtol=0, atol=1e-6)
        assert torch.all(first.batch["ref_log_probs"][~mask] == 0)

        training = training_batch(batch, ranks, reference, rewards=[1.0, -1.0, -1.0, 1.0])
        per_rank(ranks, "update", training, UPDATE_KEYS)
        on_all(ranks, "save_checkpoint", str(tmp_path / "ckpt"))
        updated = concat(per_rank(ranks, "compute_log_probs", batch, LOG_PROB_KEYS, True))
        assert torch.equal(updated.batch["ref_log_probs"], first.batch["ref_log_probs"])  # frozen
        moved = (updated.batch["old_log_probs"] - first.batch["old_log_probs"])[mask].abs().max().item()
        assert moved > 1e-3  # ...while the policy moved
    finally:
        for r in ranks:
            ray.kill(r)

    # A resumed group: the policy from the checkpoint, the reference still the starting model.
    resumed, _ = make_learner_group(on_learner.model_dump(), num_cpus=0)
    try:
        on_all(resumed, "load_checkpoint", str(tmp_path / "ckpt"))
        again = concat(per_rank(resumed, "compute_log_probs", batch, LOG_PROB_KEYS, True))
        assert torch.equal(again.batch["ref_log_probs"], first.batch["ref_log_probs"])
        torch.testing.assert_close(again.batch["old_log_probs"], updated.batch["old_log_probs"], rtol=0, atol=1e-6)
    finally:
        for r in resumed:
            ray.kill(r)
