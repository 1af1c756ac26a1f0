"""The masked SFT objective (paper Sec. 4.1) and the batch layout it expects.

L_SFT = - sum_i sum_t log pi_theta(z_{i,t} | x_i, z_{i,<t}): cross-entropy over assistant-response
tokens only; prompt tokens are masked. minicd divides the sum by the number of response tokens in
the GLOBAL batch (all micro-batches of an optimizer step on all ranks), so neither gradient
accumulation nor world size changes the loss scale: pass that count as ``num_tokens``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class SFTBatch:
    """A right-padded training batch.

    ``input_ids``/``attention_mask``: ``[B, T]``; ``loss_mask``: ``[B, T-1]``, 1 where the target
    token ``input_ids[:, t+1]`` is a completion (assistant) token.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor

    @property
    def num_response_tokens(self) -> int:
        return int(self.loss_mask.sum().item())


def collate_sft(examples: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int) -> SFTBatch:
    """Build a right-padded batch from (prompt_ids, completion_ids) pairs."""
    if not examples:
        raise ValueError("collate_sft needs at least one example")
    lengths = [len(p) + len(c) for p, c in examples]
    T = max(lengths)
    B = len(examples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)                  # [B, T]
    attention_mask = torch.zeros((B, T), dtype=torch.long)                     # [B, T]
    loss_mask = torch.zeros((B, max(T - 1, 1)), dtype=torch.float32)          # [B, T-1]
    for i, (prompt, completion) in enumerate(examples):
        if len(prompt) == 0 or len(completion) == 0:
            raise ValueError(f"example {i}: prompt and completion must both be non-empty")
        ids = list(prompt) + list(completion)
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, : len(ids)] = 1
        # target at position t is ids[t+1]; completion targets are t+1 in [len(prompt), len(ids))
        loss_mask[i, len(prompt) - 1 : len(ids) - 1] = 1.0
    return SFTBatch(input_ids, attention_mask, loss_mask)


def sft_loss(logp: torch.Tensor, loss_mask: torch.Tensor, num_tokens: float | None = None) -> torch.Tensor:
    """Paper Sec. 4.1 masked next-token objective.

    ``logp``: ``[B, T-1]`` log-probs of the target tokens (``minicd.algo.logprobs``);
    ``loss_mask``: ``[B, T-1]``, 1 on response targets. Returns
    ``-(logp * loss_mask).sum() / num_tokens`` with ``num_tokens`` the response-token count of the
    global batch (default: this batch's count, i.e. a plain token mean).
    """
    m = loss_mask.to(logp.dtype)
    total = -(logp * m).sum()
    denom = float(m.sum().item()) if num_tokens is None else float(num_tokens)
    return total / max(denom, 1.0)
