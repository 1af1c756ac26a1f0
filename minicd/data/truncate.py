"""Tiered middle-out truncation of long discharge summaries (paper Appendix F, "Long-note
truncation"; REFERENCE.md section 1 "Long notes").

Section rule (lower-cased MIMIC text; matching is case-insensitive anyway):

* A *header* is the text ``name:`` where ``name`` starts a line (after optional spaces/tabs),
  begins with a letter, has at most 6 words / 60 characters of letters, digits, spaces and
  ``/ & ( ) , ' + -``, and the colon is not followed by a digit (so ``at 10:30`` is not a header).
  Both ``name:`` alone on its line and ``name: text`` qualify; the header is only the ``name:``
  part, the rest of the line is body text.
* *Major* headers are the known MIMIC section names (:data:`MAJOR_SECTIONS`: chief complaint,
  history of present illness, brief hospital course, discharge diagnosis/diagnoses, discharge
  medications, ...). Multi-word known names are also found mid-line, so notes flattened to one
  line still get their structure. Other line-start headers are *minor* (``primary:``,
  ``cardiac:``, ``heent:``): sub-headings inside a section.
* A major section's *block* runs from its header to the next major header (minor headers
  inside belong to it). The hospital course is every major section whose name contains
  "hospital course"; the discharge-diagnoses block every one named ``discharge|final
  diagnosis|diagnoses|dx``.

Tiers of :func:`truncate_note` (each tier is used only if the previous one cannot fit):

0. The note fits the budget: returned unchanged.
1. Only the hospital-course body is cut middle-out: its first half and last half of the tokens
   the budget allows are kept, with ``marker`` between. Everything else is untouched.
2. The hospital-course body is replaced by ``marker`` and the rest of the note is cut middle-out
   (one global head/tail over all remaining body text), keeping every header and the whole
   discharge-diagnoses block; each body that loses text shows ``marker`` where it was cut.
3. Fallback when headers + diagnoses block + markers alone exceed the budget: hard middle-out cut
   of the whole note (first/last tokens with one marker); if even the marker does not fit, the
   longest token prefix that fits.

The result always fits: every candidate is measured with ``len(tokenizer.encode(text))``
(marker included) and the kept amount is searched, so BPE merges at cut points cannot push it
over. Cuts are made on token boundaries with ``tokenizer.decode``; untouched text is copied as is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

from minicd.errors import ConfigError

DEFAULT_MARKER = "\n[...]\n"


class TextTokenizer(Protocol):
    """Anything with ``encode(text) -> list[int]`` and ``decode(ids) -> str``."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


MAJOR_SECTIONS: tuple[str, ...] = (
    "admission date", "discharge date", "date of birth", "sex", "service", "allergies",
    "attending", "chief complaint", "major surgical or invasive procedure",
    "history of present illness", "past medical history", "past surgical history",
    "social history", "family history", "review of systems", "physical exam",
    "physical examination", "admission exam", "admission physical exam", "discharge exam",
    "discharge physical exam", "pertinent results", "brief hospital course", "hospital course",
    "transitional issues", "medications on admission", "discharge medications",
    "discharge disposition", "facility", "discharge diagnosis", "discharge diagnoses",
    "final diagnosis", "final diagnoses", "discharge dx", "discharge condition",
    "discharge instructions", "followup instructions", "follow-up instructions",
    "follow up instructions", "completed by",
)
HOSPITAL_COURSE_RE = re.compile(r"hospital course")
DIAGNOSES_RE = re.compile(r"^(discharge|final)\s+(diagnos[ie]s|dx)$")

_LINE_HEADER = re.compile(
    r"^[ \t]*(?P<name>[a-z][a-z0-9 \t/&(),'+\-]{0,59}?)[ \t]*:(?!\d)", re.IGNORECASE | re.MULTILINE
)
_INLINE_NAMES = sorted((n for n in MAJOR_SECTIONS if " " in n), key=len, reverse=True)
_INLINE_HEADER = re.compile(
    r"(?<![a-z0-9])(?P<name>" + "|".join(r"\s+".join(map(re.escape, n.split())) for n in _INLINE_NAMES)
    + r")[ \t]*:(?!\d)",
    re.IGNORECASE,
)
_MAX_HEADER_WORDS = 6


@dataclass(frozen=True)
class Header:
    """A section header ``note[start:end]`` (ends with the colon); ``name`` normalised."""

    start: int
    end: int
    name: str
    major: bool


def _norm(name: str) -> str:
    return " ".join(name.lower().split())


def _is_major(name: str) -> bool:
    return name in MAJOR_SECTIONS or bool(HOSPITAL_COURSE_RE.search(name) or DIAGNOSES_RE.match(name))


def find_headers(note: str) -> list[Header]:
    """All section headers of ``note`` in order, non-overlapping (see the module docstring)."""
    cands: list[Header] = []
    for m in _LINE_HEADER.finditer(note):
        name = _norm(m.group("name"))
        if name and len(name.split()) <= _MAX_HEADER_WORDS:
            cands.append(Header(m.start("name"), m.end(), name, _is_major(name)))
    for m in _INLINE_HEADER.finditer(note):
        cands.append(Header(m.start("name"), m.end(), _norm(m.group("name")), True))
    cands.sort(key=lambda h: (h.start, -h.end))
    out: list[Header] = []
    for h in cands:
        if not out or h.start >= out[-1].end:
            out.append(h)
    return out


def _blocks(note: str, headers: list[Header]) -> list[tuple[Header, int]]:
    """(major header, end of its block) for every major header."""
    majors = [h for h in headers if h.major]
    return [(h, majors[i + 1].start if i + 1 < len(majors) else len(note)) for i, h in enumerate(majors)]


def hospital_course_spans(note: str, headers: list[Header] | None = None) -> list[tuple[int, int]]:
    """Character spans of the hospital-course bodies (after the header, up to the next major)."""
    headers = find_headers(note) if headers is None else headers
    return [(h.end, end) for h, end in _blocks(note, headers) if HOSPITAL_COURSE_RE.search(h.name)]


def diagnoses_spans(note: str, headers: list[Header] | None = None) -> list[tuple[int, int]]:
    """Character spans of the discharge-diagnoses blocks (header included)."""
    headers = find_headers(note) if headers is None else headers
    return [(h.start, end) for h, end in _blocks(note, headers) if DIAGNOSES_RE.match(h.name)]


# A piece of the note: (text, cuttable). Fixed pieces are copied verbatim.
Piece = tuple[str, bool]


def _segment(note: str, spans: list[tuple[int, int, str]], rest: str) -> list[tuple[str, str]]:
    """Label the characters of ``note``: the first span (start, end, label) of ``spans`` that
    covers a character wins, else ``rest``. Returns merged (text, label) runs."""
    bounds = sorted({0, len(note), *(s for s, _, _ in spans), *(e for _, e, _ in spans)})
    runs: list[tuple[str, str]] = []
    for a, b in zip(bounds, bounds[1:]):
        label = next((lab for s, e, lab in spans if s <= a and b <= e), rest)
        if runs and runs[-1][1] == label:
            runs[-1] = (runs[-1][0] + note[a:b], label)
        else:
            runs.append((note[a:b], label))
    return runs


class _MiddleOut:
    """Render ``pieces`` keeping ``keep`` tokens of the cuttable text: the first ceil(keep/2) and
    the last floor(keep/2) over the concatenated cuttable tokens, marker where text was cut."""

    def __init__(self, pieces: list[Piece], tokenizer: TextTokenizer, marker: str) -> None:
        self.pieces = pieces
        self.tok = tokenizer
        self.marker = marker
        self.ids = [tokenizer.encode(t) if cut else None for t, cut in pieces]
        self.total = sum(len(i) for i in self.ids if i is not None)

    def render(self, keep: int) -> str:
        head = (keep + 1) // 2
        cut_from, cut_to = head, self.total - (keep - head)  # removed global range
        out: list[str] = []
        pos = 0
        for (text, cut), ids in zip(self.pieces, self.ids):
            if ids is None:
                out.append(text)
                continue
            n = len(ids)
            p = min(max(cut_from - pos, 0), n)
            s = min(max(cut_to - pos, 0), n)
            pos += n
            if p >= s:
                out.append(text)
            else:
                pre = self.tok.decode(ids[:p]) if p > 0 else ""
                suf = self.tok.decode(ids[s:]) if s < n else ""
                out.append(pre + self.marker + suf)
        return "".join(out)


def _count(tokenizer: TextTokenizer, text: str) -> int:
    return len(tokenizer.encode(text)) if text else 0


def _largest_fit(render: Callable[[int], str], total: int, budget: int, tokenizer: TextTokenizer,
                 guess: int) -> str:
    """Largest ``keep`` in [0, total] whose render fits (render(0) must fit), searched by
    galloping from ``guess`` (up if it fits, down if not) then bisecting; token counts need not
    be additive. Returns that render."""
    fits = lambda k: _count(tokenizer, render(k)) <= budget  # noqa: E731
    guess = min(max(guess, 0), total)
    step = 1
    if fits(guess):  # invariant below: fits(lo), not fits(hi); hi = total + 1 means "none"
        lo, hi = guess, total + 1
        while lo < total:
            c = min(total, lo + step)
            if not fits(c):
                hi = c
                break
            lo, step = c, step * 2
    else:
        lo, hi = 0, guess
        while hi > 0:
            c = max(0, hi - step)
            if c == 0 or fits(c):
                lo = c
                break
            hi, step = c, step * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return render(lo)


def _try_tier(pieces: list[Piece], budget: int, tokenizer: TextTokenizer, marker: str) -> str | None:
    mo = _MiddleOut(pieces, tokenizer, marker)
    if mo.total == 0:
        return None
    base = _count(tokenizer, mo.render(0))
    if base > budget:
        return None
    return _largest_fit(mo.render, mo.total, budget, tokenizer, budget - base)


def truncate_note(note: str, budget_tokens: int, tokenizer: TextTokenizer, marker: str = DEFAULT_MARKER) -> str:
    """Fit ``note`` into ``budget_tokens`` tokens with the tiered middle-out scheme (Appendix F).

    Returns ``note`` unchanged when it fits; otherwise tier 1 (hospital course only), tier 2
    (headers + discharge-diagnoses block kept, rest middle-out) or tier 3 (hard middle-out), as
    described in the module docstring. ``len(tokenizer.encode(result)) <= budget_tokens`` always.
    """
    if budget_tokens < 0:
        raise ConfigError(f"note token budget is negative ({budget_tokens}); raise data.max_prompt_tokens")
    if _count(tokenizer, note) <= budget_tokens:
        return note
    headers = find_headers(note)
    hc = [(s, e) for s, e in hospital_course_spans(note, headers) if note[s:e].strip()]
    # Tier 1: only the hospital-course bodies are cuttable.
    if hc:
        runs = _segment(note, [(s, e, "cut") for s, e in hc], "keep")
        out = _try_tier([(t, lab == "cut") for t, lab in runs], budget_tokens, tokenizer, marker)
        if out is not None:
            return out
    # Tier 2: hospital course -> marker; headers and diagnoses blocks fixed; other bodies cut.
    spans = [(s, e, "drop") for s, e in hc]
    spans += [(s, e, "keep") for s, e in diagnoses_spans(note, headers)]
    spans += [(h.start, h.end, "keep") for h in headers]
    runs = _segment(note, spans, "cut")
    # whitespace-only bodies (between two headers) are kept: a marker there would cut nothing
    pieces = [(marker if lab == "drop" else t, lab == "cut" and bool(t.strip())) for t, lab in runs]
    out = _try_tier(pieces, budget_tokens, tokenizer, marker)
    if out is not None:
        return out
    # Tier 3: hard middle-out over the whole note.
    out = _try_tier([(note, True)], budget_tokens, tokenizer, marker)
    if out is not None:
        return out
    ids = tokenizer.encode(note)
    for n in range(min(budget_tokens, len(ids)), 0, -1):
        text = tokenizer.decode(ids[:n])
        if _count(tokenizer, text) <= budget_tokens:
            return text
    return ""


def fit_prompt(build: Callable[[str], str], note: str, max_prompt_tokens: int, tokenizer: TextTokenizer,
               marker: str = DEFAULT_MARKER) -> str:
    """``build(truncated note)`` that fits ``max_prompt_tokens`` tokens.

    ``build(note)`` itself is returned when it fits. Otherwise the note budget is
    ``max_prompt_tokens`` minus the tokens of ``build("")`` (the template overhead: prefix and
    suffix are never cut). If BPE merges across the note boundary still push
    the prompt over, the budget is lowered by the excess and the note truncated again.
    """
    prompt = build(note)
    if _count(tokenizer, prompt) <= max_prompt_tokens:
        return prompt
    overhead = _count(tokenizer, build(""))
    budget = max_prompt_tokens - overhead
    if budget < 0:
        raise ConfigError(
            f"the prompt without a note already takes {overhead} tokens > max_prompt_tokens="
            f"{max_prompt_tokens}; raise data.max_prompt_tokens"
        )
    while True:
        prompt = build(truncate_note(note, budget, tokenizer, marker))
        excess = _count(tokenizer, prompt) - max_prompt_tokens
        if excess <= 0:
            return prompt
        if budget == 0:
            return build("")
        budget = max(0, budget - excess)
