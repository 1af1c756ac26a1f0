"""The PHI stage loop: Progressive Hint Injection (paper Sec. 4.3, Appendix E "PHI hint training").

PHI is GRPO run in rounds over a shrinking set of training examples, with training-time hints:

0. Round-0 pools (Eq. 3): greedy, hint-free predictions of the start (SFT) policy on the training
   split; H_i = Y_i minus Y_hat_i. Code weights (Appendix E "Hint sampling") come from the
   training-gold frequencies and the per-code recall of those predictions.
1. Round t = 0 .. phi.rounds - 1:
   a. One GRPO epoch (:func:`minicd.train.grpo.run_grpo`) over the examples whose pool is
      non-empty (the others are skipped). Per prompt, a hint subset is drawn from its pool
      (``sample_hints``; seeded by (train.seed, t, step, prompt index)) and rendered into the
      Appendix E hint block; an empty draw leaves the prompt hint-free. All G rollouts of a prompt
      share it, and the reward target stays the FULL gold set.
   b. Greedy hint-free inference of the round's final policy on the training split refreshes
      pools (Eq. 4), recalls and weights. It runs inside the GRPO run (its ``on_end`` hook) with
      the stage's one rollout engine, rank-sharded: every rank decodes its chunks and rank 0
      writes them, so no rank waits while another decodes the split.
   c. One line of round metrics goes to ``output_dir/phi_rounds.jsonl`` (train recall/F1, pool
      sizes, and :func:`pool_transitions`: codes recovered from and newly added to the pools,
      recovery of hinted vs never-hinted pool codes; :func:`hint_uptake`: how often the round's
      samples answered the pool codes their prompt showed vs those it did not), computed from
      the hint draws and sampled codes the prompt builder recorded (:class:`HintedPrompts`);
      pools, weights and the next round index to
      ``output_dir/phi_state.json`` (ids and codes only, no note text).
2. The last round's adapter is copied to ``output_dir/adapter``.

Model lineage (LoRA only). With ``lora.init_mode = "merge"`` (default) the SFT adapter
(``lora.init_adapter``) is folded into the base weights ONCE and saved to
``output_dir/sft_model``; every round loads that model, round 0 trains a fresh adapter on it and
round t > 0 continues round t-1's adapter (``init_mode = "continue"`` on ``sft_model``). So the
policy carries over from round to round while the adapter-disabled reference policy stays the
SFT policy in every round. Costs: one full copy of the model on disk, and a fresh AdamW state at
the start of each round (each round is its own GRPO run). ``output_dir/adapter`` is an adapter
on ``output_dir/sft_model`` (its adapter_config names it). With ``init_mode = "continue"`` the
SFT adapter itself is trained on through all rounds and the reference is the bare base model.

Files under ``output_dir``: ``init_train_predictions.jsonl`` (round-0 pools), ``round-<t>/``
(that round's GRPO run: metrics, checkpoints, adapter, ``hint_draws-rank<r>.jsonl``, the
draws each rank made, ``rollout_codes-rank<r>.jsonl``, the codes its samples answered, and
``train_predictions.jsonl``, the refresh after it), ``phi_state.json``, ``phi_rounds.jsonl``, ``adapter/``. Resume
(``train.resume``) restarts at the round in ``phi_state.json``; GRPO's checkpoints in its round
directory restore the step within the round, and the refresh inference skips finished records.
Inference and evaluation never see hints.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from minicd import dist
from minicd.algo.phi import code_recall, code_weights, hint_pool, sample_hints
from minicd.algo.reward import RewardContext, code_frequencies
from minicd.checkpoint import latest_checkpoint
from minicd.codes import DescriptionTable, truncate_description
from minicd.config import Config, PHIConfig
from minicd.data.records import Record
from minicd.fileio import atomic_dir, atomic_file
from minicd.metrics import corpus_metrics
from minicd.model.hub import load_tokenizer
from minicd.model.tokenizer import Tokenizer
from minicd.parse import parse_codes
from minicd.predictions import read_predictions
from minicd.prompts import prompt_ids
from minicd.rollout.engine import SamplingParams
from minicd.rollout.inference import StageEngine, rollout_records
from minicd.train.common import Policy, build_policy, load_split, merged_start
from minicd.train.grpo import Rollout, run_grpo

STATE_FILE, ROUNDS_FILE = "phi_state.json", "phi_rounds.jsonl"
Describe = Callable[[str, str], "str | None"]


# ------------------------------------------------------------------ hints and prompts
def draw_hints(pool: Sequence[str], weights: dict[str, float], phi: PHIConfig, seed: int,
               round_index: int, step: int, index: int) -> list[str]:
    """The hint draw of global prompt ``index`` of ``step`` in round ``round_index`` (Appendix E).

    Deterministic in (seed, round, step, index), so a resumed round redraws the same hints."""
    rng = np.random.default_rng([seed, round_index, step, index])
    return sample_hints(pool, weights, rng, phi.p_inject, phi.max_hints, phi.tau)


def make_describe(phi: PHIConfig) -> Describe:
    """``describe(code, code_system)`` for the hint block: CMS descriptions (plus
    ``phi.description_file``), cut to ``phi.description_limit`` characters."""
    tables: dict[str, DescriptionTable] = {}

    def describe(code: str, code_system: str) -> str | None:
        if code_system not in tables:
            tables[code_system] = DescriptionTable(code_system, phi.description_file)
        text = tables[code_system].describe(code)
        return truncate_description(text.strip(), phi.description_limit) if text else None

    return describe


# ------------------------------------------------------------------ pools (Eq. 3 / 4)
def read_pool_predictions(path: Path, records: Sequence[Record]) -> list[tuple[str, ...]]:
    """Codes of the greedy prediction of each record (re-parsed with the single parser; a record
    without a row counts as an empty prediction)."""
    by_id = {row["id"]: parse_codes(row["response"]).codes
             for row in read_predictions(path) if row["sample_index"] == 0}
    return [by_id.get(r.id, ()) for r in records]


def refresh_state(records: Sequence[Record], preds: Sequence[Sequence[str]], phi: PHIConfig,
                  freq: dict[str, int]) -> dict:
    """Pools (Eq. 3/4), per-code recall and weights from hint-free train predictions, plus the
    train metrics of those predictions."""
    golds = [r.codes for r in records]
    pools = {r.id: hint_pool(r.codes, p) for r, p in zip(records, preds)}
    recall = code_recall(golds, preds)
    m = corpus_metrics(preds, golds)
    sizes = [len(p) for p in pools.values()]
    return {"pools": pools, "recall": recall,
            "weights": code_weights(freq, recall, phi.recall_floor, phi.clip_mult),
            "eval": {"train_micro_recall": float(m["micro_recall"]),
                     "train_micro_f1": float(m["micro_f1"]), "train_macro_f1": float(m["macro_f1"]),
                     "nonempty_pools": sum(s > 0 for s in sizes),
                     "mean_pool_size": float(np.mean(sizes)) if sizes else 0.0}}


def pool_transitions(before: dict[str, Sequence[str]], after: dict[str, Sequence[str]],
                     hinted: dict[str, set[str]]) -> dict:
    """How a round moved the pools: ``pool_recovered`` (pooled codes the refresh now predicts),
    ``newly_missed`` (gold codes that entered a pool: predicted before the round, missed after),
    and the recovery rate of the pooled codes that were shown as hints at least once in the round
    (``hinted_recovery``) vs. those never shown (``unhinted_recovery``; None when there are none).
    The hinted/unhinted gap is the direct effect of the hints, separate from GRPO's drift."""
    tally = {True: [0, 0], False: [0, 0]}   # shown as a hint? -> [recovered, pooled]
    newly_missed = 0
    for rid, pool in before.items():
        old, new, shown = set(pool), set(after[rid]), hinted.get(rid, set())
        newly_missed += len(new - old)
        for c in old:
            tally[c in shown][0] += c not in new
            tally[c in shown][1] += 1

    return {"pool_recovered": tally[True][0] + tally[False][0], "newly_missed": newly_missed,
            "hinted_codes": tally[True][1], "hinted_recovery": _rate(*tally[True]),
            "unhinted_recovery": _rate(*tally[False])}


def hint_uptake(pools: dict[str, Sequence[str]],
                draws: dict[tuple[int, int], tuple[str, list[str]]],
                sampled: dict[tuple[int, int], list[list[str]]]) -> dict:
    """Whether the round's policy followed its hints, read off the GRPO samples themselves (no
    extra inference): over every sample of every prompt (``draws`` and ``sampled`` keyed by
    (step, global index)) and every code of its record's pool, the share answered when the
    prompt showed that code as a hint (``rollout_hinted_uptake``) and when it did not
    (``rollout_unhinted_uptake``; None when there are none). PHI needs the first well above the
    second: a policy that does not copy hinted codes into its answers gets no reward signal
    from them."""
    tally = {True: [0, 0], False: [0, 0]}   # shown as a hint? -> [answered, sample x code]
    for key, (rid, hints) in draws.items():
        shown = set(hints)
        for codes in sampled.get(key, []):
            answered = set(codes)
            for c in pools[rid]:
                tally[c in shown][0] += c in answered
                tally[c in shown][1] += 1
    return {"rollout_hinted_uptake": _rate(*tally[True]),
            "rollout_unhinted_uptake": _rate(*tally[False])}


def _rate(got: int, n: int) -> float | None:
    return got / n if n else None


def refresh_predictions(engine, cfg: Config, tok: Tokenizer, records: Sequence[Record],
                        out: Path, *, keep: bool) -> None:
    """Greedy HINT-FREE predictions of the policy ``engine`` holds on ``records`` (the training
    split), written to ``out`` (:func:`minicd.rollout.inference.rollout_records`): rank-sharded,
    ``rollout.max_batch_size`` records per rank and round, rank 0 writing. ``keep``: continue an
    existing ``out`` (resume; finished records are skipped), else start it afresh. Every rank
    calls this."""
    if not keep and dist.get_rank() == 0:
        out.unlink(missing_ok=True)
    dist.barrier()
    params = SamplingParams(temperature=0.0, max_new_tokens=cfg.rollout.max_new_tokens,
                            stop_ids=tok.stop_ids)
    rollout_records(engine, records, lambda recs: [prompt_ids(r, tok, cfg.data) for r in recs],
                    out, params, chunk_size=cfg.rollout.max_batch_size,
                    show_progress=True)


# ------------------------------------------------------------------ model lineage
def round_config(cfg: Config, out: Path, r: int, base: str, start_adapter: str | None) -> Config:
    """The GRPO config of round ``r``: one epoch (over the records :func:`run_phi` passes: those
    with non-empty pools), output in ``out/round-r``, starting from round r-1's adapter (round 0:
    ``start_adapter``)."""
    c = copy.deepcopy(cfg)
    c.train.output_dir = str(out / f"round-{r}")
    c.train.resume = cfg.train.resume and latest_checkpoint(c.train.output_dir) is not None
    c.grpo.epochs = 1.0
    c.model.path = base
    c.lora.init_adapter = start_adapter if r == 0 else str(out / f"round-{r - 1}" / "adapter")
    c.lora.init_mode = "continue"  # with init_adapter None: a fresh adapter on `base`
    c.train.eval_at_start = cfg.train.eval_at_start and r == 0  # later rounds: = previous end
    return c


# ------------------------------------------------------------------ state files
def save_state(out: Path, state: dict) -> None:
    """``phi_state.json`` (next round, pools, recall, weights, history) and ``phi_rounds.jsonl``
    (one line per finished round, rewritten from the history), both atomically, rank 0 only."""
    if not dist.get_rank() == 0:
        return
    with atomic_file(out / STATE_FILE) as f:
        json.dump(state, f, indent=1)
    with atomic_file(out / ROUNDS_FILE) as f:
        f.writelines(json.dumps(row) + "\n" for row in state["history"])


# ------------------------------------------------------------------ the loop
class HintedPrompts:
    """GRPO's ``build_prompt(record, step, global_index)`` hook for one round: draws the prompt's
    hints (:func:`draw_hints`), renders them with the one prompt function
    (``minicd.prompts.prompt_ids``), and records each draw.

    Draws are appended (ids and codes only, no note text) to ``log_dir/hint_draws-rank<r>.jsonl``
    so a resumed round still knows the draws of the steps run before it; :meth:`read` returns
    the draws of every rank, one per (step, global index) (``output_dir`` is shared by the
    ranks, as checkpoints and resume already assume). GRPO's ``on_rollouts`` hook
    (:meth:`record_rollouts`) appends the codes each sample answered the same way, to
    ``rollout_codes-rank<r>.jsonl``; :meth:`read_rollouts` returns them."""

    LOGS = ("hint_draws", "rollout_codes")  # per-rank files <name>-rank<r>.jsonl in log_dir

    def __init__(self, pools: dict[str, list[str]], weights: dict[str, float], cfg: Config,
                 round_index: int, tok: Tokenizer, describe: Describe, log_dir: Path) -> None:
        self.pools, self.weights, self.cfg, self.round = pools, weights, cfg, round_index
        self.tok, self.describe, self.log_dir = tok, describe, log_dir

    def __call__(self, rec: Record, step: int, index: int) -> list[int]:
        hints = draw_hints(self.pools[rec.id], self.weights, self.cfg.phi, self.cfg.train.seed,
                           self.round, step, index)
        self._append("hint_draws", [{"step": step, "index": index, "id": rec.id,
                                     "hints": hints}])
        return prompt_ids(rec, self.tok, self.cfg.data, hints, self.describe,
                          mini_example=self.cfg.phi.mini_example)

    def record_rollouts(self, step: int, groups: Sequence[Rollout]) -> None:
        """Append the parsed codes of every sample of this rank's ``groups`` of ``step``."""
        self._append("rollout_codes", [{"step": step, "index": g.index,
                                        "codes": [list(p.codes) for p in g.parsed]}
                                       for g in groups])

    @classmethod
    def clear(cls, log_dir: Path) -> None:
        """Remove every rank's files of an earlier try of the round."""
        for name in cls.LOGS:
            for stale in log_dir.glob(f"{name}-rank*.jsonl"):
                stale.unlink()

    def _append(self, name: str, rows: list[dict]) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"{name}-rank{dist.get_rank()}.jsonl", "a",
                  encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)

    def read(self) -> dict[tuple[int, int], tuple[str, list[str]]]:
        """(step, global index) -> (record id, hints) over every rank's file (a step redone
        after a resume redraws the same hints)."""
        return {key: (row["id"], row["hints"]) for key, row in self._rows("hint_draws")}

    def read_rollouts(self) -> dict[tuple[int, int], list[list[str]]]:
        """(step, global index) -> the codes each of the prompt's samples answered, over every
        rank's file (a step redone after a resume keeps its last samples)."""
        return {key: row["codes"] for key, row in self._rows("rollout_codes")}

    def _rows(self, name: str):
        for path in sorted(self.log_dir.glob(f"{name}-rank*.jsonl")):
            for line in path.read_text(encoding="utf-8").splitlines():
                row = json.loads(line)
                yield (row["step"], row["index"]), row


def prompt_builder(pools: dict[str, list[str]], weights: dict[str, float], cfg: Config,
                   round_index: int, tok: Tokenizer, describe: Describe,
                   log_dir: Path) -> HintedPrompts:
    """The recording prompt builder of one round (:class:`HintedPrompts`)."""
    return HintedPrompts(pools, weights, cfg, round_index, tok, describe, log_dir)


def round_row(r: int, state: dict, fresh: dict, used: Sequence[Record],
              draws: dict[tuple[int, int], tuple[str, list[str]]],
              sampled: dict[tuple[int, int], list[list[str]]], result: dict,
              wall_time_s: float) -> dict:
    """The ``phi_rounds.jsonl`` line of round ``r`` from the draws and sampled codes the prompt
    builder recorded and the pools before (``state``) and after (``fresh``) the round's
    refresh."""
    drawn = [draws[k] for k in sorted(draws)]
    hinted: dict[str, set[str]] = {}
    for rid, h in drawn:
        hinted.setdefault(rid, set()).update(h)
    after = fresh["eval"]
    return {"round": r, "records_used": len(used),
            "pool_mean_size": state["eval"]["mean_pool_size"],
            "grpo_steps": len({step for step, _ in draws}), "prompts": len(drawn),
            "hint_rate": sum(bool(h) for _, h in drawn) / max(len(drawn), 1),
            "mean_hints": float(np.mean([len(h) for _, h in drawn if h] or [0])),
            **pool_transitions(state["pools"], fresh["pools"], hinted),
            **hint_uptake(state["pools"], draws, sampled),
            "reward_mean_last_step": result.get("reward_mean"),
            "start_train_micro_recall": state["eval"]["train_micro_recall"],
            "train_micro_recall": after["train_micro_recall"],
            "train_micro_f1": after["train_micro_f1"], "train_macro_f1": after["train_macro_f1"],
            "next_nonempty_pools": after["nonempty_pools"],
            "next_mean_pool_size": after["mean_pool_size"],
            "wall_time_s": wall_time_s}


def initial_pools(cfg: Config, out: Path, base: str, start_adapter: str | None, info,
                  engines: StageEngine, tok: Tokenizer, train: Sequence[Record],
                  path: Path, *, keep: bool) -> None:
    """Round-0 predictions (Eq. 3): the start policy is round 0's GRPO starting policy (built the
    same way, :func:`round_config`), so the stage's engine is built here, once, and reused."""
    c0 = round_config(cfg, out, 0, base, start_adapter)
    policy = build_policy(c0, info)
    engine = engines.get(c0, policy.model, tok, policy.lora_cfg, model_path=base,
                         device=info.device)
    engine.wake_up()
    engine.sync_policy(policy.model)
    refresh_predictions(engine, cfg, tok, train, path, keep=keep)
    engine.sleep()


def run_phi(cfg: Config) -> dict:
    """Run PHI as configured; return the last finished round's metrics row (plus ``stopped``).

    One rollout engine serves the whole stage (:class:`~minicd.rollout.inference.StageEngine`):
    the round-0 predictions, every round's GRPO rollouts and every refresh; it is closed when
    the stage ends. See the module docstring for the round loop, the files written and resume."""
    cfg.validate("phi")
    info = dist.init_distributed(cfg.train.device, timeout_s=cfg.train.dist_timeout_s)
    engines = StageEngine()
    try:
        return _phi_rounds(cfg, info, engines)
    finally:
        engines.close()


def _phi_rounds(cfg: Config, info: dist.DistInfo, engines: StageEngine) -> dict:
    out, phi, resume = Path(cfg.train.output_dir), cfg.phi, cfg.train.resume
    out.mkdir(parents=True, exist_ok=True)
    train = load_split(cfg, "train", cfg.data.train_limit)
    freq = code_frequencies(r.codes for r in train)   # training-gold frequency
    base, start_adapter = merged_start(cfg, out / "sft_model", info, rebuild=not resume)
    tok = load_tokenizer(base, template=cfg.model.template)
    describe = make_describe(phi)
    say = print if info.is_main else (lambda *args: None)

    state = None
    if resume and (out / STATE_FILE).is_file():
        state = json.loads((out / STATE_FILE).read_text(encoding="utf-8"))
        say(f"minicd phi: resuming at round {state['round'] + 1} of {phi.rounds}")
    if state is None:  # round-0 pools (Eq. 3) from the start policy's hint-free predictions
        say("=== PHI round-0 pools: greedy hint-free predictions of the start policy ===")
        path = out / "init_train_predictions.jsonl"
        initial_pools(cfg, out, base, start_adapter, info, engines, tok, train, path,
                      keep=resume)
        state = {"round": 0, "history": [],
                 **refresh_state(train, read_pool_predictions(path, train), phi, freq)}
        save_state(out, state)

    while state["round"] < phi.rounds:
        r, t0 = state["round"], time.perf_counter()
        pools, weights = state["pools"], state["weights"]
        used = [rec for rec in train if pools[rec.id]]          # empty pools are skipped
        say(f"=== PHI round {r + 1}/{phi.rounds}: {len(used)} of {len(train)} records with "
            f"missed codes ===")
        if len(used) < cfg.grpo.prompts_per_step:
            say("minicd phi: too few records with missed codes for one GRPO step; stopping")
            break

        # a. one GRPO epoch over `used`, hints drawn per (round, step, prompt) and recorded;
        # b. at its end, hint-free greedy inference of the final policy refreshes the pools
        #    (Eq. 4), with the same engine
        round_dir = out / f"round-{r}"
        path = round_dir / "train_predictions.jsonl"
        c = round_config(cfg, out, r, base, start_adapter)
        if not c.train.resume and info.is_main:  # a fresh round: no draws of an earlier try
            HintedPrompts.clear(round_dir)
        dist.barrier()
        builder = prompt_builder(pools, weights, cfg, r, tok, describe, round_dir)

        def refresh(policy: Policy, engine) -> None:
            refresh_predictions(engine, cfg, tok, train, path, keep=resume)

        result = run_grpo(c, train_records=used, build_prompt=builder, engine=engines,
                          on_end=refresh, on_rollouts=builder.record_rollouts,
                          reward_context=lambda rec, p=pools: RewardContext(freq,
                                                                            frozenset(p[rec.id])))
        if result["stopped"]:  # SIGTERM: the round's checkpoint is saved; resume continues it
            return {"round": r, **result}
        fresh = refresh_state(train, read_pool_predictions(path, train), phi, freq)

        # c. round metrics from the recorded draws, and state
        dist.barrier()  # every rank's draws are on disk
        draws = builder.read()
        assert {step + 1 for step, _ in draws} >= set(result["steps"]), (
            sorted(draws), result["steps"])
        row = round_row(r, state, fresh, used, draws, builder.read_rollouts(), result,
                        time.perf_counter() - t0)
        state = {"round": r + 1, "history": state["history"] + [row], **fresh}
        save_state(out, state)
        say(f"minicd phi: round {r + 1} hint-free train micro recall "
            f"{row['train_micro_recall']:.4f}, micro F1 {row['train_micro_f1']:.4f}; "
            f"{row['next_nonempty_pools']} records still miss codes; pool codes recovered: "
            f"{_pct(row['hinted_recovery'])} of the hinted, {_pct(row['unhinted_recovery'])} of "
            f"the others ({row['newly_missed']} newly missed); samples answered "
            f"{_pct(row['rollout_hinted_uptake'])} of the hinted pool codes, "
            f"{_pct(row['rollout_unhinted_uptake'])} of the others")

    export_final(out, phi.rounds, info)
    return {**(state["history"][-1] if state["history"] else {}), "stopped": False}


def export_final(out: Path, rounds: int, info: dist.DistInfo) -> None:
    """Copy the last trained round's adapter to ``out/adapter`` (rank 0; atomic rename)."""
    done = [k for k in range(rounds) if (out / f"round-{k}" / "adapter").is_dir()]
    if done and info.is_main:
        with atomic_dir(out / "adapter") as tmp:
            shutil.copytree(out / f"round-{done[-1]}" / "adapter", tmp, dirs_exist_ok=True)
    dist.barrier()


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"
