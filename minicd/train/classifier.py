"""The classifier stage: a discriminative coder (``minicd.discriminative``) trained under Edin et
al. (2023)'s protocol, scored through the same predictions files as the LLM coders.

Protocol: binary cross-entropy with logits over the label space (the codes of the training split),
AdamW, linear warm-up then linear decay; after every epoch the whole validation split is scored,
the global threshold of ``numpy.linspace(0, 1, 101)`` with the best micro-F1 is chosen
(:func:`minicd.discriminative.tune_threshold`), and that micro-F1 drives early stopping
(``classifier.patience`` epochs without improvement; Edin stops on mean average precision). The
best epoch's weights and threshold are kept and applied to the test split.

Outputs in ``train.output_dir``: ``model.safetensors`` (best weights), ``classifier.json`` (model,
labels, threshold, sizes), ``vocab.json`` (word models), ``metrics.jsonl``, ``checkpoints/`` and
``predictions/{val,test}.jsonl`` (``<code>...</code>`` responses of the codes with probability >=
threshold, plus ``scores``: the top ``classifier.score_top_k`` codes' probabilities).

Data order: epoch ``e`` uses ``numpy.random.default_rng([train.seed, e])`` (length-grouped
micro-batches as in SFT), so resume needs only the step; dropout draws from torch's generator,
seeded with ``train.seed`` at the start and saved in every checkpoint. One process only: under
torchrun with more than one rank the stage refuses before any work.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from minicd import dist
from minicd.checkpoint import SigtermFlag, capture_rng, save_checkpoint
from minicd.config import Config, ClassifierConfig, dump_config
from minicd.data.records import Record, atomic_write
from minicd.discriminative import (WORD_MODELS, SegmentTokenizer, Vocab, build_classifier,
                                   collate_segments, micro_f1_at, pad_batch, tune_threshold)
from minicd.errors import CheckpointError, ConfigError, DistributedError
from minicd.log import progress
from minicd.parse import format_answer, parse_codes
from minicd.predictions import prediction_row, write_predictions
from minicd.train.common import load_split, open_metrics_logger, resume_state
from minicd.train.sft import epoch_micro_batches

MODEL_FILE, META_FILE, VOCAB_FILE = "model.safetensors", "classifier.json", "vocab.json"


# ----------------------------------------------------------------------------- building blocks
def linear_warmup_decay(step: int, warmup: int, total: int) -> float:
    """LR multiplier: ``step / warmup`` during warm-up, then linear decay to 0 at ``total``."""
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def label_matrix(records: Sequence[Record], labels: Sequence[str]) -> torch.Tensor:
    """Multi-hot targets [N, L]; codes outside ``labels`` are dropped."""
    index = {c: j for j, c in enumerate(labels)}
    y = torch.zeros(len(records), len(labels))
    for i, r in enumerate(records):
        for c in r.codes:
            if c in index:
                y[i, index[c]] = 1.0
    return y


class Coder:
    """A trained (or training) coder with what turns notes into its inputs."""

    def __init__(self, cc: ClassifierConfig, labels: list[str], model: nn.Module,
                 vocab: Vocab | None, tokenizer: SegmentTokenizer | None,
                 threshold: float = 0.5) -> None:
        self.cc, self.labels, self.model = cc, labels, model
        self.vocab, self.tokenizer, self.threshold = vocab, tokenizer, threshold

    def encode(self, note: str) -> list[int]:
        if self.vocab is not None:
            return self.vocab.encode(note, self.cc.max_tokens)
        return self.tokenizer.encode(note, self.cc.max_tokens)

    def collate(self, seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.vocab is not None:
            return pad_batch(seqs)                               # [B, T] x2
        return collate_segments(seqs, self.cc.segment_length, self.tokenizer.pad_id)  # [B, S, C] x2

    @torch.no_grad()
    def probabilities(self, encoded: Sequence[Sequence[int]], device: torch.device,
                      batch_size: int) -> np.ndarray:
        """Sigmoid probabilities [N, L] (eval mode; notes batched by length)."""
        was = self.model.training
        self.model.eval()
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        out = np.zeros((len(encoded), len(self.labels)), dtype=np.float32)
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            ids, mask = self.collate([encoded[i] for i in idx])
            out[idx] = torch.sigmoid(self.model(ids.to(device), mask.to(device))).float().cpu().numpy()
        self.model.train(was)
        return out


def build_coder(cfg: Config, train_recs: Sequence[Record]) -> Coder:
    """Label space, text pipeline and a freshly initialised model (parameters drawn from a
    generator forked from torch's and seeded with ``train.seed``; word embeddings from word2vec
    on the training notes when ``classifier.embed_init = "word2vec"``)."""
    cc = cfg.classifier
    labels = sorted({c for r in train_recs for c in r.codes})
    vocab = tok = encoder = None
    if cc.model in WORD_MODELS:
        vocab = Vocab.build((r.note for r in train_recs), cc.min_count)
    else:
        from minicd.model.hub import resolve_checkpoint
        from minicd.model.roberta import load_roberta

        root = resolve_checkpoint(cc.encoder_path)
        tok = SegmentTokenizer(root)
        encoder = load_roberta(root)
    embeddings = None
    if vocab is not None and cc.embed_init == "word2vec":
        from minicd.discriminative.word2vec import train_word2vec

        g = torch.Generator().manual_seed(cfg.train.seed)
        embeddings = train_word2vec([vocab.encode(r.note, cc.max_tokens) for r in train_recs],
                                    len(vocab), cc.embed_dim, generator=g,
                                    epochs=cc.word2vec_epochs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        model = build_classifier(cc, len(labels), len(vocab) if vocab else 0, encoder=encoder,
                                 embeddings=embeddings)
    return Coder(cc, labels, model, vocab, tok)


def save_coder(coder: Coder, out_dir: Path, state: dict[str, torch.Tensor], extra: dict) -> None:
    """Write ``model.safetensors``, ``classifier.json`` and ``vocab.json`` (atomically)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{MODEL_FILE}.tmp-{os.getpid()}"
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp),
              metadata={"format": "pt"})
    os.replace(tmp, out_dir / MODEL_FILE)
    if coder.vocab is not None:
        coder.vocab.save(out_dir / VOCAB_FILE)
    meta = {"classifier": asdict(coder.cc), "labels": coder.labels, "threshold": coder.threshold,
            **extra}
    with atomic_write(out_dir / META_FILE) as f:
        json.dump(meta, f, indent=1)


def load_coder(run_dir: str | os.PathLike, device: torch.device | str = "cpu") -> Coder:
    """A coder written by :func:`run_classifier` (best weights, labels, threshold)."""
    root = Path(run_dir)
    if not (root / META_FILE).is_file():
        raise CheckpointError(f"{root / META_FILE} not found; pass the train.output_dir of a "
                              "finished `train.py --stage classifier` run")
    meta = json.loads((root / META_FILE).read_text())
    cc = ClassifierConfig(**{**meta["classifier"], "kernel_sizes": list(meta["classifier"]["kernel_sizes"])})
    vocab = tok = encoder = None
    if cc.model in WORD_MODELS:
        vocab = Vocab.load(root / VOCAB_FILE)
    else:
        from minicd.model.hub import resolve_checkpoint
        from minicd.model.roberta import load_roberta

        src = resolve_checkpoint(cc.encoder_path)
        tok, encoder = SegmentTokenizer(src), load_roberta(src)
    model = build_classifier(cc, len(meta["labels"]), len(vocab) if vocab else 0, encoder=encoder)
    missing, unexpected = model.load_state_dict(load_file(str(root / MODEL_FILE)), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{root / MODEL_FILE}: weights do not fit the {cc.model} of "
                              f"{META_FILE}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return Coder(cc, list(meta["labels"]), model.to(device).eval(), vocab, tok,
                 float(meta["threshold"]))


def prediction_rows(coder: Coder, records: Sequence[Record], probs: np.ndarray) -> list[dict]:
    """Predictions-file rows: the codes with probability >= the threshold (most probable first)
    as a ``<code>`` response, plus ``scores`` of the top ``score_top_k`` codes."""
    rows = []
    k = min(coder.cc.score_top_k, len(coder.labels))
    for rec, p in zip(records, probs):
        order = np.argsort(-p, kind="stable")
        chosen = [coder.labels[j] for j in order if p[j] >= coder.threshold]
        response = format_answer(chosen)
        row = prediction_row(rec.id, response, parse_codes(response))
        row["scores"] = {coder.labels[j]: round(float(p[j]), 6) for j in order[:k]}
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------ the loop
def run_classifier(cfg: Config) -> dict:
    """Train ``classifier.model`` as configured; return the final metrics (see module doc).

    SIGTERM/SIGINT save a checkpoint and stop (``stopped = True``; no final export)."""
    cfg.validate("classifier")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise DistributedError("--stage classifier runs in one process (the coders are small); "
                               "launch it with `python train.py`, not torchrun with several ranks")
    t, cc = cfg.train, cfg.classifier
    info = dist.init_distributed(t.device)
    device, out_dir = info.device, Path(t.output_dir)
    train_recs = load_split(cfg, "train", cfg.data.train_limit)
    val_recs = load_split(cfg, "val")
    if not train_recs or not val_recs:
        raise ConfigError(f"data.dir = {cfg.data.dir!r}: the classifier needs non-empty train and "
                          "val splits (the threshold is tuned on val)")
    coder = build_coder(cfg, train_recs)
    model = coder.model.to(device)
    train_x = [coder.encode(r.note) for r in train_recs]
    val_x = [coder.encode(r.note) for r in val_recs]
    train_y, val_y = label_matrix(train_recs, coder.labels), label_matrix(val_recs, coder.labels)

    steps_per_epoch = math.ceil(len(train_x) / t.micro_batch_size) // t.grad_accum
    if steps_per_epoch < 1:
        raise ConfigError(f"{len(train_x)} training examples do not fill one step of "
                          f"micro_batch_size {t.micro_batch_size} x grad_accum {t.grad_accum}; "
                          "lower train.micro_batch_size or train.grad_accum")
    total = t.max_steps if t.max_steps is not None else cc.epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(model.parameters(), lr=cc.lr, weight_decay=cc.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: linear_warmup_decay(s, cc.warmup_steps, total))
    config_text = dump_config(cfg)
    step, trainer = 0, {"best_f1": -1.0, "best_step": 0, "best_threshold": 0.5, "bad_epochs": 0}
    torch.manual_seed(t.seed)  # dropout's generator (saved and restored with checkpoints)
    if t.resume:
        step, trainer = resume_state(cfg, model, optimizer, scheduler, config_text=config_text,
                                     is_main=True)
    logger = open_metrics_logger(cfg, True)
    lengths = [len(x) for x in train_x]
    loss_fn = nn.BCEWithLogitsLoss()
    order_epoch, order, last, stopped, early = -1, [], {}, False, False

    def save(at: int) -> None:
        save_checkpoint(out_dir, at, model=model, optimizer=optimizer, scheduler=scheduler,
                        config_text=config_text, rng=capture_rng(), keep_last=t.keep_last,
                        trainer_state={**trainer, "metrics": last})

    def validate(at: int) -> dict:
        probs = coder.probabilities(val_x, device, cc.eval_batch_size)
        y = val_y.numpy()
        thr = tune_threshold(probs, y)
        f1 = micro_f1_at(probs, y, thr)
        eps = 1e-7
        bce = float(-np.mean(y * np.log(probs + eps) + (1 - y) * np.log(1 - probs + eps)))
        if f1 > trainer["best_f1"]:
            trainer.update(best_f1=f1, best_step=at, best_threshold=thr, bad_epochs=0)
            coder.threshold = thr
            save_coder(coder, out_dir, model.state_dict(), {"best_step": at, "val_micro_f1": f1})
        else:
            trainer["bad_epochs"] += 1
        return {"val/micro_f1": f1, "val/threshold": thr, "val/loss": bce,
                "val/best_micro_f1": trainer["best_f1"]}

    model.train()
    bar = progress(total=total, desc=f"classifier {cc.model}", unit="step")
    bar.update(step)
    with SigtermFlag() as flag:
        while step < total:
            epoch, index = divmod(step, steps_per_epoch)
            if epoch != order_epoch:
                order = epoch_micro_batches(lengths, t.micro_batch_size, t.seed, epoch, True)
                order_epoch = epoch
            t0 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss_sum = 0.0
            for mb in order[index * t.grad_accum:(index + 1) * t.grad_accum]:
                ids, mask = coder.collate([train_x[i] for i in mb])
                logits = model(ids.to(device), mask.to(device))  # [b, L]
                loss = loss_fn(logits, train_y[mb].to(device)) / t.grad_accum
                loss.backward()
                loss_sum += float(loss.detach())
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            step += 1
            last = {"loss": loss_sum, "lr": lr, "epoch": step / steps_per_epoch,
                    "step_time_s": time.perf_counter() - t0}
            if step % steps_per_epoch == 0 or step == total:
                last.update(validate(step))
                early = trainer["bad_epochs"] >= cc.patience
            logger.log(last, step=step)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.4f}")
            stopped = flag.triggered
            if stopped or early or step % t.save_every == 0 or step == total:
                save(step)
            if stopped or early:
                break
    bar.close()
    result = {"step": step, "stopped": stopped, "early_stopped": early, **last,
              "best_step": trainer["best_step"], "threshold": trainer["best_threshold"],
              "val/best_micro_f1": trainer["best_f1"]}
    if not stopped:
        result.update(write_split_predictions(cfg, out_dir, device))
    logger.close()
    return result


def write_split_predictions(cfg: Config, out_dir: Path, device: torch.device) -> dict:
    """Score val and test with the best weights and threshold; write ``predictions/*.jsonl``.
    Returns ``test/micro_f1`` (corpus micro-F1 of the thresholded test predictions)."""
    from minicd.metrics import corpus_metrics

    coder = load_coder(out_dir, device)
    out = {}
    for split in ("val", "test"):
        path = Path(cfg.data.dir) / f"{split}.jsonl"
        if not path.is_file():
            continue
        recs = load_split(cfg, split)
        probs = coder.probabilities([coder.encode(r.note) for r in recs], device,
                                    cfg.classifier.eval_batch_size)
        rows = prediction_rows(coder, recs, probs)
        write_predictions(rows, out_dir / "predictions" / f"{split}.jsonl")
        m = corpus_metrics([r["codes"] for r in rows], [r.codes for r in recs])
        out[f"{split}/micro_f1"] = float(m["micro_f1"])
        out[f"{split}/macro_f1"] = float(m["macro_f1"])
    return out
