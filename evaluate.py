"""Score predictions files and print the paper's results table (Tables 1-2 layout).

    python evaluate.py --gold data/mimic3 --run SFT:Qwen3-4B@top50=preds/sft_top50.jsonl \\
        --run SFT:Qwen3-4B@full=preds/sft_full.jsonl --out eval/

Gold (``--gold``, repeatable, ``[SETTING=]PATH``): a test.jsonl, a variant folder holding
test.jsonl (its name, ``top50``/``full``, is the setting; other names count as ``full``), or a
dataset folder with ``full/`` and ``topK/`` subfolders (every variant found is a setting).
``--gold-top50 P`` and ``--gold-full P`` are shorthands for ``--gold top50=P`` / ``full=P``.

Runs (``--run``, repeatable): ``METHOD[:BACKBONE][@SETTING]=PREDICTIONS.jsonl``. The backbone
defaults to ``--backbone``; the setting may be left out when there is a single gold setting.
Runs sharing METHOD and BACKBONE form one table row with Top-K and Full side by side. Rows are
grouped as in the paper: PLM Baselines (discriminative coders: predictions with per-code
``scores`` from ``train.py --stage classifier``, or methods named CNN, GRU, CAML, MultiResCNN,
LAAT, PLM-ICD), LLM (Prompting) (zero-/few-shot, CoT), LLM (Post-training) (the rest); the text
and markdown tables title each group when more than one is present.

Predictions are re-parsed from their ``response`` (single parser). Gold records with no
prediction count as empty predictions without a span (reported); predictions for ids not in the
gold set are an error unless ``--unknown-ids warn`` (then skipped and counted). Only rows with
``sample_index`` 0 are scored unless ``--sample-index`` says otherwise.

Outputs: the main table on stdout, then the rare-code view (recall by training-frequency bucket;
needs training codes: ``--train`` or train.jsonl next to the gold test.jsonl) and the format view.
With ``--out DIR``: table.md, table.csv, rare_codes.md/.csv, format.md/.csv, results.json (every
metric and count). ``--plots`` adds bucket_recall.png and training_curves.png (from ``--metrics
NAME=METRICS.jsonl``) when matplotlib is installed. User errors: one line, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from minicd.errors import ConfigError, DataError, MinicdError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.split("\n")[4:]))
    p.add_argument("--gold", action="append", default=[], metavar="[SETTING=]PATH",
                   help="test.jsonl, variant folder or dataset folder (repeatable)")
    p.add_argument("--gold-top50", metavar="PATH", help="same as --gold top50=PATH")
    p.add_argument("--gold-full", metavar="PATH", help="same as --gold full=PATH")
    p.add_argument("--run", action="append", default=[], required=True,
                   metavar="METHOD[:BACKBONE][@SETTING]=FILE", help="predictions JSONL (repeatable)")
    p.add_argument("--train", metavar="TRAIN_JSONL",
                   help="training split for code frequencies (default: train.jsonl beside test)")
    p.add_argument("--label-space", default="gold", metavar="gold|train|FILE",
                   help="codes scored: gold test codes (default, Edin et al.), training codes, "
                        "or a file with one code per line")
    p.add_argument("--backbone", default="", help="backbone name for runs that give none")
    p.add_argument("--limit", type=int, metavar="N",
                   help="score only the first N records of each gold split (the ones `rollout.py "
                        "--limit N` decodes); predictions for later records are skipped")
    p.add_argument("--sample-index", type=int, default=0, help="which sample to score (default 0)")
    p.add_argument("--unknown-ids", choices=("error", "warn"), default="error",
                   help="predictions for ids not in the gold set: error (default) or skip+count")
    p.add_argument("--buckets", default="1-10,11-50,51-500,>500",
                   help="training-frequency buckets of the rare-code view")
    p.add_argument("--out", type=Path, help="folder for table.md/csv, results.json and plots")
    p.add_argument("--plots", action="store_true", help="write PNG plots (needs matplotlib)")
    p.add_argument("--metrics", action="append", default=[], metavar="NAME=METRICS.jsonl",
                   help="training metrics JSONL for training_curves.png (repeatable)")
    return p.parse_args(argv)


def gold_paths(args: argparse.Namespace) -> dict[str, Path]:
    from minicd.evaluation import resolve_gold

    # "--gold top50=PATH" names the setting; any other "=" is part of the path.
    items = [tuple(g.split("=", 1)) if re.match(r"^(full|top\d+)=", g) else (None, g)
             for g in args.gold]
    items += [("top50", args.gold_top50)] if args.gold_top50 else []
    items += [("full", args.gold_full)] if args.gold_full else []
    if not items:
        raise ConfigError("no gold data: pass --gold PATH (or --gold-top50/--gold-full PATH)")
    out: dict[str, Path] = {}
    for setting, path in items:
        for s, test in resolve_gold(path, setting).items():
            if s in out:
                raise ConfigError(f"two gold test sets for setting {s!r} ({out[s]} and {test}); "
                                  "give each setting once")
            out[s] = test
    return out


def read_curves(items: list[str]) -> dict[str, list[dict]]:
    from minicd.log import read_metrics

    curves = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--metrics {item!r}: write NAME=METRICS.jsonl")
        try:
            curves[name] = read_metrics(path)
        except (OSError, ValueError) as exc:
            raise DataError(f"--metrics {path}: cannot read as metrics JSONL ({exc}); pass a "
                            "file written by train.py") from None
    return curves


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        from minicd import evaluation as ev
        from minicd.fileio import atomic_file

        if args.plots and args.out is None:
            raise ConfigError("--plots needs --out DIR to write the PNG files")
        buckets = ev.parse_buckets(args.buckets)
        tests = gold_paths(args)
        settings = ev.sort_settings(tests)
        golds = {s: ev.load_gold(tests[s], s, train_path=args.train, label_space=args.label_space,
                                 limit=args.limit)
                 for s in settings}
        specs, seen = [], set()
        for item in args.run:
            spec = ev.parse_run_spec(item, args.backbone)
            setting = spec.setting or (settings[0] if len(settings) == 1 else None)
            if setting is None:
                raise ConfigError(f"--run {item!r}: several gold settings ({', '.join(settings)});"
                                  " tag the run, e.g. NAME@top50=FILE")
            if setting not in golds:
                raise ConfigError(f"--run {item!r}: no gold test set for setting {setting!r} "
                                  f"(have {', '.join(settings)}); add --gold {setting}=PATH")
            key = (spec.method, spec.backbone, setting)
            if key in seen:
                raise ConfigError(f"--run {item!r}: {spec.method} {spec.backbone} @{setting} is "
                                  "given twice")
            seen.add(key)
            specs.append((spec, setting))
        curves = read_curves(args.metrics)
        results = [ev.score_run_file(spec, golds[s], sample_index=args.sample_index,
                                     unknown=args.unknown_ids, buckets=buckets)
                   for spec, s in specs]
        used = [s for s in settings if any(r["setting"] == s for r in results)]

        header, rows = ev.main_table(results, used)
        groups = ev.main_table_groups(results)
        b_header, b_rows = ev.bucket_table(results)
        f_header, f_rows = ev.format_table(results)
        print(f"Results (%, label space: {args.label_space}; micro / macro over the label space)")
        print(ev.render_text(rows, used, groups))
        if b_rows:
            print("Rare-code view: recall (%) by training frequency of the gold code")
            print(ev.render_plain(b_header, b_rows))
        else:
            print("Rare-code view skipped: no training codes (pass --train TRAIN_JSONL)\n")
        print("Format view: missing records; no-span and malformed per response (%); off-label "
              "and not-in-taxonomy per predicted code (%)")
        print(ev.render_plain(f_header, f_rows))
        for r in results:
            where = f"{r['method']} {r['backbone']} @{r['setting']}".replace("  ", " ")
            if r["n_missing"]:
                print(f"note: {where}: {r['n_missing']} of {r['n_docs']} gold records have no "
                      "prediction (scored as empty, no span)")
            if r.get("n_beyond_limit"):
                print(f"note: {where}: scored the first {r['n_docs']} gold records (--limit); "
                      f"skipped {r['n_beyond_limit']} predictions for later records")
            if r["n_unknown"]:
                print(f"warning: {where}: skipped {r['n_unknown']} predictions for ids not in "
                      "the gold set")

        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            files = {"table.md": ev.render_markdown(header, rows, groups),
                     "table.csv": ev.render_csv(header, rows),
                     "format.md": ev.render_markdown(f_header, f_rows),
                     "format.csv": ev.render_csv(f_header, f_rows)}
            if b_rows:
                files["rare_codes.md"] = ev.render_markdown(b_header, b_rows)
                files["rare_codes.csv"] = ev.render_csv(b_header, b_rows)
            files["results.json"] = json.dumps({
                "settings": {s: {"test": str(g.test_path), "n_docs": len(g.ids),
                                 "n_labels": len(g.label_space), "label_space": g.label_source,
                                 "system": g.system,
                                 "train": str(g.train_path) if g.train_path else None}
                             for s, g in golds.items()},
                "sample_index": args.sample_index,
                "runs": results,
            }, indent=2, default=str) + "\n"
            for name, text in files.items():
                with atomic_file(args.out / name) as f:
                    f.write(text)
            print(f"wrote {', '.join(sorted(files))} to {args.out}")
        if args.plots:
            for message in ev.write_plots(args.out, results, curves):
                print(message)
    except MinicdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
