"""Model response -> predicted code set: the single parser every method uses.

Rewards (GRPO, PHI), PHI hint pools and evaluation all call :func:`parse_codes`, so every
generative method is scored the same way (paper Sec. 3 and Appendix E).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from minicd.codes import SYSTEMS, code_kind, normalize

__all__ = ["ParsedCodes", "format_answer", "parse_codes"]

# Tags are case-insensitive; whitespace is allowed inside the angle brackets
# ("< code >", "</ code>"), nothing else (no attributes).
_THINK_TAG = re.compile(r"<\s*(/?)\s*think\s*>", re.IGNORECASE)
_CODE_TAG = re.compile(r"<\s*(/?)\s*code\s*>", re.IGNORECASE)
_SEPARATORS = re.compile(r"[,;\r\n]")


@dataclass(frozen=True)
class ParsedCodes:
    """Result of :func:`parse_codes`.

    codes: normalized, unique, well-formed codes in first-seen order (inside the label space
        when one was given) -- the predicted set.
    has_span: whether a complete ``<code>...</code>`` span was found (no span -> reward 0).
    malformed: unique stripped tokens of the span that are not well-formed codes.
    off_label: unique well-formed codes outside the label space (not in ``codes``).
    """

    codes: tuple[str, ...] = ()
    has_span: bool = False
    malformed: tuple[str, ...] = ()
    off_label: tuple[str, ...] = ()


def _strip_reasoning(text: str) -> str:
    """Remove ``<think>...</think>`` blocks. An unclosed ``<think>`` hides everything after it;
    a ``</think>`` with no opening tag (templates that put ``<think>`` in the prompt) hides
    everything before it."""
    kept: list[str] = []
    start = 0  # start of the current visible stretch
    in_think = False
    for m in _THINK_TAG.finditer(text):
        closing = m.group(1) == "/"
        if not closing:
            if not in_think:
                kept.append(text[start : m.start()])
                in_think = True
        elif in_think:
            in_think = False
            start = m.end()
        else:  # orphan closing tag: what came before was reasoning
            kept = []
            start = m.end()
    if not in_think:
        kept.append(text[start:])
    return "".join(kept)


def _first_span(text: str) -> str | None:
    """Content of the first complete ``<code>...</code>`` span (the innermost opening tag before
    the first closing tag that has one), or None."""
    open_end = None
    for m in _CODE_TAG.finditer(text):
        if m.group(1) != "/":
            open_end = m.end()
        elif open_end is not None:
            return text[open_end : m.start()]
    return None


def parse_codes(
    text: str, label_space: Iterable[str] | None = None, *, system: str | None = None
) -> ParsedCodes:
    """Parse a model response into a code set (paper Sec. 3; reward input of Sec. 4.2).

    1. Reasoning is skipped: every ``<think>...</think>`` block is removed; an unclosed
       ``<think>`` means the rest of the text is reasoning.
    2. The FIRST complete ``<code>...</code>`` span of what remains is taken (tags are
       case-insensitive and may contain whitespace inside the brackets, e.g. ``< /code >``).
       This follows the project issue ("first complete span after the think block"); the
       paper's Appendix E says "final" span -- for a response with a single span, as the
       required format asks, both agree.
    3. The span is split on commas, semicolons and newlines; tokens are normalized (strip,
       upper-case, trailing dots dropped); empty tokens are dropped; duplicates are removed in
       first-seen order.
    4. Tokens that are not well-formed dotted codes (of ``system``: "icd9" / "icd10", or of
       any system when None) go to ``malformed``; well-formed codes outside ``label_space``
       (when given) go to ``off_label``; neither is part of ``codes``.

    ``label_space`` holds normalized dotted codes (as produced by ``minicd.codes.format_*``);
    pass a set or frozenset to avoid a copy per call. Never raises on any input text (only on
    an unknown ``system``, a programming error); a response without a complete span gives
    ``has_span=False`` and no codes (reward 0).
    """
    if system is not None and system not in SYSTEMS:
        raise ValueError(f"unknown code system {system!r}; expected one of {SYSTEMS}")
    if not isinstance(text, str):
        text = "" if text is None else str(text)
    span = _first_span(_strip_reasoning(text))
    if span is None:
        return ParsedCodes()
    if label_space is not None and not isinstance(label_space, (set, frozenset)):
        label_space = frozenset(label_space)
    codes: dict[str, None] = {}
    malformed: dict[str, None] = {}
    off_label: dict[str, None] = {}
    for token in _SEPARATORS.split(span):
        code = normalize(token)
        if not code:
            continue
        if code_kind(code, system) is None:
            malformed.setdefault(token.strip(), None)
        elif label_space is not None and code not in label_space:
            off_label.setdefault(code, None)
        else:
            codes.setdefault(code, None)
    return ParsedCodes(tuple(codes), True, tuple(malformed), tuple(off_label))


def format_answer(codes: Iterable[str]) -> str:
    """Serialize codes as the single answer span SFT targets use: ``<code>c1, c2</code>``.

    Codes are written as given (pass normalized dotted codes); ``parse_codes`` inverts it for
    unique well-formed codes."""
    return "<code>" + ", ".join(codes) + "</code>"
