"""evaluate.py and minicd.evaluation / minicd.predictions: every number derived by hand below.

The tiny corpus (ICD-9, 4 test documents, 5 codes):

    gold  d1: 401.9, 428.0, 38.93          training frequencies (train.jsonl, 600 docs):
          d2: 401.9, 250.00                  401.9  600   (bucket >500)
          d3: 428.0, 96.6, 38.93             428.0  100   (bucket 51-500)
          d4: 250.00, 401.9                  250.00  30   (bucket 11-50)
                                             38.93    5   (bucket 1-10)
                                             96.6     0   (in no bucket)

    predictions (sample_index 0; d4 has none -> empty prediction, no span):
          d1: "<think>maybe 250.00</think><code>401.9, 428.0, 401.9, 599.0</code>"
              -> think block ignored, duplicate 401.9 dropped, 599.0 off-label (not a gold code)
              -> {401.9, 428.0}; its informational "codes" field wrongly says ["250.00"]
          d2: "The codes are 401.9 and 250.00."       -> no span -> {}
          d3: "<code>428.0, banana, 96.6, 38.93, 250.00, 999.99</code>"
              -> "banana" malformed, 999.99 well-formed but off-label (and not in the CMS tables)
              -> {428.0, 96.6, 38.93, 250.00}
          plus a d1 row with sample_index 1 ("<code>38.93</code>") that is not scored.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from minicd.errors import ConfigError, DataError
from minicd.evaluation import (load_gold, main_table, parse_buckets, parse_run_spec,
                               render_text, resolve_gold, score_predictions)
from minicd.parse import parse_codes
from minicd.predictions import (prediction_row, read_predictions, validate_prediction,
                                write_predictions)

ROOT = Path(__file__).resolve().parents[1]
SECRET = "patient zebrafish secret note"  # must never reach any output

GOLD = {"d1": ["401.9", "428.0", "38.93"], "d2": ["401.9", "250.00"],
        "d3": ["428.0", "96.6", "38.93"], "d4": ["250.00", "401.9"]}
TOP50 = {"d1": ["401.9", "428.0"], "d2": ["401.9"], "d3": ["428.0"], "d4": ["401.9"]}
PREDS = [
    {"id": "d1", "response": "<think>maybe 250.00</think><code>401.9, 428.0, 401.9, 599.0</code>",
     "codes": ["250.00"], "has_span": True, "malformed": [], "off_label": [], "sample_index": 0},
    {"id": "d2", "response": "The codes are 401.9 and 250.00."},
    {"id": "d3", "response": "<code>428.0, banana, 96.6, 38.93, 250.00, 999.99</code>"},
    {"id": "d1", "response": "<code>38.93</code>", "sample_index": 1},
]


def _record(id_, codes, split):
    return {"id": id_, "subject_id": f"s{id_}", "split": split, "note": f"{SECRET} {id_}",
            "codes": codes, "code_system": "icd9"}


def _write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _train_rows():
    rows = []
    for i in range(600):  # 401.9 in all 600; 428.0 in 100; 250.00 in 30; 38.93 in 5
        codes = ["401.9"] + ["428.0"] * (i < 100) + ["250.00"] * (i < 30) + ["38.93"] * (i < 5)
        rows.append(_record(f"t{i}", codes, "train"))
    return rows


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaldata")
    _write_jsonl(root / "ds" / "full" / "test.jsonl",
                 [_record(k, v, "test") for k, v in GOLD.items()])
    _write_jsonl(root / "ds" / "full" / "train.jsonl", _train_rows())
    _write_jsonl(root / "ds" / "top50" / "test.jsonl",
                 [_record(k, v, "test") for k, v in TOP50.items()])
    preds = _write_jsonl(root / "preds.jsonl", PREDS)
    return root, preds


def _run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=120)


def _csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


# ------------------------------------------------------------------------- hand numbers


def test_full_metrics_by_hand(data):
    root, preds = data
    gold = load_gold(root / "ds" / "full" / "test.jsonl", "full")
    res = score_predictions(read_predictions(preds), gold)
    m = res["metrics"]
    # Pairs: d1 tp 401.9 428.0, fn 38.93 | d2 fn 401.9 250.00 | d3 tp 428.0 96.6 38.93, fp 250.00
    # | d4 fn 250.00 401.9.  TP = 5, FP = 1, FN = 5.
    assert (m["tp"], m["fp"], m["fn"]) == (5, 1, 5)
    assert m["micro_precision"] == pytest.approx(5 / 6)        # 83.3
    assert m["micro_recall"] == pytest.approx(5 / 10)          # 50.0
    assert m["micro_f1"] == pytest.approx(10 / 16)             # 2TP/(2TP+FP+FN) = 62.5
    # Per class (P, R, F1 = tp/(tp + (fp+fn)/2)):
    #   401.9 : tp1 fp0 fn2 -> 1, 1/3, 1/2     428.0: tp2 -> 1, 1, 1
    #   38.93 : tp1 fn1     -> 1, 1/2, 2/3     250.00: tp0 fp1 fn2 -> 0, 0, 0
    #   96.6  : tp1         -> 1, 1, 1
    assert m["macro_precision"] == pytest.approx(4 / 5)                       # 80.0
    assert m["macro_recall"] == pytest.approx((1 / 3 + 1 + 1 / 2 + 0 + 1) / 5)  # 56.7
    assert m["macro_f1"] == pytest.approx((1 / 2 + 1 + 2 / 3 + 0 + 1) / 5)      # 63.3
    assert (res["n_docs"], res["n_scored"], res["n_missing"], res["n_other_samples"]) == (4, 3, 1, 1)
    header, rows = main_table([{"method": "SFT", "backbone": "Qwen3-4B", "setting": "full",
                                **res}], ["full"])
    assert rows == [["SFT", "Qwen3-4B", "50.0", "83.3", "62.5", "56.7", "80.0", "63.3"]]


def test_train_label_space_by_hand(data):
    root, preds = data
    gold = load_gold(root / "ds" / "full" / "test.jsonl", "full", label_space="train")
    assert gold.label_space == ("250.00", "38.93", "401.9", "428.0")  # 96.6 never in training
    m = score_predictions(read_predictions(preds), gold)["metrics"]
    # 96.6 leaves the label space: its d3 gold occurrence is ignored, its prediction off-label.
    # TP: d1 401.9 428.0, d3 428.0 38.93 = 4; FP: d3 250.00 = 1; FN: d1 38.93, d2 x2, d4 x2 = 5
    assert (m["tp"], m["fp"], m["fn"], m["n_gold_ignored"]) == (4, 1, 5, 1)
    assert m["micro_recall"] == pytest.approx(4 / 9)
    assert m["micro_f1"] == pytest.approx(8 / 14)


def test_label_space_file(data, tmp_path):
    root, preds = data
    labels = tmp_path / "labels.txt"
    labels.write_text("401.9\n# comment\n\n428.0.\n", encoding="utf-8")  # trailing dot normalized
    gold = load_gold(root / "ds" / "full" / "test.jsonl", "full", label_space=str(labels))
    assert gold.label_space == ("401.9", "428.0")
    m = score_predictions(read_predictions(preds), gold)["metrics"]
    # TP d1 401.9 428.0, d3 428.0 = 3; FN d2 401.9, d4 401.9 = 2; FP 0
    assert (m["tp"], m["fp"], m["fn"]) == (3, 0, 2)
    with pytest.raises(ConfigError, match="missing.txt"):
        load_gold(root / "ds" / "full" / "test.jsonl", "full", label_space=str(tmp_path / "missing.txt"))


def test_rescored_from_response_not_codes_field(data):
    root, _ = data
    gold = load_gold(root / "ds" / "full" / "test.jsonl", "full")
    # The codes field claims a perfect d2 prediction, but the response has no span.
    rows = [{"id": "d2", "response": "nothing here", "codes": ["401.9", "250.00"],
             "has_span": True}]
    m = score_predictions(rows, gold)["metrics"]
    assert m["tp"] == 0 and m["fp"] == 0
    rows = [{"id": "d2", "response": "<code>401.9</code>", "codes": []}]
    m = score_predictions(rows, gold)["metrics"]
    assert (m["tp"], m["fp"]) == (1, 0)


def test_rare_code_and_format_views_by_hand(data):
    root, preds = data
    gold = load_gold(root / "ds" / "full" / "test.jsonl", "full")  # train.jsonl found beside it
    assert gold.train_freq == {"401.9": 600, "428.0": 100, "250.00": 30, "38.93": 5}
    res = score_predictions(read_predictions(preds), gold)
    got = {b["bucket"]: (b["n_gold"], b["tp"], b["recall"]) for b in res["buckets"]}
    # 38.93 gold in d1, d3, hit in d3 | 250.00 gold d2, d4, never hit | 428.0 gold d1, d3, both
    # hit | 401.9 gold d1, d2, d4, hit in d1 | 96.6 (frequency 0) in no bucket.
    assert got == {"1-10": (2, 1, 0.5), "11-50": (2, 0, 0.0), "51-500": (2, 2, 1.0),
                   ">500": (3, 1, pytest.approx(1 / 3))}
    f = res["format"]
    # 4 responses (d4 missing counts as no span): no span d2, d4; malformed d3.
    # Predicted well-formed codes: d1 401.9 428.0 599.0; d3 428.0 96.6 38.93 250.00 999.99 = 8;
    # off-label 599.0, 999.99; outside the CMS tables 999.99.
    assert (f["n_responses"], f["n_no_span"], f["n_malformed_responses"]) == (4, 2, 1)
    assert (f["n_predicted"], f["n_off_label"], f["n_not_in_taxonomy"]) == (8, 2, 1)
    assert (f["no_span_rate"], f["malformed_rate"]) == (0.5, 0.25)
    assert (f["off_label_rate"], f["not_in_taxonomy_rate"]) == (0.25, 0.125)


# ------------------------------------------------------------------------- predictions file


def test_predictions_roundtrip_append_and_validation(tmp_path):
    path = tmp_path / "p.jsonl"
    parsed = parse_codes("<code>401.9, bad</code>", {"401.9"})
    row = prediction_row("d1", "<code>401.9, bad</code>", parsed)
    assert row == {"id": "d1", "response": "<code>401.9, bad</code>", "codes": ["401.9"],
                   "has_span": True, "malformed": ["bad"],
                   "off_label": [], "sample_index": 0}
    assert write_predictions([row], path) == 1
    assert write_predictions([prediction_row("d1", "x", parse_codes("x"), 1)], path,
                             append=True) == 1
    back = read_predictions(path)
    assert [r["sample_index"] for r in back] == [0, 1] and back[0] == row
    with pytest.raises(DataError, match=r"\(row 1\): key 'sample_index'"):
        write_predictions([row, {**row, "sample_index": -1}], path)
    assert len(read_predictions(path)) == 2  # the failed write left the file as it was
    assert validate_prediction({"id": "a", "response": ""}, "w")["sample_index"] == 0


@pytest.mark.parametrize("line,key", [
    ('{"id": "d2"}', "key 'response'"),
    ('{"id": "d2", "response": 3}', "key 'response'"),
    ('{"id": "d2", "response": "", "codes": "401.9"}', "key 'codes'"),
    ('{"id": "d2", "response": "", "sample_index": true}', "key 'sample_index'"),
    ('{"id": "d1", "response": ""}', "key 'id'"),  # duplicate of line 1
    ('{"id": "d2", "response": ', "malformed JSON"),
])
def test_predictions_errors_name_file_line_and_key(tmp_path, line, key):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "d1", "response": "r"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError) as exc:
        read_predictions(path)
    assert f"{path}:2" in str(exc.value) and key in str(exc.value)


def test_unknown_ids_error_or_counted(data):
    root, _ = data
    gold = load_gold(root / "ds" / "full" / "test.jsonl", "full")
    rows = [{"id": "zz", "response": "<code>401.9</code>"}]
    with pytest.raises(DataError, match="'zz' is not in the gold set"):
        score_predictions(rows, gold)
    res = score_predictions(rows, gold, unknown="warn")
    assert (res["n_unknown"], res["n_missing"], res["metrics"]["tp"]) == (1, 4, 0)


def test_limit_scores_the_first_n_records_by_hand(data):
    """--limit N: only the split's first N records (file order, as rollout.py --limit N) are
    gold; predictions for later records are skipped and counted, unknown ids still fail."""
    root, preds = data
    gold = load_gold(root / "ds" / "full" / "test.jsonl", "full", limit=2)
    assert gold.ids == ("d1", "d2") and gold.beyond_limit == {"d3", "d4"}
    assert gold.label_space == ("250.00", "38.93", "401.9", "428.0")  # codes of d1 and d2 only
    res = score_predictions(read_predictions(preds), gold)
    m = res["metrics"]
    # d1: tp 401.9 428.0, fn 38.93 (599.0 is off the label space) | d2: no span, fn 401.9 250.00
    assert (m["tp"], m["fp"], m["fn"]) == (2, 0, 3)
    assert m["micro_f1"] == pytest.approx(4 / 7)
    assert (res["n_docs"], res["n_scored"], res["n_missing"], res["n_beyond_limit"]) == (2, 2, 0, 1)
    with pytest.raises(DataError, match="'zz' is not in the gold set"):
        score_predictions([{"id": "zz", "response": "<code>401.9</code>"}], gold)
    with pytest.raises(ConfigError, match="--limit 0"):
        load_gold(root / "ds" / "full" / "test.jsonl", "full", limit=0)


def test_specs_and_gold_resolution(data):
    root, _ = data
    s = parse_run_spec("PHI (Ours):Qwen2.5-1.5B@Top50=a=b.jsonl", "dflt")
    assert (s.method, s.backbone, s.setting, s.path) == ("PHI (Ours)", "Qwen2.5-1.5B", "top50",
                                                         Path("a=b.jsonl"))
    assert parse_run_spec("SFT=x.jsonl", "dflt").backbone == "dflt"
    for bad in ("SFT", "=x.jsonl", "SFT@top=x.jsonl"):
        with pytest.raises(ConfigError):
            parse_run_spec(bad)
    assert set(resolve_gold(root / "ds")) == {"full", "top50"}
    assert resolve_gold(root / "ds" / "top50") == {"top50": root / "ds" / "top50" / "test.jsonl"}
    assert parse_buckets("1-10,11-50,>50") == ((1, 10), (11, 50), (51, None))
    with pytest.raises(DataError):
        resolve_gold(root / "nowhere")


# ------------------------------------------------------------------------- table layout


def test_text_table_has_paper_header_lines():
    rows = [["SFT", "Qwen3-4B"] + ["12.3"] * 12]
    lines = render_text(rows, ["top50", "full"]).splitlines()
    assert lines[0].split() == ["Method", "Backbone", "Top-50", "Full"]
    assert lines[1].split() == ["Micro", "Macro", "Micro", "Macro"]
    assert lines[2].split() == ["Recall", "Precision", "F1"] * 4
    assert lines[3].split() == ["SFT", "Qwen3-4B"] + ["12.3"] * 12
    # group titles start above their first column: "Full" over the 7th metric column
    starts = [m.start() for m in re.finditer(r"\S+", lines[2])]
    assert lines[0].index("Full") == starts[6] and lines[0].index("Top-50") == starts[0]
    assert [m.start() for m in re.finditer(r"\S+", lines[1])] == [starts[0], starts[3],
                                                                  starts[6], starts[9]]


# ------------------------------------------------------------------------- CLI


def test_cli_top50_and_full_side_by_side(data, tmp_path):
    root, preds = data
    out = tmp_path / "out"
    r = _run_cli("--gold-top50", root / "ds" / "top50", "--gold-full", root / "ds" / "full",
                 "--run", f"SFT@top50={preds}", "--run", f"SFT@full={preds}",
                 "--run", f"GRPO:Qwen2.5-1.5B@full={preds}", "--backbone", "Qwen3-4B",
                 "--train", root / "ds" / "full" / "train.jsonl", "--out", out)
    assert r.returncode == 0, r.stderr
    table = _csv(out / "table.csv")
    metrics = [f"{lvl} {m}" for lvl in ("Micro", "Macro") for m in ("Recall", "Precision", "F1")]
    assert table[0] == (["Method", "Backbone"] + [f"Top-50 {c}" for c in metrics]
                        + [f"Full {c}" for c in metrics])
    # Top-50 by hand: labels {401.9, 428.0}; TP d1 x2 + d3 428.0 = 3, FP 0, FN d2, d4 401.9 = 2
    # -> micro R 60.0 P 100.0 F1 6/8 = 75.0; per class 401.9 (1, 1/3, 1/2), 428.0 (1, 1, 1)
    # -> macro R 66.7 P 100.0 F1 75.0.  Full: as in test_full_metrics_by_hand.
    assert table[1] == ["SFT", "Qwen3-4B", "60.0", "100.0", "75.0", "66.7", "100.0", "75.0",
                        "50.0", "83.3", "62.5", "56.7", "80.0", "63.3"]
    assert table[2] == ["GRPO", "Qwen2.5-1.5B"] + ["-"] * 6 + ["50.0", "83.3", "62.5", "56.7",
                                                                "80.0", "63.3"]
    assert len(table) == 3
    md = (out / "table.md").read_text().splitlines()
    assert md[0].startswith("| Method | Backbone | Top-50 Micro Recall |") and len(md) == 4
    rare = _csv(out / "rare_codes.csv")
    assert rare[0] == ["Method", "Backbone", "Setting", "Recall 1-10", "Recall 11-50",
                       "Recall 51-500", "Recall >500"]
    # Top-50 gold codes: 428.0 (51-500) 2/2, 401.9 (>500) 1/3; Full as in the rare-code test.
    assert rare[1] == ["SFT", "Qwen3-4B", "Top-50", "-", "-", "100.0", "33.3"]
    assert rare[2] == ["SFT", "Qwen3-4B", "Full", "50.0", "0.0", "100.0", "33.3"]
    fmt = _csv(out / "format.csv")
    assert fmt[0] == ["Method", "Backbone", "Setting", "Missing", "No span", "Malformed",
                      "Off-label", "Not in taxonomy"]
    # Top-50: predicted d1 401.9 428.0 599.0, d3 428.0 + 96.6 38.93 250.00 999.99 off-label
    # -> 8 codes, 5 off-label (62.5), 999.99 outside CMS (12.5)
    assert fmt[1] == ["SFT", "Qwen3-4B", "Top-50", "1", "50.0", "25.0", "62.5", "12.5"]
    assert fmt[3] == ["GRPO", "Qwen2.5-1.5B", "Full", "1", "50.0", "25.0", "25.0", "12.5"]
    res = json.loads((out / "results.json").read_text())
    assert [(x["method"], x["setting"], x["n_missing"]) for x in res["runs"]] == [
        ("SFT", "top50", 1), ("SFT", "full", 1), ("GRPO", "full", 1)]
    assert res["runs"][1]["metrics"]["tp"] == 5 and res["settings"]["top50"]["n_labels"] == 2
    assert "no prediction (scored as empty, no span)" in r.stdout
    assert r.stdout.index("Top-50") < r.stdout.index("Full")
    everything = r.stdout + r.stderr + "".join(p.read_text() for p in out.iterdir())
    assert SECRET not in everything and "banana" not in everything


@pytest.mark.parametrize("make_args,needle", [
    (lambda root, preds, tmp: ["--gold", root / "ds" / "full" / "test.jsonl",
                               "--run", f"SFT={_write_jsonl(tmp / 'b.jsonl', [{'id': 'd1'}])}"],
     "b.jsonl:1: key 'response'"),
    (lambda root, preds, tmp: ["--gold", root / "ds", "--run", f"SFT={preds}"],
     "tag the run"),
    (lambda root, preds, tmp: ["--gold", tmp / "none", "--run", f"SFT={preds}"], "none"),
    (lambda root, preds, tmp: ["--gold", root / "ds" / "top50", "--run",
                               f"SFT={_write_jsonl(tmp / 'u.jsonl', [{'id': 'q9', 'response': ''}])}"],
     "'q9' is not in the gold set"),
])
def test_cli_bad_input_exits_2_with_one_line(data, tmp_path, make_args, needle):
    root, preds = data
    r = _run_cli(*make_args(root, preds, tmp_path))
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
    assert needle in r.stderr


def test_plots_skipped_without_matplotlib(data, tmp_path, monkeypatch, capsys):
    root, preds = data
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    spec = importlib.util.spec_from_file_location("evaluate_cli", ROOT / "evaluate.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    metrics = _write_jsonl(tmp_path / "m.jsonl", [{"step": 1, "loss": 2.0}])
    rc = cli.main(["--gold", str(root / "ds" / "full"), "--run", f"SFT={preds}",
                   "--out", str(tmp_path / "o"), "--plots", "--metrics", f"sft={metrics}"])
    out = capsys.readouterr().out
    assert rc == 0
    skipped = [line for line in out.splitlines() if "plots skipped" in line]
    assert skipped == ["plots skipped: matplotlib is not installed (pip install matplotlib)"]
    assert not list((tmp_path / "o").glob("*.png"))
    assert (tmp_path / "o" / "results.json").exists()
