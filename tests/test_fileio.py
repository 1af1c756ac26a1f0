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


def _another_rank_makes(monkeypatch, folder):
    """Path.mkdir as if another rank of the same launch made ``folder`` between this rank's
    existence check and its own mkdir (the race CI hit with torchrun --nproc_per_node 2)."""
    from pathlib import Path

    real_mkdir = Path.mkdir

    def racing_mkdir(self, *args, **kwargs):
        if self == folder and not folder.exists():
            real_mkdir(folder)  # the other rank wins
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", racing_mkdir)


def test_check_writable_when_another_rank_makes_the_folder_first(tmp_path, monkeypatch):
    from minicd.fileio import check_writable

    target = tmp_path / "a" / "multi"
    _another_rank_makes(monkeypatch, target)
    assert check_writable(target) == target and target.is_dir()
    assert list(target.iterdir()) == []  # the probe file is gone


def test_failed_check_keeps_the_folder_another_rank_made(tmp_path, monkeypatch):
    import errno
    import os

    import minicd.fileio as fileio

    target = tmp_path / "a" / "multi"
    _another_rank_makes(monkeypatch, target)

    def full_disk(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fileio.os, "write", full_disk)
    with pytest.raises(OutputError, match="disk is full"):
        fileio.check_writable(target)
    # "a" was made by this call and is not empty: it stays, as does the other rank's "multi"
    assert target.is_dir() and (tmp_path / "a").is_dir()


def test_check_writable_from_two_processes_at_once(tmp_path):
    """Many fresh folders claimed by two processes together: neither ever refuses."""
    import subprocess
    import sys

    script = ("import sys\nfrom minicd.fileio import check_writable\n"
              "for i in range(200):\n    check_writable(sys.argv[1] + f'/r{i}/x/y')\n")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path)],
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errors = [p.communicate()[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    assert all((tmp_path / f"r{i}" / "x" / "y").is_dir() for i in range(200))
