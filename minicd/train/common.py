"""What the stage loops share: policy set-up, optimizer and schedule, example encoding, validation,
resume and export. (Rollout engines, batch inference and splits: ``minicd.rollout.inference``;
the record prompt: ``minicd.prompts.prompt_ids``; both re-exported here.)

Every stage builds its trainable policy the same way (:func:`build_policy`), encodes records into
(prompt, completion) token ids the same way (:func:`encode_record`), and scores itself with the
same greedy validation hook (:func:`greedy_validate`): prompt -> greedy decode -> the one parser
(``minicd.parse.parse_codes``) -> corpus micro/macro metrics. No note text is logged here.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from minicd import dist
from minicd.checkpoint import config_diff, load_checkpoint, restore_rng, resume_checkpoint
from minicd.config import Config, DataConfig
from minicd.data.records import Record
from minicd.errors import ConfigError
from minicd.log import MetricsLogger, truncate_metrics
from minicd.metrics import corpus_metrics
from minicd.model.hub import (copy_tokenizer_files, load_model, load_tokenizer, resolve_checkpoint,
                              save_model)
from minicd.model.lora import LoRAConfig, inject_lora, load_adapter, save_adapter, unload_lora
from minicd.model.tokenizer import Tokenizer, encode_example
from minicd.parse import format_answer, parse_codes
from minicd.prompts import prompt_ids, user_prompt  # noqa: F401  (re-exported)
from minicd.rollout.engine import SamplingParams
from minicd.rollout.inference import (CHAT_MARKUP_TOKENS, build_engine,  # noqa: F401
                                      load_split, run_rollout, sharded_generate)
from minicd.rollout.torch_engine import TorchEngine


def merged_start(cfg: Config, merged: Path, info: dist.DistInfo, *,
                 rebuild: bool) -> tuple[str, str | None]:
    """(model path to load, adapter to start from) of a stage that starts from
    ``lora.init_adapter``. In merge mode the adapter is folded into ``model.path`` once and saved
    as an HF-format model at ``merged`` (rank 0; kept when it exists and ``rebuild`` is false):
    the stage then trains a fresh adapter on it, and an engine that loads weights from disk
    (vLLM) serves the same start policy. Otherwise ``(model.path, lora.init_adapter)``."""
    from minicd.fileio import atomic_dir
    from minicd.model.lora import merged_state_dict

    lc = cfg.lora
    if not lc.init_adapter or lc.init_mode == "continue":
        return cfg.model.path, lc.init_adapter
    if info.is_main and (rebuild or not (merged / "config.json").is_file()):
        dtype = None if cfg.model.dtype == "auto" else cfg.model.dtype
        model = load_model(cfg.model.path, dtype=dtype)
        load_adapter(model, lc.init_adapter)
        with atomic_dir(merged) as tmp:
            save_model(model, tmp, state_dict=merged_state_dict(model))
            copy_tokenizer_files(cfg.model.path, tmp)
        del model
    dist.barrier()
    return str(merged), None


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


def compute_autocast(cfg: Config, info: dist.DistInfo) -> contextlib.AbstractContextManager:
    """The context the training forward passes run in.

    ``train.mixed_precision`` = bfloat16/float16 in ONE process: ``torch.autocast`` on the
    device (matmuls in that dtype, weights, LoRA masters, optimizer state and reductions such as
    log-softmax stay float32; measured 1.5-1.6x per SmolLM2 LoRA step on an avx512_bf16 CPU,
    see docs/smollm2_demo.md). Under torchrun the FSDP2 ``MixedPrecisionPolicy`` casts
    instead (``dist.shard_model``), so this is a no-op there, as it is for None/float32."""
    mp = cfg.train.mixed_precision
    if mp in (None, "float32") or info.world_size > 1:
        return contextlib.nullcontext()
    return torch.autocast(info.device.type, dtype=dist.mp_dtype(mp))


def clip_grad_norm(model: nn.Module, max_norm: float, *, sync: bool = True):
    """Clip the trainable parameters' gradient norm (``max_norm <= 0``: no clipping); return the
    total norm before clipping (the full norm under FSDP2): a float, or with ``sync=False`` a
    0-dim tensor on the device (no host sync)."""
    params = [p for p in model.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
        norm = norm.full_tensor()
    return float(norm) if sync else norm.detach()


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


def validate_policy(cfg: Config, model: nn.Module, tok: Tokenizer, val_recs: Sequence[Record],
                    val_prompts: Sequence[list[int]], engine=None) -> dict[str, float]:
    """Greedy validation of ``model`` (:func:`greedy_validate`, ``rollout.max_batch_size``
    records per rank and round). ``engine``: the stage's rollout engine, woken, synced with
    ``model`` and put back to sleep around it (default: a torch engine on ``model``). Leaves
    ``model`` in train mode. Collective under torchrun."""
    if engine is not None:
        engine.wake_up()
        engine.sync_policy(model)
    try:
        return greedy_validate(model, tok, val_recs, cfg.data, cfg.rollout.max_new_tokens,
                               prompts=val_prompts, engine=engine,
                               batch_size=cfg.rollout.max_batch_size)
    finally:
        if engine is not None:
            engine.sleep()
        model.train()


def start_step(cfg: Config, step: int, *, model: nn.Module, tok: Tokenizer,
               val_recs: Sequence[Record], val_prompts: Sequence[list[int]],
               logger: MetricsLogger, engine=None) -> None:
    """Before the first step of a fresh run (not a resume): with ``train.eval_at_start``, greedy
    validation of the starting policy (:func:`validate_policy`), logged as step 0 so every curve
    starts at its baseline."""
    if step == 0 and cfg.train.eval_at_start and val_recs:
        logger.log(validate_policy(cfg, model, tok, val_recs, val_prompts, engine), step=0)


def end_step(cfg: Config, step: int, total: int, metrics: dict, *, model: nn.Module,
             tok: Tokenizer, val_recs: Sequence[Record], val_prompts: Sequence[list[int]],
             logger: MetricsLogger, save, stop_requested: bool, engine=None) -> bool:
    """What every stage does after an optimizer step: greedy validation every
    ``train.eval_every`` steps and at the last one (added to ``metrics``; ``engine``: see
    :func:`validate_policy`), one metrics line, and a
    checkpoint every ``train.save_every`` steps, at the end, or when a stop was requested
    (SIGTERM on any rank). Returns True when the loop must stop now. Collective under FSDP2."""
    t = cfg.train
    if val_recs and (step % t.eval_every == 0 or step == total):
        metrics.update(validate_policy(cfg, model, tok, val_recs, val_prompts, engine))
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


def encode_record(rec: Record, tok: Tokenizer, data_cfg: DataConfig) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of one SFT example; completion = ``<code>gold</code><|im_end|>``."""
    messages = [{"role": "user", "content": user_prompt(rec, tok, data_cfg)}]
    return encode_example(tok, messages, format_answer(rec.codes))


def greedy_validate(model: nn.Module, tok: Tokenizer, records: Sequence[Record],
                    data_cfg: DataConfig, max_new_tokens: int, *, batch_size: int = 16,
                    prompts: Sequence[Sequence[int]] | None = None,
                    engine=None) -> dict[str, float]:
    """Greedy-decode ``records``, parse, and score: ``val/micro_f1``, ``val/macro_f1`` and more.

    Rank-sharded (``minicd.rollout.inference.sharded_generate``, ``batch_size`` records per rank
    and round) and gathered, so every rank returns the same numbers. ``engine``: a rollout engine
    already holding the current policy (default: a :class:`TorchEngine` on ``model``).
    ``prompts``: pre-encoded prompt ids (default: :func:`prompt_ids`). Returns floats: micro and
    macro P/R/F1, ``span_rate`` (responses with a ``<code>`` span), ``truncation_rate``.
    """
    if not records:
        return {}
    if prompts is None:
        prompts = [prompt_ids(r, tok, data_cfg) for r in records]
    if engine is None:
        engine = TorchEngine(model, tok, max_batch_size=batch_size)
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, stop_ids=tok.stop_ids)
    gens = [g[0] for g in sharded_generate(engine, prompts, params, chunk_size=batch_size)]
    parsed = [parse_codes(g.text) for g in gens]
    m = corpus_metrics([p.codes for p in parsed], [r.codes for r in records])
    keys = ("micro_precision", "micro_recall", "micro_f1", "macro_precision", "macro_recall",
            "macro_f1")
    out = {f"val/{k}": float(m[k]) for k in keys}
    out["val/span_rate"] = sum(p.has_span for p in parsed) / len(parsed)
    out["val/truncation_rate"] = sum(g.finish_reason == "length" for g in gens) / len(gens)
    return out
