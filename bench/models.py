"""Benchmark models: SmolLM2-135M's shape as a random-init Qwen2 (same cost), or a checkpoint."""

from __future__ import annotations

import argparse

import torch

from minicd.model.hub import build_model, load_model
from minicd.model.hf_config import DecoderConfig

# SmolLM2-135M (REFERENCE.md section 7): hidden 576, 30 layers, 9 heads / 3 KV heads, head_dim 64,
# FFN 1536, vocab 49,152, tied embeddings, RoPE theta 100,000. As a qwen2 model it has q/k/v
# biases (576 + 2 x 192 extra parameters a layer): the same cost.
SMOLLM2 = dict(hidden=576, layers=30, heads=9, kv_heads=3, head_dim=64, ffn=1536, vocab=49152)


def add_model_args(ap: argparse.ArgumentParser, **defaults) -> None:
    """--model PATH, or the shape flags of a random-init model (SmolLM2's by default)."""
    d = {**SMOLLM2, **defaults}
    ap.add_argument("--model", default=None,
                    help="checkpoint dir or hub id (e.g. runs/smollm2); default: random init")
    ap.add_argument("--model-type", default="qwen2", choices=("qwen2", "qwen3"))
    for key in ("hidden", "layers", "heads", "kv_heads", "head_dim", "ffn", "vocab"):
        ap.add_argument("--" + key.replace("_", "-"), type=int, default=d[key])
    ap.add_argument("--untied", action="store_true", help="separate lm_head (default tied)")


def model_from_args(a: argparse.Namespace, max_positions: int = 8192):
    """(model, config) in fp32 on the CPU."""
    if a.model:
        model = load_model(a.model, dtype=torch.float32)
        return model, model.config
    cfg = DecoderConfig(model_type=a.model_type, vocab_size=a.vocab, hidden_size=a.hidden,
                     intermediate_size=a.ffn, num_hidden_layers=a.layers,
                     num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                     head_dim=a.head_dim, rope_theta=100000.0, rms_norm_eps=1e-5,
                     tie_word_embeddings=not a.untied, max_position_embeddings=max_positions,
                     bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return build_model(cfg, seed=0), cfg


def describe(cfg: DecoderConfig, path: str | None) -> str:
    src = path or "random init"
    return (f"{cfg.model_type} {src}: hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, "
            f"{cfg.num_attention_heads}/{cfg.num_key_value_heads} heads x {cfg.head_dim}, FFN "
            f"{cfg.intermediate_size}, vocab {cfg.vocab_size}"
            f"{', tied' if cfg.tie_word_embeddings else ''}")
