"""Backward-compatible names of :mod:`minicd.model.decoder` (the decoder now serves Qwen2,
Qwen3 and Llama): ``QwenConfig`` = ``DecoderConfig``, ``QwenForCausalLM`` = ``DecoderLM``,
``QwenModel`` = ``DecoderModel``. New code imports from ``minicd.model.decoder``."""

from minicd.model.decoder import (DecoderLM, DecoderModel, KVCache, RMSNorm,  # noqa: F401
                                  attention_mask_for, rope_cos_sin)
from minicd.model.hf_config import ARCHITECTURES, DecoderConfig  # noqa: F401

__all__ = ["ARCHITECTURES", "DecoderConfig", "DecoderLM", "DecoderModel", "KVCache", "QwenConfig",
           "QwenForCausalLM", "QwenModel", "RMSNorm", "attention_mask_for", "rope_cos_sin"]

QwenConfig = DecoderConfig
QwenForCausalLM = DecoderLM
QwenModel = DecoderModel
