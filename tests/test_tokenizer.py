"""Tests for minicd.model.tokenizer against transformers (reference renders and ids).

The Qwen chat templates are the real strings shipped with the checkpoints (fixtures, see
tests/fixtures/chat_templates/README.md) rendered by transformers' jinja machinery; the
tokenizer is a small byte-level BPE trained here and loaded back with ``AutoTokenizer``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from minicd import CheckpointError, ConfigError, DataError
from minicd.model.tokenizer import (
    CHATML_JINJA,
    Tokenizer,
    detect_template,
    encode_example,
    encode_prompt,
    load_tokenizer,
    render_chat,
    train_bpe_tokenizer,
)

FIXTURES = Path(__file__).parent / "fixtures" / "chat_templates"
QWEN25_JINJA = (FIXTURES / "qwen2_5_instruct.jinja").read_text(encoding="utf-8")
QWEN3_JINJA = (FIXTURES / "qwen3.jinja").read_text(encoding="utf-8")
JINJA = {"qwen2.5": QWEN25_JINJA, "qwen3": QWEN3_JINJA, "chatml": CHATML_JINJA}

HYP = settings(max_examples=60, deadline=None,
               suppress_health_check=[HealthCheck.function_scoped_fixture])


def _corpus() -> list[str]:
    words = ["patient", "admitted", "with", "chest", "pain", "diabetes", "mellitus", "hypertension",
             "discharge", "summary", "history", "renal", "failure", "acute", "chronic", "the", "and"]
    codes = ["401.9", "250.00", "428.0", "584.9", "I10", "E11.9", "N17.9", "414.01"]
    texts = []
    for i in range(120):
        sent = " ".join(words[(i * k) % len(words)] for k in range(1, 9))
        texts.append(f"{sent.capitalize()}.\nCodes: <code>{codes[i % 8]}, {codes[(3 * i) % 8]}</code>\n")
    texts += ["Ünïcödé façade naïve café — ✓ 日本語のテキスト 😀\r\n\ttabbed"] * 5
    return texts


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("bpe")
    tok = train_bpe_tokenizer(_corpus(), 420, out)
    return out, tok


@pytest.fixture(scope="module")
def hf(trained):
    return AutoTokenizer.from_pretrained(str(trained[0]))


def hf_render(hf, messages, template, add_generation_prompt):
    """Reference render: transformers + the real jinja template (chatml: the one we saved)."""
    kwargs = {} if template == "chatml" else {"chat_template": JINJA[template]}
    return hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                  enable_thinking=False, **kwargs)


def U(c):  # noqa: N802 - short message builders keep the cases readable
    return {"role": "user", "content": c}


def A(c):  # noqa: N802
    return {"role": "assistant", "content": c}


def S(c):  # noqa: N802
    return {"role": "system", "content": c}


CASES = {
    "user_only": [U("Code this note.")],
    "system_user": [S("You are an ICD coder."), U("Code this note.")],
    "multi_turn": [U("first"), A("<code>401.9</code>"), U("second")],
    "final_assistant": [U("Code it."), A("<code>401.9, 250.00</code>")],
    "system_multi_final_assistant": [S("sys"), U("q1"), A("a1"), U("q2"), A("a2")],
    "unicode_newlines": [U("Patient: Ünïcödé ✓ 日本語\n\nline2\r\n\ttab 😀"), A("<code>E11.9</code>\n")],
    "think_in_history": [U("q1"), A("<think>\nplan\n</think>\n\nanswer one"), U("q2"),
                         A("<think>r2</think>ans2")],
    "late_system": [U("q1"), S("second system"), U("q2")],
    "tool_response_text": [U("q"), A("<think>r</think>a"), U("<tool_response>ok</tool_response>")],
    "leading_newlines": [U("q"), A("\n\nhello\n")],
    "empty_contents": [S(""), U(""), A("")],
}


@pytest.mark.parametrize("template", ["qwen2.5", "qwen3", "chatml"])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("agp", [True, False])
def test_render_matches_transformers(hf, template, case, agp):
    msgs = CASES[case]
    assert render_chat(msgs, template, add_generation_prompt=agp) == hf_render(hf, msgs, template, agp)


def test_render_known_strings():
    # Hand-derived from the template definitions (REFERENCE.md section 4).
    msgs = [U("hi")]
    assert render_chat(msgs, "qwen2.5") == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
        "<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert render_chat(msgs, "qwen3") == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert render_chat(msgs, "chatml") == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert render_chat([U("hi"), A("x")], "qwen3", add_generation_prompt=False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\nx<|im_end|>\n")


_PIECES = st.sampled_from(["a", "b c", "\n", " ", "\r\n", "<think>", "</think>", "<tool_response>",
                           "</tool_response>", "é", "日本", "<code>", "401.9"])
_CONTENT = st.lists(st.one_of(_PIECES, st.text(max_size=4)), max_size=6).map("".join)
_MESSAGES = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                            "content": _CONTENT}), min_size=1, max_size=6)


@HYP
@given(messages=_MESSAGES, agp=st.booleans())
def test_render_matches_transformers_random(hf, messages, agp):
    for template in ("qwen2.5", "qwen3", "chatml"):
        assert render_chat(messages, template, agp) == hf_render(hf, messages, template, agp)


def test_chatml_config_template_is_ours(hf):
    assert hf.chat_template == CHATML_JINJA


@pytest.mark.parametrize("bad, key", [
    ([], "non-empty"),
    ([{"role": "tool", "content": "SECRET-NOTE"}], "'tool'"),
    ([U(["SECRET-NOTE"])], "content"),
    ([{"role": "assistant", "content": "SECRET-NOTE", "tool_calls": []}], "tool_calls"),
    ([{"role": "user", "content": "SECRET-NOTE", "reasoning_content": "x"}], "reasoning_content"),
    (["SECRET-NOTE"], "messages[0]"),
])
def test_render_refuses_unsupported(bad, key):
    with pytest.raises(ConfigError) as ei:
        render_chat(bad, "qwen3")
    assert key in str(ei.value)
    assert "SECRET-NOTE" not in str(ei.value)  # never echo message text


def test_render_unknown_template():
    with pytest.raises(ConfigError, match="llama3"):
        render_chat([U("x")], "llama3")


# --------------------------------------------------------------------------- encode_example


@pytest.fixture(scope="module", params=["qwen2.5", "qwen3", "chatml"])
def tok_t(request, trained):
    return load_tokenizer(trained[0], template=request.param)


def test_encode_example_matches_hf(tok_t, hf):
    t = tok_t.template
    prompt = [S("You are an ICD coder."), U("Note: chest pain, HTN.\nList codes.")]
    completion = "<code>401.9, 786.50</code>"
    p_ids, c_ids = encode_example(tok_t, prompt, completion)
    assert c_ids[-1] == hf.convert_tokens_to_ids("<|im_end|>") == tok_t.im_end_id
    assert c_ids.count(tok_t.im_end_id) == 1
    hf_prompt = hf_render(hf, prompt, t, True)
    assert tok_t.decode(p_ids) == hf_prompt
    assert p_ids == hf.encode(hf_prompt, add_special_tokens=False)
    assert p_ids == encode_prompt(tok_t, prompt)
    if t == "qwen3":
        assert hf_prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    # Training render: HF's full conversation starts with prompt + completion + <|im_end|>.
    hf_full = hf_render(hf, [*prompt, A(completion)], t, False)
    assert hf_full.startswith(hf_prompt + completion + "<|im_end|>")
    full_ids = hf.encode(hf_full, add_special_tokens=False)
    assert p_ids + c_ids == full_ids[: len(p_ids) + len(c_ids)]
    assert p_ids + c_ids == tok_t.encode(hf_prompt + completion + "<|im_end|>")


@HYP
@given(completion=st.text(min_size=1, max_size=30).filter(
           lambda s: not s[0].isspace() and "</think>" not in s),
       user=st.text(max_size=30))
def test_boundary_separate_equals_concatenated(tok_t, completion, user):
    p_ids, c_ids = encode_example(tok_t, [U(user)], completion)
    prompt_text = render_chat([U(user)], tok_t.template)
    assert p_ids + c_ids == tok_t.encode(prompt_text + completion + "<|im_end|>")


def test_encode_example_refuses_mismatching_render(trained):
    q3 = load_tokenizer(trained[0], template="qwen3")
    for bad in ("\nleading newline", "a</think>b"):
        with pytest.raises(DataError):
            encode_example(q3, [U("q")], bad)
    # Qwen2.5 keeps a leading newline verbatim, so the same completion is fine there.
    q25 = load_tokenizer(trained[0], template="qwen2.5")
    _, c_ids = encode_example(q25, [U("q")], "\nleading newline")
    assert q25.decode(c_ids) == "\nleading newline<|im_end|>"


# --------------------------------------------------------------------------- demo BPE


def test_special_tokens_single_ids(trained, hf):
    _, tok = trained
    for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"):
        assert tok.encode(t) == [hf.convert_tokens_to_ids(t)]
        assert tok.encode("ab " + t + " cd").count(tok.token_to_id(t)) == 1
    assert (tok.endoftext_id, tok.im_start_id, tok.im_end_id) == (0, 1, 2)
    assert tok.stop_ids == (2, 0) and tok.pad_id == 0 == hf.pad_token_id
    assert hf.eos_token_id == tok.im_end_id and hf.bos_token is None
    assert tok.vocab_size == len(hf) and tok.vocab_size <= 420 + 2
    # <think> tokens are non-special (as in Qwen3): kept by skip_special_tokens.
    ids = tok.encode("<|im_start|>x<think>y</think><|im_end|>")
    assert tok.decode(ids, skip_special_tokens=True) == "x<think>y</think>"
    assert hf.decode(ids, skip_special_tokens=True) == "x<think>y</think>"


@HYP
@given(text=st.text(max_size=60))
def test_roundtrip_and_hf_ids(trained, hf, text):
    _, tok = trained
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert ids == hf.encode(text, add_special_tokens=False) == hf(text)["input_ids"]


def test_hf_ids_on_sample_text(trained, hf):
    _, tok = trained
    chat = render_chat([S("s"), U("Ünï 401.9\n"), A("<code>I10</code>")], "chatml", False)
    for text in _corpus()[:5] + [chat]:
        assert tok.encode(text) == hf(text)["input_ids"]
        assert tok.decode(tok.encode(text)) == hf.decode(hf.encode(text)) == text


def test_training_is_deterministic(trained, tmp_path):
    out, _ = trained
    train_bpe_tokenizer(_corpus(), 420, tmp_path, seed=1)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes()


def test_train_rejects_tiny_vocab(tmp_path):
    with pytest.raises(ConfigError, match="vocab_size"):
        train_bpe_tokenizer(["abc"], 100, tmp_path)


# --------------------------------------------------------------------------- loading / detection


def _checkpoint(tmp_path, trained, tokenizer_config=None, model_type=None) -> Path:
    d = tmp_path / "ckpt"
    d.mkdir()
    shutil.copy(trained[0] / "tokenizer.json", d / "tokenizer.json")
    if tokenizer_config is not None:
        (d / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    if model_type is not None:
        (d / "config.json").write_text(json.dumps({"model_type": model_type}))
    return d


def test_load_detects_chatml_and_matches_trained(trained):
    out, tok = trained
    loaded = load_tokenizer(out)
    assert loaded.template == "chatml"
    text = "<|im_start|>user\nCodes 401.9 é<|im_end|>\n"
    assert loaded.encode(text) == tok.encode(text)


@pytest.mark.parametrize("cfg, model_type, expected", [
    ({"chat_template": QWEN25_JINJA}, "qwen2", "qwen2.5"),
    ({"chat_template": QWEN3_JINJA}, "qwen3", "qwen3"),
    ({"chat_template": [{"name": "default", "template": QWEN3_JINJA}]}, None, "qwen3"),
    ({"chat_template": CHATML_JINJA}, None, "chatml"),
    ({}, "qwen3", "qwen3"),
    ({}, "qwen2", "qwen2.5"),
])
def test_load_detection(tmp_path, trained, cfg, model_type, expected):
    d = _checkpoint(tmp_path, trained, {**cfg, "pad_token": "<|endoftext|>"}, model_type)
    assert load_tokenizer(d).template == expected
    assert detect_template(cfg, model_type) == expected


def test_load_override_and_pad(tmp_path, trained):
    d = _checkpoint(tmp_path, trained, {"chat_template": QWEN25_JINJA,
                                        "pad_token": {"content": "<|im_start|>", "special": True}})
    tok = load_tokenizer(d, template="qwen3")
    assert tok.template == "qwen3"
    assert tok.pad_id == 1


@pytest.mark.parametrize("cfg, model_type", [
    ({"chat_template": "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"}, "qwen2"),
    ({}, "llama"),
    (None, None),
])
def test_detection_refuses_unknown(cfg, model_type):
    with pytest.raises(ConfigError, match="template="):
        detect_template(cfg, model_type)


def test_missing_files(tmp_path, trained):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(CheckpointError) as ei:
        load_tokenizer(tmp_path)
    assert str(tmp_path / "tokenizer.json") in str(ei.value)
    d = _checkpoint(tmp_path, trained)
    with pytest.raises(CheckpointError) as ei:
        load_tokenizer(d)
    assert "tokenizer_config.json" in str(ei.value) and "template=" in str(ei.value)
    assert load_tokenizer(d, template="qwen2.5").template == "qwen2.5"


def test_unknown_template_name(trained):
    with pytest.raises(ConfigError, match="unknown chat template"):
        Tokenizer(trained[1].backend, "vicuna")
