"""Progress bars and metrics logging.

Progress bars use ``tqdm`` (always present: it is a dependency of ``huggingface-hub``).
Metrics go to a JSONL file, one object per line. Nothing here ever logs note text: callers
pass numbers and identifiers only.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(
    iterable: Iterable[T] | None = None,
    *,
    total: int | None = None,
    desc: str | None = None,
    unit: str = "it",
    disable: bool | None = None,
    leave: bool = True,
) -> Iterator[T] | tqdm:
    """A tqdm bar on stderr; disabled off rank 0 or when MINICD_NO_PROGRESS=1.

    Use as an iterable wrapper, or with ``iterable=None`` as a manual bar (``.update(n)``).
    """
    if disable is None:
        disable = os.environ.get("MINICD_NO_PROGRESS", "0") == "1" or int(os.environ.get("RANK", "0")) != 0
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, leave=leave,
                file=sys.stderr, dynamic_ncols=True)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item") and callable(value.item):  # torch / numpy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLogger:
    """Appends one JSON object per call to ``path`` (metrics JSONL); rank 0 only.

    Optional TensorBoard (``tensorboard=True``) and W&B (``wandb_project=...``) sinks are used
    only when the packages are installed; a missing package raises a clear error.
    """

    def __init__(self, path: str | os.PathLike | None, *, enabled: bool = True,
                 tensorboard: bool = False, wandb_project: str | None = None,
                 run_name: str | None = None, config: dict | None = None) -> None:
        self.enabled = enabled and path is not None
        self.path = Path(path) if path is not None else None
        self._tb = None
        self._wandb = None
        self._t0 = time.time()
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:  # pragma: no cover - optional
                from minicd.errors import ConfigError
                raise ConfigError(
                    "log.tensorboard = true but tensorboard is not installed; "
                    "`pip install tensorboard` or set log.tensorboard = false") from exc
            self._tb = SummaryWriter(str(self.path.parent / "tb"))
        if wandb_project:
            try:
                import wandb
            except ImportError as exc:  # pragma: no cover - optional
                from minicd.errors import ConfigError
                raise ConfigError(
                    "log.wandb_project is set but wandb is not installed; "
                    "`pip install wandb` or unset log.wandb_project") from exc
            self._wandb = wandb.init(project=wandb_project, name=run_name, config=config or {})

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if not self.enabled:
            return
        row = {k: _jsonable(v) for k, v in metrics.items()}
        if step is not None:
            row = {"step": step, **row}
        row.setdefault("time_s", round(time.time() - self._t0, 3))
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        numeric = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
        if self._tb is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(k, v, step if step is not None else 0)
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a metrics JSONL file written by :class:`MetricsLogger`."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    return rows


def truncate_metrics(path: str | os.PathLike, step: int) -> int:
    """Drop the lines of a metrics JSONL file logged after ``step`` (a resumed run logs those
    steps again) and a torn last line; rewritten atomically. Returns the number of lines dropped."""
    from minicd.fileio import atomic_file

    path = Path(path)
    if not path.is_file():
        return 0
    keep, dropped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] > step:
            dropped += 1
            continue
        keep.append(line + "\n")
    if dropped:
        with atomic_file(path) as f:
            f.writelines(keep)
    return dropped
