"""Tiered middle-out truncation: always fits, keeps structure when feasible, no-op when short."""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minicd.data.truncate import (
    DEFAULT_MARKER,
    diagnoses_spans,
    find_headers,
    fit_prompt,
    hospital_course_spans,
    truncate_note,
)
from minicd.errors import ConfigError
from minicd.prompts import coding_prompt

MARKER = DEFAULT_MARKER


class RegexTok:
    """Lossless toy tokenizer: whitespace runs, words and single symbols; vocabulary grows."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}
        self.inv: list[str] = []

    def encode(self, text: str) -> list[int]:
        out = []
        for piece in re.findall(r"\s+|\w+|[^\w\s]", text):
            if piece not in self.vocab:
                self.vocab[piece] = len(self.inv)
                self.inv.append(piece)
            out.append(self.vocab[piece])
        return out

    def decode(self, ids) -> str:
        return "".join(self.inv[i] for i in ids)


class CharTok:
    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids) -> str:
        return "".join(chr(i) for i in ids)


WORDS = ["the", "pt", "was", "given", "aspirin", "81", "mg", "at", "10:30", "{x}", "(", ")", ".",
         ",", "\n", "\n\n", "noted", "to", "have", "é", "[**2101-1-1**]", "no", "pain", "bid"]
HEADERS = ["chief complaint", "history of present illness", "brief hospital course",
           "discharge diagnosis", "discharge diagnoses", "discharge medications",
           "past medical history", "primary", "cardiac", "pertinent results", "service"]


def _bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    corpus = [" ".join(WORDS + HEADERS)] * 20 + [coding_prompt("x", "icd9")] * 5
    tok.train_from_iterator(corpus, trainer)

    class BPE:
        def encode(self, text: str) -> list[int]:
            return tok.encode(text).ids

        def decode(self, ids) -> str:
            return tok.decode(list(ids))

    return BPE()


BPE_TOK = _bpe()
TOKENIZERS = {"regex": RegexTok(), "char": CharTok(), "bpe": BPE_TOK}


def count(tok, text: str) -> int:
    return len(tok.encode(text))


def build_note(sections: list[tuple[str, str]]) -> str:
    return "".join(h + b for h, b in sections)


SECTIONS = [
    ("admission date:", "  [**2101-1-1**]\n"),
    ("chief complaint:", "\nchest pain\n"),
    ("history of present illness:", "\n" + "pt noted to have pain at rest , given aspirin . " * 20 + "\n"),
    ("past medical history:", "\n" + "htn , dm , cad s/p cabg . " * 15 + "\n"),
    ("brief hospital course:", "\n" + "heparin drip started and titrated overnight . " * 30
     + "\ncardiac: " + "troponin trended down . " * 10 + "\n"),
    ("discharge medications:", "\n" + "1. aspirin 81 mg daily\n" * 10),
    ("discharge diagnosis:", "\nprimary:\nnstemi\nsecondary:\nhypertension\n"),
    ("discharge condition:", "\nstable , ambulating\n"),
    ("followup instructions:", "\n" + "see cardiology in 2 weeks . " * 8 + "\n"),
]
NOTE = build_note(SECTIONS)


# --- section parsing ---------------------------------------------------------------------------

def test_find_headers_rule():
    note = ("admission date:  [**2101-1-1**]\nchief complaint:\nchest pain\n"
            "history of present illness: 60 yo man\nat 10:30 he was seen\n1. aspirin: daily\n"
            "brief hospital course:\ncardiac: ok\ndischarge diagnosis:\nprimary:\nnstemi\n"
            "discharge condition:\nstable\n")
    got = [(h.name, h.major, note[h.start:h.end]) for h in find_headers(note)]
    assert got == [
        ("admission date", True, "admission date:"),
        ("chief complaint", True, "chief complaint:"),
        ("history of present illness", True, "history of present illness:"),
        ("brief hospital course", True, "brief hospital course:"),
        ("cardiac", False, "cardiac:"),
        ("discharge diagnosis", True, "discharge diagnosis:"),
        ("primary", False, "primary:"),
        ("discharge condition", True, "discharge condition:"),
    ]
    # blocks run to the next major header, over minor sub-headers
    hc0 = note.index("brief hospital course:") + len("brief hospital course:")
    assert hospital_course_spans(note) == [(hc0, note.index("discharge diagnosis:"))]
    assert diagnoses_spans(note) == [(note.index("discharge diagnosis:"), note.index("discharge condition:"))]


def test_find_headers_in_flattened_note():
    note = ("chief complaint: chest pain history of present illness: pain brief  hospital course: "
            "heparin at 10:30 discharge diagnosis: nstemi")
    assert [h.name for h in find_headers(note)] == [
        "chief complaint", "history of present illness", "brief hospital course", "discharge diagnosis"]
    assert diagnoses_spans(note) == [(note.index("discharge diagnosis:"), len(note))]


# --- tiers ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_noop_when_note_fits(name):
    tok = TOKENIZERS[name]
    n = count(tok, NOTE)
    assert truncate_note(NOTE, n, tok) == NOTE
    assert truncate_note(NOTE, n + 100, tok) == NOTE
    assert truncate_note("", 0, tok) == ""


def test_tier1_only_touches_hospital_course():
    tok = RegexTok()
    hc_start = NOTE.index("brief hospital course:") + len("brief hospital course:")
    hc_end = NOTE.index("discharge medications:")
    budget = count(tok, NOTE) - 60
    out = truncate_note(NOTE, budget, tok)
    assert budget - 1 <= count(tok, out) <= budget  # uses what the budget allows
    assert out.startswith(NOTE[:hc_start]) and out.endswith(NOTE[hc_end:])
    middle = out[hc_start: len(out) - (len(NOTE) - hc_end)]
    head, tail = middle.split(MARKER)
    body = NOTE[hc_start:hc_end]
    assert body.startswith(head) and body.endswith(tail)
    assert abs(count(tok, head) - count(tok, tail)) <= 1  # first half and last half
    # 60 tokens too many: at least 60 + marker tokens cut (the marker's "\n" may merge with a space)
    assert count(tok, body) - 60 - count(tok, MARKER) <= count(tok, head) + count(tok, tail) <= count(tok, body) - 60


def _skeleton(sections) -> str:
    """Tier-2 floor by hand: headers, the whole diagnoses block, a marker for every other body."""
    return "".join(h + (b if h == "discharge diagnosis:" or not b.strip() else MARKER) for h, b in sections)


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_tier2_keeps_headers_and_diagnoses_block(name):
    tok = TOKENIZERS[name]
    no_hc = build_note([(h, MARKER if h == "brief hospital course:" else b) for h, b in SECTIONS])
    budget = count(tok, _skeleton(SECTIONS)) + 40
    assert budget < count(tok, no_hc)  # tier 1 alone cannot fit
    out = truncate_note(NOTE, budget, tok)
    assert count(tok, out) <= budget
    pos = 0
    for header, _ in SECTIONS:  # every header, in order
        pos = out.index(header, pos) + len(header)
    diag = "discharge diagnosis:\nprimary:\nnstemi\nsecondary:\nhypertension\n"
    assert diag in out
    assert "heparin" not in out and "troponin" not in out  # the hospital course went first
    # >= 40 body tokens kept, the first half of them from the start of the note
    assert out.startswith("admission date:  [**2101-1-1**]\nchief complaint:\nch")


@pytest.mark.parametrize("name", ["regex", "char"])
def test_fallback_hard_middle_out(name):
    tok = TOKENIZERS[name]
    budget = count(tok, _skeleton(SECTIONS)) - 5
    out = truncate_note(NOTE, budget, tok)
    assert count(tok, out) <= budget
    head, tail = out.split(MARKER)
    assert NOTE.startswith(head) and NOTE.endswith(tail)
    assert abs(count(tok, head) - count(tok, tail)) <= 1


def test_budget_below_marker_and_negative():
    tok = RegexTok()
    out = truncate_note(NOTE, 2, tok)
    assert out == "admission "  # the longest token prefix that fits: "admission", " "
    assert truncate_note(NOTE, 0, tok) == ""
    with pytest.raises(ConfigError):
        truncate_note(NOTE, -1, tok)


# --- property: always fits ---------------------------------------------------------------------

section = st.tuples(
    st.sampled_from(HEADERS),
    st.sampled_from([":\n", ": ", ":"]),
    st.lists(st.sampled_from(WORDS), max_size=40).map(" ".join),
)
notes = st.lists(section, max_size=8).map(lambda ss: "\n".join(h + sep + b for h, sep, b in ss))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(note=notes, frac=st.floats(0.0, 1.2), name=st.sampled_from(sorted(TOKENIZERS)))
def test_always_fits_budget(note, frac, name):
    tok = TOKENIZERS[name]
    n = count(tok, note)
    budget = int(frac * n)
    out = truncate_note(note, budget, tok)
    assert count(tok, out) <= budget
    if n <= budget:
        assert out == note


@settings(max_examples=40, deadline=None)
@given(note=st.text(max_size=300), budget=st.integers(0, 200))
def test_always_fits_arbitrary_text(note, budget):
    tok = CharTok()
    out = truncate_note(note, budget, tok)
    assert len(out) <= budget
    if len(note) <= budget:
        assert out == note


# --- fit_prompt ---------------------------------------------------------------------------------

def test_fit_prompt_keeps_template_and_fits():
    tok = BPE_TOK
    build = lambda n: coding_prompt(n, "icd9", hints=["401.9"], describe=lambda c, s: "hypertension")  # noqa: E731
    empty = build("")
    prefix, suffix = empty.split("Discharge summary:\n")
    prefix += "Discharge summary:\n"
    full = build(NOTE)
    assert fit_prompt(build, NOTE, count(tok, full), tok) == full  # fits: untouched
    for max_tokens in (count(tok, full) - 1, count(tok, empty) + 150, count(tok, empty) + 3, count(tok, empty)):
        out = fit_prompt(build, NOTE, max_tokens, tok)
        assert count(tok, out) <= max_tokens
        assert out.startswith(prefix) and out.endswith(suffix)
    with pytest.raises(ConfigError, match="max_prompt_tokens"):
        fit_prompt(build, NOTE, count(tok, empty) - 1, tok)


@settings(max_examples=30, deadline=None)
@given(note=notes, extra=st.integers(0, 300))
def test_fit_prompt_always_fits(note, extra):
    tok = BPE_TOK
    build = lambda n: coding_prompt(n, "icd10")  # noqa: E731
    max_tokens = count(tok, build("")) + extra
    out = fit_prompt(build, note, max_tokens, tok)
    assert count(tok, out) <= max_tokens
