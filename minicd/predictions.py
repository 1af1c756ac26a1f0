"""Predictions files: the JSONL that ``rollout.py`` writes and ``evaluate.py`` scores.

One line per generated response::

    {"id": "100001", "response": "<code>401.9, 38.93</code>", "codes": ["401.9", "38.93"],
     "has_span": true, "malformed": [], "off_label": [], "sample_index": 0}

``id`` is the record id (``minicd.data.records.Record.id``), ``response`` the raw generated text,
``sample_index`` the index of the sample among those drawn for that record (0 for greedy or the
first sample; default 0). ``codes``, ``has_span``, ``malformed`` and ``off_label`` are what the
rollout's parser saw; they are informational only: evaluation re-parses ``response`` with
:func:`minicd.parse.parse_codes`, the single source of truth. Only ``id`` and ``response`` are
required when reading; the other keys are type-checked when present.

Errors name ``file:line`` and the key, never the response text (a response may quote the note).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Iterable

from minicd.data.records import iter_jsonl
from minicd.fileio import atomic_file
from minicd.errors import DataError
from minicd.parse import ParsedCodes

__all__ = ["PREDICTION_KEYS", "drop_torn_tail", "prediction_row", "read_predictions",
           "validate_prediction", "write_predictions"]

PREDICTION_KEYS = ("id", "response", "codes", "has_span", "malformed", "off_label",
                   "sample_index")
_LIST_KEYS = ("codes", "malformed", "off_label")


def prediction_row(id: str, response: str, parsed: ParsedCodes, sample_index: int = 0) -> dict:
    """One predictions-file row for ``response`` (generated for record ``id``) and its parse."""
    return {"id": str(id), "response": response, "codes": list(parsed.codes),
            "has_span": bool(parsed.has_span), "malformed": list(parsed.malformed),
            "off_label": list(parsed.off_label), "sample_index": int(sample_index)}


def validate_prediction(obj: object, where: str) -> dict:
    """Check one row; return it with ``sample_index`` filled in (default 0).

    ``where`` prefixes error messages (e.g. ``"preds.jsonl:12"``). Raises DataError naming the
    key; the message never contains the response text."""
    def bad(key: str | None, what: str) -> DataError:
        loc = where + (f": key '{key}'" if key else "")
        return DataError(f"{loc}: {what}; fix or remove this line, or regenerate the file with "
                         "rollout.py")

    if not isinstance(obj, dict):
        raise bad(None, f"expected a JSON object, got {type(obj).__name__}")
    for key in ("id", "response"):
        if key not in obj:
            raise bad(key, "missing (required keys: id, response)")
        if not isinstance(obj[key], str):
            raise bad(key, f"must be a string, got {type(obj[key]).__name__}")
    if not obj["id"].strip():
        raise bad("id", "is empty")
    for key in _LIST_KEYS:
        if key in obj and (not isinstance(obj[key], list)
                           or not all(isinstance(c, str) for c in obj[key])):
            raise bad(key, "must be a list of strings")
    if "has_span" in obj and not isinstance(obj["has_span"], bool):
        raise bad("has_span", f"must be true or false, got {type(obj['has_span']).__name__}")
    index = obj.get("sample_index", 0)
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise bad("sample_index", f"must be an integer >= 0, got {index!r}")
    return {**obj, "sample_index": index}


def read_predictions(path: str | os.PathLike) -> list[dict]:
    """Read and validate a predictions JSONL file (``.jsonl`` or ``.jsonl.gz``).

    Blank lines are skipped. Raises DataError naming ``file:line`` (and the key) for malformed
    JSON, a missing or mistyped key, or a repeated (id, sample_index) pair."""
    path = Path(path)
    rows: list[dict] = []
    seen: dict[tuple[str, int], int] = {}
    for lineno, obj in iter_jsonl(path):
        row = validate_prediction(obj, f"{path}:{lineno}")
        key = (row["id"], row["sample_index"])
        if key in seen:
            raise DataError(f"{path}:{lineno}: key 'id': id {row['id']!r} with sample_index "
                            f"{row['sample_index']} already appeared on line {seen[key]}; "
                            "remove the duplicate (e.g. from an appended re-run)")
        seen[key] = lineno
        rows.append(row)
    return rows


def write_predictions(rows: Iterable[dict], path: str | os.PathLike, *,
                      append: bool = False) -> int:
    """Write predictions rows as JSONL; returns the number written.

    ``append=False`` writes the whole file atomically (temporary file + rename);
    ``append=True`` appends all ``rows`` in one write (flushed), so a rollout can stream results
    record by record and an interrupted run keeps every complete record. Rows are validated
    first."""
    path = Path(path)
    texts = []  # validate every row before touching the file
    for i, row in enumerate(rows):
        row = validate_prediction(row, f"{path} (row {i})")
        ordered = {k: row[k] for k in PREDICTION_KEYS if k in row}
        ordered.update((k, v) for k, v in row.items() if k not in ordered)
        texts.append(json.dumps(ordered, ensure_ascii=False) + "\n")

    n = 0
    if append:  # one write: a kill leaves all of these rows or a torn tail (see drop_torn_tail)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write("".join(texts))
            f.flush()
        n = len(texts)
    else:
        with atomic_file(path) as f:
            for text in texts:
                f.write(text)
                n += 1
    return n



def drop_torn_tail(path: str | os.PathLike) -> bool:
    """Cut a predictions file back to its last complete line (a kill or a full disk can leave
    a torn last line); warn on stderr when something was dropped. Returns True if it was."""
    path = Path(path)
    with open(path, "rb+") as f:
        data = f.read()
        if not data or data.endswith(b"\n"):
            return False
        keep = data.rfind(b"\n") + 1
        f.truncate(keep)
    print(f"warning: {path}: dropped a torn last line ({len(data) - keep} bytes, from an "
          "interrupted run); its record is generated again", file=sys.stderr)
    return True
