"""The rollout-engine protocol and its records.

A rollout engine turns token-id prompts into sampled responses. The GRPO / PHI stage loops talk
to it only through :class:`RolloutEngine`: ``generate`` (G samples per prompt, step 3 of a GRPO
step), ``sync_policy`` (push the current policy before generating, step 2), ``lockstep`` (a
context for rank-sharded generation), ``sleep`` / ``wake_up`` (free device memory for the
training passes) and ``close``. Two engines implement it:
:class:`minicd.rollout.torch_engine.TorchEngine`, a pure-torch KV-cache sampler that reads the
live policy module, and a vLLM engine (``minicd.rollout.vllm_engine``) that receives LoRA tensors
or full weights through ``sync_policy``.

What differs between the engines lives in them, not in the stage loops: under ``torchrun`` every
rank generates only its own prompts with either engine; the vLLM engine gathers an FSDP2-sharded
policy itself in ``sync_policy``; the torch engine, whose forwards on a sharded policy are
collective, keeps the ranks stepping together inside ``lockstep`` until every rank is done.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ContextManager, Literal, Protocol, Sequence, runtime_checkable

from torch import nn

from minicd.errors import ConfigError

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """How to sample responses.

    n: samples per prompt (the GRPO group size G). temperature: 0 means greedy (argmax), else
    tokens are drawn from softmax(logits / temperature) (default 1.0, as vLLM). top_p: nucleus
    filtering, keeping the smallest set of most likely tokens whose cumulative probability
    reaches ``top_p`` (1.0 keeps all). max_new_tokens: response budget (196 in the paper).
    stop_ids: token ids that end a response (e.g. ``Tokenizer.stop_ids``). seed: seeds the
    engine's sampling generator (None: non-deterministic). return_logprobs: also return
    per-token log-probs (see :class:`Generation`).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 196
    stop_ids: tuple[int, ...] = ()
    seed: int | None = None
    return_logprobs: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_ids", tuple(int(i) for i in self.stop_ids))
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ConfigError(f"SamplingParams.n must be a positive integer, got {self.n!r}")
        if not self.temperature >= 0.0:
            raise ConfigError(f"SamplingParams.temperature must be >= 0 (0 = greedy), got "
                              f"{self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p!r}")
        if (isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int)
                or self.max_new_tokens < 1):
            raise ConfigError(f"SamplingParams.max_new_tokens must be a positive integer, got "
                              f"{self.max_new_tokens!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class Generation:
    """One sampled response.

    token_ids: the response tokens, INCLUDING the stop token when one was generated.
    text: the decoded response WITHOUT the stop token. finish_reason: "stop" (a stop id was
    generated) or "length" (``max_new_tokens`` reached first).
    logprobs: when requested, ``logprobs[t] = log pi(token_ids[t] | prompt, token_ids[:t])`` under
    the model's RAW distribution, i.e. log_softmax(logits) at temperature 1 with no top-p
    filtering, whatever the sampling temperature and top_p. This is the quantity the trainer
    recomputes (``minicd.algo.logprobs.model_token_logprobs``) for the GRPO ratio, so the two
    can be compared directly; it is not the log-prob of the tempered/filtered sampler.
    """

    prompt_index: int
    sample_index: int
    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    logprobs: list[float] | None = field(default=None)


@runtime_checkable
class RolloutEngine(Protocol):
    """What the stage loops need from a rollout engine (torch and vLLM implement it).

    ``generate(prompts, params)`` returns one list per prompt, in prompt order, each holding
    ``params.n`` :class:`Generation` records ordered by ``sample_index``. With ``params.seed``
    set and sampling, prompt ``i``'s samples come from streams seeded by ``seed + i * n`` and do
    not depend on the other prompts of the call: a rank generating global prompts ``j0 ..`` with
    ``seed + j0 * n`` draws what one process drawing all of them draws.
    ``sync_policy(model)`` makes subsequent generations use ``model``'s current weights and returns
    the new weight version (collective when ``model`` is FSDP2-sharded: every rank calls it);
    ``weight_version`` is the version generations currently use (the trainer asserts it changed
    after a sync).
    ``lockstep()``: a context manager inside which ranks may make different numbers of
    ``generate`` calls of different lengths; an engine whose forwards are collective keeps every
    rank stepping until all have left it (a null context otherwise).
    ``sleep()`` / ``wake_up()``: release / restore the engine's device memory around training
    passes (no-ops where it holds none or cannot). ``close()``: release everything (idempotent).
    """

    def generate(self, prompts: Sequence[Sequence[int]],
                 params: SamplingParams) -> list[list[Generation]]:
        ...

    def sync_policy(self, model: nn.Module) -> int:
        ...

    @property
    def weight_version(self) -> int:
        ...

    def lockstep(self) -> ContextManager:
        ...

    def sleep(self) -> None:
        ...

    def wake_up(self) -> None:
        ...

    def close(self) -> None:
        ...
