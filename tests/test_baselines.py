"""Appendix D prompting baselines: retrieved shots, truncation to budget, run_rollout / rollout.py
and evaluate.py end to end (tiny from-scratch model; scores are ~0 and not asserted)."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.feature_extraction.text import TfidfVectorizer

import minicd.rollout.inference as inference
import minicd.train.common as common
from minicd.baselines import BaselinePrompter
from minicd.config import load_config
from minicd.data.records import read_records
from minicd.errors import ConfigError, DataError
from minicd.model.hub import load_tokenizer
from minicd.model.tokenizer import encode_prompt
from minicd.predictions import read_predictions
from minicd.prompts import BASELINE_TEMPLATES, PromptSetting, render_baseline
from minicd.rollout.engine import Generation
from train_fixtures import build_assets

REPO = Path(__file__).resolve().parents[1]
KINDS = ("zero_shot", "few_shot", "zero_shot_cot", "few_shot_cot")
SETTING = PromptSetting("mimic3", "icd9", "top50")  # build_assets: MIMIC-III top-50
BIG = 100_000  # a budget nothing needs to be cut for


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("baselines")
    built = build_assets(root)
    train = read_records(built["data_dir"] / "train.jsonl")
    test = read_records(built["data_dir"] / "test.jsonl")
    return {**built, "tok": load_tokenizer(built["model_dir"]), "train": train, "test": test}


def _config(assets, path: Path, max_prompt_tokens: int, max_new: int = 4) -> Path:
    path.write_text(f"""
[model]
path = "{assets['model_dir']}"
[data]
dir = "{assets['data_dir']}"
corpus = "mimic3"
label_scope = "top50"
max_prompt_tokens = {max_prompt_tokens}
[train]
device = "cpu"
num_threads = 1
[rollout]
max_new_tokens = {max_new}
""")
    return path


def _reference_shots(train, queries) -> list[list[int]]:
    """Brute-force sklearn TF-IDF (sublinear tf) cosine over the train notes; the query's own
    train position excluded; score desc, then train order. Indices into ``train``."""
    vec = TfidfVectorizer(sublinear_tf=True).fit([r.note for r in train])
    sims = (vec.transform([q.note for q in queries]) @ vec.transform([r.note for r in train]).T).toarray()
    pos = {r.id: i for i, r in enumerate(train)}
    out = []
    for q, row in zip(queries, sims):
        idx = sorted((i for i in range(len(train)) if i != pos.get(q.id)), key=lambda i: (-row[i], i))
        gaps = np.abs(np.diff([row[i] for i in idx[:4]]))
        assert np.all(gaps > 1e-5), "near-tied neighbours in the reference: pick other records"
        out.append(idx[:3])
    return out


def _expected_user(kind, rec, train, ref) -> str:
    shots = [(train[i].note, train[i].codes) for i in ref] if kind.startswith("few") else None
    return render_baseline(kind, rec.note, SETTING, shots)


def test_prompt_is_template_with_retrieved_training_shots(assets):
    train, test, tok = assets["train"], assets["test"], assets["tok"]
    queries = test[:4] + train[:3]  # scoring test; and train records, whose best match is themselves
    ref = _reference_shots(train, queries)
    train_ids = {r.id for r in train}
    for kind in KINDS:
        p = BaselinePrompter(kind, SETTING, tok, BIG, train)
        shots = p.neighbours(queries)
        for rec, got, want in zip(queries, shots, ref):
            if kind.startswith("few"):
                assert [s.id for s in got] == [train[i].id for i in want]
                assert rec.id not in [s.id for s in got] and {s.id for s in got} <= train_ids
            else:
                assert got == []
        for rec, user, want in zip(queries, p.user_prompts(queries), ref):
            expected = _expected_user(kind, rec, train, want)
            assert user == expected
            assert p.prompt_ids_of(user) == encode_prompt(tok, [{"role": "user", "content": expected}])
    # a training note is its own best match (cosine 1): without the exclusion it would be shot 1
    few = BaselinePrompter("few_shot", SETTING, tok, BIG, train)
    assert train[0].note not in few.user_prompt(train[0], few.neighbours([train[0]])[0]).split(
        "Now code the following")[0]


def _template_regex(kind: str) -> re.Pattern:
    """The template with every placeholder a named capture (literal text must be intact)."""
    parts, names = [], []
    for lit, name in re.findall(r"([^{]*)(?:\{([A-Z0-9_]+)\})?", BASELINE_TEMPLATES[kind]):
        parts.append(re.escape(lit))
        if name:
            parts.append(f"(?P<{name}>.*?)" if name not in names else f"(?P={name})")
            names.append(name)
    return re.compile("".join(parts), re.DOTALL)


@pytest.mark.parametrize("kind,budget", [("zero_shot", 330), ("zero_shot_cot", 420),
                                         ("few_shot", 520), ("few_shot_cot", 720)])
def test_truncated_prompts_fit_and_keep_template(assets, kind, budget):
    train, test, tok = assets["train"], assets["test"], assets["tok"]
    p = BaselinePrompter(kind, SETTING, tok, budget, train)
    recs = test[:6]
    chat = lambda text: encode_prompt(tok, [{"role": "user", "content": text}])  # noqa: E731
    pattern = _template_regex(kind)
    ref = _reference_shots(train, recs)
    for rec, user, want in zip(recs, p.user_prompts(recs), ref):
        full = _expected_user(kind, rec, train, want)
        assert len(chat(full)) > budget  # the untruncated prompt would not fit: cutting happened
        assert len(chat(user)) <= budget
        m = pattern.fullmatch(user)
        assert m is not None, "Appendix D template text was altered"
        assert user.startswith(BASELINE_TEMPLATES[kind].split("{")[0]) and user.endswith(" Answer:")
        assert m["CODE_SYSTEM"] == "ICD-9-CM" and m["LABEL_SCOPE"] == SETTING.label_scope_text
        query = m["DISCHARGE_SUMMARY"]
        assert 0 < len(query) < len(rec.note) and rec.note.startswith(query[:20])
        if kind.startswith("few"):
            empty = chat(render_baseline(kind, "", SETTING, [("", train[i].codes) for i in want]))
            room = budget - len(empty)  # tokens left for the four notes
            for j, i in enumerate(want, start=1):
                assert m[f"SHOT_CODES_{j}"] == ", ".join(train[i].codes)
                shot = m[f"SHOT_NOTE_{j}"]
                assert train[i].note.startswith(shot[:20])
                assert len(tok.encode(shot)) <= room // 6 + 2  # each shot: 1/3 of half the room
            assert len(tok.encode(query)) >= room // 2 - 8  # the query keeps the rest
    with pytest.raises(ConfigError, match="max_prompt_tokens"):
        BaselinePrompter(kind, SETTING, tok, 60, train).user_prompts(recs[:1])


def test_bad_kind_and_too_few_training_notes(assets):
    with pytest.raises(ConfigError, match="few_shot"):
        BaselinePrompter("two_shot", SETTING, assets["tok"], BIG, assets["train"])
    with pytest.raises(DataError, match="train"):
        BaselinePrompter("few_shot_cot", SETTING, assets["tok"], BIG, assets["train"][:3])


class _SpyEngine:
    """Records the prompts run_rollout feeds it; answers a fixed code span."""

    def __init__(self) -> None:
        self.prompts: list[list[int]] = []

    def close(self) -> None:
        pass

    def generate(self, prompts, params):
        self.prompts += [list(p) for p in prompts]
        return [[Generation(i, 0, [1], "<code>401.9</code>", "stop")] for i in range(len(prompts))]


def test_run_rollout_feeds_baseline_prompts(assets, tmp_path, monkeypatch):
    """run_rollout(prompt_kind=...) sends the engine the baseline prompts of the scored split with
    shots retrieved from the train split only (expected ids built independently)."""
    spy = _SpyEngine()
    monkeypatch.setattr(inference, "build_engine", lambda *a, **k: spy)
    cfg = load_config(_config(assets, tmp_path / "c.toml", BIG))
    train, test, tok = assets["train"], assets["test"], assets["tok"]
    ref = _reference_shots(train, test[:3])
    for kind in (None, *KINDS):
        spy.prompts.clear()
        res = common.run_rollout(cfg, "test", tmp_path / f"{kind}.jsonl", limit=3,
                                 show_progress=False, prompt_kind=kind)
        if kind is None:
            want = [common.prompt_ids(r, tok, cfg.data) for r in test[:3]]
        else:
            want = [encode_prompt(tok, [{"role": "user", "content": _expected_user(kind, r, train, s)}])
                    for r, s in zip(test[:3], ref)]
        assert spy.prompts == want
        assert res["written"] == 3 and len(read_predictions(tmp_path / f"{kind}.jsonl")) == 3
    with pytest.raises(ConfigError, match="prompt kind"):
        common.run_rollout(cfg, "test", tmp_path / "x.jsonl", prompt_kind="coding_cot")


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MINICD_NO_PROGRESS": "1"}
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=180)


def test_rollout_cli_baselines_then_evaluate(assets, tmp_path):
    config = _config(assets, tmp_path / "cli.toml", 700)
    runs = {}
    for kind in KINDS:
        out = tmp_path / f"{kind}.jsonl"
        res = _run("rollout.py", "--config", str(config), "--split", "test", "--limit", "2",
                   "--prompt", kind, "--out", str(out), "--max-new-tokens", "3")
        assert res.returncode == 0, res.stderr[-2000:]
        assert "written=2 skipped=0" in res.stdout
        assert ("--max-new-tokens 512" in res.stderr) == kind.endswith("cot")
        rows = read_predictions(out)
        assert [r["id"] for r in rows] == [r.id for r in assets["test"][:2]]
        assert assets["test"][0].note[:40] not in res.stdout + res.stderr
        runs[kind.replace("_", "-")] = out
    ev_dir = tmp_path / "eval"
    res = _run("evaluate.py", "--gold", str(assets["data_dir"] / "test.jsonl"), "--out", str(ev_dir),
               *[a for name, f in runs.items() for a in ("--run", f"{name}={f}")])
    assert res.returncode == 0, res.stderr[-2000:]
    for name in runs:
        assert name in res.stdout
    with open(ev_dir / "table.csv") as f:
        table = list(csv.reader(f))
    assert sorted(row[0] for row in table[1:]) == sorted(runs)
    results = json.loads((ev_dir / "results.json").read_text())
    assert sorted(r["method"] for r in results["runs"]) == sorted(runs)
