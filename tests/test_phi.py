"""PHI math against hand-derived values and seeded empirical checks."""

import math

import numpy as np
import pytest

from minicd import ConfigError
from minicd.algo.phi import code_recall, code_weights, hint_pool, hint_probabilities, sample_hints


def test_hint_pool_is_gold_minus_predicted_in_gold_order():
    assert hint_pool(["401.9", "428.0", "584.9"], ["428.0", "999.9"]) == ["401.9", "584.9"]
    assert hint_pool(["401.9"], ["401.9"]) == []


def test_code_recall_by_hand():
    golds = [["a", "b"], ["a"], ["b", "c"]]
    preds = [["a"], [], ["b", "x"]]
    # a: 1 of 2; b: missed in doc 0, found in doc 2; c: missed
    assert code_recall(golds, preds) == {"a": 0.5, "b": 0.5, "c": 0.0}


def test_code_weights_small_table():
    freq = {"a": 100, "b": 25, "c": 4, "d": 1}
    recall = {"a": 0.5, "b": 0.0, "c": 1.0, "d": 0.01}
    # raw: a = 1/10/0.5 = 0.2; b = 1/5/0.05 = 4; c = 1/2/1 = 0.5; d = 1/1/0.05 = 20
    # median of (0.2, 0.5, 4, 20) = 2.25 -> cap 6.75: d clipped to 6.75
    w = code_weights(freq, recall)
    assert w["a"] == pytest.approx(0.2)
    assert w["b"] == pytest.approx(4.0)
    assert w["c"] == pytest.approx(0.5)
    assert w["d"] == pytest.approx(6.75)
    # missing recall counts as 0 -> floor; zero frequency skipped
    w2 = code_weights({"a": 4, "z": 0}, {})
    assert w2 == {"a": pytest.approx(1 / 2 / 0.05)}


def test_hint_probabilities_tau_and_median_fill():
    weights = {"a": 1.0, "b": 8.0, "c": 27.0}
    p = hint_probabilities(["a", "b", "c"], weights, tau=3.0)
    # cube roots 1, 2, 3 -> 1/6, 2/6, 3/6
    assert p == {"a": pytest.approx(1 / 6), "b": pytest.approx(2 / 6), "c": pytest.approx(3 / 6)}
    # unknown code gets the median weight (8 -> 2): 1, 2, 2 over 5
    q = hint_probabilities(["a", "new", "b"], weights, tau=3.0)
    assert q == {"a": pytest.approx(0.2), "new": pytest.approx(0.4), "b": pytest.approx(0.4)}
    # tau = 1 keeps raw proportions
    r = hint_probabilities(["a", "b"], weights, tau=1.0)
    assert r["b"] == pytest.approx(8 / 9)
    with pytest.raises(ConfigError, match="tau"):
        hint_probabilities(["a"], weights, tau=0)


def test_sample_hints_empirical():
    pool = ["a", "b", "c", "d", "e", "f", "g"]
    weights = {"a": 1.0, "b": 8.0, "c": 27.0, "d": 64.0, "e": 0.001, "f": 2.0, "g": 3.0}
    probs = hint_probabilities(pool, weights, tau=3.0)
    rng = np.random.default_rng(1234)
    n = 20000
    injected = 0
    first = {c: 0 for c in pool}
    sizes = []
    for _ in range(n):
        h = sample_hints(pool, weights, rng)
        if not h:
            continue
        injected += 1
        assert len(h) == len(set(h))                  # never repeats a code
        assert 1 <= len(h) <= min(5, len(pool))       # never exceeds min(5, |H|)
        assert set(h) <= set(pool)
        first[h[0]] += 1
        sizes.append(len(h))
    assert abs(injected / n - 0.5) < 0.02             # about half the prompts get hints
    # first-draw frequencies match hint_probabilities: chi-square, 6 dof, p = 0.001 critical 22.46
    chi2 = sum((first[c] - injected * probs[c]) ** 2 / (injected * probs[c]) for c in pool)
    assert chi2 < 22.46
    # k uniform on 1..5
    counts = np.bincount(sizes, minlength=6)[1:]
    assert np.all(np.abs(counts / injected - 0.2) < 0.02)


def test_sample_hints_small_pool_and_edge_cases():
    rng = np.random.default_rng(0)
    for _ in range(200):
        h = sample_hints(["x", "y"], {}, rng, p_inject=1.0)
        assert 1 <= len(h) <= 2 and len(set(h)) == len(h)
    assert sample_hints([], {"a": 1.0}, rng, p_inject=1.0) == []
    assert all(sample_hints(["a"], {}, rng, p_inject=0.0) == [] for _ in range(50))
    with pytest.raises(ConfigError, match="p_inject"):
        sample_hints(["a"], {}, rng, p_inject=1.5)


def test_sampling_is_reproducible_with_the_same_seed():
    pool = ["a", "b", "c", "d"]
    w = {"a": 1.0, "b": 2.0}
    r1 = [sample_hints(pool, w, np.random.default_rng(7)) for _ in range(1)]
    r2 = [sample_hints(pool, w, np.random.default_rng(7)) for _ in range(1)]
    assert r1 == r2
    assert math.isclose(sum(hint_probabilities(pool, w).values()), 1.0)
