"""End-to-end tests of the raw-MIMIC pipeline on small MIMIC-III / MIMIC-IV shaped fixtures.

The fixtures are written here: a few hundred admissions with realistic columns, addenda,
non-discharge note categories, several admissions per patient, V/E codes, a code on exactly 9
admissions and one on exactly 10, empty code cells, an empty note, and admissions missing a
note or codes. Expected values come from how the fixture was built, not from running the code.
"""

from __future__ import annotations

import csv
import gzip
import json
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from minicd import DataError
from minicd.data.__main__ import main as cli_main
from minicd.data.mimic import prepare_mimic3, prepare_mimic4
from minicd.data.records import read_records
from minicd.data.splits import read_split_file

SPLITS = ("train", "val", "test")

# --------------------------------------------------------------------------------- fixtures

HEAD_DX9 = ["4019", "4280", "42731", "5849", "25000", "2724", "51881", "5990", "41401",
            "2449", "V5861", "E8497", "V4581", "E9342", "486", "0389", "2859", "4168"] + \
           [f"{700 + i}{i % 10}" for i in range(27)]                    # 45 raw ICD-9 dx
HEAD_PROC9 = ["3893", "966", "3961", "9604", "9671", "3995", "8856", "9904"]
TAIL_DX9 = [f"{300 + i}" for i in range(10)]                             # frequent-ish, not top
RARE9, KEPT10 = "V1582", "E8781"                                         # 9 and 10 admissions

NOTE_HEADER = ("ROW_ID", "SUBJECT_ID", "HADM_ID", "CHARTDATE", "CHARTTIME", "STORETIME",
               "CATEGORY", "DESCRIPTION", "CGID", "ISERROR", "TEXT")
CODE_HEADER = ("ROW_ID", "SUBJECT_ID", "HADM_ID", "SEQ_NUM", "ICD9_CODE")

SPECIAL_REPORT = "Report Line 1: BP 120/80, HR 72.\r\nPlan: Follow-up [**Name**]!"
SPECIAL_ADDENDUM = "ADDENDUM: Pt Called Back; no change."
SPECIAL_NOTE = ("report line 1: bp 120/80, hr 72.\nplan: follow-up [**name**]!\n"
                "addendum: pt called back; no change.")
SPECIAL_CODES = ("401.9", "428.0", "V58.61", "38.93", "96.6")


def write_csv(path: Path, header, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def regular_note(hadm: str) -> str:
    return (f"Admission Date: [**2150-1-1**]  Discharge Date: [**2150-1-9**]\n"
            f"History of Present Illness: 67 y/o M w/ CHF, HTN; s/p CABG (x3) - adm {hadm}.\n"
            "Discharge Medications:\n1. Aspirin 81 mg PO DAILY\n2. Lasix 20 mg PO BID\n")


def make_mimic3(root: Path, n_subjects: int = 150, seed: int = 0) -> dict:
    """Write NOTEEVENTS.csv.gz, DIAGNOSES_ICD.csv (plain) and PROCEDURES_ICD.csv.gz."""
    rng = random.Random(seed)
    notes, dx, proc = [], [], []
    admissions = []                                     # (subject, hadm) of regular admissions
    hadm = 100000
    for s in range(1, n_subjects + 1):
        for _ in range(rng.randint(1, 3)):
            hadm += 1
            admissions.append((str(s), str(hadm)))
    rare = set(rng.sample(range(len(admissions)), 19))
    rare_idx, kept_idx = sorted(rare)[:9], sorted(rare)[9:]
    truth = {"codes": {}, "subjects": {}, "tail_only": []}
    for i, (s, h) in enumerate(admissions):
        if i % 25 == 7:
            codes_dx = rng.sample(TAIL_DX9, 2)
            codes_px: list[str] = []
            truth["tail_only"].append(h)
        else:
            codes_dx = rng.sample(HEAD_DX9, rng.randint(3, 7))
            if rng.random() < 0.5:
                codes_dx.append(rng.choice(TAIL_DX9))
            codes_px = rng.sample(HEAD_PROC9, rng.randint(0, 2))
        if i in rare_idx:
            codes_dx.append(RARE9)
        if i in kept_idx:
            codes_dx.append(KEPT10)
        for seq, c in enumerate(codes_dx, 1):
            dx.append((len(dx) + 1, s, h, seq, c))
        for seq, c in enumerate(codes_px, 1):
            proc.append((len(proc) + 1, s, h, seq, c))
        truth["codes"][h] = codes_dx + codes_px
        truth["subjects"][h] = s
        notes.append((len(notes) + 1, s, h, "2150-01-09", "", "", "Discharge summary", "Report",
                      "", "", regular_note(h)))
        if i % 10 == 3:      # an addendum, and some non-discharge notes
            notes.append((len(notes) + 1, s, h, "2150-01-10", "", "", "Discharge summary",
                          "Addendum", "", "", f"Addendum for {h}: Labs Reviewed."))
            notes.append((len(notes) + 1, s, h, "2150-01-05", "2150-01-05 10:00:00", "",
                          "Radiology", "CHEST (PA & LAT)", "", "", "RADIOLOGY TEXT MUST NOT APPEAR"))
            notes.append((len(notes) + 1, s, h, "2150-01-05", "", "", "Nursing/other", "Report",
                          "17", "", "NURSING TEXT MUST NOT APPEAR"))
    # The hand-checked admission: addendum before its report in the file, codes out of order,
    # a duplicated diagnosis, CRLF inside the report.
    s, h = "9001", "190001"
    notes.append((len(notes) + 1, s, h, "2150-02-03", "", "", "Discharge summary", "Addendum",
                  "", "", SPECIAL_ADDENDUM))
    notes.append((len(notes) + 1, s, h, "2150-02-01", "", "", "Radiology", "CT HEAD", "", "",
                  "RADIOLOGY TEXT MUST NOT APPEAR"))
    notes.append((len(notes) + 1, s, h, "2150-02-02", "", "", "Discharge summary", "Report",
                  "", "", SPECIAL_REPORT))
    for seq, c in ((2, "4280"), (1, "4019"), (3, "4019"), (4, "V5861")):
        dx.append((len(dx) + 1, s, h, seq, c))
    for seq, c in ((2, "966"), (1, "3893"), (3, "3893")):
        proc.append((len(proc) + 1, s, h, seq, c))
    truth["subjects"][h] = s
    # Empty note (codes, no usable note), note without codes, note without HADM_ID,
    # empty code cells.
    notes.append((len(notes) + 1, "9002", "190002", "2150-03-01", "", "", "Discharge summary",
                  "Report", "", "", "   "))
    dx.append((len(dx) + 1, "9002", "190002", 1, "4019"))
    notes.append((len(notes) + 1, "9003", "190003", "2150-03-01", "", "", "Discharge summary",
                  "Report", "", "", "A note without codes."))
    notes.append((len(notes) + 1, "9004", "", "2150-03-01", "", "", "Discharge summary",
                  "Report", "", "", "A note without an admission."))
    dx.append((len(dx) + 1, "9001", "190001", "", ""))
    dx.append((len(dx) + 1, "1", admissions[0][1], "", ""))
    rng.shuffle(notes)          # file order must not matter except among equal keys
    write_csv(root / "NOTEEVENTS.csv.gz", NOTE_HEADER, notes)
    write_csv(root / "DIAGNOSES_ICD.csv", CODE_HEADER, dx)
    write_csv(root / "PROCEDURES_ICD.csv.gz", CODE_HEADER, proc)
    truth["n_other_category"] = sum(r[6] != "Discharge summary" for r in notes)
    truth["rare_hadm"] = [admissions[i][1] for i in rare_idx]
    truth["kept_hadm"] = [admissions[i][1] for i in kept_idx]
    truth["regular"] = admissions
    return truth


@pytest.fixture(scope="module")
def mimic3(tmp_path_factory):
    root = tmp_path_factory.mktemp("mimic3")
    truth = make_mimic3(root / "raw")
    summary = prepare_mimic3(root / "raw", root / "out", seed=3)
    return root, truth, summary["mimic3"]


def load_all(ds: Path, variant: str = "full") -> dict:
    return {s: read_records(ds / variant / f"{s}.jsonl") for s in SPLITS}


# ------------------------------------------------------------------------------ MIMIC-III


def test_mimic3_end_to_end_layout_and_counts(mimic3):
    root, truth, summary = mimic3
    ds = root / "out" / "mimic3"
    for variant in ("full", "top50"):
        for s in SPLITS:
            assert (ds / variant / f"{s}.jsonl").is_file()
            assert (ds / variant / f"{s}.sharegpt.json").is_file()
    assert (ds / "split.csv").is_file() and (ds / "summary.json").is_file()
    assert json.loads((ds / "summary.json").read_text()) == summary
    info = json.loads((root / "out" / "dataset_info.json").read_text())
    assert info["mimic3_top50_train"]["file_name"] == "mimic3/top50/train.sharegpt.json"
    assert info["mimic3_full_test"]["formatting"] == "sharegpt"

    full = load_all(ds)
    ids = [r.id for s in SPLITS for r in full[s]]
    assert len(ids) == len(set(ids))
    # Every regular admission + the special one survive; the empty-note and no-code ones don't.
    assert set(ids) == {h for _, h in truth["regular"]} | {"190001"}
    assert all(r.code_system == "icd9" and r.split == s for s in SPLITS for r in full[s])
    sk = summary["counts"]
    assert sk["empty_notes"] == 1
    assert sk["admissions_without_note"] == 1         # 190002: its only note was empty
    assert sk["admissions_without_codes"] == 1        # 190003
    assert sk["note_rows_no_admission"] == 1
    assert sk["code_rows_empty"] == 2
    assert sk["note_rows_other_category"] == truth["n_other_category"]
    assert summary["variants"]["full"]["all"]["docs"] == len(ids)
    assert summary["variants"]["full"]["train"]["docs"] == len(full["train"])
    n_labels = sum(len(r.codes) for s in SPLITS for r in full[s])
    assert summary["variants"]["full"]["all"]["labels_per_doc"] == pytest.approx(
        n_labels / len(ids), abs=1e-4)
    # split.csv lists exactly the Full admissions with their splits.
    assert read_split_file(ds / "split.csv") == {r.id: s for s in SPLITS for r in full[s]}


def test_mimic3_note_merge_lowercase_and_code_order(mimic3):
    root, truth, _ = mimic3
    full = load_all(root / "out" / "mimic3")
    recs = {r.id: r for s in SPLITS for r in full[s]}
    special = recs["190001"]
    assert special.note == SPECIAL_NOTE                 # report, then addendum; CRLF -> LF
    assert special.codes == SPECIAL_CODES               # dx by SEQ_NUM, then proc; deduped
    assert special.subject_id == "9001"
    some = [h for i, (_, h) in enumerate(truth["regular"]) if i % 10 == 3][0]
    assert recs[some].note == (regular_note(some).lower().strip() + "\n"
                               + f"addendum for {some}: labs reviewed.")
    for r in recs.values():
        assert "must not appear" not in r.note
        assert r.note == r.note.lower()


def test_mimic3_rare_codes_filtered_before_splitting(mimic3):
    root, truth, summary = mimic3
    full = load_all(root / "out" / "mimic3")
    recs = [r for s in SPLITS for r in full[s]]
    assert all("V15.82" not in r.codes for r in recs)               # 9 admissions: removed
    with_kept = {r.id for r in recs if "E878.1" in r.codes}         # 10 admissions: kept
    assert with_kept == set(truth["kept_hadm"])
    # Raw codes dotted: V (after 3), E (after 4), procedures (after 2).
    dotted = {c for r in recs for c in r.codes}
    assert {"V45.81", "E849.7", "E934.2", "486", "038.9", "39.61", "96.04"} <= dotted
    # Independent recount: every kept code is on >= 10 admissions of the joined data.
    counts = Counter(c for r in recs for c in r.codes)
    assert min(counts.values()) >= 10


def test_mimic3_patient_level_split(mimic3):
    root, _, _ = mimic3
    full = load_all(root / "out" / "mimic3")
    subject_splits: dict[str, set] = {}
    for s in SPLITS:
        for r in full[s]:
            subject_splits.setdefault(r.subject_id, set()).add(s)
    assert all(len(v) == 1 for v in subject_splits.values())
    assert any(len(full[s]) > 0 for s in SPLITS)
    n = sum(len(full[s]) for s in SPLITS)
    assert abs(len(full["test"]) / n - 0.15) < 0.04      # a few hundred admissions only
    assert abs(len(full["val"]) / n - 0.10) < 0.04


def test_mimic3_top50_is_training_top50(mimic3):
    root, truth, summary = mimic3
    ds = root / "out" / "mimic3"
    full, top = load_all(ds), load_all(ds, "top50")
    freq = Counter(c for r in full["train"] for c in r.codes)
    assert len(freq) > 50
    expected = {c for c, _ in sorted(freq.items(), key=lambda kv: (-kv[1], kv[0]))[:50]}
    assert set(summary["top_codes"]) == expected
    dropped = 0
    for s in SPLITS:
        top_by_id = {r.id: r for r in top[s]}
        for r in full[s]:
            kept = tuple(c for c in r.codes if c in expected)
            if kept:
                assert top_by_id[r.id].codes == kept and top_by_id[r.id].note == r.note
            else:
                assert r.id not in top_by_id
                dropped += 1
        assert summary["variants"]["top50"][s]["dropped_no_label"] == len(full[s]) - len(top[s])
    assert dropped >= 1      # the tail-only admissions
    assert {c for s in SPLITS for r in top[s] for c in r.codes} <= expected


def test_mimic3_deterministic_for_a_seed(tmp_path, mimic3):
    root, _, _ = mimic3
    prepare_mimic3(root / "raw", tmp_path / "a", seed=3)
    first = root / "out"
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert len(files) == 2 * 3 * 2 + 3                      # jsonl+sharegpt, split, summary, info
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (first / rel).read_bytes(), rel
    prepare_mimic3(root / "raw", tmp_path / "b", seed=4)
    assert (tmp_path / "b/mimic3/split.csv").read_bytes() != (first / "mimic3/split.csv").read_bytes()


def test_supplied_split_file_is_honoured(tmp_path, mimic3):
    root, truth, _ = mimic3
    names = {0: "train", 1: "valid", 2: "TEST"}
    expected = {}
    rows = []
    for i, (s, h) in enumerate(truth["regular"] + [("9001", "190001")]):
        if i < 5:
            continue                                         # absent -> dropped and counted
        rows.append((h, names[int(s) % 3]))
        expected[h] = {"train": "train", "valid": "val", "TEST": "test"}[names[int(s) % 3]]
    write_csv(tmp_path / "edin_split.csv", ("_id", "split"), rows)
    summary = prepare_mimic3(root / "raw", tmp_path / "out", split_file=tmp_path / "edin_split.csv")
    full = load_all(tmp_path / "out" / "mimic3")
    got = {r.id: s for s in SPLITS for r in full[s]}
    assert got == expected
    assert summary["mimic3"]["counts"]["admissions_not_in_split_file"] == 5
    assert summary["mimic3"]["settings"]["split"] == "file:edin_split.csv"


# ------------------------------------------------------------------------------- MIMIC-IV

HEAD_CM = ["I10", "E119", "N179", "Z7901", "J189", "I2510", "E785", "K219", "F329", "N390"] + \
          [f"{'ABCDEFGHJKLMNPQRSTVWXYZ'[i % 23]}{10 + i}{i % 10}" for i in range(30)]
HEAD_PCS = ["02HV33Z", "0DTJ4ZZ", "5A1955Z", "0BH17EZ", "3E0436Z", "B2111ZZ", "4A023N7", "30233N1"]
DX4_HEADER = ("subject_id", "hadm_id", "seq_num", "icd_code", "icd_version")
PX4_HEADER = ("subject_id", "hadm_id", "seq_num", "chartdate", "icd_code", "icd_version")
DS_HEADER = ("note_id", "subject_id", "hadm_id", "note_type", "note_seq", "charttime",
             "storetime", "text")


def make_mimic4(root: Path, n_subjects: int = 140, seed: int = 1) -> dict:
    rng = random.Random(seed)
    dx, px, notes = [], [], []
    truth = {"icd9": set(), "icd10": set(), "subjects": {}}
    hadm = 20000000
    for s in range(10000001, 10000001 + n_subjects):
        for _ in range(rng.randint(1, 3)):
            hadm += 1
            h = str(hadm)
            v = 10 if rng.random() < 0.6 else 9
            truth[f"icd{v}"].add(h)
            truth["subjects"][h] = str(s)
            d_pool, p_pool = (HEAD_CM, HEAD_PCS) if v == 10 else (HEAD_DX9, HEAD_PROC9)
            for seq, c in enumerate(rng.sample(d_pool, rng.randint(3, 6)), 1):
                dx.append((s, h, seq, c, v))
            for seq, c in enumerate(rng.sample(p_pool, rng.randint(0, 2)), 1):
                px.append((s, h, seq, "2180-01-02", c, v))
            notes.append((f"{s}-DS-{len(notes)}", s, h, "DS", 1, "2180-01-09 00:00:00", "",
                          regular_note(h)))
    # Hand-checked: ICD-10 codes out of order; two notes (seq 2 first in the file); the same
    # admission also carries one ICD-9 code (so it is in both datasets).
    s, h = "19999999", "29999999"
    for seq, c, v in ((2, "I10", 10), (1, "E119", 10), (1, "4019", 9)):
        dx.append((s, h, seq, c, v))
    px.append((s, h, 1, "2180-01-02", "02HV33Z", 10))
    px.append((s, h, 2, "2180-01-02", "", 10))                       # empty code cell
    notes.append((f"{s}-DS-2", s, h, "DS", 2, "", "", "Second Part: Stable."))
    notes.append((f"{s}-DS-1", s, h, "DS", 1, "", "", "First Part: Admitted w/ DKA."))
    write_csv(root / "hosp" / "diagnoses_icd.csv.gz", DX4_HEADER, dx)
    write_csv(root / "hosp" / "procedures_icd.csv.gz", PX4_HEADER, px)
    write_csv(root / "note" / "discharge.csv.gz", DS_HEADER, notes)
    return truth


ICD10_OK = re.compile(r"[A-Z]\d[0-9A-Z](\.[0-9A-Z]{1,4})?|[0-9A-HJ-NP-Z]{7}")
ICD9_OK = re.compile(r"\d{3}(\.\d{1,2})?|V\d{2}(\.\d{1,2})?|E\d{3}(\.\d)?|\d{2}\.\d{1,2}")


def test_mimic4_end_to_end_split_by_version(tmp_path):
    truth = make_mimic4(tmp_path / "raw")
    summaries = prepare_mimic4(tmp_path / "raw", tmp_path / "out", seed=0, min_count=1)
    assert set(summaries) == {"mimic4_icd9", "mimic4_icd10"}
    r10 = {r.id: r for s in SPLITS for r in load_all(tmp_path / "out" / "mimic4_icd10")[s]}
    r9 = {r.id: r for s in SPLITS for r in load_all(tmp_path / "out" / "mimic4_icd9")[s]}
    assert set(r10) == truth["icd10"] | {"29999999"}
    assert set(r9) == truth["icd9"] | {"29999999"}
    assert all(ICD10_OK.fullmatch(c) for r in r10.values() for c in r.codes)
    assert all(ICD9_OK.fullmatch(c) for r in r9.values() for c in r.codes)
    assert all(r.code_system == "icd10" for r in r10.values())
    special = r10["29999999"]
    assert special.codes == ("E11.9", "I10", "02HV33Z")
    assert special.note == "first part: admitted w/ dka.\nsecond part: stable."
    assert r9["29999999"].codes == ("401.9",)
    assert summaries["mimic4_icd10"]["counts"]["code_rows_empty"] == 1
    for recs in (r9, r10):
        by_subject: dict[str, set] = {}
        for r in recs.values():
            by_subject.setdefault(r.subject_id, set()).add(r.split)
        assert all(len(v) == 1 for v in by_subject.values())
    assert (tmp_path / "out" / "mimic4_icd10" / "top50" / "train.jsonl").is_file()


def test_mimic4_plain_csv_and_separate_note_dir(tmp_path):
    make_mimic4(tmp_path / "gz")
    # Re-write as plain CSV in two folders (MIMIC-IV and MIMIC-IV-Note downloads).
    for rel, dest in (("hosp/diagnoses_icd.csv.gz", "hosp_dl/hosp/diagnoses_icd.csv"),
                      ("hosp/procedures_icd.csv.gz", "hosp_dl/hosp/procedures_icd.csv"),
                      ("note/discharge.csv.gz", "note_dl/note/discharge.csv")):
        (tmp_path / dest).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / dest).write_bytes(gzip.decompress((tmp_path / "gz" / rel).read_bytes()))
    a = prepare_mimic4(tmp_path / "gz", tmp_path / "a", top_k=None)
    b = prepare_mimic4(tmp_path / "hosp_dl", tmp_path / "b", note_dir=tmp_path / "note_dl",
                       top_k=None)
    assert a == b
    assert not (tmp_path / "a" / "mimic4_icd10" / "top50").exists()


# ------------------------------------------------------------------------------ bad input


def test_missing_column_names_file_and_column(tmp_path):
    make_mimic3(tmp_path, n_subjects=20)
    rows = list(csv.reader(open(tmp_path / "DIAGNOSES_ICD.csv", newline="")))
    write_csv(tmp_path / "DIAGNOSES_ICD.csv", [c if c != "ICD9_CODE" else "CODE" for c in rows[0]],
              rows[1:])
    with pytest.raises(DataError) as e:
        prepare_mimic3(tmp_path, tmp_path / "out")
    msg = str(e.value)
    assert "DIAGNOSES_ICD.csv" in msg and "ICD9_CODE" in msg and "found" in msg


def test_unreadable_and_missing_files(tmp_path):
    make_mimic3(tmp_path, n_subjects=20)
    (tmp_path / "NOTEEVENTS.csv.gz").write_bytes(b"this is not gzip data at all")
    with pytest.raises(DataError, match=r"NOTEEVENTS\.csv\.gz"):
        prepare_mimic3(tmp_path, tmp_path / "out")
    (tmp_path / "NOTEEVENTS.csv.gz").unlink()
    with pytest.raises(DataError, match=r"NOTEEVENTS\.csv"):
        prepare_mimic3(tmp_path, tmp_path / "out")


def test_invalid_codes_are_skipped_and_counted(tmp_path):
    make_mimic3(tmp_path, n_subjects=20)
    with open(tmp_path / "DIAGNOSES_ICD.csv", "a", newline="") as f:
        csv.writer(f).writerow((99999, "9001", "190001", 9, "XYZ1"))
    summary = prepare_mimic3(tmp_path, tmp_path / "out", min_count=1)["mimic3"]
    assert summary["counts"]["code_rows_invalid"] == 1
    assert len(summary["invalid_code_examples"]) == 1
    assert summary["invalid_code_examples"][0].startswith("DIAGNOSES_ICD.csv:")
    assert "XYZ1" in summary["invalid_code_examples"][0]


def test_short_row_names_file_and_line(tmp_path):
    make_mimic3(tmp_path, n_subjects=20)
    with open(tmp_path / "PROCEDURES_ICD.csv.gz", "wb") as f:
        f.write(gzip.compress(b"ROW_ID,SUBJECT_ID,HADM_ID,SEQ_NUM,ICD9_CODE\n1,2,3\n"))
    with pytest.raises(DataError, match=r"PROCEDURES_ICD\.csv\.gz:2"):
        prepare_mimic3(tmp_path, tmp_path / "out")


def test_cli_prints_table_and_one_line_errors(tmp_path, capsys):
    make_mimic3(tmp_path / "raw", n_subjects=60)
    assert cli_main(["prepare", "--source", "mimic3", "--raw-dir", str(tmp_path / "raw"),
                     "--out", str(tmp_path / "out"), "--min-count", "2", "--top-k", "5"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"mimic3\s+full\s+train\s+\d+", out)
    assert re.search(r"mimic3\s+top5\s+test\s+\d+", out)
    summary = json.loads((tmp_path / "out/mimic3/summary.json").read_text())
    assert summary["settings"] == {"seed": 10, "min_count": 2, "top_k": 5, "split": "stratified"}
    assert len(summary["top_codes"]) == 5
    # A user error: one line on stderr, exit status 2, no traceback (run as a real process).
    proc = subprocess.run([sys.executable, "-m", "minicd.data", "prepare", "--source", "mimic4",
                           "--raw-dir", str(tmp_path / "raw"), "--out", str(tmp_path / "o2")],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1],
                          env={"MINICD_NO_PROGRESS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
    assert "diagnoses_icd" in proc.stderr
