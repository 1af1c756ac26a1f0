"""Shared assets of the stage-loop tests: a tiny from-scratch Qwen3 with a BPE tokenizer trained on
a small synthetic MIMIC-III set (prepared with the real pipeline), and a base TOML config."""

from __future__ import annotations

from pathlib import Path

from minicd.data.mimic import prepare_mimic3
from minicd.data.records import read_records
from minicd.data.synthetic import SyntheticSpec, write_mimic3
from minicd.model.hub import build_model, save_model
from minicd.model.hf_config import DecoderConfig
from minicd.model.tokenizer import train_bpe_tokenizer


def build_assets(root: Path, **model_overrides) -> dict:
    """Write raw synthetic data, the prepared top-50 dataset and the tiny model under ``root``.

    ``model_overrides``: DecoderConfig fields replacing the tiny defaults (e.g. ``hidden_size=128,
    num_attention_heads=2, head_dim=64`` for vLLM, whose CPU attention needs head_dim >= 64).
    Returns ``{"root", "data_dir", "model_dir"}``."""
    write_mimic3(root / "raw", SyntheticSpec(n_admissions=300, min_words=80, max_words=180, max_codes=6))
    prepare_mimic3(root / "raw", root / "data", min_count=3)
    data_dir = root / "data" / "mimic3" / "top50"
    notes = [r.note for r in read_records(data_dir / "train.jsonl")]
    model_dir = root / "model"
    tok = train_bpe_tokenizer(notes, 1000, model_dir)
    sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, max_position_embeddings=1024)
    sizes.update(model_overrides)
    cfg = DecoderConfig(model_type="qwen3", vocab_size=tok.vocab_size, eos_token_id=tok.im_end_id,
                     pad_token_id=tok.pad_id, **sizes)
    save_model(build_model(cfg, seed=0), model_dir)
    return {"root": root, "data_dir": data_dir, "model_dir": model_dir}


def save_sft_adapter(model_dir: Path, out: Path, std: float):
    """A stand-in SFT adapter: LoRA r 4 / alpha 8 (A seeded 5) with every B drawn from
    N(0, std) (seeded per parameter name), saved in PEFT format to ``out``; returns the model."""
    import torch

    from minicd.model.hub import load_model
    from minicd.model.lora import LoRAConfig, inject_lora, save_adapter

    sft = load_model(model_dir)
    inject_lora(sft, LoRAConfig(r=4, alpha=8.0), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for name, p in sft.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, std, generator=torch.Generator().manual_seed(len(name)))
    save_adapter(sft, out, LoRAConfig(r=4, alpha=8.0))
    return sft
