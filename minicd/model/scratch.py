"""Build a tiny model from scratch for the CPU demo: a BPE tokenizer trained on the training split
and a randomly initialised Qwen3-architecture decoder, saved together in HF format.

    python -m minicd.model.scratch --train runs/demo/data/mimic3/full/train.jsonl \\
        --out runs/demo/model [--vocab-size 2048 --hidden 192 --layers 4 --heads 4 \\
        --kv-heads 2 --head-dim 48 --seed 0]

The tokenizer is trained on what the model will read and write: the rendered coding prompts and
the gold answers of the training records (never validation or test notes). The saved directory
loads with ``minicd.model.hub.load_model`` / ``load_tokenizer``, transformers and vLLM.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Iterator, Sequence

from minicd.data.records import Record, read_records
from minicd.errors import MinicdError
from minicd.model.hub import build_model, save_model
from minicd.model.hf_config import DecoderConfig
from minicd.model.tokenizer import train_bpe_tokenizer
from minicd.parse import format_answer
from minicd.prompts import coding_prompt


def tokenizer_corpus(records: Sequence[Record]) -> Iterator[str]:
    """Texts the demo tokenizer is trained on: each training prompt and its gold answer."""
    for rec in records:
        yield coding_prompt(rec.note, rec.code_system)
        yield format_answer(rec.codes)


def build_scratch(train_jsonl: str | Path, out_dir: str | Path, *, vocab_size: int = 2048,
                  hidden: int = 192, layers: int = 4, heads: int = 4, kv_heads: int = 2,
                  head_dim: int = 48, intermediate: int | None = None, max_positions: int = 4096,
                  seed: int = 0) -> DecoderConfig:
    """Train the tokenizer, build the model with fresh weights, save both into ``out_dir``."""
    records = [r for r in read_records(train_jsonl) if r.split == "train"]
    if not records:
        raise MinicdError(f"{train_jsonl}: no training records to build the demo tokenizer from")
    out = Path(out_dir)
    tok = train_bpe_tokenizer(tokenizer_corpus(records), vocab_size, out)
    cfg = DecoderConfig(model_type="qwen3", vocab_size=tok.vocab_size, hidden_size=hidden,
                     intermediate_size=intermediate or 3 * hidden, num_hidden_layers=layers,
                     num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                     rope_theta=10000.0, max_position_embeddings=max_positions,
                     tie_word_embeddings=True, bos_token_id=None, eos_token_id=tok.im_end_id,
                     pad_token_id=tok.pad_id)
    model = build_model(cfg, seed=seed)
    save_model(model, out)
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m minicd.model.scratch", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", required=True, help="train.jsonl of a prepared dataset")
    ap.add_argument("--out", required=True, help="output dir (tokenizer + config + weights)")
    ap.add_argument("--vocab-size", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        cfg = build_scratch(args.train, args.out, vocab_size=args.vocab_size, hidden=args.hidden,
                            layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
                            head_dim=args.head_dim, seed=args.seed)
    except MinicdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    n = sum(p.numel() for p in build_model(cfg, seed=args.seed).parameters())
    print(f"minicd: tiny {cfg.model_type} model ({n / 1e6:.2f}M parameters, vocab {cfg.vocab_size}) "
          f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
