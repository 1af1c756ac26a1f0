"""GRPO math: advantage estimators (Eq. 1 and variants), KL estimators, the clipped objective
(Eq. 2) and its variants, and truncated importance-sampling weights.

Pure tensor functions with no I/O, no distributed calls and no state, so they can be read and
unit-tested alone. Shapes: N responses (N = B prompts x G samples, ordered group by group),
T response tokens (right-padded, ``mask`` is 1 on real response tokens).

The stage loop (``minicd/train/grpo.py``) composes these: rewards -> ``ADVANTAGES[grpo.advantage]``
(:func:`group_advantages`) -> :func:`policy_loss` per micro-batch, rescaled so the aggregation is
over the global batch. Every variant is a few lines beside the default; the table of variants,
their config keys, equations and papers is docs/grpo_variants.md.
"""

from __future__ import annotations

from typing import Callable

import torch

from minicd.errors import ConfigError

LOG_RATIO_CLAMP = 20.0   # ratio = exp(clamp(logp - old_logp, -20, 20)), as in EasyR1/verl
KL_CLAMP = 10.0          # k3 estimate clamped to [-10, 10], as in EasyR1/verl
TIS_BAND = (0.9, 1.1)    # tis_weights reports the share of tokens whose ratio is outside this band
_KL_KINDS = ("k1", "k2", "k3")
_AGGS = ("token-mean", "seq-mean", "seq-mean-token-sum-norm")
_RATIO_LEVELS = ("token", "sequence")
_LOSSES = ("clip", "cispo")


# ------------------------------------------------------------------ advantage estimators
def _groups(rewards: torch.Tensor, group_size: int, min_size: int) -> torch.Tensor:
    """``[B*G]`` rewards (group by group) -> ``[B, G]`` float32, after checking the shape."""
    if group_size < min_size:
        raise ConfigError(f"grpo.group_size = {group_size}: must be >= {min_size} for this "
                          f"advantage estimator")
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ConfigError(f"rewards of shape {tuple(rewards.shape)} cannot be split into groups of "
                          f"{group_size}; expected a flat [B*G] tensor")
    return rewards.detach().float().view(-1, group_size)


def _zero_flat_groups(r: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    """Exact 0 for groups whose rewards are all equal (no signal); ``[B, G]`` -> ``[B*G]``."""
    flat = r.max(dim=1, keepdim=True).values == r.min(dim=1, keepdim=True).values   # [B, 1]
    return torch.where(flat, torch.zeros_like(adv), adv).view(-1)


def grpo_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """Eq. (1) (the paper's, DeepSeekMath GRPO): A_j = (r_j - mean(r_group)) / (std(r_group) + eps).

    std is the sample std (divide by G - 1, as torch.std and EasyR1). ``rewards`` ``[B*G]`` ordered
    group by group; groups whose rewards are all equal get exactly 0. Returns ``[B*G]`` float32.
    """
    r = _groups(rewards, group_size, 2)                                   # [B, G]
    centered = r - r.mean(dim=1, keepdim=True)                            # [B, G]
    std = r.std(dim=1, keepdim=True, unbiased=True)                       # [B, 1]
    return _zero_flat_groups(r, centered / (std + eps))


def dr_grpo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"): A_j = r_j - mean(r_group),
    no division by the std (which up-weights groups that are almost all right or all wrong).
    ``[B*G]`` -> ``[B*G]`` float32; flat groups exactly 0."""
    r = _groups(rewards, group_size, 1)                                   # [B, G]
    return _zero_flat_groups(r, r - r.mean(dim=1, keepdim=True))


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024, "Back to Basics"; Kool et al. 2019): leave-one-out baseline,
    A_j = r_j - (sum_{k != j} r_k) / (G - 1)  (= G / (G - 1) x (r_j - mean)).
    ``[B*G]`` -> ``[B*G]`` float32; flat groups exactly 0; needs G >= 2."""
    r = _groups(rewards, group_size, 2)                                   # [B, G]
    others = (r.sum(dim=1, keepdim=True) - r) / (group_size - 1)          # [B, G]
    return _zero_flat_groups(r, r - others)


# grpo.advantage -> (rewards [B*G], group_size) -> advantages [B*G]
ADVANTAGES: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "grpo": grpo_advantages,
    "dr_grpo": dr_grpo_advantages,
    "rloo": rloo_advantages,
}


def group_advantages(rewards: torch.Tensor, group_size: int, estimator: str = "grpo"
                     ) -> torch.Tensor:
    """``ADVANTAGES[estimator](rewards, group_size)``: per-group advantages ``[B*G]`` (default: the
    paper's Eq. (1), :func:`grpo_advantages`)."""
    if estimator not in ADVANTAGES:
        raise ConfigError(f"grpo.advantage = {estimator!r}: expected one of "
                          f"{', '.join(ADVANTAGES)}")
    return ADVANTAGES[estimator](rewards, group_size)


# ------------------------------------------------------------------ KL, aggregation, IS weights
def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) from samples of pi_theta (the KL term of Eq. 2).

    With d = logp - ref_logp (log pi_theta - log pi_ref at the sampled token):
    - "k1": d (unbiased, high variance, can be negative);
    - "k2": d^2 / 2;
    - "k3": exp(-d) - 1 + d  (= e^{ref-logp} - (ref-logp) - 1; unbiased, always >= 0),
      clamped to [-10, 10] as in the paper's release ("low_var_kl"). ref - logp is clamped to
      [-20, 20] BEFORE exp (as verl does): without it exp overflows near 89 in float32 and the
      clamp's zero gradient times inf is NaN. Values and gradients inside [-20, 20] are
      unchanged; beyond, the estimate is at its clamp (10) with zero gradient either way.
    Same shape as ``logp``; gradients flow into ``logp`` only if it requires grad.
    """
    if kind not in _KL_KINDS:
        raise ConfigError(f"grpo.kl_kind = {kind!r}: expected one of {', '.join(_KL_KINDS)}")
    d = logp - ref_logp
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d * d
    neg = (-d).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)                  # ref - logp
    return (torch.exp(neg) - neg - 1.0).clamp(min=-KL_CLAMP, max=KL_CLAMP)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, agg: str = "token-mean",
                norm_len: int | None = None) -> torch.Tensor:
    """Aggregate per-token values ``[N, T]`` over response tokens (a 0-dim tensor).

    "token-mean": sum over all real tokens / number of real tokens (long responses weigh more;
    DAPO's token-level loss). "seq-mean": mean over responses (those with at least one real
    token) of each response's token mean (GRPO as in DeepSeekMath). "seq-mean-token-sum-norm":
    Dr. GRPO's constant normaliser, sum over all real tokens / (N x L) with L = ``norm_len``
    (the response budget, rollout.max_new_tokens; default the padded width T), so neither a
    response's length nor the batch's token count rescales its gradient.
    """
    if agg not in _AGGS:
        raise ConfigError(f"grpo.agg = {agg!r}: expected one of {', '.join(_AGGS)}")
    m = mask.to(x.dtype)
    if agg == "token-mean":
        return (x * m).sum() / m.sum().clamp(min=1.0)
    if agg == "seq-mean-token-sum-norm":
        return (x * m).sum() / (x.shape[0] * (norm_len if norm_len is not None else x.shape[1]))
    tokens = m.sum(dim=1)                                                 # [N]
    per_seq = (x * m).sum(dim=1) / tokens.clamp(min=1.0)                  # [N]
    return per_seq.sum() / (tokens > 0).sum().clamp(min=1)


def tis_weights(old_logp: torch.Tensor, rollout_logp: torch.Tensor, cap: float,
                mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Truncated importance sampling for the rollout-engine / trainer mismatch (Yao et al. 2025,
    "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training"; verl rollout_corr,
    TRL vllm_importance_sampling_correction): w_t = min(exp(old_logp_t - rollout_logp_t), C).

    ``old_logp`` (the trainer's) and ``rollout_logp`` (the engine's, for the same sampled tokens)
    ``[N, T]``; ``cap`` = C > 0. Returns (weights ``[N, T]``, detached, to pass to
    :func:`policy_loss` as ``is_weights``; stats as 0-dim tensors over the ``mask``ed tokens:
    ``mismatch_abs_logp`` = mean |old_logp - rollout_logp|, ``mismatch_out_frac`` = share of
    tokens with exp(old_logp - rollout_logp) outside [0.9, 1.1], ``tis_clip_frac`` = share held
    at the cap).
    """
    if not cap > 0:
        raise ConfigError(f"tis cap = {cap!r}: must be > 0 (verl/TRL use 2 to 3)")
    with torch.no_grad():
        d = (old_logp - rollout_logp).float()                             # [N, T]
        ratio = torch.exp(d.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))     # [N, T]
        weights = ratio.clamp(max=cap)
        m = torch.ones_like(d) if mask is None else mask.to(d.dtype)
        n = m.sum().clamp(min=1.0)
        outside = ((ratio < TIS_BAND[0]) | (ratio > TIS_BAND[1])).to(d.dtype)
        stats = {"mismatch_abs_logp": (d.abs() * m).sum() / n,
                 "mismatch_out_frac": (outside * m).sum() / n,
                 "tis_clip_frac": ((ratio > cap).to(d.dtype) * m).sum() / n}
    return weights, stats


# ------------------------------------------------------------------ the objective
def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None,
                advantages: torch.Tensor, mask: torch.Tensor, clip_low: float = 0.2,
                clip_high: float = 0.2, kl_coef: float = 1e-3, kl_kind: str = "k3",
                agg: str = "token-mean", dual_clip: float | None = None, *,
                ratio_level: str = "token", loss: str = "clip",
                is_weights: torch.Tensor | None = None, norm_len: int | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Eq. (2) as a loss to minimise: -(clipped surrogate) + kl_coef * KL, aggregated by ``agg``
    (:func:`masked_mean`; ``norm_len`` is Dr. GRPO's constant L).

    Default (``ratio_level="token"``, ``loss="clip"``), per token: ratio = exp(clamp(logp -
    old_logp, +-20)); surrogate = min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A);
    with ``dual_clip`` = c > 1, tokens with A < 0 are additionally bounded: loss <= -c * A
    (Ye et al. 2020), so a huge ratio on a bad sample cannot dominate.

    Variants:
    - ``ratio_level="sequence"`` (GSPO, Zheng et al. 2025, "Group Sequence Policy Optimization"):
      one ratio per response, s_i = exp(mean_t(logp_t - old_logp_t)) over its real tokens, clipped
      per response; every token of response i carries -min(s_i A_i, clip(s_i) A_i) (so
      d loss_i / d logp_t = -A_i s_i / |y_i| inside the clip, as in TRL's
      importance_sampling_level="sequence"). The paper aggregates per response (agg="seq-mean")
      with a much narrower clip range (3e-4 / 4e-4).
    - ``loss="cispo"`` (CISPO, MiniMax-M1 2025): per token -sg(clip(ratio, 1 - clip_low,
      1 + clip_high)) * A * logp: the clipped importance weight is detached, so clipped tokens
      still get the gradient -clip(ratio) * A instead of none. (Its value is not comparable with
      the clip loss's.) The paper bounds only the top: use a large clip_low.
    - ``is_weights`` ``[N, T]`` (truncated importance sampling, :func:`tis_weights`): each token's
      policy-gradient loss is multiplied by its (detached) weight; the KL term is not (as TRL and
      verl do).

    ``logp/old_logp/ref_logp/mask``: ``[N, T]``; ``advantages``: ``[N]``. ``ref_logp`` may be
    None only when ``kl_coef == 0``. Returns (loss, stats) where stats are detached 0-dim
    tensors (no device sync here; the caller reduces them): pg_loss, kl, clip_frac_low (share
    of tokens with A < 0 held at 1 - clip_low; cispo: any token with ratio below it),
    clip_frac_high (A > 0 held at 1 + clip_high; cispo: any token above it), dual_clip_frac,
    ratio_mean/min/max, approx_kl_old (token mean of k3 of old vs current). pg_loss and kl are
    aggregated like the loss (so with ``seq-mean-token-sum-norm`` they are its terms, sum / (N L),
    not means); the others are token means.
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ConfigError(f"grpo.dual_clip = {dual_clip}: must be > 1 (the release used 3.0) or unset")
    if clip_low < 0 or clip_high < 0:
        raise ConfigError(f"grpo clip range ({clip_low}, {clip_high}) must be non-negative")
    if ref_logp is None and kl_coef != 0:
        raise ConfigError("policy_loss needs ref_logp when kl_coef != 0")
    if ratio_level not in _RATIO_LEVELS:
        raise ConfigError(f"grpo.ratio_level = {ratio_level!r}: expected one of "
                          f"{', '.join(_RATIO_LEVELS)}")
    if loss not in _LOSSES:
        raise ConfigError(f"grpo.loss = {loss!r}: expected one of {', '.join(_LOSSES)}")
    if loss == "cispo" and dual_clip is not None:
        raise ConfigError("grpo.dual_clip applies to grpo.loss = 'clip' only; unset it for cispo")
    adv = advantages.detach().to(logp.dtype).unsqueeze(1)                 # [N, 1]
    if ratio_level == "token":
        log_ratio = (logp - old_logp.detach()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    else:  # GSPO: the mean log-ratio of each response's real tokens, one per row
        diff = torch.where(mask.bool(), logp - old_logp.detach(), 0.0)   # [N, T]
        n_tok = mask.to(logp.dtype).sum(dim=1, keepdim=True).clamp(min=1.0)  # [N, 1]
        seq = (diff.sum(dim=1, keepdim=True) / n_tok).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        log_ratio = seq.expand_as(logp)                                   # [N, T]
    ratio = torch.exp(log_ratio)                                          # [N, T]
    dual_active = torch.zeros_like(ratio, dtype=torch.bool)
    if loss == "clip":
        loss_unclipped = -adv * ratio
        loss_clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
        pg = torch.maximum(loss_unclipped, loss_clipped)                  # [N, T]
        if dual_clip is not None:
            bound = -adv * dual_clip                                      # [N, 1], > 0 where A < 0
            dual_active = (adv < 0) & (pg > bound)
            pg = torch.where(adv < 0, torch.minimum(pg, bound), pg)
    else:  # CISPO: detached clipped weight x A x logp
        weight = ratio.clamp(1.0 - clip_low, 1.0 + clip_high).detach()    # [N, T]
        pg = -adv * weight * logp                                         # [N, T]
    if is_weights is not None:
        pg = pg * is_weights.detach().to(pg.dtype)                        # [N, T]
    per_token = pg
    kl = None
    if kl_coef != 0:
        kl = kl_penalty(logp, ref_logp.detach(), kl_kind)                 # [N, T]
        per_token = pg + kl_coef * kl
    total = masked_mean(per_token, mask, agg, norm_len)

    with torch.no_grad():
        m = mask.bool()
        mf = mask.to(ratio.dtype)
        n = mf.sum().clamp(min=1.0)
        any_token = m.any()
        if loss == "clip":
            low = (adv < 0) & (ratio < 1.0 - clip_low) & m
            high = (adv > 0) & (ratio > 1.0 + clip_high) & m
        else:
            low, high = (ratio < 1.0 - clip_low) & m, (ratio > 1.0 + clip_high) & m
        stats = {
            "pg_loss": masked_mean(pg.detach(), mask, agg, norm_len),
            "kl": (masked_mean(kl.detach(), mask, agg, norm_len) if kl is not None
                   else ratio.new_zeros(())),
            "clip_frac_low": low.sum() / n,
            "clip_frac_high": high.sum() / n,
            "dual_clip_frac": (dual_active & m).sum() / n,
            "ratio_mean": torch.where(any_token, (ratio * mf).sum() / n, 1.0),
            "ratio_min": torch.where(any_token, ratio.masked_fill(~m, float("inf")).amin(), 1.0),
            "ratio_max": torch.where(any_token, ratio.masked_fill(~m, float("-inf")).amax(), 1.0),
            "approx_kl_old": masked_mean(kl_penalty(logp.detach(), old_logp.detach(), "k3"),
                                         mask, "token-mean"),
        }
    return total, stats
