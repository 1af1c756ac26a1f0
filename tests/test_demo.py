"""End to end: the fast variant of `make demo` runs the whole ladder on CPU (CI's e2e test).

Synthetic corpus -> preprocessing -> tokenizer + tiny model -> zero-shot baseline -> SFT ->
GRPO -> the hint probe -> PHI -> a CAML baseline (train.py --stage classifier) -> evaluate.py, every step the same CLI call the README shows. Asserts that every
stage wrote its checkpoint and metrics and that SFT clearly beats the prompting baseline.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from minicd.data.records import read_records

REPO = Path(__file__).resolve().parents[1]
# Measured on the fast variant (see README "The demo"): SFT test micro-F1 was 0.38 (3 min run);
# the threshold leaves a wide margin for seed and thread-count noise.
SFT_MIN_MICRO_F1 = 0.20
# CAML from scratch, 3 epochs on the fast corpus: test micro-F1 0.67 when measured (25 s).
CAML_MIN_MICRO_F1 = 0.40


@pytest.mark.slow
def test_fast_demo_runs_the_whole_ladder(tmp_path):
    if shutil.which("make") is None:
        pytest.fail("`make` is required for the demo end-to-end test")
    demo = tmp_path / "demo"
    env = {**os.environ, "MINICD_NO_PROGRESS": "1"}
    proc = subprocess.run(["make", "--no-print-directory", "demo-fast", f"DEMO={demo}"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = Path(f"{demo}-fast")

    for stage in ("sft", "grpo"):
        assert (out / stage / "metrics.jsonl").stat().st_size > 0, stage
        assert any((out / stage / "checkpoints").glob("step-*")), stage
    assert (out / "sft" / "model" / "model.safetensors").is_file()
    assert (out / "grpo" / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "phi" / "phi_rounds.jsonl").stat().st_size > 0
    assert any((out / "phi").glob("round-*/checkpoints/step-*"))
    assert (out / "phi" / "adapter" / "adapter_model.safetensors").is_file()
    # the hint probe before PHI: 16 training notes, each shown its 2 rarest gold codes
    probe = json.loads((out / "hint_probe.json").read_text())
    train = read_records(out / "data" / "mimic3" / "top50" / "train.jsonl")[:16]
    assert (probe["notes"], probe["hinted_codes"]) == (16, sum(min(2, len(set(r.codes)))
                                                               for r in train))
    assert 0 <= probe["answered_hinted"] <= probe["hinted_codes"]

    results = json.loads((out / "eval" / "results.json").read_text())
    text = json.dumps(results)
    assert all(name in text for name in ("Zero-shot", "SFT", "GRPO", "PHI"))
    assert (out / "eval" / "bucket_recall.png").stat().st_size > 0     # matplotlib: plot extra
    assert (out / "eval" / "training_curves.png").stat().st_size > 0
    table = (out / "eval" / "table.md").read_text()
    assert len([line for line in table.splitlines() if line.startswith("|")]) >= 2 + 4

    f1 = {}
    for run in _runs(results):
        f1[run["method"]] = run["micro_f1"]
    assert f1["SFT"] > SFT_MIN_MICRO_F1, f1
    assert f1["SFT"] > f1["Zero-shot"] + 0.05, f1
    for name in ("GRPO", "PHI"):
        assert 0.0 <= f1[name] <= 1.0
    # the discriminative baseline: its own group above the LLM rows, threshold saved with it
    assert f1["CAML"] > CAML_MIN_MICRO_F1, f1
    assert 0.0 <= json.loads((out / "caml" / "classifier.json").read_text())["threshold"] <= 1.0
    assert table.index("**PLM Baselines**") < table.index("| CAML |") < table.index("| SFT |")


def _runs(results: dict):
    """(method, micro_f1) per run from evaluate.py's results.json."""
    for run in results["runs"]:
        yield {"method": run["method"], "micro_f1": run["metrics"]["micro_f1"]}
