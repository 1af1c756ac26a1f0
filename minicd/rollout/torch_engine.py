"""A pure-torch rollout engine: batched KV-cache sampling with the live policy module.

Each request is expanded to one row per (prompt, sample), prompt-major, and cut into batches of
at most ``max_batch_size`` rows. A batch's distinct prompts are left-padded and prefilled once
into a :class:`~minicd.model.decoder.KVCache`; decoding then runs on a
:class:`~minicd.model.shared_prefix_cache.SharedPrefixKVCache` built from it, which keeps each
distinct prompt's prefill K/V once (no per-sample copy) and each row's generated K/V in a
preallocated buffer, so a decode step reads a prompt's prefix once for all its samples (cascade
attention). The batch is decoded one token per step; a row finishes at one of ``stop_ids`` or
after ``max_new_tokens``; finished rows are dropped from the cache (``select``: it copies the
rows' generated K/V only) once a quarter of the rows have finished, so later steps mostly run
unfinished rows. Logits are cast to fp32 before sampling. On the CPU the forwards multiply by
oneDNN-packed copies of the linear weights (:mod:`minicd.model.packed_linear`; 1.4x faster than
``F.linear`` on a decode step's skinny products, 1.3x on a 2,048-row prefill), made once per
``generate`` call and dropped after it.

Seeded sampling (``params.seed`` or ``params.seeds``) gives every row (prompt ``i``, sample ``s``)
its own ``torch.Generator`` seeded :func:`~minicd.rollout.engine.prompt_seeds` ``[i] + s`` (vLLM's
convention: request seed ``seed + i * n``, sample ``s`` at ``+ s``), from which the row draws one
uniform number per token it samples (the row's first ``max_new_tokens`` draws are taken at
once, :func:`row_uniform_table`: the same numbers as one draw per token). A row's tokens then
depend only on its seed, its prompt and the model, not on the other rows of the call,
``max_batch_size`` or when the cache is compacted, so seeded calls batch all their rows like
unseeded ones (rank-sharded rollouts still equal one process's). Unseeded calls draw from one
non-deterministically seeded generator.

There is no weight copy: the engine calls the very module the trainer updates, so
``sync_policy`` only bumps the weight version (it exists so the stage loops can treat this engine
and the vLLM one alike).
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
from torch import nn

from minicd.errors import DataError
from minicd.log import progress as progress_bar
from minicd.model.decoder import KVCache
from minicd.model.packed_linear import packed_linears
from minicd.model.shared_prefix_cache import SharedPrefixKVCache
from minicd.rollout.engine import Generation, SamplingParams, prompt_seeds
from minicd.rollout.lockstep import Lockstep, is_sharded


_NULL_CONTEXT = contextlib.nullcontext()

COMPACT_AT = 0.75  # compact the cache when at most this fraction of its rows is still generating


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering of ``probs`` ``[B, V]`` (rows sum to 1), renormalised.

    Keeps, per row, the smallest set of most likely tokens whose cumulative probability is
    >= ``top_p`` (token k of the descending order is kept iff the mass strictly before it is
    < top_p, so the top token always survives); ties are broken by ``torch.sort``'s order.
    """
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(dim=-1, descending=True)  # [B, V]
    mass_before = sorted_p.cumsum(dim=-1) - sorted_p  # [B, V] exclusive cumulative sum
    keep_sorted = mass_before < top_p
    keep_sorted[:, 0] = True
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)  # [B, V]
    kept = probs * keep
    return kept / kept.sum(dim=-1, keepdim=True)


def sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None = None, *,
                u: torch.Tensor | None = None) -> torch.Tensor:
    """Next token ids ``[B]`` from fp32 ``logits`` ``[B, V]``.

    ``temperature == 0``: argmax (greedy). Otherwise a draw from top-p-filtered
    softmax(logits / temperature) by inverse-CDF sampling: one uniform number in [0, 1) per row
    and a binary search in the row's cumulative probabilities (``torch.multinomial`` draws one
    random number per vocabulary entry). The uniforms are ``u`` ``[B]`` when given (e.g.
    :func:`row_uniform_table`), else drawn from ``generator`` (never the global RNG when one is
    given). A token of probability 0 is never drawn.
    """
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)  # [B, V]
    probs = top_p_filter(probs, top_p)
    cdf = probs.cumsum_(dim=-1)  # [B, V] (probs is not used again)
    if u is None:
        u = torch.rand(cdf.shape[0], generator=generator, device=cdf.device)  # [B]
    elif u.shape != (cdf.shape[0],):
        raise ValueError(f"sample_next: u has shape {tuple(u.shape)}, expected ({cdf.shape[0]},)")
    u = u.to(device=cdf.device, dtype=cdf.dtype)[:, None] * cdf[:, -1:]  # [B, 1]
    # first token whose cumulative probability exceeds u: p_k > 0 and u in [cdf_{k-1}, cdf_k)
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_max(cdf.shape[1] - 1)


def row_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU ``torch.Generator`` per row, seeded with that row's seed."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def row_uniform_table(generators: Sequence[torch.Generator], n: int) -> torch.Tensor:
    """Uniforms ``[len(generators), n]`` in [0, 1): row r holds the first ``n`` draws of
    ``generators[r]`` (``torch.rand(n, generator=g)`` on a CPU generator draws the same numbers,
    in order, as ``n`` calls of ``torch.rand(1, generator=g)``); the t-th token of row r is
    sampled with entry ``[r, t]``."""
    return torch.stack([torch.rand(n, generator=g) for g in generators])


class TorchEngine:
    """:class:`~minicd.rollout.engine.RolloutEngine` sampling with the live ``model``.

    ``model``: a :class:`~minicd.model.decoder.DecoderLM` (LoRA-injected or not).
    ``tokenizer``: decodes response text (None: ``text`` is empty). ``device``: where prompts go
    (default: the model's device). Generation runs under ``torch.no_grad()`` with every module in
    eval mode; each module's previous train/eval mode is restored afterwards. ``packed_decode``:
    on the CPU, prefill and decode multiply by oneDNN-packed copies of the linear weights
    (:func:`~minicd.model.packed_linear.packed_linears`, packed once per ``generate`` call; a
    no-op where unsupported); False keeps ``F.linear``.
    """

    def __init__(self, model: nn.Module, tokenizer=None, *, max_batch_size: int = 64,
                 device: torch.device | str | None = None, packed_decode: bool = True) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self._device = torch.device(device) if device is not None else None
        self.pad_id = tokenizer.pad_id if tokenizer is not None else 0  # masked out anyway
        self.packed_decode = packed_decode
        self._version = 0

    @property
    def device(self) -> torch.device:
        """Where prompts and the unseeded sampling generator live (default: the model's device
        now); seeded rows draw their uniforms from CPU generators
        (see :func:`row_uniform_table`)."""
        return self._device if self._device is not None else self.model.device

    @property
    def weight_version(self) -> int:
        return self._version

    def sync_policy(self, model: nn.Module) -> int:
        """Sample with ``model`` from now on (normally the same live module) and bump the
        weight version, which is returned."""
        self.model = model
        self._version += 1
        return self._version

    def lockstep(self):
        """Rank-sharded generation context: on an FSDP2-sharded model (collective forwards) the
        ranks step together until every rank is done (:class:`~minicd.rollout.lockstep.Lockstep`);
        otherwise a null context."""
        if is_sharded(self.model):
            return Lockstep(self.model, self.device)
        return _NULL_CONTEXT

    def sleep(self) -> None:
        """No-op: the engine holds no memory of its own between calls."""

    def wake_up(self) -> None:
        """No-op (see :meth:`sleep`)."""

    def close(self) -> None:
        """No-op: nothing to release (the model belongs to the trainer)."""

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams, *,
                 progress: bool = False) -> list[list[Generation]]:
        """``params.n`` responses for each of ``prompts`` (token ids), grouped per prompt.

        Sampling with ``params.seed`` (or ``params.seeds``) set: sample ``s`` of prompt ``i``
        draws from its own ``torch.Generator`` seeded :func:`prompt_seeds` ``[i] + s``, one
        uniform per token, so it does not depend on the other prompts or rows of the call, nor
        on ``max_batch_size`` (the protocol's contract: rank-sharded rollouts equal one
        process's); all rows are batched together as in an unseeded call. Greedy results do not
        depend on batching. ``progress`` shows a bar over batches.
        """
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise DataError(f"generate: prompt {i} is empty; every prompt needs >= 1 token")
        seeds = prompt_seeds(params, len(prompts))
        rows = [(i, s) for i in range(len(prompts)) for s in range(params.n)]  # prompt-major
        generator = None
        if not params.greedy and seeds is None:
            generator = torch.Generator(device=self.device)
            generator.seed()  # non-deterministic, without touching the global RNG
        out: list[list[Generation]] = [[] for _ in prompts]
        starts = range(0, len(rows), self.max_batch_size)
        modes = {m: m.training for m in self.model.modules()}
        self.model.eval()
        try:  # weights are fixed during the call: packed once for all its batches
            with torch.no_grad(), packed_linears(self.model, self.packed_decode):
                for start in progress_bar(starts, desc="rollout", unit="batch",
                                          disable=None if progress else True):
                    batch = rows[start: start + self.max_batch_size]
                    row_gens = None
                    if not params.greedy and seeds is not None:
                        row_gens = row_generators([seeds[i] + s for i, s in batch])
                    results = self._generate_batch([prompts[i] for i, _ in batch], params,
                                                   generator, row_gens)
                    for (i, s), (tokens, logprobs, reason) in zip(batch, results):
                        out[i].append(Generation(i, s, tokens, self._decode(tokens, reason),
                                                 reason, logprobs))
        finally:
            for m, training in modes.items():
                m.training = training
        return out

    def _decode(self, tokens: list[int], reason: str) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(tokens[:-1] if reason == "stop" else tokens)

    def _last_logits(self, ids: torch.Tensor, mask: torch.Tensor | None,
                     cache: KVCache | SharedPrefixKVCache,
                     positions: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 logits ``[B, V]`` of the last position, appending ``ids`` to ``cache``."""
        logits = self.model(ids, position_ids=positions, attention_mask=mask, kv_cache=cache,
                            logits_to_keep=1)
        return logits[:, -1].float()

    def _generate_batch(self, prompts: list[Sequence[int]], params: SamplingParams,
                        generator: torch.Generator | None,
                        row_gens: list[torch.Generator] | None = None,
                        ) -> list[tuple[list[int], list[float] | None, str]]:
        """(token_ids, logprobs, finish_reason) per row of one batch.

        ``row_gens`` (seeded calls): one generator per row; row r samples its t-th token with
        the t-th draw of its own generator (:func:`row_uniform_table`), whatever the other rows
        do. Otherwise ``generator`` (None: greedy) draws for every cached row.

        Rows are prompt-major, so the ``n`` samples of a prompt are consecutive: each distinct
        prompt is prefilled once, its last logits are copied to its samples, and decoding runs
        on a :class:`SharedPrefixKVCache` that reads its prefix once per step for all of them.
        Decoding passes each row's position explicitly; a finished row stays in the cache (its
        outputs are ignored) until at most ``COMPACT_AT`` of the cached rows are alive, then the
        cache keeps the live rows only."""
        b, width = len(prompts), max(len(p) for p in prompts)
        distinct, owner = [], []  # consecutive equal prompts share one prefill row
        for p in prompts:
            if not (distinct and list(distinct[-1]) == list(p)):
                distinct.append(p)
            owner.append(len(distinct) - 1)
        u = len(distinct)
        ids = torch.full((u, width), self.pad_id, dtype=torch.long)  # [U, W] left-padded
        mask = torch.zeros(u, width, dtype=torch.long)  # [U, W]
        for r, p in enumerate(distinct):
            ids[r, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
            mask[r, width - len(p):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        prefill = KVCache.for_model(self.model, u, width)
        logits = self._last_logits(ids, mask, prefill)  # [U, V]
        if u < b:
            logits = logits[torch.as_tensor(owner, device=self.device)]  # [B, V]
        cache = SharedPrefixKVCache(prefill, owner, max(params.max_new_tokens - 1, 1))
        pos = torch.as_tensor([len(p) for p in prompts], device=self.device)  # [B] next position
        uniforms = None  # [rows, max_new] seeded rows' draws (compacted with the cache)
        if row_gens is not None:
            uniforms = row_uniform_table(row_gens, params.max_new_tokens).to(self.device)

        stop = set(params.stop_ids)
        tokens: list[list[int]] = [[] for _ in range(b)]
        logprobs: list[list[float]] | None = [[] for _ in range(b)] \
            if params.return_logprobs else None
        reasons = ["length"] * b
        rows = list(range(b))  # batch row of each cache row
        alive = [True] * b  # per cache row: still generating
        for step in range(params.max_new_tokens):
            if uniforms is None:
                nxt = sample_next(logits, params.temperature, params.top_p, generator)  # [rows]
            else:
                nxt = sample_next(logits, params.temperature, params.top_p,
                                  u=uniforms[:, step])  # [rows]
            if logprobs is not None:  # raw distribution (temperature 1), see Generation
                lp = torch.log_softmax(logits, dim=-1).gather(-1, nxt[:, None]).squeeze(-1)
                for j, value in enumerate(lp.tolist()):
                    if alive[j]:
                        logprobs[rows[j]].append(value)
            for j, tok in enumerate(nxt.tolist()):
                if not alive[j]:
                    continue
                row = rows[j]
                tokens[row].append(tok)
                if tok in stop:
                    reasons[row] = "stop"
                    alive[j] = False
                elif len(tokens[row]) >= params.max_new_tokens:
                    alive[j] = False
            n_alive = sum(alive)
            if not n_alive:
                break
            if n_alive <= COMPACT_AT * len(rows):  # drop finished rows from the cache
                keep = [j for j, a in enumerate(alive) if a]
                index = torch.tensor(keep, device=self.device)
                cache.select(keep)
                nxt, pos = nxt[index], pos[index]
                if uniforms is not None:
                    uniforms = uniforms[index]
                rows, alive = [rows[j] for j in keep], [True] * len(keep)
            logits = self._last_logits(nxt[:, None], None, cache, pos[:, None])  # [rows, V]
            pos = pos + 1
        return [(tokens[r], None if logprobs is None else logprobs[r], reasons[r])
                for r in range(b)]
