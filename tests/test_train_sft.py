"""SFT stage loop end to end on a tiny from-scratch Qwen3 and a small synthetic MIMIC-III set."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from minicd.config import load_config
from minicd.data.records import read_records
from minicd.log import read_metrics
from minicd.model.hub import load_model, load_tokenizer
from minicd.train.common import cosine_lambda, greedy_validate
from minicd.train.sft import epoch_micro_batches, run_sft
from train_fixtures import build_assets

REPO = Path(__file__).resolve().parents[1]
STEP_KEYS = {"step", "loss", "lr", "grad_norm", "tokens_per_s", "response_tokens", "step_time_s"}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    built = build_assets(root)
    model_dir, data_dir = built["model_dir"], built["data_dir"]
    config = root / "sft.toml"
    config.write_text(f"""
[model]
path = "{model_dir}"
[lora]
r = 4
alpha = 8.0
[data]
dir = "{data_dir}"
max_prompt_tokens = 384
train_limit = 64
val_limit = 4
[train]
seed = 0
device = "cpu"
micro_batch_size = 4
grad_accum = 2
eval_every = 3
save_every = 3
keep_last = 2
[sft]
lr = 1e-2
warmup_ratio = 0.0
[rollout]
max_new_tokens = 8
""")
    return {"root": root, "config": config}


def _cfg(assets, out: Path, *overrides: str):
    return load_config(assets["config"], [f"train.output_dir={json.dumps(str(out))}", *overrides])


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def test_cosine_lambda_by_hand():
    # warmup 2 of 10 steps: 1/3, 2/3, then 0.5 (1 + cos(pi k / 8))
    assert cosine_lambda(0, 2, 10) == pytest.approx(1 / 3)
    assert cosine_lambda(1, 2, 10) == pytest.approx(2 / 3)
    assert cosine_lambda(2, 2, 10) == pytest.approx(1.0)
    assert cosine_lambda(6, 2, 10) == pytest.approx(0.5)
    assert cosine_lambda(10, 2, 10) == pytest.approx(0.0)


def test_length_grouping_order():
    lengths = [5, 50, 7, 40, 9, 30, 11, 20]
    a = epoch_micro_batches(lengths, 2, seed=3, epoch=0, length_grouping=True)
    assert a == epoch_micro_batches(lengths, 2, seed=3, epoch=0, length_grouping=True)
    assert sorted(i for mb in a for i in mb) == list(range(8))
    # one mega-batch: sorted by length, so pairs are neighbours in length order
    assert sorted(sorted(mb) for mb in a) == [[0, 2], [1, 3], [4, 6], [5, 7]]
    b = epoch_micro_batches(lengths, 3, seed=3, epoch=1, length_grouping=False)
    assert [len(mb) for mb in b] == [3, 3, 2]
    assert sorted(i for mb in b for i in mb) == list(range(8))


def test_sft_run_lowers_loss_and_writes_outputs(assets, tmp_path):
    out = tmp_path / "run"
    result = run_sft(_cfg(assets, out, "train.max_steps=6"))
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4, 5, 6]
    # step 0 (train.eval_at_start): greedy validation of the starting policy. The fresh adapter's
    # B is zero, so that policy is the base model: score it independently here.
    cfg = _cfg(assets, out)
    base = load_model(cfg.model.path, dtype=torch.float32)
    tok = load_tokenizer(cfg.model.path)
    val = read_records(Path(cfg.data.dir) / "val.jsonl")[:cfg.data.val_limit]
    expected = greedy_validate(base, tok, val, cfg.data, cfg.rollout.max_new_tokens)
    start, rows = rows[0], rows[1:]
    assert set(start) == {"step", "time_s", *expected}
    for k, v in expected.items():
        assert start[k] == pytest.approx(v, abs=1e-12), k
    for r in rows:
        assert STEP_KEYS <= set(r)
        assert r["response_tokens"] > 0 and r["tokens_per_s"] > 0
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert rows[0]["lr"] == pytest.approx(1e-2)          # no warm-up: full lr at step 1
    assert rows[3]["lr"] == pytest.approx(1e-2 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 3 / 6)).item()))
    # validation at steps 3 and 6, fractions in [0, 1]
    for r in (rows[2], rows[5]):
        for k in ("val/micro_f1", "val/macro_f1", "val/span_rate"):
            assert 0.0 <= r[k] <= 1.0
    assert "val/micro_f1" not in rows[0]
    assert 0.0 <= result["val/micro_f1"] <= 1.0 and result["step"] == 6
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert ckpts == ["step-00000003", "step-00000006"]
    adapter = _adapter(out)
    assert adapter and all(k.startswith("base_model.model.") for k in adapter)
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8
    # nothing of any note in the metrics
    text = (out / "metrics.jsonl").read_text()
    note = read_records(Path(load_config(assets["config"]).data.dir) / "train.jsonl")[0].note
    assert note[:40] not in text


def test_sft_projects_only_the_response_positions(assets, tmp_path, monkeypatch):
    """The vocabulary head sees exactly the step's response tokens (the loss positions), not
    every position of the batch."""
    import minicd.algo.logprobs as logprobs

    rows_seen = []
    real = logprobs.token_logprobs_from_hidden

    def spy(hidden, head, targets, **kw):
        rows_seen.append(hidden.reshape(-1, hidden.shape[-1]).shape[0])
        return real(hidden, head, targets, **kw)

    monkeypatch.setattr(logprobs, "token_logprobs_from_hidden", spy)
    out = tmp_path / "run"
    run_sft(_cfg(assets, out, "train.max_steps=1", "data.val_limit=0",
                 "train.eval_at_start=false"))
    rows = read_metrics(out / "metrics.jsonl")
    assert sum(rows_seen) == rows[-1]["response_tokens"] > 0
    assert rows[-1]["response_tokens"] < rows[-1]["tokens_per_s"] * rows[-1]["step_time_s"] / 2


def test_bf16_autocast_runs_the_matmuls_in_bf16_and_keeps_fp32_masters(assets, tmp_path,
                                                                        lora_output_dtypes):
    """train.mixed_precision=bfloat16 in one process: the forward matmuls run in bfloat16
    (torch.autocast), the LoRA weights and their gradients stay float32, and the first step's
    loss (same weights, same batch) is the fp32 loss up to bf16 rounding."""
    from minicd import dist
    from minicd.train.common import compute_autocast

    info1 = dist.DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    info2 = dist.DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    lin = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    for mp, info, want in (("bfloat16", info1, torch.bfloat16), (None, info1, torch.float32),
                           ("float32", info1, torch.float32),
                           ("bfloat16", info2, torch.float32)):  # FSDP2's policy casts there
        cfg = _cfg(assets, tmp_path / "x", *([f"train.mixed_precision={mp}"] if mp else []))
        with compute_autocast(cfg, info):
            assert lin(x).dtype == want, (mp, info.world_size)

    seen = lora_output_dtypes  # output dtypes of the LoRA-wrapped projections, one set per run
    losses = {}
    for mp in ("float32", "bfloat16"):
        out = tmp_path / mp
        seen.append(set())
        run_sft(_cfg(assets, out, "train.max_steps=1", "data.val_limit=0",
                     "train.eval_at_start=false", f"train.mixed_precision={mp}"))
        losses[mp] = read_metrics(out / "metrics.jsonl")[-1]["loss"]
        adapter = _adapter(out)
        assert {t.dtype for t in adapter.values()} == {torch.float32}
    assert seen == [{torch.float32}, {torch.bfloat16}]
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=2e-2)
    assert losses["bfloat16"] != losses["float32"]  # it did run in a different precision


def test_resume_is_exact(assets, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    run_sft(_cfg(assets, full, "train.max_steps=6", "data.val_limit=0"))
    # the same run, stopped after its step-3 checkpoint: drop everything written later
    shutil.copytree(full, part)
    shutil.rmtree(part / "checkpoints" / "step-00000006")
    shutil.rmtree(part / "adapter")
    res = run_sft(_cfg(assets, part, "train.max_steps=6", "data.val_limit=0", "train.resume=true"))
    assert res["step"] == 6
    a, b = _adapter(full), _adapter(part)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k
    # the resumed run started at step 4: the copied run's lines 4..6 were dropped, each step once
    assert [r["step"] for r in read_metrics(part / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MINICD_NO_PROGRESS": "1"}
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli(assets, tmp_path):
    out = tmp_path / "cli"
    ok = _cli("--stage", "sft", "--config", str(assets["config"]), f"train.output_dir={out}",
              "train.max_steps=1", "data.val_limit=1", "train.num_threads=1")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [0, 1]  # 0: eval_at_start
    bad = _cli("--stage", "sft", "--config", str(assets["config"]), "sft.learning_rate=1")
    assert bad.returncode == 2
    assert "sft.learning_rate" in bad.stderr and "Traceback" not in bad.stderr
    unknown = _cli("--stage", "dpo", "--config", str(assets["config"]))
    assert unknown.returncode == 2 and "dpo" in unknown.stderr


def test_greedy_validate_scores_parsed_responses(monkeypatch):
    import minicd.train.common as common
    from minicd.data.records import Record
    from minicd.rollout.engine import Generation

    texts = ["<code>401.9</code>", "<code>584.9, 250.00</code>", "no answer"]

    class FakeEngine:
        def __init__(self, model, tok, max_batch_size):
            pass

        def generate(self, prompts, params):
            assert params.temperature == 0.0 and params.max_new_tokens == 5
            return [[Generation(i, 0, [7], texts[i], "stop" if i else "length")]
                    for i in range(len(prompts))]

    monkeypatch.setattr(common, "TorchEngine", FakeEngine)
    recs = [Record(str(i), str(i), "val", "note", codes, "icd9")
            for i, codes in enumerate([("401.9", "428.0"), ("584.9",), ("401.9",)])]
    tok = SimpleNamespace(stop_ids=(2,))
    m = common.greedy_validate(None, tok, recs, None, 5, prompts=[[1], [1], [1]])
    # label space {401.9, 428.0, 584.9}; 250.00 is outside it and ignored.
    # micro: tp 2 (401.9, 584.9), fp 0, fn 2 (428.0, 401.9 of doc 3)
    assert m["val/micro_precision"] == pytest.approx(1.0)
    assert m["val/micro_recall"] == pytest.approx(0.5)
    assert m["val/micro_f1"] == pytest.approx(4 / 6)
    # macro F1: 401.9 tp1 fn1 -> 2/3; 428.0 -> 0; 584.9 -> 1
    assert m["val/macro_f1"] == pytest.approx((2 / 3 + 0 + 1) / 3)
    assert m["val/span_rate"] == pytest.approx(2 / 3)
    assert m["val/truncation_rate"] == pytest.approx(1 / 3)


def test_sigterm_saves_and_stops(assets, tmp_path, monkeypatch):
    import signal

    import minicd.train.sft as sft

    class SignalAtStep2(sft.SigtermFlag):
        calls = 0

        def any_rank(self):
            SignalAtStep2.calls += 1
            if SignalAtStep2.calls == 2:
                os.kill(os.getpid(), signal.SIGTERM)  # the real handler sets the flag
            return super().any_rank()

    monkeypatch.setattr(sft, "SigtermFlag", SignalAtStep2)
    out = tmp_path / "term"
    res = run_sft(_cfg(assets, out, "train.max_steps=6", "data.val_limit=0"))
    assert res["stopped"] is True and res["step"] == 2
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000002"
    assert not (out / "adapter").exists()
    state = json.loads((out / "checkpoints" / "step-00000002" / "trainer_state.json").read_text())
    # 64 examples / (4 x 2) = 8 steps per epoch: step 2 is epoch 0, index 2
    assert state["trainer"]["epoch"] == 0 and state["trainer"]["index"] == 2


def test_full_finetune_writes_model(assets, tmp_path):
    from minicd.model.hub import load_model

    out = tmp_path / "full"
    run_sft(_cfg(assets, out, "train.max_steps=1", "data.val_limit=0", "lora.enabled=false"))
    tuned = load_model(out / "model")
    base = load_model(load_config(assets["config"]).model.path)
    assert not (out / "adapter").exists()
    diff = [n for n, p in tuned.named_parameters()
            if not torch.equal(p, dict(base.named_parameters())[n])]
    assert len(diff) > 0
    # the export is standalone: the next stage can use it as model.path (tokenizer included)
    from minicd.model.hub import load_tokenizer
    base_dir = load_config(assets["config"]).model.path
    assert load_tokenizer(out / "model").encode("discharge diagnosis") == \
        load_tokenizer(base_dir).encode("discharge diagnosis")


def test_merged_export_serves_the_adapted_policy(assets, tmp_path):
    from minicd.model.hub import load_model, load_tokenizer
    from minicd.model.lora import load_adapter

    out = tmp_path / "merged_run"
    run_sft(_cfg(assets, out, "train.max_steps=2", "data.val_limit=0", "sft.lr=5e-2",
                 "train.export_merged=true"))
    base_dir = load_config(assets["config"]).model.path
    adapted = load_model(base_dir)
    load_adapter(adapted, out / "adapter")
    merged = load_model(out / "merged")
    ids = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, m, b = adapted.eval()(ids), merged.eval()(ids), load_model(base_dir).eval()(ids)
    assert (a - b).abs().max() > 1e-4                 # the adapter matters
    torch.testing.assert_close(m, a, rtol=0, atol=1e-5)
    assert load_tokenizer(out / "merged").template == load_tokenizer(base_dir).template
