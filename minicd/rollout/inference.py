"""Batch inference with a rollout engine: the engine a config names, rank-sharded generation, and
predictions files (``rollout.py``, PHI's pool refreshes and greedy validation use these).

:func:`sharded_generate` cuts a global prompt list into chunks and deals them to the ranks in
rounds (rank r decodes chunk ``k * world + r`` of round k), then gathers each round's results in
global order on every rank. A chunk's prompts and seeds do not depend on the world size, so N
ranks produce what one process produces, and no rank waits while another decodes a whole split.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
from pathlib import Path
from typing import Callable, Sequence

from torch import nn

from minicd import dist
from minicd.baselines import BaselinePrompter, check_kind, needs_shots
from minicd.config import Config
from minicd.data.records import Record, read_records
from minicd.errors import ConfigError, DataError, OutputError
from minicd.fileio import check_writable
from minicd.log import progress
from minicd.metrics import corpus_metrics
from minicd.model.lora import LoRAConfig
from minicd.parse import parse_codes
from minicd.prompts import prompt_ids
from minicd.rollout.engine import Generation, SamplingParams
from minicd.rollout.torch_engine import TorchEngine

CHAT_MARKUP_TOKENS = 64  # room for chat markup around a user turn of data.max_prompt_tokens


def sleep_enabled(cfg: Config, device) -> bool:
    """``rollout.sleep``, its default (None) resolved: on with CUDA, off elsewhere."""
    if cfg.rollout.sleep is not None:
        return cfg.rollout.sleep
    return str(device).startswith("cuda")


def build_engine(cfg: Config, model: nn.Module, tok, lora_cfg: LoRAConfig | None, *,
                 model_path: str | None = None, device=None):
    """The rollout engine named by ``rollout.engine``: "torch" (:class:`TorchEngine` on the live
    ``model``) or "vllm" (``minicd.rollout.vllm_engine.VLLMEngine`` over ``model_path``, default
    ``model.path``, imported only when asked for; it receives the policy through ``sync_policy``
    and may sleep during training passes, see ``rollout.sleep``). Build one per stage and close
    it when the stage ends."""
    r = cfg.rollout
    if r.engine == "torch":
        return TorchEngine(model, tok, max_batch_size=r.max_batch_size)
    if r.engine == "vllm":
        from minicd.rollout.vllm_engine import VLLMEngine

        return VLLMEngine(model_path or cfg.model.path, tok, lora=lora_cfg, seed=cfg.train.seed,
                          max_model_len=cfg.data.max_prompt_tokens + r.max_new_tokens
                          + CHAT_MARKUP_TOKENS,
                          enable_sleep_mode=sleep_enabled(cfg, device or "cpu"))
    raise ConfigError(f"rollout.engine = {r.engine!r}: expected 'torch' or 'vllm'")


class StageEngine:
    """One rollout engine per process per stage: built on first use (:func:`build_engine`),
    reused by every later round and refresh of the stage, closed once by :meth:`close` (call it
    in a ``finally``). ``constructions`` counts the engines built (1 for a whole stage)."""

    def __init__(self) -> None:
        self.engine = None
        self.constructions = 0

    def get(self, cfg: Config, model: nn.Module, tok, lora_cfg: LoRAConfig | None, *,
            model_path: str | None = None, device=None):
        """The stage's engine, built from these arguments the first time."""
        if self.engine is None:
            self.engine = build_engine(cfg, model, tok, lora_cfg, model_path=model_path,
                                       device=device)
            self.constructions += 1
        return self.engine

    def close(self) -> None:
        if self.engine is not None:
            engine, self.engine = self.engine, None
            engine.close()


def load_split(cfg: Config, split: str, limit: int | None = None) -> list[Record]:
    """Records of ``data.dir/<split>.jsonl`` (the first ``limit`` when given)."""
    path = Path(cfg.data.dir) / f"{split}.jsonl"
    if not path.is_file():
        raise DataError(f"{path} not found (key data.dir = {cfg.data.dir!r}); prepare the dataset "
                        "with `python -m minicd.data` and point data.dir at the folder holding "
                        "train/val/test.jsonl")
    recs = read_records(path)
    return recs if limit is None else recs[:limit]


def sharded_generate(engine, prompts: Sequence[Sequence[int]], params: SamplingParams, *,
                     chunk_size: int, on_round: Callable[[int, list], None] | None = None,
                     collect: bool = True) -> list[list[Generation]]:
    """``engine.generate`` over global ``prompts``, rank-sharded; every rank gets every result.

    Chunks of ``chunk_size`` prompts are dealt to the ranks in rounds; chunk starting at global
    position ``j`` is generated with seed ``params.seed + j * n`` (the engine seeds its prompt i
    ``+ i * n``), or with ``params.seeds[j]`` per prompt when given, so prompt j's samples are
    those of one process generating all prompts. Inside a
    round the engine's ``lockstep`` keeps ranks with collective forwards together; each round
    ends with one gather. ``on_round(first, groups)`` sees each round's groups (global positions
    ``first ..``), e.g. to append them to a file; ``collect=False`` returns nothing (long splits).
    ``Generation.prompt_index`` is the global position.
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    out: list[list[Generation]] = []
    for first in range(0, len(prompts), chunk_size * world):
        start = first + rank * chunk_size
        mine = prompts[start:start + chunk_size]
        seed = None if params.seed is None else params.seed + start * params.n
        seeds = None if params.seeds is None else params.seeds[start:start + chunk_size]
        chunk_params = dataclasses.replace(params, seed=seed, seeds=seeds)
        if world == 1:
            groups = engine.generate(mine, chunk_params)
        else:
            with engine.lockstep():
                groups = engine.generate(mine, chunk_params) if mine else []
        parts = dist.all_gather_objects(groups) if world > 1 else [groups]
        merged = [[dataclasses.replace(g, prompt_index=first + k) for g in group]
                  for k, group in enumerate(x for part in parts for x in part)]
        if on_round is not None:
            on_round(first, merged)
        if collect:
            out.extend(merged)
    return out


def rollout_records(engine, records: Sequence[Record], encode, out: Path,
                    params: SamplingParams, *, chunk_size: int = 64,
                    show_progress: bool = False) -> tuple[int, int]:
    """Generate for ``records`` not yet in the predictions file ``out`` and append their rows.

    ``encode(records) -> prompt ids``. Rank-sharded (:func:`sharded_generate`); rank 0 appends
    each round's rows, so an interrupted run keeps its finished rounds, and a rerun skips records
    whose ``n`` samples are all in ``out`` (a torn last line and partial records are redone,
    :func:`finished_ids`). ``params.seeds``, when given, holds one seed per record of
    ``records``. Every rank must call this. Returns (written, skipped)."""
    from minicd.predictions import prediction_row, write_predictions

    out = Path(out)
    done = finished_ids(out, params.n) if dist.get_rank() == 0 else set()
    if dist.get_world_size() > 1:
        done = dist.broadcast_object(done)
    todo = [r for r in records if r.id not in done]
    if params.seeds is not None:  # one seed per record of ``records``: keep those still to do
        by_id = dict(zip((r.id for r in records), params.seeds))
        params = dataclasses.replace(params, seeds=tuple(by_id[r.id] for r in todo))
    bar = progress(total=len(todo), desc=f"rollout {out.stem}", unit="rec",
                   disable=None if show_progress and dist.get_rank() == 0 else True)
    written = 0

    def write(first: int, groups: list) -> None:
        nonlocal written
        rows = [prediction_row(todo[first + k].id, g.text, parse_codes(g.text), g.sample_index)
                for k, group in enumerate(groups) for g in group]
        if dist.get_rank() == 0:
            written += write_predictions(rows, out, append=True)
        bar.update(len(groups))

    sharded_generate(engine, encode(todo), params, chunk_size=chunk_size, on_round=write,
                     collect=False)
    bar.close()
    dist.barrier()
    return written, len(records) - len(todo)


def record_seed(seed: int, record_id: str) -> int:
    """The sampling seed of one record in a sampled rollout: a hash of (``train.seed``, record
    id), so a record's samples do not depend on which other records share its batch, or on
    what a resumed run still had to do (31 bits: every engine accepts it)."""
    digest = hashlib.sha256(f"{seed}:{record_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def finished_ids(out: Path, n: int) -> set[str]:
    """Ids whose ``n`` samples are all in the predictions file ``out`` (resume). A torn last line
    is cut off, and the rows of records with only some of their samples are removed (both with
    a warning), so those records are generated again, whole."""
    from minicd.predictions import drop_torn_tail, read_predictions, write_predictions

    if not out.is_file():
        return set()
    drop_torn_tail(out)
    rows = read_predictions(out)
    samples: dict[str, set[int]] = {}
    for row in rows:
        samples.setdefault(row["id"], set()).add(row["sample_index"])
    partial = {i for i, got in samples.items() if not set(range(n)) <= got}
    if partial:
        print(f"warning: {out}: {len(partial)} record(s) have fewer than --n {n} samples; "
              "their rows are removed and generated again", file=sys.stderr)
        write_predictions([r for r in rows if r["id"] not in partial], out)
    return set(samples) - partial


def score_predictions(out: Path, records: Sequence[Record]) -> dict:
    """Corpus metrics of sample 0 of every record in the predictions file ``out`` (a record
    with no row counts as an empty prediction)."""
    from minicd.predictions import read_predictions

    first = {row["id"]: parse_codes(row["response"]).codes
             for row in read_predictions(out) if row["sample_index"] == 0}
    m = corpus_metrics([first.get(r.id, ()) for r in records], [r.codes for r in records])
    return {k: float(m[k]) for k in ("micro_precision", "micro_recall", "micro_f1", "macro_f1")}


def open_policy(cfg: Config, adapter: str | None = None):
    """``(tokenizer, engine)`` for inference with ``model.path`` plus ``adapter`` (default
    ``lora.init_adapter``; "" or None with no default: the bare model), in eval mode on
    ``train.device`` (the process group is set up under torchrun), its engine named by
    ``rollout.engine`` (:func:`build_engine`) already holding the adapter. Close the engine when
    done."""
    from minicd.model.hub import load_model, load_tokenizer
    from minicd.model.lora import load_adapter

    info = dist.init_distributed(cfg.train.device, timeout_s=cfg.train.dist_timeout_s)
    dtype = None if cfg.model.dtype == "auto" else cfg.model.dtype
    tok = load_tokenizer(cfg.model.path, template=cfg.model.template)
    model = load_model(cfg.model.path, dtype=dtype, device=info.device)
    adapter = adapter if adapter is not None else cfg.lora.init_adapter
    lora_cfg = load_adapter(model, adapter) if adapter else None
    model.to(info.device).eval()
    engine = build_engine(cfg, model, tok, lora_cfg, device=info.device)
    if lora_cfg is not None:
        try:
            engine.sync_policy(model)  # vLLM: push the adapter; torch: reads the live module
        except BaseException:
            engine.close()
            raise
    return tok, engine


def run_rollout(cfg: Config, split: str, out: str | Path, *, adapter: str | None = None,
                temperature: float = 0.0, n: int = 1, limit: int | None = None,
                chunk_size: int = 64, show_progress: bool = True,
                prompt_kind: str | None = None) -> dict:
    """Batch inference on ``data.dir/<split>.jsonl``: write a predictions JSONL and score it.

    The policy is ``model.path`` plus ``adapter`` (default ``lora.init_adapter``; None: the bare
    model), sampled by ``rollout.engine`` at ``temperature`` (0: greedy) and ``rollout.top_p``,
    ``n`` responses per record, at most ``rollout.max_new_tokens`` tokens each. Rows
    (``minicd.predictions.prediction_row``) are appended round by round (:func:`rollout_records`,
    rank-sharded under torchrun, ``chunk_size`` records per rank and round); records whose id is
    already in ``out`` with all ``n`` samples are skipped (resume; a torn last line and partial
    records are redone). Sampled runs seed each record with :func:`record_seed` (``train.seed``,
    record id), so a resumed run writes exactly the rows of an uninterrupted one. ``prompt_kind``: None for the fixed coding instruction
    (SFT/GRPO/PHI), or an Appendix D baseline ("zero_shot", "few_shot", "zero_shot_cot",
    "few_shot_cot"; see ``minicd.baselines``: few-shot examples come from the train split).
    Returns ``{"written", "skipped", "n_records", "micro_f1", ...}``: corpus metrics of sample 0
    of every record. The engine is closed before returning.
    """
    out = Path(out)
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit {limit}: must be >= 1 (or left out for the whole split)")
    if n < 1:
        raise ConfigError(f"--n {n}: must be >= 1 (samples per record)")
    if temperature < 0:
        raise ConfigError(f"--temperature {temperature}: must be >= 0 (0 = greedy)")
    if prompt_kind is not None:
        check_kind(prompt_kind)
    # every input and the output are checked before the model loads
    records = load_split(cfg, split, limit)
    train = load_split(cfg, "train") if prompt_kind and needs_shots(prompt_kind) else None
    if out.is_dir():
        raise OutputError(f"--out {out} is a folder; give a predictions .jsonl file path")
    check_writable(out.parent, "predictions folder")
    tok, engine = open_policy(cfg, adapter)
    try:
        if prompt_kind is None:
            encode = lambda recs: [prompt_ids(r, tok, cfg.data) for r in recs]  # noqa: E731
        else:
            encode = BaselinePrompter.from_config(prompt_kind, cfg.data, tok, train).prompt_ids
        params = SamplingParams(n=n, temperature=temperature, top_p=cfg.rollout.top_p,
                                max_new_tokens=cfg.rollout.max_new_tokens,
                                stop_ids=tok.stop_ids,
                                seeds=None if temperature == 0 else tuple(
                                    record_seed(cfg.train.seed, r.id) for r in records))
        written, skipped = rollout_records(engine, records, encode, out, params,
                                           chunk_size=chunk_size, show_progress=show_progress)
    finally:
        engine.close()
    return {"written": written, "skipped": skipped, "n_records": len(records),
            **score_predictions(out, records)}
