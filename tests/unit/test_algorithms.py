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


AGG_MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean"]


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("clip", [0.2, (0.2, 0.28)], ids=["symmetric", "clip-higher"])
def test_policy_loss_equals_verl(mode, clip):
    old, new, _, adv, mask = random_case(seed=2)
    old, new, adv, mask = old * 3, new * 3, adv, mask  # wider ratios: both bounds clip some tokens
    loss, metrics = algo.policy_loss(old, new, adv, mask, clip_ratio=clip, loss_agg_mode=mode)
    low, high = (clip, clip) if isinstance(clip, float) else clip
    with pytest.warns(Warning):  # verl deprecated its function-style API; it is the reference here
        expected, clipfrac, ppo_kl, dual = core_algos.compute_policy_loss(
            old, new, adv, mask, cliprange=0.2, cliprange_low=low, cliprange_high=high, loss_agg_mode=mode)
    torch.testing.assert_close(loss, expected)
    assert metrics["actor/pg_clipfrac"] == pytest.approx(clipfrac.item())
    assert metrics["actor/pg_clipfrac_lower"] == pytest.approx(dual.item())
    assert metrics["actor/ppo_kl"] == pytest.approx(ppo_kl.item())
    # the two bounds counted apart add up to verl's one clip fraction
    assert metrics["actor/pg_clipfrac_high"] > 0 and metrics["actor/pg_clipfrac_low"] > 0
    assert metrics["actor/pg_clipfrac_high"] + metrics["actor/pg_clipfrac_low"] == pytest.approx(clipfrac.item())


def test_clip_higher_hand_case():
    """DAPO's clip-higher: a ratio of 1.25 with A > 0 is clipped at 1 + 0.2, not at 1 + 0.28; the lower
    bound stays at 1 - 0.2."""
    ratio = torch.tensor([[1.25, 1.5, 0.7]])
    adv = torch.tensor([[1.0, 1.0, -1.0]])
    old, mask = torch.zeros(1, 3), torch.ones(1, 3)
    symmetric, m_sym = algo.policy_loss(old, ratio.log(), adv, mask, clip_ratio=0.2)
    higher, m_high = algo.policy_loss(old, ratio.log(), adv, mask, clip_ratio=(0.2, 0.28))
    assert symmetric.item() == pytest.approx((-1.2 - 1.2 + 0.8) / 3)
    assert higher.item() == pytest.approx((-1.25 - 1.28 + 0.8) / 3)
    assert (m_sym["actor/pg_clipfrac_high"], m_sym["actor/pg_clipfrac_low"]) == pytest.approx((2 / 3, 1 / 3))
    assert (m_high["actor/pg_clipfrac_high"], m_high["actor/pg_clipfrac_low"]) == pytest.approx((1 / 3, 1 / 3))


@pytest.mark.parametrize("mode", ["seq-mean-token-mean", "token-mean"])
def test_gspo_loss_equals_verl(mode):
    from verl.workers.config.actor import ActorConfig

    old, new, _, adv, mask = random_case(seed=6)
    new = old + (new - old) * 2
    loss, metrics = algo.policy_loss(old, new, adv, mask, (0.1, 0.15), mode, loss_mode="gspo")
    config = ActorConfig(strategy="deepspeed", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio_low=0.1,
                         clip_ratio_high=0.15, loss_agg_mode=mode,
                         global_batch_info={"dp_size": 1, "batch_num_tokens": None, "global_batch_size": None})
    expected, verl_metrics = core_algos.compute_policy_loss_gspo(old, new, adv, mask, mode, config)
    torch.testing.assert_close(loss, expected)
    assert metrics["actor/pg_clipfrac"] == pytest.approx(verl_metrics["actor/pg_clipfrac"])
    assert metrics["actor/pg_clipfrac_high"] + metrics["actor/pg_clipfrac_low"] == pytest.approx(
        verl_metrics["actor/pg_clipfrac"])
    assert metrics["actor/pg_clipfrac_lower"] == 0.0  # GSPO has no dual clip


def test_gspo_hand_case_sequence_ratio_and_gradient():
    """GSPO: one ratio per sequence, exp(mean token log-ratio), clipped as a whole; each token's gradient
    is the sequence's share, s_i * A_i / |y_i| (seq-mean-token-mean: then / G)."""
    old = torch.zeros(2, 2)
    new = torch.tensor([[0.1, 0.3], [-0.5, 0.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    adv = torch.tensor([[1.0, 1.0], [-1.0, 0.0]])
    loss, metrics = algo.policy_loss(old, new, adv, mask, (0.2, 0.28), "seq-mean-token-mean", loss_mode="gspo")
    s0, s1 = math.exp(0.2), math.exp(-0.5)  # 1.221 (inside 1.28), 0.607 (below 1 - 0.2: clipped to 0.8)
    assert s1 < 0.8 and loss.item() == pytest.approx((-s0 + 0.8) / 2, rel=1e-6)
    loss.backward()
    torch.testing.assert_close(new.grad, torch.tensor([[-s0 / 2 / 2, -s0 / 2 / 2], [0.0, 0.0]]))
    assert (metrics["actor/pg_clipfrac_high"], metrics["actor/pg_clipfrac_low"]) == pytest.approx((0.0, 1 / 3))
    # with the symmetric 0.2 the first sequence is clipped too, at 1.2, and has no gradient
    loss, metrics = algo.policy_loss(old, new.detach(), adv, mask, 0.2, "seq-mean-token-mean", loss_mode="gspo")
    assert loss.item() == pytest.approx((-1.2 + 0.8) / 2) and metrics["actor/pg_clipfrac_high"] == pytest.approx(2 / 3)


def test_dr_grpo_hand_case():
    """Dr.GRPO: advantages only mean-centred (norm_adv_by_std=false) and sequence sums over one constant
    (seq-mean-token-sum-norm with the longest possible response), so longer answers are not discounted."""
    rewards = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])  # group "a": a right one of 2 tokens ...
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    rewards[1, 0] = -1.0  # ... and a wrong one of 1 token
    adv = algo.grpo_advantages(rewards, mask, ["a", "a"], norm_by_std=False)
    assert adv[:, 0].tolist() == [1.0, -1.0]  # mean 0, no division by the std
    zeros = torch.zeros(2, 3)
    loss, _ = algo.policy_loss(zeros, zeros, adv, mask, 0.2, "seq-mean-token-sum-norm", loss_scale_factor=8)
    # ratio 1: -(1/G) sum_i A_i |y_i| / 8 = -(1 * 2 - 1 * 1) / 2 / 8
    assert loss.item() == pytest.approx(-(2 - 1) / 2 / 8)
    plain, _ = algo.policy_loss(zeros, zeros, adv, mask, 0.2, "seq-mean-token-sum")
    assert loss.item() == pytest.approx(plain.item() / 8)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_sharded_loss_shares_sum_to_the_full_batch_loss(mode):
    """What the learner relies on: per-micro-batch losses with global normalisers, divided by the
    number of ranks and summed, equal the loss of the whole mini-batch."""
    old, new, ref, adv, mask = random_case(seed=3, batch=8)
    world = 2
    tokens, sequences = mask.sum().item(), (mask.sum(-1) > 0).sum().item()
    share = {"dp_size": world, "batch_num_tokens": tokens, "global_batch_size": sequences, "loss_scale_factor": 7}
    parts = [slice(i, i + 2) for i in range(0, 8, 2)]  # 2 ranks x 2 micro-batches of 2
    for loss_mode in ("vanilla", "gspo"):
        pg = sum(algo.policy_loss(old[s], new[s], adv[s], mask[s], (0.2, 0.3), mode, loss_mode=loss_mode, **share)[0]
                 for s in parts) / world
        full = algo.policy_loss(old, new, adv, mask, (0.2, 0.3), mode, loss_mode=loss_mode, loss_scale_factor=7)[0]
        torch.testing.assert_close(pg, full)
    kl = sum(algo.kl_loss(new[s], ref[s], mask[s], "low_var_kl", mode, **share) for s in parts) / world
    torch.testing.assert_close(kl, algo.kl_loss(new, ref, mask, "low_var_kl", mode, loss_scale_factor=7))


# --- overlong reward shaping ----------------------------------------------------------------------


def test_overlong_penalty_equals_verls_dapo_reward_manager():
    """DAPO's soft overlong punishment against verl's DAPORewardManager (its reward with a score of 0 is
    the penalty alone), for lengths around the buffer [max - buffer, max]."""
    from types import SimpleNamespace

    from verl import DataProto
    from verl.workers.reward_manager.dapo import DAPORewardManager

    max_len, buffer, factor = 16, 6, 0.5
    lengths = [1, 9, 10, 11, 13, 15, 16]
    prompts = torch.ones(len(lengths), 3, dtype=torch.long)
    response_mask = (torch.arange(max_len)[None] < torch.tensor(lengths)[:, None]).long()
    batch = DataProto.from_dict(
        tensors={"prompts": prompts, "responses": torch.ones(len(lengths), max_len, dtype=torch.long),
                 "attention_mask": torch.cat([torch.ones_like(prompts), response_mask], dim=1)},
        non_tensors={"reward_model": np.array([{"ground_truth": ""}] * len(lengths), dtype=object),
                     "data_source": np.array(["x"] * len(lengths), dtype=object)},
    )
    manager = DAPORewardManager(
        tokenizer=SimpleNamespace(decode=lambda ids, skip_special_tokens=True: "", eos_token="</s>"),
        num_examine=0, compute_score=lambda **_: 0.0, max_resp_len=max_len,
        overlong_buffer_cfg=SimpleNamespace(enable=True, len=buffer, penalty_factor=factor, log=False),
    )
    expected = manager(batch).sum(-1)
    penalty = algo.overlong_penalty(torch.tensor(lengths), max_len, buffer, factor)
    torch.testing.assert_close(penalty, expected)
    # worked out: 0 up to 16 - 6 = 10 tokens, then -0.5 * (length - 10) / 6, down to -0.5 at 16
    assert penalty.tolist() == pytest.approx([0, 0, 0, -0.5 / 6, -1.5 / 6, -2.5 / 6, -0.5])


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
