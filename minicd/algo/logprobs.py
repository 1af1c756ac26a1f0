"""Memory-lean per-token log-probabilities and entropies of a causal LM.

The vocabulary projection of a long batch (``[N, T, V]`` with V = 151,936 for Qwen) is the largest
tensor of a training step. These functions project ``chunk_tokens`` hidden states at a time, in
fp32, keep only the per-token results, and run each chunk under ``torch.utils.checkpoint`` so the
backward pass recomputes the chunk's logits instead of storing them: peak extra memory is
O(chunk_tokens x V) in forward and backward.

Log-probabilities are the per-token log pi(o_t | x, o_<t) whose sums give the policy ratio rho_j
and the KL term of the GRPO objective, Eq. (2) of the paper, and the SFT negative
log-likelihood; entropy is the per-token H = -sum_v p_v log p_v, reported as a diagnostic.
"""

from __future__ import annotations

from typing import Callable, Sequence, Union

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

Head = Union[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]


def _project(h: torch.Tensor, head: Head) -> torch.Tensor:
    """Logits ``[n, V]`` for hidden ``[n, H]``: ``h @ head.T`` for a weight ``[V, H]``, else
    ``head(h)`` (an ``nn.Linear``, a LoRA-wrapped or an FSDP-wrapped head)."""
    if isinstance(head, torch.Tensor):
        return h @ head.t()
    return head(h)


def _chunk_stats(h: torch.Tensor, head: Head, targets: torch.Tensor, temperature: float,
                 with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    logits = _project(h, head).float()  # [n, V] fp32
    if temperature != 1.0:
        logits = logits / temperature
    logp_all = torch.log_softmax(logits, dim=-1)  # [n, V]
    logp = logp_all.gather(-1, targets[:, None]).squeeze(-1)  # [n]
    entropy = -(logp_all.exp() * logp_all).sum(-1) if with_entropy else None  # [n]
    return logp, entropy


def _needs_grad(hidden: torch.Tensor, head: Head) -> bool:
    if not torch.is_grad_enabled():
        return False
    if hidden.requires_grad:
        return True
    if isinstance(head, torch.Tensor):
        return head.requires_grad
    if isinstance(head, nn.Module):
        return any(p.requires_grad for p in head.parameters())
    return True


def token_logprobs_from_hidden(
    hidden: torch.Tensor,
    head: Head,
    targets: torch.Tensor,
    *,
    chunk_tokens: int = 2048,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log softmax(head(hidden) / temperature)[target] per token, computed chunk by chunk.

    hidden: ``[..., H]`` final-normed hidden states; targets: ``[...]`` token ids (negative ids,
    e.g. -100, give log-prob 0); head: the output weight ``[V, H]`` or a module/callable mapping
    ``[n, H] -> [n, V]`` (pass the model's ``get_output_embeddings()`` when it may be wrapped).
    Logits are cast to fp32 before the softmax, so results equal
    ``log_softmax(logits.float() / temperature, -1).gather(-1, targets)``.
    Returns log-probs ``[...]`` (fp32), and with ``with_entropy`` also entropies ``[...]`` of the
    same tempered distribution.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    shape = targets.shape
    h = hidden.reshape(-1, hidden.shape[-1])  # [N, H]
    y = targets.reshape(-1)  # [N]
    assert h.shape[0] == y.shape[0], (hidden.shape, targets.shape)
    ignored = y < 0
    y = y.clamp_min(0)
    lean = _needs_grad(hidden, head)
    logps, ents = [], []
    for s in range(0, h.shape[0], chunk_tokens):
        args = (h[s: s + chunk_tokens], head, y[s: s + chunk_tokens], temperature, with_entropy)
        if lean:
            logp, ent = checkpoint(_chunk_stats, *args, use_reentrant=False)
        else:
            logp, ent = _chunk_stats(*args)
        logps.append(logp)
        ents.append(ent)
    if not logps:  # no tokens
        empty = h.new_zeros(0, dtype=torch.float32)
        logps, ents = [empty], [empty]
    logp = torch.cat(logps).masked_fill(ignored, 0.0).view(shape)
    if not with_entropy:
        return logp
    return logp, torch.cat(ents).view(shape)


def model_token_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    *,
    last_n: int | None = None,
    chunk_tokens: int = 2048,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each next token: ``out[:, t] = log p(input_ids[:, t + 1] | input_ids[:, :t+1])``.

    input_ids ``[B, T]`` -> ``[B, T - 1]`` (or ``[B, last_n]``: only the last ``last_n`` targets,
    e.g. the response part of right-aligned prompt+response rows, skipping the prompt's vocab
    projection). Assumes ``model(..., head_fn=f)`` returns ``f(final-normed hidden [B, T, H],
    head module)`` computed inside its forward, as :class:`minicd.model.qwen.QwenForCausalLM`
    does, so the head is applied while FSDP2 has the root's parameters gathered.
    """
    def head_fn(hidden: torch.Tensor, head: nn.Module):
        hidden, targets = hidden[:, :-1], input_ids[:, 1:]  # [B, T-1, H], [B, T-1]
        if last_n is not None:
            keep = hidden.shape[1] - last_n
            hidden, targets = hidden[:, keep:], targets[:, keep:]
        return token_logprobs_from_hidden(hidden, head, targets, chunk_tokens=chunk_tokens,
                                          temperature=temperature, with_entropy=with_entropy)

    # the head runs inside the model's forward (head_fn), so FSDP2 keeps lm_head gathered
    return model(input_ids, position_ids=position_ids, attention_mask=attention_mask,
                 head_fn=head_fn)


def shared_prefix_logprobs(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    owner: Sequence[int],
    pad_id: int,
    *,
    chunk_tokens: int = 2048,
    with_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs ``[N, R]`` of N responses, response i continuing ``prompts[owner[i]]``,
    with every prompt run through the model ONCE (not once per sample).

    GRPO scores G samples of the same prompt; on a 450-token prompt with 30-token answers the
    collated rows ``[prompt | response]`` spend ~90% of the forward and backward on G identical
    copies of the prompt. Here each prompt is packed with all of its responses into one row
    ``[prompt | r_1 | r_2 | ...]`` (right-padded to the longest pack) under a block attention mask:
    prompt tokens attend causally to the prompt, response tokens to the whole prompt and causally
    to their own response, never to a sibling; each response's positions continue from the end
    of the prompt. Every response therefore sees exactly the context of its own collated row,
    and the gradient through the shared prompt is the sum over its samples: the same values and
    gradients as the collated rows, up to float rounding. One ordinary forward, so FSDP2 and
    activation checkpointing work unchanged.

    Needs a model whose forward takes an explicit ``[B, 1, T, T]`` boolean ``attention_mask`` with
    ``position_ids`` and a ``head_fn`` (:class:`QwenForCausalLM`, plain or FSDP2-wrapped).
    Positions past a response's end are computed on ``pad_id`` and must be masked by the caller
    (as with the collated rows). Returns fp32 log-probs ``[N, R]`` (R = longest response, >= 1),
    and entropies with ``with_entropy``.
    """
    if not responses:
        raise ValueError("shared_prefix_logprobs: no responses")
    if len(owner) != len(responses) or not all(0 <= o < len(prompts) for o in owner):
        raise ValueError(f"owner must give one prompt index in [0, {len(prompts)}) per response")
    if min(len(p) for p in prompts) < 1:
        raise ValueError("shared_prefix_logprobs needs prompts of >= 1 token")
    device = next(model.parameters()).device
    n_p, n_r = len(prompts), len(responses)
    r_len = max(1, max(len(r) for r in responses))
    members: list[list[int]] = [[] for _ in range(n_p)]
    for i, o in enumerate(owner):
        members[o].append(i)
    width = max(len(p) + sum(len(responses[i]) for i in m) for p, m in zip(prompts, members))
    ids = torch.full((n_p, width), pad_id, dtype=torch.long)        # [P, T] packs, right-padded
    pos = torch.zeros(n_p, width, dtype=torch.long)                  # [P, T] position ids
    seg = torch.full((n_p, width), -2, dtype=torch.long)             # [P, T] -1 prompt, i response
    src = torch.zeros(n_r, r_len, dtype=torch.long)                  # [N, R] pack slot predicting
    targets = torch.full((n_r, r_len), pad_id, dtype=torch.long)     # [N, R] response tokens
    for p_idx, (p, rows) in enumerate(zip(prompts, members)):
        n = len(p)
        ids[p_idx, :n], pos[p_idx, :n], seg[p_idx, :n] = torch.as_tensor(list(p)), \
            torch.arange(n), -1
        cursor = n
        for i in rows:
            r = list(responses[i])
            k = len(r)
            if k:
                ids[p_idx, cursor:cursor + k] = torch.as_tensor(r)
                pos[p_idx, cursor:cursor + k] = torch.arange(n, n + k)
                seg[p_idx, cursor:cursor + k] = i
                targets[i, :k] = torch.as_tensor(r)
                # token t is predicted at the slot before it: the prompt's last slot for t = 0
                src[i, :k] = torch.as_tensor([n - 1] + list(range(cursor, cursor + k - 1)))
            cursor += k
    slot = torch.arange(width)
    seg_q, seg_k = seg[:, :, None], seg[:, None, :]                   # [P, T, 1], [P, 1, T]
    allowed = (slot[None, None, :] <= slot[None, :, None]) & \
        ((seg_k == -1) | (seg_k == seg_q)) & (seg_k != -2)            # [P, T, T]
    allowed |= torch.eye(width, dtype=torch.bool)[None]              # pads see themselves: no NaN
    owner_t = torch.as_tensor(list(owner), dtype=torch.long)
    ids, pos, allowed = ids.to(device), pos.to(device), allowed[:, None].to(device)
    src, targets, owner_t = src.to(device), targets.to(device), owner_t.to(device)

    def head_fn(hidden: torch.Tensor, head: nn.Module):
        picked = hidden[owner_t[:, None], src]                       # [N, R, H]
        return token_logprobs_from_hidden(picked, head, targets, chunk_tokens=chunk_tokens,
                                          with_entropy=with_entropy)

    return model(ids, position_ids=pos, attention_mask=allowed, head_fn=head_fn)
