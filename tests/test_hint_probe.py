"""minicd.train.hint_probe: does a policy answer the codes a PHI hint shows it?"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

import minicd.rollout.inference as inference
from minicd.config import load_config
from minicd.data.records import Record, read_records
from minicd.model.hub import load_tokenizer
from minicd.rollout.engine import Generation
from minicd.train.hint_probe import code_mentioned, hint_copy_counts, probe_hints, rarest_gold
from train_fixtures import build_assets

REPO = Path(__file__).resolve().parents[1]


def _rec(i: int, codes: list[str]) -> Record:
    return Record(id=str(i), subject_id=str(i), split="train", note="n", codes=tuple(codes),
                  code_system="icd9")


def test_rarest_gold_by_hand():
    freq = Counter({"401.9": 9, "428.0": 5, "486": 2, "276.2": 2, "38.93": 7})
    recs = [_rec(0, ["401.9", "486", "428.0"]),
            _rec(1, ["38.93", "276.2", "486", "401.9"]),   # tie 276.2 / 486: code order
            _rec(2, ["401.9"])]                            # fewer codes than k: all of them
    assert rarest_gold(recs, 2, freq) == [["486", "428.0"], ["276.2", "486"], ["401.9"]]
    assert rarest_gold(recs, 1, freq) == [["486"], ["276.2"], ["401.9"]]
    with pytest.raises(Exception, match="--hints 0"):
        rarest_gold(recs, 0, freq)


def test_code_mentioned_whole_codes_only():
    assert code_mentioned("428.0", "<code>401.9, 428.0</code>")
    assert code_mentioned("428.0", "- 428.0 (Congestive heart failure)")
    assert code_mentioned("428.0", "ends with 428.0.")          # a full stop is not a digit
    assert code_mentioned("e934.2", "E934.2 (Anticoagulants)")   # case-insensitive
    assert not code_mentioned("428.0", "<code>428.01</code>")
    assert not code_mentioned("428.0", "1428.0")
    assert not code_mentioned("428.0", "428.05")
    assert not code_mentioned("486", "4860 and 486.1")
    assert not code_mentioned("38.93", "338.93")


def test_hint_copy_counts_by_hand():
    hints = [["428.0", "486"], ["276.2"]]
    plain = ["<code>428.0, 401.9</code>", "no span, but 276.2 in prose"]
    hinted = ["<code>486, 428.0</code> also 276.2", "<code>276.2</code>"]
    got = hint_copy_counts(hints, plain, hinted)
    # plain: note 0 answers 428.0 (1 of 2), note 1 has no span (0); mentioned: 428.0 + 276.2
    # hinted: note 0 answers both, note 1 answers 276.2; 276.2 in note 0's prose is not its hint
    assert got == {"notes": 2, "hinted_codes": 3,
                   "answered_plain": 1, "mentioned_plain": 2, "distinct_answers_plain": 2,
                   "no_span_plain": 1,
                   "answered_hinted": 3, "mentioned_hinted": 3, "distinct_answers_hinted": 2,
                   "no_span_hinted": 0,
                   "answered_plain_rate": 1 / 3, "answered_hinted_rate": 1.0,
                   "mentioned_plain_rate": 2 / 3, "mentioned_hinted_rate": 1.0}
    # one answer for every note: 1 distinct set
    assert hint_copy_counts(hints, ["<code>401.9</code>"] * 2,
                            ["<code>401.9</code>"] * 2)["distinct_answers_hinted"] == 1
    with pytest.raises(ValueError, match="differ in length"):
        hint_copy_counts(hints, plain, hinted[:1])


def test_no_span_and_mini_example_answers_by_hand():
    """The two ways a hint block breaks a policy: a response looping to the token limit (no
    closed span) and a response answering the mini example instead of the note."""
    example = ["276.2", "401.9", "584.9"]
    hints = [["428.0"], ["486"], ["38.93"], ["276.2"]]
    plain = ["<code>401.9, 584.9, 276.2</code>", "<code>486</code>",
             "<code>401.9</code>", "<code></code>"]                    # an empty span is a span
    hinted = ["<code>276.2, 401.9, 584.9</code>",                       # the example, verbatim
              "<code>401.9, 428.0, 428.0, 428.0, 428.0",                # loops to the limit
              "<code>38.93, 401.9, 584.9</code>",                       # hint + example's others
              "<code>584.9, 401.9, 276.2</code>"]                       # hinted 276.2: still the set
    got = hint_copy_counts(hints, plain, hinted, example=example)
    assert (got["no_span_plain"], got["no_span_hinted"]) == (0, 1)
    assert (got["example_answers_plain"], got["example_answers_hinted"]) == (1, 2)
    assert (got["answered_plain"], got["answered_hinted"]) == (1, 2)   # 486; 38.93 and 276.2
    assert "example_answers_plain" not in hint_copy_counts(hints, plain, hinted)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    built = build_assets(root)
    config = root / "probe.toml"
    config.write_text(f"""
[model]
path = "{built['model_dir']}"
[data]
dir = "{built['data_dir']}"
max_prompt_tokens = 768
[train]
device = "cpu"
num_threads = 1
[rollout]
max_new_tokens = 6
""")
    return {**built, "config": config}


class CopyingEngine:
    """Answers the codes listed under 'Hinted codes:' in the prompt, else 401.9 (a stand-in
    policy that reads its hints; the probe must report every hinted code answered)."""

    def __init__(self, tok):
        self.tok, self.closed, self.prompts = tok, False, []

    def generate(self, prompts, params):
        out = []
        for i, ids in enumerate(prompts):
            text = self.tok.decode(list(ids))
            self.prompts.append(text)
            block = text.split("Hinted codes:")[1].split("Mini example:")[0] \
                if "Hinted codes:" in text else ""
            codes = re.findall(r"^- (\S+)", block, flags=re.MULTILINE) or ["401.9"]
            out.append([Generation(prompt_index=i, sample_index=0, token_ids=[],
                                   text=f"<code>{', '.join(codes)}</code>",
                                   finish_reason="stop")])
        return out

    def lockstep(self):
        raise AssertionError("one process: no lockstep")

    def close(self):
        self.closed = True


def test_probe_shows_the_rarest_gold_codes_and_counts_them(assets, monkeypatch):
    cfg = load_config(assets["config"])
    tok = load_tokenizer(assets["model_dir"])
    engine = CopyingEngine(tok)
    monkeypatch.setattr(inference, "open_policy", lambda cfg, adapter=None: (tok, engine))
    got = probe_hints(cfg, "val", limit=5, hints_per_note=2)

    train = read_records(Path(assets["data_dir"]) / "train.jsonl")
    freq = Counter(c for r in train for c in r.codes)
    val = read_records(Path(assets["data_dir"]) / "val.jsonl")[:5]
    expected_hints = [sorted(set(r.codes), key=lambda c: (freq[c], c))[:2] for r in val]
    # the hinted prompts list exactly those codes, the plain ones no hint at all
    plain_prompts, hinted_prompts = engine.prompts[:5], engine.prompts[5:]
    assert not any("Hinted codes:" in p for p in plain_prompts)
    for prompt, hints in zip(hinted_prompts, expected_hints):
        listed = re.findall(r"^- (\S+)", prompt.split("Hinted codes:")[1].split("Mini")[0],
                            flags=re.MULTILINE)
        assert listed == hints
    n = sum(len(h) for h in expected_hints)
    plain_hits = sum(h.count("401.9") for h in expected_hints)  # the plain answer is 401.9
    assert (got["notes"], got["hinted_codes"]) == (5, n)
    assert (got["answered_hinted"], got["mentioned_hinted"]) == (n, n)
    assert (got["answered_plain"], got["mentioned_plain"]) == (plain_hits, plain_hits)
    assert got["distinct_answers_plain"] == 1
    assert got["distinct_answers_hinted"] == len({frozenset(h) for h in expected_hints})
    assert (got["no_span_plain"], got["no_span_hinted"]) == (0, 0)
    example = {"276.2", "401.9", "584.9"}                        # the paper's ICD-9 example
    assert got["example_answers_plain"] == 0
    assert got["example_answers_hinted"] == sum(set(h) == example for h in expected_hints)
    assert got["split"] == "val" and got["hints_per_note"] == 2
    assert got["mini_example"] == "paper"
    assert engine.closed


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MINICD_NO_PROGRESS": "1"}
    return subprocess.run([sys.executable, "-m", "minicd.train.hint_probe", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=180)


def test_cli_runs_a_real_policy_and_refuses_bad_input(assets, tmp_path):
    out = tmp_path / "probe.json"
    ok = _cli("--config", str(assets["config"]), "--split", "val", "--limit", "3", "--hints", "1",
              "--out", str(out))
    assert ok.returncode == 0, ok.stderr[-2000:]
    printed = json.loads(ok.stdout.strip().splitlines()[-1])
    assert json.loads(out.read_text()) == printed
    assert (printed["notes"], printed["hinted_codes"], printed["hints_per_note"]) == (3, 3, 1)
    assert 1 <= printed["distinct_answers_plain"] <= 3
    notes = [r.note for r in read_records(Path(assets["data_dir"]) / "val.jsonl")[:3]]
    assert not any(note[:40] in ok.stdout + ok.stderr for note in notes)  # no note text

    bad = _cli("--config", str(assets["config"]), "--hints", "0")
    assert bad.returncode == 2 and "--hints 0" in bad.stderr
    missing = _cli("--config", str(assets["config"]), "--split", "nosuch")
    assert missing.returncode == 2 and "nosuch.jsonl" in missing.stderr
    folder = _cli("--config", str(assets["config"]), "--out", str(tmp_path))
    assert folder.returncode == 2 and "is a folder" in folder.stderr
