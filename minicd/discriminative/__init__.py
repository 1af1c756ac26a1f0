"""Discriminative ICD coders (the "PLM Baselines" of the paper's Tables 1-2), after Edin et al.
(2023): CNN, Bi-GRU, CAML, MultiResCNN, LAAT (word-level) and PLM-ICD (RoBERTa segments), each
mapping a note to one logit per label, plus the global decision threshold tuned on validation.
Pure torch; the training loop is ``minicd.train.classifier``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from minicd.discriminative.attention import CAMLAttention, LabelAttention
from minicd.discriminative.conv import CAML, CNN, MultiResCNN
from minicd.discriminative.plmicd import PLMICD, SegmentTokenizer, collate_segments, segment
from minicd.discriminative.rnn import LAAT, BiGRU
from minicd.discriminative.text import Vocab, pad_batch, words
from minicd.discriminative.threshold import GRID, micro_f1_at, tune_threshold

WORD_MODELS = ("cnn", "bigru", "caml", "multirescnn", "laat")
MODELS = (*WORD_MODELS, "plmicd")
DISPLAY_NAMES = {"cnn": "CNN", "bigru": "Bi-GRU", "caml": "CAML", "multirescnn": "MultiResCNN",
                 "laat": "LAAT", "plmicd": "PLM-ICD"}

__all__ = ["BiGRU", "CAML", "CAMLAttention", "CNN", "DISPLAY_NAMES", "GRID", "LAAT",
           "LabelAttention", "MODELS", "MultiResCNN", "PLMICD", "SegmentTokenizer", "Vocab",
           "WORD_MODELS", "build_classifier", "collate_segments", "micro_f1_at", "pad_batch",
           "segment", "tune_threshold", "words"]


def build_classifier(cc: Any, num_labels: int, vocab_size: int = 0,
                     encoder: nn.Module | None = None,
                     embeddings: torch.Tensor | None = None) -> nn.Module:
    """The coder named by ``cc.model`` (a ``minicd.config.ClassifierConfig``), sized by it.

    Word-level models need ``vocab_size`` (and take optional ``embeddings`` [V, E]); PLM-ICD
    needs the ``encoder`` (``minicd.model.roberta.load_roberta``). Parameters are drawn from
    torch's global generator: seed it (or fork it) before calling."""
    common = dict(embed_dim=cc.embed_dim, embed_dropout=cc.embed_dropout, embeddings=embeddings)
    if cc.model == "cnn":
        return CNN(vocab_size, num_labels, num_filters=cc.num_filters,
                   kernel_size=cc.kernel_size, **common)
    if cc.model == "caml":
        return CAML(vocab_size, num_labels, num_filters=cc.num_filters,
                    kernel_size=cc.kernel_size, **common)
    if cc.model == "multirescnn":
        return MultiResCNN(vocab_size, num_labels, num_filters=cc.num_filters,
                           kernel_sizes=tuple(cc.kernel_sizes), **common)
    if cc.model == "bigru":
        return BiGRU(vocab_size, num_labels, rnn_dim=cc.rnn_size, num_layers=cc.rnn_layers,
                     **common)
    if cc.model == "laat":
        return LAAT(vocab_size, num_labels, rnn_hidden=cc.rnn_size, num_layers=cc.rnn_layers,
                    rnn_dropout=cc.rnn_dropout, projection_size=cc.projection_size, **common)
    if cc.model == "plmicd":
        if encoder is None:
            raise ValueError("build_classifier: PLM-ICD needs its encoder")
        return PLMICD(encoder, encoder.config.hidden_size, num_labels)
    raise ValueError(f"unknown classifier model {cc.model!r}; expected one of {MODELS}")
