"""Bad inputs and faults against the real CLIs (train.py, rollout.py, evaluate.py,
``python -m minicd.data``), one test per class: each must end with a one-line error naming the
file/line/key and exit status 2 (user errors) or 128 + N (signal N), never a traceback; runs must
not mix, lose or corrupt data (existing run refused, metrics once per step, checkpoint fallback,
rollout resume equal to an uninterrupted run)."""

from __future__ import annotations

import errno
import gzip
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from minicd.errors import OutputError
from minicd.log import read_metrics
from minicd.predictions import read_predictions
from train_fixtures import build_assets

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "MINICD_NO_PROGRESS": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
FAST = ("train.num_threads=1", "train.eval_at_start=false", "data.val_limit=0")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    built = build_assets(root)
    config = root / "run.toml"
    config.write_text(f"""
[model]
path = "{built['model_dir']}"
[lora]
r = 4
alpha = 8.0
[data]
dir = "{built['data_dir']}"
max_prompt_tokens = 256
train_limit = 32
val_limit = 0
[train]
seed = 0
device = "cpu"
num_threads = 1
micro_batch_size = 4
grad_accum = 1
eval_every = 100
save_every = 1
keep_last = 3
[sft]
lr = 1e-2
warmup_ratio = 0.0
[rollout]
max_new_tokens = 6
""")
    return {"root": root, "config": config, **built}


def _cli(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, *(("-m", script) if script.startswith("minicd") else (str(REPO / script),))]
    return subprocess.run([*cmd, *args], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def _train(assets, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return _cli("train.py", "--stage", "sft", "--config", str(assets["config"]), *args, *FAST,
                timeout=timeout)


def _user_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, no traceback, one ``error:`` line that contains every needle; returns it."""
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def _data_copy(assets, tmp_path: Path) -> Path:
    out = tmp_path / "data"
    shutil.copytree(assets["data_dir"], out)
    return out


def _edit_line(path: Path, lineno: int, edit) -> None:
    """Replace line ``lineno`` (1-based) of a JSONL file by ``edit(parsed object)`` (bytes or obj)."""
    lines = path.read_bytes().splitlines(keepends=True)
    new = edit(json.loads(lines[lineno - 1]))
    lines[lineno - 1] = new if isinstance(new, bytes) else (json.dumps(new) + "\n").encode()
    path.write_bytes(b"".join(lines))


# ------------------------------------------------------------------------------------- config
def test_misconfigured_grpo_fails_fast_naming_the_key(assets, tmp_path):
    t0 = time.perf_counter()
    proc = _cli("train.py", "--stage", "grpo", "--config", str(assets["config"]),
                f"model.path={assets['model_dir']}", "grpo.kl_kind=k9",
                f"train.output_dir={tmp_path / 'run'}", timeout=60)
    elapsed = time.perf_counter() - t0
    _user_error(proc, "grpo.kl_kind", "'k9'", "k3")
    assert elapsed < 5.0, elapsed
    assert not (tmp_path / "run").exists()  # nothing created


# --------------------------------------------------------------------------------------- data
@pytest.mark.parametrize("kind, edit, needles", [
    ("non-utf8", lambda obj: json.dumps(obj).encode().replace(b'"note": "', b'"note": "\xff', 1)
     + b"\n", ("train.jsonl:3", "UTF-8", "0xff")),
    ("impossible code", lambda obj: {**obj, "codes": ["ZZZ.99"]}, ("train.jsonl:3", "'codes'", "ZZZ.99")),
    ("words", lambda obj: {**obj, "codes": [obj["codes"][0], "HELLO WORLD"]},
     ("train.jsonl:3", "element 1", "HELLO WORLD")),
    ("undotted", lambda obj: {**obj, "codes": ["4019"]}, ("train.jsonl:3", "'4019'", "ICD-9")),
])
def test_bad_training_line_names_file_and_line(assets, tmp_path, kind, edit, needles):
    data = _data_copy(assets, tmp_path)
    _edit_line(data / "train.jsonl", 3, edit)
    proc = _train(assets, f"data.dir={data}", f"train.output_dir={tmp_path / 'run'}")
    _user_error(proc, *needles)


def test_duplicate_record_id_names_both_lines(assets, tmp_path):
    data = _data_copy(assets, tmp_path)
    first = json.loads((data / "val.jsonl").read_text().splitlines()[0])
    _edit_line(data / "val.jsonl", 4, lambda obj: {**obj, "id": first["id"]})
    proc = _cli("rollout.py", "--config", str(assets["config"]), "--split", "val",
                f"data.dir={data}", "--out", str(tmp_path / "p.jsonl"))
    _user_error(proc, "val.jsonl:4", "'id'", "line 1")
    assert not (tmp_path / "p.jsonl").exists()


def test_unknown_code_note_printed_once(assets, tmp_path, capfd):
    from minicd.data.records import read_records

    data = _data_copy(assets, tmp_path)
    _edit_line(data / "val.jsonl", 1, lambda obj: {**obj, "codes": obj["codes"] + ["999.99"]})
    _edit_line(data / "val.jsonl", 2, lambda obj: {**obj, "codes": obj["codes"] + ["999.98"]})
    recs = read_records(data / "val.jsonl")  # kept, not an error
    assert "999.99" in recs[0].codes and "999.98" in recs[1].codes
    err = capfd.readouterr().err
    assert err.count("not in the packaged ICD description tables") == 1
    assert "2 well-formed code(s)" in err and "999.98, 999.99" in err


@pytest.mark.parametrize("args, needles", [
    (("--limit", "-5"), ("--limit -5", ">= 1")),
    (("--limit", "0"), ("--limit 0",)),
    (("--n", "0"), ("--n 0",)),
    (("data.val_limit=-5",), ("data.val_limit", "-5")),
])
def test_rollout_limits(assets, tmp_path, args, needles):
    proc = _cli("rollout.py", "--config", str(assets["config"]), "--split", "val", *args,
                "--out", str(tmp_path / "p.jsonl"), timeout=60)
    _user_error(proc, *needles)


def test_train_limit_zero(assets, tmp_path):
    _user_error(_train(assets, "data.train_limit=0", f"train.output_dir={tmp_path}/r"),
                "data.train_limit", ">= 1")


def _raw_copy(assets, tmp_path: Path) -> tuple[Path, bytes]:
    raw = tmp_path / "raw"
    shutil.copytree(assets["root"] / "raw", raw)
    notes = gzip.decompress((raw / "NOTEEVENTS.csv.gz").read_bytes())
    (raw / "NOTEEVENTS.csv.gz").unlink()
    return raw, notes


def test_prepare_non_utf8_table_names_line(assets, tmp_path):
    raw, notes = _raw_copy(assets, tmp_path)
    lines = notes.split(b"\n")
    lines[5] = lines[5] + b"\xfe"
    (raw / "NOTEEVENTS.csv").write_bytes(b"\n".join(lines))
    proc = _cli("minicd.data", "prepare", "--source", "mimic3", "--raw-dir", str(raw),
                "--out", str(tmp_path / "out"), timeout=120)
    _user_error(proc, "NOTEEVENTS.csv:6", "UTF-8", "0xfe")


def test_prepare_csv_cut_inside_a_quoted_note(assets, tmp_path):
    raw, notes = _raw_copy(assets, tmp_path)
    cut = notes[:-40]  # inside the last note's quoted text
    assert cut.count(b'"') % 2 == 1  # an odd number of quotes: the file ends inside one
    (raw / "NOTEEVENTS.csv").write_bytes(cut)
    proc = _cli("minicd.data", "prepare", "--source", "mimic3", "--raw-dir", str(raw),
                "--out", str(tmp_path / "out"), timeout=120)
    _user_error(proc, "NOTEEVENTS.csv:", "ends inside a quoted field")
    assert not (tmp_path / "out").exists()


def test_prepare_filtering_to_an_empty_split(assets, tmp_path):
    proc = _cli("minicd.data", "prepare", "--source", "mimic3", "--raw-dir",
                str(assets["root"] / "raw"), "--out", str(tmp_path / "out"), "--min-count",
                "100000", timeout=120)
    _user_error(proc, "empty split", "train=0", "min-count")
    assert not list((tmp_path / "out").rglob("*.jsonl")) if (tmp_path / "out").exists() else True


def test_evaluate_empty_predictions(assets, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    proc = _cli("evaluate.py", "--gold", str(assets["data_dir"] / "test.jsonl"), "--run",
                f"SFT={empty}", timeout=60)
    _user_error(proc, str(empty), "no predictions")


# -------------------------------------------------------------------------------------- files
def test_zero_byte_model_weights(assets, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(assets["model_dir"], model)
    (model / "model.safetensors").write_bytes(b"")
    proc = _train(assets, f"model.path={model}", f"train.output_dir={tmp_path / 'run'}")
    _user_error(proc, str(model / "model.safetensors"), "0 bytes", "truncated")


@pytest.fixture(scope="module")
def sft_run(assets, tmp_path_factory):
    """A finished 2-step SFT run with checkpoints step-1 and step-2 and a final adapter."""
    out = tmp_path_factory.mktemp("sftrun") / "run"
    proc = _train(assets, f"train.output_dir={out}", "train.max_steps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_truncated_adapter(assets, sft_run, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(sft_run / "adapter", adapter)
    w = adapter / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    proc = _cli("rollout.py", "--config", str(assets["config"]), "--split", "val", "--limit", "1",
                "--adapter", str(adapter), "--out", str(tmp_path / "p.jsonl"))
    _user_error(proc, str(w), "truncated")


def test_resume_skips_a_corrupt_newest_checkpoint(assets, sft_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(sft_run, run)
    bad = run / "checkpoints" / "step-00000002" / "trainer_state.json"
    bad.write_text('{"format_version": 1, "step": ')
    proc = _train(assets, f"train.output_dir={run}", "train.max_steps=3", "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"skipping checkpoint {bad.parent}" in proc.stderr and str(bad) in proc.stderr
    assert "resuming from the earlier checkpoint" in proc.stderr
    assert "step-00000001" in proc.stderr
    # resumed at step 1: the old run's line for step 2 was dropped, each step appears once
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3]


def test_resume_with_no_loadable_checkpoint(assets, sft_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(sft_run, run)
    (run / "checkpoints" / "step-00000002" / "optimizer.json").write_text("{not json")
    bad = run / "checkpoints" / "step-00000001" / "rng.safetensors"
    bad.write_bytes(b"")
    proc = _train(assets, f"train.output_dir={run}", "train.max_steps=3", "--resume")
    _user_error(proc, "--resume", "no loadable checkpoint", str(bad))


def test_output_dir_under_a_regular_file(assets, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    t0 = time.perf_counter()
    proc = _train(assets, f"train.output_dir={blocker / 'sub' / 'run'}")
    _user_error(proc, str(blocker / "sub" / "run"), "is a file")
    assert time.perf_counter() - t0 < 5.0  # before torch and the model
    assert blocker.read_text() == "x"


def test_read_only_output_dir(assets, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    root = os.geteuid() == 0  # root ignores mode bits: make the folder immutable instead
    subprocess.run(["chattr", "+i", str(ro)], check=True) if root else ro.chmod(0o555)
    try:
        proc = _train(assets, f"train.output_dir={ro / 'run'}")
    finally:
        subprocess.run(["chattr", "-i", str(ro)], check=True) if root else ro.chmod(0o755)
    _user_error(proc, str(ro / "run"), "cannot be written")
    assert list(ro.iterdir()) == []


@pytest.mark.parametrize("code, reason", [(errno.ENOSPC, "disk is full"),
                                          (errno.EROFS, "read-only")])
def test_check_writable_full_or_read_only_disk(tmp_path, monkeypatch, code, reason):
    import minicd.fileio as fileio

    def failing_write(fd, data):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fileio.os, "write", failing_write)
    target = tmp_path / "a" / "b"
    with pytest.raises(OutputError, match=reason) as info:
        fileio.check_writable(target)
    assert str(target) in str(info.value)
    assert not (tmp_path / "a").exists()  # the folders it made are gone again
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------- runs
def test_existing_run_refused_then_overwritten(assets, sft_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(sft_run, run)
    proc = _train(assets, f"train.output_dir={run}", "train.max_steps=1")
    _user_error(proc, "train.output_dir", str(run), "--resume", "--overwrite")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == \
        ["latest", "step-00000001", "step-00000002"]  # untouched
    # overrides anywhere among the options: before and after --overwrite
    proc = _cli("train.py", "--stage", "sft", f"train.output_dir={run}", "--config",
                str(assets["config"]), "--overwrite", "train.max_steps=1", *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-00000001"]
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_says_how_to_resume_and_exits_128_plus_n(assets, tmp_path, signum):
    run = tmp_path / "run"
    args = ["--stage", "sft", "--config", str(assets["config"]), f"train.output_dir={run}",
            "train.max_steps=40", "train.save_every=100", *FAST]
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.is_file() and metrics.read_text().strip()) and time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signum, err[-3000:]
    assert "Traceback" not in out + err
    name = signal.Signals(signum).name
    latest = (run / "checkpoints" / "latest").read_text().strip()
    step = json.loads((run / "checkpoints" / latest / "trainer_state.json").read_text())["step"]
    assert 1 <= step < 40
    assert f"stopped early by {name} at step {step}" in err
    command = err.split("Resume with:")[1].strip().splitlines()[0]
    assert command.startswith("python ") and command.endswith("--resume")
    # the printed command resumes and finishes the run; each step is logged once
    argv = shlex.split(command)
    argv[0] = sys.executable
    done = subprocess.run(argv, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["step"] for r in read_metrics(metrics)] == list(range(1, 41))


# ------------------------------------------------------------------------------------ rollout
def test_sampled_rollout_resume_equals_uninterrupted(assets, tmp_path):
    def rollout(out: Path) -> subprocess.CompletedProcess:
        # overrides among the options, before and after them
        return _cli("rollout.py", "--config", str(assets["config"]), "rollout.top_p=1.0",
                    "--split", "val", "--limit", "4", "train.seed=7", "--n", "2",
                    "--temperature", "1.0", "--out", str(out))

    full = tmp_path / "full.jsonl"
    proc = rollout(full)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_predictions(full)
    assert [(r["sample_index"]) for r in rows] == [0, 1] * 4
    lines = full.read_text().splitlines(keepends=True)
    # killed while writing record 2: record 1 whole, a torn first line of record 2
    torn = tmp_path / "torn.jsonl"
    torn.write_text("".join(lines[:2]) + lines[2][:25])
    proc = rollout(torn)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torn last line" in proc.stderr and "skipped=1" in proc.stdout
    assert torn.read_text() == full.read_text()  # exactly the uninterrupted run's rows
    # a record with only some of its samples (an older --n 1 run): redone whole
    partial = tmp_path / "partial.jsonl"
    partial.write_text("".join(lines[:3]))
    proc = rollout(partial)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fewer than --n 2 samples" in proc.stderr
    key = lambda r: (r["id"], r["sample_index"])  # noqa: E731
    assert sorted(read_predictions(partial), key=key) == sorted(rows, key=key)
