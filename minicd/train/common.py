"""What the stage loops share: policy set-up, optimizer and schedule, example encoding, validation,
rollout engines, resume and export, and batch inference (:func:`run_rollout`, used by rollout.py).

Every stage builds its trainable policy the same way (:func:`build_policy`), encodes records into
(prompt, completion) token ids the same way (:func:`encode_record`), and scores itself with the
same greedy validation hook (:func:`greedy_validate`): prompt -> greedy decode -> the one parser
(``minicd.parse.parse_codes``) -> corpus micro/macro metrics. No note text is logged here.
"""

from __future__ import annotations

import hashlib
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from minicd import dist
from minicd.baselines import BaselinePrompter, check_kind, needs_shots
from minicd.checkpoint import config_diff, load_checkpoint, restore_rng, resume_checkpoint
from minicd.config import Config, DataConfig
from minicd.data.records import Record, read_records
from minicd.data.truncate import fit_prompt
from minicd.errors import ConfigError, DataError, OutputError
from minicd.fileio import check_writable
from minicd.log import MetricsLogger, progress, truncate_metrics
from minicd.metrics import corpus_metrics
from minicd.model.hub import (copy_tokenizer_files, load_model, load_tokenizer, resolve_checkpoint,
                              save_model)
from minicd.model.lora import LoRAConfig, inject_lora, load_adapter, save_adapter, unload_lora
from minicd.model.tokenizer import Tokenizer, encode_example, encode_prompt
from minicd.parse import format_answer, parse_codes
from minicd.prompts import PromptSetting, coding_prompt
from minicd.rollout.engine import SamplingParams
from minicd.rollout.torch_engine import TorchEngine


CHAT_MARKUP_TOKENS = 64  # room for chat markup around a user turn of data.max_prompt_tokens


@dataclass
class Policy:
    """The trainable model, its tokenizer, the LoRA config (None: full fine-tuning) and device."""

    model: nn.Module
    tokenizer: Tokenizer
    lora_cfg: LoRAConfig | None
    info: dist.DistInfo


def build_policy(cfg: Config, info: dist.DistInfo) -> Policy:
    """Load ``model.path`` and its tokenizer, inject LoRA (or unfreeze all for full FT), shard.

    ``model.dtype = "auto"`` means float32 on CPU and the checkpoint's dtype on accelerators.
    LoRA A matrices are drawn from a generator seeded with ``train.seed`` (B starts at zero);
    ``lora.init_adapter`` starts from a previous stage's PEFT adapter: ``lora.init_mode = "merge"``
    folds it into the base weights and trains a fresh adapter on top (so the adapter-disabled
    reference policy is the previous stage's policy, e.g. SFT for GRPO), ``"continue"`` keeps
    training it (reference = the base model). Under torchrun the model is FSDP2-sharded.
    """
    if not cfg.model.path:
        raise ConfigError("model.path is empty: set it to a local HF-format dir or a hub id "
                          "(e.g. model.path=runs/demo/model)")
    dtype = None if cfg.model.dtype == "auto" else cfg.model.dtype
    tok = load_tokenizer(cfg.model.path, template=cfg.model.template)  # cheap checks first
    model = load_model(cfg.model.path, dtype=dtype, device=info.device)
    lora_cfg = None
    if cfg.lora.enabled:
        lc = cfg.lora
        if lc.init_adapter and lc.init_mode == "continue":
            lora_cfg = load_adapter(model, lc.init_adapter)
        else:
            if lc.init_adapter:  # fold the previous stage's adapter into the base weights
                load_adapter(model, lc.init_adapter)
                unload_lora(model, merge=True)
            lora_cfg = LoRAConfig(r=lc.r, alpha=lc.alpha, dropout=lc.dropout,
                                  target_modules=tuple(lc.target_modules))
            inject_lora(model, lora_cfg, generator=torch.Generator().manual_seed(cfg.train.seed))
        model.to(info.device)  # LoRA tensors are created on CPU
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    if cfg.model.activation_checkpointing:
        model.set_activation_checkpointing(True)
    dist.shard_model(model, mixed_precision=cfg.train.mixed_precision)
    return Policy(model, tok, lora_cfg, info)


def load_split(cfg: Config, split: str, limit: int | None = None) -> list[Record]:
    """Records of ``data.dir/<split>.jsonl`` (the first ``limit`` when given)."""
    path = Path(cfg.data.dir) / f"{split}.jsonl"
    if not path.is_file():
        raise DataError(f"{path} not found (key data.dir = {cfg.data.dir!r}); prepare the dataset "
                        "with `python -m minicd.data` and point data.dir at the folder holding "
                        "train/val/test.jsonl")
    recs = read_records(path)
    return recs if limit is None else recs[:limit]


def clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    """Clip the trainable parameters' gradient norm (``max_norm <= 0``: no clipping); return the
    total norm before clipping (the full norm under FSDP2)."""
    params = [p for p in model.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
        norm = norm.full_tensor()
    return float(norm)


def resume_state(cfg: Config, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler=None, *, config_text: str, is_main: bool) -> tuple[int, dict]:
    """Restore the latest checkpoint of ``train.output_dir`` (weights, optimizer, scheduler, RNG).

    Returns (step, the trainer state saved with it). ``metrics.jsonl`` lines past that step are
    dropped (:func:`minicd.log.truncate_metrics`), so a resumed run logs each step once. Config
    keys that changed since the checkpoint (other than ``train.resume``) are printed on the main
    rank.
    """
    ckpt = resume_checkpoint(Path(cfg.train.output_dir))
    state = load_checkpoint(ckpt, model=model, optimizer=optimizer, scheduler=scheduler)
    if state["rng"] is not None:
        restore_rng(state["rng"])
    if is_main:  # each step once: lines the interrupted run logged after the checkpoint go
        truncate_metrics(Path(cfg.train.output_dir) / "metrics.jsonl", state["step"])
    changed = [k for k in config_diff(state["config_text"], config_text) if k != "train.resume"]
    if changed and is_main:
        print(f"minicd: resuming {ckpt} with changed config keys: {', '.join(changed)}")
    return state["step"], state["trainer"]


def open_metrics_logger(cfg: Config, is_main: bool) -> MetricsLogger:
    """``train.output_dir/metrics.jsonl`` (rank 0 only) plus the optional ``[log]`` sinks."""
    return MetricsLogger(Path(cfg.train.output_dir) / "metrics.jsonl", enabled=is_main,
                         tensorboard=cfg.log.tensorboard, wandb_project=cfg.log.wandb_project,
                         config=cfg.to_dict())


def start_step(cfg: Config, step: int, *, model: nn.Module, tok: Tokenizer,
               val_recs: Sequence[Record], val_prompts: Sequence[list[int]],
               logger: MetricsLogger) -> None:
    """Before the first step of a fresh run (not a resume): with ``train.eval_at_start``, greedy
    validation of the starting policy, logged as step 0 so every curve starts at its baseline."""
    if step == 0 and cfg.train.eval_at_start and val_recs:
        logger.log(greedy_validate(model, tok, val_recs, cfg.data, cfg.rollout.max_new_tokens,
                                   prompts=val_prompts), step=0)
        model.train()


def end_step(cfg: Config, step: int, total: int, metrics: dict, *, model: nn.Module,
             tok: Tokenizer, val_recs: Sequence[Record], val_prompts: Sequence[list[int]],
             logger: MetricsLogger, save, stop_requested: bool) -> bool:
    """What every stage does after an optimizer step: greedy validation every
    ``train.eval_every`` steps and at the last one (added to ``metrics``), one metrics line, and a
    checkpoint every ``train.save_every`` steps, at the end, or when a stop was requested
    (SIGTERM on any rank). Returns True when the loop must stop now. Collective under FSDP2."""
    t = cfg.train
    if val_recs and (step % t.eval_every == 0 or step == total):
        metrics.update(greedy_validate(model, tok, val_recs, cfg.data, cfg.rollout.max_new_tokens,
                                       prompts=val_prompts))
        model.train()
    logger.log(metrics, step=step)
    if stop_requested or step % t.save_every == 0 or step == total:
        save(step)
    return stop_requested


def finish_stage(cfg: Config, policy: Policy, logger: MetricsLogger, *, step: int, stopped: bool,
                 last: dict) -> dict:
    """End of a stage loop: export the final weights unless a stop was requested (the checkpoint
    is the resume point then), close the metrics logger, and return the last step's metrics
    with ``step`` and ``stopped``. Collective under FSDP2."""
    if not stopped:
        export_policy(policy, Path(cfg.train.output_dir), cfg.model.path,
                      merged=cfg.train.export_merged)
    logger.close()
    return {"step": step, "stopped": stopped, **last}


def export_policy(policy: Policy, out_dir: Path, base: str, *, merged: bool = False) -> None:
    """Final weights: PEFT adapter at ``out_dir/adapter`` (LoRA) or ``out_dir/model`` (full FT);
    with ``merged`` (``train.export_merged``) a LoRA run also writes ``out_dir/merged``, the
    adapter folded into the base weights with the tokenizer next to them (servable by vLLM).

    Collective under FSDP2 (every rank calls it; rank 0 writes)."""
    weights = dist.full_state_dict(policy.model, trainable_only=policy.lora_cfg is not None)
    if policy.info.is_main:
        if policy.lora_cfg is not None:
            save_adapter(None, out_dir / "adapter", policy.lora_cfg,
                         base_model_name_or_path=base, state_dict=weights)
        else:  # full fine-tuning: a standalone HF-format model with its tokenizer
            save_model(policy.model, out_dir / "model", state_dict=weights)
            copy_tokenizer_files(resolve_checkpoint(base), out_dir / "model")
    dist.barrier()
    if merged and policy.lora_cfg is not None:
        from minicd.checkpoint import export_merged

        export_merged(policy.model, out_dir / "merged", tokenizer_dir=resolve_checkpoint(base))


def build_engine(cfg: Config, model: nn.Module, tok: Tokenizer, lora_cfg: LoRAConfig | None):
    """The rollout engine named by ``rollout.engine``: "torch" (:class:`TorchEngine` on the live
    ``model``) or "vllm" (``minicd.rollout.vllm_engine.VLLMEngine`` over ``model.path``, imported
    only when asked for; it receives the policy through ``sync_policy``)."""
    r = cfg.rollout
    if r.engine == "torch":
        return TorchEngine(model, tok, max_batch_size=r.max_batch_size)
    if r.engine == "vllm":
        from minicd.rollout.vllm_engine import VLLMEngine

        return VLLMEngine(cfg.model.path, tok, lora=lora_cfg, seed=cfg.train.seed,
                          max_model_len=cfg.data.max_prompt_tokens + r.max_new_tokens
                          + CHAT_MARKUP_TOKENS)
    raise ConfigError(f"rollout.engine = {r.engine!r}: expected 'torch' or 'vllm'")


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.0,
                    betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only (the LoRA tensors in LoRA runs)."""
    return torch.optim.AdamW(dist.trainable_parameters(model), lr=lr, weight_decay=weight_decay,
                             betas=betas)


def cosine_lambda(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier: linear warm-up from 1/(warmup+1) to 1, then cosine decay to 0 at ``total``.

    ``step`` counts optimizer steps already taken (LambdaLR's ``last_epoch``).
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine-with-warm-up ``LambdaLR`` (see :func:`cosine_lambda`); step it once per update."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_lambda(s, warmup_steps, total_steps))


def user_prompt(rec: Record, tok: Tokenizer, data_cfg: DataConfig,
                hints: Sequence[str] | None = None) -> str:
    """The coding user turn for ``rec``, its note middle-out truncated to ``data.max_prompt_tokens``.

    The budget covers the user text (instruction, note, optional hint block, format line); chat
    markup adds a few tokens on top.
    """
    setting = PromptSetting.from_config(data_cfg)
    return fit_prompt(lambda note: coding_prompt(note, rec.code_system, hints, setting=setting),
                      rec.note, data_cfg.max_prompt_tokens, tok)


def encode_record(rec: Record, tok: Tokenizer, data_cfg: DataConfig) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of one SFT example; completion = ``<code>gold</code><|im_end|>``."""
    messages = [{"role": "user", "content": user_prompt(rec, tok, data_cfg)}]
    return encode_example(tok, messages, format_answer(rec.codes))


def prompt_ids(rec: Record, tok: Tokenizer, data_cfg: DataConfig,
               hints: Sequence[str] | None = None) -> list[int]:
    """Generation-prompt ids for ``rec`` (what validation and rollouts feed the model)."""
    return encode_prompt(tok, [{"role": "user", "content": user_prompt(rec, tok, data_cfg, hints)}])


def greedy_validate(model: nn.Module, tok: Tokenizer, records: Sequence[Record],
                    data_cfg: DataConfig, max_new_tokens: int, *, batch_size: int = 16,
                    prompts: Sequence[Sequence[int]] | None = None) -> dict[str, float]:
    """Greedy-decode ``records``, parse, and score: ``val/micro_f1``, ``val/macro_f1`` and more.

    Every rank decodes every record (identical greedy work keeps FSDP collectives in step).
    ``prompts``: pre-encoded prompt ids (default: :func:`prompt_ids`). Returns floats: micro and
    macro P/R/F1, ``span_rate`` (responses with a ``<code>`` span), ``truncation_rate``.
    """
    if not records:
        return {}
    if prompts is None:
        prompts = [prompt_ids(r, tok, data_cfg) for r in records]
    engine = TorchEngine(model, tok, max_batch_size=batch_size)
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, stop_ids=tok.stop_ids)
    gens = [g[0] for g in engine.generate(prompts, params)]
    parsed = [parse_codes(g.text) for g in gens]
    m = corpus_metrics([p.codes for p in parsed], [r.codes for r in records])
    keys = ("micro_precision", "micro_recall", "micro_f1", "macro_precision", "macro_recall",
            "macro_f1")
    out = {f"val/{k}": float(m[k]) for k in keys}
    out["val/span_rate"] = sum(p.has_span for p in parsed) / len(parsed)
    out["val/truncation_rate"] = sum(g.finish_reason == "length" for g in gens) / len(gens)
    return out


def record_seed(seed: int, record_id: str) -> int:
    """The sampling seed of one record in a sampled rollout: a hash of (``train.seed``, record
    id), so a record's samples do not depend on which other records share its batch, or on
    what a resumed run still had to do (31 bits: every engine accepts it)."""
    digest = hashlib.sha256(f"{seed}:{record_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def _finished_ids(out: Path, n: int) -> set[str]:
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


def run_rollout(cfg: Config, split: str, out: str | Path, *, adapter: str | None = None,
                temperature: float = 0.0, n: int = 1, limit: int | None = None,
                chunk_size: int = 64, show_progress: bool = True,
                prompt_kind: str | None = None) -> dict:
    """Batch inference on ``data.dir/<split>.jsonl``: write a predictions JSONL and score it.

    The policy is ``model.path`` plus ``adapter`` (default ``lora.init_adapter``; None: the bare
    model), sampled by ``rollout.engine`` at ``temperature`` (0: greedy) and ``rollout.top_p``,
    ``n`` responses per record, at most ``rollout.max_new_tokens`` tokens each. Records are
    generated ``chunk_size`` at a time and their rows (``minicd.predictions.prediction_row``)
    appended record by record, so an interrupted run keeps every finished record; records with
    all ``n`` samples in ``out`` are skipped (resume; a torn last line is dropped and redone).
    Sampled runs seed each record with :func:`record_seed` (``train.seed``, record id), so a
    resumed run writes exactly the rows of an uninterrupted one. ``prompt_kind``: None for the
    fixed coding instruction (SFT/GRPO/PHI), or an Appendix D baseline ("zero_shot", "few_shot", "zero_shot_cot", "few_shot_cot"; see
    ``minicd.baselines``: few-shot examples come from the train split). Returns ``{"written", "skipped", "n_records", "micro_f1", ...}``: corpus
    metrics of sample 0 of every record (a record with no row counts as an empty prediction).
    """
    from minicd.predictions import prediction_row, read_predictions, write_predictions

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
    done = _finished_ids(out, n)
    info = dist.init_distributed(cfg.train.device)
    dtype = None if cfg.model.dtype == "auto" else cfg.model.dtype
    model = load_model(cfg.model.path, dtype=dtype, device=info.device)
    tok = load_tokenizer(cfg.model.path, template=cfg.model.template)
    adapter = adapter if adapter is not None else cfg.lora.init_adapter
    lora_cfg = load_adapter(model, adapter) if adapter else None
    model.to(info.device).eval()
    engine = build_engine(cfg, model, tok, lora_cfg)
    if lora_cfg is not None:
        engine.sync_policy(model)  # vLLM: push the adapter; torch: reads the live module

    if prompt_kind is None:
        encode = lambda recs: [prompt_ids(r, tok, cfg.data) for r in recs]  # noqa: E731
    else:
        encode = BaselinePrompter.from_config(prompt_kind, cfg.data, tok, train).prompt_ids
    todo = [(i, r) for i, r in enumerate(records) if r.id not in done]
    written = 0
    bar = progress(total=len(todo), desc=f"rollout {split}", unit="rec",
                   disable=None if show_progress else True)
    for start in range(0, len(todo), chunk_size):
        chunk = todo[start:start + chunk_size]
        seeds = None if temperature == 0 else tuple(record_seed(cfg.train.seed, r.id)
                                                    for _, r in chunk)
        params = SamplingParams(n=n, temperature=temperature, top_p=cfg.rollout.top_p,
                                max_new_tokens=cfg.rollout.max_new_tokens,
                                stop_ids=tok.stop_ids, seeds=seeds)
        groups = engine.generate(encode([r for _, r in chunk]), params)
        for (_, r), group in zip(chunk, groups):  # one write per record: all n rows or none
            written += write_predictions([prediction_row(r.id, g.text, parse_codes(g.text),
                                                         g.sample_index) for g in group],
                                         out, append=True)
        bar.update(len(chunk))
    bar.close()

    first = {row["id"]: parse_codes(row["response"]).codes
             for row in read_predictions(out) if row["sample_index"] == 0}
    m = corpus_metrics([first.get(r.id, ()) for r in records], [r.codes for r in records])
    return {"written": written, "skipped": len(records) - len(todo), "n_records": len(records),
            **{k: float(m[k]) for k in ("micro_precision", "micro_recall", "micro_f1",
                                        "macro_f1")}}
