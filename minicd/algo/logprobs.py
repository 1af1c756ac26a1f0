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
    copies of the prompt. Here the prompts minus their last token are prefilled into a
    :class:`~minicd.model.qwen.KVCache` (left-padded, ``[P, Lp]``), the cache rows are gathered to
    one per response, and a second forward runs ``[last prompt token | response]`` (right-padded,
    ``[N, 1 + R]``) against it. With autograd on, the gradient of the shared prompt computation is
    the sum over its samples: the same math as the collated rows, up to float rounding.

    Needs a model whose forward takes ``kv_cache`` and ``head_fn`` (:class:`QwenForCausalLM`,
    plain or FSDP2-wrapped) and prompts of >= 2 tokens. Positions past a response's end are
    computed on ``pad_id`` and must be masked by the caller (as with the collated rows).
    Returns fp32 log-probs ``[N, R]`` (R = longest response), and entropies with ``with_entropy``.
    """
    from minicd.model.qwen import KVCache  # model code imports nothing from algo

    if not responses:
        raise ValueError("shared_prefix_logprobs: no responses")
    if len(owner) != len(responses) or not all(0 <= o < len(prompts) for o in owner):
        raise ValueError(f"owner must give one prompt index in [0, {len(prompts)}) per response")
    if min(len(p) for p in prompts) < 2:
        raise ValueError("shared_prefix_logprobs needs prompts of >= 2 tokens")
    core = getattr(model, "module", model)
    config = getattr(core, "config", None)
    params = next(model.parameters())
    device = params.device
    n_p, n_r = len(prompts), len(responses)
    width = max(len(p) for p in prompts) - 1
    r_len = max(1, max(len(r) for r in responses))
    prefix = torch.full((n_p, width), pad_id, dtype=torch.long)          # [P, Lp] left-padded
    prefix_mask = torch.zeros(n_p, width, dtype=torch.long)              # [P, Lp]
    for i, p in enumerate(prompts):
        prefix[i, width - len(p) + 1:] = torch.as_tensor(list(p[:-1]), dtype=torch.long)
        prefix_mask[i, width - len(p) + 1:] = 1
    seg = torch.full((n_r, 1 + r_len), pad_id, dtype=torch.long)       # [N, 1+R] right-padded
    seg_mask = torch.zeros(n_r, 1 + r_len, dtype=torch.long)            # [N, 1+R]
    for i, (o, r) in enumerate(zip(owner, responses)):
        seg[i, 0] = prompts[o][-1]
        seg[i, 1:1 + len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        seg_mask[i, :1 + len(r)] = 1
    prefix, prefix_mask = prefix.to(device), prefix_mask.to(device)
    seg, seg_mask = seg.to(device), seg_mask.to(device)

    cache = KVCache(config, n_p, width + 1 + r_len, dtype=params.dtype, device=device)
    model(prefix, attention_mask=prefix_mask, kv_cache=cache, head_fn=lambda h, head: None)
    cache.select(torch.as_tensor(list(owner), dtype=torch.long, device=device))  # [N, ...]

    def head_fn(hidden: torch.Tensor, head: nn.Module):
        # position t of [last prompt token | response] predicts response token t
        return token_logprobs_from_hidden(hidden[:, :r_len], head, seg[:, 1:],
                                          chunk_tokens=chunk_tokens, with_entropy=with_entropy)

    return model(seg, attention_mask=seg_mask, kv_cache=cache, head_fn=head_fn)
