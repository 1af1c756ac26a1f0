"""Evaluation: score predictions files against gold records and build the paper's tables.

One *run* is one method/backbone's predictions file scored on one label *setting* ("top50",
"full", any "topK"). Scoring re-parses every response with :func:`minicd.parse.parse_codes`
(the single parser; a row's ``codes`` field is ignored) inside the setting's label space, then
computes corpus micro/macro P/R/F1 (paper Sec. 5.1, Appendix G), recall by training-frequency
bucket (rare-code view) and output-format rates (format view).

Protocol choices:
- Label space: codes present in the gold test set by default (Edin et al. 2023); ``"train"``
  = codes of the training split; or a file with one code per line. Predicted codes outside it
  are off-label and ignored, for micro too.
- A gold record with no prediction (for the scored ``sample_index``) counts as an empty
  prediction without a span; the number is reported (``n_missing``).
- A prediction whose id is not in the gold set is an error (``unknown="error"``), or with
  ``unknown="warn"`` it is skipped and counted (``n_unknown``).
- Training frequencies (for the rare-code view and the ``"train"`` label space) come from the
  train file given, else from ``train.jsonl`` next to the gold ``test.jsonl`` when present.

Nothing here prints or stores note or response text: only ids, counts and rates.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from minicd.algo.reward import code_frequencies
from minicd.codes import normalize
from minicd.data.records import read_records
from minicd.errors import ConfigError, DataError
from minicd.metrics import corpus_metrics, format_rates, recall_by_frequency
from minicd.parse import ParsedCodes, parse_codes
from minicd.predictions import read_predictions

__all__ = ["DEFAULT_BUCKETS", "GoldSet", "RunSpec", "bucket_label", "bucket_table",
           "format_table", "load_gold", "main_table", "parse_buckets", "parse_run_spec",
           "render_csv", "render_markdown", "render_plain", "render_text", "resolve_gold",
           "score_predictions", "score_run_file", "setting_title", "sort_settings", "write_plots"]

DEFAULT_BUCKETS: tuple[tuple[int, int | None], ...] = ((1, 10), (11, 50), (51, 500), (501, None))
_SETTING = re.compile(r"^(full|top\d+)$")
# (results key, level title, metric title), in the paper's column order.
METRIC_COLUMNS = (("micro_recall", "Micro", "Recall"), ("micro_precision", "Micro", "Precision"),
                  ("micro_f1", "Micro", "F1"), ("macro_recall", "Macro", "Recall"),
                  ("macro_precision", "Macro", "Precision"), ("macro_f1", "Macro", "F1"))


def setting_title(setting: str) -> str:
    """"top50" -> "Top-50", "full" -> "Full" (other names unchanged)."""
    m = re.fullmatch(r"top(\d+)", setting)
    return f"Top-{m.group(1)}" if m else ("Full" if setting == "full" else setting)


def _setting_key(setting: str) -> tuple[int, int, str]:
    m = re.fullmatch(r"top(\d+)", setting)  # Top-K settings first (by K), then Full, as in the paper
    return (0, int(m.group(1)), "") if m else (1 if setting == "full" else 2, 0, setting)


def sort_settings(settings) -> list[str]:
    return sorted(set(settings), key=_setting_key)


def resolve_gold(path: str | Path, setting: str | None = None) -> dict[str, Path]:
    """Setting -> test.jsonl for a gold path: a test.jsonl file, a variant folder holding
    test.jsonl, or a dataset folder with variant subfolders (``full/``, ``top50/``). The setting
    of a file or variant folder is ``setting`` if given, else the folder's name when it is
    ``full``/``topK``, else "full"."""
    path = Path(path)
    if setting is not None and not _SETTING.match(setting):
        raise ConfigError(f"gold setting {setting!r}: use 'full' or 'topK' (e.g. top50)")
    if path.is_file():
        return {setting or _infer_setting(path.parent): path}
    if path.is_dir():
        if (path / "test.jsonl").is_file():
            return {setting or _infer_setting(path): path / "test.jsonl"}
        found = {d.name: d / "test.jsonl" for d in sorted(path.iterdir())
                 if d.is_dir() and _SETTING.match(d.name) and (d / "test.jsonl").is_file()}
        if setting is not None and setting in found:
            return {setting: found[setting]}
        if found and setting is None:
            return found
    raise DataError(f"gold {path}: expected a test.jsonl file, a variant folder containing "
                    "test.jsonl, or a dataset folder with full/ or topK/ subfolders (as written "
                    "by `python -m minicd.data prepare`)")


def _infer_setting(folder: Path) -> str:
    return folder.name.lower() if _SETTING.match(folder.name.lower()) else "full"


@dataclass(frozen=True)
class GoldSet:
    """The gold side of one setting (no note text is kept)."""

    setting: str
    test_path: Path
    ids: tuple[str, ...]
    golds: tuple[tuple[str, ...], ...]
    system: str | None
    label_space: tuple[str, ...]
    label_source: str  # "gold" | "train" | the label file's path
    train_path: Path | None = None
    train_freq: dict[str, int] | None = None
    beyond_limit: frozenset[str] = frozenset()  # ids of the split past ``limit`` (not scored)


def load_gold(test_path: str | Path, setting: str = "full", *, train_path: str | Path | None = None,
              label_space: str = "gold", limit: int | None = None) -> GoldSet:
    """Read a gold test split (and training frequencies); build its label space.

    ``limit``: keep only the first ``limit`` records of the split, in file order (the records
    ``rollout.py --limit`` decodes); predictions for the later ones are skipped and counted
    (``n_beyond_limit``), and the ``gold`` label space is built from the kept records."""
    test_path = Path(test_path)
    records = read_records(test_path)
    if not records:
        raise DataError(f"{test_path}: no records; point --gold at a non-empty test split")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit {limit}: expected a count >= 1 of test records to score")
    beyond = frozenset(r.id for r in records[limit:]) if limit is not None else frozenset()
    records = records[:limit] if limit is not None else records
    systems = {r.code_system for r in records}
    if len(systems) > 1:
        raise DataError(f"{test_path}: key 'code_system': mixes {sorted(systems)}; score each "
                        "code system separately")
    if train_path is None and (test_path.parent / "train.jsonl").is_file():
        train_path = test_path.parent / "train.jsonl"
    train_freq = None
    if train_path is not None:
        train_path = Path(train_path)
        train_freq = code_frequencies(r.codes for r in read_records(train_path))
    golds = tuple(r.codes for r in records)
    if label_space == "gold":
        labels = sorted({c for g in golds for c in g})
    elif label_space == "train":
        if train_freq is None:
            raise ConfigError("--label-space train needs training codes: pass --train "
                              "TRAIN_JSONL or put train.jsonl next to the gold test.jsonl")
        labels = sorted(train_freq)
    else:
        labels = _read_label_file(Path(label_space))
    return GoldSet(setting, test_path, tuple(r.id for r in records), golds, systems.pop(),
                   tuple(labels), label_space if label_space in ("gold", "train")
                   else str(label_space), train_path, train_freq, beyond)


def _read_label_file(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"--label-space {path}: cannot read ({exc.strerror or exc}); use "
                          "'gold', 'train' or a file with one code per line") from exc
    labels = sorted({normalize(s) for s in lines if s.strip() and not s.lstrip().startswith("#")})
    if not labels:
        raise DataError(f"{path}: no codes; write one dotted code per line")
    return labels


def score_predictions(rows: Sequence[dict], gold: GoldSet, *, sample_index: int = 0,
                      unknown: str = "error", buckets=DEFAULT_BUCKETS,
                      source: str = "predictions") -> dict[str, Any]:
    """Score validated predictions rows (``minicd.predictions.read_predictions``) on ``gold``.

    Returns ``metrics`` (``corpus_metrics``: fractions and counts), ``format``
    (``format_rates``, missing records counted as responses without a span), ``buckets``
    (``recall_by_frequency`` with bucket labels like ">500"; None without training
    frequencies), and counts ``n_docs n_scored n_missing n_unknown n_other_samples
    n_beyond_limit`` (rows for records past ``load_gold``'s ``limit``, skipped)."""
    if unknown not in ("error", "warn"):
        raise ValueError(f"unknown must be 'error' or 'warn', got {unknown!r}")
    position = {id_: i for i, id_ in enumerate(gold.ids)}
    labels = frozenset(gold.label_space)
    parsed: list[ParsedCodes | None] = [None] * len(gold.ids)
    n_unknown = n_other = n_beyond = 0
    for row in rows:
        if row.get("sample_index", 0) != sample_index:
            n_other += 1
            continue
        i = position.get(row["id"])
        if i is None and row["id"] in gold.beyond_limit:
            n_beyond += 1
            continue
        if i is None:
            if unknown == "error":
                raise DataError(f"{source}: key 'id': {row['id']!r} is not in the gold set "
                                f"{gold.test_path}; score it against the matching test split "
                                "(or pass --unknown-ids warn to skip such rows)")
            n_unknown += 1
            continue
        if parsed[i] is not None:
            raise DataError(f"{source}: key 'id': {row['id']!r} appears twice with sample_index "
                            f"{sample_index}; keep one row per record")
        parsed[i] = parse_codes(row["response"], labels, system=gold.system)
    n_missing = sum(p is None for p in parsed)
    preds = [p if p is not None else ParsedCodes() for p in parsed]
    out: dict[str, Any] = {
        "metrics": corpus_metrics(preds, gold.golds, gold.label_space),
        "format": format_rates(preds, gold.system),
        "buckets": None,
        "n_docs": len(gold.ids), "n_scored": len(gold.ids) - n_missing, "n_missing": n_missing,
        "n_unknown": n_unknown, "n_other_samples": n_other, "n_beyond_limit": n_beyond,
    }
    if gold.train_freq is not None:
        out["buckets"] = recall_by_frequency(preds, gold.golds, gold.train_freq, buckets)
        for b in out["buckets"]:
            b["bucket"] = bucket_label(b["lo"], b["hi"])
    return out


def bucket_label(lo: int, hi: int | None) -> str:
    """"1-10", or ">500" for an open bucket starting at 501."""
    return f">{lo - 1}" if hi is None else f"{lo}-{hi}"


def parse_buckets(text: str) -> tuple[tuple[int, int | None], ...]:
    """"1-10,11-50,51-500,>500" (or "501+") -> ((1, 10), (11, 50), (51, 500), (501, None))."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        m = (re.fullmatch(r"(\d+)-(\d+)", part) or re.fullmatch(r">(\d+)", part)
             or re.fullmatch(r"(\d+)\+", part))
        if m is None:
            raise ConfigError(f"--buckets: cannot read {part!r}; write e.g. 1-10,11-50,51-500,>500")
        if part.startswith(">"):
            out.append((int(m.group(1)) + 1, None))
        elif part.endswith("+"):
            out.append((int(m.group(1)), None))
        elif int(m.group(1)) > int(m.group(2)):
            raise ConfigError(f"--buckets: {part!r} has lower bound above upper bound")
        else:
            out.append((int(m.group(1)), int(m.group(2))))
    return tuple(out)


@dataclass(frozen=True)
class RunSpec:
    """One ``--run METHOD[:BACKBONE][@SETTING]=PREDICTIONS.jsonl``."""

    method: str
    backbone: str
    setting: str | None
    path: Path


def parse_run_spec(spec: str, default_backbone: str = "") -> RunSpec:
    """Parse ``METHOD[:BACKBONE][@SETTING]=PATH`` (setting: full / topK)."""
    name, sep, path = spec.partition("=")
    method, _, setting = name.partition("@")
    method, _, backbone = method.partition(":")
    if not sep or not method.strip() or not path:
        raise ConfigError(f"--run {spec!r}: write METHOD[:BACKBONE][@SETTING]=PREDICTIONS.jsonl, "
                          "e.g. SFT:Qwen3-4B@top50=runs/sft/top50.jsonl")
    setting = setting.strip().lower() or None
    if setting is not None and not _SETTING.match(setting):
        raise ConfigError(f"--run {spec!r}: setting {setting!r} must be 'full' or 'topK' "
                          "(e.g. @top50)")
    return RunSpec(method.strip(), backbone.strip() or default_backbone, setting, Path(path))


def score_run_file(spec: RunSpec, gold: GoldSet, **kwargs) -> dict[str, Any]:
    """Read ``spec.path`` and score it on ``gold``; the result names the run."""
    rows = read_predictions(spec.path)
    if not rows:
        raise DataError(f"{spec.path}: no predictions (the file is empty); write it with "
                        "rollout.py, or check the --run path")
    result = score_predictions(rows, gold, source=str(spec.path), **kwargs)
    group = method_group(spec.method, has_scores=any("scores" in r for r in rows))
    return {"method": spec.method, "backbone": spec.backbone, "setting": gold.setting,
            "group": group, "predictions": str(spec.path), **result}


# The paper's row groups (Tables 1-2), in table order.
GROUPS = ("PLM Baselines", "LLM (Prompting)", "LLM (Post-training)")
_DISCRIMINATIVE = {"cnn", "gru", "bi-gru", "bigru", "caml", "multirescnn", "laat", "plm-icd",
                   "plmicd"}
_PROMPTING = re.compile(r"zero[-_ ]?shot|few[-_ ]?shot|cot|prompt", re.IGNORECASE)


def method_group(method: str, has_scores: bool = False) -> str:
    """The paper's group of a run: "PLM Baselines" for a discriminative coder (its predictions
    carry per-code ``scores``, as ``train.py --stage classifier`` writes them, or its method is
    one of CNN, GRU, CAML, MultiResCNN, LAAT, PLM-ICD), "LLM (Prompting)" for zero-/few-shot and
    CoT prompting, else "LLM (Post-training)"."""
    if has_scores or method.strip().lower() in _DISCRIMINATIVE:
        return GROUPS[0]
    if _PROMPTING.search(method):
        return GROUPS[1]
    return GROUPS[2]


def _row_groups(results: Sequence[dict]) -> dict[tuple[str, str], str]:
    """(method, backbone) -> group, in first-seen order, then stably sorted by group."""
    out: dict[tuple[str, str], str] = {}
    for r in results:
        key = (r["method"], r["backbone"])
        group = r.get("group") or method_group(r["method"])
        if key not in out or GROUPS.index(group) < GROUPS.index(out[key]):
            out[key] = group
    return dict(sorted(out.items(), key=lambda kv: GROUPS.index(kv[1])))


def main_table_groups(results: Sequence[dict]) -> list[str]:
    """The group of each row of :func:`main_table` (same order)."""
    return list(_row_groups(results).values())


# ---------------------------------------------------------------------------------- tables


def _pct(x: float) -> str:
    return f"{100.0 * x:.1f}"


def main_table(results: Sequence[dict], settings: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """The paper's Tables 1-2 layout: one row per (method, backbone), grouped as the paper
    (:data:`GROUPS`: PLM Baselines, then prompting, then post-training; first-seen order within a
    group; :func:`main_table_groups` gives each row's group); columns Method, Backbone, then per setting (Top-K before Full) Micro Recall / Precision /
    F1 and Macro Recall / Precision / F1 in percent with one decimal ("-" when not run)."""
    header = ["Method", "Backbone"] + [f"{setting_title(s)} {lvl} {name}" for s in settings
                                       for _, lvl, name in METRIC_COLUMNS]
    by_row: dict[tuple[str, str], dict[str, dict]] = {key: {} for key in _row_groups(results)}
    for r in results:
        by_row[(r["method"], r["backbone"])][r["setting"]] = r["metrics"]
    rows = []
    for (method, backbone), cells in by_row.items():
        row = [method, backbone]
        for s in settings:
            m = cells.get(s)
            row += [_pct(m[key]) if m else "-" for key, _, _ in METRIC_COLUMNS]
        rows.append(row)
    return header, rows


def bucket_table(results: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    """Rare-code view: recall (percent, pooled over gold occurrences) per training-frequency
    bucket, one row per run that has training frequencies."""
    scored = [r for r in results if r["buckets"] is not None]
    labels = list(dict.fromkeys(b["bucket"] for r in scored for b in r["buckets"]))
    header = ["Method", "Backbone", "Setting"] + [f"Recall {lab}" for lab in labels]
    rows = []
    for r in scored:
        rec = {b["bucket"]: b for b in r["buckets"]}
        rows.append([r["method"], r["backbone"], setting_title(r["setting"])]
                    + [_pct(rec[lab]["recall"]) if rec.get(lab, {}).get("n_gold") else "-"
                       for lab in labels])
    return header, rows


def format_table(results: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    """Format view: missing records (count) and no-span / malformed rates (per response),
    off-label / not-in-taxonomy rates (per predicted code), in percent."""
    header = ["Method", "Backbone", "Setting", "Missing", "No span", "Malformed", "Off-label",
              "Not in taxonomy"]
    rows = [[r["method"], r["backbone"], setting_title(r["setting"]), str(r["n_missing"]),
             _pct(r["format"]["no_span_rate"]), _pct(r["format"]["malformed_rate"]),
             _pct(r["format"]["off_label_rate"]), _pct(r["format"]["not_in_taxonomy_rate"])]
            for r in results]
    return header, rows


def render_markdown(header: Sequence[str], rows: Sequence[Sequence[str]],
                    groups: Sequence[str] | None = None) -> str:
    """A GitHub markdown table; text columns left-aligned, the rest right-aligned. ``groups``
    (one per row, e.g. :func:`main_table_groups`): when the rows span several groups, a bold
    title row opens each group, as in the paper."""
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
    align = ["---" if h in ("Method", "Backbone", "Setting") else "---:" for h in header]
    body = [line(r) for r in rows]
    if groups is not None and len(set(groups)) > 1:
        body = []
        for k, r in enumerate(rows):
            if k == 0 or groups[k] != groups[k - 1]:
                body.append(line([f"**{groups[k]}**"] + [""] * (len(header) - 1)))
            body.append(line(r))
    return "\n".join([line(header), line(align), *body]) + "\n"


def render_csv(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def render_plain(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Any table as aligned plain text (first column left-aligned up to the text columns)."""
    widths = [max([len(h)] + [len(r[j]) for r in rows]) for j, h in enumerate(header)]
    left = {j for j, h in enumerate(header) if h in ("Method", "Backbone", "Setting")}
    lines = ["  ".join(c.ljust(w) if j in left else c.rjust(w)
                       for j, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in [list(header), *rows]]
    return "\n".join(lines) + "\n"


def render_text(rows: Sequence[Sequence[str]], settings: Sequence[str],
                groups: Sequence[str] | None = None) -> str:
    """The main table as aligned plain text with the paper's three header lines
    (setting / Micro-Macro / Recall Precision F1); with ``groups`` (one per row) spanning
    several groups, each group opens with its title line (``-- PLM Baselines``)."""
    subs = [name for _ in settings for _, _, name in METRIC_COLUMNS]
    widths = [max([len(h)] + [len(r[j]) for r in rows])
              for j, h in enumerate(["Method", "Backbone"] + subs)]
    widths[0] = max(widths[0], 6)

    def spans(labels_per_col: list[str], step: int) -> str:
        cells = []
        for j in range(2, len(widths), step):
            width = sum(widths[j:j + step]) + 2 * (step - 1)
            cells.append(labels_per_col[(j - 2) // step].ljust(width))
        return "  ".join(cells)

    first = "Method".ljust(widths[0]) + "  " + "Backbone".ljust(widths[1]) + "  "
    blank = " " * len(first)
    lines = [first + spans([setting_title(s) for s in settings], 6),
             blank + spans(["Micro", "Macro"] * len(settings), 3),
             blank + "  ".join(h.rjust(w) for h, w in zip(subs, widths[2:]))]
    titled = groups is not None and len(set(groups)) > 1
    for k, r in enumerate(rows):
        if titled and (k == 0 or groups[k] != groups[k - 1]):
            lines.append(f"-- {groups[k]}")
        lines.append("  ".join([r[0].ljust(widths[0]), r[1].ljust(widths[1])]
                               + [c.rjust(w) for c, w in zip(r[2:], widths[2:])]))
    return "\n".join(line.rstrip() for line in lines) + "\n"


# ---------------------------------------------------------------------------------- plots


def write_plots(out_dir: Path, results: Sequence[dict],
                curves: dict[str, list[dict]]) -> list[str]:
    """Write ``bucket_recall.png`` (grouped bars: bucket x run) and ``training_curves.png``
    (one panel per logged key, one line per metrics file). Returns messages to print; when
    matplotlib is not installed, one message saying the plots were skipped."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ["plots skipped: matplotlib is not installed (pip install matplotlib)"]
    written = []
    scored = [r for r in results if r["buckets"] is not None]
    if scored:
        labels = [b["bucket"] for b in scored[0]["buckets"]]
        fig, ax = plt.subplots(figsize=(8, 4))
        width = 0.8 / len(scored)
        for k, r in enumerate(scored):
            ax.bar([i + k * width for i in range(len(labels))],
                   [100 * b["recall"] for b in r["buckets"]], width,
                   label=f"{r['method']} {r['backbone']} {setting_title(r['setting'])}".strip())
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))], labels)
        ax.set_xlabel("training frequency")
        ax.set_ylabel("recall (%)")
        ax.legend(fontsize="small")
        fig.savefig(out_dir / "bucket_recall.png", dpi=120, bbox_inches="tight")
        plt.close(fig)
        written.append(str(out_dir / "bucket_recall.png"))
    keys = [k for k in ("loss", "reward_mean", "val/micro_f1")
            if any(k in row for rows in curves.values() for row in rows)]
    if keys:
        fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
        for ax, key in zip(axes[0], keys):
            for name, rows in curves.items():
                pts = [(row["step"], row[key]) for row in rows
                       if "step" in row and isinstance(row.get(key), (int, float))]
                if pts:
                    ax.plot(*zip(*pts), label=name)
            ax.set_title(key)
            ax.set_xlabel("step")
            ax.legend(fontsize="small")
        fig.savefig(out_dir / "training_curves.png", dpi=120, bbox_inches="tight")
        plt.close(fig)
        written.append(str(out_dir / "training_curves.png"))
    return [f"wrote {p}" for p in written]
