"""Checkpoints: exact resume, atomicity, retention, no pickle, merged export, errors, signals."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import minicd.checkpoint as ckpt_mod
from minicd import CheckpointError
from minicd.checkpoint import (SigtermFlag, capture_rng, config_diff, export_merged,
                               latest_checkpoint, load_checkpoint, restore_rng, resume_checkpoint,
                               save_checkpoint)
from minicd.model.hub import build_model
from minicd.model.lora import LoRAConfig, inject_lora, lora_parameters, lora_state_dict
from minicd.model.hf_config import DecoderConfig

sys.path.insert(0, str(Path(__file__).parent))

VOCAB, SEQ, N_DATA, BATCH, TOTAL, WARMUP = 64, 10, 12, 3, 6, 2
LCFG = LoRAConfig(r=4, alpha=8.0, dropout=0.2)
DATA = torch.randint(0, VOCAB, (N_DATA, SEQ), generator=torch.Generator().manual_seed(3))
CONFIG_TEXT = '[sft]\nlr = 0.01\nepochs = 1\n\n[lora]\nr = 4\n'


def tiny_config() -> DecoderConfig:
    return DecoderConfig(model_type="qwen3", vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=64, qk_norm=True,
                      tie_word_embeddings=True)


def cosine_with_warmup(step: int) -> float:
    if step < WARMUP:
        return (step + 1) / WARMUP
    return 0.5 * (1 + math.cos(math.pi * (step - WARMUP) / (TOTAL - WARMUP)))


def make(lora_seed: int = 1, lora: bool = True):
    """A tiny model (LoRA with nonzero B, or full fine-tuning), AdamW and a LambdaLR schedule."""
    model = build_model(tiny_config(), seed=0)
    if lora:
        inject_lora(model, LCFG, generator=torch.Generator().manual_seed(lora_seed))
        g = torch.Generator().manual_seed(lora_seed + 100)
        with torch.no_grad():
            for p in lora_parameters(model):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_warmup)
    return model, opt, sched


def train(model, opt, sched, rng: np.random.Generator, steps: int, lrs: list[float]) -> None:
    """Steps whose batch order comes from ``rng`` and whose LoRA dropout uses torch's RNG."""
    model.train()
    for _ in range(steps):
        ids = DATA[torch.from_numpy(rng.choice(N_DATA, size=BATCH, replace=False))]  # [B, T]
        logits = model(ids)  # [B, T, V]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB),
                                                 ids[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()


def save(run, step, model, opt, sched, rng=None, **kw):
    return save_checkpoint(run, step, model=model, optimizer=opt, scheduler=sched, lora_cfg=LCFG,
                           trainer_state={"epoch": 0, "sampler": {"seen": step * BATCH}},
                           config_text=CONFIG_TEXT, rng=capture_rng(rng), **kw)


def test_exact_resume_and_rng_matters(tmp_path):
    with torch.random.fork_rng():
        torch.manual_seed(123)
        model, opt, sched = make()
        full_lrs: list[float] = []
        train(model, opt, sched, np.random.default_rng(7), TOTAL, full_lrs)
        want = {k: v.clone() for k, v in lora_state_dict(model).items()}

        torch.manual_seed(123)
        model, opt, sched = make()
        rng = np.random.default_rng(7)
        lrs: list[float] = []
        train(model, opt, sched, rng, 3, lrs)
        path = save(tmp_path, 3, model, opt, sched, rng)
        assert path == tmp_path / "checkpoints" / "step-00000003"

        def resumed(restore: bool) -> tuple[dict, list[float]]:
            torch.manual_seed(999)                  # a new process: other global RNG state,
            model, opt, sched = make(lora_seed=5)   # other adapter init
            rng = np.random.default_rng(0)
            state = load_checkpoint(resume_checkpoint(tmp_path), model=model, optimizer=opt,
                                    scheduler=sched)
            assert state["step"] == 3 and state["trainer"]["sampler"] == {"seen": 9}
            assert state["config_text"] == CONFIG_TEXT
            if restore:
                restore_rng(state["rng"], rng)
            more: list[float] = []
            train(model, opt, sched, rng, 3, more)
            return lora_state_dict(model), more

        got, more = resumed(restore=True)
        assert lrs + more == pytest.approx(full_lrs, rel=0, abs=1e-12)
        assert full_lrs[0] == pytest.approx(0.005) and full_lrs[1] == pytest.approx(0.01)
        assert got.keys() == want.keys() and len(got) == 2 * 7 * 2  # layers x targets x (A, B)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6, msg=k)

        bad, _ = resumed(restore=False)             # RNG restore is what makes it exact
        assert max((bad[k] - want[k]).abs().max().item() for k in want) > 1e-4


def test_full_finetune_round_trip(tmp_path):
    model, opt, sched = make(lora=False)
    train(model, opt, sched, np.random.default_rng(1), 1, [])
    save_checkpoint(tmp_path, 1, model=model, optimizer=opt, scheduler=sched, trainer_state={},
                    config_text=CONFIG_TEXT)
    assert (tmp_path / "checkpoints/step-00000001/model/model.safetensors").is_file()
    model2, opt2, sched2 = make(lora=False)
    with torch.no_grad():
        for p in model2.parameters():
            p.zero_()
    load_checkpoint(latest_checkpoint(tmp_path), model=model2, optimizer=opt2, scheduler=sched2)
    for k, v in model.state_dict().items():
        assert torch.equal(model2.state_dict()[k], v), k
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"] and s1["state"].keys() == s2["state"].keys()
    for i in s1["state"]:
        for name, t in s1["state"][i].items():
            assert torch.equal(s2["state"][i][name], t), (i, name)
    assert sched2.last_epoch == 1


def test_crash_mid_save_keeps_previous(tmp_path, monkeypatch):
    model, opt, sched = make()
    first = save(tmp_path, 1, model, opt, sched)
    real = ckpt_mod.save_file

    def crash(tensors, filename, *a, **k):
        assert (Path(filename).parent / "adapter" / "adapter_model.safetensors").is_file()
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save(tmp_path, 2, model, opt, sched)
    monkeypatch.setattr(ckpt_mod, "save_file", real)
    root = tmp_path / "checkpoints"
    assert sorted(os.listdir(root)) == ["latest", "step-00000001"]
    assert (root / "latest").read_text().strip() == "step-00000001"
    assert latest_checkpoint(tmp_path) == first

    # a hard crash (no cleanup) leaves a temp dir, even one that looks complete: ignored
    stale = root / "step-00000002.tmp-424242"
    (stale / "adapter").mkdir(parents=True)
    (stale / "trainer_state.json").write_text("{}")
    assert latest_checkpoint(tmp_path) == first
    (root / "latest").unlink()                       # lost pointer: fall back to a scan
    assert latest_checkpoint(tmp_path) == first
    (root / "latest").write_text("step-00000009\n")  # dangling pointer: same
    assert latest_checkpoint(tmp_path) == first
    save(tmp_path, 2, model, opt, sched)
    assert sorted(os.listdir(root)) == ["latest", "step-00000001", "step-00000002"]
    assert latest_checkpoint(tmp_path) == root / "step-00000002"


def test_keep_last(tmp_path):
    model, opt, sched = make()
    for step in (10, 20, 30, 40):
        save(tmp_path, step, model, opt, sched, keep_last=2)
    root = tmp_path / "checkpoints"
    assert sorted(os.listdir(root)) == ["latest", "step-00000030", "step-00000040"]
    assert latest_checkpoint(tmp_path) == root / "step-00000040"
    save(tmp_path, 40, model, opt, sched, keep_last=2)  # re-saving a step replaces it
    assert sorted(os.listdir(root)) == ["latest", "step-00000030", "step-00000040"]


def test_no_pickle(tmp_path, monkeypatch):
    calls = []
    real_load = torch.load

    def guarded(*a, **k):
        calls.append(k.get("weights_only"))
        return real_load(*a, **k)

    monkeypatch.setattr(torch, "load", guarded)
    model, opt, sched = make()
    train(model, opt, sched, np.random.default_rng(1), 1, [])
    path = save(tmp_path, 1, model, opt, sched, np.random.default_rng(2))
    model2, opt2, sched2 = make()
    load_checkpoint(path, model=model2, optimizer=opt2, scheduler=sched2)
    assert all(c is True for c in calls)
    files = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    assert files == ["adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                     "config.toml", "optimizer.json", "optimizer.safetensors", "rng.safetensors",
                     "trainer_state.json"]
    for f in files:
        if f.endswith(".json"):
            json.loads((path / f).read_text())
        elif f.endswith(".safetensors"):
            with safe_open(str(path / f), "pt") as st:
                assert len(list(st.keys())) > 0
    with safe_open(str(path / "optimizer.safetensors"), "pt") as st:
        keys = set(st.keys())
    n = len(lora_parameters(model))
    assert keys == {f"state.{i}.{s}" for i in range(n) for s in ("exp_avg", "exp_avg_sq", "step")}
    meta = json.loads((path / "optimizer.json").read_text())
    assert meta["param_names"][0] == "model.layers.0.self_attn.q_proj.lora_A.weight"
    assert meta["param_groups"][0]["params"] == list(range(n))


def test_merged_export_matches_lora_model(tmp_path):
    model, _, _ = make()
    model.eval()
    out = export_merged(model, tmp_path / "merged")
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        ours, theirs = model(DATA[:2]), hf(DATA[:2]).logits
    assert (ours - theirs).abs().max().item() <= 1e-5
    from minicd.model.lora import disable_adapters
    with torch.no_grad(), disable_adapters(model):   # the export really contains the adapter
        assert (model(DATA[:2]) - theirs).abs().max().item() > 1e-4


def test_errors(tmp_path):
    with pytest.raises(CheckpointError, match=str(tmp_path / "checkpoints")):
        resume_checkpoint(tmp_path)
    model, opt, sched = make()
    path = save(tmp_path, 1, model, opt, sched)
    (path / "optimizer.json").unlink()
    with pytest.raises(CheckpointError, match="optimizer.json"):
        load_checkpoint(path, model=model, optimizer=opt)
    with pytest.raises(CheckpointError, match="keep_last"):
        save(tmp_path, 2, model, opt, sched, keep_last=0)
    old = '[sft]\nlr = 0.01\nepochs = 1\n\n[lora]\nr = 4\ntarget = ["q", "v"]\n'
    new = '[sft]\nlr = 0.02\nepochs = 1\n\n[lora]\nr = 4\ntarget = ["q"]\n\n[log]\nevery = 5\n'
    assert config_diff(old, new) == ["log.every", "lora.target", "sft.lr"]
    assert config_diff(old, old) == []


def test_sigterm_flag_sets_flag_and_restores_handler():
    before = signal.getsignal(signal.SIGTERM)
    with SigtermFlag() as flag:
        assert not flag.triggered
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.triggered and flag.signum == signal.SIGTERM and flag.any_rank()
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.distributed
def test_fsdp2_resume_matches_uninterrupted(tmp_path):
    """2 ranks (gloo): 4 steps straight == 2 steps, save, rebuild with other seeds, load, 2 more."""
    from test_dist import _env, _free_port

    script = Path(__file__).parent / "dist_scripts" / "ckpt_resume.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(script),
           str(tmp_path)]
    subprocess.run(cmd, check=True, env=_env(), timeout=300)
    full = tmp_path / "full" / "checkpoints" / "step-00000004"
    part = tmp_path / "part" / "checkpoints"
    assert sorted(os.listdir(part)) == ["latest", "step-00000002", "step-00000004"]
    for name in ("adapter/adapter_model.safetensors", "optimizer.safetensors"):
        a, b = load_file(full / name), load_file(part / "step-00000004" / name)
        assert a.keys() == b.keys() and len(a) == 2 * 7 * 2 * (1 if "adapter" in name else 3)
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)
    end = load_file(full / "adapter" / "adapter_model.safetensors")
    mid = load_file(part / "step-00000002" / "adapter" / "adapter_model.safetensors")
    assert max((mid[k] - end[k]).abs().max().item() for k in end) > 1e-4   # steps 3-4 moved it
    ja = json.loads((full / "optimizer.json").read_text())
    assert ja == json.loads((part / "step-00000004" / "optimizer.json").read_text())
    # same file layout as one process: index-keyed state, names in optimizer order
    assert ja["param_groups"][0]["params"] == list(range(28))
    assert ja["param_names"][:2] == ["model.layers.0.self_attn.q_proj.lora_A.weight",
                                     "model.layers.0.self_attn.q_proj.lora_B.weight"]
    state = json.loads((part / "step-00000004" / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["scheduler"]["last_epoch"] == 4 and len(state["rng"]) == 2
