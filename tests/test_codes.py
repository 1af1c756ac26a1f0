"""Tests for minicd.codes: MIMIC code formatting, validity, descriptions, truncation."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minicd import DataError
from minicd.codes import (
    DescriptionTable,
    code_kind,
    describe,
    format_code,
    format_icd9_dx,
    format_icd9_proc,
    format_icd10_cm,
    format_icd10_pcs,
    in_taxonomy,
    is_valid,
    normalize,
    truncate_description,
)

# --- formatting (Edin et al. 2023 dot rules) ----------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("4019", "401.9"),
        ("486", "486"),
        ("V5861", "V58.61"),
        ("V08", "V08"),
        ("V090", "V09.0"),
        ("E8497", "E849.7"),
        ("E849", "E849"),
        ("25000", "250.00"),
        ("0389", "038.9"),  # leading zero kept
        (" 4019 ", "401.9"),
        ("v5861", "V58.61"),
        ("e8497", "E849.7"),
        ("401.9", "401.9"),  # already dotted: unchanged
    ],
)
def test_format_icd9_dx(raw, expected):
    assert format_icd9_dx(raw) == expected


@pytest.mark.parametrize(
    "raw, expected",
    [("3893", "38.93"), ("966", "96.6"), ("39", "39"), ("0040", "00.40"), (" 9604\n", "96.04")],
)
def test_format_icd9_proc(raw, expected):
    assert format_icd9_proc(raw) == expected


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("E119", "E11.9"),
        ("I10", "I10"),
        ("I10.", "I10"),  # Edin's code leaves this trailing dot
        ("S72001A", "S72.001A"),
        ("u071", "U07.1"),
        ("C4A0", "C4A.0"),
        (" z3a01 ", "Z3A.01"),
    ],
)
def test_format_icd10_cm(raw, expected):
    assert format_icd10_cm(raw) == expected


@pytest.mark.parametrize("raw, expected", [("02HV33Z", "02HV33Z"), (" 0dtj4zz ", "0DTJ4ZZ")])
def test_format_icd10_pcs(raw, expected):
    assert format_icd10_pcs(raw) == expected


@pytest.mark.parametrize(
    "fn, raw",
    [
        (format_icd9_dx, ""),
        (format_icd9_dx, "   "),
        (format_icd9_dx, None),
        (format_icd9_dx, float("nan")),
        (format_icd9_dx, "nan"),
        (format_icd9_dx, 4019),  # numbers lose leading zeros: must be read as strings
        (format_icd9_dx, "40"),
        (format_icd9_dx, "401999"),
        (format_icd9_dx, "V5"),
        (format_icd9_dx, "E84"),
        (format_icd9_dx, "40-19"),
        (format_icd9_dx, "40.19"),  # misplaced dot
        (format_icd9_dx, "E11.9"),
        (format_icd9_proc, "3"),
        (format_icd9_proc, "38931"),
        (format_icd9_proc, "V58"),
        (format_icd9_proc, "389.3"),
        (format_icd10_cm, "E1"),
        (format_icd10_cm, "11E9"),
        (format_icd10_cm, "E119999X"),
        (format_icd10_cm, "E1.19"),
        (format_icd10_cm, "E11 9"),
        (format_icd10_pcs, "02HV33"),
        (format_icd10_pcs, "02HV33ZZ"),
        (format_icd10_pcs, "02HI33Z"),  # no I in PCS
        (format_icd10_pcs, "02HO33Z"),  # no O in PCS
        (format_icd10_pcs, "02HV3.3Z"),
    ],
)
def test_format_rejects_bad_values(fn, raw):
    with pytest.raises(DataError) as info:
        fn(raw)
    assert repr(raw) in str(info.value)


def test_format_code_dispatch():
    assert format_code("4019", "icd9", "dx") == "401.9"
    assert format_code("4019", "icd9", "proc") == "40.19"
    assert format_code("E119", "icd10", "dx") == "E11.9"
    assert format_code("02HV33Z", "icd10", "proc") == "02HV33Z"
    with pytest.raises(ValueError):
        format_code("4019", "icd11", "dx")
    with pytest.raises(ValueError):
        format_code("4019", "icd9", "diag")


# --- normalize / validity ------------------------------------------------------------------


@pytest.mark.parametrize(
    "code, expected",
    [(" i10. ", "I10"), ("401.9", "401.9"), ("e11.9\n", "E11.9"), ("I10..", "I10"), ("", "")],
)
def test_normalize(code, expected):
    assert normalize(code) == expected


@pytest.mark.parametrize(
    "code, system, kind",
    [
        ("401.9", "icd9", "dx"),
        ("486", "icd9", "dx"),
        ("250.00", "icd9", "dx"),
        ("V58.61", "icd9", "dx"),
        ("V08", "icd9", "dx"),
        ("E849.7", "icd9", "dx"),
        ("E849", "icd9", "dx"),
        ("38.93", "icd9", "proc"),
        ("96.6", "icd9", "proc"),
        ("39", "icd9", "proc"),
        ("I10", "icd10", "dx"),
        ("E11.9", "icd10", "dx"),
        ("U07.1", "icd10", "dx"),
        ("S72.001A", "icd10", "dx"),
        ("V58.61", "icd10", "dx"),  # ICD-10-CM V (external cause) codes look like ICD-9 V codes
        ("02HV33Z", "icd10", "proc"),
        ("i10.", "icd10", "dx"),  # normalized first
    ],
)
def test_valid_codes(code, system, kind):
    assert code_kind(code, system) == kind
    assert code_kind(code) == kind
    assert is_valid(code, system)
    assert is_valid(code)


@pytest.mark.parametrize(
    "code, system",
    [
        ("401.9", "icd10"),
        ("38.93", "icd10"),
        ("E11.9", "icd9"),  # ICD-9 E codes have 3 digits before the dot
        ("E849.7", "icd10"),
        ("02HV33Z", "icd9"),
        ("I10", "icd9"),
    ],
)
def test_valid_in_other_system_only(code, system):
    assert not is_valid(code, system)
    assert code_kind(code, system) is None
    assert is_valid(code)


@pytest.mark.parametrize(
    "code",
    [
        "4019",  # undotted ICD-9 dx (collides with procedure 40.19)
        "3893",  # undotted ICD-9 procedure
        "40.1.9",
        "401.999",
        "4.019",
        "E8.497",
        "V5.861",
        "E11.99999",
        "02HI33Z",
        "02HV33",
        "",
        "hypertension",
        "401.9 (HTN)",
        "I10-",
        "1",
    ],
)
def test_invalid_codes(code):
    assert not is_valid(code)
    assert code_kind(code) is None


def test_undotted_icd10_cm_is_invalid():
    # "E119" is ICD-10-CM E11.9 undotted; syntactically it is also an ICD-9 E code (E119)
    assert not is_valid("E119", "icd10")
    assert code_kind("E119", "icd9") == "dx"
    assert not is_valid("E84.97", "icd9")
    assert is_valid("E84.97", "icd10")


def test_is_valid_bad_system():
    with pytest.raises(ValueError):
        is_valid("401.9", "icd11")
    assert not is_valid(None)  # type: ignore[arg-type]


# --- descriptions ----------------------------------------------------------------------------


def test_describe_packaged():
    assert describe("401.9", "icd9") == "Unspecified essential hypertension"
    assert describe("4019", "icd9") == "Unspecified essential hypertension"  # undotted = dx
    assert describe("38.93", "icd9") == "Venous catheterization, not elsewhere classified"
    assert describe("40.19", "icd9") == "Other diagnostic procedures on lymphatic structures"
    assert describe("4019", "icd9", kind="proc") == describe("40.19", "icd9")
    assert describe("E11.9", "icd10") == "Type 2 diabetes mellitus without complications"
    assert describe("e119", "icd10") == "Type 2 diabetes mellitus without complications"
    assert describe("I10", "icd10") == "Essential (primary) hypertension"
    assert describe("U07.1", "icd10") == "COVID-19"
    assert (
        describe("02HV33Z", "icd10")
        == "Insertion of Infusion Device into Superior Vena Cava, Percutaneous Approach"
    )
    hiv = "Asymptomatic human immunodeficiency virus [HIV] infection status"
    assert describe("V08", "icd9") == hiv
    # latin-1 file: Meniere with diacritics decoded, not mangled
    assert describe("386.00", "icd9") == "M\u00e9ni\u00e8re's disease, unspecified"
    # system None tries ICD-9 first, then ICD-10
    assert describe("E11.9", None) == "Type 2 diabetes mellitus without complications"


@pytest.mark.parametrize("code", ["I48.1", "N18.3", "R05", "999.99", "hypertension", ""])
def test_describe_misses(code):
    assert describe(code, "icd10") is None
    assert not in_taxonomy(code, "icd10")


def test_in_taxonomy():
    assert in_taxonomy("401.9", "icd9")
    assert in_taxonomy("38.93", "icd9")
    assert in_taxonomy("E849.7", "icd9")
    assert in_taxonomy("E11.9", "icd10")
    assert in_taxonomy("02HV33Z", "icd10")
    assert in_taxonomy("401.9")  # any system
    assert not in_taxonomy("4019", "icd9")  # undotted is not a code
    assert not in_taxonomy("401.9", "icd10")
    assert not in_taxonomy("E11", "icd10")  # header code, not billable
    assert not in_taxonomy("401", "icd9")  # 3-digit category with subcodes


def test_user_description_file(tmp_path):
    f = tmp_path / "desc.tsv"
    f.write_text(
        "# my descriptions\n"
        "I48.1\tPersistent atrial fibrillation\n"
        "N183 Chronic kidney disease, stage 3 (moderate)\n"
        "\n"
        "E11.9\tDiabetes type 2\n"
        "02HV33Z\tPort insertion\n",
        encoding="utf-8",
    )
    table = DescriptionTable("icd10", f)
    assert table.describe("I48.1") == "Persistent atrial fibrillation"
    assert table.describe("N18.3") == "Chronic kidney disease, stage 3 (moderate)"
    assert table.describe("E11.9") == "Diabetes type 2"  # override
    assert table.describe("02HV33Z") == "Port insertion"
    assert table.describe("I10") == "Essential (primary) hypertension"  # packaged
    assert table.in_taxonomy("I48.1") and table.in_taxonomy("I10")
    assert not table.in_taxonomy("R05")
    # the module-level tables are not affected
    assert describe("I48.1", "icd10") is None
    assert describe("E11.9", "icd10") == "Type 2 diabetes mellitus without complications"


def test_user_description_file_icd9(tmp_path):
    f = tmp_path / "desc.txt"
    f.write_text("38.93\tCentral line\n4019 HTN\n", encoding="utf-8")
    table = DescriptionTable("icd9", f)
    assert table.describe("38.93") == "Central line"
    assert table.describe("401.9") == "HTN"
    assert table.describe("40.19") == describe("40.19", "icd9")  # proc 40.19 untouched


@pytest.mark.parametrize(
    "content, lineno",
    [
        ("I10\tHypertension\nE11.9\n", 2),  # no description
        ("I10\tHypertension\nnot-a-code\tfoo\n", 2),
        ("401.9\tHTN\n", 1),  # ICD-9 code in an ICD-10 table
        ("E11.9\t   \n", 1),
    ],
)
def test_user_description_file_errors(tmp_path, content, lineno):
    f = tmp_path / "bad.tsv"
    f.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=f"bad.tsv:{lineno}"):
        DescriptionTable("icd10", f)


def test_user_description_file_missing(tmp_path):
    with pytest.raises(DataError, match="nope.tsv"):
        DescriptionTable("icd10", tmp_path / "nope.tsv")


# --- truncation ------------------------------------------------------------------------------


def test_truncate_short_unchanged():
    assert truncate_description("Acidosis") == "Acidosis"
    assert truncate_description("x" * 100) == "x" * 100
    assert truncate_description("abcdefghij", limit=10) == "abcdefghij"


def test_truncate_soft_cut_after_60_percent():
    # limit 10: the cut is "abcdefg hi", its last space is at index 7 > 6 -> cut there
    assert truncate_description("abcdefg hijk", limit=10) == "abcdefg..."


def test_truncate_space_exactly_at_60_percent_is_hard_cut():
    # last space of "abcdef ghi" at index 6 == 0.6 * 10: not after 60% -> hard cut
    assert truncate_description("abcdef ghijk", limit=10) == "abcdef ghi..."


def test_truncate_hard_cut():
    assert truncate_description("abcdefghijklmno", limit=10) == "abcdefghij..."
    assert truncate_description("ab cdefghijklmno", limit=10) == "ab cdefghi..."


def test_truncate_default_limit_real_description():
    text = describe("02HV33Z", "icd10")
    assert text is not None and len(text) <= 100
    long = "word " * 30  # 150 chars, spaces every 5 chars
    # cut = long[:100] = "word " * 20 whose last space is at index 99 -> cut to 99 chars
    assert truncate_description(long) == ("word " * 20)[:99] + "..."


# --- property: formatting undotted codes restores the dotted form --------------------------

_DOTTED = {
    format_icd9_dx: r"[0-9]{3}(\.[0-9]{1,2})?|V[0-9]{2}(\.[0-9]{1,2})?|E[0-9]{3}(\.[0-9])?",
    format_icd9_proc: r"[0-9]{2}(\.[0-9]{1,2})?",
    format_icd10_cm: r"[A-Z][0-9][0-9A-Z](\.[0-9A-Z]{1,4})?",
    format_icd10_pcs: r"[0-9A-HJ-NP-Z]{7}",
}


@pytest.mark.parametrize("fn", list(_DOTTED), ids=lambda f: f.__name__)
def test_format_roundtrip_property(fn):
    @settings(max_examples=200, deadline=None)
    @given(st.from_regex(_DOTTED[fn], fullmatch=True))
    def check(dotted):
        assert fn(dotted.replace(".", "")) == dotted
        assert fn(dotted.lower()) == dotted  # idempotent on dotted input
        assert is_valid(dotted)

    check()
