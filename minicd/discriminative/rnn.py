"""Recurrent coders over word embeddings: Bi-GRU (last hidden states) and LAAT (Bi-LSTM +
label attention). ``ids`` [B, T] (0 = padding), ``mask`` [B, T] -> logits [B, L]."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from minicd.discriminative.attention import LabelAttention
from minicd.discriminative.conv import WordEmbedding


def _packed(x: torch.Tensor, mask: torch.Tensor):
    lengths = mask.sum(1).clamp(min=1).cpu()                     # [B]
    return pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)


class BiGRU(nn.Module):
    """Bi-GRU: the final hidden states of both directions (``rnn_dim / 2`` each), concatenated,
    into one linear layer."""

    def __init__(self, vocab_size: int, num_labels: int, *, embed_dim: int = 100,
                 rnn_dim: int = 512, num_layers: int = 1, embed_dropout: float = 0.0,
                 embeddings: torch.Tensor | None = None) -> None:
        super().__init__()
        self.embedding = WordEmbedding(vocab_size, embed_dim, embed_dropout, embeddings)
        self.rnn = nn.GRU(embed_dim, rnn_dim // 2, num_layers, batch_first=True,
                          bidirectional=True)
        self.fc = nn.Linear(2 * (rnn_dim // 2), num_labels)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        _, h = self.rnn(_packed(self.embedding(ids), mask))      # h: [layers*2, B, R/2]
        last = torch.cat([h[-2], h[-1]], dim=-1)                 # [B, R]
        return self.fc(last)                                     # [B, L]


class LAAT(nn.Module):
    """LAAT (Vu et al. 2020): Bi-LSTM states H [B, T, 2u], then label attention
    (Z = tanh(W H), A = softmax(U Z), V = A H, one linear scorer per label)."""

    def __init__(self, vocab_size: int, num_labels: int, *, embed_dim: int = 100,
                 rnn_hidden: int = 512, num_layers: int = 1, rnn_dropout: float = 0.3,
                 projection_size: int = 512, embed_dropout: float = 0.3,
                 embeddings: torch.Tensor | None = None) -> None:
        super().__init__()
        self.embedding = WordEmbedding(vocab_size, embed_dim, embed_dropout, embeddings)
        self.rnn = nn.LSTM(embed_dim, rnn_hidden, num_layers, batch_first=True,
                           bidirectional=True, dropout=rnn_dropout if num_layers > 1 else 0.0)
        self.attention = LabelAttention(2 * rnn_hidden, projection_size, num_labels)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(_packed(self.embedding(ids), mask))
        h, _ = pad_packed_sequence(out, batch_first=True, total_length=ids.shape[1])  # [B, T, 2u]
        return self.attention(h, mask)                           # [B, L]
