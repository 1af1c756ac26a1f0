"""Raw MIMIC tables -> coded admissions -> Full / Top-k datasets (Edin et al. 2023 "clean").

Steps (paper Appendix A; REFERENCE.md section 2):

1. Codes. MIMIC-III: ``DIAGNOSES_ICD`` and ``PROCEDURES_ICD`` (``ICD9_CODE`` read as a string),
   MIMIC-IV: ``hosp/diagnoses_icd`` and ``hosp/procedures_icd`` split by ``icd_version`` into an
   ICD-9 and an ICD-10 dataset. Codes get their dots (``minicd.codes.format_*``), then per
   admission: diagnoses by ``SEQ_NUM``, then procedures by ``SEQ_NUM``, first occurrence kept.
   Empty/NaN code cells and malformed codes are skipped and counted.
2. Notes. MIMIC-III: ``NOTEEVENTS`` rows with ``CATEGORY == "Discharge summary"``; per
   (SUBJECT_ID, HADM_ID) the report(s) come first, then the addenda by CHARTDATE (file order on
   ties), joined by a newline. MIMIC-IV: ``note/discharge`` rows per (subject_id, hadm_id) by
   ``note_seq``, exact duplicates dropped. Text is lowercased; punctuation, line structure and
   everything else are kept (the paper's change: Edin stripped non-alphanumerics). Empty notes
   are skipped and counted. Notes are streamed row by row and only discharge notes of admissions
   that have codes are held.
3. Admissions with both a note and codes are kept (the others are counted); codes with fewer
   than ``min_count`` admissions over the whole dataset are removed before splitting;
   admissions left with no code are dropped.
4. Splits: patient-level iterative stratification (``minicd.data.splits``) or a supplied split
   file (admissions absent from it are dropped and counted).
5. Variants: Full, and Top-k = the k most frequent codes of the *training* split (ties by code
   string); examples left with no label are dropped per split.

``summary.json`` ``counts`` (rows or admissions; absent keys are 0):
``note_rows_other_category`` (MIMIC-III rows not "Discharge summary"), ``note_rows_no_admission``
and ``code_rows_no_admission`` (empty admission id), ``empty_notes`` (discharge rows with empty
text), ``code_rows_empty`` (empty/NaN code cells), ``code_rows_invalid`` (malformed codes, first
five in ``invalid_code_examples``), ``code_rows_unknown_version`` (MIMIC-IV ``icd_version`` not 9
or 10), ``admissions_without_codes`` (a note but no code), ``admissions_without_note`` (codes but
no non-empty note; MIMIC-IV: ``icd9_``/``icd10_`` prefixed), ``unique_codes_before_filter``,
``rare_codes_removed``, ``admissions_with_only_rare_codes``, ``admissions_not_in_split_file`` and
``subjects_in_two_splits`` (supplied split files only).

Output under ``out_dir/<dataset>/`` (dataset ``mimic3``, ``mimic4_icd9``, ``mimic4_icd10``):
``{full,top50}/{train,val,test}.jsonl`` and ``.sharegpt.json``, ``split.csv``, ``summary.json``;
``out_dir/dataset_info.json`` registers every ShareGPT file for LlamaFactory.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable, Iterator, Mapping, Sequence

from minicd import codes as icd
from minicd.data.records import (SPLITS, Record, sharegpt_dataset_info,
                                 update_dataset_info, write_records, write_sharegpt)
from minicd.data.splits import normalize_id, patient_split, read_split_file, write_split_file
from minicd.errors import DataError
from minicd.fileio import atomic_file
from minicd.log import progress

DEFAULT_SEED = 10          # Edin et al. seed their split scripts with 10
_NAN = {"", "NAN", "NONE", "NULL", "NA", "<NA>"}
Key = tuple[str, str]      # (subject_id, admission_id)


@dataclass
class Admission:
    """A joined admission before filtering: note text and ordered, unique dotted codes."""

    subject_id: str
    hadm_id: str
    note: str
    codes: list[str]


@dataclass
class Stats:
    """What the pipeline skipped or dropped, and why (goes into summary.json)."""

    counts: Counter = field(default_factory=Counter)
    invalid_examples: list[str] = field(default_factory=list)   # "file:line 'code'", at most 5


def clean_text(text: str) -> str:
    """Paper's text change to Edin's protocol: lowercase, keep punctuation and line breaks."""
    return text.replace("\r\n", "\n").replace("\r", "\n").lower().strip()


# ------------------------------------------------------------------------------- CSV streaming


def find_table(raw_dir: str | os.PathLike, *relpaths: str) -> Path:
    """First existing ``raw_dir/<relpath>`` among ``relpaths``, each tried as ``.csv.gz`` and
    ``.csv``. Raises DataError listing what was tried."""
    root = Path(raw_dir)
    tried = []
    for rel in relpaths:
        for name in (rel + ".gz", rel):
            p = root / name
            tried.append(str(p))
            if p.is_file():
                return p
    raise DataError(f"table not found; tried {', '.join(tried)}; point --raw-dir at the folder "
                    "holding the MIMIC download")


def iter_table(path: Path, columns: Sequence[str], optional: Sequence[str] = (),
               ) -> Iterator[tuple[int, list[str | None]]]:
    """Stream a CSV(.gz) row by row: yields ``(line, [values of columns + optional])``.

    Column names match case-insensitively; a missing optional column yields None. Missing
    required columns, unreadable files and broken rows raise DataError naming the file.
    """
    old_limit = csv.field_size_limit()
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))    # discharge notes exceed 128 KiB
    lineno = 0
    try:
        raw = open(path, "rb")
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from exc
    bar = progress(total=os.path.getsize(path), desc=path.name, unit="B")
    if hasattr(bar, "unit_scale"):
        bar.unit_scale, bar.unit_divisor = True, 1024
        bar.refresh()
    try:
        binary = gzip.GzipFile(fileobj=raw) if path.suffix == ".gz" else raw
        # strict: a file cut off inside a quoted note is an error, not a short last note
        reader = csv.reader(_utf8_lines(binary, path), strict=True)
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path} is empty; expected a CSV header with {', '.join(columns)}")
        index = {h.strip().lower(): i for i, h in enumerate(header)}
        missing = [c for c in columns if c.lower() not in index]
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(missing)}; found "
                            f"{', '.join(header)}; is this the right MIMIC table?")
        pick = [index[c.lower()] for c in columns] + [index.get(c.lower(), -1) for c in optional]
        done = 0
        for row in reader:
            lineno = reader.line_num
            if not row:
                continue
            if len(row) < len(header):
                raise DataError(f"{path}:{lineno}: {len(row)} fields, header has {len(header)}; "
                                "the file looks truncated or mis-quoted")
            yield lineno, [row[i] if i >= 0 else None for i in pick]
            if lineno - done >= 4096:
                bar.update(raw.tell() - bar.n)
                done = lineno
        bar.update(raw.tell() - bar.n)
    except csv.Error as exc:
        start = lineno + 1  # the broken row starts after the last good one
        if "unexpected end of data" in str(exc):
            raise DataError(f"{path}:{start}: the file ends inside a quoted field (the row that "
                            f"starts on line {start} is cut off); re-download or re-extract the "
                            "file") from None
        raise DataError(f"{path}:{start}: malformed CSV ({exc}); re-download the file or check "
                        "that it is an uncorrupted CSV") from None
    except (EOFError, OSError, gzip.BadGzipFile) as exc:
        raise DataError(f"cannot read {path} (after line {lineno}): {exc}; re-download the "
                        "file or check that it is an uncorrupted UTF-8 CSV") from exc
    finally:
        bar.close()
        raw.close()
        csv.field_size_limit(old_limit)


def _utf8_lines(binary: IO[bytes], path: Path) -> Iterator[str]:
    """Decode a binary stream line by line; bytes that are not UTF-8 raise DataError naming
    ``path:line`` (the physical line, counted from 1 with the header)."""
    for lineno, raw in enumerate(binary, start=1):
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}:{lineno}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at "
                            f"column {exc.start + 1}); MIMIC tables are UTF-8: re-download the "
                            "file") from None


def _seq(value: str | None) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return float("inf")


def _version(value: str) -> int | None:
    try:
        return int(float(value))
    except ValueError:
        return None


def read_codes(path: Path, kind: str, stats: Stats, *, versioned: bool = False,
               ) -> dict[int, dict[Key, list[tuple[float, int, str]]]]:
    """Read a diagnoses or procedures table into ``{version: {key: [(seq, line, code)]}}``.

    ``kind`` is "dx" or "proc". Without ``versioned`` (MIMIC-III) every code is ICD-9 (column
    ``ICD9_CODE``); with it (MIMIC-IV) ``icd_version`` picks the formatter.
    """
    cols = (["subject_id", "hadm_id", "seq_num", "icd_code", "icd_version"] if versioned
            else ["SUBJECT_ID", "HADM_ID", "SEQ_NUM", "ICD9_CODE"])
    fmt: dict[int, Callable[[str], str]] = (
        {9: icd.format_icd9_dx, 10: icd.format_icd10_cm} if kind == "dx"
        else {9: icd.format_icd9_proc, 10: icd.format_icd10_pcs})
    out: dict[int, dict[Key, list]] = defaultdict(lambda: defaultdict(list))
    for lineno, vals in iter_table(path, cols):
        subject, hadm, seq, raw = normalize_id(vals[0]), normalize_id(vals[1]), vals[2], vals[3]
        if not hadm:
            stats.counts["code_rows_no_admission"] += 1
            continue
        if raw.strip().upper() in _NAN:
            stats.counts["code_rows_empty"] += 1
            continue
        version = _version(vals[4]) if versioned else 9
        if version not in fmt:
            stats.counts["code_rows_unknown_version"] += 1
            continue
        try:
            code = fmt[version](raw.strip())
        except DataError:
            stats.counts["code_rows_invalid"] += 1
            if len(stats.invalid_examples) < 5:
                stats.invalid_examples.append(f"{path.name}:{lineno} {raw.strip()!r}")
            continue
        out[version][(subject, hadm)].append((_seq(seq), lineno, code))
    return out


def merge_codes(dx: Mapping[Key, list], proc: Mapping[Key, list]) -> dict[Key, list[str]]:
    """Per admission: diagnoses by sequence number, then procedures; duplicates dropped."""
    merged: dict[Key, list[str]] = {}
    for key in list(dx) + [k for k in proc if k not in dx]:
        seen: dict[str, None] = {}
        for table in (dx, proc):
            for _, _, code in sorted(table.get(key, ())):
                seen.setdefault(code, None)
        merged[key] = list(seen)
    return merged


def _note_rows(rows: Iterator[tuple[Key, str, tuple]], wanted: set[Key], stats: Stats,
               ) -> dict[Key, list[tuple]]:
    """Shared note filter: rows ``(key, raw text, sort key)`` -> kept pieces per admission."""
    parts: dict[Key, list[tuple]] = defaultdict(list)
    unwanted: set[Key] = set()
    for key, text, order in rows:
        if not key[1]:
            stats.counts["note_rows_no_admission"] += 1
            continue
        text = clean_text(text)
        if not text:
            stats.counts["empty_notes"] += 1
            continue
        if key not in wanted:
            unwanted.add(key)
            continue
        parts[key].append((*order, text))
    stats.counts["admissions_without_codes"] += len(unwanted)
    return parts


def read_mimic3_notes(path: Path, wanted: set[Key], stats: Stats) -> dict[Key, str]:
    """Discharge summaries of NOTEEVENTS for admissions in ``wanted``: report(s) first, then the
    addenda by CHARTDATE (file order on ties), joined by a newline."""
    def rows():
        for lineno, (subject, hadm, category, desc, chartdate, text) in iter_table(
                path, ["SUBJECT_ID", "HADM_ID", "CATEGORY", "DESCRIPTION", "CHARTDATE", "TEXT"]):
            if category.strip() != "Discharge summary":
                stats.counts["note_rows_other_category"] += 1
                continue
            addendum = 0 if desc.strip().lower() == "report" else 1
            yield ((normalize_id(subject), normalize_id(hadm)), text,
                   (addendum, chartdate.strip(), lineno))

    parts = _note_rows(rows(), wanted, stats)
    return {k: "\n".join(p[-1] for p in sorted(v)) for k, v in parts.items()}


def read_mimic4_notes(path: Path, wanted: set[Key], stats: Stats) -> dict[Key, str]:
    """MIMIC-IV-Note discharge summaries for admissions in ``wanted``, by note_seq (file order
    on ties), exact duplicates dropped, joined by a newline."""
    def rows():
        for lineno, (subject, hadm, text, seq) in iter_table(
                path, ["subject_id", "hadm_id", "text"], optional=["note_seq"]):
            yield (normalize_id(subject), normalize_id(hadm)), text, (_seq(seq), lineno)

    parts = _note_rows(rows(), wanted, stats)
    return {k: "\n".join(dict.fromkeys(p[-1] for p in sorted(v))) for k, v in parts.items()}


def join(notes: Mapping[Key, str], codes: Mapping[Key, list[str]]) -> tuple[list[Admission], int]:
    """Inner join of notes and codes: (admissions, number of coded admissions with no note)."""
    kept = [Admission(k[0], k[1], notes[k], codes[k]) for k in codes if k in notes]
    return kept, len(codes) - len(kept)


def load_mimic3(raw_dir: str | os.PathLike, stats: Stats) -> list[Admission]:
    """MIMIC-III v1.4 tables in ``raw_dir`` -> joined admissions (ICD-9)."""
    dx = read_codes(find_table(raw_dir, "DIAGNOSES_ICD.csv"), "dx", stats).get(9, {})
    proc = read_codes(find_table(raw_dir, "PROCEDURES_ICD.csv"), "proc", stats).get(9, {})
    codes = merge_codes(dx, proc)
    notes = read_mimic3_notes(find_table(raw_dir, "NOTEEVENTS.csv"), set(codes), stats)
    admissions, no_note = join(notes, codes)
    stats.counts["admissions_without_note"] += no_note
    return admissions


def load_mimic4(raw_dir: str | os.PathLike, stats: Stats,
                note_dir: str | os.PathLike | None = None) -> dict[int, list[Admission]]:
    """MIMIC-IV ``hosp/`` and MIMIC-IV-Note ``note/`` tables -> ``{9: [...], 10: [...]}``.

    ``note_dir`` (default ``raw_dir``) holds ``note/discharge.csv.gz`` when MIMIC-IV-Note was
    downloaded to its own folder. An admission coded in both versions appears in both datasets.
    """
    dx = read_codes(find_table(raw_dir, "hosp/diagnoses_icd.csv", "diagnoses_icd.csv"), "dx",
                    stats, versioned=True)
    proc = read_codes(find_table(raw_dir, "hosp/procedures_icd.csv", "procedures_icd.csv"),
                      "proc", stats, versioned=True)
    codes = {v: merge_codes(dx.get(v, {}), proc.get(v, {})) for v in (9, 10)}
    note_path = find_table(note_dir or raw_dir, "note/discharge.csv", "discharge.csv")
    notes = read_mimic4_notes(note_path, set(codes[9]) | set(codes[10]), stats)
    out = {}
    for v in (9, 10):
        out[v], no_note = join(notes, codes[v])
        stats.counts[f"icd{v}_admissions_without_note"] += no_note
    return out


# ---------------------------------------------------------------------------- dataset building


def _id_key(s: str) -> tuple:
    return (0, int(s), s) if s.isdigit() else (1, 0, s)


def filter_rare(admissions: Sequence[Admission], min_count: int, stats: Stats) -> list[Admission]:
    """Drop codes on fewer than ``min_count`` admissions (whole dataset, before splitting),
    then admissions left with no code."""
    freq = Counter(c for a in admissions for c in a.codes)
    keep = {c for c, n in freq.items() if n >= min_count}
    stats.counts["unique_codes_before_filter"] += len(freq)
    stats.counts["rare_codes_removed"] += len(freq) - len(keep)
    out = []
    for a in admissions:
        kept = [c for c in a.codes if c in keep]
        if kept:
            out.append(Admission(a.subject_id, a.hadm_id, a.note, kept))
        else:
            stats.counts["admissions_with_only_rare_codes"] += 1
    return out


def top_codes(records: Sequence[Record], k: int) -> list[str]:
    """The ``k`` most frequent codes of the training records (ties broken by code string)."""
    freq = Counter(c for r in records if r.split == "train" for c in r.codes)
    return [c for c, _ in sorted(freq.items(), key=lambda kv: (-kv[1], kv[0]))[:k]]


def restrict(records: Sequence[Record], labels: Sequence[str]) -> list[Record]:
    """Keep only ``labels`` in every record; records left with no label are dropped."""
    keep = set(labels)
    out = []
    for r in records:
        codes = tuple(c for c in r.codes if c in keep)
        if codes:
            out.append(Record(r.id, r.subject_id, r.split, r.note, codes, r.code_system))
    return out


def describe_split(records: Sequence[Record]) -> dict:
    """Summary numbers of a set of records: docs, unique codes, mean labels per doc."""
    n = len(records)
    return {"docs": n, "unique_codes": len({c for r in records for c in r.codes}),
            "labels_per_doc": round(sum(len(r.codes) for r in records) / n, 4) if n else 0.0}


def assign_splits(admissions: Sequence[Admission], *, seed: int,
                  split_file: str | os.PathLike | None, stats: Stats) -> dict[str, str]:
    """``{admission_id: split}`` from a split file (absent admissions are dropped and counted)
    or from patient-level iterative stratification."""
    if split_file is None:
        return patient_split(((a.subject_id, a.hadm_id, a.codes) for a in admissions), seed=seed)
    given = read_split_file(split_file)
    mapping = {a.hadm_id: given[a.hadm_id] for a in admissions if a.hadm_id in given}
    stats.counts["admissions_not_in_split_file"] += len(admissions) - len(mapping)
    subject_splits: dict[str, set[str]] = defaultdict(set)
    for a in admissions:
        if a.hadm_id in mapping:
            subject_splits[a.subject_id].add(mapping[a.hadm_id])
    stats.counts["subjects_in_two_splits"] += sum(len(v) > 1 for v in subject_splits.values())
    return mapping


def build_dataset(admissions: Sequence[Admission], out_dir: str | os.PathLike, name: str, *,
                  corpus: str, code_system: str, seed: int = DEFAULT_SEED, min_count: int = 10,
                  split_file: str | os.PathLike | None = None, top_k: int | None = 50,
                  stats: Stats | None = None) -> dict:
    """Filter, split and write one dataset under ``out_dir/name``; returns its summary."""
    stats = stats or Stats()
    out_dir = Path(out_dir)
    seen: dict[str, str] = {}
    for a in admissions:
        if seen.setdefault(a.hadm_id, a.subject_id) != a.subject_id:
            raise DataError(f"{name}: admission id {a.hadm_id} belongs to two subjects "
                            f"({seen[a.hadm_id]}, {a.subject_id}); admission ids must be unique")
    admissions = sorted(filter_rare(admissions, min_count, stats),
                        key=lambda a: (_id_key(a.subject_id), _id_key(a.hadm_id)))
    mapping = assign_splits(admissions, seed=seed, split_file=split_file, stats=stats)
    full = [Record(a.hadm_id, a.subject_id, mapping[a.hadm_id], a.note, tuple(a.codes),
                   code_system) for a in admissions if a.hadm_id in mapping]
    ds_dir = out_dir / name
    _check_nonempty(name, full, len(admissions), stats)
    write_split_file({r.id: r.split for r in full}, ds_dir / "split.csv")
    variants = {"full": full}
    labels: list[str] = []
    if top_k:
        labels = top_codes(full, top_k)
        variants[f"top{top_k}"] = restrict(full, labels)
    entries, summary_variants = {}, {}
    for variant, recs in variants.items():
        summary_variants[variant] = {}
        for split in SPLITS:
            part = [r for r in recs if r.split == split]
            write_records(part, ds_dir / variant / f"{split}.jsonl")
            rel = f"{name}/{variant}/{split}.sharegpt.json"
            write_sharegpt(part, out_dir / rel)
            entries[f"{name}_{variant}_{split}"] = sharegpt_dataset_info(rel)
            info = describe_split(part)
            if variant != "full":
                info["dropped_no_label"] = sum(r.split == split for r in full) - len(part)
            summary_variants[variant][split] = info
        summary_variants[variant]["all"] = describe_split(recs)
    update_dataset_info(out_dir / "dataset_info.json", entries)
    summary = {
        "dataset": name, "corpus": corpus, "code_system": code_system,
        "settings": {"seed": seed, "min_count": min_count, "top_k": top_k,
                     "split": "stratified" if split_file is None else
                     f"file:{Path(split_file).name}"},
        "counts": dict(sorted(stats.counts.items())),
        "invalid_code_examples": list(stats.invalid_examples),
        "variants": summary_variants,
        "top_codes": labels,
    }
    with atomic_file(ds_dir / "summary.json") as f:
        f.write(json.dumps(summary, indent=2) + "\n")
    return summary


def _check_nonempty(name: str, full: Sequence[Record], kept: int, stats: Stats) -> None:
    """Refuse (before anything is written) a dataset whose filtering left a split empty."""
    sizes = {split: sum(r.split == split for r in full) for split in SPLITS}
    if all(sizes.values()):
        return
    counts = ", ".join(f"{k}={v}" for k, v in sorted(stats.counts.items()) if v) or "none"
    split_sizes = ", ".join(f"{k}={v}" for k, v in sizes.items())
    raise DataError(f"{name}: filtering left an empty split ({split_sizes} records; "
                    f"{kept} admissions kept after --min-count; dropped: {counts}); "
                    "lower --min-count, check --split-file, or give more data")


def _split_file_for(split_file, name: str):
    if split_file is None or isinstance(split_file, (str, os.PathLike)):
        return split_file
    return split_file.get(name)


def prepare_mimic3(raw_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                   seed: int = DEFAULT_SEED, min_count: int = 10,
                   split_file: str | os.PathLike | Mapping[str, str | os.PathLike] | None = None,
                   top_k: int | None = 50) -> dict[str, dict]:
    """MIMIC-III (ICD-9) -> ``out_dir/mimic3``; returns ``{"mimic3": summary}``."""
    stats = Stats()
    admissions = load_mimic3(raw_dir, stats)
    return {"mimic3": build_dataset(admissions, out_dir, "mimic3", corpus="mimic3",
                                    code_system="icd9", seed=seed, min_count=min_count,
                                    split_file=_split_file_for(split_file, "mimic3"),
                                    top_k=top_k, stats=stats)}


def prepare_mimic4(raw_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                   seed: int = DEFAULT_SEED, min_count: int = 10,
                   split_file: str | os.PathLike | Mapping[str, str | os.PathLike] | None = None,
                   top_k: int | None = 50, note_dir: str | os.PathLike | None = None,
                   ) -> dict[str, dict]:
    """MIMIC-IV -> ``out_dir/mimic4_icd9`` and ``out_dir/mimic4_icd10``; returns both summaries.

    ``split_file``: one file for both datasets (admission ids are unique across them) or
    ``{"mimic4_icd9": f9, "mimic4_icd10": f10}``; a dataset with none gets a computed split.
    """
    stats = Stats()
    by_version = load_mimic4(raw_dir, stats, note_dir)
    out = {}
    for v in (9, 10):
        name = f"mimic4_icd{v}"
        ds_stats = Stats(Counter(stats.counts), list(stats.invalid_examples))
        out[name] = build_dataset(by_version[v], out_dir, name, corpus="mimic4",
                                  code_system=f"icd{v}", seed=seed, min_count=min_count,
                                  split_file=_split_file_for(split_file, name), top_k=top_k,
                                  stats=ds_stats)
    return out
