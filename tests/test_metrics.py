"""Tests for minicd.metrics: sample F1 reward, corpus micro/macro metrics, frequency buckets."""

from __future__ import annotations

import time

import numpy as np
import pytest
from sklearn.metrics import precision_recall_fscore_support

from minicd.metrics import corpus_metrics, fbeta, format_rates, recall_by_frequency, sample_f1
from minicd.parse import parse_codes

# --- sample-level reward -----------------------------------------------------------------------


def test_sample_f1_by_hand():
    # tp = 2, P = 2/3, R = 2/4 -> F1 = 2 * (1/3) / (7/6) = 4/7
    assert sample_f1({"a", "b", "c"}, {"b", "c", "d", "e"}) == pytest.approx(4 / 7)
    assert sample_f1(["a"], ["a"]) == 1.0
    assert sample_f1(["a", "a", "b"], ["a", "b"]) == 1.0  # sequences are sets
    assert sample_f1(("a", "b"), ["b", "c"]) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "pred, gold", [([], ["a"]), (["a"], []), ([], []), (["a"], ["b"]), (set(), {"a", "b"})]
)
def test_sample_f1_zero_cases(pred, gold):
    assert sample_f1(pred, gold) == 0.0
    assert fbeta(pred, gold, 2.0) == 0.0


def test_sample_f1_of_parsed_response():
    gold = {"401.9", "428.0"}
    assert sample_f1(parse_codes("no span at all"), gold) == 0.0
    assert sample_f1(parse_codes("<code>401.9, foo</code>"), gold) == pytest.approx(2 / 3)


def test_fbeta_by_hand():
    pred, gold = {"a", "b", "c"}, {"b", "c", "d", "e"}  # P = 2/3, R = 1/2
    # beta 2: 5 * (1/3) / (4 * 2/3 + 1/2) = (5/3) / (19/6) = 10/19
    assert fbeta(pred, gold, 2.0) == pytest.approx(10 / 19)
    # beta 0.5: 1.25 * (1/3) / (0.25 * 2/3 + 1/2) = (5/12) / (2/3) = 5/8
    assert fbeta(pred, gold, 0.5) == pytest.approx(5 / 8)
    assert fbeta(pred, gold, 1.0) == pytest.approx(sample_f1(pred, gold))
    assert fbeta(pred, gold, 0.0) == pytest.approx(2 / 3)  # precision
    with pytest.raises(ValueError):
        fbeta(pred, gold, -1.0)


# --- corpus metrics ----------------------------------------------------------------------------


def test_corpus_metrics_by_hand():
    golds = [{"a", "b"}, {"b", "c"}, {"a"}]
    preds = [{"a", "x"}, ["b", "c", "d"], []]
    m = corpus_metrics(preds, golds)
    # label space {a, b, c}; x and d ignored.
    # a: tp 1 fn 1; b: tp 1 fn 1; c: tp 1.
    assert (m["tp"], m["fp"], m["fn"]) == (3, 0, 2)
    assert m["n_docs"] == 3 and m["n_labels"] == 3
    assert m["n_pred_ignored"] == 2 and m["n_gold_ignored"] == 0
    assert m["micro_precision"] == pytest.approx(1.0)
    assert m["micro_recall"] == pytest.approx(3 / 5)
    assert m["micro_f1"] == pytest.approx(6 / 8)
    assert m["macro_precision"] == pytest.approx(1.0)
    assert m["macro_recall"] == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    # per-class F1 2/3, 2/3, 1 -> mean 7/9, not the harmonic mean of macro P and R (0.8)
    assert m["macro_f1"] == pytest.approx(7 / 9)


def test_corpus_metrics_label_space_and_zero_division():
    preds = [{"a", "b"}, set()]
    golds = [{"a"}, {"c"}]
    m = corpus_metrics(preds, golds, label_space=["a", "b", "c", "e"], per_class=True)
    # a: tp 1; b: fp 1; c: fn 1; e: nothing (0/0 -> 0 everywhere)
    assert (m["tp"], m["fp"], m["fn"], m["n_labels"]) == (1, 1, 1, 4)
    assert m["micro_precision"] == pytest.approx(0.5)
    assert m["micro_recall"] == pytest.approx(0.5)
    assert m["micro_f1"] == pytest.approx(0.5)
    assert m["macro_precision"] == pytest.approx(0.25)
    assert m["macro_recall"] == pytest.approx(0.25)
    assert m["macro_f1"] == pytest.approx(0.25)
    pc = m["per_class"]
    assert pc["labels"] == ("a", "b", "c", "e")
    np.testing.assert_array_equal(pc["tp"], [1, 0, 0, 0])
    np.testing.assert_array_equal(pc["fp"], [0, 1, 0, 0])
    np.testing.assert_array_equal(pc["fn"], [0, 0, 1, 0])
    np.testing.assert_allclose(pc["precision"], [1, 0, 0, 0])
    np.testing.assert_allclose(pc["recall"], [1, 0, 0, 0])
    np.testing.assert_allclose(pc["f1"], [1, 0, 0, 0])


def test_corpus_metrics_restricted_label_space_ignores_outside_codes():
    m = corpus_metrics([{"b"}], [{"a", "b"}], label_space={"a"})
    assert m["n_pred_ignored"] == 1 and m["n_gold_ignored"] == 1
    assert (m["tp"], m["fp"], m["fn"]) == (0, 0, 1)
    assert m["micro_precision"] == 0.0 and m["micro_recall"] == 0.0 and m["micro_f1"] == 0.0


def test_corpus_metrics_empty():
    m = corpus_metrics([set()], [set()])
    assert m["n_labels"] == 0 and m["n_docs"] == 1
    for key in ["micro_precision", "micro_recall", "micro_f1", "macro_f1", "macro_recall"]:
        assert m[key] == 0.0
    m = corpus_metrics([], [])
    assert m["n_docs"] == 0 and m["micro_f1"] == 0.0
    with pytest.raises(ValueError):
        corpus_metrics([set()], [])


def test_corpus_metrics_accepts_parsed_codes():
    preds = [parse_codes("<code>401.9, 428.0</code>"), parse_codes("nothing")]
    golds = [["401.9"], ["428.0"]]
    m = corpus_metrics(preds, golds)
    # 401.9: tp 1; 428.0: fp 1 (doc 0), fn 1 (doc 1)
    assert (m["tp"], m["fp"], m["fn"]) == (1, 1, 1)
    assert m["macro_f1"] == pytest.approx((1.0 + 0.0) / 2)


def _random_multilabel(rng, n_docs, n_codes, p_gold, p_pred, n_extra):
    codes = [f"C{i:03d}" for i in range(n_codes)]
    extra = [f"X{i}" for i in range(n_extra)]  # codes that never occur in golds
    golds, preds = [], []
    for _ in range(n_docs):
        golds.append({c for c in codes if rng.random() < p_gold})
        preds.append({c for c in codes + extra if rng.random() < p_pred})
    return golds, preds


def _binarize(sets, labels):
    index = {c: j for j, c in enumerate(labels)}
    y = np.zeros((len(sets), len(labels)), dtype=int)
    for i, s in enumerate(sets):
        for c in s:
            if c in index:
                y[i, index[c]] = 1
    return y


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_corpus_metrics_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    golds, preds = _random_multilabel(
        rng, n_docs=150, n_codes=40, p_gold=0.08, p_pred=0.1, n_extra=5
    )
    labels = sorted(set().union(*golds))
    y_true, y_pred = _binarize(golds, labels), _binarize(preds, labels)
    m = corpus_metrics(preds, golds)
    for avg in ["micro", "macro"]:
        p, r, f, _ = precision_recall_fscore_support(
            y_true, y_pred, average=avg, zero_division=0
        )
        assert m[f"{avg}_precision"] == pytest.approx(p)
        assert m[f"{avg}_recall"] == pytest.approx(r)
        assert m[f"{avg}_f1"] == pytest.approx(f)
    outside = sum(len(p - set(labels)) for p in preds)
    assert m["n_pred_ignored"] == outside > 0


def test_corpus_metrics_matches_sklearn_given_label_space():
    rng = np.random.default_rng(7)
    golds, preds = _random_multilabel(
        rng, n_docs=120, n_codes=30, p_gold=0.05, p_pred=0.05, n_extra=3
    )
    # a label space with some rare/absent classes (zero_division cases) and without others
    labels = [f"C{i:03d}" for i in range(0, 30, 2)] + ["X0", "Z99"]
    y_true, y_pred = _binarize(golds, labels), _binarize(preds, labels)
    m = corpus_metrics(preds, golds, label_space=labels, per_class=True)
    for avg in ["micro", "macro"]:
        p, r, f, _ = precision_recall_fscore_support(
            y_true, y_pred, average=avg, zero_division=0
        )
        assert m[f"{avg}_precision"] == pytest.approx(p)
        assert m[f"{avg}_recall"] == pytest.approx(r)
        assert m[f"{avg}_f1"] == pytest.approx(f)
    p, r, f, support = precision_recall_fscore_support(y_true, y_pred, zero_division=0)
    np.testing.assert_allclose(m["per_class"]["f1"], f)
    np.testing.assert_array_equal(m["per_class"]["tp"] + m["per_class"]["fn"], support)


def test_corpus_metrics_scale():
    """20k documents x 7k labels: vectorised scoring finishes in seconds (loose bound)."""
    rng = np.random.default_rng(0)
    n_docs, n_labels, k = 20_000, 7_000, 15
    names = np.array([f"{i // 100:03d}.{i % 100:02d}" for i in range(n_labels)], dtype=object)
    gold_idx = rng.integers(0, n_labels, size=(n_docs, k))
    noise = rng.integers(0, n_labels, size=(n_docs, k))
    pred_idx = np.where(rng.random((n_docs, k)) < 0.5, gold_idx, noise)
    golds = [set(row) for row in names[gold_idx].tolist()]
    preds = [set(row) for row in names[pred_idx].tolist()]
    start = time.perf_counter()
    m = corpus_metrics(preds, golds)
    elapsed = time.perf_counter() - start
    assert m["n_docs"] == n_docs
    # about half of the predictions copy a gold code
    assert 0.4 < m["micro_precision"] < 0.6
    assert elapsed < 30.0


# --- frequency buckets -------------------------------------------------------------------------


def test_recall_by_frequency_by_hand():
    train_freq = {"a": 5, "b": 20, "c": 100, "f": 200, "d": 1000}  # "e" unseen in training
    golds = [{"a", "b", "c", "f"}, {"a", "d", "f"}, {"b", "e", "f"}]
    preds = [{"a", "c"}, {"d"}, {"b", "e"}]
    out = recall_by_frequency(preds, golds, train_freq)
    assert [b["bucket"] for b in out] == ["1-10", "11-50", "51-500", "501+"]
    # 1-10: a found in doc 0, missed in doc 1
    assert (out[0]["n_codes"], out[0]["n_gold"], out[0]["tp"]) == (1, 2, 1)
    assert out[0]["recall"] == pytest.approx(0.5) and out[0]["macro_recall"] == pytest.approx(0.5)
    # 11-50: b missed in doc 0, found in doc 2
    assert (out[1]["n_codes"], out[1]["n_gold"], out[1]["tp"]) == (1, 2, 1)
    # 51-500: c 1/1, f 0/3 -> micro 1/4, macro (1 + 0) / 2
    assert (out[2]["n_codes"], out[2]["n_gold"], out[2]["tp"]) == (2, 4, 1)
    assert out[2]["recall"] == pytest.approx(0.25)
    assert out[2]["macro_recall"] == pytest.approx(0.5)
    # 501+: d 1/1
    assert out[3]["recall"] == pytest.approx(1.0) and out[3]["hi"] is None
    # "e" (frequency 0) is in no bucket
    assert sum(b["n_gold"] for b in out) == 10 - 1


def test_recall_by_frequency_custom_and_empty_buckets():
    out = recall_by_frequency([set()], [{"a"}], {"a": 3}, buckets=((0, 0), (1, 5), (6, 9)))
    assert [b["bucket"] for b in out] == ["0-0", "1-5", "6-9"]
    assert out[1]["n_gold"] == 1 and out[1]["recall"] == 0.0
    assert out[2]["n_codes"] == 0 and out[2]["recall"] == 0.0 and out[2]["macro_recall"] == 0.0


# --- format rates ------------------------------------------------------------------------------


def test_format_rates_by_hand():
    label_space = {"401.9", "999.99"}
    parsed = [
        parse_codes("<code>401.9, 428.0, foo</code>", label_space),  # 428.0 off-label, foo bad
        parse_codes("no span here", label_space),
        parse_codes("<code>401.9, 999.99</code>", label_space),  # 999.99 not an ICD-9 code
    ]
    r = format_rates(parsed, system="icd9")
    assert r["n_responses"] == 3
    assert r["n_no_span"] == 1 and r["no_span_rate"] == pytest.approx(1 / 3)
    assert r["n_malformed_responses"] == 1 and r["malformed_rate"] == pytest.approx(1 / 3)
    assert r["n_malformed_tokens"] == 1
    assert r["n_predicted"] == 4  # 401.9, 428.0 | 401.9, 999.99
    assert r["n_off_label"] == 1 and r["off_label_rate"] == pytest.approx(1 / 4)
    assert r["n_not_in_taxonomy"] == 1 and r["not_in_taxonomy_rate"] == pytest.approx(1 / 4)
    # against ICD-10 none of them is in the taxonomy
    assert format_rates(parsed, system="icd10")["n_not_in_taxonomy"] == 4


def test_format_rates_empty():
    r = format_rates([])
    assert r["n_responses"] == 0 and r["no_span_rate"] == 0.0 and r["off_label_rate"] == 0.0
