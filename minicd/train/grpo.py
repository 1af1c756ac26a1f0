"""The GRPO stage loop (paper Sec. 4.2, Appendix E "GRPO"): sample-F1 reward, group advantages,
clipped objective with a KL penalty to the reference policy (the policy with its adapter disabled).

One step, as in DESIGN.md "Data flow of one GRPO step" (see :func:`run_grpo`):

1. Draw B = ``grpo.prompts_per_step`` training records (global; rank r keeps the r-th slice of
   B / world). The order is a permutation per epoch from ``numpy.random.default_rng([train.seed,
   epoch])``, so it depends only on (seed, step): resuming needs nothing but the step. Each
   record's prompt comes from a ``build_prompt(record, step, global_index)`` hook (default: the
   hint-free coding prompt); PHI passes one that renders hinted prompts. All G rollouts of a
   prompt share it. With ``grpo.filter_groups`` (DAPO dynamic sampling) steps 1, 3 and 4 repeat
   in draw rounds of B further records (:func:`draw_prompt_indices`) until B groups with unequal
   rewards are kept or ``grpo.max_draws`` rounds are drawn; the decision is taken on the rewards
   of every rank, and each rank trains on its share of the kept groups (:func:`share_groups`).
2. Push the policy into the rollout engine and check its weight version moved.
3. Sample G = ``grpo.group_size`` responses per prompt, with the engine's per-token log-probs.
   Seeds come from (train.seed, step) and the GLOBAL prompt index, so one process and N
   processes draw the same samples (see :func:`generate_groups`).
4. Reward = sample F1 of the parsed codes against the full gold set (0 without a span); other
   rewards (F-beta, class-balanced F1, the release's fallback, a missed-code bonus, a user
   function) through ``grpo.reward`` (:func:`minicd.algo.reward.make_reward`), each given a
   :class:`~minicd.algo.reward.RewardContext` (training code frequencies, the record's pool).
5. Group advantages (Eq. 1, or ``grpo.advantage``); old log-probs (the detached current ones
   with one update per batch, else recomputed once before the updates); reference log-probs
   under ``disable_adapters``. Responses cut at max_new_tokens leave the loss with
   ``grpo.mask_truncated``. The engine's log-probs give the mismatch statistics and, with
   ``grpo.tis_cap``, truncated importance weights.
6. Clipped objective + beta x KL (Eq. 2) per micro-batch, rescaled so the loss is the token mean
   over the GLOBAL batch (all micro-batches and ranks); backward; clip; AdamW step (constant lr).
7. Log, validate greedily every ``train.eval_every`` steps, checkpoint every ``train.save_every``
   steps, on SIGTERM and at the end; the final adapter goes to ``output_dir/adapter``.

Nothing here logs note or response text: only numbers.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from minicd import dist
from minicd.algo.grpo import group_advantages, policy_loss, tis_weights
from minicd.algo.logprobs import model_token_logprobs, shared_prefix_logprobs
from minicd.algo.reward import RewardContext, code_frequencies, make_reward
from minicd.checkpoint import SigtermFlag, capture_rng, save_checkpoint
from minicd.config import Config, GRPOConfig, dump_config, parse_reward_spec
from minicd.data.records import Record
from minicd.errors import ConfigError
from minicd.log import progress
from minicd.metrics import corpus_metrics
from minicd.model.lora import disable_adapters
from minicd.parse import ParsedCodes
from minicd.rollout.engine import Generation, SamplingParams
from minicd.rollout.inference import StageEngine
from minicd.train.common import (Policy, build_optimizer, build_policy, merged_start,
                                 clip_grad_norm, compute_autocast, end_step, finish_stage, load_split,
                                 open_metrics_logger, prompt_ids, resume_state, start_step)

# (record, step, global prompt index) -> prompt token ids. PHI renders hinted prompts here.
PromptBuilder = Callable[[Record, int, int], list[int]]


# ------------------------------------------------------------------ 1. prompts
def step_prompt_indices(n_records: int, prompts_per_step: int, seed: int, step: int) -> list[int]:
    """Global indices of the B training records of ``step`` (0-based), deterministic in (seed, step).

    Epoch e is ``default_rng([seed, e]).permutation(n_records)`` cut into ``n_records // B``
    steps; leftover records at the end of an epoch are not used in that epoch.
    """
    steps_per_epoch = n_records // prompts_per_step
    assert steps_per_epoch >= 1, (n_records, prompts_per_step)
    epoch, index = divmod(step, steps_per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n_records)
    return perm[index * prompts_per_step:(index + 1) * prompts_per_step].tolist()


def draw_prompt_indices(n_records: int, prompts_per_step: int, seed: int, step: int,
                        rounds: int) -> list[list[int]]:
    """The records of each draw round of ``step`` (DAPO dynamic sampling, ``grpo.filter_groups``):
    up to ``rounds`` lists of B = ``prompts_per_step`` global record indices, deterministic in
    (seed, step).

    Round 0 is :func:`step_prompt_indices` (the step's own records). Round d >= 1 takes the first
    B records of ``default_rng([seed, step, d]).permutation(n_records)`` that no earlier round of
    the step drew, so a step never draws a record twice; such extra records may also be drawn by
    another step of the epoch. Rounds stop early when fewer than B undrawn records are left.
    """
    out = [step_prompt_indices(n_records, prompts_per_step, seed, step)]
    used = set(out[0])
    for d in range(1, rounds):
        if n_records - len(used) < prompts_per_step:
            break
        perm = np.random.default_rng([seed, step, d]).permutation(n_records)
        out.append([int(i) for i in perm if i not in used][:prompts_per_step])
        used.update(out[-1])
    return out


def keep_groups(group_rewards: Sequence[Sequence[float]], want: int) -> list[int]:
    """DAPO's filter: positions of the groups, in order, whose rewards are not all equal (a flat
    group has zero advantages: no signal), at most ``want`` of them."""
    kept = [i for i, r in enumerate(group_rewards) if max(r) != min(r)]
    return kept[:want]


def rank_shard(n_prompts: int, rank: int, world: int) -> range:
    """The global prompt positions rank ``rank`` trains on (a contiguous slice of B / world)."""
    per = n_prompts // world
    return range(rank * per, (rank + 1) * per)


# ------------------------------------------------------------------ 2-3. sync and sample
def sync_engine(engine, model: nn.Module) -> int:
    """Wake ``engine`` and push the current policy into it; fail loudly if its weight version did
    not move (the classic stale-weights rollout bug). Collective under FSDP2 (an engine that
    needs full weights gathers them in its ``sync_policy``)."""
    engine.wake_up()
    before = engine.weight_version
    version = engine.sync_policy(model)
    if engine.weight_version == before:
        raise RuntimeError(f"rollout engine weight version stayed at {before} after sync_policy: "
                           "generations would use stale weights")
    return version


def rollout_seed(seed: int, step: int) -> int:
    """The sampling seed of ``step`` (a 32-bit value mixed from (train.seed, step))."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1)[0])


def generate_groups(engine, prompts: Sequence[Sequence[int]], first: int,
                    params: SamplingParams, seed: int) -> list[list[Generation]]:
    """G = ``params.n`` samples for each of this rank's ``prompts``, which are the global prompts
    ``first, first + 1, ..`` of the step.

    Every rank generates only its own prompts. Global prompt j is seeded ``seed + j * G`` (the
    engine protocol's per-prompt seeds), so the samples do not depend on the number of ranks.
    Inside the engine's ``lockstep`` ranks whose forwards are collective (torch engine, FSDP2)
    step together until every rank is done.
    """
    with engine.lockstep():
        return engine.generate(prompts, dataclasses.replace(params, seed=seed + first * params.n))


# ------------------------------------------------------------------ 4. reward
# The rewards live in minicd.algo.reward (``make_reward`` is importable from here too).
@dataclass
class Rollout:
    """One prompt's group: its G samples, their rewards and parsed codes, the record's gold."""

    prompt: list[int]
    gens: list[Generation]
    rewards: list[float]
    parsed: list[ParsedCodes]
    gold: tuple[str, ...]
    index: int  # the prompt's global index in its step (build_prompt's ``global_index``)


def sample_groups(engine, records: Sequence[Record], shard: range, first: int, step: int,
                  build_prompt: PromptBuilder, reward_fn, reward_context, params: SamplingParams,
                  seed: int) -> list[Rollout]:
    """Steps 1, 3, 4 for one draw round: this rank's ``shard`` of the round's B ``records``
    (global prompt indices ``first + j``): prompts, G samples each (:func:`generate_groups`),
    rewards."""
    prompts = [build_prompt(records[j], step, first + j) for j in shard]
    groups = generate_groups(engine, prompts, first + shard.start, params, seed)
    out = []
    for j, p, gens in zip(shard, prompts, groups):
        rec, context = records[j], reward_context(records[j])
        scored = [reward_fn(x.text, rec.codes, context) for x in gens]
        out.append(Rollout(list(p), list(gens), [r for r, _ in scored], [c for _, c in scored],
                           rec.codes, first + j))
    return out


def share_groups(groups: list[Rollout], rank: int, world: int) -> tuple[list[Rollout], int]:
    """This rank's contiguous share of the K kept ``groups`` (global order) and how many of its
    groups are padding: K is padded to a multiple of ``world`` with copies of the last group,
    trained with keep 0 (out of the loss), so every rank runs the same number of micro-batches
    (FSDP2 lockstep) and the loss equals one process's on the K groups."""
    per = -(-len(groups) // world)
    padded = groups + groups[-1:] * (per * world - len(groups))
    mine = padded[rank * per:(rank + 1) * per]
    return mine, max(0, (rank + 1) * per - len(groups)) - max(0, rank * per - len(groups))


def rollout_batch(groups: list[Rollout], group_size: int, g: GRPOConfig,
                  pad_rows: int = 0) -> RolloutBatch:
    """Step 5's inputs: rows group by group, advantages (Eq. 1 or ``grpo.advantage``), keep
    (``grpo.mask_truncated``; 0 on the last ``pad_rows`` rows) and the engine's log-probs (None
    when the engine returned none)."""
    gens = [x for r in groups for x in r.gens]                                    # [N]
    rewards = torch.tensor([v for r in groups for v in r.rewards])                # [N]
    advantages = group_advantages(rewards, group_size, g.advantage)               # [N]
    keep = None
    if g.mask_truncated or pad_rows:
        keep = torch.tensor([not (g.mask_truncated and x.finish_reason == "length")
                             for x in gens], dtype=torch.float32)                 # [N]
        if pad_rows:
            keep[len(gens) - pad_rows:] = 0.0
            advantages[len(gens) - pad_rows:] = 0.0
    logprobs = None
    if all(x.logprobs is not None for x in gens):
        logprobs = [list(x.logprobs) for x in gens]
    return RolloutBatch([r.prompt for r in groups for _ in range(group_size)],
                        [x.token_ids for x in gens], advantages, keep, logprobs, pad_rows)


# ------------------------------------------------------------------ 5-6. log-probs and update
@dataclass
class RolloutBatch:
    """This rank's N = (B / world) x G rows, group by group: prompt, response (with its stop
    token when one was generated) and advantage of each row."""

    prompts: list[list[int]]
    responses: list[list[int]]
    advantages: torch.Tensor  # [N]
    keep: torch.Tensor | None = None  # [N] 0 for rows left out of the loss (grpo.mask_truncated)
    # the engine's per-token log-probs of each response (aligned with its tokens), or None
    rollout_logprobs: list[list[float]] | None = None
    pad_rows: int = 0  # trailing rows that only pad a rank's share (keep 0; grpo.filter_groups)


def collate_rollouts(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                     pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows ``[left-padded prompt | right-padded response]``.

    Returns input_ids ``[n, P + R]``, attention_mask ``[n, P + R]`` and response_mask ``[n, R]``
    (1 on real response tokens), where P / R are the longest prompt / response. The last R
    next-token targets of a row are exactly its response tokens (``model_token_logprobs(...,
    last_n=R)``); positions come from the attention mask, so left padding is harmless.
    """
    n = len(prompts)
    p_len, r_len = max(len(p) for p in prompts), max(len(r) for r in responses)
    ids = torch.full((n, p_len + r_len), pad_id, dtype=torch.long)     # [n, P+R]
    attn = torch.zeros(n, p_len + r_len, dtype=torch.long)             # [n, P+R]
    resp_mask = torch.zeros(n, r_len)                                  # [n, R]
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, p_len - len(p):p_len] = torch.as_tensor(list(p), dtype=torch.long)
        ids[i, p_len:p_len + len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        attn[i, p_len - len(p):p_len + len(r)] = 1
        resp_mask[i, :len(r)] = 1
    return ids, attn, resp_mask


def response_logprobs(model: nn.Module, ids: torch.Tensor, attn: torch.Tensor, r_len: int,
                      with_entropy: bool = False):
    """Per-token log-probs ``[n, R]`` (and entropies) of the response part of collated rows."""
    return model_token_logprobs(model, ids, attn, last_n=r_len, with_entropy=with_entropy)


@dataclass
class MicroBatch:
    """Rows ``[s, s + micro_batch_size)`` of a :class:`RolloutBatch`, ready to score.

    ``shared``: the prompts of consecutive rows that share one are computed once
    (:func:`shared_prefix_logprobs`); otherwise rows are collated ``[prompt | response]``."""

    prompts: list[list[int]]       # shared: the distinct prompts; else one per row
    responses: list[list[int]]
    owner: list[int]               # prompt index of each row
    mask: torch.Tensor             # [b, R] 1 on real response tokens
    advantages: torch.Tensor       # [b]
    shared: bool
    pad_id: int
    rows: tuple[torch.Tensor, torch.Tensor] | None = None  # not shared: collated ids, attention
    rollout_logp: torch.Tensor | None = None  # [b, R] the engine's log-probs (0 on padding)

    def logprobs(self, model: nn.Module, with_entropy: bool = False):
        """Log-probs ``[b, R]`` (and entropies) of the responses under ``model``."""
        if self.shared:
            return shared_prefix_logprobs(model, self.prompts, self.responses, self.owner,
                                          self.pad_id, with_entropy=with_entropy)
        ids, attn = self.rows
        return response_logprobs(model, ids, attn, self.mask.shape[1], with_entropy=with_entropy)


def micro_batches(batch: RolloutBatch, micro_batch_size: int, pad_id: int, *, shared: bool,
                  device: torch.device | str = "cpu") -> list[MicroBatch]:
    """Cut ``batch`` into micro-batches; with ``shared``, consecutive rows with equal prompts
    (the G samples of a group) point at one copy of it."""
    out = []
    for s in range(0, len(batch.prompts), micro_batch_size):
        prompts, owner = [], []
        for p in batch.prompts[s:s + micro_batch_size]:
            if not (shared and prompts and prompts[-1] == p):
                prompts.append(list(p))
            owner.append(len(prompts) - 1)
        responses = [list(r) for r in batch.responses[s:s + micro_batch_size]]
        rows = None
        if shared:
            mask = torch.zeros(len(responses), max(len(r) for r in responses))  # [b, R]
            for i, r in enumerate(responses):
                mask[i, :len(r)] = 1
        else:  # collated once, scored by the reference pass and every update
            ids, attn, mask = collate_rollouts([prompts[o] for o in owner], responses, pad_id)
            rows = (ids.to(device), attn.to(device))
        if batch.keep is not None:  # rows left out of the loss (grpo.mask_truncated)
            mask = mask * batch.keep[s:s + micro_batch_size].to(mask.dtype).unsqueeze(1)
        rollout_logp = None
        if batch.rollout_logprobs is not None:  # [b, R] aligned with the response tokens
            rollout_logp = torch.zeros(mask.shape)
            for i, lp in enumerate(batch.rollout_logprobs[s:s + micro_batch_size]):
                rollout_logp[i, :len(lp)] = torch.as_tensor(lp, dtype=torch.float32)
            rollout_logp = rollout_logp.to(device)
        out.append(MicroBatch(prompts, responses, owner, mask.to(device),
                              batch.advantages[s:s + micro_batch_size].to(device), shared, pad_id,
                              rows, rollout_logp))
    return out


STAT_KEYS = ("loss", "pg_loss", "kl", "clip_frac_low", "clip_frac_high", "dual_clip_frac",
             "approx_kl_old", "ratio_mean", "entropy")
# logged when the engine returned its log-probs (tis_weights): mean |old - rollout logp|, share of
# tokens with exp(old - rollout) outside [0.9, 1.1], share held at grpo.tis_cap
MISMATCH_KEYS = ("mismatch_abs_logp", "mismatch_out_frac", "tis_clip_frac")


def _as_stat(value, device) -> torch.Tensor:
    """A loss statistic as a detached fp64 0-dim tensor on ``device`` (no host sync)."""
    return torch.as_tensor(value).detach().to(device=device, dtype=torch.float64)


def grpo_update(model: nn.Module, optimizer: torch.optim.Optimizer, batch: RolloutBatch,
                g: GRPOConfig, *, micro_batch_size: int, pad_id: int,
                device: torch.device | str = "cpu", norm_len: int | None = None,
                autocast: contextlib.AbstractContextManager | None = None) -> dict[str, float]:
    """Steps 5-6: log-probs, then ``g.updates_per_batch`` optimizer steps on ``batch`` (Eq. 2).

    The loss of each micro-batch (``policy_loss``, a mean over its own tokens or rows) is weighted
    by its share of the GLOBAL token (token-mean) or row (seq-mean) count and multiplied by the
    world size, because FSDP averages gradients over ranks: the summed gradient is that of the
    global-batch loss, whatever the micro-batching and world size (``seq-mean`` counts the rows
    with a token in the loss; ``seq-mean-token-sum-norm`` every row, with Dr. GRPO's constant
    ``norm_len``, rollout.max_new_tokens; default: the longest response of ``batch``). With
    ``g.shared_prefix`` each group's prompt is computed once per micro-batch
    (:func:`shared_prefix_logprobs`; same values and gradients up to float rounding). Returns
    global floats: loss, pg_loss, kl, clip fractions, approx_kl_old, ratio_mean, entropy,
    grad_norm (of the last update), time_logp_s and time_update_s. Gradients of the last update
    stay in ``.grad``. ``autocast`` (``common.compute_autocast``) wraps the forward passes.

    Rollout/trainer mismatch: when ``batch.rollout_logprobs`` is set, the engine's log-probs are
    compared with the old log-probs (the trainer's, of the weights that sampled) and
    ``MISMATCH_KEYS`` are returned too; with ``g.tis_cap`` = C each token's policy-gradient loss
    is weighted by min(exp(old_logp - rollout_logp), C) (:func:`tis_weights`, ``is_weights=``).
    ``batch.pad_rows`` trailing rows (keep 0) only pad this rank's share: they are left out of
    every count, Dr. GRPO's row count included.

    One host sync per call for the statistics: they stay device tensors, summed over
    micro-batches, and are reduced over ranks and read back once at the end (token counts come
    from the response lengths and ``batch.keep``, known on the host).
    """
    world = dist.get_world_size()
    if g.tis_cap is not None and batch.rollout_logprobs is None:
        raise ConfigError(f"grpo.tis_cap = {g.tis_cap}: the rollout engine returned no per-token "
                          "log-probs; use an engine that does (torch, vllm) or unset grpo.tis_cap")
    if batch.rollout_logprobs is not None:
        for r, lp in zip(batch.responses, batch.rollout_logprobs):
            if lp is None or len(lp) != len(r):
                raise RuntimeError(f"rollout log-probs ({None if lp is None else len(lp)}) not "
                                   f"aligned with the {len(r)} response tokens")
    keys = STAT_KEYS + (MISMATCH_KEYS if batch.rollout_logprobs is not None else ())
    mbs = micro_batches(batch, micro_batch_size, pad_id, shared=g.shared_prefix, device=device)
    keep = batch.keep.tolist() if batch.keep is not None else [1.0] * len(batch.responses)
    row_tokens = [len(r) * k for r, k in zip(batch.responses, keep)]      # host: no sync
    starts = range(0, len(row_tokens), micro_batch_size)                   # as micro_batches
    tokens = [float(sum(row_tokens[s:s + micro_batch_size])) for s in starts]
    if g.agg == "seq-mean":  # rows with a token in the loss (grpo.mask_truncated drops some)
        rows = [float(sum(t > 0 for t in row_tokens[s:s + micro_batch_size])) for s in starts]
    else:
        rows = [float(len(row_tokens[s:s + micro_batch_size])) for s in starts]
    if norm_len is None:
        norm_len = max(len(r) for r in batch.responses)
    real_rows = sum(rows) - (batch.pad_rows if g.agg == "seq-mean-token-sum-norm" else 0)
    global_tokens, global_rows = (max(float(x), 1.0) for x in dist.all_reduce_sum(
        torch.tensor([sum(tokens), real_rows], dtype=torch.float64)).tolist())
    # share of the global loss each micro-batch's own mean stands for (x world: FSDP averages)
    agg_counts, agg_total = (tokens, global_tokens) if g.agg == "token-mean" else (rows, global_rows)
    weights = [c / agg_total * world for c in agg_counts]
    tok_share = [c / global_tokens for c in tokens]  # for per-token statistics

    autocast = autocast if autocast is not None else contextlib.nullcontext()
    t0 = time.perf_counter()
    ref, old = [None] * len(mbs), [None] * len(mbs)
    with torch.no_grad(), autocast:
        if g.kl_coef != 0:  # reference policy = this model with its adapter disabled
            with disable_adapters(model):
                ref = [m.logprobs(model) for m in mbs]
        if g.updates_per_batch > 1:  # old policy = the weights that sampled the batch
            old = [m.logprobs(model) for m in mbs]
    time_logp = time.perf_counter() - t0

    t0 = time.perf_counter()
    for update in range(g.updates_per_batch):
        sums = {k: torch.zeros((), dtype=torch.float64, device=device) for k in keys}
        optimizer.zero_grad(set_to_none=True)
        for k, m in enumerate(mbs):
            mask, adv = m.mask, m.advantages
            if world > 1 and hasattr(model, "set_requires_gradient_sync"):
                model.set_requires_gradient_sync(k == len(mbs) - 1)
            with autocast:
                logp, entropy = m.logprobs(model, with_entropy=True)  # [b, R]
            old_logp = logp.detach() if old[k] is None else old[k]
            is_weights = None
            if m.rollout_logp is not None:  # engine vs trainer (TIS weights only with tis_cap)
                cap = g.tis_cap if g.tis_cap is not None else math.inf
                w, mismatch = tis_weights(old_logp, m.rollout_logp, cap, mask)
                is_weights = w if g.tis_cap is not None else None
                for key in MISMATCH_KEYS:
                    sums[key] += _as_stat(mismatch[key], device) * tok_share[k]
            loss, stats = policy_loss(logp, old_logp, ref[k], adv, mask, g.clip_low, g.clip_high,
                                      g.kl_coef, g.kl_kind, g.agg, g.dual_clip,
                                      ratio_level=g.ratio_level, loss=g.loss,
                                      is_weights=is_weights, norm_len=norm_len)
            (loss * weights[k]).backward()
            sums["loss"] += _as_stat(loss, device) * (weights[k] / world)
            for key in ("pg_loss", "kl"):
                sums[key] += _as_stat(stats[key], device) * (weights[k] / world)
            for key in ("clip_frac_low", "clip_frac_high", "dual_clip_frac", "approx_kl_old",
                        "ratio_mean"):
                sums[key] += _as_stat(stats[key], device) * tok_share[k]
            sums["entropy"] += _as_stat((entropy.detach() * mask).sum(), device) / global_tokens
        grad_norm = clip_grad_norm(model, g.grad_clip, sync=False)
        optimizer.step()
    time_update = time.perf_counter() - t0
    # the one sync: every statistic summed over ranks in one all-reduce, read back in one copy
    summed = dist.all_reduce_sum(torch.stack([sums[k] for k in keys]))
    values = torch.cat([summed, _as_stat(grad_norm, summed.device).reshape(1)]).tolist()
    out = dict(zip(keys, values[:-1]))
    out.update(grad_norm=values[-1], time_logp_s=time_logp, time_update_s=time_update)
    return out


# ------------------------------------------------------------------ the loop
def _check_world(cfg: Config, world: int) -> None:
    if cfg.grpo.prompts_per_step % world:
        raise ConfigError(f"grpo.prompts_per_step = {cfg.grpo.prompts_per_step} is not divisible "
                          f"by the {world} ranks; make it a multiple of the world size")


def _batch_stats(gens: list[Generation], rewards: list[float], parsed: list[ParsedCodes],
                 golds: list[tuple[str, ...]], group_size: int) -> dict[str, float]:
    """Reward, F1 and length statistics of the global batch (gathered from every rank), and
    ``rollout_prompts_rank_max``: the most prompts one rank generated (B / world when sharded)."""
    local = {"rewards": rewards, "codes": [p.codes for p in parsed], "golds": golds,
             "span": [p.has_span for p in parsed], "lengths": [len(x.token_ids) for x in gens],
             "truncated": [x.finish_reason == "length" for x in gens]}
    parts = dist.all_gather_objects(local)
    every = {k: [v for part in parts for v in part[k]] for k in local}
    r = np.asarray(every["rewards"], dtype=np.float64)
    groups = r.reshape(-1, group_size)
    micro = corpus_metrics(every["codes"], every["golds"])["micro_f1"]
    return {"reward_mean": float(r.mean()), "reward_std": float(r.std()),
            "zero_var_frac": float(np.mean(groups.max(1) == groups.min(1))),
            "batch_micro_f1": float(micro), "span_rate": float(np.mean(every["span"])),
            "response_len_mean": float(np.mean(every["lengths"])),
            "truncation_rate": float(np.mean(every["truncated"])),
            "response_tokens": int(sum(every["lengths"])),
            "rollout_prompts_rank_max": max(len(part["rewards"]) for part in parts) // group_size}


def default_prompt_builder(tok, data_cfg) -> PromptBuilder:
    """The hint-free prompt of each record (encoded once per record)."""
    cache: dict[int, list[int]] = {}

    def build_prompt(rec: Record, step: int, index: int) -> list[int]:
        if id(rec) not in cache:
            cache[id(rec)] = prompt_ids(rec, tok, data_cfg)
        return cache[id(rec)]

    return build_prompt


# (policy, engine) -> None: PHI's pool refresh with the final policy, before the engine closes
EndHook = Callable[[Policy, object], None]
# (step, this rank's drawn groups) -> None: PHI records the codes every sample answered
RolloutHook = Callable[[int, list[Rollout]], None]


def run_grpo(cfg: Config, *, build_prompt: PromptBuilder | None = None,
             train_records: Sequence[Record] | None = None,
             reward_context: Callable[[Record], RewardContext] | None = None, engine=None,
             on_end: EndHook | None = None, on_rollouts: RolloutHook | None = None) -> dict:
    """Train with GRPO as configured; return the last step's metrics plus ``step``, ``stopped``
    and ``steps`` (the step numbers this call ran, in order; empty when a resume found the run
    finished).

    ``build_prompt(record, step, global_index) -> prompt ids`` (default: the hint-free prompt)
    lets PHI render hinted prompts; it is called once per prompt this rank trains on.
    ``train_records`` (default: the training split, capped by ``data.train_limit``) are the
    records the steps draw from; PHI passes the ones whose hint pools are not empty.
    ``reward_context(record)`` gives the reward its context (default: the code frequencies of
    ``train_records`` and no pool); PHI passes the training split's frequencies and the pools.
    ``engine``: the stage's :class:`~minicd.rollout.inference.StageEngine` (PHI: one engine for
    all rounds and refreshes; built on first use, synced with this run's policy, left open); by
    default one is built here and closed when the run ends.
    ``on_end(policy, engine)``: called after the last step (engine awake and synced with the
    final policy), before the final export; PHI refreshes its pools there.
    ``on_rollouts(step, groups)``: called on every rank after each step's sampling, with the
    step index ``build_prompt`` got and this rank's drawn groups (:class:`Rollout`, each with
    its global prompt index); PHI records which codes the samples of hinted prompts answered.
    Writes ``output_dir/metrics.jsonl`` (one line per step with: reward_mean, reward_std,
    batch_micro_f1, zero_var_frac, span_rate, loss, pg_loss, kl, entropy, clip_frac_low,
    clip_frac_high, dual_clip_frac, approx_kl_old, ratio_mean, response_len_mean,
    truncation_rate, response_tokens, rollout_prompts_rank_max, grad_norm, lr, time_gen_s,
    time_logp_s, time_update_s, step_time_s, tokens_per_s, epoch, prompts_drawn,
    prompts_kept; mismatch_abs_logp, mismatch_out_frac, tis_clip_frac when the engine returns
    log-probs; no loss keys in a step whose groups were all dropped by grpo.filter_groups;
    ``val/...`` keys every ``train.eval_every`` steps and at the end), checkpoints under
    ``output_dir/checkpoints``
    and the final adapter.
    """
    t = cfg.validate("grpo").train
    info = dist.init_distributed(t.device, timeout_s=t.dist_timeout_s)
    _check_world(cfg, info.world_size)
    g = cfg.grpo
    if reward_context is None and parse_reward_spec(g.reward).missed:
        raise ConfigError(f"grpo.reward = {g.reward!r}: the '+missed' bonus needs --stage phi (a "
                          "record's pool of missed codes comes from PHI's previous predictions); "
                          "drop it for --stage grpo")
    train_recs = (list(train_records) if train_records is not None  # data before the model
                  else load_split(cfg, "train", cfg.data.train_limit))
    val_recs = load_split(cfg, "val", cfg.data.val_limit) if cfg.data.val_limit != 0 else []
    if engine is None and cfg.rollout.engine == "vllm" and cfg.lora.init_adapter \
            and cfg.lora.init_mode == "merge":
        # vLLM loads its base weights from disk: give it the merged start policy, not the bare
        # base (same policy and reference for the trainer: a fresh adapter on the merged model)
        base, _ = merged_start(cfg, Path(t.output_dir) / "start_model", info,
                               rebuild=not t.resume)
        cfg = copy.deepcopy(cfg)
        cfg.model.path, cfg.lora.init_adapter = base, None
    policy = build_policy(cfg, info)
    slot = engine if engine is not None else StageEngine()
    try:
        rollout_engine = slot.get(cfg, policy.model, policy.tokenizer, policy.lora_cfg,
                                  device=info.device)
        return _grpo_loop(cfg, info, policy, rollout_engine, build_prompt, train_recs,
                          val_recs, reward_context, on_end, on_rollouts)
    finally:
        if engine is None:
            slot.close()


def _grpo_loop(cfg: Config, info: dist.DistInfo, policy: Policy, engine,
               build_prompt: PromptBuilder | None, train_recs: list[Record],
               val_recs: list[Record], reward_context: Callable[[Record], RewardContext] | None,
               on_end: EndHook | None, on_rollouts: RolloutHook | None) -> dict:
    """The step loop of :func:`run_grpo` with its policy, engine and data ready."""
    t, g, ro = cfg.train, cfg.grpo, cfg.rollout
    reward_fn = make_reward(g.reward)
    model, tok = policy.model, policy.tokenizer
    autocast = compute_autocast(cfg, info)
    out_dir = Path(t.output_dir)

    val_prompts = [prompt_ids(r, tok, cfg.data) for r in val_recs]
    if reward_context is None:
        shared_context = RewardContext(freq=code_frequencies(r.codes for r in train_recs))

        def reward_context(rec: Record) -> RewardContext:
            return shared_context
    B, G = g.prompts_per_step, g.group_size
    steps_per_epoch = len(train_recs) // B
    if steps_per_epoch < 1:
        raise ConfigError(f"{len(train_recs)} training records do not fill one step of "
                          f"grpo.prompts_per_step = {B}; lower it or add data")
    total = t.max_steps if t.max_steps is not None else math.ceil(g.epochs * steps_per_epoch)
    if build_prompt is None:
        build_prompt = default_prompt_builder(tok, cfg.data)

    optimizer = build_optimizer(model, g.lr, g.weight_decay)  # constant lr, as the release
    # the engine's log-probs are always requested: they cost the torch engine one log_softmax
    # per decode step and give the mismatch statistics (grpo.tis_cap uses them as weights)
    params = SamplingParams(n=G, temperature=ro.temperature, top_p=ro.top_p,
                            max_new_tokens=ro.max_new_tokens, stop_ids=tok.stop_ids,
                            return_logprobs=True)
    shard = rank_shard(B, info.rank, info.world_size)
    config_text = dump_config(cfg)
    step = 0
    if t.resume:
        step, _ = resume_state(cfg, model, optimizer, config_text=config_text,
                               is_main=info.is_main)
    logger = open_metrics_logger(cfg, info.is_main)
    start_step(cfg, step, model=model, tok=tok, val_recs=val_recs, val_prompts=val_prompts,
               logger=logger, engine=engine)
    last: dict = {}
    ran: list[int] = []
    stopped = False

    def save(at: int) -> None:
        save_checkpoint(out_dir, at, model=model, optimizer=optimizer, lora_cfg=policy.lora_cfg,
                        config_text=config_text, rng=capture_rng(),
                        trainer_state={"epoch": at / steps_per_epoch, "metrics": last},
                        keep_last=t.keep_last)

    model.train()
    bar = progress(total=total, desc="grpo", unit="step", disable=None if info.is_main else True)
    bar.update(step)
    with SigtermFlag() as flag:
        while step < total:
            t_step = time.perf_counter()
            # 1-4. draw rounds of B records (one without grpo.filter_groups); this rank builds,
            # samples and scores its shard of each round; the policy is pushed once per step
            sync_engine(engine, model)
            t0 = time.perf_counter()
            rounds = draw_prompt_indices(len(train_recs), B, t.seed, step,
                                         g.max_draws if g.filter_groups else 1)
            drawn: list[Rollout] = []   # this rank's groups of every round (for the statistics)
            kept: list[Rollout] = []    # the groups to train on (global order with filter_groups)
            for d, indices in enumerate(rounds):
                first = d * B  # global prompt index of the round's first prompt (seeds, hints)
                local = sample_groups(engine, [train_recs[i] for i in indices], shard, first,
                                      step, build_prompt, reward_fn, reward_context, params,
                                      rollout_seed(t.seed, step))
                drawn += local
                if not g.filter_groups:
                    kept = local
                    break
                # every rank sees every group of the round, so all take the same decision
                every = [x for part in dist.all_gather_objects(local) for x in part]
                kept += [every[i] for i in keep_groups([x.rewards for x in every], B - len(kept))]
                if len(kept) == B:
                    break
            engine.sleep()  # vLLM: free its memory for the training passes (rollout.sleep)
            time_gen = time.perf_counter() - t0
            if on_rollouts is not None:
                on_rollouts(step, drawn)
            prompts_drawn, prompts_kept = (d + 1) * B, len(kept)
            pad_rows = 0
            if g.filter_groups:  # this rank's share of the kept groups, padded to equal shares
                kept, pad_groups = share_groups(kept, info.rank, info.world_size)
                pad_rows = pad_groups * G
            gens = [x for r in drawn for x in r.gens]                             # this rank's
            rewards = [v for r in drawn for v in r.rewards]
            parsed = [p for r in drawn for p in r.parsed]
            golds = [r.gold for r in drawn for _ in range(G)]
            # 5-6. advantages (Eq. 1), log-probs, clipped objective (Eq. 2), optimizer step
            lr = optimizer.param_groups[0]["lr"]
            upd: dict = {}
            if prompts_kept:  # every rank agrees (the keep decision is global)
                upd = grpo_update(model, optimizer, rollout_batch(kept, G, g, pad_rows), g,
                                  micro_batch_size=t.micro_batch_size, pad_id=tok.pad_id,
                                  device=info.device, norm_len=ro.max_new_tokens,
                                  autocast=autocast)
            elif info.is_main:
                print(f"grpo step {step + 1}: all {prompts_drawn} drawn groups had equal rewards "
                      f"(grpo.filter_groups); no update this step", file=sys.stderr)
            step += 1
            ran.append(step)
            # 7. log, validate, checkpoint
            dt = time.perf_counter() - t_step
            stats = _batch_stats(gens, rewards, parsed, golds, G)
            all_tokens = float(dist.all_reduce_sum(float(sum(len(r.prompt) * G for r in drawn))))
            last = {**stats, **upd, "lr": lr, "time_gen_s": time_gen, "step_time_s": dt,
                    "tokens_per_s": (all_tokens + stats["response_tokens"]) / max(dt, 1e-9),
                    "epoch": step / steps_per_epoch, "prompts_drawn": prompts_drawn,
                    "prompts_kept": prompts_kept}
            bar.update(1)
            bar.set_postfix(reward=f"{stats['reward_mean']:.3f}")
            stopped = end_step(cfg, step, total, last, model=model, tok=tok, val_recs=val_recs,
                               val_prompts=val_prompts, logger=logger, save=save,
                               stop_requested=flag.any_rank(), engine=engine)
            if stopped:
                break
    bar.close()
    if on_end is not None and not stopped:
        sync_engine(engine, model)
        on_end(policy, engine)
    result = finish_stage(cfg, policy, logger, step=step, stopped=stopped, last=last)
    return {**result, "steps": ran}
