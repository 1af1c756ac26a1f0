"""Per-label attention layers: LAAT's (Vu et al. 2020) and CAML's (Mullenbach et al. 2018).

Both take token states ``H`` [B, T, D] and a mask [B, T] (True: a real token) and return one
logit per label [B, L]; padded positions get zero attention weight.
"""

from __future__ import annotations

import torch
from torch import nn


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the token axis (dim 1) of ``scores`` [B, T, L], padding (mask [B, T] False)
    excluded."""
    scores = scores.masked_fill(~mask[:, :, None], torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=1)                          # [B, T, L]


class LabelAttention(nn.Module):
    """LAAT label attention: Z = tanh(W H^T), A = softmax(U Z) over tokens, V = A H,
    logit_l = w_l . v_l + b_l (Vu et al. 2020, Eqs. 5-8; one linear scorer per label)."""

    def __init__(self, input_size: int, projection_size: int, num_labels: int,
                 init_std: float = 0.03) -> None:
        super().__init__()
        self.first_linear = nn.Linear(input_size, projection_size, bias=False)   # W [P, D]
        self.second_linear = nn.Linear(projection_size, num_labels, bias=False)  # U [L, P]
        self.third_linear = nn.Linear(input_size, num_labels)                    # scorers [L, D]
        for lin in (self.first_linear, self.second_linear, self.third_linear):
            nn.init.normal_(lin.weight, 0.0, init_std)
        nn.init.zeros_(self.third_linear.bias)

    def weights(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Attention weights A [B, T, L] (each label's column sums to 1 over real tokens)."""
        z = torch.tanh(self.first_linear(h))                     # [B, T, P]
        return masked_softmax(self.second_linear(z), mask)       # [B, T, L]

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        a = self.weights(h, mask)                                # [B, T, L]
        v = a.transpose(1, 2) @ h                                # [B, L, D]
        return (self.third_linear.weight * v).sum(-1) + self.third_linear.bias  # [B, L]


class CAMLAttention(nn.Module):
    """CAML per-label attention (Mullenbach et al. 2018, Eqs. 2-3): H' = tanh(H),
    alpha_l = softmax(H' u_l) over tokens, v_l = sum_t alpha_lt H'_t, logit_l = beta_l . v_l + b_l."""

    def __init__(self, input_size: int, num_labels: int) -> None:
        super().__init__()
        self.first_linear = nn.Linear(input_size, num_labels, bias=False)  # u_l (rows)
        self.second_linear = nn.Linear(input_size, num_labels)   # beta_l, b_l
        nn.init.xavier_uniform_(self.first_linear.weight)
        nn.init.xavier_uniform_(self.second_linear.weight)

    def weights(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Attention weights alpha [B, T, L] of the tanh'd states."""
        return masked_softmax(torch.tanh(h) @ self.first_linear.weight.T, mask)  # [B, T, L]

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        a = self.weights(h, mask)                                # [B, T, L]
        v = a.transpose(1, 2) @ torch.tanh(h)                    # [B, L, D]
        return (self.second_linear.weight * v).sum(-1) + self.second_linear.bias  # [B, L]
