"""Prompting baselines of paper Appendix D for batch inference: zero-shot, few-shot (three
retrieved training notes with their gold codes), zero-shot CoT and few-shot CoT.

:class:`BaselinePrompter` turns records of any split into generation-prompt ids: the user turn is
the rendered Appendix D template (``minicd.prompts.render_baseline``) and the model's chat
template is applied as for every other method (``encode_prompt``). Outputs are scored with the
one parser (``minicd.parse``), which skips ``<think>`` blocks, so CoT answers count only their
``<code>`` block. CoT responses are longer: raise ``rollout.max_new_tokens`` (``rollout.py
--max-new-tokens 512``) for the two CoT kinds; the config default is kept.

Few-shot retrieval: a :class:`~minicd.data.retrieve.NeighbourIndex` (TF-IDF cosine) over the
*training split only*, queried with each record's full (untruncated) note and id, so a prompt never
shows a held-out note, and a training record never gets itself as an example. Shots are ordered
best first; ``SHOT_CODES_i`` is the gold codes joined by ", ".

Token budget (ours; the paper does not say how long prompts were cut). The whole generation
prompt, chat markup included, fits ``data.max_prompt_tokens`` (the fixed coding prompt counts
only its user text; a baseline prompt is held to the stricter bound). With ``P`` = that budget
minus the chat markup and ``O`` = the template with every note empty (instruction, shot codes,
"Answer:" suffixes), the notes share ``R = P - O`` tokens:

* each of the three shot notes is cut (tiered middle-out, ``truncate_note``) to at most
  ``floor(shot_fraction * R / 3)`` tokens (``shot_fraction`` 0.5: the shots together get at most
  half of ``R``);
* the query note gets all that is left (``fit_prompt``), i.e. at least about half of ``R``, more
  when the shots are short. Template text is never cut.

No note text is logged or put into exceptions here.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

from minicd.data.records import Record
from minicd.data.retrieve import NeighbourIndex
from minicd.data.truncate import fit_prompt, truncate_note
from minicd.errors import ConfigError, DataError
from minicd.model.tokenizer import Tokenizer, encode_prompt
from minicd.prompts import BASELINE_TEMPLATES, NUM_SHOTS, PromptSetting, Shot, render_baseline

BASELINE_KINDS: tuple[str, ...] = tuple(BASELINE_TEMPLATES)  # zero_shot, few_shot, *_cot
COT_KINDS: tuple[str, ...] = ("zero_shot_cot", "few_shot_cot")
COT_MIN_NEW_TOKENS = 512  # suggested rollout.max_new_tokens for CoT kinds (rationale + codes)
DEFAULT_SHOT_FRACTION = 0.5


def needs_shots(kind: str) -> bool:
    """True for the few-shot kinds (they retrieve three training examples)."""
    return kind.startswith("few_shot")


def check_kind(kind: str) -> str:
    """``kind`` if it is an Appendix D baseline, else a ``ConfigError``."""
    if kind not in BASELINE_KINDS:
        raise ConfigError(f"unknown prompt kind {kind!r}; use one of {', '.join(BASELINE_KINDS)} "
                          "(or no prompt kind for the fixed coding instruction)")
    return kind


def chat_markup_tokens(tok: Tokenizer) -> int:
    """Tokens the chat template adds around a user turn (generation prompt included)."""
    return len(encode_prompt(tok, [{"role": "user", "content": "x"}])) - len(tok.encode("x"))


class BaselinePrompter:
    """Builds Appendix D baseline prompts for records of any split (see the module docstring).

    ``train``: the training split (needed by the few-shot kinds only); ``max_prompt_tokens``
    bounds the whole generation prompt, chat markup included.
    """

    def __init__(self, kind: str, setting: PromptSetting, tok: Tokenizer, max_prompt_tokens: int,
                 train: Sequence[Record] | None = None, *,
                 shot_fraction: float = DEFAULT_SHOT_FRACTION) -> None:
        self.kind = check_kind(kind)
        if not 0.0 <= shot_fraction <= 1.0:
            raise ConfigError(f"shot_fraction = {shot_fraction} must lie in [0, 1]")
        self.setting = setting
        self.tok = tok
        self.max_prompt_tokens = max_prompt_tokens
        self.shot_fraction = shot_fraction
        self.markup = chat_markup_tokens(tok)
        self.train: dict[str, Record] = {}
        self.index: NeighbourIndex | None = None
        if needs_shots(kind):
            if not train or len(train) <= NUM_SHOTS:
                n = len(train) if train else 0
                raise DataError(f"{kind} needs more than {NUM_SHOTS} training records to retrieve "
                                f"{NUM_SHOTS} examples, got {n}; check data.dir/train.jsonl")
            self.train = {r.id: r for r in train}
            self.index = NeighbourIndex.build([r.id for r in train], [r.note for r in train])
        self._cut = lru_cache(maxsize=4096)(self._cut_uncached)

    @classmethod
    def from_config(cls, kind: str, data_cfg: object, tok: Tokenizer,
                    train: Sequence[Record] | None = None, **kw) -> BaselinePrompter:
        """From a ``DataConfig`` (``corpus``, ``code_system``, ``label_scope``, ``max_prompt_tokens``)."""
        return cls(kind, PromptSetting.from_config(data_cfg), tok,
                   data_cfg.max_prompt_tokens, train, **kw)  # type: ignore[attr-defined]

    # --- retrieval --------------------------------------------------------------------------

    def neighbours(self, records: Sequence[Record]) -> list[list[Record]]:
        """The three training records most similar to each record (best first; empty lists for
        zero-shot kinds). A record never gets itself; only training records are returned."""
        if self.index is None:
            return [[] for _ in records]
        hits = self.index.query([r.note for r in records], ids=[r.id for r in records], k=NUM_SHOTS)
        return [[self.train[i] for i in ids] for ids in hits]

    # --- rendering --------------------------------------------------------------------------

    def _cut_uncached(self, shot_id: str, budget: int) -> str:
        return truncate_note(self.train[shot_id].note, budget, self.tok)

    def user_prompt(self, rec: Record, shots: Sequence[Record] = ()) -> str:
        """The user turn for ``rec`` with ``shots`` (three training records for few-shot kinds),
        notes truncated so that the chat-encoded prompt fits ``max_prompt_tokens``."""
        user_budget = self.max_prompt_tokens - self.markup
        codes = [r.codes for r in shots]
        shot_notes = [""] * len(shots)
        if shots:
            empty = [("", c) for c in codes]
            overhead = len(self.tok.encode(render_baseline(self.kind, "", self.setting, empty)))
            per_shot = max(0, int(self.shot_fraction * (user_budget - overhead) / NUM_SHOTS))
            shot_notes = [self._cut(r.id, per_shot) for r in shots]
        pairs: list[Shot] = list(zip(shot_notes, codes))

        def build(note: str) -> str:
            return render_baseline(self.kind, note, self.setting, pairs or None)

        while True:  # BPE merges at the markup boundary may add a token or two: lower and retry
            text = fit_prompt(build, rec.note, user_budget, self.tok)
            excess = len(self.prompt_ids_of(text)) - self.max_prompt_tokens
            if excess <= 0:
                return text
            user_budget -= excess

    def prompt_ids_of(self, user_text: str) -> list[int]:
        """Generation-prompt ids of one rendered user turn (the model's chat template applied)."""
        return encode_prompt(self.tok, [{"role": "user", "content": user_text}])

    def user_prompts(self, records: Sequence[Record]) -> list[str]:
        """:meth:`user_prompt` of every record with its retrieved shots."""
        return [self.user_prompt(r, s) for r, s in zip(records, self.neighbours(records))]

    def prompt_ids(self, records: Sequence[Record]) -> list[list[int]]:
        """Generation-prompt ids of every record (what the rollout engine is fed)."""
        return [self.prompt_ids_of(t) for t in self.user_prompts(records)]


__all__ = ["BASELINE_KINDS", "COT_KINDS", "COT_MIN_NEW_TOKENS", "BaselinePrompter",
           "chat_markup_tokens", "check_kind", "needs_shots"]
