"""Safe file output: the one atomic-write helper for files and the one for directories, and the
checks that an output directory can be written and does not already hold another run.

Atomic means a reader (or a resumed run after a crash) sees either the old content or the new,
never a half-written file: everything is written under a temporary name in the same folder,
flushed and fsync'ed, then renamed over the target (``os.replace`` is atomic on POSIX), and the
folder is fsync'ed so the rename survives a power cut. A directory that already exists is moved
aside first and removed only after the new one is in place, so the name never points at a
half-written directory (a crash between the two renames leaves the old copy under ``.old-*``,
which the next write removes).

No torch import here: ``train.py`` checks its output directory before torch or a model loads.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Iterator

from minicd.errors import CheckpointError, OutputError

__all__ = ["RUN_MARKERS", "atomic_dir", "atomic_file", "check_safetensors", "check_writable",
           "claim_run_dir", "fsync_dir", "holds_run", "read_json", "read_safetensors",
           "write_text_atomic"]


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so renames inside it are durable (no-op where not supported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", *, encoding: str | None = "utf-8",
                newline: str | None = "\n") -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; on a clean exit flush, fsync and rename
    it over ``path``; on any exception remove it and leave ``path`` as it was.

    ``mode`` is "w" (text; ``encoding``/``newline`` apply) or "wb" (bytes)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_file: mode {mode!r}, expected 'w' or 'wb'")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if mode == "wb":
            f = os.fdopen(fd, "wb")
        else:
            f = os.fdopen(fd, "w", encoding=encoding, newline=newline)
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_file`)."""
    with atomic_file(path) as f:
        f.write(text)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``path``; fill it. On a clean exit its files are
    fsync'ed and it replaces ``path`` (an existing ``path`` is moved aside, the new directory
    renamed in, then the old one removed); on any exception it is removed and ``path`` is kept.
    Leftovers of a crash (``.<name>.tmp-*``, ``.<name>.old-*``) are removed first."""
    path = Path(path)
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    for stale in list(parent.glob(f".{path.name}.tmp-*")) + list(parent.glob(f".{path.name}.old-*")):
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=parent))
    try:
        yield tmp
        for root, _, files in os.walk(tmp):
            for name in files:
                with open(os.path.join(root, name), "rb") as f:
                    os.fsync(f.fileno())
            fsync_dir(root)
        old = None
        if path.exists() or path.is_symlink():
            if not path.is_dir():
                raise OutputError(f"{path} exists and is not a directory; remove it or choose "
                                  "another output path")
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=parent))
            os.replace(path, old / "x")
        os.replace(tmp, path)
        fsync_dir(parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------- reading saved files
def _size(path: Path) -> str:
    try:
        return f"{path.stat().st_size} bytes"
    except OSError:
        return "size unknown"


def read_json(path: str | os.PathLike, fix: str = "re-save or re-download it") -> object:
    """Parse a JSON file; a missing, unreadable or corrupt one raises CheckpointError naming it."""
    import json

    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}; {fix}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        where = f"{path}:{exc.lineno}" if isinstance(exc, json.JSONDecodeError) else str(path)
        raise CheckpointError(f"{where}: corrupt JSON ({_size(path)}; {exc}); {fix}") from None


def check_safetensors(path: str | os.PathLike, fix: str = "re-save or re-download it") -> None:
    """Open a safetensors file's header (cheap: nothing is loaded); a zero-byte, truncated or
    corrupt file raises CheckpointError naming it (safetensors checks that the data the header
    declares is all there)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({_size(path)}: {exc}); "
                              f"it looks truncated or corrupt: {fix}") from None


def read_safetensors(path: str | os.PathLike, device: str = "cpu",
                     fix: str = "re-save or re-download it") -> dict:
    """``safetensors.torch.load_file`` with a CheckpointError naming a truncated/corrupt file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({_size(path)}: {exc}); "
                              f"it looks truncated or corrupt: {fix}") from None


# ------------------------------------------------------------------------ output directories
def check_writable(path: str | os.PathLike, what: str = "output directory") -> Path:
    """Make sure directory ``path`` exists (creating it) and a file can be written in it.

    Raises :class:`OutputError` naming the path when an ancestor is a regular file, the folder
    is read-only, or the disk is full; folders this call created are removed again then, so a
    refused run leaves nothing behind. Cheap: one small probe file, written and deleted.

    Safe when several processes check the same new path at once (every rank of a torchrun
    launch does): a folder another process made first is used, and never removed, by this one."""
    path = Path(path)
    missing: list[Path] = []
    probe_dir = path
    while not probe_dir.exists():
        missing.append(probe_dir)
        probe_dir = probe_dir.parent
    created: list[Path] = []  # what this call made, shallowest first
    try:
        if not probe_dir.is_dir():
            raise OutputError(f"{what} {path}: {probe_dir} is a file, not a folder; choose "
                              "another path")
        for d in reversed(missing):
            try:
                d.mkdir()
            except FileExistsError:
                if not d.is_dir():  # a file appeared there: reported below as for any OSError
                    raise
                continue  # another process made it between the check and here
            created.append(d)
        fd, probe = tempfile.mkstemp(prefix=".minicd-write-probe-", dir=path)
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        for d in reversed(created):  # deepest first; one another process writes in stays
            with contextlib.suppress(OSError):
                d.rmdir()
        reason = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                  errno.EROFS: "the file system is read-only",
                  errno.EACCES: "permission denied (read-only folder?)",
                  errno.EPERM: "operation not permitted (read-only folder?)",
                  errno.ENOTDIR: "a part of the path is a file, not a folder"}.get(
                      exc.errno, exc.strerror or str(exc))
        raise OutputError(f"{what} {path} cannot be written: {reason}; free space, fix the "
                          "permissions or choose another path") from None
    except OutputError:
        for d in reversed(created):
            with contextlib.suppress(OSError):
                d.rmdir()
        raise
    return path


# What a training run leaves in its output_dir; any of them means the folder holds a run.
RUN_MARKERS = ("metrics.jsonl", "checkpoints", "adapter", "model", "merged", "sft_model",
               "phi_state.json", "phi_rounds.jsonl", "init_train_predictions.jsonl", "tb")


def holds_run(path: str | os.PathLike) -> list[str]:
    """Names of the run files found in ``path`` (:data:`RUN_MARKERS` and ``round-*`` folders)."""
    path = Path(path)
    if not path.is_dir():
        return []
    found = [m for m in RUN_MARKERS if (path / m).exists()]
    return found + sorted(p.name for p in path.glob("round-*") if p.is_dir())


def claim_run_dir(path: str | os.PathLike, *, resume: bool, overwrite: bool,
                  remove: bool = True) -> Path:
    """Check ``train.output_dir`` before a training run: writable (:func:`check_writable`), and a
    fresh run (not ``resume``) refuses a folder that already holds a run unless ``overwrite``,
    which removes that run's files (``remove``: the main rank; others only check). Raises
    :class:`OutputError` naming the folder and the two ways on."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"train.output_dir = {str(path)!r} is a file, not a folder; choose "
                          "another path")
    found = holds_run(path)
    if found and not resume and not overwrite:
        raise OutputError(f"train.output_dir = {str(path)!r} already holds a run ({', '.join(found[:4])}"
                          f"{', ...' if len(found) > 4 else ''}); pass --resume to continue it, "
                          "--overwrite to replace it, or choose another train.output_dir")
    check_writable(path, "train.output_dir")
    if found and overwrite and not resume and remove:
        for name in found:
            p = path / name
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    return path
