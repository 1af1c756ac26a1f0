"""Prompt text: the coding instruction, the Appendix D baselines and the Appendix E hint.

Everything here returns plain strings; the chat template is applied elsewhere
(``minicd.model.tokenizer``).

* Appendix D (prompting baselines): four templates, copied verbatim from the paper, where they
  are printed as single lines. Placeholders ``{CODE_SYSTEM}``, ``{LABEL_SCOPE}``,
  ``{FORMAT_EXAMPLE_CODES}``, ``{DISCHARGE_SUMMARY}``, ``{SHOT_NOTE_i}``, ``{SHOT_CODES_i}`` are
  filled in one pass over the template (:func:`_fill`): text inserted for a placeholder is never
  scanned again, so braces or placeholder-like text inside a note stay as they are.
* Appendix E (PHI training hint): the paper's block, one line ``- CODE (DESCRIPTION)`` per hinted
  code (the paper's ``...`` line stands for "more code lines" and is not printed); a code with no
  description is shown bare (``- CODE``).
* The fixed coding instruction used by SFT, GRPO, PHI and evaluation (:func:`coding_prompt`). The
  paper does not print it (Appendix A only says the user turn holds the discharge summary and an
  instruction to output all applicable diagnosis and procedure codes); the wording is ours.

Fills the paper names but does not print (ours, chosen to be explicit):
``LABEL_SCOPE`` is "the 50 most frequent codes of MIMIC-III" (Top-50) or "the full MIMIC-III
code set" (Full), with the corpus substituted; ``FORMAT_EXAMPLE_CODES`` is "401.9, 428.0, 38.93"
for ICD-9 and "I10, N17.9, 02HV33Z" for ICD-10 (common codes, one procedure each, formatting
only). ``CODE_SYSTEM`` is "ICD-9-CM" or "ICD-10-CM/PCS" and ``CORPUS`` "MIMIC-III" or "MIMIC-IV",
as the paper states.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

from minicd.data.truncate import fit_prompt
from minicd.errors import ConfigError
from minicd.model.tokenizer import encode_prompt

if TYPE_CHECKING:
    from minicd.data.records import Record
    from minicd.model.tokenizer import Tokenizer

# --- dataset fills -------------------------------------------------------------------------

CODE_SYSTEM_NAMES: dict[str, str] = {"icd9": "ICD-9-CM", "icd10": "ICD-10-CM/PCS"}
CORPUS_NAMES: dict[str, str] = {"mimic3": "MIMIC-III", "mimic4": "MIMIC-IV"}
DEFAULT_CODE_SYSTEM: dict[str, str] = {"mimic3": "icd9", "mimic4": "icd10"}
# Ours (the paper does not print these fills).
LABEL_SCOPES: dict[str, str] = {
    "top50": "the 50 most frequent codes of {CORPUS}",
    "full": "the full {CORPUS} code set",
}
FORMAT_EXAMPLE_CODES: dict[str, str] = {"icd9": "401.9, 428.0, 38.93", "icd10": "I10, N17.9, 02HV33Z"}
HINT_VERSION: dict[str, str] = {"icd9": "9", "icd10": "10"}

_CORPUS_ALIASES = {"mimic3": "mimic3", "mimiciii": "mimic3", "mimic4": "mimic4", "mimiciv": "mimic4"}
_SCOPE_ALIASES = {"top50": "top50", "full": "full"}


def _key(name: str) -> str:
    return re.sub(r"[\s_\-]", "", str(name).lower())


def _check_system(code_system: str) -> None:
    if code_system not in CODE_SYSTEM_NAMES:
        raise ConfigError(
            f"unknown code system {code_system!r} (key data.code_system); use 'icd9' or 'icd10'"
        )


@dataclass(frozen=True)
class PromptSetting:
    """Dataset setting that fills the Appendix D placeholders.

    Fields hold the canonical config keys: ``corpus`` "mimic3"|"mimic4", ``code_system``
    "icd9"|"icd10", ``label_scope`` "top50"|"full" (as in ``DataConfig``); the properties give
    the text that goes into the prompt.
    """

    corpus: str
    code_system: str
    label_scope: str

    def __post_init__(self) -> None:
        if self.corpus not in CORPUS_NAMES:
            raise ConfigError(f"unknown corpus {self.corpus!r} (key data.corpus); use 'mimic3' or 'mimic4'")
        _check_system(self.code_system)
        if self.label_scope not in LABEL_SCOPES:
            raise ConfigError(
                f"unknown label scope {self.label_scope!r} (key data.label_scope); use 'top50' or 'full'"
            )

    @classmethod
    def from_names(cls, corpus: str, label_scope: str, code_system: str | None = None) -> PromptSetting:
        """Build from loose dataset names: "MIMIC-III", "mimic_iv", "mimic4-icd9" (a trailing
        icd9/icd10 picks the code system), "Top-50", "full". ``code_system`` defaults to the
        corpus's own (MIMIC-III: icd9, MIMIC-IV: icd10)."""
        c = _key(corpus)
        for sys_ in ("icd10", "icd9"):
            if c.endswith(sys_) and c[: -len(sys_)] in _CORPUS_ALIASES:
                code_system = code_system or sys_
                c = c[: -len(sys_)]
                break
        if c not in _CORPUS_ALIASES:
            raise ConfigError(f"unknown corpus name {corpus!r}; use MIMIC-III/mimic3 or MIMIC-IV/mimic4")
        s = _key(label_scope)
        if s not in _SCOPE_ALIASES:
            raise ConfigError(f"unknown label scope {label_scope!r}; use 'top50' or 'full'")
        canon = _CORPUS_ALIASES[c]
        system = _key(code_system) if code_system else DEFAULT_CODE_SYSTEM[canon]
        return cls(canon, system, _SCOPE_ALIASES[s])

    @classmethod
    def from_config(cls, data_cfg: object) -> PromptSetting:
        """From a ``DataConfig``-like object with ``corpus``, ``code_system``, ``label_scope``."""
        return cls.from_names(data_cfg.corpus, data_cfg.label_scope, data_cfg.code_system)  # type: ignore[attr-defined]

    @property
    def corpus_name(self) -> str:
        return CORPUS_NAMES[self.corpus]

    @property
    def code_system_name(self) -> str:
        return CODE_SYSTEM_NAMES[self.code_system]

    @property
    def label_scope_text(self) -> str:
        return LABEL_SCOPES[self.label_scope].replace("{CORPUS}", self.corpus_name)

    @property
    def format_example_codes(self) -> str:
        return FORMAT_EXAMPLE_CODES[self.code_system]


# --- Appendix D templates (verbatim, single lines) -----------------------------------------

ZERO_SHOT_TEMPLATE = "You are a clinical coding specialist assigning {CODE_SYSTEM} codes from a discharge summary. Use {LABEL_SCOPE}. Output only the final {CODE_SYSTEM} codes in <code>...</code>. Do not include any other text. Formatting example only, not a clinical example and not codes to copy: <code>{FORMAT_EXAMPLE_CODES}</code> Now code the following discharge summary. Discharge Summary: {DISCHARGE_SUMMARY} Answer:"  # noqa: E501

FEW_SHOT_TEMPLATE = "You are a clinical coding specialist assigning {CODE_SYSTEM} codes from a discharge summary. Use {LABEL_SCOPE}. Output only the final {CODE_SYSTEM} codes in <code>...</code>. Do not include any other text. Examples: Example 1 Discharge Summary: {SHOT_NOTE_1} Answer: <code>{SHOT_CODES_1}</code> Example 2 Discharge Summary: {SHOT_NOTE_2} Answer: <code>{SHOT_CODES_2}</code> Example 3 Discharge Summary: {SHOT_NOTE_3} Answer: <code>{SHOT_CODES_3}</code> Now code the following discharge summary. Discharge Summary: {DISCHARGE_SUMMARY} Answer:"  # noqa: E501

ZERO_SHOT_COT_TEMPLATE = "You are a clinical coding specialist assigning {CODE_SYSTEM} codes from a discharge summary. Use {LABEL_SCOPE}. First write a brief structured rationale in <think>...</think>, then output the final {CODE_SYSTEM} codes in <code>...</code>. Do not put codes outside the <code> block. Formatting example only, not a clinical example and not codes to copy: <think>Briefly identify the documented diagnoses and procedures, then map them to {CODE_SYSTEM} codes.</think> <code>{FORMAT_EXAMPLE_CODES}</code> Now code the following discharge summary. Discharge Summary: {DISCHARGE_SUMMARY} Answer:"  # noqa: E501

FEW_SHOT_COT_TEMPLATE = "You are a clinical coding specialist assigning {CODE_SYSTEM} codes from a discharge summary. Use {LABEL_SCOPE}. First write a brief structured rationale in <think>...</think>, then output the final {CODE_SYSTEM} codes in <code>...</code>. Do not put codes outside the <code> block. Examples: Example 1 Discharge Summary: {SHOT_NOTE_1} Answer: <think>Review the discharge summary for documented diagnoses and procedures, then map the supported findings to {CODE_SYSTEM} codes.</think> <code>{SHOT_CODES_1}</code> Example 2 Discharge Summary: {SHOT_NOTE_2} Answer: <think>Review the discharge summary for documented diagnoses and procedures, then map the supported findings to {CODE_SYSTEM} codes.</think> <code>{SHOT_CODES_2}</code> Example 3 Discharge Summary: {SHOT_NOTE_3} Answer: <think>Review the discharge summary for documented diagnoses and procedures, then map the supported findings to {CODE_SYSTEM} codes.</think> <code>{SHOT_CODES_3}</code> Now code the following discharge summary. Discharge Summary: {DISCHARGE_SUMMARY} Answer:"  # noqa: E501

BASELINE_TEMPLATES: dict[str, str] = {
    "zero_shot": ZERO_SHOT_TEMPLATE,
    "few_shot": FEW_SHOT_TEMPLATE,
    "zero_shot_cot": ZERO_SHOT_COT_TEMPLATE,
    "few_shot_cot": FEW_SHOT_COT_TEMPLATE,
}
NUM_SHOTS = 3

_PLACEHOLDER = re.compile(r"\{([A-Z][A-Z0-9_]*)\}")

Shot = tuple[str, Sequence[str]]  # (note, gold codes)


def _fill(template: str, fills: Mapping[str, str]) -> str:
    """Substitute every ``{NAME}`` of ``template`` once; inserted text is never re-scanned."""

    def sub(m: re.Match[str]) -> str:
        assert m.group(1) in fills, f"template placeholder {m.group(1)} has no fill"
        return fills[m.group(1)]

    return _PLACEHOLDER.sub(sub, template)


def render_baseline(kind: str, note: str, setting: PromptSetting, shots: Sequence[Shot] | None = None) -> str:
    """Render one Appendix D prompting baseline.

    ``kind``: "zero_shot" | "few_shot" | "zero_shot_cot" | "few_shot_cot". Few-shot kinds need
    exactly three ``shots`` = (note, codes) pairs of retrieved training examples, best first;
    ``SHOT_CODES_i`` is the codes joined by ", ".
    """
    if kind not in BASELINE_TEMPLATES:
        raise ConfigError(f"unknown prompting baseline {kind!r}; use one of {sorted(BASELINE_TEMPLATES)}")
    fills = {
        "CODE_SYSTEM": setting.code_system_name,
        "LABEL_SCOPE": setting.label_scope_text,
        "FORMAT_EXAMPLE_CODES": setting.format_example_codes,
        "DISCHARGE_SUMMARY": note,
    }
    if kind.startswith("few_shot"):
        if shots is None or len(shots) != NUM_SHOTS:
            got = "none" if shots is None else len(shots)
            raise ConfigError(
                f"{kind} prompt needs exactly {NUM_SHOTS} retrieved examples, got {got}; "
                "retrieve them with minicd.data.retrieve.NeighbourIndex (k=3) over >= 4 training notes"
            )
        for i, (shot_note, shot_codes) in enumerate(shots, start=1):
            fills[f"SHOT_NOTE_{i}"] = shot_note
            fills[f"SHOT_CODES_{i}"] = ", ".join(shot_codes)
    elif shots:
        raise ConfigError(f"{kind} prompt takes no examples, got {len(shots)}")
    return _fill(BASELINE_TEMPLATES[kind], fills)


def render_zero_shot(note: str, setting: PromptSetting) -> str:
    """Appendix D zero-shot prompt."""
    return render_baseline("zero_shot", note, setting)


def render_few_shot(note: str, setting: PromptSetting, shots: Sequence[Shot]) -> str:
    """Appendix D few-shot prompt with three retrieved (note, codes) examples."""
    return render_baseline("few_shot", note, setting, shots)


def render_zero_shot_cot(note: str, setting: PromptSetting) -> str:
    """Appendix D zero-shot + CoT prompt."""
    return render_baseline("zero_shot_cot", note, setting)


def render_few_shot_cot(note: str, setting: PromptSetting, shots: Sequence[Shot]) -> str:
    """Appendix D few-shot + CoT prompt with three retrieved (note, codes) examples."""
    return render_baseline("few_shot_cot", note, setting, shots)


# --- Appendix E hint -------------------------------------------------------------------------

HINT_HEADER = (
    "Training hint:\n"
    "The following ICD-{VERSION} codes were missed previously, but they are confirmed applicable to "
    "this case. Include these hinted codes in the final <code> answer, then add any other applicable "
    "ICD-{VERSION} codes supported by the note.\n"
    "Hinted codes:"
)
# The paper prints this ICD-9 example for every system ("paper", the default). An ICD-10
# analogue written here (not from the paper) is available as mini_example="system".
HINT_MINI_EXAMPLE = (
    "Mini example:\n"
    "If the hint says:\n"
    "- 276.2 (Acidosis)\n"
    "and the note also supports 401.9 and 584.9, then the final answer should include both the "
    "hinted code and the other supported codes:\n"
    "<code>276.2, 401.9, 584.9</code>"
)
HINT_MINI_EXAMPLE_ICD10 = (
    "Mini example:\n"
    "If the hint says:\n"
    "- E87.2 (Acidosis)\n"
    "and the note also supports I10 and N17.9, then the final answer should include both the "
    "hinted code and the other supported codes:\n"
    "<code>E87.2, I10, N17.9</code>"
)
HINT_DESCRIPTION_LIMIT = 100

Describe = Callable[[str, str], "str | None"]


def hint_block(
    codes: Sequence[str],
    code_system: str,
    describe: Describe | None = None,
    *,
    mini_example: str = "paper",
) -> str:
    """The Appendix E training hint listing ``codes`` (PHI), without a trailing newline.

    ``describe(code, code_system) -> str | None`` defaults to ``minicd.codes.describe``;
    descriptions are cut with ``codes.truncate_description(text, 100)``; a code with no (or an
    empty) description is listed bare. ``mini_example``: "paper" (the ICD-9 example printed in
    the paper, for both systems), "system" (ICD-10 runs get an ICD-10 analogue written here,
    not from the paper) or "none" (no example; an ablation): :func:`mini_example_block`.
    """
    from minicd import codes as codes_mod

    example = mini_example_block(code_system, mini_example)
    if not codes:
        raise ConfigError("hint_block needs at least one hinted code (an empty pool means: no hint)")
    describe = describe or codes_mod.describe
    lines = [HINT_HEADER.replace("{VERSION}", HINT_VERSION[code_system])]
    for code in codes:
        desc = describe(code, code_system)
        if desc:
            desc = codes_mod.truncate_description(desc.strip(), HINT_DESCRIPTION_LIMIT)
        lines.append(f"- {code} ({desc})" if desc else f"- {code}")
    if example:
        lines.append(example)
    return "\n".join(lines)


def mini_example_block(code_system: str, mini_example: str = "paper") -> str:
    """The "Mini example:" lines that end the hint block (``phi.mini_example``): "paper", the
    paper's ICD-9 example; "system", an ICD-10 analogue for ICD-10 runs; "none", no example
    (an ablation, not the paper: ""). Its ``<code>`` span is the answer a policy that copies
    the example would give."""
    _check_system(code_system)
    if mini_example not in ("paper", "system", "none"):
        raise ConfigError(f"phi.mini_example = {mini_example!r}: use 'paper' (the paper's ICD-9 "
                          "example for every system), 'system' (an ICD-10 analogue for ICD-10) "
                          "or 'none' (no example; an ablation)")
    if mini_example == "none":
        return ""
    use_icd10 = mini_example == "system" and code_system == "icd10"
    return HINT_MINI_EXAMPLE_ICD10 if use_icd10 else HINT_MINI_EXAMPLE


# --- the fixed coding instruction (SFT / GRPO / PHI / evaluation) ---------------------------

CODING_INSTRUCTION = (
    "You are a clinical coding specialist. Read the discharge summary below and assign every "
    "applicable {CODE_SYSTEM} diagnosis and procedure code."
)
CODING_SCOPE = " Use {LABEL_SCOPE}."
NOTE_HEADER = "Discharge summary:"
OUTPUT_FORMAT_INSTRUCTION = (
    "Output format: list all applicable {CODE_SYSTEM} codes in a single <code>...</code> block, "
    "separated by commas, for example <code>code1, code2, code3</code>. Do not write anything else."
)


def coding_prompt(
    note: str,
    code_system: str,
    hints: Sequence[str] | None = None,
    *,
    setting: PromptSetting | None = None,
    describe: Describe | None = None,
    mini_example: str = "paper",
) -> str:
    """User turn of every trained/evaluated coder: instruction, note, [hint], output format.

    Layout (blank lines between blocks)::

        <instruction>[ Use <label scope>.]
        Discharge summary:
        <note>
        [<Appendix E hint block>]          # only when ``hints`` is non-empty (PHI training)
        Output format: ... <code>...</code> ...

    The hint goes before the output-format instruction (Appendix E: "we insert a training hint
    before the output-format instruction"), so the format instruction stays last. ``setting``
    (optional) adds the label-scope sentence and must use the same ``code_system``;
    ``describe`` and ``mini_example`` are passed to :func:`hint_block`.
    """
    _check_system(code_system)
    fills = {"CODE_SYSTEM": CODE_SYSTEM_NAMES[code_system]}
    head = _fill(CODING_INSTRUCTION, fills)
    if setting is not None:
        if setting.code_system != code_system:
            raise ConfigError(
                f"coding_prompt: setting code system {setting.code_system!r} != {code_system!r}; "
                "make data.code_system match the dataset"
            )
        head += _fill(CODING_SCOPE, {"LABEL_SCOPE": setting.label_scope_text})
    blocks = [head, f"{NOTE_HEADER}\n{note}"]
    if hints:
        blocks.append(hint_block(hints, code_system, describe, mini_example=mini_example))
    blocks.append(_fill(OUTPUT_FORMAT_INSTRUCTION, fills))
    return "\n\n".join(blocks)


# ------------------------------------------------------------------ record -> prompt ids
def user_prompt(rec: "Record", tok: "Tokenizer", data_cfg: object,
                hints: Sequence[str] | None = None, describe: Describe | None = None,
                *, mini_example: str = "paper") -> str:
    """The coding user turn for ``rec`` (:func:`coding_prompt`, with the Appendix E hint block
    when ``hints`` are given), its note middle-out truncated so the whole user text fits
    ``data.max_prompt_tokens``; chat markup adds a few tokens on top. ``describe(code, system)``
    renders hint descriptions and ``mini_example`` picks the hint's example (PHI)."""
    setting = PromptSetting.from_config(data_cfg)
    return fit_prompt(lambda note: coding_prompt(note, rec.code_system, hints or None,
                                                 setting=setting, describe=describe,
                                                 mini_example=mini_example),
                      rec.note, data_cfg.max_prompt_tokens, tok)


def prompt_ids(rec: "Record", tok: "Tokenizer", data_cfg: object,
               hints: Sequence[str] | None = None, describe: Describe | None = None,
               *, mini_example: str = "paper") -> list[int]:
    """Generation-prompt ids for ``rec``: the one prompt of validation, rollouts, inference and
    PHI's hinted rollouts (no hints: the hint-free prompt)."""
    content = user_prompt(rec, tok, data_cfg, hints, describe, mini_example=mini_example)
    return encode_prompt(tok, [{"role": "user", "content": content}])
