"""The SFT, GRPO and PHI stage loops under ``torchrun --nproc_per_node 2 train.py`` (FSDP2, gloo, CPU)
match one process on the same global batch: same loss curve, same final adapter.

The one-process reference runs in-process (``run_sft`` / ``run_grpo``); the 2-rank runs go through
the real CLI under torchrun. Global batch sizes are equal by construction: SFT takes
``micro_batch_size x grad_accum x world`` examples per step (2 x 2 x 1 vs 2 x 1 x 2); GRPO takes
``prompts_per_step`` prompts per step whatever the world size, and seeds its rollouts by
(seed, step), so both runs sample the same responses.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minicd.config import load_config
from minicd.log import read_metrics
from minicd.train.grpo import run_grpo
from minicd.train.phi import run_phi
from minicd.train.sft import run_sft
from train_fixtures import build_assets

REPO = Path(__file__).resolve().parents[1]
SFT_STEPS = 4
TOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                             "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env["MINICD_NO_PROGRESS"] = "1"
    return env


def _torchrun(*args: str, result: str = "step") -> None:
    """``torchrun --nproc_per_node 2 train.py ARGS``; both ranks must finish and print a result
    line (``<result>=N ...``)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           str(REPO / "train.py"), *args, "train.num_threads=1"]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    # both ranks print a result line; their writes to the shared pipe may interleave
    assert len(re.findall(rf"{result}=\d+ ", proc.stdout)) == 2, proc.stdout


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def _max_adapter_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and len(a) > 0
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    built = build_assets(root)
    sft = root / "sft.toml"
    sft.write_text(f"""
[model]
path = "{built['model_dir']}"
[lora]
r = 4
alpha = 8.0
[data]
dir = "{built['data_dir']}"
max_prompt_tokens = 256
train_limit = 16
val_limit = 0
[train]
seed = 0
device = "cpu"
micro_batch_size = 2
grad_accum = 1
save_every = 100
[sft]
lr = 1e-2
warmup_ratio = 0.0
""")
    return {"root": root, "sft_config": sft, **built}


@pytest.fixture(scope="module")
def sft_single(assets):
    """The one-process SFT reference: 4 steps of 2 micro-batches of 2 examples (grad_accum 2)."""
    out = assets["root"] / "sft_single"
    cfg = load_config(assets["sft_config"], [f"train.output_dir={json.dumps(str(out))}",
                                             f"train.max_steps={SFT_STEPS}", "train.grad_accum=2"])
    run_sft(cfg)
    return out


@pytest.mark.distributed
def test_sft_two_ranks_match_one_process(assets, sft_single):
    multi = assets["root"] / "sft_multi"
    _torchrun("--stage", "sft", "--config", str(assets["sft_config"]),
              f"train.output_dir={multi}", f"train.max_steps={SFT_STEPS}", "train.grad_accum=1")
    one, two = read_metrics(sft_single / "metrics.jsonl"), read_metrics(multi / "metrics.jsonl")
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, SFT_STEPS + 1))
    # training moved: the curve is not flat, so equal curves are not a trivial match
    assert one[-1]["loss"] < one[0]["loss"] - 0.05
    for a, b in zip(one, two):
        assert b["response_tokens"] == a["response_tokens"] > 0   # the same global batch
        assert abs(a["loss"] - b["loss"]) <= TOL, (a["step"], a["loss"], b["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * max(1.0, a["grad_norm"])
        assert b["lr"] == pytest.approx(a["lr"], rel=1e-12)
    a, b = _adapter(sft_single), _adapter(multi)
    assert any(float(v.abs().max()) > 1e-3 for k, v in a.items() if "lora_B" in k)
    diff = _max_adapter_diff(a, b)
    print(f"sft losses 1 proc {[r['loss'] for r in one]}; 2 ranks {[r['loss'] for r in two]}; "
          f"adapter max |diff| {diff:.3g}")
    assert diff <= TOL


@pytest.mark.distributed
def test_grpo_two_ranks_match_one_process(assets, sft_single, tmp_path, monkeypatch):
    """GRPO from the SFT adapter (init_mode continue: the reference is the base model, so the KL
    term is nonzero from step 1), torch engine, 2 prompts x 4 samples per step. The barely
    trained model never writes a <code> span, so the sample-F1 reward would be 0 everywhere: a
    test reward (distinct words / 8, tests/reward_fns.py) keeps the policy-gradient term live."""
    monkeypatch.syspath_prepend(str(REPO))
    config = tmp_path / "grpo.toml"
    config.write_text(assets["sft_config"].read_text() + f"""
[grpo]
group_size = 4
prompts_per_step = 2
lr = 5e-2
kl_coef = 0.5
reward = "tests.reward_fns:distinct_words"
[rollout]
engine = "torch"
max_new_tokens = 8
""")
    init = [f"lora.init_adapter={json.dumps(str(sft_single / 'adapter'))}",
            'lora.init_mode="continue"', "train.max_steps=2", "train.micro_batch_size=4",
            # greedy validation of 5 records in chunks of 2: rank 0 decodes 3, rank 1 decodes 2
            # and then steps along with dummy forwards (FSDP2 lockstep)
            "data.val_limit=5", "rollout.max_batch_size=2", "train.eval_every=1"]
    single, multi = tmp_path / "single", tmp_path / "multi"
    run_grpo(load_config(config, [f"train.output_dir={json.dumps(str(single))}", *init]))
    _torchrun("--stage", "grpo", "--config", str(config), f"train.output_dir={multi}", *init)
    one, two = read_metrics(single / "metrics.jsonl"), read_metrics(multi / "metrics.jsonl")
    # step 0: validation of the starting policy (train.eval_at_start)
    assert [r["step"] for r in one] == [r["step"] for r in two] == [0, 1, 2]
    for a, b in zip(one, two):  # the rank-sharded greedy validation equals one process's
        for key in ("val/micro_f1", "val/span_rate", "val/truncation_rate"):
            assert a[key] == b[key], (a["step"], key, a[key], b[key])
    one, two = one[1:], two[1:]
    # each rank sampled its own B / world = 1 prompt per step; one process sampled all B = 2
    assert [r["rollout_prompts_rank_max"] for r in one] == [2, 2]
    assert [r["rollout_prompts_rank_max"] for r in two] == [1, 1]
    assert one[0]["kl"] > 1e-4 and one[0]["loss"] != 0.0  # a real loss to compare
    for r in one:  # rewards vary within groups: nonzero advantages, a live policy gradient
        assert r["reward_std"] > 0 and r["zero_var_frac"] < 1
    for a, b in zip(one, two):
        # same rollouts (lengths and rewards), same global token-mean loss
        assert b["response_tokens"] == a["response_tokens"] > 0
        assert b["response_len_mean"] == a["response_len_mean"]
        assert b["truncation_rate"] == a["truncation_rate"]
        for key in ("reward_mean", "reward_std", "loss", "pg_loss", "kl", "entropy"):
            assert abs(a[key] - b[key]) <= TOL, (a["step"], key, a[key], b[key])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * max(1.0, a["grad_norm"])
    diff = _max_adapter_diff(_adapter(single), _adapter(multi))
    print(f"grpo loss 1 proc {[r['loss'] for r in one]}; 2 ranks {[r['loss'] for r in two]}; "
          f"reward_mean {[r['reward_mean'] for r in one]}; adapter max |diff| {diff:.3g}")
    assert diff <= TOL


@pytest.mark.distributed
def test_phi_two_ranks_match_one_process(assets, sft_single, tmp_path, monkeypatch):
    """Two PHI rounds of 2 GRPO steps from the SFT adapter (merged once into out/sft_model), with
    hints drawn on p = 0.5 of the prompts: the hint-free refreshes are rank-sharded (chunks of 3
    of the 8 records dealt to the ranks), each rank renders and samples its own hinted prompts,
    and the run must end with the same pools, round metrics and adapter as one process."""
    monkeypatch.syspath_prepend(str(REPO))
    config = tmp_path / "phi.toml"
    config.write_text(assets["sft_config"].read_text() + """
[grpo]
group_size = 4
prompts_per_step = 2
lr = 5e-2
reward = "tests.reward_fns:distinct_words"
[rollout]
engine = "torch"
max_new_tokens = 8
[phi]
rounds = 2
""")
    init = [f"lora.init_adapter={json.dumps(str(sft_single / 'adapter'))}", "train.max_steps=2",
            "train.micro_batch_size=4", "data.train_limit=8", "data.max_prompt_tokens=960",
            "rollout.max_batch_size=3"]
    single, multi = tmp_path / "single", tmp_path / "multi"
    run_phi(load_config(config, [f"train.output_dir={json.dumps(str(single))}", *init]))
    _torchrun("--stage", "phi", "--config", str(config), f"train.output_dir={multi}", *init,
              result="round")
    one, two = (json.loads((d / "phi_state.json").read_text()) for d in (single, multi))
    assert one["round"] == two["round"] == 2
    assert two["pools"] == one["pools"] and sum(map(len, one["pools"].values())) > 0
    rows1, rows2 = read_metrics(single / "phi_rounds.jsonl"), read_metrics(multi / "phi_rounds.jsonl")
    assert [r["round"] for r in rows1] == [r["round"] for r in rows2] == [0, 1]
    for a, b in zip(rows1, rows2):
        for key in ("records_used", "grpo_steps", "prompts", "hint_rate", "mean_hints",
                    "hinted_codes", "train_micro_recall", "next_nonempty_pools"):
            assert a[key] == b[key], (a["round"], key, a[key], b[key])
        assert abs(a["reward_mean_last_step"] - b["reward_mean_last_step"]) <= TOL
    assert 0 < sum(r["hint_rate"] for r in rows1) < 2       # hinted and hint-free prompts
    for r in range(2):  # each round's GRPO curve
        m1 = read_metrics(single / f"round-{r}" / "metrics.jsonl")
        m2 = read_metrics(multi / f"round-{r}" / "metrics.jsonl")
        assert [x["step"] for x in m1] == [x["step"] for x in m2] == [1, 2]
        for a, b in zip(m1, m2):
            assert b["response_tokens"] == a["response_tokens"] > 0
            for key in ("reward_mean", "reward_std", "loss", "kl"):
                assert abs(a[key] - b[key]) <= TOL, (r, a["step"], key, a[key], b[key])
            assert (a["rollout_prompts_rank_max"], b["rollout_prompts_rank_max"]) == (2, 1)
        # every rank drew and recorded the hints of its own prompts: 1 per step each
        for rank in range(2):
            rows = (multi / f"round-{r}" / f"hint_draws-rank{rank}.jsonl").read_text().splitlines()
            assert sorted(json.loads(x)["index"] for x in rows) == [rank, rank]
    diff = _max_adapter_diff(_adapter(single), _adapter(multi))
    print(f"phi pools equal; hint rates {[r['hint_rate'] for r in rows1]}; adapter max |diff| "
          f"{diff:.3g}")
    assert diff <= TOL
