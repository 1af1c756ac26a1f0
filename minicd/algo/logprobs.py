"""Memory-lean per-token log-probabilities and entropies of a causal LM.

The vocabulary projection of a long batch (``[N, T, V]`` with V = 151,936 for Qwen) is the largest
tensor of a training step. These functions project ``chunk_tokens`` hidden states at a time, in
fp32 and keep only the per-token results: peak extra memory is O(chunk_tokens x V) in forward and
backward. For a plain head weight the gradient w.r.t. each hidden state is computed in the
forward pass (one H-vector per token), so nothing is stored at vocabulary size and nothing is
recomputed; other heads run each chunk under ``torch.utils.checkpoint``.

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


def _plain_weight(head: Head) -> torch.Tensor | None:
    """The weight ``[V, H]`` of a head that is exactly ``h @ W.T`` (a tensor, or a plain
    bias-free ``nn.Linear`` whose weight is a local tensor, e.g. gathered by FSDP2 during the
    forward), else None: LoRA-wrapped heads and other callables take the generic path."""
    if isinstance(head, torch.Tensor):
        weight = head
    elif type(head) is nn.Linear and head.bias is None:
        weight = head.weight
    else:
        return None
    if type(weight) not in (torch.Tensor, nn.Parameter):  # a DTensor shard, a fake tensor, ...
        return None
    return weight


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


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, temperature: float,
                  buf: torch.Tensor) -> torch.Tensor:
    """Tempered fp32 logits ``h @ W.T / temperature`` ``[n, V]``, written into ``buf[:n]`` (one
    buffer reused by every chunk: no fresh vocabulary-sized allocation per chunk)."""
    z = buf[: h.shape[0]]
    if h.dtype == weight.dtype == torch.float32:
        torch.mm(h, weight.t(), out=z)
    else:
        z.copy_(h @ weight.t())  # logits in the weights' dtype, then fp32 (as the naive path)
    if temperature != 1.0:
        z /= temperature
    return z


def _softmax_stats(z: torch.Tensor, y: torch.Tensor, with_entropy: bool, buf: torch.Tensor,
                   ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """From tempered fp32 logits ``z`` ``[n, V]``: log-probs of ``y`` ``[n]``, entropies ``[n]``
    (or None), probabilities ``p`` ``[n, V]`` and log-probabilities ``[n, V]``.

    ATen's row-wise log-softmax writes log p into ``buf[:n]`` (each row's max, sum and shift
    done while the row is in cache), then ``p = exp(log p)`` overwrites ``z``: two passes over
    the chunk instead of six for max / shift / exp / sum / divide / log separately."""
    n = z.shape[0]
    logsm = buf[:n]
    torch.ops.aten._log_softmax.out(z, -1, False, out=logsm)  # [n, V] log p
    p = torch.exp(logsm, out=z)  # [n, V] (the logits are not needed again)
    logp = logsm.gather(-1, y[:, None]).squeeze(-1)  # [n]
    ent = None
    if with_entropy:  # H = -sum_v p_v log p_v, as a batched dot (no [n, V] product)
        ent = -(p[:, None, :] @ logsm[:, :, None]).view(-1)  # [n]
    return logp, ent, p, logsm


def _dlogits(z: torch.Tensor, p: torch.Tensor, y: torch.Tensor, g_logp: torch.Tensor,
             ent: torch.Tensor | None, g_ent: torch.Tensor | None) -> torch.Tensor:
    """d(sum g_logp * logp + g_ent * H) / dz ``[n, V]``, written over ``p`` (and ``z`` = log p):
    d logp_y / dz = onehot(y) - p; dH / dz = -p * (log p + H)."""
    dz = p
    if g_ent is not None:
        z += ent[:, None]
        z *= p
        z *= -g_ent[:, None]  # [n, V] g_ent * dH/dz
    dz *= -g_logp[:, None]
    dz[torch.arange(dz.shape[0], device=dz.device), y] += g_logp
    if g_ent is not None:
        dz += z
    return dz


class _FusedTokenLogprobs(torch.autograd.Function):
    """Chunked log-softmax-gather of ``h @ W.T / temperature`` with the gradient w.r.t. the
    hidden states computed in the forward pass.

    logp_t depends on h_t alone, so its gradient is one H-vector per token,
    d logp_t / d h_t = (W[y_t] - softmax(z_t) W) / temperature, and the entropy's is
    -(p_t * (log p_t + H_t)) W / temperature. The forward stores these ``[N, H]`` vectors and the
    backward only scales them by the incoming gradients: no logits are kept or recomputed.
    When the weight needs a gradient (full fine-tuning), its gradient needs the incoming
    gradients, so the forward stores nothing vocabulary-sized and the backward recomputes each
    chunk's logits once, giving both gradients from one ``d loss / d logits`` chunk.
    """

    @staticmethod
    def forward(ctx, h, weight, y, temperature, with_entropy, chunk, grad_h, grad_w):
        n_tok = h.shape[0]
        logp = torch.empty(n_tok, dtype=torch.float32, device=h.device)  # [N]
        ent = torch.empty(n_tok if with_entropy else 0, dtype=torch.float32, device=h.device)
        store = grad_h and not grad_w
        d_logp = torch.empty_like(h) if store else None  # [N, H] d logp / d h
        d_ent = torch.empty_like(h) if store and with_entropy else None  # [N, H] d H / d h
        rows = min(chunk, n_tok)
        zbuf = torch.empty(rows, weight.shape[0], dtype=torch.float32, device=h.device)
        pbuf = torch.empty_like(zbuf)  # [chunk, V] each
        for s in range(0, n_tok, chunk):
            e = min(s + chunk, n_tok)
            z = _chunk_logits(h[s:e], weight, temperature, zbuf)  # [n, V]
            lp, en, p, logsm = _softmax_stats(z, y[s:e], with_entropy, pbuf)
            logp[s:e] = lp
            if with_entropy:
                ent[s:e] = en
            if not store:
                continue
            if with_entropy:  # dH/dh = -(p * (log p + H)) W
                logsm += en[:, None]
                logsm *= p
                torch.mm(logsm.to(weight.dtype), weight, out=d_ent[s:e])
                d_ent[s:e].neg_()
            # d logp / dh = W[y] - p W
            torch.addmm(weight[y[s:e]], p.to(weight.dtype), weight, alpha=-1.0,
                        out=d_logp[s:e])
        if store and temperature != 1.0:
            d_logp /= temperature
            if with_entropy:
                d_ent /= temperature
        if not with_entropy:
            ctx.mark_non_differentiable(ent)
        ctx.cfg = (temperature, with_entropy, chunk, grad_h, grad_w)
        if store:
            ctx.save_for_backward(d_logp, d_ent)
        else:
            ctx.save_for_backward(h, weight, y, ent if with_entropy else None)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        temperature, with_entropy, chunk, grad_h, grad_w = ctx.cfg
        if not with_entropy:
            g_ent = None
        if not grad_w:  # scale the stored per-token vectors
            d_logp, d_ent = ctx.saved_tensors
            gh = d_logp * g_logp[:, None].to(d_logp.dtype)
            if g_ent is not None:
                gh += d_ent * g_ent[:, None].to(d_ent.dtype)
            return gh, None, None, None, None, None, None, None
        h, weight, y, ent = ctx.saved_tensors  # recompute each chunk's logits once
        gh = torch.empty_like(h) if grad_h else None
        gw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)  # [V, H]
        zbuf = torch.empty(min(chunk, h.shape[0]), weight.shape[0], dtype=torch.float32,
                           device=h.device)
        pbuf = torch.empty_like(zbuf)  # [chunk, V] each
        for s in range(0, h.shape[0], chunk):
            e = min(s + chunk, h.shape[0])
            z = _chunk_logits(h[s:e], weight, temperature, zbuf)  # [n, V]
            _, _, p, logsm = _softmax_stats(z, y[s:e], False, pbuf)
            dz = _dlogits(logsm, p, y[s:e], g_logp[s:e], None if g_ent is None else ent[s:e],
                          None if g_ent is None else g_ent[s:e])
            dz = dz.to(weight.dtype)  # [n, V]
            if grad_h:
                torch.mm(dz, weight, out=gh[s:e])
            gw.addmm_(dz.t().float(), h[s:e].float(), alpha=1.0 / temperature)
        if grad_h and temperature != 1.0:
            gh /= temperature
        return gh, gw.to(weight.dtype), None, None, None, None, None, None


def token_logprobs_from_hidden(
    hidden: torch.Tensor,
    head: Head,
    targets: torch.Tensor,
    *,
    chunk_tokens: int = 1024,
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

    A plain weight (a tensor or a bias-free ``nn.Linear``) takes the fused path
    (:class:`_FusedTokenLogprobs`: gradients w.r.t. ``hidden`` computed in the forward, nothing
    recomputed); other heads (LoRA on the head, callables) run each chunk under
    ``torch.utils.checkpoint``. Either way peak extra memory is O(chunk_tokens x V).
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
    weight = _plain_weight(head)
    if weight is not None:
        grad = torch.is_grad_enabled()
        logp, ent = _FusedTokenLogprobs.apply(
            h, weight, y, float(temperature), with_entropy, chunk_tokens,
            grad and h.requires_grad, grad and weight.requires_grad)
    else:
        logp, ent = _chunked_checkpointed(h, head, y, temperature, with_entropy, chunk_tokens)
    logp = logp.masked_fill(ignored, 0.0).view(shape)
    if not with_entropy:
        return logp
    return logp, ent.view(shape)


def _chunked_checkpointed(h: torch.Tensor, head: Head, y: torch.Tensor, temperature: float,
                          with_entropy: bool, chunk_tokens: int,
                          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The generic path: each chunk's log-softmax under ``checkpoint`` (recomputed in backward)."""
    lean = _needs_grad(h, head)
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
    return torch.cat(logps), (torch.cat(ents) if with_entropy else None)


def model_token_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    *,
    last_n: int | None = None,
    target_mask: torch.Tensor | None = None,
    chunk_tokens: int = 1024,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each next token: ``out[:, t] = log p(input_ids[:, t + 1] | input_ids[:, :t+1])``.

    input_ids ``[B, T]`` -> ``[B, T - 1]`` (or ``[B, last_n]``: only the last ``last_n`` targets,
    e.g. the response part of right-aligned prompt+response rows, skipping the prompt's vocab
    projection). ``target_mask`` (the output's shape, e.g. the SFT loss mask): only the hidden
    states of its nonzero positions go through the vocabulary head, and the other positions
    read 0 (log-prob and entropy) with no gradient: a loss that masks them is unchanged, and
    its cost no longer grows with the prompt's length. Assumes ``model(..., head_fn=f)``
    returns ``f(final-normed hidden [B, T, H], head module)`` computed inside its forward, as :class:`minicd.model.decoder.DecoderLM`
    does, so the head is applied while FSDP2 has the root's parameters gathered.
    """
    def head_fn(hidden: torch.Tensor, head: nn.Module):
        hidden, targets = hidden[:, :-1], input_ids[:, 1:]  # [B, T-1, H], [B, T-1]
        if last_n is not None:
            keep = hidden.shape[1] - last_n
            hidden, targets = hidden[:, keep:], targets[:, keep:]
        if target_mask is None:
            return token_logprobs_from_hidden(hidden, head, targets, chunk_tokens=chunk_tokens,
                                              temperature=temperature, with_entropy=with_entropy)
        if target_mask.shape != targets.shape:
            raise ValueError(f"target_mask has shape {tuple(target_mask.shape)}, the log-probs "
                             f"{tuple(targets.shape)}")
        sel = target_mask.bool()  # [B, T-1]
        out = token_logprobs_from_hidden(hidden[sel], head, targets[sel],  # [M, H] -> [M]
                                         chunk_tokens=chunk_tokens, temperature=temperature,
                                         with_entropy=with_entropy)
        out = out if with_entropy else (out,)
        full = [torch.zeros(targets.shape, dtype=o.dtype, device=o.device).masked_scatter(sel, o)
                for o in out]  # [B, T-1] each
        return tuple(full) if with_entropy else full[0]

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
    chunk_tokens: int = 1024,
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
