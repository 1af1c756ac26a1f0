"""The GRPO and PHI stage loops with ``rollout.engine = "vllm"`` (CPU vLLM, tiny Qwen3): each stage
builds ONE engine, reuses it for every rollout, validation, round and refresh, and closes it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import minicd.rollout.vllm_engine as vllm_engine
from minicd.config import load_config
from minicd.data.records import read_records
from minicd.log import read_metrics
from minicd.predictions import read_predictions
from minicd.train.grpo import run_grpo
from minicd.train.phi import run_phi
from train_fixtures import build_assets


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_stage")
    # vLLM's CPU attention needs head_dim >= 64
    built = build_assets(root, hidden_size=128, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=64)
    config = root / "stage.toml"
    config.write_text(f"""
[model]
path = "{built['model_dir']}"
[lora]
r = 4
alpha = 8.0
[data]
dir = "{built['data_dir']}"
max_prompt_tokens = 900     # room for the PHI hint block; + 6 + 64 <= 1024 positions
train_limit = 6
val_limit = 2
[train]
seed = 0
device = "cpu"
micro_batch_size = 4
save_every = 100
eval_every = 100
max_steps = 2
[grpo]
group_size = 2
prompts_per_step = 2
lr = 1e-2
[rollout]
engine = "vllm"
max_new_tokens = 6
sleep = true
[phi]
rounds = 1
""")
    return {"config": config, **built}


@pytest.fixture
def engine_log(monkeypatch):
    """Counts VLLMEngine constructions and closes (the real engine runs)."""
    log = {"built": 0, "closed": 0, "versions": []}
    real_init, real_close = vllm_engine.VLLMEngine.__init__, vllm_engine.VLLMEngine.close

    def init(self, *args, **kwargs):
        log["built"] += 1
        real_init(self, *args, **kwargs)

    def close(self):
        if getattr(self, "llm", None) is not None:
            log["closed"] += 1
            log["versions"].append(self.weight_version)
        real_close(self)

    monkeypatch.setattr(vllm_engine.VLLMEngine, "__init__", init)
    monkeypatch.setattr(vllm_engine.VLLMEngine, "close", close)
    return log


def test_grpo_and_phi_stages_each_use_one_vllm_engine(assets, engine_log, tmp_path):
    # GRPO: 2 steps, validation at the start and at the end, all through one engine
    out = tmp_path / "grpo"
    res = run_grpo(load_config(assets["config"], [f"train.output_dir={json.dumps(str(out))}"]))
    assert res["steps"] == [1, 2] and res["stopped"] is False
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert r["response_tokens"] > 0 and r["rollout_prompts_rank_max"] == 2
    assert "val/micro_f1" in rows[0] and "val/micro_f1" in rows[-1]
    # one engine: syncs before step-0 validation, steps 1 and 2, and the final validation
    assert engine_log["built"] == 1 and engine_log["closed"] == 1
    assert engine_log["versions"] == [4]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()

    # PHI: round-0 pools, one GRPO round and its refresh, all through one engine
    out = tmp_path / "phi"
    res = run_phi(load_config(assets["config"], [f"train.output_dir={json.dumps(str(out))}",
                                                 "data.val_limit=0"]))
    assert res["stopped"] is False and res["round"] == 0
    assert engine_log["built"] == 2 and engine_log["closed"] == 2
    # syncs: round-0 pools, GRPO steps 1 and 2, the refresh of the final policy
    assert engine_log["versions"] == [4, 4]
    train_ids = [r.id for r in read_records(Path(assets["data_dir"]) / "train.jsonl")[:6]]
    for path in (out / "init_train_predictions.jsonl", out / "round-0" / "train_predictions.jsonl"):
        assert sorted(row["id"] for row in read_predictions(path)) == sorted(train_ids)
    (row,) = read_metrics(out / "phi_rounds.jsonl")
    assert row["grpo_steps"] == 2 and row["prompts"] == 4
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
