"""Prompt text: the Appendix D templates and Appendix E hint, filled by hand from the paper."""

from __future__ import annotations

import pytest

from minicd.errors import ConfigError
from minicd.prompts import (
    PromptSetting,
    coding_prompt,
    hint_block,
    render_baseline,
    render_few_shot,
    render_few_shot_cot,
    render_zero_shot,
    render_zero_shot_cot,
)

M3_TOP50 = PromptSetting("mimic3", "icd9", "top50")
M4_FULL = PromptSetting("mimic4", "icd10", "full")
NOTE = "chief complaint:\nchest pain"
SHOTS = [
    ("shot one note", ["401.9", "428.0"]),
    ("shot two note", ["584.9"]),
    ("shot three note", ["276.2", "38.93", "V58.61"]),
]


# --- Appendix D, each expected string typed from the paper's template and filled by hand -------

def test_zero_shot_matches_paper_mimic3_top50():
    expected = (
        "You are a clinical coding specialist assigning ICD-9-CM codes from a discharge summary. "
        "Use the 50 most frequent codes of MIMIC-III. Output only the final ICD-9-CM codes in "
        "<code>...</code>. Do not include any other text. Formatting example only, not a clinical "
        "example and not codes to copy: <code>401.9, 428.0, 38.93</code> Now code the following "
        "discharge summary. Discharge Summary: chief complaint:\nchest pain Answer:"
    )
    assert render_zero_shot(NOTE, M3_TOP50) == expected
    assert render_baseline("zero_shot", NOTE, M3_TOP50) == expected


def test_zero_shot_matches_paper_mimic4_full():
    expected = (
        "You are a clinical coding specialist assigning ICD-10-CM/PCS codes from a discharge "
        "summary. Use the full MIMIC-IV code set. Output only the final ICD-10-CM/PCS codes in "
        "<code>...</code>. Do not include any other text. Formatting example only, not a clinical "
        "example and not codes to copy: <code>I10, N17.9, 02HV33Z</code> Now code the following "
        "discharge summary. Discharge Summary: the note Answer:"
    )
    assert render_zero_shot("the note", M4_FULL) == expected


def test_few_shot_matches_paper():
    expected = (
        "You are a clinical coding specialist assigning ICD-9-CM codes from a discharge summary. "
        "Use the 50 most frequent codes of MIMIC-III. Output only the final ICD-9-CM codes in "
        "<code>...</code>. Do not include any other text. Examples: "
        "Example 1 Discharge Summary: shot one note Answer: <code>401.9, 428.0</code> "
        "Example 2 Discharge Summary: shot two note Answer: <code>584.9</code> "
        "Example 3 Discharge Summary: shot three note Answer: <code>276.2, 38.93, V58.61</code> "
        "Now code the following discharge summary. Discharge Summary: chief complaint:\nchest pain "
        "Answer:"
    )
    assert render_few_shot(NOTE, M3_TOP50, SHOTS) == expected


def test_zero_shot_cot_matches_paper():
    expected = (
        "You are a clinical coding specialist assigning ICD-10-CM/PCS codes from a discharge "
        "summary. Use the full MIMIC-IV code set. First write a brief structured rationale in "
        "<think>...</think>, then output the final ICD-10-CM/PCS codes in <code>...</code>. Do not "
        "put codes outside the <code> block. Formatting example only, not a clinical example and "
        "not codes to copy: <think>Briefly identify the documented diagnoses and procedures, then "
        "map them to ICD-10-CM/PCS codes.</think> <code>I10, N17.9, 02HV33Z</code> Now code the "
        "following discharge summary. Discharge Summary: the note Answer:"
    )
    assert render_zero_shot_cot("the note", M4_FULL) == expected


def test_few_shot_cot_matches_paper():
    think = (
        "<think>Review the discharge summary for documented diagnoses and procedures, then map the "
        "supported findings to ICD-9-CM codes.</think>"
    )
    expected = (
        "You are a clinical coding specialist assigning ICD-9-CM codes from a discharge summary. "
        "Use the 50 most frequent codes of MIMIC-III. First write a brief structured rationale in "
        "<think>...</think>, then output the final ICD-9-CM codes in <code>...</code>. Do not put "
        "codes outside the <code> block. Examples: "
        f"Example 1 Discharge Summary: shot one note Answer: {think} <code>401.9, 428.0</code> "
        f"Example 2 Discharge Summary: shot two note Answer: {think} <code>584.9</code> "
        f"Example 3 Discharge Summary: shot three note Answer: {think} <code>276.2, 38.93, V58.61</code> "
        "Now code the following discharge summary. Discharge Summary: chief complaint:\nchest pain "
        "Answer:"
    )
    assert render_few_shot_cot(NOTE, M3_TOP50, SHOTS) == expected


def test_templates_are_single_lines():
    for kind in ("zero_shot", "zero_shot_cot"):
        assert "\n" not in render_baseline(kind, "x", M4_FULL)
    for kind in ("few_shot", "few_shot_cot"):
        assert "\n" not in render_baseline(kind, "x", M4_FULL, [("a", ["I10"])] * 3)


def test_braces_and_placeholders_in_notes_are_left_alone():
    nasty = "pt {DISCHARGE_SUMMARY} {SHOT_NOTE_2} {CODE_SYSTEM} {} {0} {{x}} \\1 \\g<0> %s"
    out = render_zero_shot(nasty, M3_TOP50)
    assert out.endswith(f"Discharge Summary: {nasty} Answer:")
    assert out.count("ICD-9-CM") == 2  # the two template slots only; the note's {CODE_SYSTEM} stays
    shots = [(nasty, ["{SHOT_CODES_3}"]), ("b {LABEL_SCOPE}", ["1"]), ("c", ["2"])]
    out = render_few_shot_cot("q {SHOT_NOTE_1}", M3_TOP50, shots)
    assert f"Example 1 Discharge Summary: {nasty} Answer:" in out
    assert "<code>{SHOT_CODES_3}</code>" in out
    assert "Example 2 Discharge Summary: b {LABEL_SCOPE} Answer:" in out
    assert out.endswith("Discharge Summary: q {SHOT_NOTE_1} Answer:")
    cp = coding_prompt(nasty, "icd9", hints=["401.9"], describe=lambda c, s: "{VERSION} {CODE_1}")
    assert f"Discharge summary:\n{nasty}\n\n" in cp
    assert "- 401.9 ({VERSION} {CODE_1})" in cp


def test_few_shot_needs_three_shots():
    with pytest.raises(ConfigError, match="exactly 3"):
        render_few_shot(NOTE, M3_TOP50, SHOTS[:2])
    with pytest.raises(ConfigError):
        render_baseline("one_shot", NOTE, M3_TOP50)


def test_setting_from_names():
    assert PromptSetting.from_names("MIMIC-III", "Top-50") == M3_TOP50
    assert PromptSetting.from_names("mimic_iv", "full") == M4_FULL
    s = PromptSetting.from_names("mimic4-icd9", "top50")
    assert (s.corpus, s.code_system, s.label_scope) == ("mimic4", "icd9", "top50")
    assert s.code_system_name == "ICD-9-CM" and s.corpus_name == "MIMIC-IV"
    assert s.label_scope_text == "the 50 most frequent codes of MIMIC-IV"
    with pytest.raises(ConfigError):
        PromptSetting("mimic5", "icd9", "top50")
    with pytest.raises(ConfigError):
        PromptSetting.from_names("mimic3", "top100")


# --- Appendix E hint ---------------------------------------------------------------------------

MINI_EXAMPLE = (
    "Mini example:\n"
    "If the hint says:\n"
    "- 276.2 (Acidosis)\n"
    "and the note also supports 401.9 and 584.9, then the final answer should include both the "
    "hinted code and the other supported codes:\n"
    "<code>276.2, 401.9, 584.9</code>"
)


def _hint_head(version: str) -> str:
    return (
        "Training hint:\n"
        f"The following ICD-{version} codes were missed previously, but they are confirmed "
        f"applicable to this case. Include these hinted codes in the final <code> answer, then add "
        f"any other applicable ICD-{version} codes supported by the note.\n"
        "Hinted codes:\n"
    )


def test_hint_block_icd9_with_injected_descriptions():
    table = {"276.2": "Acidosis", "428.0": "word " * 30}  # 150 chars: cut at the space at 99
    got = hint_block(["276.2", "428.0", "999.99"], "icd9", describe=lambda c, s: table.get(c))
    expected = (
        _hint_head("9")
        + "- 276.2 (Acidosis)\n"
        + "- 428.0 (" + " ".join(["word"] * 20) + "...)\n"
        + "- 999.99\n"
        + MINI_EXAMPLE
    )
    assert got == expected


def test_hint_block_real_descriptions_icd9_and_icd10():
    got9 = hint_block(["010.04", "401.9"], "icd9")
    assert got9 == (
        _hint_head("9")
        + "- 010.04 (Primary tuberculous infection, tubercle bacilli not found (in sputum) by "
        "microscopy, but found by...)\n"
        + "- 401.9 (Unspecified essential hypertension)\n"
        + MINI_EXAMPLE
    )
    # E87.2 became a header code in FY2024 (no description): shown bare.
    got10 = hint_block(["I10", "E87.2"], "icd10")
    assert got10 == _hint_head("10") + "- I10 (Essential (primary) hypertension)\n- E87.2\n" + MINI_EXAMPLE


def test_hint_block_system_mini_example_for_icd10():
    got = hint_block(["I10"], "icd10", describe=lambda c, s: None, mini_example="system")
    assert got == (
        _hint_head("10") + "- I10\n"
        "Mini example:\nIf the hint says:\n- E87.2 (Acidosis)\nand the note also supports I10 and "
        "N17.9, then the final answer should include both the hinted code and the other supported "
        "codes:\n<code>E87.2, I10, N17.9</code>"
    )
    # for ICD-9 "system" is the paper's example
    assert hint_block(["1"], "icd9", lambda c, s: None, mini_example="system").endswith(MINI_EXAMPLE)


# --- the coding instruction ----------------------------------------------------------------

INSTRUCTION9 = (
    "You are a clinical coding specialist. Read the discharge summary below and assign every "
    "applicable ICD-9-CM diagnosis and procedure code."
)
FORMAT9 = (
    "Output format: list all applicable ICD-9-CM codes in a single <code>...</code> block, "
    "separated by commas, for example <code>code1, code2, code3</code>. Do not write anything else."
)


def test_coding_prompt_without_hint():
    assert coding_prompt(NOTE, "icd9") == f"{INSTRUCTION9}\n\nDischarge summary:\n{NOTE}\n\n{FORMAT9}"
    scoped = coding_prompt(NOTE, "icd9", setting=M3_TOP50)
    assert scoped.startswith(INSTRUCTION9 + " Use the 50 most frequent codes of MIMIC-III.\n\n")
    with pytest.raises(ConfigError):
        coding_prompt(NOTE, "icd9", setting=M4_FULL)
    with pytest.raises(ConfigError):
        coding_prompt(NOTE, "ICD-9")


def test_hint_goes_before_output_format_instruction():
    describe = {"276.2": "Acidosis"}.get
    got = coding_prompt(NOTE, "icd9", hints=["276.2", "584.9"], describe=lambda c, s: describe(c))
    hint = _hint_head("9") + "- 276.2 (Acidosis)\n- 584.9\n" + MINI_EXAMPLE
    assert got == f"{INSTRUCTION9}\n\nDischarge summary:\n{NOTE}\n\n{hint}\n\n{FORMAT9}"
    assert got.index(NOTE) < got.index("Training hint:") < got.index("Output format:")
    assert coding_prompt(NOTE, "icd9", hints=[]) == coding_prompt(NOTE, "icd9")
