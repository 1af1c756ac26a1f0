"""What the stage loops share: policy set-up, optimizer and schedule, example encoding, validation.

Every stage builds its trainable policy the same way (:func:`build_policy`), encodes records into
(prompt, completion) token ids the same way (:func:`encode_record`), and scores itself with the
same greedy validation hook (:func:`greedy_validate`): prompt -> greedy decode -> the one parser
(``minicd.parse.parse_codes``) -> corpus micro/macro metrics. No note text is logged here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from minicd import dist
from minicd.config import Config, DataConfig
from minicd.data.records import Record
from minicd.data.truncate import fit_prompt
from minicd.errors import ConfigError
from minicd.metrics import corpus_metrics
from minicd.model.hub import load_model, load_tokenizer
from minicd.model.lora import LoRAConfig, inject_lora, load_adapter
from minicd.model.tokenizer import Tokenizer, encode_example, encode_prompt
from minicd.parse import format_answer, parse_codes
from minicd.prompts import PromptSetting, coding_prompt
from minicd.rollout.engine import SamplingParams
from minicd.rollout.torch_engine import TorchEngine


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
    ``lora.init_adapter`` loads a PEFT adapter instead. Under torchrun the model is FSDP2-sharded.
    """
    if not cfg.model.path:
        raise ConfigError("model.path is empty: set it to a local HF-format dir or a hub id "
                          "(e.g. model.path=runs/demo/model)")
    dtype = None if cfg.model.dtype == "auto" else cfg.model.dtype
    model = load_model(cfg.model.path, dtype=dtype, device=info.device)
    tok = load_tokenizer(cfg.model.path, template=cfg.model.template)
    lora_cfg = None
    if cfg.lora.enabled:
        lc = cfg.lora
        if lc.init_adapter:
            lora_cfg = load_adapter(model, lc.init_adapter)
        else:
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
