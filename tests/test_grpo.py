"""GRPO math against values derived by hand in each test."""

import math

import pytest
import torch

from minicd import ConfigError
from minicd.algo.grpo import ADVANTAGES, group_advantages, kl_penalty, masked_mean, policy_loss


# ---------------------------------------------------------------- advantages, Eq. (1)

def test_group_of_two_unbiased_std_and_mean_only():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0])            # two groups of G = 2
    # mean 0.5; unbiased std = sqrt((0.25 + 0.25) / 1) = sqrt(0.5)
    a = group_advantages(r, 2)
    s = math.sqrt(0.5)
    expected = torch.tensor([0.5, -0.5, -0.5, 0.5]) / (s + 1e-6)
    torch.testing.assert_close(a, expected, rtol=0, atol=1e-7)
    torch.testing.assert_close(ADVANTAGES["grpo"](r, 2), expected, rtol=0, atol=1e-7)
    torch.testing.assert_close(group_advantages(r, 2, "dr_grpo"),
                               torch.tensor([0.5, -0.5, -0.5, 0.5]), rtol=0, atol=1e-7)


def test_group_of_four_by_hand():
    r = torch.tensor([0.2, 0.4, 0.6, 0.8])
    # mean 0.5, deviations -0.3 -0.1 0.1 0.3, sum of squares 0.2, unbiased var 0.2/3
    std = math.sqrt(0.2 / 3)
    expected = torch.tensor([-0.3, -0.1, 0.1, 0.3]) / (std + 1e-6)
    torch.testing.assert_close(group_advantages(r, 4), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(group_advantages(r, 4, "dr_grpo"),
                               torch.tensor([-0.3, -0.1, 0.1, 0.3]), rtol=0, atol=1e-6)


def test_equal_reward_groups_are_exactly_zero():
    r = torch.tensor([0.1] * 8 + [0.0, 0.5, 1.0, 0.5, 0.0, 0.0, 0.0, 0.0] + [1.0] * 8)
    for name in ADVANTAGES:
        a = group_advantages(r, 8, name)
        assert torch.equal(a[:8], torch.zeros(8)), name
        assert torch.equal(a[16:], torch.zeros(8)), name
        assert a[8:16].abs().sum() > 0
        # within a group advantages sum to zero
        assert abs(a[8:16].sum().item()) < 1e-5


def test_advantage_input_errors():
    with pytest.raises(ConfigError, match="groups of 3"):
        group_advantages(torch.zeros(8), 3)
    with pytest.raises(ConfigError, match="group_size = 1"):
        group_advantages(torch.zeros(4), 1)
    with pytest.raises(ConfigError, match="group_size = 1"):
        group_advantages(torch.zeros(4), 1, "rloo")
    with pytest.raises(ConfigError, match="grpo.advantage"):
        group_advantages(torch.zeros(4), 2, "ppo")
    # mean-only accepts G = 1 (all zeros: a single sample has no baseline signal)
    assert torch.equal(group_advantages(torch.tensor([0.3, 0.7]), 1, "dr_grpo"), torch.zeros(2))


# ---------------------------------------------------------------- KL estimators

def test_kl_estimators_values_and_gradients():
    ref = torch.tensor([math.log(0.25)])
    logp = torch.tensor([math.log(0.5)], requires_grad=True)
    d = math.log(2.0)                                  # logp - ref
    cases = {
        "k1": (d, 1.0),                                # d, d/dlogp = 1
        "k2": (0.5 * d * d, d),                        # d^2/2, grad d
        "k3": (0.5 - 1.0 + d, 1.0 - 0.5),              # e^{-d} - 1 + d, grad 1 - e^{-d}
    }
    for kind, (value, grad) in cases.items():
        logp.grad = None
        kl = kl_penalty(logp, ref, kind)
        assert kl.shape == logp.shape
        assert kl.item() == pytest.approx(value, abs=1e-6), kind
        kl.sum().backward()
        assert logp.grad.item() == pytest.approx(grad, abs=1e-6), kind


def test_k3_is_nonnegative_zero_at_equality_and_clamped():
    logp = torch.tensor([-1.0, -2.0, -30.0], requires_grad=True)
    ref = torch.tensor([-1.0, -0.5, -5.0])
    kl = kl_penalty(logp, ref, "k3")
    assert kl[0].item() == 0.0
    # ref - logp = 1.5 -> e^1.5 - 1.5 - 1
    assert kl[1].item() == pytest.approx(math.exp(1.5) - 2.5, rel=1e-6)
    assert kl[2].item() == 10.0                         # e^25 clamped to 10
    kl.sum().backward()
    assert logp.grad[2].item() == 0.0                   # no gradient through the clamp
    with pytest.raises(ConfigError, match="kl_kind"):
        kl_penalty(logp, ref, "k4")


# ---------------------------------------------------------------- clipped objective, Eq. (2)

def _one_token(ratio: float, adv: float, **kw):
    logp = torch.tensor([[math.log(ratio)]], requires_grad=True)
    old = torch.zeros(1, 1)
    loss, stats = policy_loss(logp, old, None, torch.tensor([adv]), torch.ones(1, 1), kl_coef=0.0, **kw)
    loss.backward()
    return loss.item(), logp.grad.item(), stats


def test_positive_advantage_clip_region():
    # A = +1, ratio 1.5 > 1 + 0.2: surrogate held at 1.2 -> loss -1.2, no gradient
    loss, grad, stats = _one_token(1.5, 1.0)
    assert loss == pytest.approx(-1.2, abs=1e-6) and grad == 0.0
    assert stats["clip_frac_high"] == 1.0 and stats["clip_frac_low"] == 0.0
    # inside the region: loss = -ratio * A, d/dlogp = -ratio * A
    loss, grad, stats = _one_token(1.1, 1.0)
    assert loss == pytest.approx(-1.1, abs=1e-6) and grad == pytest.approx(-1.1, abs=1e-6)
    assert stats["clip_frac_high"] == 0.0
    # a ratio below 1 - eps is NOT clipped for A > 0 (min picks the unclipped, smaller surrogate)
    loss, grad, _ = _one_token(0.5, 1.0)
    assert loss == pytest.approx(-0.5, abs=1e-6) and grad == pytest.approx(-0.5, abs=1e-6)


def test_negative_advantage_clip_region():
    # A = -1, ratio 0.5 < 0.8: held at 0.8 -> loss 0.8, no gradient
    loss, grad, stats = _one_token(0.5, -1.0)
    assert loss == pytest.approx(0.8, abs=1e-6) and grad == 0.0
    assert stats["clip_frac_low"] == 1.0
    # A = -1, ratio 1.5: not clipped on this side -> loss 1.5, grad 1.5
    loss, grad, _ = _one_token(1.5, -1.0)
    assert loss == pytest.approx(1.5, abs=1e-6) and grad == pytest.approx(1.5, abs=1e-6)


def test_asymmetric_clip_high():
    # ratio 1.25 is clipped with clip_high 0.2 but inside with the release's 0.3
    loss, grad, _ = _one_token(1.25, 2.0, clip_high=0.2)
    assert loss == pytest.approx(-2.4, abs=1e-6) and grad == 0.0
    loss, grad, _ = _one_token(1.25, 2.0, clip_high=0.3)
    assert loss == pytest.approx(-2.5, abs=1e-6) and grad == pytest.approx(-2.5, abs=1e-6)


def test_dual_clip():
    # A = -1, ratio 4: standard clip gives max(4, 1.2) = 4; dual clip c = 3 bounds it at 3
    loss, grad, stats = _one_token(4.0, -1.0, dual_clip=3.0)
    assert loss == pytest.approx(3.0, abs=1e-6) and grad == 0.0 and stats["dual_clip_frac"] == 1.0
    loss, grad, stats = _one_token(2.0, -1.0, dual_clip=3.0)
    assert loss == pytest.approx(2.0, abs=1e-6) and grad == pytest.approx(2.0, abs=1e-6)
    assert stats["dual_clip_frac"] == 0.0
    # positive advantages are untouched by the dual clip
    loss, _, _ = _one_token(4.0, 1.0, dual_clip=3.0)
    assert loss == pytest.approx(-1.2, abs=1e-6)
    with pytest.raises(ConfigError, match="dual_clip"):
        _one_token(1.0, 1.0, dual_clip=0.5)


def test_token_mean_vs_seq_mean():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert masked_mean(x, mask, "token-mean").item() == pytest.approx((1 + 2 + 3 + 4) / 4)
    assert masked_mean(x, mask, "seq-mean").item() == pytest.approx((2 + 4) / 2)
    # the same through policy_loss: ratio 1 everywhere, A = -value -> per-token loss = value
    adv = torch.tensor([-1.0, -2.0])
    zeros = torch.zeros(2, 3)
    tok, _ = policy_loss(zeros, zeros, None, adv, mask, kl_coef=0.0, agg="token-mean")
    seq, _ = policy_loss(zeros, zeros, None, adv, mask, kl_coef=0.0, agg="seq-mean")
    assert tok.item() == pytest.approx((1 + 1 + 1 + 2) / 4)
    assert seq.item() == pytest.approx((1 + 2) / 2)


def test_kl_term_added_with_coefficient_and_padding_ignored():
    logp = torch.tensor([[math.log(0.5), 7.0]], requires_grad=True)   # second token is padding
    old = logp.detach().clone()
    ref = torch.tensor([[math.log(0.25), 0.0]])
    mask = torch.tensor([[1, 0]])
    loss, stats = policy_loss(logp, old, ref, torch.tensor([0.5]), mask, kl_coef=0.1)
    k3 = 0.5 - 1.0 + math.log(2.0)
    # ratio 1 -> surrogate -A = -0.5; plus 0.1 * k3
    assert loss.item() == pytest.approx(-0.5 + 0.1 * k3, abs=1e-6)
    assert stats["kl"] == pytest.approx(k3, abs=1e-6)
    loss.backward()
    # d/dlogp: -A * ratio + 0.1 * (1 - e^{ref - logp}) = -0.5 + 0.1 * 0.5
    assert logp.grad[0, 0].item() == pytest.approx(-0.5 + 0.05, abs=1e-6)
    assert logp.grad[0, 1].item() == 0.0
    with pytest.raises(ConfigError, match="ref_logp"):
        policy_loss(logp, old, None, torch.tensor([0.5]), mask, kl_coef=0.1)


def test_log_ratio_is_clamped():
    logp = torch.tensor([[50.0]], requires_grad=True)
    loss, stats = policy_loss(logp, torch.zeros(1, 1), None, torch.tensor([-1.0]), torch.ones(1, 1),
                              kl_coef=0.0)
    assert math.isfinite(loss.item())
    assert stats["ratio_max"] == pytest.approx(math.exp(20.0), rel=1e-5)
