"""PHI: Progressive Hint Injection math (paper Sec. 4.3 and Appendix E "Hint sampling").

Pure functions: hint pools (Eq. 3, 4), the rare-and-hard code priority with clipping, the
temperature-smoothed sampling distribution, and the per-prompt hint draw. The hinted prompt text
lives in ``minicd.prompts``; the round loop in ``minicd.train.phi``.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import numpy as np

from minicd.errors import ConfigError


def hint_pool(gold: Sequence[str], predicted: Iterable[str]) -> list[str]:
    """Eq. (3)/(4): H_i = Y_i minus Y_hat_i, in the gold order (the codes the checkpoint missed)."""
    pred = set(predicted)
    seen: set[str] = set()
    pool = []
    for code in gold:
        if code not in pred and code not in seen:
            pool.append(code)
            seen.add(code)
    return pool


def code_recall(golds: Sequence[Iterable[str]], preds: Sequence[Iterable[str]]) -> dict[str, float]:
    """Per-code recall over a set of examples: |{i: c in Y_i and c in Y_hat_i}| / |{i: c in Y_i}|."""
    if len(golds) != len(preds):
        raise ValueError(f"{len(golds)} gold sets but {len(preds)} predictions")
    hit: dict[str, int] = {}
    tot: dict[str, int] = {}
    for gold, pred in zip(golds, preds):
        p = set(pred)
        for code in set(gold):
            tot[code] = tot.get(code, 0) + 1
            hit[code] = hit.get(code, 0) + (code in p)
    return {c: hit[c] / tot[c] for c in tot}


def _median(values: Sequence[float]) -> float:
    return float(np.median(np.asarray(values, dtype=np.float64)))


def code_weights(freq: Mapping[str, int], recall: Mapping[str, float], floor: float = 0.05,
                 clip_mult: float = 3.0) -> dict[str, float]:
    """Appendix E priority: a_c = 1/sqrt(freq_c) * 1/max(recall_c, floor), clipped at clip_mult x median.

    ``freq``: training-gold frequency per code (codes with frequency <= 0 are skipped);
    ``recall``: latest-round train-set recall per code; a code missing from ``recall`` was never
    evaluated and is treated as recall 0 (priority at the floor). The median is taken over the
    unclipped priorities of all weighted codes.
    """
    if floor <= 0:
        raise ConfigError(f"phi.recall_floor = {floor}: must be > 0")
    if clip_mult <= 0:
        raise ConfigError(f"phi.clip_mult = {clip_mult}: must be > 0")
    raw = {c: 1.0 / math.sqrt(f) / max(float(recall.get(c, 0.0)), floor)
           for c, f in freq.items() if f > 0}
    if not raw:
        return {}
    cap = clip_mult * _median(list(raw.values()))
    return {c: min(a, cap) for c, a in raw.items()}


def hint_probabilities(pool: Sequence[str], weights: Mapping[str, float], tau: float = 3.0) -> dict[str, float]:
    """Appendix E sampling distribution: p(c | H) = w_c^(1/tau) / sum_{c' in H} w_c'^(1/tau).

    These are the first-draw probabilities over the pool. Codes missing from ``weights`` get the
    median of its values (1.0 if ``weights`` is empty).
    """
    if tau <= 0:
        raise ConfigError(f"phi.tau = {tau}: must be > 0")
    if not pool:
        return {}
    fill = _median(list(weights.values())) if weights else 1.0
    smoothed = {c: float(weights.get(c, fill)) ** (1.0 / tau) for c in dict.fromkeys(pool)}
    total = sum(smoothed.values())
    return {c: s / total for c, s in smoothed.items()}


def sample_hints(pool: Sequence[str], weights: Mapping[str, float], rng: np.random.Generator,
                 p_inject: float = 0.5, max_hints: int = 5, tau: float = 3.0) -> list[str]:
    """Appendix E hint draw for one prompt (shared by all G rollouts of its group).

    With probability 1 - p_inject (or an empty pool) no hint: returns []. Otherwise
    k ~ Uniform{1, ..., min(max_hints, |H|)} codes are drawn without replacement, each draw from
    :func:`hint_probabilities` renormalised over the codes not yet drawn. Order = draw order.
    """
    if not 0.0 <= p_inject <= 1.0:
        raise ConfigError(f"phi.p_inject = {p_inject}: must be in [0, 1]")
    if max_hints < 1:
        raise ConfigError(f"phi.max_hints = {max_hints}: must be >= 1")
    probs = hint_probabilities(pool, weights, tau)
    if not probs or rng.random() >= p_inject:
        return []
    codes = list(probs)
    mass = np.array([probs[c] for c in codes], dtype=np.float64)
    k = int(rng.integers(1, min(max_hints, len(codes)) + 1))
    chosen: list[str] = []
    for _ in range(k):
        cdf = np.cumsum(mass)
        j = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
        j = min(j, len(codes) - 1)
        while mass[j] == 0.0:            # guard against landing on a drawn code at a float edge
            j -= 1
        chosen.append(codes[j])
        mass[j] = 0.0
    return chosen
