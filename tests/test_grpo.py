"""GRPO math against values derived by hand in each test."""

import math

import pytest
import torch

from minicd import ConfigError
from minicd.algo.grpo import (ADVANTAGES, group_advantages, kl_penalty, masked_mean, policy_loss,
                              tis_weights)


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


# ---------------------------------------------------------------- the GRPO family (issue 16)

def test_rloo_and_dr_grpo_on_a_group_of_three():
    r = torch.tensor([1.0, 0.0, 0.5, 0.2, 0.2, 0.8])  # two groups of G = 3
    # RLOO: r_j - mean of the other two. Group 1: 1 - 0.25, 0 - 0.75, 0.5 - 0.5;
    # group 2: 0.2 - 0.5, 0.2 - 0.5, 0.8 - 0.2
    torch.testing.assert_close(ADVANTAGES["rloo"](r, 3),
                               torch.tensor([0.75, -0.75, 0.0, -0.3, -0.3, 0.6]), rtol=0, atol=1e-6)
    # Dr. GRPO: r - mean (means 0.5 and 0.4)
    torch.testing.assert_close(ADVANTAGES["dr_grpo"](r, 3),
                               torch.tensor([0.5, -0.5, 0.0, -0.2, -0.2, 0.4]), rtol=0, atol=1e-6)
    # GRPO: unbiased std of group 1 = sqrt((0.25 + 0.25 + 0) / 2) = 0.5; of group 2
    # sqrt((0.04 + 0.04 + 0.16) / 2) = sqrt(0.12)
    s2 = math.sqrt(0.12)
    torch.testing.assert_close(ADVANTAGES["grpo"](r, 3),
                               torch.tensor([0.5 / (0.5 + 1e-6), -0.5 / (0.5 + 1e-6), 0.0,
                                             -0.2 / (s2 + 1e-6), -0.2 / (s2 + 1e-6),
                                             0.4 / (s2 + 1e-6)]), rtol=0, atol=1e-6)
    # advantages carry no gradient into the rewards
    assert not ADVANTAGES["rloo"](r.clone().requires_grad_(), 3).requires_grad


def _snapshot():
    """minicd/algo/grpo.py as it was on main before issue 16 (tests/fixtures)."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).parent / "fixtures" / "grpo_main_0034217.py"
    spec = importlib.util.spec_from_file_location("grpo_main_0034217", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fixed_batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    n, t = 6, 7
    logp = -torch.rand(n, t, generator=gen) * 3.0                        # [N, T]
    old = logp + torch.randn(n, t, generator=gen) * 0.3                  # ratios far from 1: clips
    ref = logp + torch.randn(n, t, generator=gen) * 0.5
    lengths = [7, 3, 5, 1, 6, 4]
    mask = torch.tensor([[1.0] * k + [0.0] * (t - k) for k in lengths])  # [N, T]
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.2, 0.2, 0.9])
    return logp, old, ref, mask, rewards


@pytest.mark.parametrize("kw", [
    {},                                                                  # the defaults
    {"clip_high": 0.3, "kl_coef": 1e-2, "dual_clip": 3.0},               # the release's
    {"agg": "seq-mean", "kl_kind": "k2"},
])
def test_default_config_is_exactly_the_loss_before_issue_16(kw):
    old_module = _snapshot()
    logp0, old, ref, mask, rewards = _fixed_batch()
    adv = group_advantages(rewards, 3)
    assert torch.equal(adv, old_module.group_advantages(rewards, 3))
    results = []
    for fn in (policy_loss, old_module.policy_loss):
        logp = logp0.clone().requires_grad_()
        loss, stats = fn(logp, old, ref, adv, mask, **kw)
        loss.backward()
        results.append((loss.detach(), logp.grad, stats))
    (new_loss, new_grad, new_stats), (old_loss, old_grad, old_stats) = results
    assert torch.equal(new_loss, old_loss) and torch.equal(new_grad, old_grad)
    assert new_grad.abs().sum() > 0 and old_stats["clip_frac_low"] + old_stats["clip_frac_high"] > 0
    assert set(new_stats) == set(old_stats)
    # approx_kl_old is a token mean now whatever the aggregation (it was aggregated like the loss)
    old_stats["approx_kl_old"] = old_module.masked_mean(
        old_module.kl_penalty(logp0, old, "k3"), mask, "token-mean").item()
    for key, value in new_stats.items():   # 0-dim tensors now, floats before
        assert isinstance(value, torch.Tensor) and value.dim() == 0 and not value.requires_grad
        assert value.item() == pytest.approx(old_stats[key], rel=1e-6, abs=1e-7), key


def test_k3_with_extreme_log_ratios_has_finite_loss_and_gradient():
    # ref - logp = 95 (exp overflows float32 at ~89) and -100; the third token is ordinary
    logp0 = torch.tensor([[-100.0, 0.0, math.log(0.5)]])
    ref = torch.tensor([[-5.0, -100.0, math.log(0.25)]])
    mask, adv = torch.ones(1, 3), torch.tensor([0.0])
    logp = logp0.clone().requires_grad_()
    loss, stats = policy_loss(logp, logp.detach(), ref, adv, mask, kl_coef=0.1)
    loss.backward()
    k3 = 0.5 - 1.0 + math.log(2.0)
    # both extremes sit at the clamp (10) with no gradient; the ordinary token as by hand
    assert loss.item() == pytest.approx(0.1 * (10 + 10 + k3) / 3, abs=1e-6)
    assert torch.isfinite(logp.grad).all()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.0, 0.1 * 0.5 / 3]]), rtol=0,
                               atol=1e-7)
    assert stats["kl"].item() == pytest.approx((20 + k3) / 3, abs=1e-5)
    # the formula before issue 16 gave a NaN gradient here (0 x inf through the clamp)
    logp = logp0.clone().requires_grad_()
    _snapshot().policy_loss(logp, logp.detach(), ref, adv, mask, kl_coef=0.1)[0].backward()
    assert torch.isnan(logp.grad).any()


def test_gspo_sequence_ratio_and_clip_on_two_responses_of_different_lengths():
    # response 0: 2 tokens, logp - old = 0.1, 0.3 -> mean 0.2, s0 = e^0.2 = 1.2214 > 1.2: A0 = 1
    #   is clipped, every token carries -1.2, no gradient. Its padding holds garbage (50).
    # response 1: 3 tokens, logp - old = -0.3, 0, 0.15 -> mean -0.05, s1 = e^-0.05 inside the
    #   range; A1 = -2: each token carries 2 s1.
    old = torch.tensor([[-1.0, -2.0, 0.0], [-1.0, -1.5, -0.5]])
    logp0 = old + torch.tensor([[0.1, 0.3, 50.0], [-0.3, 0.0, 0.15]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    adv = torch.tensor([1.0, -2.0])
    s0, s1 = math.exp(0.2), math.exp(-0.05)
    logp = logp0.clone().requires_grad_()
    loss, stats = policy_loss(logp, old, None, adv, mask, kl_coef=0.0, ratio_level="sequence")
    loss.backward()
    # token-mean over 5 tokens: (2 x -1.2 + 3 x 2 s1) / 5; d/dlogp_t (row 1) = 3 x 2 s1 / 3 / 5
    assert loss.item() == pytest.approx((2 * -1.2 + 3 * 2 * s1) / 5, abs=1e-6)
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.0, 0.0], [2 * s1 / 5] * 3]),
                               rtol=0, atol=1e-6)
    assert stats["ratio_max"].item() == pytest.approx(s0, abs=1e-6)
    assert stats["ratio_min"].item() == pytest.approx(s1, abs=1e-6)
    assert stats["clip_frac_high"].item() == pytest.approx(2 / 5)   # response 0's two tokens
    # per response (the GSPO paper's aggregation): (-1.2 + 2 s1) / 2; row-1 gradient s1 / 3
    logp = logp0.clone().requires_grad_()
    loss, _ = policy_loss(logp, old, None, adv, mask, kl_coef=0.0, ratio_level="sequence",
                          agg="seq-mean")
    loss.backward()
    assert loss.item() == pytest.approx((-1.2 + 2 * s1) / 2, abs=1e-6)
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.0, 0.0], [s1 / 3] * 3]),
                               rtol=0, atol=1e-6)
    # the token-level ratio of the same batch differs (token 2 of response 0 has e^0.3 > 1.2)
    tok, _ = policy_loss(logp0, old, None, adv, mask, kl_coef=0.0)
    assert tok.item() != pytest.approx(loss.item(), abs=1e-3)
    with pytest.raises(ConfigError, match="ratio_level"):
        policy_loss(logp0, old, None, adv, mask, kl_coef=0.0, ratio_level="group")


def _cispo_token(ratio: float, adv: float, old_p: float = 0.5):
    old = torch.tensor([[math.log(old_p)]])
    logp = torch.tensor([[math.log(old_p * ratio)]], requires_grad=True)
    loss, stats = policy_loss(logp, old, None, torch.tensor([adv]), torch.ones(1, 1),
                              kl_coef=0.0, loss="cispo")
    loss.backward()
    return loss.item(), logp.grad.item(), stats, math.log(old_p * ratio)


def test_cispo_gradient_inside_and_outside_the_clip():
    # inside [0.8, 1.2]: loss = -sg(1.1) A logp, gradient -1.1 A (= the clip loss's gradient)
    loss, grad, stats, lp = _cispo_token(1.1, 1.0)
    assert loss == pytest.approx(-1.1 * lp, abs=1e-6) and grad == pytest.approx(-1.1, abs=1e-6)
    assert stats["clip_frac_high"] == 0.0
    # above: the weight is held at 1.2 but the gradient survives (-1.2 A; the clip loss gives 0)
    loss, grad, stats, lp = _cispo_token(1.5, 1.0)
    assert loss == pytest.approx(-1.2 * lp, abs=1e-6) and grad == pytest.approx(-1.2, abs=1e-6)
    assert stats["clip_frac_high"] == 1.0
    _, clip_grad, _ = _one_token(1.5, 1.0)
    assert clip_grad == 0.0
    # below with A = -1: weight 0.8, gradient +0.8
    loss, grad, stats, lp = _cispo_token(0.5, -1.0)
    assert loss == pytest.approx(0.8 * lp, abs=1e-6) and grad == pytest.approx(0.8, abs=1e-6)
    assert stats["clip_frac_low"] == 1.0
    # CISPO bounds every token whatever the advantage's sign: ratio 1.5 with A = -1 -> weight 1.2
    _, grad, _, _ = _cispo_token(1.5, -1.0)
    assert grad == pytest.approx(1.2, abs=1e-6)
    with pytest.raises(ConfigError, match="dual_clip"):
        policy_loss(torch.zeros(1, 1), torch.zeros(1, 1), None, torch.tensor([1.0]),
                    torch.ones(1, 1), kl_coef=0.0, loss="cispo", dual_clip=3.0)
    with pytest.raises(ConfigError, match="grpo.loss"):
        policy_loss(torch.zeros(1, 1), torch.zeros(1, 1), None, torch.tensor([1.0]),
                    torch.ones(1, 1), kl_coef=0.0, loss="ppo")


def test_tis_weights_at_the_cap_and_mismatch_stats():
    # old - rollout = log 2, log 4, 0, -log 2, log 1.05, and a padded token (log 100) left out
    d = torch.tensor([[math.log(2.0), math.log(4.0), 0.0], [-math.log(2.0), math.log(1.05),
                                                          math.log(100.0)]])
    rollout = torch.full((2, 3), -1.0)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    w, stats = tis_weights(rollout + d, rollout, cap=3.0, mask=mask)
    torch.testing.assert_close(w, torch.tensor([[2.0, 3.0, 1.0], [0.5, 1.05, 3.0]]), rtol=0,
                               atol=1e-6)
    assert stats["mismatch_abs_logp"].item() == pytest.approx(
        (math.log(2) + math.log(4) + 0 + math.log(2) + math.log(1.05)) / 5, abs=1e-6)
    assert stats["mismatch_out_frac"].item() == pytest.approx(3 / 5)   # 2, 4 and 0.5
    assert stats["tis_clip_frac"].item() == pytest.approx(1 / 5)       # 4 -> 3
    with pytest.raises(ConfigError, match="cap"):
        tis_weights(rollout, rollout, cap=0.0)
    # policy_loss multiplies each token's policy-gradient loss (not the KL) by its weight:
    # ratio 1, A = 1 -> per token -w; token-mean over 5; gradient -w / 5 (+ the KL's)
    logp = torch.full((2, 3), math.log(0.5), requires_grad=True)
    ref = torch.full((2, 3), math.log(0.25))
    loss, stats = policy_loss(logp, logp.detach(), ref, torch.tensor([1.0, 1.0]), mask,
                              kl_coef=0.1, is_weights=w)
    loss.backward()
    k3, k3_grad = 0.5 - 1.0 + math.log(2.0), 0.5
    assert loss.item() == pytest.approx(-(2 + 3 + 1 + 0.5 + 1.05) / 5 + 0.1 * k3, abs=1e-6)
    expected = (-w + 0.1 * k3_grad) / 5 * mask
    torch.testing.assert_close(logp.grad, expected, rtol=0, atol=1e-6)
    assert stats["kl"].item() == pytest.approx(k3, abs=1e-6)


def test_dr_grpo_constant_normaliser():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    agg = "seq-mean-token-sum-norm"
    # sum of real tokens / (N x L): L = the response budget (5), or the padded width (3)
    assert masked_mean(x, mask, agg, norm_len=5).item() == pytest.approx(10 / (2 * 5))
    assert masked_mean(x, mask, agg).item() == pytest.approx(10 / (2 * 3))
    # through policy_loss: ratio 1, per-token loss -A_i; every real token's gradient -A_i / (N L)
    logp = torch.zeros(2, 3, requires_grad=True)
    adv = torch.tensor([-1.0, -2.0])
    loss, _ = policy_loss(logp, logp.detach(), None, adv, mask, kl_coef=0.0, agg=agg, norm_len=5)
    loss.backward()
    assert loss.item() == pytest.approx((3 * 1 + 1 * 2) / 10)
    torch.testing.assert_close(logp.grad, torch.tensor([[0.1, 0.1, 0.1], [0.2, 0.0, 0.0]]),
                               rtol=0, atol=1e-7)
    # unlike token-mean, a response's gradient does not shrink when another one grows longer
    longer = torch.tensor([[1, 1, 1], [1, 1, 1]])
    logp.grad = None
    policy_loss(logp, logp.detach(), None, adv, longer, kl_coef=0.0, agg=agg,
                norm_len=5)[0].backward()
    assert logp.grad[0, 0].item() == pytest.approx(0.1)
    with pytest.raises(ConfigError, match="grpo.agg"):
        masked_mean(x, mask, "sum")


def test_seq_mean_leaves_out_rows_without_tokens():
    # a row whose tokens are all masked (grpo.mask_truncated) is not a response of the mean
    x = torch.tensor([[1.0, 2.0], [5.0, 5.0], [4.0, 0.0]])
    mask = torch.tensor([[1, 1], [0, 0], [1, 0]])
    assert masked_mean(x, mask, "seq-mean").item() == pytest.approx((1.5 + 4.0) / 2)
