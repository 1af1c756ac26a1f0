"""Metrics: the sample-F1 / F-beta reward and corpus-level micro/macro P/R/F1.

Codes are compared as exact strings: pass normalized dotted codes (``minicd.parse`` and
``minicd.codes.format_*`` produce them). A prediction may be given as a
:class:`minicd.parse.ParsedCodes`; its ``codes`` are used.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Union

import numpy as np

from minicd.codes import in_taxonomy
from minicd.parse import ParsedCodes

__all__ = ["corpus_metrics", "fbeta", "format_rates", "recall_by_frequency", "sample_f1"]

CodeSet = Union[Iterable[str], ParsedCodes]


def _as_set(codes: CodeSet) -> set[str]:
    if isinstance(codes, ParsedCodes):
        return set(codes.codes)
    if isinstance(codes, str):
        raise TypeError("expected a collection of codes, got a single string")
    return set(codes)


def fbeta(pred: CodeSet, gold: CodeSet, beta: float) -> float:
    """Sample-level F-beta of a predicted code set against a gold set.

    F_beta = (1 + beta^2) P R / (beta^2 P + R) with P = |pred & gold| / |pred| and
    R = |pred & gold| / |gold|, i.e. (1 + beta^2) tp / (beta^2 |gold| + |pred|).
    0 when either set is empty or they do not overlap. beta = 1 is the paper's reward."""
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    p, g = _as_set(pred), _as_set(gold)
    tp = len(p & g)
    if tp == 0:
        return 0.0
    b2 = beta * beta
    return (1.0 + b2) * tp / (b2 * len(g) + len(p))


def sample_f1(pred: CodeSet, gold: CodeSet) -> float:
    """Sample-level F1 reward r_F1 = 2PR / (P + R) of paper Sec. 4.2 (the unnumbered reward
    equation): P = |pred & gold| / |pred|, R = |pred & gold| / |gold|. 0 for an empty prediction
    (no span, malformed response), an empty gold set or no overlap."""
    return fbeta(pred, gold, 1.0)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.zeros(np.broadcast(num, den).shape, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _pair_keys(sets: Sequence[CodeSet], index: Mapping[str, int]) -> tuple[np.ndarray, int]:
    """Unique keys doc * L + label of (doc, label) pairs inside the label space, and the number
    of codes outside it (after per-document deduplication)."""
    n_labels = len(index)
    keys: list[int] = []
    outside = 0
    for d, codes in enumerate(sets):
        base = d * n_labels
        for code in _as_set(codes):
            j = index.get(code)
            if j is None:
                outside += 1
            else:
                keys.append(base + j)
    return np.asarray(keys, dtype=np.int64), outside


def corpus_metrics(
    preds: Sequence[CodeSet],
    golds: Sequence[CodeSet],
    label_space: Iterable[str] | None = None,
    *,
    per_class: bool = False,
) -> dict[str, Any]:
    """Corpus-level micro and macro precision / recall / F1 (paper Sec. 5.1 and Appendix G).

    Label space: codes present in ``golds`` by default (Edin et al.'s protocol); predictions
    outside it are ignored, for micro too, and counted in ``n_pred_ignored`` (gold codes
    outside a user-given label space likewise in ``n_gold_ignored``). A sequence label space
    keeps its order (duplicates dropped), other iterables are sorted.

    Micro: P = TP / (TP + FP), R = TP / (TP + FN), F1 = 2 TP / (2 TP + FP + FN), counts pooled
    over the corpus. Macro: arithmetic mean over the label space of per-class P, R and
    F1 = tp / (tp + 0.5 (fp + fn)) -- not the harmonic mean of macro P and R. Every 0/0 is 0.

    Returns floats ``micro_precision micro_recall micro_f1 macro_precision macro_recall
    macro_f1`` in [0, 1] and ints ``tp fp fn n_docs n_labels n_pred_ignored n_gold_ignored``;
    with ``per_class=True`` also ``per_class``: a dict of ``labels`` (tuple) and arrays
    ``tp fp fn precision recall f1`` aligned with it.
    """
    if len(preds) != len(golds):
        raise ValueError(f"{len(preds)} predictions but {len(golds)} gold sets")
    if label_space is None:
        labels = sorted(set().union(*(_as_set(g) for g in golds))) if len(golds) else []
    elif isinstance(label_space, Sequence) and not isinstance(label_space, str):
        labels = list(dict.fromkeys(label_space))
    else:
        labels = sorted(set(label_space))
    index = {code: j for j, code in enumerate(labels)}
    n_labels = len(labels)

    pred_keys, n_pred_ignored = _pair_keys(preds, index)  # [n pred pairs]
    gold_keys, n_gold_ignored = _pair_keys(golds, index)  # [n gold pairs]
    tp_keys = np.intersect1d(pred_keys, gold_keys, assume_unique=True)
    if n_labels:
        tp = np.bincount(tp_keys % n_labels, minlength=n_labels)  # [L]
        fp = np.bincount(pred_keys % n_labels, minlength=n_labels) - tp  # [L]
        fn = np.bincount(gold_keys % n_labels, minlength=n_labels) - tp  # [L]
    else:
        tp = fp = fn = np.zeros(0, dtype=np.int64)

    TP, FP, FN = int(tp.sum()), int(fp.sum()), int(fn.sum())
    precision = _safe_div(tp, tp + fp)  # [L]
    recall = _safe_div(tp, tp + fn)  # [L]
    f1 = _safe_div(tp, tp + 0.5 * (fp + fn))  # [L]
    mean = (lambda a: float(a.mean())) if n_labels else (lambda a: 0.0)
    out: dict[str, Any] = {
        "micro_precision": float(_safe_div(TP, TP + FP)),
        "micro_recall": float(_safe_div(TP, TP + FN)),
        "micro_f1": float(_safe_div(2 * TP, 2 * TP + FP + FN)),
        "macro_precision": mean(precision),
        "macro_recall": mean(recall),
        "macro_f1": mean(f1),
        "tp": TP,
        "fp": FP,
        "fn": FN,
        "n_docs": len(golds),
        "n_labels": n_labels,
        "n_pred_ignored": n_pred_ignored,
        "n_gold_ignored": n_gold_ignored,
    }
    if per_class:
        out["per_class"] = {
            "labels": tuple(labels),
            "tp": tp,
            "fp": fp,
            "fn": fn,
            "precision": precision,
            "recall": recall,
            "f1": f1,
        }
    return out


def _bucket_label(lo: int, hi: int | None) -> str:
    return f"{lo}+" if hi is None else f"{lo}-{hi}"


def recall_by_frequency(
    preds: Sequence[CodeSet],
    golds: Sequence[CodeSet],
    train_freq: Mapping[str, int],
    buckets: Sequence[tuple[int, int | None]] = ((1, 10), (11, 50), (51, 500), (501, None)),
) -> list[dict[str, Any]]:
    """Recall of gold codes grouped by their training frequency (rare-code analysis).

    A gold code c falls in bucket (lo, hi) when lo <= train_freq.get(c, 0) <= hi (hi None = no
    upper bound); codes in no bucket (e.g. unseen in training with the default buckets) are not
    counted. Per bucket: ``bucket`` label ("1-10", "501+"), ``lo``, ``hi``, ``n_codes``
    (distinct gold codes of the bucket in ``golds``), ``n_gold`` (gold occurrences), ``tp``
    (occurrences predicted), ``recall`` = tp / n_gold (micro over occurrences) and
    ``macro_recall`` (mean over the bucket's codes of per-code recall); 0 for empty buckets.
    """
    if len(preds) != len(golds):
        raise ValueError(f"{len(preds)} predictions but {len(golds)} gold sets")
    hits: dict[str, list[int]] = {}  # code -> [gold occurrences, predicted occurrences]
    for pred, gold in zip(preds, golds):
        p = _as_set(pred)
        for code in _as_set(gold):
            h = hits.setdefault(code, [0, 0])
            h[0] += 1
            h[1] += code in p
    out = []
    for lo, hi in buckets:
        per_code = [
            h
            for code, h in hits.items()
            if lo <= train_freq.get(code, 0) and (hi is None or train_freq.get(code, 0) <= hi)
        ]
        n_gold = sum(h[0] for h in per_code)
        tp = sum(h[1] for h in per_code)
        out.append(
            {
                "bucket": _bucket_label(lo, hi),
                "lo": lo,
                "hi": hi,
                "n_codes": len(per_code),
                "n_gold": n_gold,
                "tp": tp,
                "recall": tp / n_gold if n_gold else 0.0,
                "macro_recall": (
                    sum(h[1] / h[0] for h in per_code) / len(per_code) if per_code else 0.0
                ),
            }
        )
    return out


def format_rates(parsed: Sequence[ParsedCodes], system: str | None = None) -> dict[str, Any]:
    """Output-format health of parsed responses.

    Per response (denominator ``n_responses``):
      ``no_span_rate``: responses without a complete ``<code>...</code>`` span;
      ``malformed_rate``: responses whose span holds >= 1 malformed (not well-formed) token.
    Per predicted code (denominator ``n_predicted`` = well-formed codes summed over responses,
    inside plus outside the label space, after per-response deduplication):
      ``off_label_rate``: codes outside the label space given to the parser;
      ``not_in_taxonomy_rate``: codes absent from the packaged CMS tables of ``system``
      (``minicd.codes.in_taxonomy``; None = either system). The FY2024 ICD-10-CM list lacks
      retired header codes, which therefore count as outside the taxonomy.
    Counts: ``n_responses n_no_span n_malformed_responses n_malformed_tokens n_predicted
    n_off_label n_not_in_taxonomy``. Rates are 0 when their denominator is 0.
    """
    n = len(parsed)
    n_no_span = sum(not p.has_span for p in parsed)
    n_malformed_responses = sum(bool(p.malformed) for p in parsed)
    n_malformed_tokens = sum(len(p.malformed) for p in parsed)
    n_off_label = sum(len(p.off_label) for p in parsed)
    n_predicted = sum(len(p.codes) for p in parsed) + n_off_label
    n_not_in_taxonomy = sum(
        not in_taxonomy(c, system) for p in parsed for c in (*p.codes, *p.off_label)
    )
    return {
        "n_responses": n,
        "n_no_span": n_no_span,
        "n_malformed_responses": n_malformed_responses,
        "n_malformed_tokens": n_malformed_tokens,
        "n_predicted": n_predicted,
        "n_off_label": n_off_label,
        "n_not_in_taxonomy": n_not_in_taxonomy,
        "no_span_rate": n_no_span / n if n else 0.0,
        "malformed_rate": n_malformed_responses / n if n else 0.0,
        "off_label_rate": n_off_label / n_predicted if n_predicted else 0.0,
        "not_in_taxonomy_rate": n_not_in_taxonomy / n_predicted if n_predicted else 0.0,
    }
