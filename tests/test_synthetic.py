"""Tests of minicd.data.synthetic: raw MIMIC-shaped tables that the real preprocessing reads.

Expected column lists, dot rules and word counts are written out by hand here; code
descriptions are checked against minicd.codes.describe (an independent reader of the CMS
tables); the end-to-end tests run the real minicd.data.mimic pipeline on the output.
"""

from __future__ import annotations

import csv
import gzip
import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from minicd import ConfigError
from minicd.codes import describe
from minicd.data import synthetic as syn
from minicd.data.records import read_records

SPEC3 = syn.SyntheticSpec(n_admissions=800, seed=7)
SPEC4 = syn.SyntheticSpec(n_admissions=600, seed=7)
RAW_ICD9_DX = re.compile(r"^(\d{3,5}|V\d{2,4}|E\d{3,4})$")
RAW_ICD9_PROC = re.compile(r"^\d{2,4}$")
RAW_ICD10_CM = re.compile(r"^[A-Z]\d[0-9A-Z]{1,5}$")
RAW_ICD10_PCS = re.compile(r"^[0-9A-HJ-NP-Z]{7}$")


def read_gz(path: Path) -> tuple[list[str], list[list[str]]]:
    with gzip.open(path, "rt", encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def as_dicts(path: Path) -> list[dict[str, str]]:
    header, rows = read_gz(path)
    assert all(len(r) == len(header) for r in rows)
    return [dict(zip(header, r)) for r in rows]


def has_form(text: str, form: str) -> bool:
    return re.search(r"(?<![a-z0-9])" + re.escape(form) + r"(?![a-z0-9])", text.lower()) is not None


@pytest.fixture(scope="module")
def m3(tmp_path_factory):
    out = tmp_path_factory.mktemp("raw3")
    manifest = syn.write_mimic3(out, SPEC3)
    adms, vocabs = syn.generate(SPEC3, "mimic3")
    return out, manifest, adms, vocabs


@pytest.fixture(scope="module")
def m4(tmp_path_factory):
    out = tmp_path_factory.mktemp("raw4")
    manifest = syn.write_mimic4(out, SPEC4)
    adms, vocabs = syn.generate(SPEC4, "mimic4")
    return out, manifest, adms, vocabs


# ------------------------------------------------------------------------------ files, columns


def test_mimic3_files_and_columns(m3):
    out, manifest, adms, _ = m3
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == ["DIAGNOSES_ICD.csv.gz", "NOTEEVENTS.csv.gz", "PROCEDURES_ICD.csv.gz",
                     "synthetic_manifest.json"]
    header, notes = read_gz(out / "NOTEEVENTS.csv.gz")
    assert header == ["ROW_ID", "SUBJECT_ID", "HADM_ID", "CHARTDATE", "CHARTTIME", "STORETIME",
                      "CATEGORY", "DESCRIPTION", "CGID", "ISERROR", "TEXT"]
    assert all(len(r) == 11 for r in notes)
    for name in ("DIAGNOSES_ICD.csv.gz", "PROCEDURES_ICD.csv.gz"):
        header, rows = read_gz(out / name)
        assert header == ["ROW_ID", "SUBJECT_ID", "HADM_ID", "SEQ_NUM", "ICD9_CODE"]
        assert rows and all(len(r) == 5 for r in rows)
        assert [int(r[0]) for r in rows] == list(range(1, len(rows) + 1))
    # MIMIC-III dialect: strings quoted, numbers and NULLs bare
    raw = gzip.decompress((out / "DIAGNOSES_ICD.csv.gz").read_bytes()).decode()
    assert raw.startswith('"ROW_ID","SUBJECT_ID","HADM_ID","SEQ_NUM","ICD9_CODE"\n1,')
    assert re.match(r'^1,\d+,\d+,1,"[0-9VE]\d+"$', raw.splitlines()[1])
    assert manifest["n_admissions"] == len(adms) == 800
    assert manifest["n_note_rows"] == len(notes)
    assert json.loads((out / "synthetic_manifest.json").read_text()) == manifest


def test_mimic4_files_columns_and_versions(m4):
    out, manifest, adms, _ = m4
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == ["hosp/diagnoses_icd.csv.gz", "hosp/procedures_icd.csv.gz",
                     "note/discharge.csv.gz", "synthetic_manifest.json"]
    header, notes = read_gz(out / "note/discharge.csv.gz")
    assert header == ["note_id", "subject_id", "hadm_id", "note_type", "note_seq", "charttime",
                      "storetime", "text"]
    assert {r[3] for r in notes} == {"DS"}
    assert all(r[0] == f"{r[1]}-DS-{r[4]}" for r in notes)
    assert len({r[2] for r in notes}) == len(notes) == 600
    dx = as_dicts(out / "hosp/diagnoses_icd.csv.gz")
    proc = as_dicts(out / "hosp/procedures_icd.csv.gz")
    assert list(dx[0]) == ["subject_id", "hadm_id", "seq_num", "icd_code", "icd_version"]
    assert list(proc[0]) == ["subject_id", "hadm_id", "seq_num", "chartdate", "icd_code",
                             "icd_version"]
    version_of: dict[str, set[str]] = defaultdict(set)
    for r in dx + proc:
        version_of[r["hadm_id"]].add(r["icd_version"])
    assert all(len(v) == 1 for v in version_of.values())       # one version per admission
    share10 = sum(v == {"10"} for v in version_of.values()) / len(version_of)
    assert 0.5 < share10 < 0.7                                  # icd10_fraction 0.6
    for r in dx:
        pattern = RAW_ICD10_CM if r["icd_version"] == "10" else RAW_ICD9_DX
        assert pattern.match(r["icd_code"]), r["icd_code"]
    for r in proc:
        pattern = RAW_ICD10_PCS if r["icd_version"] == "10" else RAW_ICD9_PROC
        assert pattern.match(r["icd_code"]), r["icd_code"]
        assert re.match(r"^\d{4}-\d\d-\d\d$", r["chartdate"])


def test_gzip_deterministic_and_seed_dependent(tmp_path):
    spec = syn.SyntheticSpec(n_admissions=60, seed=3)
    layouts = ((syn.write_mimic3, ["NOTEEVENTS.csv.gz", "DIAGNOSES_ICD.csv.gz",
                                   "PROCEDURES_ICD.csv.gz"]),
               (syn.write_mimic4, ["note/discharge.csv.gz", "hosp/diagnoses_icd.csv.gz",
                                   "hosp/procedures_icd.csv.gz"]))
    for writer, names in layouts:
        a, b, c = (tmp_path / f"{writer.__name__}_{x}" for x in "abc")
        writer(a, spec)
        writer(b, spec)
        writer(c, syn.SyntheticSpec(n_admissions=60, seed=4))
        for name in names:
            data = (a / name).read_bytes()
            assert data[:4] == b"\x1f\x8b\x08\x00" and data[4:8] == b"\x00\x00\x00\x00"  # mtime 0
            assert data == (b / name).read_bytes()
            assert data != (c / name).read_bytes()


# ------------------------------------------------------------------------------------- codes


def test_raw_codes_undotted_with_v_e_and_procedures(m3):
    out = m3[0]
    dx = [r[4] for r in read_gz(out / "DIAGNOSES_ICD.csv.gz")[1]]
    proc = [r[4] for r in read_gz(out / "PROCEDURES_ICD.csv.gz")[1]]
    assert all(RAW_ICD9_DX.match(c) for c in dx)
    assert all(RAW_ICD9_PROC.match(c) for c in proc)
    assert any(c.startswith("V") for c in dx) and any(c.startswith("E") for c in dx)
    assert "4019" in dx and "3893" in proc        # rank-1 diagnosis and procedure


def test_vocab_forms_unique_and_descriptions_real():
    for system in ("icd9", "icd10"):
        vocab = syn.build_vocab(system, 150, 30)
        assert (len(vocab.dx), len(vocab.proc)) == (150, 30)
        owner: dict[str, str] = {}
        for e in vocab.dx + vocab.proc:
            assert 1 <= len(e.forms) <= 3
            assert describe(e.dotted, system, e.kind) == e.description
            for form in e.forms:
                assert form == form.lower() and len(form.split()) <= 8
                assert owner.setdefault(form, e.code) == e.code, form
    v9 = syn.build_vocab("icd9", 150, 30)
    # curated codes and their dots (ICD-9 dx after 3, E codes after 4, procedures after 2)
    assert [e.code for e in v9.dx[:3]] == ["4019", "4280", "42731"]
    assert v9.entries["V5861"].dotted == "V58.61"
    assert v9.entries["E8497"].dotted == "E849.7"
    assert v9.entries["3893"].dotted == "38.93"
    assert "essential hypertension" in v9.entries["4019"].forms      # "unspecified" dropped
    assert "ckd" in v9.entries["5859"].forms                          # hand abbreviation
    v10 = syn.build_vocab("icd10", 150, 30)
    assert v10.entries["I10"].dotted == "I10" and v10.entries["E119"].dotted == "E11.9"
    assert v10.entries["02HV33Z"].forms[0] == "insertion of infusion device into superior vena cava"


def test_find_mentions_longest_match():
    v9 = syn.build_vocab("icd9", 150, 30)
    assert v9.entries["4019"].forms == ("unspecified essential hypertension",
                                        "essential hypertension", "hypertension")
    text = "Pulmonary hypertension. Hypertension. no pure hypercholesterolemia; hypertensionx"
    assert syn.find_mentions(text, v9) == ["4168", "4019", "2720"]


def test_zipf_frequencies(m3):
    out, manifest, _, _ = m3
    counts = Counter(r[4] for r in read_gz(out / "DIAGNOSES_ICD.csv.gz")[1])
    ranked = [e["code"] for e in manifest["vocab"]["icd9"] if e["kind"] == "dx"]
    head = sum(counts[c] for c in ranked[:10]) / 10
    tail = sum(counts[c] for c in ranked[-50:]) / 50
    assert head > 10 * tail
    assert sum(0 < counts[c] < 10 for c in ranked) >= 10               # work for the rare filter
    assert counts.most_common(1)[0][0] == "4019"
    dx_per_adm = Counter((r[1], r[2]) for r in read_gz(out / "DIAGNOSES_ICD.csv.gz")[1])
    proc_per_adm = Counter((r[1], r[2]) for r in read_gz(out / "PROCEDURES_ICD.csv.gz")[1])
    mean = (sum(dx_per_adm.values()) + sum(proc_per_adm.values())) / len(dx_per_adm)
    assert 4.0 < mean < 6.0 and min(dx_per_adm.values()) >= 1


# ------------------------------------------------------------------------------------- notes


def test_every_gold_code_mentioned_and_distractors_not_gold(m3, m4):
    for _, _, adms, vocabs in (m3, m4):
        n_neg = n_fam = 0
        for a in adms:
            vocab = vocabs[a.system]
            full = a.text + "\n" + "\n".join(a.addenda)
            for code in a.gold:
                assert any(has_form(full, f) for f in vocab.entries[code].forms), code
            for code in a.addendum_only:     # mentioned in the addendum only
                assert not any(has_form(a.text, f) for f in vocab.entries[code].forms)
            assert not set(a.negated + a.family) & set(a.gold)
            for code in a.negated + a.family:
                assert any(has_form(a.text, f) for f in vocab.entries[code].forms)
            # nothing else is codable: mentions are exactly gold + distractors
            assert set(syn.find_mentions(full, vocab)) == set(a.gold + a.negated + a.family)
            n_neg += len(a.negated)
            n_fam += len(a.family)
        assert n_neg > 0.5 * len(adms) and n_fam > 0.2 * len(adms)


def test_written_tables_match_admissions(m3):
    out, _, adms, _ = m3
    dx: dict[str, list[str]] = defaultdict(list)
    for r in as_dicts(out / "DIAGNOSES_ICD.csv.gz"):
        dx[r["HADM_ID"]].append(r["ICD9_CODE"])
    reports = {r["HADM_ID"]: r["TEXT"] for r in as_dicts(out / "NOTEEVENTS.csv.gz")
               if r["CATEGORY"] == "Discharge summary" and r["DESCRIPTION"] == "Report"}
    for a in adms:
        assert list(dict.fromkeys(dx[str(a.hadm_id)])) == list(a.dx)
        assert reports[str(a.hadm_id)] == a.text


def test_patients_addenda_and_other_notes(m3):
    out = m3[0]
    notes = as_dicts(out / "NOTEEVENTS.csv.gz")
    reports = [r for r in notes
               if r["CATEGORY"] == "Discharge summary" and r["DESCRIPTION"] == "Report"]
    per_subject = Counter(r["SUBJECT_ID"] for r in reports)
    assert 0.70 < len(per_subject) / len(reports) < 0.80             # patients_per_admission
    assert max(per_subject.values()) >= 2
    addenda = [r for r in notes if r["DESCRIPTION"] == "Addendum"]
    assert addenda and all(r["CATEGORY"] == "Discharge summary" for r in addenda)
    assert {r["HADM_ID"] for r in addenda} <= {r["HADM_ID"] for r in reports}
    other = [r for r in notes if r["CATEGORY"] != "Discharge summary"]
    assert len(other) > 100 and {"Nursing", "Radiology"} <= {r["CATEGORY"] for r in other}
    assert any(r["HADM_ID"] == "" for r in other)
    assert all(r["CHARTTIME"] == "" for r in reports)


def test_note_length_in_range(m3):
    words = [len(a.text.split()) for a in m3[2]]
    assert min(words) >= 120 and max(words) <= 250
    assert max(words) - min(words) > 60                          # lengths vary inside the range
    spec = syn.SyntheticSpec(n_admissions=150, min_words=300, max_words=400, seed=1)
    words = [len(a.text.split()) for a in syn.generate(spec, "mimic3")[0]]
    assert min(words) >= 300 and max(words) <= 400


def test_spec_validation():
    with pytest.raises(ConfigError, match="n_admissions"):
        syn.generate(syn.SyntheticSpec(n_admissions=0), "mimic3")
    with pytest.raises(ConfigError, match="max_words"):
        syn.generate(syn.SyntheticSpec(min_words=200, max_words=210), "mimic3")
    with pytest.raises(ConfigError, match="icd10_fraction"):
        syn.generate(syn.SyntheticSpec(icd10_fraction=1.5), "mimic4")
    with pytest.raises(ConfigError, match="source"):
        syn.generate(syn.SyntheticSpec(n_admissions=5), "mimic5")


def test_cli(tmp_path, capsys):
    assert syn.main(["--out", str(tmp_path), "--source", "mimic4", "--n", "40", "--seed", "2"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["n_admissions"] == 40 and printed["source"] == "mimic4"
    assert (tmp_path / "hosp" / "diagnoses_icd.csv.gz").is_file()


# ------------------------------------------------------------------------------- end to end


def test_end_to_end_prepare_mimic3(m3, tmp_path):
    from minicd.data.mimic import prepare_mimic3

    raw, _, adms, vocabs = m3
    prepare_mimic3(raw, tmp_path, top_k=50)
    records = [r for s in ("train", "val", "test")
               for r in read_records(tmp_path / "mimic3" / "full" / f"{s}.jsonl")]
    by_id = {str(a.hadm_id): a for a in adms}
    vocab = vocabs["icd9"]
    kept_codes = {c for r in records for c in r.codes}
    assert 0 < len(kept_codes) < len(vocab.dx) + len(vocab.proc)      # rare codes removed
    assert len(records) >= 0.95 * len(adms)
    n_addendum_only = 0
    for r in records:
        a = by_id[r.id]
        gold = [vocab.entries[c].dotted for c in a.gold]
        assert set(r.codes) == set(gold) & kept_codes
        # addenda merged in, non-discharge rows dropped: mentions are exactly gold + distractors
        assert set(syn.find_mentions(r.note, vocab)) == set(a.gold + a.negated + a.family)
        assert "final report" not in r.note and r.note == r.note.lower()
        n_addendum_only += bool(a.addendum_only)
    assert n_addendum_only > 0


def test_end_to_end_prepare_mimic4(m4, tmp_path):
    from minicd.data.mimic import prepare_mimic4

    raw, manifest, adms, vocabs = m4
    prepare_mimic4(raw, tmp_path, top_k=50)
    by_id = {str(a.hadm_id): a for a in adms}
    for version, n in ((9, manifest["n_icd9_admissions"]), (10, manifest["n_icd10_admissions"])):
        records = [r for s in ("train", "val", "test")
                   for r in read_records(tmp_path / f"mimic4_icd{version}" / "full" / f"{s}.jsonl")]
        assert 0.9 * n <= len(records) <= n
        for r in records:
            a = by_id[r.id]
            assert a.system == f"icd{version}" == r.code_system
            vocab = vocabs[a.system]
            assert set(r.codes) <= {vocab.entries[c].dotted for c in a.gold}
            assert set(syn.find_mentions(r.note, vocab)) == set(a.gold + a.negated + a.family)
