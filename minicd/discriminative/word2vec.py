"""Word embeddings for the word-level coders: skip-gram with negative sampling (Mikolov et al.
2013) trained on the training notes, in torch (Edin et al. 2023 train gensim's word2vec, vector
size 100, 5 epochs, on the training split; here: a fixed window, no frequent-word subsampling).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def skipgram_pairs(seqs: Sequence[Sequence[int]], window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(center, context) id pairs [P], [P] of every two words at distance 1..``window`` in the
    same note, both directions. Ids 0 and 1 (padding, unknown) are left out."""
    flat = torch.tensor([i for s in seqs for i in s], dtype=torch.long)              # [N]
    doc = torch.tensor([d for d, s in enumerate(seqs) for _ in s], dtype=torch.long)  # [N]
    centers, contexts = [], []
    for d in range(1, window + 1):
        a, b = flat[:-d], flat[d:]
        keep = (doc[:-d] == doc[d:]) & (a > 1) & (b > 1)
        centers += [a[keep], b[keep]]
        contexts += [b[keep], a[keep]]
    return torch.cat(centers), torch.cat(contexts)


def sgns_loss(center: torch.Tensor, context: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """Negative-sampling objective (Mikolov et al. 2013, Eq. 4), averaged over pairs:
    -log sigma(u.v) - sum_k log sigma(-u.n_k). ``center``, ``context`` [P, E], ``negatives`` [P, K, E]."""
    pos = nn.functional.logsigmoid((center * context).sum(-1))                    # [P]
    neg = nn.functional.logsigmoid(-(negatives @ center[:, :, None]).squeeze(-1))  # [P, K]
    return -(pos + neg.sum(-1)).mean()


def train_word2vec(seqs: Sequence[Sequence[int]], vocab_size: int, dim: int, *,
                   generator: torch.Generator, window: int = 5, negatives: int = 5,
                   epochs: int = 5, batch_size: int = 4096, lr: float = 0.01) -> torch.Tensor:
    """Input vectors [vocab_size, dim] of a skip-gram model trained on ``seqs`` (token ids).

    Negatives are drawn from the unigram distribution to the 3/4 power; SparseAdam, ``lr``.
    Rows of words that never occur keep their small random init; row 0 (padding) is zero."""
    centers, contexts = skipgram_pairs(seqs, window)
    counts = torch.bincount(torch.tensor([i for s in seqs for i in s], dtype=torch.long),
                            minlength=vocab_size).double()
    counts[:2] = 0
    noise = counts.pow(0.75)
    noise = noise / noise.sum() if noise.sum() > 0 else torch.ones(vocab_size).double() / vocab_size
    inp = nn.Embedding(vocab_size, dim, sparse=True)
    out = nn.Embedding(vocab_size, dim, sparse=True)
    with torch.no_grad():
        inp.weight.uniform_(-0.5 / dim, 0.5 / dim, generator=generator)
        out.weight.zero_()
    opt = torch.optim.SparseAdam(list(inp.parameters()) + list(out.parameters()), lr=lr)
    for _ in range(epochs):
        order = torch.randperm(len(centers), generator=generator)
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            neg = torch.multinomial(noise, len(idx) * negatives, replacement=True,
                                    generator=generator).view(len(idx), negatives)  # [P, K]
            loss = sgns_loss(inp(centers[idx]), out(contexts[idx]), out(neg))
            opt.zero_grad()
            loss.backward()
            opt.step()
    weights = inp.weight.detach().clone()
    weights[0] = 0.0
    return weights
