"""PLM-ICD (Huang et al. 2022): a RoBERTa encoder over fixed-length segments of the note, the
segments' token states concatenated, then LAAT's label attention over all real tokens.

A note's token ids (``<s> ... </s>``, at most ``max_tokens``) are cut into segments of
``segment_length``; the last one is padded. A batch pads every note to the same number of
segments; padding segments are fully masked: the encoder skips them and the attention gives
them zero weight.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from minicd.discriminative.attention import LabelAttention
from minicd.errors import CheckpointError


def segment(ids: Sequence[int], segment_length: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One note's ids as ``segments`` [S, C] and ``mask`` [S, C], S = ceil(len / C)."""
    s = max(1, math.ceil(len(ids) / segment_length))
    out = torch.full((s * segment_length,), pad_id, dtype=torch.long)
    mask = torch.zeros(s * segment_length, dtype=torch.bool)
    out[: len(ids)] = torch.as_tensor(list(ids), dtype=torch.long)
    mask[: len(ids)] = True
    return out.view(s, segment_length), mask.view(s, segment_length)


def collate_segments(seqs: Sequence[Sequence[int]], segment_length: int,
                     pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch notes as ``ids`` [B, S, C] and ``mask`` [B, S, C]; S = the most segments of a note
    in the batch, extra segments all padding (mask False)."""
    parts = [segment(s, segment_length, pad_id) for s in seqs]
    n = max(p[0].shape[0] for p in parts)
    ids = torch.full((len(seqs), n, segment_length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n, segment_length), dtype=torch.bool)
    for i, (x, m) in enumerate(parts):
        ids[i, : x.shape[0]] = x
        mask[i, : m.shape[0]] = m
    return ids, mask


class PLMICD(nn.Module):
    """``forward(ids [B, S, C], mask [B, S, C]) -> logits [B, L]``; ``encoder(ids [N, C],
    attention_mask [N, C]) -> [N, C, H]`` (e.g. :class:`minicd.model.roberta.RobertaModel`)."""

    def __init__(self, encoder: nn.Module, hidden_size: int, num_labels: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.attention = LabelAttention(hidden_size, hidden_size, num_labels)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, s, c = ids.shape
        flat_ids, flat_mask = ids.view(b * s, c), mask.view(b * s, c)  # [B*S, C]
        real = flat_mask.any(dim=1)                              # [B*S]: not a padding segment
        states = self.encoder(flat_ids[real], flat_mask[real].long())  # [R, C, H]
        h = states.new_zeros(b * s, c, states.shape[-1])
        h[real] = states
        return self.attention(h.view(b, s * c, -1), mask.view(b, s * c))  # [B, L]


class SegmentTokenizer:
    """The encoder's own tokenizer (``tokenizers``: ``tokenizer.json``, or byte-level BPE from
    ``vocab.json`` + ``merges.txt``); ``encode`` gives ``<s> words </s>`` cut at ``max_tokens``."""

    def __init__(self, path: str | os.PathLike) -> None:
        from tokenizers import Tokenizer
        from tokenizers.implementations import ByteLevelBPETokenizer

        root = Path(path)
        if (root / "tokenizer.json").is_file():
            self.tok = Tokenizer.from_file(str(root / "tokenizer.json"))
        elif (root / "vocab.json").is_file() and (root / "merges.txt").is_file():
            self.tok = ByteLevelBPETokenizer(str(root / "vocab.json"), str(root / "merges.txt"))
        else:
            raise CheckpointError(f"{root}: no tokenizer.json (or vocab.json + merges.txt); "
                                  "point classifier.encoder_path at a RoBERTa checkpoint dir")
        ids = [self.tok.token_to_id(t) for t in ("<s>", "</s>", "<pad>")]
        if None in ids:
            raise CheckpointError(f"{root}: the tokenizer lacks <s>, </s> or <pad>; not a "
                                  "RoBERTa tokenizer")
        self.bos_id, self.eos_id, self.pad_id = ids

    def encode(self, text: str, max_tokens: int) -> list[int]:
        body = self.tok.encode(text.lower(), add_special_tokens=False).ids
        return [self.bos_id, *body[: max(0, max_tokens - 2)], self.eos_id]
