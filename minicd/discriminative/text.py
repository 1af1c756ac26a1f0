"""Text pipeline of the word-level coders (Edin et al. 2023): lowercase alphabetic words, a
vocabulary from the training split (words in at least ``min_count`` training notes), padding.

Index 0 is padding, index 1 the unknown word; the rest are ordered by document count (descending),
then alphabetically, so the vocabulary is a function of the training notes alone.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from typing import Iterable, Sequence

import torch

from minicd.data.records import atomic_write
from minicd.errors import CheckpointError

PAD, UNK = "<pad>", "<unk>"
_WORD = re.compile(r"[a-z]+")


def words(text: str) -> list[str]:
    """Lowercased alphabetic words (digits and special characters dropped, as in Edin et al.)."""
    return _WORD.findall(text.lower())


class Vocab:
    """Word -> index map; ``encode`` keeps the first ``max_tokens`` words of a note."""

    def __init__(self, itos: Sequence[str]) -> None:
        if list(itos[:2]) != [PAD, UNK]:
            raise ValueError("a vocabulary starts with <pad>, <unk>")
        self.itos = list(itos)
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.itos)

    @classmethod
    def build(cls, texts: Iterable[str], min_count: int = 3) -> "Vocab":
        """Words that occur in at least ``min_count`` of ``texts`` (document frequency)."""
        df: Counter[str] = Counter()
        for text in texts:
            df.update(set(words(text)))
        kept = sorted((w for w, c in df.items() if c >= min_count), key=lambda w: (-df[w], w))
        return cls([PAD, UNK, *kept])

    def encode(self, text: str, max_tokens: int | None = None) -> list[int]:
        ids = [self.stoi.get(w, 1) for w in words(text)]
        ids = ids[:max_tokens] if max_tokens is not None else ids
        return ids or [1]  # an empty note is one unknown word (every row needs a token)

    def save(self, path: str | os.PathLike) -> None:
        with atomic_write(path) as f:
            json.dump(self.itos, f)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Vocab":
        try:
            return cls(json.loads(open(path, encoding="utf-8").read()))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: cannot read the vocabulary ({exc}); retrain the "
                                  "classifier or restore the file") from None


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists into ``ids`` [B, T] and ``mask`` [B, T] (True: a real token)."""
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = True
    return ids, mask
