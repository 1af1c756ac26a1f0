"""minicd.fileio: the atomic file and directory writers, output-folder checks, safe readers."""

from __future__ import annotations

import json

import pytest

from minicd.errors import CheckpointError, OutputError
from minicd.fileio import (atomic_dir, atomic_file, check_safetensors, claim_run_dir, holds_run,
                           read_json, read_safetensors)
from minicd.log import truncate_metrics


def test_atomic_file_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / "sub" / "f.txt"
    with atomic_file(path) as f:
        f.write("one\n")
    assert path.read_text() == "one\n"
    with pytest.raises(RuntimeError):
        with atomic_file(path) as f:
            f.write("half")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == "one\n"  # old content kept
    assert sorted(p.name for p in path.parent.iterdir()) == ["f.txt"]  # no temp left
    with atomic_file(path, "wb") as f:
        f.write(b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"


def test_atomic_dir_swaps_and_cleans_up(tmp_path):
    target = tmp_path / "adapter"
    with atomic_dir(target) as d:
        (d / "a").write_text("1")
    assert (target / "a").read_text() == "1"
    with pytest.raises(ValueError):
        with atomic_dir(target) as d:
            (d / "b").write_text("2")
            raise ValueError("crash")
    assert sorted(p.name for p in target.iterdir()) == ["a"]  # untouched
    (tmp_path / ".adapter.tmp-stale").mkdir()  # left by an earlier crash
    with atomic_dir(target) as d:
        (d / "c").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["c"]  # replaced as a whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_claim_run_dir(tmp_path):
    run = tmp_path / "run"
    assert claim_run_dir(run, resume=False, overwrite=False) == run and run.is_dir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    (run / "round-0").mkdir()
    (run / "notes.txt").write_text("mine")
    assert holds_run(run) == ["metrics.jsonl", "round-0"]
    with pytest.raises(OutputError, match="already holds a run"):
        claim_run_dir(run, resume=False, overwrite=False)
    claim_run_dir(run, resume=True, overwrite=False)  # resume: kept
    assert holds_run(run) == ["metrics.jsonl", "round-0"]
    claim_run_dir(run, resume=False, overwrite=True)  # overwrite: the run's files go, others stay
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]


def test_readers_name_the_corrupt_file(tmp_path):
    import torch
    from safetensors.torch import save_file

    good = tmp_path / "w.safetensors"
    save_file({"x": torch.arange(100, dtype=torch.float32)}, str(good))
    check_safetensors(good)
    assert torch.equal(read_safetensors(good)["x"], torch.arange(100, dtype=torch.float32))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-8])
    for fn in (check_safetensors, read_safetensors):
        with pytest.raises(CheckpointError, match=f"{cut}.*truncated or corrupt"):
            fn(cut)
    bad = tmp_path / "s.json"
    bad.write_text('{"a": 1,\n "b": ')
    with pytest.raises(CheckpointError, match=f"{bad}:2: corrupt JSON"):
        read_json(bad)
    (tmp_path / "w.json").write_text("[1]")
    assert read_json(tmp_path / "w.json") == [1]


def test_truncate_metrics_keeps_each_step_once(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 0, "val/micro_f1": 0.1}, {"step": 1}, {"step": 2}, {"step": 3}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "lo')
    assert truncate_metrics(path, 2) == 2  # step 3 and the torn step-4 line
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 1, 2]
    assert truncate_metrics(path, 2) == 0
