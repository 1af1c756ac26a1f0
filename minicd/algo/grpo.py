"""GRPO math: group advantages (Eq. 1), KL estimators and the clipped objective (Eq. 2).

Pure tensor functions with no I/O, no distributed calls and no state, so they can be read and
unit-tested alone. Shapes: N responses (N = B prompts x G samples, ordered group by group),
T response tokens (right-padded, ``mask`` is 1 on real response tokens).

The stage loop (``minicd/train/grpo.py``) composes these: rewards -> :func:`group_advantages`
-> :func:`policy_loss` per micro-batch, rescaled so the token mean is over the global batch.
"""

from __future__ import annotations

import torch

from minicd.errors import ConfigError

LOG_RATIO_CLAMP = 20.0   # ratio = exp(clamp(logp - old_logp, -20, 20)), as in EasyR1/verl
KL_CLAMP = 10.0          # k3 estimate clamped to [-10, 10], as in EasyR1/verl
_KL_KINDS = ("k1", "k2", "k3")
_AGGS = ("token-mean", "seq-mean")


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6,
                     unbiased: bool = True, scale: str = "std") -> torch.Tensor:
    """Eq. (1): A_j = (r_j - mean(r_group)) / (std(r_group) + eps), per group of G samples.

    ``rewards`` is ``[B*G]`` ordered group by group (the G samples of prompt 0, then prompt 1...).
    ``unbiased`` uses the sample std (divide by G-1, as torch.std and EasyR1); False divides by G.
    ``scale="none"`` gives the Dr.GRPO mean-only advantage r - mean. Groups whose rewards are all
    equal get exactly 0 (they carry no learning signal). Returns ``[B*G]`` float32.
    """
    if group_size < 1:
        raise ConfigError(f"grpo.group_size = {group_size}: must be >= 1")
    if scale not in ("std", "none"):
        raise ConfigError(f"advantage scale {scale!r}: expected 'std' or 'none'")
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ConfigError(f"rewards of shape {tuple(rewards.shape)} cannot be split into groups of "
                          f"{group_size}; expected a flat [B*G] tensor")
    if scale == "std" and unbiased and group_size < 2:
        raise ConfigError("grpo.group_size = 1 with an unbiased std is undefined; use G >= 2")
    r = rewards.detach().float().view(-1, group_size)                    # [B, G]
    centered = r - r.mean(dim=1, keepdim=True)                           # [B, G]
    if scale == "std":
        std = r.std(dim=1, keepdim=True, unbiased=unbiased)              # [B, 1]
        adv = centered / (std + eps)
    else:
        adv = centered
    constant = (r.max(dim=1, keepdim=True).values == r.min(dim=1, keepdim=True).values)
    adv = torch.where(constant, torch.zeros_like(adv), adv)              # exact 0 for flat groups
    return adv.view(-1)


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) from samples of pi_theta (the KL term of Eq. 2).

    With d = logp - ref_logp (log pi_theta - log pi_ref at the sampled token):
    - "k1": d (unbiased, high variance, can be negative);
    - "k2": d^2 / 2;
    - "k3": exp(-d) - 1 + d  (= e^{ref-logp} - (ref-logp) - 1; unbiased, always >= 0),
      clamped to [-10, 10] as in the paper's release ("low_var_kl").
    Same shape as ``logp``; gradients flow into ``logp`` only if it requires grad.
    """
    if kind not in _KL_KINDS:
        raise ConfigError(f"grpo.kl_kind = {kind!r}: expected one of {', '.join(_KL_KINDS)}")
    d = logp - ref_logp
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d * d
    neg = -d                                                              # ref - logp
    return (torch.exp(neg) - neg - 1.0).clamp(min=-KL_CLAMP, max=KL_CLAMP)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, agg: str = "token-mean") -> torch.Tensor:
    """Aggregate per-token values ``[N, T]`` over response tokens.

    "token-mean": sum over all real tokens / number of real tokens (long responses weigh more).
    "seq-mean": mean over responses of each response's token mean.
    """
    if agg not in _AGGS:
        raise ConfigError(f"grpo.agg = {agg!r}: expected one of {', '.join(_AGGS)}")
    m = mask.to(x.dtype)
    if agg == "token-mean":
        return (x * m).sum() / m.sum().clamp(min=1.0)
    per_seq = (x * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)          # [N]
    return per_seq.mean()


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None,
                advantages: torch.Tensor, mask: torch.Tensor, clip_low: float = 0.2,
                clip_high: float = 0.2, kl_coef: float = 1e-3, kl_kind: str = "k3",
                agg: str = "token-mean", dual_clip: float | None = None
                ) -> tuple[torch.Tensor, dict[str, float]]:
    """Eq. (2) as a loss to minimise: -(clipped surrogate) + kl_coef * KL, aggregated.

    Per token: ratio = exp(clamp(logp - old_logp, +-20)); surrogate = min(ratio * A,
    clip(ratio, 1 - clip_low, 1 + clip_high) * A); with ``dual_clip`` = c > 1, tokens with A < 0
    are additionally bounded: loss <= -c * A (Ye et al. 2020), so a huge ratio on a bad sample
    cannot dominate. ``logp/old_logp/ref_logp/mask``: ``[N, T]``; ``advantages``: ``[N]``.
    ``ref_logp`` may be None only when ``kl_coef == 0``.

    Returns (loss, stats) where stats holds detached floats: pg_loss, kl, clip_frac_low
    (share of tokens with A < 0 held at 1 - clip_low), clip_frac_high (A > 0 held at 1 + clip_high),
    dual_clip_frac, ratio_mean/min/max, approx_kl_old (k3 of old vs current).
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ConfigError(f"grpo.dual_clip = {dual_clip}: must be > 1 (the release used 3.0) or unset")
    if clip_low < 0 or clip_high < 0:
        raise ConfigError(f"grpo clip range ({clip_low}, {clip_high}) must be non-negative")
    if ref_logp is None and kl_coef != 0:
        raise ConfigError("policy_loss needs ref_logp when kl_coef != 0")
    adv = advantages.detach().to(logp.dtype).unsqueeze(1)                 # [N, 1]
    log_ratio = (logp - old_logp.detach()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)                                          # [N, T]
    loss_unclipped = -adv * ratio
    loss_clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    pg = torch.maximum(loss_unclipped, loss_clipped)                      # [N, T]
    dual_active = torch.zeros_like(pg, dtype=torch.bool)
    if dual_clip is not None:
        bound = -adv * dual_clip                                          # [N, 1], > 0 where A < 0
        dual_active = (adv < 0) & (pg > bound)
        pg = torch.where(adv < 0, torch.minimum(pg, bound), pg)
    per_token = pg
    kl = None
    if kl_coef != 0:
        kl = kl_penalty(logp, ref_logp.detach(), kl_kind)                 # [N, T]
        per_token = pg + kl_coef * kl
    loss = masked_mean(per_token, mask, agg)

    with torch.no_grad():
        m = mask.bool()
        n = m.sum().clamp(min=1).float()
        low = (adv < 0) & (ratio < 1.0 - clip_low) & m
        high = (adv > 0) & (ratio > 1.0 + clip_high) & m
        r = ratio[m] if m.any() else ratio.new_ones(1)
        stats = {
            "pg_loss": masked_mean(pg.detach(), mask, agg).item(),
            "kl": masked_mean(kl.detach(), mask, agg).item() if kl is not None else 0.0,
            "clip_frac_low": (low.sum() / n).item(),
            "clip_frac_high": (high.sum() / n).item(),
            "dual_clip_frac": ((dual_active & m).sum() / n).item(),
            "ratio_mean": r.mean().item(),
            "ratio_min": r.min().item(),
            "ratio_max": r.max().item(),
            "approx_kl_old": masked_mean(kl_penalty(logp.detach(), old_logp.detach(), "k3"),
                                         mask, agg).item(),
        }
    return loss, stats
