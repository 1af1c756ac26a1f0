"""The reward family of the GRPO / PHI stages: ``(response text, gold codes, context) ->
(reward, parsed codes)``.

- :func:`reward`: the paper's sample F1 (Sec. 4.2) of the codes parsed from the response's
  ``<code>`` span against the FULL gold set, 0 with no span; ``beta`` != 1 gives sample F-beta
  (Sec. 6 asks for recall-oriented rewards).
- :func:`weighted_f1_reward`: class-balanced F1 (:func:`weighted_f1`, each code weighted
  1 / sqrt(its training frequency)), so a missed rare code costs more than a missed head code.
- :func:`release_f1_reward`: the paper's public release's scoring, NOT the paper's: a response
  with no ``<code>`` span is scored on ICD-shaped tokens found anywhere in its text
  (:func:`release_codes`), and an empty prediction of an empty gold set scores 1.
- :func:`missed_bonus`: + lambda per gold code the record's previous hint-free prediction missed
  (its PHI pool, paper Eq. 3/4) that the response now predicts.

Rewards read what they need beyond (text, gold) from a :class:`RewardContext` (training code
frequencies, the record's pool) that the stage loop builds, never from globals.
:func:`make_reward` turns a ``grpo.reward`` spec (parsed by ``minicd.config.parse_reward_spec``)
into one function. Pure functions: no I/O, no state.
"""

from __future__ import annotations

import functools
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Callable

from minicd.config import parse_reward_spec
from minicd.metrics import fbeta
from minicd.parse import ParsedCodes, parse_codes


@dataclass(frozen=True)
class RewardContext:
    """What a reward may know beyond the response and its gold set."""

    freq: Mapping[str, int] = field(default_factory=dict)  # code -> training records holding it
    pool: frozenset[str] = frozenset()  # the record's PHI pool: gold codes its previous
                                        #   hint-free prediction missed (empty outside PHI)


NO_CONTEXT = RewardContext()
# (response text, gold codes, context) -> (reward, parsed codes)
RewardFn = Callable[[str, Sequence[str], RewardContext], "tuple[float, ParsedCodes]"]


def code_frequencies(golds: Iterable[Sequence[str]]) -> dict[str, int]:
    """Training frequency of each code: the number of gold sets (records) that hold it."""
    return dict(Counter(c for gold in golds for c in set(gold)))


# ------------------------------------------------------------------ the paper's reward
def reward(text: str, gold: Sequence[str], ctx: RewardContext = NO_CONTEXT, *,
           beta: float = 1.0) -> tuple[float, ParsedCodes]:
    """The paper's reward (Sec. 4.2): sample F1 (or F-beta with ``beta``) of the codes parsed
    from ``text``'s ``<code>`` span against the FULL gold set; 0 with no span."""
    parsed = parse_codes(text)
    return (fbeta(parsed.codes, gold, beta) if parsed.has_span else 0.0), parsed


# ------------------------------------------------------------------ class-balanced F1
def weighted_f1(pred: Iterable[str], gold: Iterable[str], weights: Mapping[str, float],
                default_weight: float = 1.0) -> float:
    """Class-balanced sample F1: F1 = 2 TP / (2 TP + FP + FN) where TP, FP and FN sum the weights
    w_c of the true-positive, false-positive and missed codes (``weights[c]``, or
    ``default_weight`` for a code without one). With every w_c = 1 this is the sample F1.
    0 when nothing is predicted or nothing is gold (as :func:`minicd.metrics.fbeta`)."""
    p, g = set(pred), set(gold)

    def mass(codes: set[str]) -> float:
        return sum(weights.get(c, default_weight) for c in codes)

    tp, fp, fn = mass(p & g), mass(p - g), mass(g - p)
    den = 2.0 * tp + fp + fn
    return 2.0 * tp / den if tp > 0 and den > 0 else 0.0


def class_weights(codes: Iterable[str], freq: Mapping[str, int]) -> dict[str, float]:
    """w_c = 1 / sqrt(training frequency of c) for the ``codes`` that have a frequency."""
    return {c: 1.0 / math.sqrt(freq[c]) for c in codes if freq.get(c, 0) > 0}


def weighted_f1_reward(text: str, gold: Sequence[str], ctx: RewardContext = NO_CONTEXT, *,
                       default_weight: float = 1.0) -> tuple[float, ParsedCodes]:
    """:func:`weighted_f1` of the parsed codes with w_c = 1 / sqrt(``ctx.freq[c]``); codes never
    seen in training (mostly false positives) weigh ``default_weight``; 0 with no span."""
    parsed = parse_codes(text)
    if not parsed.has_span:
        return 0.0, parsed
    weights = class_weights(set(parsed.codes) | set(gold), ctx.freq)
    return weighted_f1(parsed.codes, gold, weights, default_weight), parsed


# ------------------------------------------------------------------ the release's fallback
# ICD-shaped tokens the paper's public release scans a span-less response for (facts from
# AlexandreWANG915/LLM4ICD EasyR1/examples/reward_function/icd.py): each pattern is matched
# on its own, as whole words, case-sensitively; the union is the prediction.
_ICD_SHAPED = tuple(re.compile(rf"\b({p})\b") for p in (
    r"\d{2,3}\.\d{1,2}",                    # ICD-9 with a dot: 038.9, 96.6
    r"[VE]\d{2,3}(?:\.\d{1,2})?",           # ICD-9 V / E codes: V58.61, E910.9
    r"[A-TV-Z]\d{2}\.\d{1,4}[A-Z0-9]*",     # ICD-10-CM with a dot: J45.909
    r"[A-TV-Z]\d{2}\.?",                    # ICD-10-CM category: I10
    r"\d[A-Z0-9]{6}",                       # ICD-10-PCS: 02HV33Z
))
_REASONING_CLOSE = ("</reasoning>", "</think>")  # the release skips past the last one it finds


def release_codes(text: str) -> ParsedCodes:
    """The codes the paper's public release reads from a response (its behaviour, not the
    paper's): the ``<code>`` span as :func:`minicd.parse.parse_codes` reads it when there is
    one; otherwise every ICD-shaped token (``_ICD_SHAPED``) in the text after the last closing
    reasoning tag, upper-cased, unchecked against any code list (``has_span`` stays False).
    The patterns overlap as the release's do: "V58.61" also yields the category "V58." (with
    its dot, so it never matches a gold code: one more false positive)."""
    parsed = parse_codes(text)
    if parsed.has_span:
        return parsed
    for tag in _REASONING_CLOSE:
        at = text.rfind(tag)
        if at != -1:
            text = text[at:]
            break
    found: dict[str, None] = {}
    for pattern in _ICD_SHAPED:
        for token in pattern.findall(text):
            found.setdefault(token.upper(), None)  # as the release: no dot stripped, so the
    return ParsedCodes(tuple(found), False)        # category pattern's "V58." is its own code


def release_f1_reward(text: str, gold: Sequence[str], ctx: RewardContext = NO_CONTEXT
                      ) -> tuple[float, ParsedCodes]:
    """The release's sample F1 (not the paper's): codes from :func:`release_codes` (a span-less
    response is scored on the ICD-shaped tokens in its text instead of 0), and an empty
    prediction of an empty gold set scores 1.0 (the paper: 0)."""
    parsed = release_codes(text)
    if not parsed.codes and not gold:
        return 1.0, parsed
    return fbeta(parsed.codes, gold, 1.0), parsed


# ------------------------------------------------------------------ missed-code bonus
def missed_bonus(pred: Iterable[str], gold: Iterable[str], pool: Iterable[str],
                 lam: float) -> float:
    """lam x (number of gold codes in the record's pool, the codes its previous hint-free
    prediction missed, that ``pred`` now predicts)."""
    return lam * len(set(pred) & set(pool) & set(gold))


# ------------------------------------------------------------------ spec -> function
def make_reward(spec: str) -> RewardFn:
    """The reward named by ``grpo.reward``, as ``(text, gold, ctx=NO_CONTEXT) -> (reward, parsed
    codes)``:

    - ``"f1"``: the paper's sample F1 (:func:`reward`);
    - ``"fbeta:<beta>"``: sample F-beta (beta > 1 weighs recall more, < 1 precision);
    - ``"weighted_f1"`` / ``"weighted_f1:<default_weight>"``: class-balanced F1
      (:func:`weighted_f1_reward`; codes without a training frequency weigh default_weight, 1);
    - ``"f1_release"``: the public release's F1 with its span-less fallback
      (:func:`release_f1_reward`; the release's behaviour, not the paper's);
    - ``"package.module:function"``: a user function ``(response_text, gold_codes) -> float``,
      imported once here. Its value is the reward as is; the parsed codes still feed the batch
      statistics (span rate, batch micro-F1);
    - any of these followed by ``"+missed:<lambda>"``: plus lambda per pool code predicted
      (:func:`missed_bonus`; PHI only, where records have pools).
    """
    parsed_spec = parse_reward_spec(spec)
    kind, arg = parsed_spec.kind, parsed_spec.arg
    if kind == "f1":
        base: RewardFn = reward
    elif kind == "fbeta":
        base = functools.partial(reward, beta=arg)
    elif kind == "weighted_f1":
        base = functools.partial(weighted_f1_reward, default_weight=arg)
    elif kind == "f1_release":
        base = release_f1_reward
    else:
        base = _user_reward(spec, arg)
    lam = parsed_spec.missed
    if not lam:
        return base

    def with_bonus(text: str, gold: Sequence[str], ctx: RewardContext = NO_CONTEXT
                   ) -> tuple[float, ParsedCodes]:
        value, parsed = base(text, gold, ctx)
        return value + missed_bonus(parsed.codes, gold, ctx.pool, lam), parsed

    return with_bonus


def _user_reward(spec: str, fn: Callable[[str, tuple[str, ...]], float]) -> RewardFn:
    def user_reward(text: str, gold: Sequence[str], ctx: RewardContext = NO_CONTEXT
                    ) -> tuple[float, ParsedCodes]:
        value = fn(text, tuple(gold))
        try:
            value = float(value)
        except (TypeError, ValueError):
            value = float("nan")
        if not math.isfinite(value):
            raise ValueError(f"grpo.reward {spec!r} returned {value!r}; a reward must be a "
                             f"finite number")
        return value, parse_codes(text)

    return user_reward
