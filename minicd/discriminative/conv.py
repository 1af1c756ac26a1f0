"""Convolutional coders over word embeddings: CNN (Kim-style), CAML, MultiResCNN.

Every coder maps ``ids`` [B, T] (0 = padding) and ``mask`` [B, T] (True: a real token) to one
logit per label [B, L]. Shapes and defaults follow Edin et al. (2023)'s configs (see configs/).
"""

from __future__ import annotations

import torch
from torch import nn

from minicd.discriminative.attention import CAMLAttention


class WordEmbedding(nn.Module):
    """Token embeddings (row 0 = padding, kept at zero) followed by dropout."""

    def __init__(self, vocab_size: int, dim: int, dropout: float,
                 weights: torch.Tensor | None = None) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=0)
        if weights is not None:
            with torch.no_grad():
                self.embed.weight.copy_(weights)
                self.embed.weight[0].zero_()
        self.drop = nn.Dropout(dropout)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.drop(self.embed(ids))                        # [B, T, E]


class CNN(nn.Module):
    """Kim-style CNN: one convolution (no padding), tanh, max-pool over time, a linear layer."""

    def __init__(self, vocab_size: int, num_labels: int, *, embed_dim: int = 100,
                 num_filters: int = 500, kernel_size: int = 4, embed_dropout: float = 0.2,
                 embeddings: torch.Tensor | None = None) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.embedding = WordEmbedding(vocab_size, embed_dim, embed_dropout, embeddings)
        self.conv = nn.Conv1d(embed_dim, num_filters, kernel_size)
        self.fc = nn.Linear(num_filters, num_labels)
        nn.init.xavier_uniform_(self.conv.weight)
        nn.init.xavier_uniform_(self.fc.weight)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        short = self.kernel_size - ids.shape[1]
        if short > 0:  # a note shorter than the kernel: pad so one window exists
            ids = nn.functional.pad(ids, (0, short))
            mask = nn.functional.pad(mask, (0, short))
        x = self.embedding(ids).transpose(1, 2)                  # [B, E, T]
        x = torch.tanh(self.conv(x))                             # [B, F, T-k+1]
        # a window is real when it starts on a real token (windows may run into padding)
        valid = mask[:, : x.shape[2]]                            # [B, T-k+1]
        x = x.masked_fill(~valid[:, None, :], float("-inf"))
        return self.fc(x.max(dim=2).values)                      # [B, L]


class CAML(nn.Module):
    """CAML: one 'same' convolution over the embeddings, then per-label attention."""

    def __init__(self, vocab_size: int, num_labels: int, *, embed_dim: int = 100,
                 num_filters: int = 50, kernel_size: int = 10, embed_dropout: float = 0.2,
                 embeddings: torch.Tensor | None = None) -> None:
        super().__init__()
        self.embedding = WordEmbedding(vocab_size, embed_dim, embed_dropout, embeddings)
        self.conv = nn.Conv1d(embed_dim, num_filters, kernel_size, padding=kernel_size // 2)
        nn.init.xavier_uniform_(self.conv.weight)
        self.attention = CAMLAttention(num_filters, num_labels)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.embedding(ids).transpose(1, 2)                  # [B, E, T]
        h = self.conv(x)[:, :, : ids.shape[1]].transpose(1, 2)   # [B, T, F] (even k: one extra dropped)
        return self.attention(h, mask)                           # [B, L]


class ResidualBlock(nn.Module):
    """MultiResCNN's residual block: conv-BN-tanh-conv-BN plus a 1x1 conv-BN shortcut, tanh,
    dropout (Li & Yu 2020)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, dropout: float) -> None:
        super().__init__()
        pad = kernel_size // 2
        self.left = nn.Sequential(
            nn.Conv1d(in_ch, out_ch, kernel_size, padding=pad, bias=False), nn.BatchNorm1d(out_ch),
            nn.Tanh(),
            nn.Conv1d(out_ch, out_ch, kernel_size, padding=pad, bias=False), nn.BatchNorm1d(out_ch))
        self.shortcut = nn.Sequential(nn.Conv1d(in_ch, out_ch, 1, bias=False),
                                      nn.BatchNorm1d(out_ch))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:          # [B, C, T] -> [B, F, T]
        t = x.shape[2]
        return self.drop(torch.tanh(self.left(x)[:, :, :t] + self.shortcut(x)))


class MultiResCNN(nn.Module):
    """MultiResCNN: parallel channels (conv of kernel k, tanh, residual block) for each kernel
    size, concatenated, then CAML's per-label attention."""

    def __init__(self, vocab_size: int, num_labels: int, *, embed_dim: int = 100,
                 num_filters: int = 50, kernel_sizes: tuple[int, ...] = (3, 5, 9, 15, 19, 25),
                 embed_dropout: float = 0.2, embeddings: torch.Tensor | None = None) -> None:
        super().__init__()
        self.embedding = WordEmbedding(vocab_size, embed_dim, embed_dropout, embeddings)
        self.channels = nn.ModuleList(
            nn.Sequential(nn.Conv1d(embed_dim, embed_dim, k, padding=k // 2, bias=False), nn.Tanh(),
                          ResidualBlock(embed_dim, num_filters, k, embed_dropout))
            for k in kernel_sizes)
        self.attention = CAMLAttention(num_filters * len(kernel_sizes), num_labels)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        x = self.embedding(ids).transpose(1, 2)                  # [B, E, T]
        h = torch.cat([c(x)[:, :, :t] for c in self.channels], dim=1)  # [B, F*K, T]
        return self.attention(h.transpose(1, 2), mask)           # [B, L]
