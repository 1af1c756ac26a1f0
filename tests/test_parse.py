"""Tests for minicd.parse: the single response parser."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minicd.parse import ParsedCodes, format_answer, parse_codes


def test_simple_span():
    p = parse_codes("<code>401.9, 428.0, E11.9</code>")
    assert p == ParsedCodes(("401.9", "428.0", "E11.9"), True, (), ())


def test_no_span():
    for text in ["", "401.9, 428.0", "<code>401.9, 428.0", "401.9</code>", "<code></cod>"]:
        p = parse_codes(text)
        assert p.has_span is False
        assert p.codes == () and p.malformed == () and p.off_label == ()


def test_empty_span():
    p = parse_codes("The answer: <code></code>")
    assert p.has_span is True and p.codes == ()
    assert parse_codes("<code> , ;\n </code>") == ParsedCodes((), True, (), ())


def test_surrounding_text_and_case_insensitive_tags():
    p = parse_codes("Sure! Codes:\n<CODE>401.9</Code> hope this helps")
    assert p.codes == ("401.9",)
    assert parse_codes("< code >401.9</ code >").codes == ("401.9",)


def test_first_complete_span_wins():
    assert parse_codes("<code>401.9</code> and later <code>428.0</code>").codes == ("401.9",)


def test_unclosed_span_then_complete_span():
    # "<code>A <code>B</code>": the complete span is the innermost one
    assert parse_codes("<code>401.9 <code>428.0</code>").codes == ("428.0",)
    # an orphan closing tag before the first span is ignored
    assert parse_codes("</code> <code>428.0</code>").codes == ("428.0",)


def test_think_block_skipped():
    text = "<think>Maybe <code>999.9</code>?</think>\n<code>401.9</code>"
    assert parse_codes(text).codes == ("401.9",)
    text = "<THINK>hmm</THINK><code>401.9</code>"
    assert parse_codes(text).codes == ("401.9",)


def test_unclosed_think_hides_the_rest():
    p = parse_codes("<think>I think <code>401.9</code> fits")
    assert p.has_span is False and p.codes == ()
    # a span before the unclosed think block still counts
    assert parse_codes("<code>428.0</code><think>and <code>401.9</code>").codes == ("428.0",)


def test_orphan_think_close_hides_what_came_before():
    # templates that put "<think>" in the prompt: the response starts inside the reasoning
    assert parse_codes("reasoning <code>999.9</code></think><code>401.9</code>").codes == (
        "401.9",
    )


def test_multiple_think_blocks():
    text = "<think>a</think><think><code>1.0</code></think> <code>401.9, 38.93</code>"
    assert parse_codes(text).codes == ("401.9", "38.93")


def test_separators_spaces_trailing_dots_case_duplicates():
    text = "<code> 401.9,428.0 ;e11.9\n i10. \r\n V58.61 , 401.9, I10 ,, </code>"
    p = parse_codes(text)
    assert p.codes == ("401.9", "428.0", "E11.9", "I10", "V58.61")
    assert p.malformed == () and p.off_label == ()


def test_malformed_tokens():
    text = "<code>401.9, hypertension, 4019, 401.9 (HTN), 401.9, hypertension</code>"
    p = parse_codes(text)
    assert p.codes == ("401.9",)
    assert p.malformed == ("hypertension", "4019", "401.9 (HTN)")
    assert p.has_span


def test_system_restriction():
    text = "<code>401.9, E11.9, 38.93, 02HV33Z</code>"
    p9 = parse_codes(text, system="icd9")
    assert p9.codes == ("401.9", "38.93")
    assert p9.malformed == ("E11.9", "02HV33Z")
    p10 = parse_codes(text, system="icd10")
    assert p10.codes == ("E11.9", "02HV33Z")
    assert p10.malformed == ("401.9", "38.93")
    assert parse_codes(text).codes == ("401.9", "E11.9", "38.93", "02HV33Z")


def test_label_space_off_label():
    text = "<code>401.9, 428.0, 250.00, foo, 428.0, 250.00</code>"
    p = parse_codes(text, label_space={"401.9", "428.0"})
    assert p.codes == ("401.9", "428.0")
    assert p.off_label == ("250.00",)
    assert p.malformed == ("foo",)
    # any iterable works as the label space
    assert parse_codes(text, label_space=["428.0"]) == ParsedCodes(
        ("428.0",), True, ("foo",), ("401.9", "250.00")
    )
    # an empty label space makes every valid code off-label
    assert parse_codes(text, label_space=frozenset()).codes == ()


def test_parsed_codes_frozen():
    p = parse_codes("<code>401.9</code>")
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.codes = ()  # type: ignore[misc]


def test_non_string_input_does_not_raise():
    assert parse_codes(None) == ParsedCodes()  # type: ignore[arg-type]


def test_format_answer():
    assert format_answer(["401.9", "428.0"]) == "<code>401.9, 428.0</code>"
    assert format_answer([]) == "<code></code>"
    assert parse_codes(format_answer([])).has_span


# --- property tests --------------------------------------------------------------------------

DIGIT = st.sampled_from("0123456789")
ALNUM = st.sampled_from("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ")
PCS = st.sampled_from("0123456789ABCDEFGHJKLMNPQRSTUVWXYZ")


def _join(*parts):
    return st.tuples(*parts).map("".join)


def _digits(n):
    return st.text(DIGIT, min_size=n, max_size=n)


def _dot_suffix(alphabet, lo, hi):
    suffix = st.text(alphabet, min_size=lo, max_size=hi).map(lambda s: "." + s)
    return st.one_of(st.just(""), suffix)


ICD9_DX = st.one_of(
    _join(_digits(3), _dot_suffix(DIGIT, 1, 2)),
    _join(st.just("V"), _digits(2), _dot_suffix(DIGIT, 1, 2)),
    _join(st.just("E"), _digits(3), _dot_suffix(DIGIT, 1, 1)),
)
ICD9_PROC = _join(_digits(2), _dot_suffix(DIGIT, 1, 2))
ICD10_CM = _join(
    st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZ"), DIGIT, ALNUM, _dot_suffix(ALNUM, 1, 4)
)
ICD10_PCS = st.text(PCS, min_size=7, max_size=7)


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_never_raises_on_arbitrary_text(text):
    p = parse_codes(text)
    assert isinstance(p, ParsedCodes)
    assert len(set(p.codes)) == len(p.codes)
    if not p.has_span:
        assert p.codes == ()


TAGGY = st.lists(
    st.sampled_from(
        ["<code>", "</code>", "<think>", "</think>", "<CODE>", " ", ",", ";", "\n", "401.9",
         "I10.", "foo", "<", ">", "/", "code", "think", "."]
    ),
    max_size=30,
).map("".join)


@settings(max_examples=200, deadline=None)
@given(TAGGY, st.one_of(st.none(), st.frozensets(st.sampled_from(["401.9", "I10"]))))
def test_never_raises_on_tag_soup(text, label_space):
    p = parse_codes(text, label_space)
    assert set(p.codes).isdisjoint(p.off_label)
    if label_space is not None:
        assert set(p.codes) <= label_space


@pytest.mark.parametrize(
    "system, strategy",
    [("icd9", st.one_of(ICD9_DX, ICD9_PROC)), ("icd10", st.one_of(ICD10_CM, ICD10_PCS))],
)
def test_roundtrip_valid_codes(system, strategy):
    @settings(max_examples=200, deadline=None)
    @given(st.lists(strategy, unique=True, max_size=20))
    def check(codes):
        text = f"<code>{', '.join(codes)}</code>"
        for sys_ in (system, None):
            p = parse_codes(text, system=sys_)
            assert p.codes == tuple(codes)
            assert p.malformed == () and p.off_label == () and p.has_span
        assert parse_codes(format_answer(codes)).codes == tuple(codes)
        # lowercase and trailing dots normalize back to the same codes
        noisy = "<code>" + "; ".join(c.lower() + "." for c in codes) + "</code>"
        assert parse_codes(noisy, system=system).codes == tuple(codes)

    check()


def test_unknown_system_is_an_error():
    with pytest.raises(ValueError):
        parse_codes("<code>401.9</code>", system="icd11")
