"""GRPO stage loop on a tiny from-scratch Qwen3 and a small synthetic MIMIC-III set.

Most runs use a scripted rollout engine (responses drawn from a fixed pool of code answers with
per-(prompt, sample) seeds, as the vLLM engine seeds them), so rewards vary within groups and the
adapter moves; one CLI run uses the real torch engine end to end.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import minicd.rollout.inference as inference
import minicd.train.grpo as grpo
from minicd.algo.grpo import policy_loss
from minicd.algo.logprobs import model_token_logprobs
from minicd.config import GRPOConfig, load_config
from minicd.data.records import read_records
from minicd.errors import ConfigError
from minicd.log import read_metrics
from minicd.model.hub import load_model, load_tokenizer
from minicd.model.lora import LoRAConfig, disable_adapters, inject_lora, lora_modules
from minicd.rollout.engine import Generation
from minicd.train.common import prompt_ids
from train_fixtures import build_assets, save_sft_adapter

REPO = Path(__file__).resolve().parents[1]
STEP_KEYS = {"step", "reward_mean", "reward_std", "batch_micro_f1", "zero_var_frac", "span_rate",
             "loss", "pg_loss", "kl", "entropy", "clip_frac_low", "clip_frac_high",
             "dual_clip_frac", "approx_kl_old", "ratio_mean", "response_len_mean",
             "truncation_rate", "response_tokens", "grad_norm", "lr", "time_gen_s", "time_logp_s",
             "time_update_s", "step_time_s", "tokens_per_s", "epoch"}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    built = build_assets(root)
    config = root / "grpo.toml"
    config.write_text(f"""
[model]
path = "{built['model_dir']}"
[lora]
r = 4
alpha = 8.0
[data]
dir = "{built['data_dir']}"
max_prompt_tokens = 256
train_limit = 12
val_limit = 0
[train]
seed = 0
device = "cpu"
micro_batch_size = 3
eval_every = 2
save_every = 2
keep_last = 3
[grpo]
group_size = 4
prompts_per_step = 2
lr = 5e-2
kl_coef = 0.1
[rollout]
max_new_tokens = 6
""")
    train = read_records(built["data_dir"] / "train.jsonl")[:12]
    top = [c for c, _ in Counter(c for r in train for c in r.codes).most_common(4)]
    pool = [f"<code>{top[0]}</code>", f"<code>{top[0]}, {top[1]}</code>", f"<code>{top[2]}</code>",
            "no answer", f"<code>{top[1]}, {top[3]}, 999.9</code>"]
    return {"config": config, "train": train, "pool": pool, "model_dir": built["model_dir"],
            "tok": load_tokenizer(built["model_dir"])}


def _cfg(assets, out: Path, *overrides: str):
    return load_config(assets["config"], [f"train.output_dir={json.dumps(str(out))}", *overrides])


class PoolEngine:
    """Scripted engine: sample s of prompt i gets pool[rng(seed + i*n + s)]; "no answer" is a
    length-truncated response (no stop token), the others end with <|im_end|>."""

    def __init__(self, tok, pool):
        self.tok, self.pool, self.version, self.calls = tok, pool, 0, []
        self.awake, self.closed = True, False

    def lockstep(self):
        return contextlib.nullcontext()

    def sleep(self):
        self.awake = False

    def wake_up(self):
        self.awake = True

    def close(self):
        self.closed = True

    @property
    def weight_version(self):
        return self.version

    def sync_policy(self, model, state_dict=None):
        self.version += 1
        return self.version

    def text(self, seed: int) -> str:
        return self.pool[int(np.random.default_rng(seed).integers(len(self.pool)))]

    def generate(self, prompts, params):
        assert self.awake and not self.closed
        self.calls.append((len(prompts), params.seed))
        out = []
        for i, _ in enumerate(prompts):
            row = []
            for s in range(params.n):
                text = self.text(params.seed + i * params.n + s)
                stop = text != "no answer"
                ids = self.tok.encode(text) + ([self.tok.im_end_id] if stop else [])
                row.append(Generation(i, s, ids, text, "stop" if stop else "length"))
            out.append(row)
        return out


@pytest.fixture
def pool_engine(assets, monkeypatch):
    engines = []

    def build(cfg, model, tok, lora_cfg, **kwargs):
        engines.append(PoolEngine(tok, assets["pool"]))
        return engines[-1]

    monkeypatch.setattr(inference, "build_engine", build)
    return engines


def _f1(pred: set, gold: set) -> float:
    return 2 * len(pred & gold) / (len(pred) + len(gold)) if pred or gold else 1.0


def _codes(text: str) -> set:
    if "<code>" not in text:
        return set()
    return {c.strip() for c in text.split("<code>")[1].split("</code>")[0].split(",")}


def test_step_prompt_indices_cover_an_epoch_without_repeats():
    steps = [grpo.step_prompt_indices(10, 3, seed=4, step=s) for s in range(3)]
    flat = [i for s in steps for i in s]
    assert all(len(s) == 3 for s in steps) and len(set(flat)) == 9 and set(flat) <= set(range(10))
    assert steps[0] == grpo.step_prompt_indices(10, 3, seed=4, step=0)
    assert grpo.step_prompt_indices(10, 3, seed=4, step=3) != steps[0]      # epoch 1 reshuffles
    assert grpo.step_prompt_indices(10, 3, seed=5, step=0) != steps[0]
    assert grpo.rank_shard(4, 1, 2) == range(2, 4) and grpo.rank_shard(4, 0, 1) == range(0, 4)


def test_one_step_rewards_by_hand(assets, pool_engine, tmp_path):
    out = tmp_path / "one"
    res = grpo.run_grpo(_cfg(assets, out, "train.max_steps=1"))
    engine = pool_engine[0]
    seed = grpo.rollout_seed(0, 0)
    assert engine.calls == [(2, seed)] and engine.version == 1
    recs = [assets["train"][i] for i in grpo.step_prompt_indices(12, 2, 0, 0)]
    texts = [[engine.text(seed + j * 4 + s) for s in range(4)] for j in range(2)]
    rewards = [_f1(_codes(t), set(r.codes)) if "<code>" in t else 0.0
               for r, row in zip(recs, texts) for t in row]
    row = read_metrics(out / "metrics.jsonl")[0]
    assert STEP_KEYS <= set(row)
    assert row["reward_mean"] == pytest.approx(sum(rewards) / 8, abs=1e-12)
    assert row["reward_std"] == pytest.approx(float(np.std(rewards)), abs=1e-12)
    flat = [t for r in texts for t in r]
    assert row["truncation_rate"] == pytest.approx(flat.count("no answer") / 8)
    assert row["span_rate"] == pytest.approx(1 - flat.count("no answer") / 8)
    lengths = [len(assets["tok"].encode(t)) + (t != "no answer") for t in flat]
    assert row["response_len_mean"] == pytest.approx(sum(lengths) / 8)
    zero = sum(max(rewards[4 * j:4 * j + 4]) == min(rewards[4 * j:4 * j + 4]) for j in range(2))
    assert row["zero_var_frac"] == pytest.approx(zero / 2)
    # batch micro F1 in the label space of the batch's gold codes
    space = {c for r in recs for c in r.codes}
    tp = fp = fn = 0
    for r, row_texts in zip(recs, texts):
        for t in row_texts:
            pred, gold = _codes(t) & space, set(r.codes)
            tp, fp, fn = tp + len(pred & gold), fp + len(pred - gold), fn + len(gold - pred)
    assert row["batch_micro_f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert res["step"] == 1 and (out / "adapter" / "adapter_model.safetensors").is_file()


def test_make_reward_builtin_user_and_errors(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    gold = ["401.9", "584.9"]
    f1, f2 = grpo.make_reward("f1"), grpo.make_reward("fbeta:2")
    # one of two gold codes predicted: P = 1, R = 1/2; F1 = 2/3, F2 = 5 PR / (4P + R) = 5/9
    assert f1("<code>401.9</code>", gold)[0] == pytest.approx(2 / 3)
    assert f2("<code>401.9</code>", gold)[0] == pytest.approx(5 / 9)
    # two predicted, one right: P = R = 1/2, every F-beta is 1/2; no span -> 0
    assert f2("<code>401.9, 428.0</code>", gold)[0] == pytest.approx(0.5)
    assert f1("401.9", gold)[0] == f2("401.9", gold)[0] == 0.0
    assert f1("<code>401.9</code>", gold)[1].codes == ("401.9",)
    user = grpo.make_reward("tests.reward_fns:distinct_words")
    value, parsed = user("<code>401.9, 428.0</code> a a b", gold)
    assert value == pytest.approx(4 / 8) and parsed.codes == ("401.9", "428.0")
    for bad, words in (("fbeta:0", "> 0"), ("fbeta:x", "> 0"), ("f2", "expected 'f1'"),
                       ("no_such_module_xyz:f", "cannot import"), ("math:nothing", "cannot import"),
                       ("math:pi", "not callable")):
        with pytest.raises(ConfigError, match="grpo.reward") as err:
            grpo.make_reward(bad)
        assert words in str(err.value)
    with pytest.raises(ValueError, match="finite"):
        grpo.make_reward("tests.reward_fns:not_a_number")("<code>401.9</code>", gold)


def test_user_reward_drives_the_step(assets, pool_engine, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    out = tmp_path / "user"
    grpo.run_grpo(_cfg(assets, out, "train.max_steps=1",
                       'grpo.reward="tests.reward_fns:distinct_words"'))
    engine, seed = pool_engine[0], grpo.rollout_seed(0, 0)
    rewards = [len(set(engine.text(seed + j * 4 + s).split())) / 8 for j in range(2)
               for s in range(4)]
    assert np.std(rewards) > 0       # the scripted answers differ in their words
    row = read_metrics(out / "metrics.jsonl")[0]
    assert row["reward_mean"] == pytest.approx(sum(rewards) / 8, abs=1e-12)
    assert row["reward_std"] == pytest.approx(float(np.std(rewards)), abs=1e-12)


def _update_inputs(assets, seed: int = 0):
    """A LoRA model with a nonzero adapter and a hand-made rollout batch (2 prompts x G = 3)."""
    cfg = load_config(assets["config"])
    model = load_model(cfg.model.path)
    inject_lora(model, LoRAConfig(r=4, alpha=8.0), generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_modules(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.1)
    tok = assets["tok"]
    prompts = [prompt_ids(r, tok, cfg.data) for r in assets["train"][:2]]
    lengths = [3, 5, 2, 4, 1, 6]
    responses = [torch.randint(5, tok.vocab_size, (n,), generator=gen).tolist() for n in lengths]
    batch = grpo.RolloutBatch([prompts[i // 3] for i in range(6)], responses,
                              torch.tensor([1.0, -0.5, -0.5, 0.7, 0.0, -0.7]))
    return model, batch


def _reference_loss(model, batch, g: GRPOConfig) -> torch.Tensor:
    """Eq. (2) on the whole batch at once, each row run alone (no padding at all)."""
    n, r_max = len(batch.responses), max(len(r) for r in batch.responses)
    logp, ref, mask = torch.zeros(n, r_max), torch.zeros(n, r_max), torch.zeros(n, r_max)
    rows = []
    for i, (p, r) in enumerate(zip(batch.prompts, batch.responses)):
        ids = torch.tensor([p + r])
        rows.append(model_token_logprobs(model, ids, last_n=len(r))[0])
        with torch.no_grad(), disable_adapters(model):
            ref[i, :len(r)] = model_token_logprobs(model, ids, last_n=len(r))[0]
        mask[i, :len(r)] = 1
    logp = torch.stack([torch.cat([x, x.new_zeros(r_max - len(x))]) for x in rows])
    loss, _ = policy_loss(logp, logp.detach(), ref, batch.advantages, mask, g.clip_low,
                          g.clip_high, g.kl_coef, g.kl_kind, g.agg, g.dual_clip)
    return loss


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("shared", [True, False])  # prompt once per group / collated rows
def test_update_equals_whole_batch_loss_and_is_micro_batch_invariant(assets, agg, shared):
    g = GRPOConfig(kl_coef=0.1, grad_clip=0.0, agg=agg, lr=1e-3, weight_decay=0.0,
                   shared_prefix=shared)
    model, batch = _update_inputs(assets)
    ref_model = copy.deepcopy(model)
    expected = _reference_loss(ref_model, batch, g)
    expected.backward()
    results, grads, adapters = [], [], []
    for mbs in (6, 4, 1):  # one micro-batch, uneven 4 + 2, six of one row
        m = copy.deepcopy(model)
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=g.lr,
                                weight_decay=0.0)
        results.append(grpo.grpo_update(m, opt, batch, g, micro_batch_size=mbs, pad_id=0))
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad})
        adapters.append({n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad})
    for res in results:
        assert res["loss"] == pytest.approx(expected.item(), abs=1e-6)
        assert res["kl"] > 0 and res["ratio_mean"] == pytest.approx(1.0)
    ref_grads = {n: p.grad for n, p in ref_model.named_parameters() if p.requires_grad}
    assert any(v.abs().max() > 1e-4 for v in ref_grads.values())
    for gr, ad in zip(grads[1:], adapters[1:]):
        for name in gr:
            torch.testing.assert_close(gr[name], grads[0][name], rtol=0, atol=1e-6)
            torch.testing.assert_close(ad[name], adapters[0][name], rtol=0, atol=1e-6)
    for name in ref_grads:
        torch.testing.assert_close(grads[0][name], ref_grads[name], rtol=0, atol=1e-6)


def test_update_under_bf16_autocast(assets, lora_output_dtypes):
    """``grpo_update(..., autocast=torch.autocast("cpu", bfloat16))`` (what
    ``train.mixed_precision=bfloat16`` gives one process): the reference and policy forwards run
    their projections in bf16, the LoRA weights and gradients stay fp32, and the loss and
    gradients are the fp32 update's up to bf16 rounding."""
    g = GRPOConfig(kl_coef=0.1, grad_clip=0.0, lr=1e-3, weight_decay=0.0)
    model, batch = _update_inputs(assets)
    dtypes = lora_output_dtypes
    out = {}
    for name, ctx in (("fp32", None), ("bf16", torch.autocast("cpu", dtype=torch.bfloat16))):
        m = copy.deepcopy(model)
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=g.lr)
        dtypes.append(set())
        res = grpo.grpo_update(m, opt, batch, g, micro_batch_size=6, pad_id=0, autocast=ctx)
        grads = {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
        assert {v.dtype for v in grads.values()} == {torch.float32}
        assert {p.dtype for p in m.parameters()} == {torch.float32}
        out[name] = (res, grads)
    assert dtypes == [{torch.float32}, {torch.bfloat16}]
    (r32, g32), (r16, g16) = out["fp32"], out["bf16"]
    assert r16["loss"] == pytest.approx(r32["loss"], rel=0.05, abs=1e-3)
    assert r16["kl"] == pytest.approx(r32["kl"], rel=0.2, abs=1e-4)
    flat32 = torch.cat([v.flatten() for v in g32.values()])
    flat16 = torch.cat([g16[k].flatten() for k in g32])
    cos = torch.nn.functional.cosine_similarity(flat32, flat16, dim=0)
    assert cos > 0.98 and not torch.equal(flat32, flat16)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean"])
def test_masked_rows_are_left_out_of_the_loss(assets, agg):
    """grpo.mask_truncated: rows with keep = 0 give the loss and gradients of the batch without
    them (token-mean: their tokens leave the denominator; seq-mean: the rows leave the mean)."""
    g = GRPOConfig(kl_coef=0.1, grad_clip=0.0, agg=agg, lr=1e-3, weight_decay=0.0)
    model, batch = _update_inputs(assets)
    keep = [1.0, 0.0, 1.0, 1.0, 1.0, 0.0]
    rows = [i for i, k in enumerate(keep) if k]
    masked = grpo.RolloutBatch(batch.prompts, batch.responses, batch.advantages,
                               torch.tensor(keep))
    smaller = grpo.RolloutBatch([batch.prompts[i] for i in rows],
                                [batch.responses[i] for i in rows], batch.advantages[rows])
    results, grads = [], []
    for b, mbs in ((masked, 4), (smaller, 4), (batch, 4)):
        m = copy.deepcopy(model)
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.0)
        results.append(grpo.grpo_update(m, opt, b, g, micro_batch_size=mbs, pad_id=0))
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad})
    assert results[0]["loss"] == pytest.approx(results[1]["loss"], abs=1e-6)
    assert results[0]["loss"] != pytest.approx(results[2]["loss"], abs=1e-4)
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=0, atol=1e-6)


def test_variant_config_keys_reach_the_step(assets, pool_engine, tmp_path, monkeypatch):
    """grpo.reward = weighted_f1 (frequencies of the training records), grpo.advantage = rloo,
    grpo.mask_truncated (the engine's length-cut responses), Dr. GRPO's L = max_new_tokens."""
    seen = {}
    update = grpo.grpo_update

    def spy(model, optimizer, batch, g, **kw):
        seen.update(batch=batch, norm_len=kw["norm_len"], g=g)
        return update(model, optimizer, batch, g, **kw)

    monkeypatch.setattr(grpo, "grpo_update", spy)
    out = tmp_path / "variants"
    grpo.run_grpo(_cfg(assets, out, "train.max_steps=1", "grpo.reward=weighted_f1",
                       "grpo.advantage=rloo", "grpo.mask_truncated=true",
                       "grpo.agg=seq-mean-token-sum-norm", "grpo.ratio_level=sequence",
                       "grpo.loss=cispo"))
    engine, seed = pool_engine[0], grpo.rollout_seed(0, 0)
    recs = [assets["train"][i] for i in grpo.step_prompt_indices(12, 2, 0, 0)]
    texts = [[engine.text(seed + j * 4 + s) for s in range(4)] for j in range(2)]
    freq = Counter(c for r in assets["train"] for c in set(r.codes))

    def w(c):
        return 1 / freq[c] ** 0.5 if c in freq else 1.0

    def wf1(pred, gold):
        tp, fp, fn = (sum(map(w, x)) for x in (pred & gold, pred - gold, gold - pred))
        return 2 * tp / (2 * tp + fp + fn) if tp else 0.0

    rewards = [wf1(_codes(t), set(r.codes)) for r, row in zip(recs, texts) for t in row]
    assert any(wf1(_codes(t), set(r.codes)) != _f1(_codes(t), set(r.codes))
               for r, row in zip(recs, texts) for t in row if _codes(t))
    row = read_metrics(out / "metrics.jsonl")[0]
    assert row["reward_mean"] == pytest.approx(sum(rewards) / 8, abs=1e-12)
    rloo = [r - (sum(rewards[4 * (i // 4):4 * (i // 4) + 4]) - r) / 3 for i, r in enumerate(rewards)]
    flat_groups = [max(rewards[4 * j:4 * j + 4]) == min(rewards[4 * j:4 * j + 4]) for j in range(2)]
    rloo = [0.0 if flat_groups[i // 4] else a for i, a in enumerate(rloo)]
    torch.testing.assert_close(seen["batch"].advantages, torch.tensor(rloo), rtol=0, atol=1e-6)
    flat = [t for r in texts for t in r]
    assert seen["batch"].keep.tolist() == [float(t != "no answer") for t in flat]
    assert "no answer" in flat and seen["norm_len"] == 6
    assert (seen["g"].ratio_level, seen["g"].loss) == ("sequence", "cispo")


def test_missed_bonus_needs_phi_pools(assets, tmp_path):
    # refused before any model is loaded: plain GRPO has no pools of missed codes
    with pytest.raises(ConfigError, match=r"grpo\.reward = 'f1\+missed:0\.1'.*needs --stage phi"):
        grpo.run_grpo(_cfg(assets, tmp_path / "x", "grpo.reward=f1+missed:0.1",
                           "model.path=/nonexistent"))


def test_two_updates_per_batch_use_recomputed_old_logprobs(assets):
    g = GRPOConfig(kl_coef=0.0, grad_clip=0.0, lr=1e-2, updates_per_batch=2, clip_high=0.0,
                   clip_low=0.0)
    model, batch = _update_inputs(assets, seed=3)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=g.lr)
    res = grpo.grpo_update(model, opt, batch, g, micro_batch_size=4, pad_id=0)
    # second update: ratios moved away from 1 against the old policy; with a zero clip range
    # every token whose ratio moved in the advantage's direction is clipped
    assert res["ratio_mean"] != pytest.approx(1.0, abs=1e-6)
    assert res["approx_kl_old"] > 0
    assert res["clip_frac_low"] + res["clip_frac_high"] > 0


def test_run_checkpoint_kl_and_exact_resume(assets, pool_engine, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    res = grpo.run_grpo(_cfg(assets, full, "train.max_steps=4"))
    rows = read_metrics(full / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and res["step"] == 4
    for r in rows:
        assert STEP_KEYS <= set(r) and r["lr"] == pytest.approx(5e-2)
        assert 0 <= r["reward_mean"] <= 1 and r["response_tokens"] > 0
    # zero-initialised LoRA B: the policy IS the reference at step 1, so the KL is exactly 0;
    # after updates it is not
    assert rows[0]["kl"] == 0.0
    assert rows[-1]["kl"] > 0
    ckpts = sorted(p.name for p in (full / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert ckpts == ["step-00000002", "step-00000004"]
    a = load_file(str(full / "adapter" / "adapter_model.safetensors"))
    assert a and all(k.startswith("base_model.model.") for k in a)
    assert any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k)
    # the same run stopped after its step-2 checkpoint, then resumed
    shutil.copytree(full, part)
    shutil.rmtree(part / "checkpoints" / "step-00000004")
    shutil.rmtree(part / "adapter")
    grpo.run_grpo(_cfg(assets, part, "train.max_steps=4", "train.resume=true"))
    b = load_file(str(part / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)
    resumed = read_metrics(part / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]  # lines past step 2 dropped on resume
    assert resumed[-1]["reward_mean"] == rows[-1]["reward_mean"]


def test_engine_must_advance_weight_version():
    class Stale:
        weight_version = 3

        def wake_up(self):
            pass

        def sync_policy(self, model, state_dict=None):
            return 3

    with pytest.raises(RuntimeError, match="stale"):
        grpo.sync_engine(Stale(), torch.nn.Linear(1, 1))


def test_cli_grpo_with_torch_engine(assets, tmp_path):
    out = tmp_path / "cli"
    env = {**os.environ, "MINICD_NO_PROGRESS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--stage", "grpo", "--config",
                           str(assets["config"]), f"train.output_dir={out}", "train.max_steps=1",
                           "data.val_limit=2", "train.num_threads=1"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    start, row = read_metrics(out / "metrics.jsonl")
    # step 0 (train.eval_at_start): validation only; zero-init B, so the policy is the base model
    assert start["step"] == 0 and "reward_mean" not in start and "val/micro_f1" in start
    assert STEP_KEYS <= set(row) and 0.0 <= row["val/micro_f1"] <= 1.0
    assert row["kl"] == 0.0  # zero-initialised B: real rollouts, reference == policy
    # the torch engine's log-probs (stop token included) are the trainer's: no mismatch
    assert row["mismatch_abs_logp"] < 1e-4 and row["mismatch_out_frac"] == 0.0
    assert row["tis_clip_frac"] == 0.0
    assert 1 <= row["response_len_mean"] <= 6 and row["response_tokens"] > 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    note = assets["train"][0].note
    assert note[:40] not in (out / "metrics.jsonl").read_text()


@pytest.mark.parametrize("mode", ["merge", "continue"])
def test_policy_from_a_previous_adapter_and_its_reference(assets, tmp_path, mode):
    """merge: the adapter-disabled reference is the previous stage's (SFT) policy;
    continue: it is the base model."""
    from minicd import dist
    from minicd.model.hub import load_model
    from minicd.model.lora import disable_adapters
    from minicd.train.common import build_policy

    sft = save_sft_adapter(assets["model_dir"], tmp_path / "sft_adapter", 0.2)
    base = load_model(assets["model_dir"]).eval()
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sft_logits, base_logits = sft.eval()(ids), base(ids)
    assert (sft_logits - base_logits).abs().max() > 1e-3

    cfg = _cfg(assets, tmp_path / "out", f"lora.init_adapter={json.dumps(str(tmp_path / 'sft_adapter'))}",
               f"lora.init_mode={mode}")
    policy = build_policy(cfg, dist.init_distributed("cpu"))
    model = policy.model.eval()
    with torch.no_grad():
        start = model(ids)
        with disable_adapters(model):
            ref = model(ids)
    torch.testing.assert_close(start, sft_logits, rtol=0, atol=1e-5)   # starts at the SFT policy
    expected_ref = sft_logits if mode == "merge" else base_logits
    torch.testing.assert_close(ref, expected_ref, rtol=0, atol=1e-5)


def test_vllm_engine_starts_from_the_merged_init_adapter(assets, tmp_path, monkeypatch):
    """vLLM loads base weights from disk: with lora.init_adapter in merge mode, GRPO hands the
    engine the merged start model (base + SFT adapter folded in), whose logits are the SFT
    policy's, not the bare base's (a scripted engine stands in for vLLM)."""
    from minicd.model.hub import load_model

    sft = save_sft_adapter(assets["model_dir"], tmp_path / "sft_adapter", 0.2)
    seen = []

    def build(cfg, model, tok, lora_cfg, *, model_path=None, device=None):
        seen.append(model_path or cfg.model.path)
        return PoolEngine(tok, assets["pool"])

    monkeypatch.setattr(inference, "build_engine", build)
    out = tmp_path / "out"
    grpo.run_grpo(_cfg(assets, out, "rollout.engine=vllm", "train.max_steps=1",
                  f"lora.init_adapter={json.dumps(str(tmp_path / 'sft_adapter'))}"))
    assert seen == [str(out / "start_model")]
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(load_model(seen[0]).eval()(ids), sft.eval()(ids),
                                   rtol=0, atol=1e-5)


SYNC_METHODS = ("item", "tolist", "cpu", "__float__", "__int__", "__bool__")


def _count_syncs(monkeypatch, skip_files: tuple[str, ...], skip_dirs: tuple[str, ...]) -> Counter:
    """Count host reads of tensors (``.item()``, ``.tolist()``, ``.cpu()``, ``float(t)``,
    ``int(t)``, ``bool(t)``) made by minicd code, keyed by file:line of the caller."""
    pkg = str(REPO / "minicd")
    counts: Counter = Counter()
    for name in SYNC_METHODS:
        real = getattr(torch.Tensor, name)

        def spy(self, *args, __real=real, **kwargs):
            frame = sys._getframe(1)
            where = frame.f_code.co_filename
            rel = where[len(pkg) + 1:]
            if (where.startswith(pkg) and not rel.endswith(skip_files)
                    and not rel.startswith(skip_dirs)):
                counts[f"{rel}:{frame.f_lineno}"] += 1
            return __real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    return counts


@pytest.mark.parametrize("shared", [True, False])
def test_update_reads_statistics_once_whatever_the_micro_batching(assets, monkeypatch, shared):
    """Device syncs of one GRPO update do not grow with the number of micro-batches: the loss
    statistics stay tensors and are read back once (plus the one read of the token counts).
    Not counted: ``algo/grpo.py``'s ``policy_loss``, which returns its statistics as floats in
    this branch (its owner makes them 0-dim tensors), and the decoder's padding check (one
    ``bool(mask.all())`` per padded forward, in ``minicd/model``: a forward's sync, not a loss
    statistic's)."""
    g = GRPOConfig(kl_coef=0.1, grad_clip=1.0, lr=1e-3, shared_prefix=shared)
    model, batch = _update_inputs(assets)
    per_run = []
    for mbs in (6, 1):  # one micro-batch vs six
        m = copy.deepcopy(model)
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=g.lr)
        with monkeypatch.context() as mp:
            counts = _count_syncs(mp, skip_files=(), skip_dirs=("model/",))
            res = grpo.grpo_update(m, opt, batch, g, micro_batch_size=mbs, pad_id=0)
        per_run.append(counts)
        assert res["loss"] != 0.0 and res["grad_norm"] > 0
    one, six = per_run
    print(f"syncs with 1 micro-batch: {dict(one)}; with 6: {dict(six)}")
    in_loop = {k: v for k, v in six.items() if k.startswith("train/grpo.py")}
    assert sum(in_loop.values()) == 2, in_loop   # token counts, then all statistics
    assert sum(six.values()) == sum(one.values()), (one, six)


# ------------------------------------------------------------------ DAPO dynamic sampling
def test_draw_rounds_are_disjoint_and_deterministic():
    rounds = grpo.draw_prompt_indices(12, 2, seed=0, step=3, rounds=3)
    assert rounds[0] == grpo.step_prompt_indices(12, 2, 0, 3)
    # round d >= 1: the first B records of default_rng([seed, step, d]).permutation not drawn yet
    used, expected = set(rounds[0]), [rounds[0]]
    for d in (1, 2):
        perm = np.random.default_rng([0, 3, d]).permutation(12).tolist()
        expected.append([i for i in perm if i not in used][:2])
        used |= set(expected[-1])
    assert rounds == expected and len(used) == 6
    assert grpo.draw_prompt_indices(12, 2, seed=0, step=3, rounds=3) == rounds
    assert grpo.draw_prompt_indices(12, 2, seed=1, step=3, rounds=3) != rounds
    assert grpo.draw_prompt_indices(12, 2, seed=0, step=3, rounds=1) == rounds[:1]
    assert len(grpo.draw_prompt_indices(5, 2, seed=0, step=0, rounds=3)) == 2  # 1 record left
    assert grpo.keep_groups([[1, 1], [0, 1], [2, 2], [1, 0], [0, 3]], 2) == [1, 3]


def test_share_groups_pads_ranks_to_equal_shares():
    groups = ["g0", "g1", "g2"]
    assert grpo.share_groups(groups, 0, 2) == (["g0", "g1"], 0)
    assert grpo.share_groups(groups, 1, 2) == (["g2", "g2"], 1)
    assert grpo.share_groups(groups, 0, 1) == (groups, 0)
    assert grpo.share_groups(["g0"], 1, 4) == (["g0"], 1)


class FlatEngine(PoolEngine):
    """Sample s of a prompt gets pool[s] (rewards differ within the group under distinct_words),
    except prompts in ``flat``: every sample gets pool[0] (a group of equal rewards)."""

    def __init__(self, tok, pool, flat=(), logprobs=None):
        super().__init__(tok, pool)
        self.flat, self.logprobs = {tuple(p) for p in flat}, logprobs

    def generate(self, prompts, params):
        self.calls.append((len(prompts), params.seed))
        out = []
        for i, p in enumerate(prompts):
            row = []
            for s in range(params.n):
                text = self.pool[0 if tuple(p) in self.flat else s % len(self.pool)]
                ids = self.tok.encode(text) + [self.tok.im_end_id]
                lp = None if self.logprobs is None else self.logprobs(len(ids))
                row.append(Generation(i, s, ids, text, "stop", lp))
            out.append(row)
        return out


def _flat_engine(monkeypatch, assets, **kw):
    engines = []

    def build(cfg, model, tok, lora_cfg, **kwargs):
        engines.append(FlatEngine(tok, assets["pool"], **kw))
        return engines[-1]

    monkeypatch.setattr(inference, "build_engine", build)
    return engines


def _prompt(assets, i):
    return prompt_ids(assets["train"][i], assets["tok"], load_config(assets["config"]).data)


def test_dynamic_sampling_refills_in_order(assets, tmp_path, monkeypatch):
    """B = 2: round 0 = records [a, b], round 1 = [c, d]; a and c give flat groups, so the step
    trains on b's group then d's (global prompt indices 1 and 3), drawn 4 and kept 2."""
    monkeypatch.syspath_prepend(str(REPO))
    (a, b), (c, d), _ = grpo.draw_prompt_indices(12, 2, 0, 0, 3)
    engines = _flat_engine(monkeypatch, assets, flat=[_prompt(assets, a), _prompt(assets, c)])
    seen = []
    update = grpo.grpo_update

    def spy(model, optimizer, batch, g, **kw):
        seen.append(batch)
        return update(model, optimizer, batch, g, **kw)

    monkeypatch.setattr(grpo, "grpo_update", spy)
    out = tmp_path / "dyn"
    grpo.run_grpo(_cfg(assets, out, "train.max_steps=1", "grpo.filter_groups=true",
                       "grpo.max_draws=3", 'grpo.reward="tests.reward_fns:distinct_words"'))
    seed = grpo.rollout_seed(0, 0)
    # round d's prompts are global prompts 2d, 2d + 1: seeds seed + 2d * G
    assert engines[0].calls == [(2, seed), (2, seed + 2 * 4)]
    (batch,) = seen
    assert batch.prompts == [_prompt(assets, b)] * 4 + [_prompt(assets, d)] * 4
    words = [len(set(t.split())) / 8 for t in assets["pool"][:4]]           # pool[s] per sample
    adv = (torch.tensor(words) - np.mean(words)) / (torch.tensor(words).std() + 1e-6)
    torch.testing.assert_close(batch.advantages, torch.cat([adv, adv]).float(), rtol=0,
                               atol=1e-6)
    assert batch.keep is None and batch.pad_rows == 0
    row = read_metrics(out / "metrics.jsonl")[0]
    assert (row["prompts_drawn"], row["prompts_kept"]) == (4, 2)
    # the statistics cover every drawn group: 2 of the 4 are flat
    assert row["zero_var_frac"] == 0.5
    assert row["reward_mean"] == pytest.approx((2 * 4 * words[0] + 2 * sum(words)) / 16)


def test_dynamic_sampling_trains_on_what_it_kept_or_skips(assets, tmp_path, monkeypatch):
    """max_draws = 2 rounds and only d's group varies: one group trained on; every group flat:
    no update (the adapter keeps its initial zero B), logged as drawn 4, kept 0."""
    monkeypatch.syspath_prepend(str(REPO))
    (a, b), (c, d) = grpo.draw_prompt_indices(12, 2, 0, 0, 2)
    flat = [_prompt(assets, i) for i in (a, b, c)]
    _flat_engine(monkeypatch, assets, flat=flat)
    seen = []
    update = grpo.grpo_update
    monkeypatch.setattr(grpo, "grpo_update",
                        lambda *args, **kw: seen.append(args[2]) or update(*args, **kw))
    reward = 'grpo.reward="tests.reward_fns:distinct_words"'
    out = tmp_path / "one_kept"
    grpo.run_grpo(_cfg(assets, out, "train.max_steps=1", "grpo.filter_groups=true",
                       "grpo.max_draws=2", reward))
    assert [b.prompts for b in seen] == [[_prompt(assets, d)] * 4]
    row = read_metrics(out / "metrics.jsonl")[0]
    assert (row["prompts_drawn"], row["prompts_kept"]) == (4, 1) and "loss" in row

    _flat_engine(monkeypatch, assets, flat=flat + [_prompt(assets, d)])
    seen.clear()
    out = tmp_path / "none_kept"
    grpo.run_grpo(_cfg(assets, out, "train.max_steps=1", "grpo.filter_groups=true",
                       "grpo.max_draws=2", reward))
    assert seen == []
    row = read_metrics(out / "metrics.jsonl")[0]
    assert (row["prompts_drawn"], row["prompts_kept"]) == (4, 0) and "loss" not in row
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert all(float(v.abs().max()) == 0.0 for k, v in adapter.items() if "lora_B" in k)


def test_default_draws_one_round(assets, pool_engine, tmp_path):
    out = tmp_path / "default"
    grpo.run_grpo(_cfg(assets, out, "train.max_steps=1"))
    row = read_metrics(out / "metrics.jsonl")[0]
    assert (row["prompts_drawn"], row["prompts_kept"]) == (2, 2)
    assert len(pool_engine[0].calls) == 1
    assert "mismatch_abs_logp" not in row  # the scripted engine returns no log-probs


# ------------------------------------------------------------------ TIS
def _rollout_lp(n: int) -> list[float]:
    """Known engine log-probs: alternately far below (ratio at the cap) and above the model's."""
    return [-30.0 if t % 2 == 0 else 0.0 for t in range(n)]


@pytest.mark.parametrize("cap", [None, 2.0])
def test_tis_weights_reach_the_loss(assets, tmp_path, monkeypatch, cap):
    """is_weights = min(exp(old - rollout), C) on every token (old = the trainer's log-probs
    with one update per batch); with tis_cap unset the loss gets none, but the mismatch is
    logged either way: mean |old - rollout| and the share outside [0.9, 1.1] over all tokens."""
    monkeypatch.syspath_prepend(str(REPO))
    _flat_engine(monkeypatch, assets, logprobs=_rollout_lp)
    calls = []
    real = grpo.policy_loss

    def spy(logp, old_logp, ref_logp, adv, mask, *args, **kw):
        calls.append((old_logp.clone(), mask.clone(), kw["is_weights"]))
        return real(logp, old_logp, ref_logp, adv, mask, *args, **kw)

    monkeypatch.setattr(grpo, "policy_loss", spy)
    out = tmp_path / "tis"
    extra = [f"grpo.tis_cap={cap}"] if cap is not None else []
    grpo.run_grpo(_cfg(assets, out, "train.max_steps=1",
                       'grpo.reward="tests.reward_fns:distinct_words"', *extra))
    assert len(calls) == 3  # 8 rows in micro-batches of 3
    diffs, outside, clipped = [], [], []
    for old, mask, w in calls:
        rollout = torch.tensor([[(-30.0 if t % 2 == 0 else 0.0) for t in range(mask.shape[1])]])
        d = old - rollout                                                # [b, R]
        if cap is None:
            assert w is None
        else:
            expected = torch.minimum(torch.exp(d), torch.tensor(cap))
            torch.testing.assert_close(w[mask.bool()], expected[mask.bool()], rtol=1e-6,
                                       atol=0)
        m = mask.bool()
        diffs += d[m].abs().tolist()
        ratio = torch.exp(d[m])
        outside += ((ratio < 0.9) | (ratio > 1.1)).tolist()
        clipped += (ratio > (cap or math.inf)).tolist()
    row = read_metrics(out / "metrics.jsonl")[0]
    assert row["mismatch_abs_logp"] == pytest.approx(np.mean(diffs), rel=1e-6)
    assert row["mismatch_out_frac"] == pytest.approx(np.mean(outside), abs=1e-6)
    assert row["tis_clip_frac"] == pytest.approx(np.mean(clipped), abs=1e-6)
    # every token: -30 and 0 are far from the tiny model's log-probs
    assert row["mismatch_out_frac"] == pytest.approx(1.0, abs=1e-6)
    assert row["tis_clip_frac"] == 0.0 if cap is None else row["tis_clip_frac"] >= 0.5


def test_tis_cap_needs_engine_logprobs(assets, pool_engine, tmp_path):
    with pytest.raises(ConfigError, match="grpo.tis_cap = 2.0: the rollout engine returned no"):
        grpo.run_grpo(_cfg(assets, tmp_path / "nolp", "train.max_steps=1", "grpo.tis_cap=2"))
