"""bench/gpu_check.py: the one-call GPU check runs its code paths on CPU with tiny shapes, and its
FLOP count matches the public Qwen3-4B parameter count."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import gpu_check  # noqa: E402


def test_qwen3_4b_non_embedding_parameters():
    """Qwen3-4B's model card: 4.0B parameters, 3.6B non-embedding. By hand: per layer, q/o
    2560 x 4096 each, k/v 2560 x 1024 each (26.2M) plus the MLP 3 x 2560 x 9728 (74.7M);
    36 layers: 3.632B."""
    cfg = gpu_check.qwen3(gpu_check.QWEN3_4B, max_len=8192)
    n = gpu_check.nonembedding_params(cfg)
    assert n == 36 * (2560 * 128 * (2 * 32 + 2 * 8) + 3 * 2560 * 9728)
    assert 3.6e9 <= n < 3.65e9
    embed = cfg.vocab_size * cfg.hidden_size  # tied: counted once
    assert 3.95e9 < n + embed < 4.05e9
    # one 1-token forward, head on it: 2 flops per weight plus the head; attention 2*2*1/2*H*D*L
    f = gpu_check.forward_flops(cfg, [1], 1)
    assert f == 2 * n + 2 * 2 * 0.5 * 32 * 128 * 36 + 2 * 2560 * 151936


def test_tiny_cpu_run_reports_every_section(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--device",
                           "cpu", "--tiny", "--out", str(tmp_path / "r.json")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report == json.loads((tmp_path / "r.json").read_text())
    assert "errors" not in report and "skipped" not in report and report["tiny"] is True
    assert report["total_s"] < 120
    b = report["bf16_vs_fp32"]
    assert 0 < b["max_abs_diff"] < 0.1 * b["logit_abs_max"] and b["argmax_agreement"] >= 0.9
    assert b["minicd_vs_transformers_fp32_max_abs_diff"] < 1e-4
    r = report["fwd_bwd_vs_transformers"]["ratio_minicd_over_transformers"]
    assert math.isfinite(r) and r > 0
    g = report["grpo_update"]
    for key in ("shared_prefix_on", "shared_prefix_off"):
        assert g[key]["time_s"] > 0 and g[key]["grad_norm"] > 0
        assert g[key]["mfu"] is None and g[key]["peak_memory_gib"] is None  # CPU: no peak
    assert g["grad_norm_rel_diff_on_vs_off"] < 0.05
    plan = gpu_check.TINY_PLAN
    for key in ("seeded_per_prompt", "unseeded_one_batch"):  # no stop ids: every token is made
        s = report["torch_engine_sampling"][key]
        assert s["new_tokens"] == plan.prompts * plan.group * plan.response_tokens
    # a random-init model's cross-entropy is about ln(vocab)
    assert abs(report["sft_step"]["loss"] - math.log(gpu_check.TINY["vocab_size"])) < 1.0
