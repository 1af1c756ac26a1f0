"""Batch inference: `python rollout.py --config FILE --split test [--adapter DIR] [--out FILE]
[--engine torch|vllm] [--temperature 0] [--n 1] [--limit N] [--prompt KIND]
[--max-new-tokens N] [section.key=value ...]`.

Generates responses for every record of a dataset split with ``model.path`` (+ an optional PEFT
adapter), writes a predictions JSONL (one row per sample: id, response, parsed codes, flags; see
``minicd/predictions.py``) and prints a one-line micro-F1 summary. Rerunning with the same
``--out`` skips ids already in the file and appends the rest (resume). No note text is printed.

``--prompt`` picks the user turn: ``coding`` (default; the fixed instruction of SFT/GRPO/PHI) or
one of the paper's Appendix D prompting baselines ``zero_shot``, ``few_shot``, ``zero_shot_cot``,
``few_shot_cot`` (few-shot: three TF-IDF-retrieved examples from the train split; see
``minicd/baselines.py``). CoT responses start with a rationale, so give them room:
``--max-new-tokens 512`` (same as ``rollout.max_new_tokens=512``); the config default is kept
otherwise. Only the ``<code>`` block is scored.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from minicd.errors import MinicdError
from minicd.prompts import BASELINE_TEMPLATES

PROMPT_KINDS = ("coding", *BASELINE_TEMPLATES)  # coding = the fixed SFT/GRPO instruction


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="minicd batch inference on a dataset split",
                                epilog="Overrides are TOML values on dotted keys, e.g. "
                                       "rollout.max_new_tokens=256 model.path=runs/demo/model")
    p.add_argument("--config", required=True, help="TOML config file (see configs/)")
    p.add_argument("--split", default="test", help="split file under data.dir (default: test)")
    p.add_argument("--adapter", help="PEFT adapter dir (default: lora.init_adapter; none: base)")
    p.add_argument("--out", type=Path,
                   help="predictions JSONL (default: train.output_dir/"
                        "predictions_<split>[_<prompt>].jsonl)")
    p.add_argument("--engine", choices=("torch", "vllm"), help="default: rollout.engine")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--n", type=int, default=1, help="samples per record (default 1)")
    p.add_argument("--limit", type=int, help="only the first N records of the split")
    p.add_argument("--prompt", choices=PROMPT_KINDS, default="coding",
                   help="coding (default) or an Appendix D prompting baseline")
    p.add_argument("--max-new-tokens", type=int,
                   help="default: rollout.max_new_tokens; CoT prompts need more (e.g. 512)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides (anywhere among "
                                                "the options)")
    return p.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        from minicd.baselines import COT_KINDS, COT_MIN_NEW_TOKENS
        from minicd.config import load_config
        from minicd.errors import ConfigError

        for flag, value, low in (("--limit", args.limit, 1), ("--n", args.n, 1),
                                 ("--max-new-tokens", args.max_new_tokens, 1)):
            if value is not None and value < low:
                raise ConfigError(f"{flag} {value}: must be >= {low}")
        if not args.temperature >= 0:
            raise ConfigError(f"--temperature {args.temperature}: must be >= 0 (0 = greedy)")
        overrides = list(args.overrides)
        if args.engine:
            overrides.append(f"rollout.engine={args.engine}")
        if args.max_new_tokens is not None:
            overrides.append(f"rollout.max_new_tokens={args.max_new_tokens}")
        cfg = load_config(args.config, overrides)  # before torch: a bad config fails fast

        import torch

        from minicd.train.common import run_rollout

        if cfg.train.num_threads is not None:
            torch.set_num_threads(cfg.train.num_threads)
        kind = None if args.prompt == "coding" else args.prompt
        if kind in COT_KINDS and cfg.rollout.max_new_tokens < COT_MIN_NEW_TOKENS:
            print(f"note: {kind} writes a rationale before the codes; rollout.max_new_tokens="
                  f"{cfg.rollout.max_new_tokens} may cut it short (try --max-new-tokens "
                  f"{COT_MIN_NEW_TOKENS})", file=sys.stderr)
        name = f"predictions_{args.split}.jsonl" if kind is None else \
            f"predictions_{args.split}_{kind}.jsonl"
        out = args.out or Path(cfg.train.output_dir) / name
        res = run_rollout(cfg, args.split, out, adapter=args.adapter,
                          temperature=args.temperature, n=args.n, limit=args.limit,
                          prompt_kind=kind)
    except MinicdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.split}: records={res['n_records']} written={res['written']} "
          f"skipped={res['skipped']} micro_f1={res['micro_f1']:.4f} "
          f"macro_f1={res['macro_f1']:.4f} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
