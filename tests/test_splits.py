"""Patient-level iterative stratification and split files."""

from __future__ import annotations

import gzip
import time
from collections import Counter, defaultdict

import numpy as np
import pytest

from minicd import DataError
from minicd.data.splits import (iterative_stratification, patient_split, read_split_file,
                                write_split_file)

TARGET = {"train": 0.75, "val": 0.10, "test": 0.15}


def make_problem(n_patients: int, n_labels: int, seed: int = 0):
    """Admissions (subject, hadm, codes): 1-3 admissions per patient, Zipf-like code use."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, n_labels + 1) ** 0.8
    p /= p.sum()
    adms = []
    for s in range(n_patients):
        for a in range(int(rng.integers(1, 4))):
            k = int(rng.integers(3, 12))
            codes = [f"C{c}" for c in rng.choice(n_labels, size=k, p=p, replace=False)]
            adms.append((f"S{s}", f"{s}-{a}", codes))
    return adms


def label_deviation(adms, mapping, min_support: int = 20) -> float:
    """Mean over labels (>= min_support admissions) and splits of |share in split - target|."""
    counts = defaultdict(Counter)
    for _, h, codes in adms:
        for c in codes:
            counts[c][mapping[h]] += 1
    devs = []
    for c, cnt in counts.items():
        n = sum(cnt.values())
        if n >= min_support:
            devs += [abs(cnt[s] / n - t) for s, t in TARGET.items()]
    return float(np.mean(devs))


def random_patient_split(adms, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    subjects = sorted({s for s, _, _ in adms})
    u = dict(zip(subjects, rng.random(len(subjects))))
    pick = {s: "train" if x < 0.75 else "val" if x < 0.85 else "test" for s, x in u.items()}
    return {h: pick[s] for s, h, _ in adms}


@pytest.fixture(scope="module")
def problem():
    adms = make_problem(3000, 400)
    return adms, patient_split(adms, seed=7)


def test_hand_example_each_subset_gets_one_of_each_label():
    labels = [["a"], ["a"], ["b"], ["b"]]
    for seed in range(5):
        assign = iterative_stratification(labels, [0.5, 0.5], np.random.default_rng(seed))
        assert sorted(assign[:2]) == [0, 1] and sorted(assign[2:]) == [0, 1]


def test_rare_label_goes_to_the_subset_that_wants_it():
    # 'r' is on 2 examples: subset 0 wants 1.2 of them and subset 1 0.8, so the first goes to
    # subset 0, after which subset 1 wants more (0.8 vs 0.2). 'x' is everywhere, so its desired
    # counts equal the desired sizes and the totals come out exactly 6 / 4.
    labels = [["r", "x"], ["r", "x"]] + [["x"]] * 8
    for seed in range(5):
        assign = iterative_stratification(labels, [0.6, 0.4], np.random.default_rng(seed))
        assert Counter(assign.tolist()) == {0: 6, 1: 4}
        assert sorted(assign[:2].tolist()) == [0, 1]


def test_unlabelled_examples_fill_by_size():
    assign = iterative_stratification([[]] * 10, [0.8, 0.2], np.random.default_rng(0))
    assert Counter(assign.tolist()) == {0: 8, 1: 2}


def test_no_subject_in_two_splits_and_all_assigned(problem):
    adms, mapping = problem
    assert set(mapping) == {h for _, h, _ in adms}
    by_subject = defaultdict(set)
    for s, h, _ in adms:
        by_subject[s].add(mapping[h])
    assert all(len(v) == 1 for v in by_subject.values())
    assert set(mapping.values()) == {"train", "val", "test"}


def test_proportions_within_two_points(problem):
    adms, mapping = problem
    n = len(mapping)
    share = Counter(mapping.values())
    for split, target in TARGET.items():
        assert abs(share[split] / n - target) < 0.02, (split, share[split] / n)
    subjects = {s: mapping[h] for s, h, _ in adms}
    ps = Counter(subjects.values())
    for split, target in TARGET.items():
        assert abs(ps[split] / len(subjects) - target) < 0.02


def test_stratification_beats_a_random_patient_split(problem):
    adms, mapping = problem
    ours = label_deviation(adms, mapping)
    randoms = [label_deviation(adms, random_patient_split(adms, seed)) for seed in range(3)]
    assert ours < 0.8 * min(randoms), (ours, randoms)


def test_deterministic_for_a_seed():
    adms = make_problem(300, 60, seed=1)
    assert patient_split(adms, seed=3) == patient_split(list(adms), seed=3)
    assert patient_split(adms, seed=3) != patient_split(adms, seed=4)


def test_runs_in_seconds_on_a_large_problem():
    rng = np.random.default_rng(0)
    n, n_labels = 12000, 3000
    p = 1.0 / np.arange(1, n_labels + 1)
    p /= p.sum()
    labels = [[int(c) for c in rng.choice(n_labels, size=int(rng.integers(5, 20)), p=p,
                                          replace=False)] for _ in range(n)]
    t0 = time.perf_counter()
    assign = iterative_stratification(labels, [0.85, 0.15], np.random.default_rng(0))
    assert time.perf_counter() - t0 < 20
    assert abs((assign == 1).mean() - 0.15) < 0.01


# ----------------------------------------------------------------------------- split files


def test_split_file_round_trip(tmp_path):
    mapping = {"100001": "train", "100002": "test", "100003": "val"}
    write_split_file(mapping, tmp_path / "split.csv")
    assert (tmp_path / "split.csv").read_text() == \
        "id,split\n100001,train\n100002,test\n100003,val\n"
    assert read_split_file(tmp_path / "split.csv") == mapping


def test_split_file_accepts_common_names(tmp_path):
    f = tmp_path / "edin.csv.gz"
    f.write_bytes(gzip.compress(b"HADM_ID,Split\n100001.0,TRAIN\n100002,valid\n100003,dev\n"
                                b"100004,Val\n100005,test\n\n"))
    assert read_split_file(f) == {"100001": "train", "100002": "val", "100003": "val",
                                  "100004": "val", "100005": "test"}
    g = tmp_path / "b.csv"
    g.write_text("split,_id\ntrain,7\n")
    assert read_split_file(g) == {"7": "train"}


@pytest.mark.parametrize("text, needle", [
    ("id,split\n1,train\n2,holdout\n", ":3: unknown split 'holdout'"),
    ("id,fold\n1,train\n", "missing column(s) split"),
    ("admission,split\n1,train\n", "missing column(s) id"),
    ("id,split\n1,train\n1,test\n", ":3: admission 1 is listed in both"),
    ("id,split\n,train\n", ":2: column 'id' is empty"),
    ("", "is empty"),
])
def test_split_file_errors(tmp_path, text, needle):
    f = tmp_path / "s.csv"
    f.write_text(text)
    with pytest.raises(DataError) as e:
        read_split_file(f)
    assert needle in str(e.value) and str(f) in str(e.value)
