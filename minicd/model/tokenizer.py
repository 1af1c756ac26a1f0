"""Tokenizer wrapper and chat templates (Qwen2.5-Instruct, Qwen3 non-thinking, SmolLM2-Instruct,
plain ChatML).

The tokenizer is a thin wrapper around a ``tokenizers.Tokenizer`` loaded from ``tokenizer.json``.
Chat templates are written in Python (no jinja2 at runtime) and render exactly what Hugging Face's
``apply_chat_template`` renders with the real template strings shipped in the checkpoints, for
the message lists minicd supports: system / user / assistant turns whose content is a string.
Tools, the ``tool`` role, multimodal (list) content and extra message keys are refused.

Templates:

- ``"qwen2.5"``: Qwen2.5-Instruct. A default system turn is inserted when the first message is
  not a system message.
- ``"qwen3"``: Qwen3 with ``enable_thinking=False``. The generation prompt ends with an empty
  think block; an assistant turn after the last user query is rendered with a think block
  (empty unless the content carries ``<think>...</think>``); earlier assistant turns lose their
  reasoning.
- ``"smollm2"``: SmolLM2-Instruct: ChatML with its own default system turn when the first message
  is not a system message.
- ``"chatml"``: plain ChatML used by the demo tokenizer (:func:`train_bpe_tokenizer`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors, trainers

from minicd.errors import CheckpointError, ConfigError, DataError

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

TEMPLATES = ("qwen2.5", "qwen3", "smollm2", "chatml")
ROLES = ("system", "user", "assistant")
QWEN25_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
QWEN3_EMPTY_THINK = "<think>\n\n</think>\n\n"
SMOLLM2_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

# The jinja template written into the demo tokenizer's tokenizer_config.json; renders the same
# text as ``render_chat(..., "chatml")``.
CHATML_JINJA = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Other plain ChatML templates recognised verbatim by detect_template (the common HF one).
_KNOWN_CHATML = (
    CHATML_JINJA,
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}",
)

# Qwen2 pre-tokenisation: letters runs, single digits, punctuation runs, newline runs.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


class Tokenizer:
    """A ``tokenizers.Tokenizer`` plus the chat template it is used with.

    ``encode`` adds no special tokens (Qwen adds no BOS) but maps special-token strings found in
    the text (``<|im_start|>`` ...) to their ids, as Hugging Face does.
    """

    def __init__(self, backend: tokenizers.Tokenizer, template: str, *,
                 pad_token: str | None = None, source: str = "<in memory>") -> None:
        if template not in TEMPLATES:
            raise ConfigError(f"unknown chat template {template!r} for tokenizer {source}; "
                              f"use one of {', '.join(TEMPLATES)}")
        self.backend = backend
        self.source = source
        self._template = template
        missing = [t for t in (IM_START, IM_END, ENDOFTEXT) if backend.token_to_id(t) is None]
        if missing:
            raise CheckpointError(f"tokenizer {source} lacks the ChatML tokens {missing}; minicd "
                                  f"needs {IM_START}, {IM_END} and {ENDOFTEXT} (Qwen-family vocab)")
        pad_id = backend.token_to_id(pad_token) if pad_token else None
        self._pad_id = pad_id if pad_id is not None else backend.token_to_id(ENDOFTEXT)

    def __repr__(self) -> str:
        return (f"Tokenizer(source={self.source!r}, template={self._template!r}, "
                f"vocab_size={self.vocab_size})")

    @property
    def template(self) -> str:
        """Name of the chat template in use (one of :data:`TEMPLATES`)."""
        return self._template

    @property
    def vocab_size(self) -> int:
        """Vocabulary size including added tokens (may be < the model's embedding rows)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no special tokens added, special-token strings are mapped."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """Id of ``token`` or ``None`` when it is not in the vocabulary."""
        return self.backend.token_to_id(token)

    @property
    def im_start_id(self) -> int:
        return self.backend.token_to_id(IM_START)

    @property
    def im_end_id(self) -> int:
        return self.backend.token_to_id(IM_END)

    @property
    def endoftext_id(self) -> int:
        return self.backend.token_to_id(ENDOFTEXT)

    @property
    def pad_id(self) -> int:
        """Padding id (``pad_token`` of tokenizer_config.json; Qwen: ``<|endoftext|>``)."""
        return self._pad_id

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end a generated turn: ``<|im_end|>`` then ``<|endoftext|>``."""
        return (self.im_end_id, self.endoftext_id)


# ----------------------------------------------------------------------------- chat templates


def _check_messages(messages: Sequence[Mapping[str, object]]) -> None:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ConfigError("messages must be a non-empty list of {'role', 'content'} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ConfigError(f"messages[{i}] is a {type(m).__name__}, expected a dict with "
                              "'role' and 'content'")
        extra = sorted(set(m) - {"role", "content"})
        if extra:
            raise ConfigError(f"messages[{i}] has unsupported keys {extra} (tool calls, reasoning "
                              "and names are not supported); keep only 'role' and 'content'")
        if m.get("role") not in ROLES:
            raise ConfigError(f"messages[{i}]['role'] = {m.get('role')!r} is not supported; use "
                              f"one of {', '.join(ROLES)} (tools and the tool role are not "
                              "supported)")
        if not isinstance(m.get("content"), str):
            raise ConfigError(f"messages[{i}]['content'] is {type(m.get('content')).__name__}, "
                              "expected a string (multimodal/list content is not supported)")


def _turn(role: str, content: str) -> str:
    return f"{IM_START}{role}\n{content}{IM_END}\n"


def _render_chatml(messages: Sequence[Mapping[str, str]], add_generation_prompt: bool) -> str:
    out = [_turn(m["role"], m["content"]) for m in messages]
    if add_generation_prompt:
        out.append(f"{IM_START}assistant\n")
    return "".join(out)


def _render_default_system(messages: Sequence[Mapping[str, str]], add_generation_prompt: bool,
                           default_system: str) -> str:
    """ChatML that inserts ``default_system`` as a system turn when the first message is not one
    (Qwen2.5-Instruct, SmolLM2-Instruct)."""
    has_system = messages[0]["role"] == "system"
    out = [_turn("system", messages[0]["content"] if has_system else default_system)]
    out += [_turn(m["role"], m["content"]) for m in messages[1 if has_system else 0:]]
    if add_generation_prompt:
        out.append(f"{IM_START}assistant\n")
    return "".join(out)


def _render_qwen3(messages: Sequence[Mapping[str, str]], add_generation_prompt: bool) -> str:
    n = len(messages)
    out = [_turn("system", messages[0]["content"])] if messages[0]["role"] == "system" else []
    # Index of the last user turn that is a real query (not a wrapped tool response).
    last_query = n - 1
    for i in range(n - 1, -1, -1):
        c = messages[i]["content"]
        if messages[i]["role"] == "user" and not (
            c.startswith("<tool_response>") and c.endswith("</tool_response>")
        ):
            last_query = i
            break
    for i, m in enumerate(messages):
        role, content = m["role"], m["content"]
        if role == "user" or (role == "system" and i > 0):
            out.append(_turn(role, content))
        elif role == "assistant":
            reasoning = ""
            if THINK_CLOSE in content:
                head, tail = content.split(THINK_CLOSE)[0], content.split(THINK_CLOSE)[-1]
                reasoning = head.rstrip("\n").split(THINK_OPEN)[-1].lstrip("\n")
                content = tail.lstrip("\n")
            if i > last_query and (i == n - 1 or reasoning):
                body = f"<think>\n{reasoning.strip(chr(10))}\n</think>\n\n{content.lstrip(chr(10))}"
            else:
                body = content
            out.append(_turn("assistant", body))
    if add_generation_prompt:
        out.append(f"{IM_START}assistant\n{QWEN3_EMPTY_THINK}")
    return "".join(out)


_RENDERERS = {
    "qwen2.5": lambda m, g: _render_default_system(m, g, QWEN25_DEFAULT_SYSTEM),
    "qwen3": _render_qwen3,
    "smollm2": lambda m, g: _render_default_system(m, g, SMOLLM2_DEFAULT_SYSTEM),
    "chatml": _render_chatml,
}


def render_chat(messages: Sequence[Mapping[str, str]], template: str,
                add_generation_prompt: bool = True) -> str:
    """Render ``messages`` as Hugging Face's ``apply_chat_template(tokenize=False)`` would.

    ``template`` is one of :data:`TEMPLATES`; Qwen3 is rendered with ``enable_thinking=False``.
    """
    if template not in _RENDERERS:
        raise ConfigError(f"unknown chat template {template!r}; use one of {', '.join(TEMPLATES)}")
    _check_messages(messages)
    return _RENDERERS[template](messages, add_generation_prompt)


def encode_prompt(tok: Tokenizer, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """Ids of the generation prompt for ``messages`` (ends right where the model starts writing)."""
    return tok.encode(render_chat(messages, tok.template, add_generation_prompt=True))


def encode_example(tok: Tokenizer, prompt_messages: Sequence[Mapping[str, str]],
                   completion: str) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of one training example.

    The prompt is the generation prompt (with Qwen3's empty think block); the completion ids
    encode ``completion + "<|im_end|>"``, so they end with ``tok.im_end_id``. The two parts are
    encoded separately, as at rollout time; since every template's prompt ends with ``\\n`` after
    a special token, this equals encoding the concatenation unless the completion starts with
    whitespace. Raises ``DataError`` when the template would render the completion differently
    (e.g. Qwen3 strips a leading newline and splits text at ``</think>``).
    """
    prompt_text = render_chat(prompt_messages, tok.template, add_generation_prompt=True)
    full = render_chat([*prompt_messages, {"role": "assistant", "content": completion}],
                       tok.template, add_generation_prompt=False)
    if not full.startswith(prompt_text + completion + IM_END):
        raise DataError(f"the {tok.template!r} chat template renders this completion differently "
                        "from prompt + completion (leading newline or </think> in the "
                        "completion?); clean the completion text")
    completion_ids = tok.encode(completion + IM_END)
    assert completion_ids and completion_ids[-1] == tok.im_end_id
    return tok.encode(prompt_text), completion_ids


# ----------------------------------------------------------------------------- loading


def _template_string(tokenizer_config: Mapping[str, object]) -> str | None:
    tpl = tokenizer_config.get("chat_template")
    if isinstance(tpl, list):  # named variants: [{"name": ..., "template": ...}]
        named = {d.get("name"): d.get("template") for d in tpl if isinstance(d, Mapping)}
        tpl = named.get("default")
    return tpl if isinstance(tpl, str) else None


def detect_template(tokenizer_config: Mapping[str, object] | None, model_type: str | None) -> str:
    """Pick the chat template name for a checkpoint.

    From ``tokenizer_config["chat_template"]`` when present: Qwen2.5's default system sentence ->
    ``"qwen2.5"``; SmolLM2's -> ``"smollm2"``; ChatML with ``enable_thinking`` -> ``"qwen3"``;
    a known plain ChatML template ->
    ``"chatml"``; anything else is refused (pass the template explicitly). Without a chat template
    the model type decides: ``qwen3`` -> ``"qwen3"``, ``qwen2`` -> ``"qwen2.5"``.
    """
    tpl = _template_string(tokenizer_config or {})
    if tpl is not None:
        if IM_START in tpl and QWEN25_DEFAULT_SYSTEM in tpl:
            return "qwen2.5"
        if IM_START in tpl and SMOLLM2_DEFAULT_SYSTEM in tpl:
            return "smollm2"
        if IM_START in tpl and "enable_thinking" in tpl:
            return "qwen3"
        if tpl.strip() in _KNOWN_CHATML:
            return "chatml"
        raise ConfigError("tokenizer_config.json key 'chat_template' is not a template minicd "
                          "knows (Qwen2.5-Instruct, Qwen3 hybrid-thinking, SmolLM2-Instruct, plain ChatML); if it "
                          f"renders like one of them pass template= one of {', '.join(TEMPLATES)}")
    if model_type == "qwen3":
        return "qwen3"
    if model_type == "qwen2":
        return "qwen2.5"
    raise ConfigError("cannot detect the chat template: no 'chat_template' in "
                      f"tokenizer_config.json and model_type={model_type!r}; pass template= one "
                      f"of {', '.join(TEMPLATES)}")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}; re-download or re-export the "
                              "tokenizer") from e


def load_tokenizer(path: str | Path, template: str | None = None) -> Tokenizer:
    """Load ``tokenizer.json`` (+ ``tokenizer_config.json``) from a local checkpoint directory.

    ``template`` overrides detection (:func:`detect_template`, which also reads ``model_type``
    from ``config.json`` when present).
    """
    root = Path(path)
    tok_file, cfg_file = root / "tokenizer.json", root / "tokenizer_config.json"
    fix = ("point to a local checkpoint directory holding tokenizer.json and tokenizer_config.json "
           "(e.g. `hf download Qwen/Qwen2.5-1.5B-Instruct --local-dir DIR`)")
    if not root.is_dir():
        raise CheckpointError(f"tokenizer directory {root} does not exist; {fix}")
    if not tok_file.is_file():
        raise CheckpointError(f"{tok_file} is missing; {fix}")
    if template is None and not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file} is missing, so the chat template cannot be detected; "
                              f"{fix}, or pass template= one of {', '.join(TEMPLATES)}")
    cfg = _read_json(cfg_file) if cfg_file.is_file() else {}
    if template is None:
        model_cfg = root / "config.json"
        model_type = _read_json(model_cfg).get("model_type") if model_cfg.is_file() else None
        template = detect_template(cfg, model_type)
    try:
        backend = tokenizers.Tokenizer.from_file(str(tok_file))
    except Exception as e:  # the Rust loader raises plain Exception on malformed files
        raise CheckpointError(f"cannot parse {tok_file}: {e}; re-download or re-export it") from e
    pad = cfg.get("pad_token")
    if isinstance(pad, Mapping):  # serialized AddedToken
        pad = pad.get("content")
    return Tokenizer(backend, template, pad_token=pad if isinstance(pad, str) else None,
                     source=str(root))


# ----------------------------------------------------------------------------- demo tokenizer


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path, *,
                        seed: int = 0, model_max_length: int = 32768) -> Tokenizer:
    """Train a byte-level BPE tokenizer (Qwen2-style pre-tokenisation) and save it to ``out_dir``.

    Special tokens ``<|endoftext|>`` (0, also pad), ``<|im_start|>`` (1), ``<|im_end|>`` (2, eos);
    ``<think>`` and ``</think>`` are added as non-special tokens like in Qwen3's vocabulary.
    ``vocab_size`` counts the special tokens but not the two think tokens. No normaliser, so
    ``decode(encode(t)) == t`` for any text. Writes ``tokenizer.json``, ``tokenizer_config.json``
    (ChatML ``chat_template``) and ``special_tokens_map.json``, loadable by transformers'
    ``AutoTokenizer`` and vLLM. BPE training has no randomness: the same texts give the same
    files; ``seed`` is accepted for interface symmetry with the other demo builders.
    """
    del seed  # deterministic algorithm; nothing to seed
    specials = [ENDOFTEXT, IM_START, IM_END]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(specials):
        raise ConfigError(f"vocab_size={vocab_size} is too small: a byte-level BPE needs at least "
                          f"{len(alphabet) + len(specials)} (256 bytes + 3 special tokens)")
    backend = tokenizers.Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False,
                                         use_regex=False)
    backend.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False,
                                                  use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False, initial_alphabet=alphabet,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in specials],
    )
    backend.train_from_iterator(list(texts), trainer=trainer)
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t in (THINK_OPEN, THINK_CLOSE)])

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    backend.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "model_max_length": model_max_length,
        "chat_template": CHATML_JINJA,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n",
                                               encoding="utf-8")
    special_map = {"eos_token": IM_END, "pad_token": ENDOFTEXT}
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n",
                                                 encoding="utf-8")
    return Tokenizer(backend, "chatml", pad_token=ENDOFTEXT, source=str(out))
