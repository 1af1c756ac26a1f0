"""The dense decoder of the Qwen2 / Qwen2.5 / Qwen3 / Llama families in plain PyTorch.

Parameter names equal those of ``transformers``' ``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM`` /
``LlamaForCausalLM`` so a
Hugging Face state dict loads with ``load_state_dict(strict=True)`` (a tied checkpoint may omit
``lm_head.weight``). All projections are plain ``nn.Linear`` modules, so LoRA can replace them by
name, and ``model.model.layers[i]`` are the units FSDP2 shards.

Numerics follow transformers (fp32 parity <= 1e-5): RMSNorm in fp32 then cast back and scaled;
half-split RoPE with cos/sin computed in fp32 and cast to the activation dtype; Qwen3 per-head
``q_norm``/``k_norm`` before RoPE; SwiGLU MLP (Llama's optional ``mlp_bias``); attention through
``F.scaled_dot_product_attention(..., enable_gqa=True)`` (a cached forward's attention belongs
to its cache: ``KVCache.attend``, or the shared-prefix decode attention of
:mod:`minicd.model.shared_prefix_cache`).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from minicd.model.hf_config import DecoderConfig

class RMSNorm(nn.Module):
    """y = weight * (x / sqrt(mean(x^2) + eps)), normalised in fp32, cast back before scaling."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``[B, T, head_dim]`` (half-split layout), computed in fp32, cast to dtype."""
    exponent = torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim
    inv_freq = 1.0 / (theta ** exponent)  # [hd/2]
    freqs = position_ids[..., None].float() * inv_freq  # [B, T, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, hd]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, hd]; cos/sin [B, T, hd]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              mask: torch.Tensor | None) -> torch.Tensor:
    """SDPA of ``q`` ``[B, heads, T, hd]`` over ``k``/``v`` ``[B, kv, S, hd]`` (GQA) ->
    ``[B, heads, T, hd]``. ``mask``: boolean ``[B, 1, T, S]`` (True = attend) or None: causal,
    except that one query (decoding) sees every key."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                          is_causal=mask is None and q.shape[2] > 1,
                                          enable_gqa=True)


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = (cfg.num_attention_heads,
                                                  cfg.num_key_value_heads, cfg.head_dim)
        h, q_out, kv_out = cfg.hidden_size, self.n_heads * self.head_dim, self.n_kv * self.head_dim
        self.q_proj = nn.Linear(h, q_out, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(h, kv_out, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(h, kv_out, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(q_out, h, bias=cfg.o_proj_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None, kv_cache: KVCache | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = _apply_rope(q.transpose(1, 2), cos, sin)  # [B, nh, T, hd]
        k = _apply_rope(k.transpose(1, 2), cos, sin)  # [B, nkv, T, hd]
        if kv_cache is not None:  # the cache owns a cached forward's attention
            out = kv_cache.attend(self.layer_idx, q, k, v, mask)  # [B, nh, T, hd]
        else:
            out = attention(q, k, v, mask)  # [B, nh, T, hd]
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        bias = cfg.mlp_bias
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None, kv_cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class KVCache:
    """Per-layer key/value buffers ``[B, kv_heads, capacity, head_dim]`` for incremental decoding.

    Slots are shared by all rows: a forward of T tokens writes slots ``[length, length + T)``.
    ``valid[b, s]`` marks slots holding a real (non-pad) token, so a left-padded prefill followed
    by one-token decode steps works; each row's positions continue from its count of real tokens.
    Capacity grows (doubling) when exceeded. Use under ``torch.no_grad()``/``inference_mode``.

    A cached forward calls ``begin`` (the new tokens' validity; returns the key validity the
    SDPA mask is built from, or None when the cache masks its own keys), ``attend`` in every
    layer (the cache owns the attention of a cached forward) and ``commit``; reads ``length``
    and ``seen_tokens``. :class:`minicd.model.shared_prefix_cache.SharedPrefixKVCache` is the
    decode-only cache that keeps each distinct prompt's prefix once behind the same calls.
    """

    def __init__(self, config: DecoderConfig, batch_size: int, max_len: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device)
                     for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)  # [B, S]
        self.length = 0
        self._pending = 0

    @classmethod
    def for_model(cls, model: DecoderLM, batch_size: int, max_len: int) -> KVCache:
        """A cache matching ``model``'s config, dtype and device."""
        return cls(model.config, batch_size, max_len, dtype=model.dtype, device=model.device)

    @property
    def capacity(self) -> int:
        return self.valid.shape[1]

    def seen_tokens(self) -> torch.Tensor:
        """Number of real tokens already cached per row, ``[B]`` (long)."""
        return self.valid[:, : self.length].sum(-1)

    def begin(self, valid: torch.Tensor) -> torch.Tensor:
        """Reserve slots for ``valid`` ``[B, T]``; returns key validity ``[B, length + T]``."""
        end = self.length + valid.shape[1]
        if end > self.capacity:
            extra = max(end, 2 * self.capacity) - self.capacity
            grow = lambda t, dim: torch.cat(  # noqa: E731
                [t, t.new_zeros(*t.shape[:dim], extra, *t.shape[dim + 1:])], dim=dim)
            self.keys = [grow(k, 2) for k in self.keys]
            self.values = [grow(v, 2) for v in self.values]
            self.valid = grow(self.valid, 1)
        self.valid[:, self.length: end] = valid
        self._pending = valid.shape[1]
        return self.valid[:, :end]

    def update(self, layer_idx: int, k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's k/v ``[B, kv, T, hd]``; return all cached k/v ``[B, kv, S, hd]``."""
        end = self.length + k.shape[2]
        if self.keys[layer_idx].dtype != k.dtype:  # e.g. FSDP2 mixed precision computes in bf16
            self.keys[layer_idx] = self.keys[layer_idx].to(k.dtype)
            self.values[layer_idx] = self.values[layer_idx].to(v.dtype)
        self.keys[layer_idx][:, :, self.length: end] = k
        self.values[layer_idx][:, :, self.length: end] = v
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None) -> torch.Tensor:
        """Cache this step's ``k``/``v`` ``[B, kv, T, hd]`` (:meth:`update`) and return the SDPA
        output ``[B, heads, T, hd]`` of ``q`` ``[B, heads, T, hd]`` over every cached key.
        ``mask``: boolean ``[B, 1, T, S]`` (True = attend) or None: causal, except that one
        query (decoding) sees every cached key."""
        k, v = self.update(layer_idx, k, v)  # [B, kv, S, hd]
        return attention(q, k, v, mask)

    def commit(self) -> None:
        self.length += self._pending
        self._pending = 0

    def select(self, rows: torch.Tensor) -> None:
        """Keep only batch rows ``rows`` (e.g. drop finished sequences)."""
        self.keys = [k[rows] for k in self.keys]
        self.values = [v[rows] for v in self.values]
        self.valid = self.valid[rows]


def attention_mask_for(key_valid: torch.Tensor, q_start: int, q_len: int) -> torch.Tensor:
    """Boolean SDPA mask ``[B, 1, q_len, S]`` (True = attend) for queries at slots
    ``q_start .. q_start + q_len - 1``: causal over valid keys, plus each query's own slot so
    padded query rows never see an all-masked row (no NaNs)."""
    s = key_valid.shape[1]
    q_slot = torch.arange(q_start, q_start + q_len, device=key_valid.device)[:, None]  # [Tq, 1]
    k_slot = torch.arange(s, device=key_valid.device)[None, :]  # [1, S]
    allowed = (k_slot <= q_slot)[None] & key_valid[:, None, :]  # [B, Tq, S]
    return (allowed | (k_slot == q_slot)[None])[:, None]


class DecoderModel(nn.Module):
    """Embedding, decoder layers and final norm (HF's ``model.`` sub-module)."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        pad = cfg.pad_token_id if cfg.pad_token_id is not None and \
            0 <= cfg.pad_token_id < cfg.vocab_size else None  # as HF: no gradient for the pad row
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=pad)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head_dim, self.rope_theta = cfg.head_dim, cfg.rope_theta
        self.activation_checkpointing = False

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                kv_cache: KVCache | None = None) -> torch.Tensor:
        if attention_mask is not None and attention_mask.dim() == 4:
            mask = self._explicit_mask(attention_mask, position_ids, kv_cache)
        else:
            position_ids, mask = self._positions_and_mask(input_ids, position_ids, attention_mask,
                                                          kv_cache)
        h = self.embed_tokens(input_ids)  # [B, T, H]
        cos, sin = rope_cos_sin(position_ids, self.head_dim, self.rope_theta, h.dtype)
        use_ckpt = self.activation_checkpointing and kv_cache is None and torch.is_grad_enabled()
        for layer in self.layers:
            if use_ckpt:
                h = checkpoint(layer, h, cos, sin, mask, use_reentrant=False)
            else:
                h = layer(h, cos, sin, mask, kv_cache)
        if kv_cache is not None:
            kv_cache.commit()
        return self.norm(h)

    @staticmethod
    def _explicit_mask(attention_mask: torch.Tensor, position_ids: torch.Tensor | None,
                       kv_cache: KVCache | None) -> torch.Tensor:
        """A caller-built boolean mask ``[B, 1, T, T]`` (True = attend; every query must see at
        least itself), for packed sequences such as one prompt followed by several responses
        that each see the prompt and themselves only (:func:`minicd.algo.logprobs.
        shared_prefix_logprobs`). Needs explicit ``position_ids`` and no KV cache."""
        if position_ids is None or kv_cache is not None:
            raise ValueError("a [B, 1, T, T] attention_mask needs position_ids and no kv_cache")
        return attention_mask.bool()

    @staticmethod
    def _positions_and_mask(input_ids: torch.Tensor, position_ids: torch.Tensor | None,
                            attention_mask: torch.Tensor | None, kv_cache: KVCache | None,
                            ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Positions ``[B, T]`` and the SDPA mask (None: plain causal) of a padded batch."""
        b, t = input_ids.shape
        valid = None if attention_mask is None else attention_mask.bool()  # [B, T]
        start = 0 if kv_cache is None else kv_cache.length
        if position_ids is None:
            seen = 0 if kv_cache is None else kv_cache.seen_tokens()[:, None]  # [B, 1]
            if valid is None:
                position_ids = seen + torch.arange(t, device=input_ids.device)[None].expand(b, t)
            else:
                position_ids = (seen + valid.long().cumsum(-1) - 1).clamp_min(0)  # [B, T]
        if kv_cache is not None:
            key_valid = kv_cache.begin(valid if valid is not None else
                                       torch.ones(b, t, dtype=torch.bool, device=input_ids.device))
        else:
            key_valid = valid
        if (start == 0 or t == 1) and (key_valid is None or bool(key_valid.all())):
            mask = None  # plain causal attention, or one decoded token over an unpadded cache
        else:
            mask = attention_mask_for(key_valid, start, t)
        return position_ids, mask


class DecoderLM(nn.Module):
    """Qwen2/Qwen3/Llama causal LM; ``forward`` returns logits ``[B, T, V]`` as transformers."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DecoderModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        self.register_load_state_dict_pre_hook(self._fill_tied_head)

    def tie_weights(self) -> None:
        """Make ``lm_head.weight`` the embedding Parameter when embeddings are tied."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def _fill_tied_head(self, module, state_dict, prefix, *args) -> None:
        # A tied checkpoint may omit lm_head.weight (HF) or include a copy: the embedding wins.
        emb = prefix + "model.embed_tokens.weight"
        if self.config.tie_word_embeddings and emb in state_dict:
            state_dict[prefix + "lm_head.weight"] = state_dict[emb]

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each decoder block in backward (``torch.utils.checkpoint``, non-reentrant)."""
        self.model.activation_checkpointing = enabled

    def get_output_embeddings(self) -> nn.Module:
        """The output head module (``lm_head``; may be wrapped by LoRA/FSDP): maps
        ``[..., H] -> [..., V]``. Use this rather than reaching for ``lm_head.weight``."""
        return self.lm_head

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, kv_cache: KVCache | None = None, *,
                return_hidden: bool = False, logits_to_keep: int | None = None,
                head_fn: Callable[[torch.Tensor, nn.Module], Any] | None = None) -> Any:
        """Logits ``[B, T, V]`` (model dtype) for ``input_ids`` ``[B, T]``.

        ``attention_mask`` ``[B, T]``: 1 = token, 0 = pad (left padding; with no position_ids,
        positions are ``cumsum(mask) - 1`` so padded rows match unpadded ones), or an explicit
        boolean ``[B, 1, T, T]`` mask (True = attend) with ``position_ids`` for packed rows
        (a prompt followed by several responses, each blind to its siblings). ``kv_cache``:
        a :class:`KVCache` that this call appends to (or a decode-only
        :class:`~minicd.model.shared_prefix_cache.SharedPrefixKVCache`, one token per row,
        explicit ``position_ids``). ``return_hidden=True`` returns the final-normed hidden
        states ``[B, T, H]`` instead of logits (for chunked log-probs).
        ``logits_to_keep=n`` computes logits for the last ``n`` positions only.
        ``head_fn(hidden, lm_head)``: returned instead of logits, computed INSIDE the forward so
        that FSDP2 keeps the root's parameters (lm_head, tied embeddings) gathered while it runs;
        this is how the chunked log-prob function applies the head without ``[B, T, V]`` logits.

        Without padding (or with right padding and ``attention_mask=None``, which leaves real
        tokens exact) attention runs with ``is_causal=True``, the fast SDPA kernels; an explicit
        padding mask makes SDPA use a masked kernel (on CUDA with GQA, likely the O(T^2) math one).
        """
        h = self.model(input_ids, position_ids, attention_mask, kv_cache)  # [B, T, H]
        if return_hidden:
            return h
        if head_fn is not None:
            return head_fn(h, self.lm_head)
        if logits_to_keep is not None:
            h = h[:, -logits_to_keep:]
        return self.lm_head(h)

    def hidden_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final-normed hidden states ``[B, T, H]`` (through ``__call__``, so FSDP hooks run)."""
        return self(input_ids, position_ids, attention_mask, return_hidden=True)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Fresh weights: N(0, initializer_range) for linears/embeddings (pad row zero), zero
        biases, unit norms. Deterministic given ``generator`` (on the parameters' device)."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, nn.Linear):
                if module is self.lm_head and self.config.tie_word_embeddings:
                    continue  # the embedding's init covers it
                module.weight.normal_(0.0, std, generator=generator)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, std, generator=generator)
                if module.padding_idx is not None:
                    module.weight[module.padding_idx].zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Parameter count (tied weights counted once)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype
