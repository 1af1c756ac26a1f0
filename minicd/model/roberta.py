"""A RoBERTa encoder in pure torch (PLM-ICD's backbone), with Hugging Face parameter names.

``load_roberta(path_or_repo_id)`` reads any HF RoBERTa checkpoint directory (``config.json`` with
``model_type = "roberta"`` and safetensors weights; a ``roberta.`` prefix, as in
``RobertaForMaskedLM`` checkpoints, is accepted; pooler and LM-head tensors are ignored).
``forward(input_ids, attention_mask) -> [B, T, H]`` equals the last hidden state of
``transformers.RobertaModel`` (post-LayerNorm blocks, absolute positions counted from
``pad_token_id + 1`` over non-pad tokens, GELU, additive attention mask).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields

import torch
from torch import nn

from minicd.errors import CheckpointError
from minicd.model.hub import load_state_dict, read_config_json, resolve_checkpoint


@dataclass(frozen=True)
class RobertaConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int = 1
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1

    @classmethod
    def from_hf_dict(cls, data: dict, source: str = "config.json") -> "RobertaConfig":
        if data.get("model_type") not in ("roberta", "xlm-roberta", "camembert"):
            raise CheckpointError(f"{source}: key 'model_type' is {data.get('model_type')!r}; "
                                  "load_roberta reads RoBERTa checkpoints (model_type 'roberta')")
        if data.get("position_embedding_type", "absolute") != "absolute":
            raise CheckpointError(f"{source}: key 'position_embedding_type' is "
                                  f"{data['position_embedding_type']!r}; only 'absolute' is supported")
        if data.get("hidden_act", "gelu") not in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
            raise CheckpointError(f"{source}: key 'hidden_act' is {data['hidden_act']!r}; "
                                  "supported: gelu, gelu_new, gelu_pytorch_tanh")
        names = {f.name for f in fields(cls)}
        missing = [n for n in ("vocab_size", "hidden_size", "num_hidden_layers",
                               "num_attention_heads", "intermediate_size",
                               "max_position_embeddings") if n not in data]
        if missing:
            raise CheckpointError(f"{source}: missing key(s) {missing}; not a RoBERTa config.json")
        return cls(**{k: v for k, v in data.items() if k in names})


class RobertaEmbeddings(nn.Module):
    def __init__(self, cfg: RobertaConfig) -> None:
        super().__init__()
        self.pad_id = cfg.pad_token_id
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                            padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size,
                                                padding_idx=cfg.pad_token_id)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        real = (input_ids != self.pad_id).long()                 # [B, T]
        positions = torch.cumsum(real, dim=1) * real + self.pad_id  # pads keep pad_id
        x = (self.word_embeddings(input_ids) + self.position_embeddings(positions)
             + self.token_type_embeddings.weight[0])             # [B, T, H]
        return self.dropout(self.LayerNorm(x))


class RobertaSelfAttention(nn.Module):
    def __init__(self, cfg: RobertaConfig) -> None:
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.dropout = nn.Dropout(cfg.attention_probs_dropout_prob)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        split = lambda y: y.view(b, t, self.heads, h // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))  # [B, nh, T, d]
        scores = q @ k.transpose(-1, -2) / math.sqrt(h // self.heads) + bias  # [B, nh, T, T]
        out = self.dropout(torch.softmax(scores, dim=-1)) @ v    # [B, nh, T, d]
        return out.transpose(1, 2).reshape(b, t, h)


class DenseNorm(nn.Module):
    """``LayerNorm(dense(x) + residual)``: the output sub-block of attention and of the MLP."""

    def __init__(self, d_in: int, d_out: int, eps: float, dropout: float) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class RobertaAttention(nn.Module):
    def __init__(self, cfg: RobertaConfig) -> None:
        super().__init__()
        self.self = RobertaSelfAttention(cfg)
        self.output = DenseNorm(cfg.hidden_size, cfg.hidden_size, cfg.layer_norm_eps,
                                cfg.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, bias), x)


class RobertaIntermediate(nn.Module):
    def __init__(self, cfg: RobertaConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.approximate = "none" if cfg.hidden_act == "gelu" else "tanh"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.gelu(self.dense(x), approximate=self.approximate)


class RobertaLayer(nn.Module):
    def __init__(self, cfg: RobertaConfig) -> None:
        super().__init__()
        self.attention = RobertaAttention(cfg)
        self.intermediate = RobertaIntermediate(cfg)
        self.output = DenseNorm(cfg.intermediate_size, cfg.hidden_size, cfg.layer_norm_eps,
                                cfg.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, bias)
        return self.output(self.intermediate(x), x)


class RobertaEncoder(nn.Module):
    def __init__(self, cfg: RobertaConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(RobertaLayer(cfg) for _ in range(cfg.num_hidden_layers))


class RobertaModel(nn.Module):
    """RoBERTa without pooler: ``forward(input_ids [B, T], attention_mask [B, T]) -> [B, T, H]``.

    Dropout (hidden and attention probabilities, as the config says) acts in training mode only,
    where transformers places it."""

    def __init__(self, cfg: RobertaConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embeddings = RobertaEmbeddings(cfg)
        self.encoder = RobertaEncoder(cfg)

    def forward(self, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embeddings(input_ids)                           # [B, T, H]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        keep = attention_mask.to(torch.bool)[:, None, None, :]   # [B, 1, 1, T]
        bias = torch.zeros(keep.shape, dtype=x.dtype, device=x.device)
        bias = bias.masked_fill(~keep, torch.finfo(x.dtype).min)
        for layer in self.encoder.layer:
            x = layer(x, bias)
        return x


_IGNORED = ("pooler.", "lm_head.", "classifier.", "embeddings.position_ids",
            "embeddings.token_type_ids")


def load_roberta(path_or_repo_id: str | os.PathLike, dtype: torch.dtype | None = None,
                 device: torch.device | str = "cpu") -> RobertaModel:
    """Load a Hugging Face RoBERTa checkpoint (local dir or hub id) into :class:`RobertaModel`.

    ``dtype``: None keeps float32; else the weights are cast (e.g. torch.bfloat16)."""
    root = resolve_checkpoint(path_or_repo_id)
    data, cfg_path = read_config_json(root)
    cfg = RobertaConfig.from_hf_dict(data, source=str(cfg_path))
    raw = load_state_dict(root)
    state = {}
    for name, tensor in raw.items():
        name = name.removeprefix("roberta.")
        if not name.startswith(_IGNORED):
            state[name] = tensor
    model = RobertaModel(cfg)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(f"{root}: weights do not fit a RoBERTa of this config: missing "
                              f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}")
    return model.to(device=device, dtype=dtype or torch.float32)
