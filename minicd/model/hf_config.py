"""Hugging Face ``config.json`` <-> :class:`DecoderConfig` for the dense decoder families.

Three families share one decoder (:mod:`minicd.model.decoder`): ``qwen2`` (Qwen2 / Qwen2.5:
q/k/v biased), ``qwen3`` (per-head q/k RMSNorm, explicit head_dim) and ``llama`` (Llama 2/3
layout without rope scaling, e.g. SmolLM2; optional attention / MLP biases). Both config styles
are read: hub style (``rope_theta``, ``rope_scaling``, ``torch_dtype``) and transformers-5 style
(``rope_parameters``, ``dtype``, ``layer_types``). What the decoder cannot run (MoE, rope scaling
such as ``llama3`` or ``yarn``, sliding windows, quantized weights, other activations) is refused
with a :class:`CheckpointError` naming the file and the key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from minicd.errors import CheckpointError

ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "llama": "LlamaForCausalLM"}
_MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "num_experts_per_tok",
             "moe_intermediate_size", "shared_expert_intermediate_size", "decoder_sparse_step")
_DTYPE_NAMES = ("float32", "bfloat16", "float16")
_SUPPORTED = "Only dense Qwen2/Qwen2.5/Qwen3/Llama checkpoints are supported."


def _refuse(source: str, key: str, what: str, fix: str) -> CheckpointError:
    return CheckpointError(f"{source}: unsupported checkpoint config, key '{key}': {what}. {fix}")


@dataclass
class DecoderConfig:
    """Architecture hyper-parameters of a dense Qwen2 / Qwen3 / Llama causal LM (full attention).

    ``attention_bias``: qwen2 always biases q/k/v (never o_proj); for qwen3 and llama it biases
    all four attention projections, as in transformers. ``qk_norm`` is True exactly for qwen3.
    ``mlp_bias`` (llama only) biases gate/up/down.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    attention_bias: bool | None = None   # None: True for qwen2 (q/k/v), False otherwise
    qk_norm: bool | None = None          # None: True for qwen3; must match the model type
    mlp_bias: bool = False               # llama only
    torch_dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        assert self.model_type in ARCHITECTURES, self.model_type
        qwen3 = self.model_type == "qwen3"
        if self.qk_norm is None:
            self.qk_norm = qwen3
        if self.attention_bias is None:
            self.attention_bias = self.model_type == "qwen2"
        # transformers' Qwen3 always has q_norm/k_norm and Qwen2 always biases q/k/v: other
        # combinations could not be saved in a form transformers and vLLM load faithfully.
        if self.qk_norm != qwen3:
            raise ValueError(f"qk_norm={self.qk_norm} does not match "
                             f"model_type={self.model_type!r} "
                             "(qwen3 has q/k norms, qwen2 and llama do not)")
        if self.model_type == "qwen2" and not self.attention_bias:
            raise ValueError("qwen2 always has q/k/v biases; attention_bias must be True")
        if self.mlp_bias and self.model_type != "llama":
            raise ValueError("mlp_bias exists for llama only")
        assert self.num_attention_heads % self.num_key_value_heads == 0
        assert self.head_dim % 2 == 0

    @property
    def o_proj_bias(self) -> bool:
        """transformers biases o_proj for qwen3 / llama with ``attention_bias``, never for qwen2."""
        return self.model_type != "qwen2" and bool(self.attention_bias)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> DecoderConfig:
        """Parse a Hugging Face ``config.json`` dict; see :func:`parse_hf_config`."""
        return parse_hf_config(d, source)

    def to_hf_dict(self) -> dict[str, Any]:
        """A ``config.json`` dict that transformers (4.x and 5.x) and vLLM load."""
        return to_hf_config(self)

    def replace(self, **changes: Any) -> DecoderConfig:
        return dataclasses.replace(self, **changes)


def parse_hf_config(d: dict[str, Any], source: str = "config.json") -> DecoderConfig:
    """A :class:`DecoderConfig` from a Hugging Face ``config.json`` dict (either style).

    Raises ``CheckpointError`` naming ``source`` and the key for what this model cannot run:
    MoE, other architectures, rope scaling, sliding-window attention, quantized weights.
    """
    model_type = d.get("model_type")
    if "moe" in str(model_type):
        raise _refuse(source, "model_type", f"mixture-of-experts model {model_type!r}", _SUPPORTED)
    for key in _MOE_KEYS:
        if d.get(key):
            raise _refuse(source, key, "mixture-of-experts layers", _SUPPORTED)
    archs = d.get("architectures")
    known = set(ARCHITECTURES.values())
    if archs is not None and (len(archs) != 1 or archs[0] not in known):
        raise _refuse(source, "architectures", f"unknown architecture {archs!r}",
                      f"Use a checkpoint of one of {sorted(known)}.")
    if model_type not in ARCHITECTURES:
        raise _refuse(source, "model_type", f"unknown model type {model_type!r}",
                      f"Use a checkpoint of model type {sorted(ARCHITECTURES)}.")
    if archs is not None and archs[0] != ARCHITECTURES[model_type]:
        raise _refuse(source, "architectures", f"{archs[0]} does not match model_type "
                      f"{model_type!r}", "Fix the config so both name the same model.")
    if d.get("quantization_config"):
        raise _refuse(source, "quantization_config", "quantized weights",
                      "Use the unquantized (bf16/fp16/fp32) checkpoint.")
    if d.get("hidden_act", "silu") != "silu":
        raise _refuse(source, "hidden_act", f"activation {d['hidden_act']!r}",
                      "Only 'silu' (SwiGLU) is supported.")
    rope_theta = _parse_rope(d, source)
    if d.get("use_sliding_window"):
        raise _refuse(source, "use_sliding_window", "sliding-window attention",
                      "Set use_sliding_window to false (full attention) or use another model.")
    for i, kind in enumerate(d.get("layer_types") or []):
        if kind != "full_attention":
            raise _refuse(source, f"layer_types[{i}]", f"layer type {kind!r}",
                          "Only full attention layers are supported.")
    if model_type != "llama" and d.get("mlp_bias"):
        raise _refuse(source, "mlp_bias", f"MLP biases in a {model_type} model",
                      "Only llama checkpoints may have mlp_bias; fix the config.")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads"):
        if not isinstance(d.get(key), int):
            raise CheckpointError(f"{source}: required integer key '{key}' is missing or "
                                  f"invalid ({d.get(key)!r}). Fix or re-download the config.")
    heads = d["num_attention_heads"]
    kv_heads = d.get("num_key_value_heads") or heads
    if heads % kv_heads:
        raise _refuse(source, "num_key_value_heads", f"{kv_heads} does not divide "
                      f"num_attention_heads={heads}", "Fix the config.")
    if model_type == "qwen3":  # transformers' Qwen3Config defaults head_dim to 128
        head_dim = d.get("head_dim") or 128
    else:
        head_dim = d.get("head_dim") or d["hidden_size"] // heads
    if head_dim % 2:
        raise _refuse(source, "head_dim", f"odd head_dim {head_dim}",
                      "RoPE needs an even head_dim.")
    dtype = d.get("dtype") or d.get("torch_dtype") or "float32"
    if dtype not in _DTYPE_NAMES:
        raise _refuse(source, "dtype", f"dtype {dtype!r}", f"Use one of {_DTYPE_NAMES}.")
    return DecoderConfig(
        model_type=model_type,
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        num_hidden_layers=d["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        attention_bias=True if model_type == "qwen2" else bool(d.get("attention_bias", False)),
        qk_norm=model_type == "qwen3",
        mlp_bias=model_type == "llama" and bool(d.get("mlp_bias", False)),
        torch_dtype=dtype,
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=d.get("eos_token_id"),
        pad_token_id=d.get("pad_token_id"),
        initializer_range=float(d.get("initializer_range", 0.02)),
    )


def to_hf_config(cfg: DecoderConfig) -> dict[str, Any]:
    """A ``config.json`` dict (both rope styles) that transformers 4.x / 5.x and vLLM load."""
    n = cfg.num_hidden_layers
    d: dict[str, Any] = {
        "architectures": [ARCHITECTURES[cfg.model_type]],
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": n,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": cfg.attention_bias,
        "attention_dropout": 0.0,
        "torch_dtype": cfg.torch_dtype,
        "dtype": cfg.torch_dtype,
        "initializer_range": cfg.initializer_range,
        "use_cache": True,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
    }
    if cfg.model_type == "llama":
        d.update(mlp_bias=cfg.mlp_bias, pretraining_tp=1)
    else:
        d.update(use_sliding_window=False, sliding_window=None, max_window_layers=n,
                 layer_types=["full_attention"] * n)
    if cfg.pad_token_id is not None:
        d["pad_token_id"] = cfg.pad_token_id
    return d


def _parse_rope(d: dict[str, Any], source: str) -> float:
    """rope_theta from either config style; refuses any rope scaling (e.g. llama3, yarn)."""
    fix = "RoPE scaling is not supported; use the checkpoint's native context length."
    scaling = d.get("rope_scaling")
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else None
        if kind != "default":
            raise _refuse(source, "rope_scaling", f"rope scaling {scaling!r}", fix)
    params = d.get("rope_parameters")
    theta = d.get("rope_theta")
    if params is not None:
        if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
            raise _refuse(source, "rope_parameters", "per-layer-type RoPE parameters", fix)
        kind = params.get("rope_type", params.get("type", "default"))
        if kind != "default":
            raise _refuse(source, "rope_parameters.rope_type", f"rope type {kind!r}", fix)
        theta = params.get("rope_theta", theta)
    if float(d.get("partial_rotary_factor", 1.0)) != 1.0:
        raise _refuse(source, "partial_rotary_factor", "partial rotary embeddings", fix)
    return float(theta if theta is not None else 10000.0)
