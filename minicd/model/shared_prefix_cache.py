"""Shared-prefix (cascade) decode attention: each distinct prompt's K/V is kept and read once.

When a prompt has ``n`` samples, decoding with an ordinary :class:`~minicd.model.decoder.KVCache`
gives every sample its own copy of the prompt's keys and values, and every decode step reads all
``n`` copies: decode attention is memory-bound, so most of its time goes to re-reading the same
prefix. :class:`SharedPrefixKVCache` keeps

* the prefill K/V of each DISTINCT prompt once, ``[U, kv_heads, W, head_dim]`` per layer (views of
  the prefill cache: no copy), with its left-padding validity ``[U, W]``;
* the generated tokens' K/V per row, ``[B, kv_heads, max_new, head_dim]`` per layer (preallocated);
* the row -> prompt map (``owner``).

Row ``b``'s attention is softmax over (its prompt's valid prefix keys ++ its own generated keys),
computed by :func:`shared_prefix_attention`: the queries of a prompt's rows are gathered into one
``[U, kv_heads, C * group, head_dim]`` block (C: the most rows any prompt has), so ONE batched
matmul per layer scores them against the prefix (each prompt's prefix read once); the per-row
suffix scores are gathered into the same layout, one softmax runs over the concatenation, and the
two value products are summed back per row. Exact: the same softmax as attention over a per-row
copy of the prefix, up to floating-point rounding.

The cache serves one-token decode forwards only (prefill into a ``KVCache``, then build this from
it); the caller passes each row's position. Use under ``torch.no_grad()``/``inference_mode``.
"""

from __future__ import annotations

from typing import Sequence

import torch

from minicd.model.decoder import KVCache


def shared_prefix_attention(q: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor,
                            prefix_bias: torch.Tensor | None, suffix_k: torch.Tensor,
                            suffix_v: torch.Tensor, slots: torch.Tensor,
                            slot_of_row: torch.Tensor) -> torch.Tensor:
    """Decode attention of ``B`` rows over their prompt's shared prefix and their own suffix.

    ``q`` ``[B, heads, 1, hd]``: one query per row (RoPE applied). ``prefix_k``/``prefix_v``
    ``[U, kv, W, hd]``: each distinct prompt's keys/values; ``prefix_bias`` ``[U, 1, 1, W]``
    (0 for a real token, -inf for a pad) or None when no prompt is padded. ``suffix_k``/
    ``suffix_v`` ``[B, kv, N, hd]`` (N >= 1): each row's generated keys/values, all valid.
    ``slots`` ``[U, C]`` long: the rows of each prompt, padded with one of its own rows (their
    results are dropped); ``slot_of_row`` ``[B]`` long: row b's flat slot ``u * C + j``.
    Query head h reads kv head ``h // (heads // kv)`` (GQA; group 1 is MHA). Scale 1/sqrt(hd).
    Returns ``[B, heads, 1, hd]``.
    """
    b, heads, _, hd = q.shape
    u, kv, w, _ = prefix_k.shape
    g, c, n = heads // kv, slots.shape[1], suffix_k.shape[2]
    qr = q.reshape(b, kv, g, hd) * hd ** -0.5  # [B, kv, g, hd] (scaled once)
    q_grouped = qr[slots].transpose(1, 2).reshape(u, kv, c * g, hd)  # [U, kv, C*g, hd]
    s_pre = torch.matmul(q_grouped, prefix_k.transpose(-1, -2))  # [U, kv, C*g, W]
    if prefix_bias is not None:
        s_pre = s_pre + prefix_bias
    s_suf = torch.matmul(qr, suffix_k.transpose(-1, -2))  # [B, kv, g, N]
    s_suf = s_suf[slots].transpose(1, 2).reshape(u, kv, c * g, n)  # [U, kv, C*g, N]
    p = torch.softmax(torch.cat([s_pre, s_suf], dim=-1).float(), dim=-1).to(q.dtype)
    # p [U, kv, C*g, W+N]: one softmax over prefix ++ suffix per (row, head)
    o_pre = torch.matmul(p[..., :w], prefix_v)  # [U, kv, C*g, hd]
    o_pre = o_pre.view(u, kv, c, g, hd).transpose(1, 2).reshape(u * c, kv, g, hd)[slot_of_row]
    p_suf = p[..., w:].reshape(u, kv, c, g, n).transpose(1, 2).reshape(u * c, kv, g, n)
    out = o_pre + torch.matmul(p_suf[slot_of_row], suffix_v)  # [B, kv, g, hd]
    return out.reshape(b, heads, 1, hd)


class SharedPrefixKVCache:
    """Decode cache: each distinct prompt's prefill K/V once, generated K/V per row (see the
    module docstring).

    ``prefix``: a :class:`~minicd.model.decoder.KVCache` holding the prefill of ``U`` distinct
    prompts (left-padded, ``prefix.length`` slots); its tensors are kept by reference (sliced to
    the prefill width, not copied). ``owner``: the prompt of each of the ``B`` decode rows (every
    prompt needs at least one row). ``max_new``: suffix capacity (generated tokens per row).

    :class:`~minicd.model.decoder.DecoderModel` drives it like a ``KVCache``: ``begin`` (one
    token per row), ``attend`` per layer, ``commit``.
    """

    def __init__(self, prefix: KVCache, owner: Sequence[int], max_new: int) -> None:
        w = prefix.length
        self.prefix_keys = [k[:, :, :w] for k in prefix.keys]  # [U, kv, W, hd] views
        self.prefix_values = [v[:, :, :w] for v in prefix.values]
        self.prefix_valid = prefix.valid[:, :w]  # [U, W]
        self.owner = [int(o) for o in owner]  # [B] prompt of each row
        if sorted(set(self.owner)) != list(range(self.prefix_valid.shape[0])):
            raise ValueError(f"SharedPrefixKVCache: every one of the {self.prefix_valid.shape[0]} "
                             f"prompts needs >= 1 row, got owner {self.owner}")
        b = len(self.owner)
        self.suffix_keys = [k.new_zeros(b, k.shape[1], max_new, k.shape[3])
                            for k in self.prefix_keys]  # [B, kv, max_new, hd]
        self.suffix_values = [torch.zeros_like(s) for s in self.suffix_keys]
        self.generated = 0  # suffix slots filled (the same for every row)
        self._pending = 0
        self._index()

    @property
    def device(self) -> torch.device:
        return self.prefix_valid.device

    @property
    def length(self) -> int:
        """Slots a row's query sees: the prefill width plus the generated tokens."""
        return self.prefix_valid.shape[1] + self.generated

    def _index(self) -> None:
        """Rebuild ``slots`` [U, C], ``slot_of_row`` [B] and the prefix bias from ``owner``."""
        rows_of: list[list[int]] = [[] for _ in range(self.prefix_valid.shape[0])]
        for r, o in enumerate(self.owner):
            rows_of[o].append(r)
        c = max(len(rs) for rs in rows_of)
        slot_of_row = [0] * len(self.owner)
        for u, rs in enumerate(rows_of):
            for j, r in enumerate(rs):
                slot_of_row[r] = u * c + j
        self.slots = torch.tensor([rs + [rs[0]] * (c - len(rs)) for rs in rows_of],
                                  device=self.device)  # [U, C]
        self.slot_of_row = torch.tensor(slot_of_row, device=self.device)  # [B]
        self._owner_t = torch.tensor(self.owner, device=self.device)  # [B]
        self.prefix_bias = None  # [U, 1, 1, W] additive: -inf at pads; None: no pads
        if not bool(self.prefix_valid.all()):
            bias = torch.zeros(self.prefix_valid.shape, dtype=self.prefix_keys[0].dtype,
                               device=self.device).masked_fill(~self.prefix_valid, float("-inf"))
            self.prefix_bias = bias[:, None, None, :]

    def seen_tokens(self) -> torch.Tensor:
        """Number of real tokens already cached per row, ``[B]`` (long)."""
        return self.prefix_valid.sum(-1)[self._owner_t] + self.generated

    def begin(self, valid: torch.Tensor) -> None:
        """Reserve one suffix slot per row for ``valid`` ``[B, 1]`` (every row a real token).
        Returns None: this cache masks its own keys (``attend`` ignores the SDPA mask)."""
        if valid.shape != (len(self.owner), 1):
            raise ValueError(f"SharedPrefixKVCache decodes one token for each of its "
                             f"{len(self.owner)} rows per forward, got {tuple(valid.shape)}; "
                             "prefill into a KVCache")
        if self.generated >= self.suffix_keys[0].shape[2]:
            raise ValueError(f"SharedPrefixKVCache is full ({self.generated} generated tokens)")
        self._pending = 1
        return None

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        """Cache this step's ``k``/``v`` ``[B, kv, 1, hd]`` in the rows' suffix and return the
        attention output ``[B, heads, 1, hd]`` of ``q`` ``[B, heads, 1, hd]`` over prefix ++
        suffix (:func:`shared_prefix_attention`). ``mask`` is ignored (see :meth:`begin`)."""
        if self.suffix_keys[layer_idx].dtype != k.dtype:  # e.g. FSDP2 mixed precision (bf16)
            self.suffix_keys[layer_idx] = self.suffix_keys[layer_idx].to(k.dtype)
            self.suffix_values[layer_idx] = self.suffix_values[layer_idx].to(v.dtype)
            self.prefix_keys[layer_idx] = self.prefix_keys[layer_idx].to(k.dtype)
            self.prefix_values[layer_idx] = self.prefix_values[layer_idx].to(v.dtype)
        n = self.generated
        self.suffix_keys[layer_idx][:, :, n] = k[:, :, 0]
        self.suffix_values[layer_idx][:, :, n] = v[:, :, 0]
        bias = self.prefix_bias
        if bias is not None and bias.dtype != q.dtype:
            bias = bias.to(q.dtype)
        suffix_k = self.suffix_keys[layer_idx][:, :, : n + 1]  # [B, kv, n + 1, hd]
        suffix_v = self.suffix_values[layer_idx][:, :, : n + 1]
        return shared_prefix_attention(q, self.prefix_keys[layer_idx],
                                       self.prefix_values[layer_idx], bias, suffix_k, suffix_v,
                                       self.slots, self.slot_of_row)

    def commit(self) -> None:
        self.generated += self._pending
        self._pending = 0

    def select(self, rows: Sequence[int] | torch.Tensor) -> None:
        """Keep only rows ``rows`` (e.g. drop finished sequences): copies the rows' generated
        K/V only; a prompt left without rows is dropped (its prefix copied away once)."""
        rows = rows.tolist() if isinstance(rows, torch.Tensor) else [int(r) for r in rows]
        index = torch.tensor(rows, device=self.device)
        n = self.generated

        def keep(s: torch.Tensor) -> torch.Tensor:  # [B, kv, max_new, hd] -> [B', ...]
            out = s.new_zeros((len(rows),) + tuple(s.shape[1:]))
            out[:, :, :n] = s[index, :, :n]
            return out

        self.suffix_keys = [keep(s) for s in self.suffix_keys]
        self.suffix_values = [keep(s) for s in self.suffix_values]
        owner = [self.owner[r] for r in rows]
        live = sorted(set(owner))
        if len(live) < self.prefix_valid.shape[0]:
            prompts = torch.tensor(live, device=self.device)
            self.prefix_keys = [k[prompts] for k in self.prefix_keys]
            self.prefix_values = [v[prompts] for v in self.prefix_values]
            self.prefix_valid = self.prefix_valid[prompts]
            new_id = {p: i for i, p in enumerate(live)}
            owner = [new_id[o] for o in owner]
        self.owner = owner
        self._index()
