"""PHI stage loop (minicd/train/phi.py) on a tiny from-scratch Qwen3 and a small synthetic set.

The bookkeeping runs use scripted engines: GRPO rollouts come from a fixed pool of answers
(seeded per (prompt, sample)), and the hint-free refresh inference answers, for record i after k
refreshes, its first (i % 3) + k gold codes plus one wrong code, so pools shrink round over round
by construction (Eq. 4 bookkeeping, not learning). The real run_rollout and prompt rendering are
used throughout; one CLI run uses the real torch engine for 2 rounds end to end.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import minicd.rollout.inference as inference
import minicd.train.common as common
import minicd.train.phi as phi
from minicd.config import PHIConfig, load_config
from minicd.data.records import read_records
from minicd.log import read_metrics
from minicd.model.hub import load_tokenizer
from minicd.rollout.engine import Generation
from minicd.train.grpo import rollout_seed, step_prompt_indices
from train_fixtures import build_assets, save_sft_adapter

REPO = Path(__file__).resolve().parents[1]
N = 12
DESC = "abcdefghij klmnopqrst uvwxyzabcd efghijklmn opq"
DESC_30 = "abcdefghij klmnopqrst..."  # cut at 30 chars, last space (21) > 18: cut there, add "..."


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("phi")
    built = build_assets(root)
    train = read_records(built["data_dir"] / "train.jsonl")[:N]
    save_sft_adapter(built["model_dir"], root / "sft_adapter", 0.05)
    codes = sorted({c for r in train for c in r.codes})
    (root / "desc.txt").write_text("".join(f"{c}\t{DESC}\n" for c in codes))
    config = root / "phi.toml"
    config.write_text(f"""
[model]
path = "{built['model_dir']}"
[lora]
r = 4
alpha = 8.0
init_adapter = "{root / 'sft_adapter'}"
[data]
dir = "{built['data_dir']}"
max_prompt_tokens = 1024
train_limit = {N}
val_limit = 0
[train]
seed = 0
device = "cpu"
micro_batch_size = 4
save_every = 1
keep_last = 3
max_steps = 2
[grpo]
group_size = 4
prompts_per_step = 2
lr = 5e-2
kl_coef = 0.1
[rollout]
max_new_tokens = 6
[phi]
rounds = 2
description_limit = 30
description_file = "{root / 'desc.txt'}"
""")
    return {"config": config, "train": train, "model_dir": built["model_dir"],
            "tok": load_tokenizer(built["model_dir"])}


def _cfg(assets, out: Path, *overrides: str):
    return load_config(assets["config"], [f"train.output_dir={json.dumps(str(out))}", *overrides])


def _codes(text: str) -> list:
    if "<code>" not in text:
        return []
    return [c.strip() for c in text.split("<code>")[1].split("</code>")[0].split(",") if c.strip()]


def _hand_pools(pred_file: Path, train) -> dict:
    """Eq. 3/4 by hand from a predictions file: gold codes not in the predicted span."""
    preds = {}
    for line in pred_file.read_text().splitlines():
        row = json.loads(line)
        preds[row["id"]] = set(_codes(row["response"]))
    return {r.id: [c for c in r.codes if c not in preds[r.id]] for r in train}


def _hinted_codes(text: str) -> list:
    if "Training hint:" not in text:
        return []
    block = text.split("Hinted codes:\n")[1].split("\nMini example:")[0]
    return [line[2:].split(" (")[0] for line in block.splitlines()]


class Scripted:
    """The stage's one engine. Sampled calls (GRPO rollouts) answer from a fixed pool, seeded per
    (prompt, sample); greedy calls (pool refreshes) answer by record: first (i % 3) + k gold
    codes and 999.9. Records every prompt it sees, per kind."""

    def __init__(self, tok, answers, refresh, kill_at_call=None):
        self.tok, self.answers, self.refresh, self.version = tok, answers, refresh, 0
        self.train_prompts: list[list[int]] = []
        self.train_answers: list[list[str]] = []  # per sampled prompt: its samples' texts
        self.refresh_prompts: list[list[int]] = []
        self.sampled_calls, self.kill_at_call = 0, kill_at_call
        self.closed = False

    @property
    def weight_version(self):
        return self.version

    def sync_policy(self, model, state_dict=None):
        self.version += 1
        return self.version

    def lockstep(self):
        return contextlib.nullcontext()

    def sleep(self):
        pass

    def wake_up(self):
        pass

    def close(self):
        self.closed = True

    def generate(self, prompts, params):
        assert not self.closed
        greedy = params.temperature == 0.0
        if not greedy:
            self.sampled_calls += 1
            if self.sampled_calls == self.kill_at_call:
                os.kill(os.getpid(), signal.SIGTERM)
        out = []
        for i, p in enumerate(prompts):
            (self.refresh_prompts if greedy else self.train_prompts).append(list(p))
            row = []
            for s in range(params.n):
                if greedy:
                    text = self.refresh(list(p))
                else:
                    seed = params.seed + i * params.n + s
                    text = self.answers[int(np.random.default_rng(seed).integers(len(self.answers)))]
                ids = self.tok.encode(text) + [self.tok.im_end_id]
                row.append(Generation(i, s, ids, text, "stop"))
            out.append(row)
            if not greedy:
                self.train_answers.append([g.text for g in row])
        return out


@pytest.fixture
def scripted(assets, monkeypatch):
    """Patch the stage engine and wrap the prompt builder; returns what they saw."""
    tok, train = assets["tok"], assets["train"]
    data_cfg = load_config(assets["config"]).data
    free = {tuple(common.prompt_ids(r, tok, data_cfg)): i for i, r in enumerate(train)}
    seen = {"engines": [], "built": [], "k": 0, "kill_at_call": None}
    seen["answers"] = answers = [f"<code>{train[0].codes[0]}</code>", f"<code>{train[1].codes[0]}, 401.9</code>",
               "<code></code>", f"<code>{', '.join(train[2].codes)}</code>"]

    def refresh_answer(p):
        i = free[tuple(p)]  # KeyError if an inference prompt is not the hint-free prompt
        codes = train[i].codes[:(i % 3) + seen["k"]]
        return "<code>" + ", ".join(list(codes) + ["999.9"]) + "</code>"

    def build_engine(cfg, model, tok_, lora_cfg, **kwargs):
        seen["engines"].append(Scripted(tok, answers, refresh_answer, seen["kill_at_call"]))
        return seen["engines"][-1]

    real_refresh, real_builder = phi.refresh_predictions, phi.prompt_builder

    def refresh(engine, cfg, tok_, records, out, **kw):
        seen["k"] = 0 if out.name.startswith("init") else int(out.parent.name.split("-")[1]) + 1
        return real_refresh(engine, cfg, tok_, records, out, **kw)

    class Recorded:
        def __init__(self, build, round_index):
            self.build, self.round_index = build, round_index

        def __call__(self, rec, step, index):
            ids = self.build(rec, step, index)
            seen["built"].append((self.round_index, rec.id, step, index, ids))
            return ids

        def __getattr__(self, name):  # read, record_rollouts, read_rollouts
            return getattr(self.build, name)

    def builder(pools, weights, cfg, round_index, *args):
        return Recorded(real_builder(pools, weights, cfg, round_index, *args), round_index)

    monkeypatch.setattr(inference, "build_engine", build_engine)
    monkeypatch.setattr(phi, "refresh_predictions", refresh)
    monkeypatch.setattr(phi, "prompt_builder", builder)
    return seen


def test_rounds_pools_hints_and_metrics(assets, scripted, tmp_path):
    out, train, tok = tmp_path / "run", assets["train"], assets["tok"]
    res = phi.run_phi(_cfg(assets, out))
    assert res["stopped"] is False and res["round"] == 1
    # round-0 pools by hand from the written SFT predictions; some are empty by construction
    pools0 = _hand_pools(out / "init_train_predictions.jsonl", train)
    pools1 = _hand_pools(out / "round-0" / "train_predictions.jsonl", train)
    pools2 = _hand_pools(out / "round-1" / "train_predictions.jsonl", train)
    for i, r in enumerate(train):  # first (i % 3) + k gold codes predicted
        assert pools0[r.id] == list(r.codes[i % 3:]) and pools2[r.id] == list(r.codes[i % 3 + 2:])
    state = json.loads((out / "phi_state.json").read_text())
    assert state["round"] == 2 and state["pools"] == pools2
    assert train[0].note[:40] not in (out / "phi_state.json").read_text()
    # pools shrink round over round (Eq. 4 bookkeeping)
    nonempty = [sum(bool(p) for p in pools.values()) for pools in (pools0, pools1, pools2)]
    assert nonempty[0] < N and nonempty[0] > nonempty[1] > nonempty[2]
    rows = read_metrics(out / "phi_rounds.jsonl")
    assert [r["round"] for r in rows] == [0, 1]
    assert [r["records_used"] for r in rows] == nonempty[:2]
    assert [r["next_nonempty_pools"] for r in rows] == nonempty[1:]
    sizes = [np.mean([len(p) for p in pools.values()]) for pools in (pools0, pools1, pools2)]
    assert [r["pool_mean_size"] for r in rows] == pytest.approx(sizes[:2])
    # train micro recall of the hint-free predictions, by hand: predicted gold codes / all gold
    total = sum(len(r.codes) for r in train)
    for row, pools in zip(rows, (pools1, pools2)):
        assert row["train_micro_recall"] == pytest.approx(
            1 - sum(len(p) for p in pools.values()) / total)
    # only records with non-empty pools are trained on; hints come from their pool
    built = scripted["built"]
    assert {x[0] for x in built} == {0, 1}
    engine_answers = scripted["engines"][0].train_answers   # in the order the prompts were built
    assert len(engine_answers) == len(built)
    total_hinted = 0
    for rnd, pools, after in ((0, pools0, pools1), (1, pools1, pools2)):
        calls = [x for x in built if x[0] == rnd]
        assert len(calls) == 2 * 2  # max_steps 2 x prompts_per_step 2
        hinted, shown = 0, set()
        for _, rid, _, _, ids in calls:
            assert pools[rid], rid
            text = tok.decode(ids)
            codes = _hinted_codes(text)
            hinted += bool(codes)
            shown |= {(rid, c) for c in codes}
            assert len(codes) == len(set(codes)) <= 5 and set(codes) <= set(pools[rid])
            for c in codes:
                assert f"\n- {c} ({DESC_30})\n" in text
            if codes:
                assert text.index("Training hint:") < text.index("Output format:")
        assert rows[rnd]["hint_rate"] == pytest.approx(hinted / len(calls))
        # pool transitions by hand: (record, code) pairs leaving / entering the pools
        before_pairs = {(rid, c) for rid, p in pools.items() for c in p}
        after_pairs = {(rid, c) for rid, p in after.items() for c in p}
        left = before_pairs - after_pairs
        assert rows[rnd]["pool_recovered"] == len(left) > 0
        assert rows[rnd]["newly_missed"] == len(after_pairs - before_pairs) == 0
        assert rows[rnd]["hinted_codes"] == len(shown)
        others = before_pairs - shown
        assert rows[rnd]["hinted_recovery"] == (
            pytest.approx(len(shown & left) / len(shown)) if shown else None)
        assert rows[rnd]["unhinted_recovery"] == pytest.approx(len(others & left) / len(others))
        # hint uptake in the samples by hand: every sample x pool code, shown or not
        answered = {True: [], False: []}
        for (_, rid, _, _, ids), texts in zip(calls, [a for x, a in zip(built, engine_answers)
                                                      if x[0] == rnd]):
            shown = set(_hinted_codes(tok.decode(ids)))
            for text in texts:
                for c in pools[rid]:
                    answered[c in shown].append(c in _codes(text))
        assert answered[True] and answered[False]
        assert rows[rnd]["rollout_hinted_uptake"] == pytest.approx(np.mean(answered[True]))
        assert rows[rnd]["rollout_unhinted_uptake"] == pytest.approx(np.mean(answered[False]))
        total_hinted += hinted
    assert 0 < total_hinted < 8  # both hinted and hint-free prompts occur
    # one engine served the whole stage (round-0 pools, both rounds, both refreshes), closed
    (engine,) = scripted["engines"]
    assert engine.closed
    # GRPO prompts are exactly the built (hinted or not) prompts; refresh prompts never hinted
    sent = engine.train_prompts
    assert sorted(map(tuple, sent)) == sorted(tuple(x[4]) for x in built)
    refreshed = engine.refresh_prompts
    assert len(refreshed) == 3 * N
    assert all("Training hint" not in tok.decode(p) for p in refreshed)
    # final adapter = last round's, on top of the merged SFT model
    a = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(out / "round-1" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cfg_json = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert Path(cfg_json["base_model_name_or_path"]) == out / "sft_model"


def test_hint_draws_inject_about_p(assets):
    p = PHIConfig(p_inject=0.5, max_hints=5)
    pool, weights = ["401.9", "428.0", "38.93"], {"401.9": 1.0, "428.0": 2.0, "38.93": 8.0}
    draws = [phi.draw_hints(pool, weights, p, 0, 1, s, j) for s in range(500) for j in range(4)]
    rate = sum(bool(d) for d in draws) / len(draws)
    assert abs(rate - 0.5) < 0.04                       # binomial sd ~ 0.011
    assert all(len(d) == len(set(d)) <= 3 and set(d) <= set(pool) for d in draws)
    assert draws[7] == phi.draw_hints(pool, weights, p, 0, 1, 1, 3)         # deterministic
    assert phi.draw_hints(pool, weights, PHIConfig(p_inject=0.0), 0, 0, 0, 0) == []


def test_resume_mid_round_matches_uninterrupted(assets, scripted, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    phi.run_phi(_cfg(assets, full, "train.max_steps=2"))
    scripted["kill_at_call"] = 3  # SIGTERM in round 1's first rollout (2 steps per round)
    stopped = phi.run_phi(_cfg(assets, part, "train.max_steps=2"))
    assert stopped["stopped"] is True and stopped["round"] == 1 and stopped["step"] == 1
    assert json.loads((part / "phi_state.json").read_text())["round"] == 1
    assert not (part / "adapter").exists()
    scripted["kill_at_call"] = None
    phi.run_phi(_cfg(assets, part, "train.max_steps=2", "train.resume=true"))
    assert [r["step"] for r in read_metrics(part / "round-1" / "metrics.jsonl")] == [1, 2]
    assert [r["step"] for r in read_metrics(part / "round-0" / "metrics.jsonl")] == [1, 2]
    a = load_file(str(full / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(part / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)
    ra, rb = read_metrics(full / "phi_rounds.jsonl"), read_metrics(part / "phi_rounds.jsonl")
    drop = ("wall_time_s", "reward_mean_last_step")
    assert [{k: v for k, v in r.items() if k not in drop} for r in ra] == \
           [{k: v for k, v in r.items() if k not in drop} for r in rb]


def test_cli_phi_two_rounds_with_torch_engine(assets, tmp_path):
    out = tmp_path / "cli"
    env = {**os.environ, "MINICD_NO_PROGRESS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--stage", "phi", "--config",
                           str(assets["config"]), f"train.output_dir={out}", "train.max_steps=1",
                           "data.train_limit=6", "train.num_threads=1"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "=== PHI round 1/2" in proc.stdout and "=== PHI round 2/2" in proc.stdout
    rows = read_metrics(out / "phi_rounds.jsonl")
    assert [r["round"] for r in rows] == [0, 1]
    train = assets["train"][:6]
    total = sum(len(r.codes) for r in train)
    for r, row in enumerate(rows):
        pools = _hand_pools(out / f"round-{r}" / "train_predictions.jsonl", train)
        assert row["train_micro_recall"] == pytest.approx(
            1 - sum(len(p) for p in pools.values()) / total)
        assert row["next_nonempty_pools"] == sum(bool(p) for p in pools.values())
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert len(read_metrics(out / "round-1" / "metrics.jsonl")) == 1


def test_config_errors(assets, tmp_path):
    from minicd.errors import ConfigError

    with pytest.raises(ConfigError, match="phi.rounds"):
        phi.run_phi(_cfg(assets, tmp_path / "x", "phi.rounds=0"))
    with pytest.raises(ConfigError, match="description_limit"):
        phi.run_phi(_cfg(assets, tmp_path / "x", "phi.description_limit=150"))
    with pytest.raises(ConfigError, match="lora.enabled"):
        phi.run_phi(_cfg(assets, tmp_path / "x", "lora.enabled=false"))


def test_pool_transitions_by_hand():
    before = {"a": ["1", "2", "3"], "b": ["4"], "c": []}
    after = {"a": ["3"], "b": ["4", "5"], "c": ["6"]}
    # record a: 1 and 2 recovered, 3 still missed; b: 5 newly missed; c: 6 newly missed
    got = phi.pool_transitions(before, after, {"a": {"1"}})
    assert got == {"pool_recovered": 2, "newly_missed": 2, "hinted_codes": 1,
                   "hinted_recovery": 1.0, "unhinted_recovery": pytest.approx(1 / 3)}
    # hints on the code that stayed missed, and on one of b's
    got = phi.pool_transitions(before, after, {"a": {"3"}, "b": {"4"}})
    assert got["hinted_codes"] == 2 and got["hinted_recovery"] == 0.0
    assert got["unhinted_recovery"] == 1.0            # a:1 and a:2 both recovered
    got = phi.pool_transitions(before, after, {})
    assert got["hinted_codes"] == 0 and got["hinted_recovery"] is None
    assert got["unhinted_recovery"] == pytest.approx(2 / 4)


def test_hint_uptake_by_hand():
    pools = {"a": ["1", "2"], "b": ["3"]}
    draws = {(0, 0): ("a", ["1"]), (0, 1): ("b", []), (1, 0): ("a", [])}
    sampled = {(0, 0): [["1", "2"], ["9"]],      # shown 1: 1 of 2 samples; not shown 2: 1 of 2
               (0, 1): [["3"], ["3"]],           # not shown 3: 2 of 2
               (1, 0): [["2"], []]}              # not shown 1: 0 of 2; not shown 2: 1 of 2
    got = phi.hint_uptake(pools, draws, sampled)
    assert got == {"rollout_hinted_uptake": 1 / 2, "rollout_unhinted_uptake": (1 + 2 + 1) / 8}
    # a prompt without recorded samples counts nothing; no hints at all: None
    got = phi.hint_uptake(pools, {(0, 1): ("b", []), (2, 0): ("a", ["2"])}, sampled)
    assert got == {"rollout_hinted_uptake": None, "rollout_unhinted_uptake": 1.0}


def test_missed_code_bonus_reads_the_round_pools(assets, scripted, tmp_path, monkeypatch):
    """grpo.reward = "f1+missed:0.5": each rollout earns F1 + 0.5 per code of its record's
    round-0 pool (the codes the start policy missed) that it predicts."""
    out, train = tmp_path / "bonus", assets["train"]
    # record i's round-0 pool is codes[i % 3:] (the refresh engine's construction): rollouts
    # answer with every pooled code, or with nothing
    pooled = sorted({c for i, r in enumerate(train) for c in r.codes[i % 3:]})
    answers = ["<code>" + ", ".join(pooled) + "</code>", "<code></code>"]
    scripted["answers"][:] = answers  # the sampled answers of the stage's scripted engine
    phi.run_phi(_cfg(assets, out, "phi.rounds=1", "train.max_steps=1",
                     "grpo.reward=f1+missed:0.5"))
    pools0 = _hand_pools(out / "init_train_predictions.jsonl", train)
    used = [r for r in train if pools0[r.id]]
    recs = [used[i] for i in step_prompt_indices(len(used), 2, 0, 0)]
    seed = rollout_seed(0, 0)
    f1s, bonuses = [], []
    for j, rec in enumerate(recs):
        for s in range(4):
            pred = set(_codes(answers[int(np.random.default_rng(seed + j * 4 + s)
                                          .integers(len(answers)))]))
            gold = set(rec.codes)
            f1s.append(2 * len(pred & gold) / (len(pred) + len(gold)) if pred else 0.0)
            bonuses.append(0.5 * len(pred & gold & set(pools0[rec.id])))
    assert sum(bonuses) > 0 and 0 in bonuses
    row = [r for r in read_metrics(out / "round-0" / "metrics.jsonl") if "reward_mean" in r][0]
    assert row["reward_mean"] == pytest.approx((sum(f1s) + sum(bonuses)) / 8, abs=1e-12)


@pytest.mark.parametrize("mini_example, answer", [("paper", "<code>276.2, 401.9, 584.9</code>"),
                                                  ("system", "<code>E87.2, I10, N17.9</code>"),
                                                  ("none", None)])
def test_hinted_prompts_use_the_configured_mini_example(assets, tmp_path, mini_example, answer):
    """phi.mini_example reaches PHI's hinted prompts: an ICD-10 record hinted with
    phi.mini_example = "system" ends its hint with the ICD-10 example, else the paper's."""
    from dataclasses import replace

    cfg = load_config(assets["config"], ["data.code_system=icd10", "phi.p_inject=1.0",
                                         f"phi.mini_example={mini_example!r}"])
    rec = replace(assets["train"][0], code_system="icd10",
                  codes=("I50.9", "E11.9"))
    builder = phi.prompt_builder({rec.id: ["I50.9"]}, {"I50.9": 1.0}, cfg, 0, assets["tok"],
                                 lambda c, s: None, tmp_path)
    text = assets["tok"].decode(builder(rec, 0, 0))
    if answer is None:                  # the ablation: the hint list, then the format line
        assert "Hinted codes:\n- I50.9\n\nOutput format:" in text
        assert "Mini example:" not in text and "276.2" not in text
    else:
        assert "Hinted codes:\n- I50.9\nMini example:" in text
        assert answer in text and text.count("Mini example:") == 1

