"""rollout.py: batch inference on a split writes predictions, resumes, and fails cleanly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minicd.config import load_config
from minicd.data.records import read_records
from minicd.model.hub import load_model, load_tokenizer
from minicd.model.lora import LoRAConfig, inject_lora, lora_modules, save_adapter
from minicd.parse import parse_codes
from minicd.predictions import read_predictions
from minicd.train.common import prompt_ids
from train_fixtures import build_assets

REPO = Path(__file__).resolve().parents[1]
MAX_NEW = 6


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("rollout")
    built = build_assets(root)
    config = root / "rollout.toml"
    config.write_text(f"""
[model]
path = "{built['model_dir']}"
[data]
dir = "{built['data_dir']}"
max_prompt_tokens = 256
[train]
device = "cpu"
num_threads = 1
[rollout]
max_new_tokens = {MAX_NEW}
""")
    # a nonzero adapter, so the adapter visibly changes the greedy answers
    model = load_model(built["model_dir"])
    lcfg = LoRAConfig(r=4, alpha=8.0)
    inject_lora(model, lcfg, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lora_modules(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen))
    save_adapter(model, root / "adapter", lcfg)
    return {"root": root, "config": config, "model": model, "data_dir": built["data_dir"]}


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MINICD_NO_PROGRESS": "1"}
    return subprocess.run([sys.executable, str(REPO / "rollout.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def _greedy_reference(model, prompt: list[int], stop: tuple[int, ...]) -> list[int]:
    """Greedy decoding by full forward passes (no KV cache)."""
    ids = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(MAX_NEW):
            nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
            out.append(nxt)
            ids.append(nxt)
            if nxt in stop:
                break
    return out


def test_rollout_writes_resumes_and_scores(assets, tmp_path):
    out = tmp_path / "preds.jsonl"
    first = _run("--config", str(assets["config"]), "--split", "val", "--limit", "3",
                 "--adapter", str(assets["root"] / "adapter"), "--out", str(out))
    assert first.returncode == 0, first.stderr[-2000:]
    rows = read_predictions(out)
    val = read_records(assets["data_dir"] / "val.jsonl")
    assert [r["id"] for r in rows] == [r.id for r in val[:3]]
    assert all(r["sample_index"] == 0 for r in rows)
    # greedy responses equal a plain full-forward greedy decode of the adapted model
    tok = load_tokenizer(load_config(assets["config"]).model.path)
    cfg = load_config(assets["config"])
    for row, rec in zip(rows, val):
        tokens = _greedy_reference(assets["model"].eval(), prompt_ids(rec, tok, cfg.data),
                                   tok.stop_ids)
        text = tok.decode(tokens[:-1] if tokens[-1] in tok.stop_ids else tokens)
        assert row["response"] == text
        assert row["codes"] == list(parse_codes(text).codes)
    # summary line: micro F1 of the file (no span here -> 0 true positives)
    tp = sum(len(set(r["codes"]) & set(v.codes)) for r, v in zip(rows, val))
    assert "written=3 skipped=0" in first.stdout
    assert ("micro_f1=0.0000" in first.stdout) == (tp == 0)
    # rerun: same ids skipped, nothing duplicated; a larger limit appends only the new record
    again = _run("--config", str(assets["config"]), "--split", "val", "--limit", "3",
                 "--adapter", str(assets["root"] / "adapter"), "--out", str(out))
    assert again.returncode == 0 and "written=0 skipped=3" in again.stdout
    assert len(out.read_text().splitlines()) == 3
    more = _run("--config", str(assets["config"]), "--split", "val", "--limit", "4",
                "--adapter", str(assets["root"] / "adapter"), "--out", str(out))
    assert more.returncode == 0 and "written=1 skipped=3" in more.stdout
    assert [r["id"] for r in read_predictions(out)] == [r.id for r in val[:4]]
    for text in (first.stdout + first.stderr, more.stdout + more.stderr):
        assert val[0].note[:40] not in text


def test_sampled_n_rows_and_bad_override(assets, tmp_path):
    out = tmp_path / "sampled.jsonl"
    ok = _run("--config", str(assets["config"]), "--split", "val", "--limit", "2", "--n", "3",
              "--temperature", "1.0", "--out", str(out))
    assert ok.returncode == 0, ok.stderr[-2000:]
    rows = read_predictions(out)
    assert [(r["sample_index"]) for r in rows] == [0, 1, 2, 0, 1, 2]
    bad = _run("--config", str(assets["config"]), "--split", "val", "rollout.max_new_tokns=3")
    assert bad.returncode == 2
    assert "rollout.max_new_tokns" in bad.stderr and "Traceback" not in bad.stderr
    missing = _run("--config", str(assets["config"]), "--split", "nosuch")
    assert missing.returncode == 2 and "nosuch.jsonl" in missing.stderr
