"""GRPO math: our wrappers against verl's core_algos and against values worked out by hand."""

import math

import numpy as np
import pytest
import torch
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)
from verl.trainer.ppo import core_algos

from rmr1_ray import algorithms as algo

pytestmark = pytest.mark.unit


def random_case(seed: int = 0, batch: int = 6, length: int = 5):
    gen = torch.Generator().manual_seed(seed)
    mask = (torch.arange(length)[None] < torch.randint(1, length + 1, (batch, 1), generator=gen)).float()
    old = -torch.rand(batch, length, generator=gen) * 3
    new = old + torch.randn(batch, length, generator=gen) * 0.3
    ref = old + torch.randn(batch, length, generator=gen) * 0.3
    adv = torch.randn(batch, 1, generator=gen).expand(batch, length) * mask
    return old, new, ref, adv, mask


# --- GRPO advantages ------------------------------------------------------------------------------


def test_grpo_advantages_hand_case():
    rewards = torch.tensor([1.0, -1, -1, 1, 1, -1])
    mask = torch.tensor([[1, 1, 0]] * 6, dtype=torch.float)
    token_rewards = torch.zeros(6, 3)
    token_rewards[:, 1] = rewards  # on the last response token
    adv = algo.grpo_advantages(token_rewards, mask, np.array(["a", "a", "a", "b", "b", "b"], dtype=object))
    expected = torch.tensor([1.1547, -0.5773, -0.5773, 0.5773, 0.5773, -1.1547])
    torch.testing.assert_close(adv[:, 0], expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(adv[:, 1], expected, atol=1e-4, rtol=0)
    assert torch.all(adv[:, 2] == 0)  # padding


def test_grpo_advantages_equal_verl_and_without_std():
    _, _, _, _, mask = random_case(seed=1)
    rewards = torch.randn(mask.shape) * mask
    uid = np.array(["x", "y", "x", "y", "z", "z"], dtype=object)
    for norm in (True, False):
        expected, _ = core_algos.compute_grpo_outcome_advantage(rewards, mask, uid, norm_adv_by_std_in_grpo=norm)
        torch.testing.assert_close(algo.grpo_advantages(rewards, mask, uid, norm_by_std=norm), expected)
    # without std: plain mean-centering; a group's advantages sum to zero
    adv = algo.grpo_advantages(rewards, mask, uid, norm_by_std=False)[:, 0]
    assert adv[[0, 2]].sum().item() == pytest.approx(0, abs=1e-6)


# --- policy loss ----------------------------------------------------------------------------------


def test_policy_loss_hand_case_clipping_and_dual_clip():
    # (ratio, advantage): clipped above, inside, clipped below, dual-clipped at 3
    ratio = torch.tensor([[1.5, 0.5, 0.5, 5.0]])
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    old = torch.zeros(1, 4)
    loss, metrics = algo.policy_loss(old, ratio.log(), adv, torch.ones(1, 4), clip_ratio=0.2)
    # per token: -min(r A, clip(r) A) = -1.2, -0.5, 0.8, then max(5, 1.2) capped at 3
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 0.8 + 3.0) / 4)
    assert metrics["actor/pg_clipfrac"] == pytest.approx(0.5)
    assert metrics["actor/pg_clipfrac_lower"] == pytest.approx(0.25)
    assert metrics["actor/ppo_kl"] == pytest.approx(-ratio.log().mean().item())


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"])
def test_policy_loss_equals_verl(mode):
    old, new, _, adv, mask = random_case(seed=2)
    loss, metrics = algo.policy_loss(old, new, adv, mask, clip_ratio=0.2, loss_agg_mode=mode)
    with pytest.warns(Warning):  # verl deprecated its function-style API; it is the reference here
        expected, clipfrac, ppo_kl, _ = core_algos.compute_policy_loss(old, new, adv, mask, cliprange=0.2, loss_agg_mode=mode)
    torch.testing.assert_close(loss, expected)
    assert metrics["actor/pg_clipfrac"] == pytest.approx(clipfrac.item())
    assert metrics["actor/ppo_kl"] == pytest.approx(ppo_kl.item())


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"])
def test_sharded_loss_shares_sum_to_the_full_batch_loss(mode):
    """What the learner relies on: per-micro-batch losses with global normalisers, divided by the
    number of ranks and summed, equal the loss of the whole mini-batch."""
    old, new, ref, adv, mask = random_case(seed=3, batch=8)
    world = 2
    tokens, sequences = mask.sum().item(), (mask.sum(-1) > 0).sum().item()
    share = {"dp_size": world, "batch_num_tokens": tokens, "global_batch_size": sequences}
    parts = [slice(i, i + 2) for i in range(0, 8, 2)]  # 2 ranks x 2 micro-batches of 2
    pg = sum(algo.policy_loss(old[s], new[s], adv[s], mask[s], 0.2, mode, **share)[0] for s in parts) / world
    kl = sum(algo.kl_loss(new[s], ref[s], mask[s], "low_var_kl", mode, **share) for s in parts) / world
    torch.testing.assert_close(pg, algo.policy_loss(old, new, adv, mask, 0.2, mode)[0])
    torch.testing.assert_close(kl, algo.kl_loss(new, ref, mask, "low_var_kl", mode))


# --- KL, entropy, aggregation ---------------------------------------------------------------------


def test_low_var_kl_hand_case():
    # k3 = exp(ref - logp) - (ref - logp) - 1, with logp = -1, ref = -2
    kl = algo.kl_loss(torch.tensor([[-1.0]]), torch.tensor([[-2.0]]), torch.ones(1, 1), "low_var_kl")
    assert kl.item() == pytest.approx(math.exp(-1) + 1 - 1)


@pytest.mark.parametrize("kind", ["kl", "abs", "mse", "low_var_kl"])
def test_kl_loss_equals_verl(kind):
    _, new, ref, _, mask = random_case(seed=4)
    expected = core_algos.agg_loss(core_algos.kl_penalty(new, ref, kind), mask, "token-mean")
    torch.testing.assert_close(algo.kl_loss(new, ref, mask, kind), expected)


def test_full_kl_is_a_clear_error():
    with pytest.raises(ValueError, match="kl_loss_type='full'"):
        algo.kl_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), "full")


def test_token_mean_ignores_padding():
    loss_mat = torch.tensor([[1.0, 3.0, 100.0], [5.0, 100.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert core_algos.agg_loss(loss_mat, mask, "token-mean").item() == pytest.approx(3.0)
    # same through a wrapper: kl "kl" type is logp - ref
    assert algo.kl_loss(loss_mat, torch.zeros_like(loss_mat), mask, "kl").item() == pytest.approx(3.0)


def test_entropy_loss_aggregates_like_verl():
    logits = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(5))
    mask = torch.ones(2, 3)
    mask[1, 2] = 0
    _, entropy = algo.response_token_stats(logits, torch.zeros(2, 3, dtype=torch.long), entropy="metric")
    torch.testing.assert_close(algo.entropy_loss(entropy, mask), core_algos.compute_entropy_loss(logits, mask))


# --- log-probs (chunked ones: test_lean_log_probs.py) ---------------------------------------------


def test_logprob_temperature_defaults_and_greedy():
    assert algo.logprob_temperature({"temperature": 0.6}, 1.0) == 0.6
    assert algo.logprob_temperature({}, 0.9) == 0.9
    assert algo.logprob_temperature({"temperature": 0.0}, 1.0) == 1.0  # greedy: no scaling, never / 0


# --- LR schedule ----------------------------------------------------------------------------------


def test_lr_warmup_hand_values():
    assert [algo.lr_lambda(s, 4, 10, "constant") for s in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert algo.lr_lambda(0, 0, 10, "cosine") == 1.0
    assert algo.lr_lambda(7, 2, 12, "cosine") == pytest.approx(0.5)  # half-way through the decay
    assert algo.lr_lambda(10, 0, 10, "linear") == 0.0
    with pytest.raises(ValueError, match="unknown lr schedule"):
        algo.lr_lambda(5, 0, 10, "step")


@pytest.mark.parametrize(
    ("kind", "make"),
    [
        ("constant", lambda opt: get_constant_schedule_with_warmup(opt, 3)),
        ("cosine", lambda opt: get_cosine_schedule_with_warmup(opt, 3, 12)),
        ("linear", lambda opt: get_linear_schedule_with_warmup(opt, 3, 12)),
    ],
)
def test_lr_lambda_equals_transformers_schedules(kind, make):
    scheduler = make(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0))
    for step in range(15):
        assert algo.lr_lambda(step, 3, 12, kind) == pytest.approx(scheduler.get_last_lr()[0], abs=1e-12), step
        scheduler.optimizer.step()
        scheduler.step()
