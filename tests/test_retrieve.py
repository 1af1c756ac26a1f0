"""Few-shot neighbours against a scikit-learn TF-IDF + cosine reference."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.feature_extraction.text import TfidfVectorizer

from minicd.data.retrieve import NeighbourIndex, tokenize
from minicd.errors import DataError

VOCAB = ["pain", "chest", "aspirin", "heparin", "sepsis", "pneumonia", "cabg", "stent", "insulin",
         "dialysis", "fracture", "copd", "asthma", "htn", "dm2", "cath", "echo", "ct", "mri",
         "fever", "cough", "nausea", "a1c", "troponin", "lasix", "warfarin", "afib", "stroke"]


def _corpus(rng: np.random.Generator, n: int) -> list[str]:
    docs = []
    for _ in range(n):
        p = rng.dirichlet(np.full(len(VOCAB), 0.3))
        words = rng.choice(VOCAB, size=int(rng.integers(5, 60)), p=p)
        docs.append("The Patient: " + " ".join(words).upper() + ". x 1")
    return docs


def _reference(train: list[str], queries: list[str], own: list[int | None], k: int) -> list[list[int]]:
    """sklearn TF-IDF (sublinear tf, smooth idf, l2) and cosine; score desc, then train order."""
    vec = TfidfVectorizer(sublinear_tf=True).fit(train)
    sims = (vec.transform(queries) @ vec.transform(train).T).toarray()  # [Q, N] float64
    out = []
    for q, row in enumerate(sims):
        idx = [i for i in range(len(train)) if i != own[q]]
        idx.sort(key=lambda i: (-row[i], i))
        top = idx[:k]
        nxt = idx[k] if len(idx) > k else None
        ranked = [row[i] for i in top] + ([row[nxt]] if nxt is not None else [])
        gaps = np.abs(np.diff(ranked))
        assert np.all((gaps > 1e-5) | (gaps == 0)), "reference has near-ties: pick another seed"
        out.append(top)
    return out


def test_tokenizer_matches_sklearn_default():
    text = "Pt's BP 120/80, a1c 7.2%; {x} é-café I_d"
    assert tokenize(text) == TfidfVectorizer().build_analyzer()(text)


def test_neighbours_equal_sklearn_reference():
    rng = np.random.default_rng(0)
    train = _corpus(rng, 40)
    held = _corpus(rng, 10)
    ids = [f"t{i:02d}" for i in range(len(train))]
    index = NeighbourIndex.build(ids, train)
    # training notes queried with their ids: never themselves
    got = index.query(train, ids=ids, k=3)
    ref = _reference(train, train, list(range(len(train))), 3)
    assert got == [[ids[i] for i in r] for r in ref]
    assert all(ids[q] not in got[q] for q in range(len(train)))
    # held-out notes (no ids): any training note may come back, only training ids
    got = index.query(held, k=4)
    ref = _reference(train, held, [None] * len(held), 4)
    assert got == [[ids[i] for i in r] for r in ref]
    assert {i for row in got for i in row} <= set(ids)


def test_chunking_does_not_change_results():
    rng = np.random.default_rng(1)
    train = _corpus(rng, 30)
    ids = [str(i) for i in range(30)]
    big = NeighbourIndex.build(ids, train)
    tiny = NeighbourIndex.build(ids, train, chunk_bytes=1)  # one query per chunk
    assert big.query(train, ids=ids) == tiny.query(train, ids=ids)


def test_ties_break_by_training_order_and_self_excluded():
    train = ["alpha beta", "gamma delta", "alpha beta", "alpha beta", "zeta"]
    ids = ["d", "c", "b", "a", "e"]
    index = NeighbourIndex.build(ids, train)
    # three identical notes (cosine 1): training order d, b, a; then zero scores in order c, e
    assert index.query(["alpha beta"], k=5) == [["d", "b", "a", "c", "e"]]
    assert index.query(["alpha beta"], ids=["b"], k=3) == [["d", "a", "c"]]
    # out-of-vocabulary query: every score 0 -> training order
    assert index.query(["qqq rrr"], ids=[None], k=2) == [["d", "c"]]
    # k larger than the index minus the note itself
    assert index.query(["zeta"], ids=["e"], k=10) == [["d", "c", "b", "a"]]


def test_build_errors():
    with pytest.raises(DataError, match="duplicate"):
        NeighbourIndex.build(["a", "a"], ["x y", "y z"])
    with pytest.raises(DataError):
        NeighbourIndex.build(["a"], ["x y", "y z"])
    index = NeighbourIndex.build(["a", "b"], ["x y", "y z"])
    with pytest.raises(DataError):
        index.query(["x"], ids=["a", "b"])
