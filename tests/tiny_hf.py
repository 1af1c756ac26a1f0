"""Tiny random Hugging Face Qwen2/Qwen3/Llama models used as references by several test files."""

from __future__ import annotations

import torch
from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                          Qwen3ForCausalLM)

TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)
HF_CLASSES = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM),
              "llama": (LlamaConfig, LlamaForCausalLM)}


def perturbed_hf_model(kind: str, tied: bool = False, seed: int = 0, rope_theta: float = 1000.0,
                       eager: bool = False, **extra) -> torch.nn.Module:
    """A tiny random transformers model whose norm weights and biases are moved off their init
    values (ones / zeros), so a parity test fails if either is mishandled."""
    torch.manual_seed(seed)
    cfg_cls, model_cls = HF_CLASSES[kind]
    cfg = cfg_cls(**{**TINY, **extra}, tie_word_embeddings=tied,
                  rope_parameters={"rope_type": "default", "rope_theta": rope_theta})
    if eager:
        cfg._attn_implementation = "eager"  # an attention code path independent of ours
    model = model_cls(cfg).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    return model
