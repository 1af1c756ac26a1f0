"""Command line: ``python -m minicd.data prepare --source mimic3|mimic4 --raw-dir DIR --out DIR``.

Builds the Full and Top-k datasets from the raw MIMIC tables (see ``minicd.data.mimic``),
showing a progress bar per file and a summary table at the end. User errors (missing file or
column, bad split file) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from minicd.errors import ConfigError, MinicdError


def _split_files(items: list[str] | None):
    """``--split-file F`` (all datasets) or ``--split-file NAME=F`` (one dataset)."""
    if not items:
        return None
    if len(items) == 1 and "=" not in items[0]:
        return items[0]
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--split-file {item!r}: give one file, or NAME=FILE per dataset "
                              "(e.g. mimic4_icd10=split10.csv)")
        out[name] = path
    return out


def format_summary(summaries: dict[str, dict]) -> str:
    """Plain-text table: dataset, variant, split, docs, unique codes, labels per doc."""
    head = f"{'dataset':<14} {'variant':<7} {'split':<5} {'docs':>8} {'codes':>7} {'labels/doc':>10}"
    lines = [head, "-" * len(head)]
    for name, summary in summaries.items():
        for variant, splits in summary["variants"].items():
            for split, s in splits.items():
                lines.append(f"{name:<14} {variant:<7} {split:<5} {s['docs']:>8} "
                             f"{s['unique_codes']:>7} {s['labels_per_doc']:>10.2f}")
        counts = ", ".join(f"{k}={v}" for k, v in summary["counts"].items() if v)
        lines.append(f"{name:<14} counts: {counts or 'none'}")
        if summary.get("invalid_code_examples"):
            lines.append(f"{name:<14} invalid codes, e.g.: "
                         + "; ".join(summary["invalid_code_examples"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from minicd.data.mimic import DEFAULT_SEED, prepare_mimic3, prepare_mimic4

    ap = argparse.ArgumentParser(prog="python -m minicd.data", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="raw MIMIC tables -> Full/Top-k JSONL + ShareGPT datasets")
    p.add_argument("--source", required=True, choices=["mimic3", "mimic4"])
    p.add_argument("--raw-dir", required=True, type=Path,
                   help="MIMIC-III folder (NOTEEVENTS, DIAGNOSES_ICD, PROCEDURES_ICD) or MIMIC-IV "
                        "folder (hosp/, and note/ unless --note-dir)")
    p.add_argument("--note-dir", type=Path, default=None,
                   help="MIMIC-IV-Note folder holding note/discharge.csv.gz (default: --raw-dir)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--min-count", type=int, default=10,
                   help="drop codes on fewer admissions than this (whole dataset, before splits)")
    p.add_argument("--split-file", action="append", default=None,
                   help="CSV with columns id,split to use instead of computing splits; "
                        "repeat as NAME=FILE for one dataset (mimic4_icd9=..., mimic4_icd10=...)")
    p.add_argument("--top-k", type=int, default=50, help="Top-k variant size (0: Full only)")
    args = ap.parse_args(argv)
    try:
        if args.min_count < 1 or args.top_k < 0:
            raise ConfigError("--min-count must be >= 1 and --top-k >= 0")
        kwargs = dict(seed=args.seed, min_count=args.min_count,
                      split_file=_split_files(args.split_file), top_k=args.top_k or None)
        if args.source == "mimic3":
            summaries = prepare_mimic3(args.raw_dir, args.out, **kwargs)
        else:
            summaries = prepare_mimic4(args.raw_dir, args.out, note_dir=args.note_dir, **kwargs)
    except MinicdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(summaries))
    print(f"wrote {', '.join(str(args.out / n) for n in summaries)} "
          f"(+ {args.out / 'dataset_info.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
