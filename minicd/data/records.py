"""Records: one coded admission (note + gold codes), JSONL I/O with validation, ShareGPT export.

A dataset split is a JSONL file, one :class:`Record` per line::

    {"id": "100001", "subject_id": "42", "split": "train", "note": "...",
     "codes": ["401.9", "38.93"], "code_system": "icd9"}

Readers validate every line and raise :class:`~minicd.errors.DataError` naming ``file:line``
and the offending key, never the note text (it is protected health information). Writers are
atomic (``minicd.fileio.atomic_file``), so an interrupted run never leaves a half-written split.

The ShareGPT export is the instruction-tuning format of LlamaFactory (``formatting: sharegpt``):
a JSON list of ``{"conversations": [{"from": "human", ...}, {"from": "gpt", ...}], "id": ...}``.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterable, Iterator

from minicd.codes import in_taxonomy, is_valid, normalize
from minicd.errors import DataError
from minicd.fileio import atomic_file
from minicd.parse import format_answer
from minicd.prompts import coding_prompt

SPLITS = ("train", "val", "test")
CODE_SYSTEMS = ("icd9", "icd10")
_KEYS = ("id", "subject_id", "split", "note", "codes", "code_system")
_SYSTEM_NAMES = {"icd9": "ICD-9-CM", "icd10": "ICD-10-CM/PCS"}
_EXAMPLES = {"icd9": "401.9, V58.61, 38.93", "icd10": "I10, E11.9, 0DTJ4ZZ"}


@dataclass(frozen=True)
class Record:
    """One admission: its discharge summary and gold code set.

    ``codes`` are dotted, normalized (``minicd.codes.normalize``), deduplicated, in source order
    (diagnoses by sequence number, then procedures).
    """

    id: str            # hospital admission id (HADM_ID / hadm_id)
    subject_id: str    # patient id; no patient appears in two splits
    split: str         # "train" | "val" | "test"
    note: str          # discharge summary (lowercased, punctuation and newlines kept)
    codes: tuple[str, ...]
    code_system: str   # "icd9" | "icd10"

    def to_dict(self) -> dict:
        return {"id": self.id, "subject_id": self.subject_id, "split": self.split,
                "note": self.note, "codes": list(self.codes), "code_system": self.code_system}


# ----------------------------------------------------------------------------------------- I/O


def open_text(path: str | os.PathLike) -> IO[str]:
    """Open a UTF-8 text file for reading, transparently gunzipping a ``.gz`` path.

    Raises DataError naming the path when it is missing or unreadable.
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
        return open(path, encoding="utf-8", newline="")
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}; check the path and its "
                        "permissions") from exc


atomic_write = atomic_file  # old name, kept for callers: the one helper is minicd.fileio's


def _bad(path: Path, lineno: int, key: str | None, what: str) -> DataError:
    where = f"{path}:{lineno}" + (f": key '{key}'" if key else "")
    return DataError(f"{where}: {what}; fix or remove this line, or re-create the file with "
                     "`python -m minicd.data prepare`")


def _parse_line(obj: object, path: Path, lineno: int) -> Record:
    if not isinstance(obj, dict):
        raise _bad(path, lineno, None, f"expected a JSON object, got {type(obj).__name__}")
    for key in _KEYS:
        if key not in obj:
            raise _bad(path, lineno, key, f"missing (required keys: {', '.join(_KEYS)})")
    for key in ("id", "subject_id", "split", "note", "code_system"):
        if not isinstance(obj[key], str):
            raise _bad(path, lineno, key, f"must be a string, got {type(obj[key]).__name__}")
    if not obj["id"].strip():
        raise _bad(path, lineno, "id", "is empty")
    if not obj["note"].strip():
        raise _bad(path, lineno, "note", "is empty (every record needs a discharge summary)")
    if obj["split"] not in SPLITS:
        raise _bad(path, lineno, "split", f"unknown split {obj['split']!r} (expected one of "
                   f"{', '.join(SPLITS)})")
    if obj["code_system"] not in CODE_SYSTEMS:
        raise _bad(path, lineno, "code_system", f"unknown code system {obj['code_system']!r} "
                   f"(expected one of {', '.join(CODE_SYSTEMS)})")
    codes = obj["codes"]
    if not isinstance(codes, list) or not codes:
        raise _bad(path, lineno, "codes", "must be a non-empty list of code strings")
    out: list[str] = []
    for i, code in enumerate(codes):
        if not isinstance(code, str) or not code.strip():
            raise _bad(path, lineno, "codes", f"element {i} must be a non-empty string, got "
                       f"{code!r}")
        code = normalize(code)
        if not is_valid(code, obj["code_system"]):
            raise _bad(path, lineno, "codes", f"element {i} {code!r} is not a well-formed "
                       f"{_SYSTEM_NAMES[obj['code_system']]} code (dotted, e.g. "
                       f"{_EXAMPLES[obj['code_system']]})")
        if code not in out:
            out.append(code)
    return Record(id=obj["id"], subject_id=obj["subject_id"], split=obj["split"],
                  note=obj["note"], codes=tuple(out), code_system=obj["code_system"])


def iter_records(path: str | os.PathLike, *, report_unknown: bool = True) -> Iterator[Record]:
    """Stream the records of a JSONL file (``.jsonl`` or ``.jsonl.gz``), validating each line.

    Blank lines are ignored. Any invalid line (bad UTF-8 or JSON, a missing or mistyped key, a
    gold code that is not a well-formed code of the record's ``code_system``, an id already seen
    on an earlier line) raises DataError naming ``file:line`` and the key. Well-formed codes
    missing from the packaged description tables (MIMIC has some) are kept; with
    ``report_unknown`` their count is printed once to stderr when the file has been read.
    """
    path = Path(path)
    fix = "fix or remove this line, or re-create the file with `python -m minicd.data prepare`"
    seen: dict[str, int] = {}
    unknown: set[str] = set()
    for lineno, obj in iter_jsonl(path, fix):
        rec = _parse_line(obj, path, lineno)
        if rec.id in seen:
            raise _bad(path, lineno, "id", f"id {rec.id!r} already appeared on line "
                       f"{seen[rec.id]} (record ids must be unique)")
        seen[rec.id] = lineno
        if report_unknown:
            unknown.update(c for c in rec.codes if not in_taxonomy(c, rec.code_system))
        yield rec
    if unknown:
        shown = ", ".join(sorted(unknown)[:5])
        print(f"note: {path}: {len(unknown)} well-formed code(s) not in the packaged ICD "
              f"description tables (e.g. {shown}); kept, but hints cannot describe them",
              file=sys.stderr)


def iter_jsonl(path: str | os.PathLike,
               fix: str = "fix or remove this line") -> Iterator[tuple[int, object]]:
    """(line number, parsed JSON value) for each non-blank line of a ``.jsonl``/``.jsonl.gz`` file;
    bytes that are not UTF-8 and malformed JSON raise DataError naming ``file:line`` and ``fix``."""
    path = Path(path)
    try:
        f = gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}; check the path and its "
                        "permissions") from exc
    with f:
        try:
            for lineno, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: not valid UTF-8 (byte "
                                    f"0x{raw[exc.start]:02x} at column {exc.start + 1}); save the "
                                    f"file as UTF-8, or {fix}") from None
                if not line.strip():
                    continue
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: malformed JSON ({exc.msg} at column "
                                    f"{exc.colno}); {fix}") from None
        except (OSError, EOFError) as exc:  # e.g. a truncated .gz
            raise DataError(f"cannot read {path}: {exc}; re-create or re-download it") from None


def read_records(path: str | os.PathLike) -> list[Record]:
    """Read and validate a whole JSONL split into memory (see :func:`iter_records`)."""
    return list(iter_records(path))


def write_records(records: Iterable[Record], path: str | os.PathLike) -> int:
    """Write records as JSONL atomically; returns the number written.

    Key order is fixed and non-ASCII text is kept as is, so equal inputs give byte-identical files.
    """
    n = 0
    with atomic_file(path) as f:
        for rec in records:
            f.write(json.dumps(rec.to_dict(), ensure_ascii=False) + "\n")
            n += 1
    return n


# ------------------------------------------------------------------------------------ ShareGPT


def to_sharegpt(rec: Record) -> dict:
    """One record as a LlamaFactory ShareGPT example (user: instruction + note, assistant: codes)."""
    return {"conversations": [
        {"from": "human", "value": coding_prompt(rec.note, rec.code_system)},
        {"from": "gpt", "value": format_answer(list(rec.codes))},
    ], "id": rec.id}


def sharegpt_dataset_info(file_name: str) -> dict:
    """The ``dataset_info.json`` entry LlamaFactory needs for a file written by write_sharegpt."""
    return {"file_name": file_name, "formatting": "sharegpt",
            "columns": {"messages": "conversations"},
            "tags": {"role_tag": "from", "content_tag": "value",
                     "user_tag": "human", "assistant_tag": "gpt"}}


def write_sharegpt(records: Iterable[Record], path: str | os.PathLike,
                   *, name: str | None = None) -> dict:
    """Write records as a ShareGPT JSON list (atomically); return the dataset_info entry.

    The returned ``{name: entry}`` snippet (name defaults to the file stem) goes into
    LlamaFactory's ``dataset_info.json``; its ``file_name`` is the bare file name, so put that
    JSON next to the data file or use :func:`update_dataset_info`.
    """
    path = Path(path)
    with atomic_file(path) as f:
        f.write("[")
        for i, rec in enumerate(records):
            f.write(("," if i else "") + "\n" + json.dumps(to_sharegpt(rec), ensure_ascii=False))
        f.write("\n]\n")
    return {name or path.name.split(".")[0]: sharegpt_dataset_info(path.name)}


def update_dataset_info(path: str | os.PathLike, entries: dict) -> None:
    """Merge ``entries`` into a LlamaFactory ``dataset_info.json`` (created if missing)."""
    path = Path(path)
    info: dict = {}
    if path.exists():
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"cannot read {path} as JSON ({exc}); delete it to regenerate") from exc
        if not isinstance(info, dict):
            raise DataError(f"{path} is not a JSON object; delete it to regenerate")
    info.update(entries)
    with atomic_file(path) as f:
        f.write(json.dumps(dict(sorted(info.items())), indent=2, ensure_ascii=False) + "\n")
