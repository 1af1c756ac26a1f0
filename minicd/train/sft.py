"""The SFT stage loop (paper Sec. 4.1): LoRA (or full) fine-tuning on gold ``<code>`` answers.

One optimizer step consumes ``train.micro_batch_size x train.grad_accum`` examples on each of the
world's ranks. The loss is the masked objective of ``minicd.algo.sft`` divided by the GLOBAL
response-token count of the step, so accumulation and world size do not change its scale.

Data order: epoch ``e`` uses ``numpy.random.default_rng([train.seed, e])``: a permutation, then
(``sft.length_grouping``) sorting by length inside mega-batches of 50 micro-batches, cutting into
micro-batches and shuffling those inside the mega-batch. Micro-batches that do not fill a whole
global step at the end of an epoch are dropped. Since the order is a function of (seed, epoch),
resuming needs only the epoch and the step index within it (stored in the checkpoint).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from minicd import dist
from minicd.algo.logprobs import model_token_logprobs
from minicd.algo.sft import collate_sft, sft_loss
from minicd.checkpoint import SigtermFlag, capture_rng, save_checkpoint
from minicd.config import Config, dump_config
from minicd.errors import ConfigError
from minicd.log import progress
from minicd.train.common import (build_optimizer, build_policy, clip_grad_norm, compute_autocast,
                                 cosine_schedule,
                                 encode_record, end_step, finish_stage, load_split,
                                 open_metrics_logger, prompt_ids, resume_state, start_step)

MEGA_BATCH_MICRO_BATCHES = 50  # length grouping sorts within this many micro-batches


def epoch_micro_batches(lengths: list[int], micro_batch_size: int, seed: int, epoch: int,
                        length_grouping: bool) -> list[list[int]]:
    """Example indices of every micro-batch of epoch ``epoch``, deterministic in (seed, epoch)."""
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(len(lengths))
    if not length_grouping:
        return [perm[i:i + micro_batch_size].tolist() for i in range(0, len(perm), micro_batch_size)]
    mega = micro_batch_size * MEGA_BATCH_MICRO_BATCHES
    out: list[list[int]] = []
    for start in range(0, len(perm), mega):
        chunk = sorted(perm[start:start + mega].tolist(), key=lambda i: -lengths[i])  # stable
        mbs = [chunk[i:i + micro_batch_size] for i in range(0, len(chunk), micro_batch_size)]
        out += [mbs[j] for j in rng.permutation(len(mbs))]
    return out


def run_sft(cfg: Config) -> dict:
    """Train with the SFT objective as configured; return the final metrics.

    Writes ``output_dir/metrics.jsonl`` (one line per step: loss, lr, grad_norm, tokens_per_s,
    response_tokens, step_time_s; validation keys ``val/...`` every ``train.eval_every`` steps
    and at the end), checkpoints under ``output_dir/checkpoints`` and the final adapter
    (``output_dir/adapter``, PEFT) or full model (``output_dir/model``, LoRA disabled).
    SIGTERM/SIGINT save a checkpoint and stop (the result then has ``stopped = True``).
    """
    cfg.validate("sft")
    t = cfg.train
    info = dist.init_distributed(t.device, timeout_s=t.dist_timeout_s)
    world = info.world_size
    train_recs = load_split(cfg, "train", cfg.data.train_limit)  # bad data fails before the model
    val_recs = load_split(cfg, "val", cfg.data.val_limit) if cfg.data.val_limit != 0 else []
    policy = build_policy(cfg, info)
    model, tok = policy.model, policy.tokenizer
    out_dir = Path(t.output_dir)

    examples = [encode_record(r, tok, cfg.data) for r in train_recs]
    lengths = [len(p) + len(c) for p, c in examples]
    val_prompts = [prompt_ids(r, tok, cfg.data) for r in val_recs]

    per_step = t.grad_accum * world  # micro-batches per optimizer step (all ranks)
    n_micro = math.ceil(len(examples) / t.micro_batch_size)
    steps_per_epoch = n_micro // per_step
    if steps_per_epoch < 1:
        raise ConfigError(f"{len(examples)} training examples do not fill one step of "
                          f"micro_batch_size {t.micro_batch_size} x grad_accum {t.grad_accum} x "
                          f"{world} ranks; lower train.micro_batch_size or train.grad_accum")
    total = t.max_steps if t.max_steps is not None else math.ceil(cfg.sft.epochs * steps_per_epoch)
    optimizer = build_optimizer(model, cfg.sft.lr, cfg.sft.weight_decay, cfg.sft.betas)
    scheduler = cosine_schedule(optimizer, math.ceil(cfg.sft.warmup_ratio * total), total)

    step = 0
    config_text = dump_config(cfg)
    if t.resume:
        step, _ = resume_state(cfg, model, optimizer, scheduler, config_text=config_text,
                               is_main=info.is_main)
    logger = open_metrics_logger(cfg, info.is_main)
    start_step(cfg, step, model=model, tok=tok, val_recs=val_recs, val_prompts=val_prompts,
               logger=logger)
    order_epoch, order = -1, []
    last: dict = {}
    stopped = False

    def save(at: int) -> None:
        epoch, index = divmod(at, steps_per_epoch)
        save_checkpoint(out_dir, at, model=model, optimizer=optimizer, scheduler=scheduler,
                        lora_cfg=policy.lora_cfg, config_text=config_text, rng=capture_rng(),
                        trainer_state={"epoch": epoch, "index": index, "metrics": last},
                        keep_last=t.keep_last)

    autocast = compute_autocast(cfg, info)
    model.train()
    bar = progress(total=total, desc="sft", unit="step", disable=None if info.is_main else True)
    bar.update(step)
    with SigtermFlag() as flag:
        while step < total:
            epoch, index = divmod(step, steps_per_epoch)
            if epoch != order_epoch:
                order = epoch_micro_batches(lengths, t.micro_batch_size, t.seed, epoch,
                                            cfg.sft.length_grouping)
                order_epoch = epoch
            t0 = time.perf_counter()
            step_mbs = order[index * per_step:(index + 1) * per_step]
            mine = step_mbs[info.rank * t.grad_accum:(info.rank + 1) * t.grad_accum]
            batches = [collate_sft([examples[i] for i in mb], tok.pad_id) for mb in mine]
            local_resp = sum(b.num_response_tokens for b in batches)
            local_tok = sum(int(b.attention_mask.sum()) for b in batches)
            global_resp = float(dist.all_reduce_sum(float(local_resp)))
            # FSDP averages gradients over ranks: divide by (global count / world) so the
            # averaged gradient is that of sum(-logp) / global count.
            denom = global_resp / world
            loss_sum = torch.zeros((), dtype=torch.float64)
            optimizer.zero_grad(set_to_none=True)
            for k, b in enumerate(batches):
                if world > 1 and hasattr(model, "set_requires_gradient_sync"):
                    model.set_requires_gradient_sync(k == len(batches) - 1)
                ids = b.input_ids.to(info.device)                               # [b, T]
                mask = b.loss_mask.to(info.device)                              # [b, T-1]
                # only the response positions go through the vocabulary head
                with autocast:
                    logp = model_token_logprobs(model, ids, b.attention_mask.to(info.device),
                                                target_mask=mask)
                loss = sft_loss(logp, mask, denom)
                loss.backward()
                loss_sum += -(logp.detach().double() * mask.double()).sum().cpu()
            grad_norm = clip_grad_norm(model, cfg.sft.grad_clip)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            step += 1
            loss_val = float(dist.all_reduce_sum(loss_sum)) / max(global_resp, 1.0)
            n_tok = float(dist.all_reduce_sum(float(local_tok)))
            dt = time.perf_counter() - t0
            last = {"loss": loss_val, "lr": lr, "grad_norm": grad_norm,
                    "tokens_per_s": n_tok / max(dt, 1e-9), "response_tokens": int(global_resp),
                    "step_time_s": dt, "epoch": step / steps_per_epoch}
            bar.update(1)
            bar.set_postfix(loss=f"{loss_val:.4f}")
            stopped = end_step(cfg, step, total, last, model=model, tok=tok, val_recs=val_recs,
                               val_prompts=val_prompts, logger=logger, save=save,
                               stop_requested=flag.any_rank())
            if stopped:
                break
    bar.close()
    return finish_stage(cfg, policy, logger, step=step, stopped=stopped, last=last)

