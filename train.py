"""Train a coder: `python train.py --stage sft|grpo|phi --config FILE [--resume] [section.key=value ...]`.

Run under `torchrun --nproc_per_node N train.py ...` for several devices (FSDP2).
"""

from __future__ import annotations

import argparse
import sys

from minicd.errors import MinicdError

STAGES = ("sft", "grpo", "phi")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="minicd training. Stages: sft (LoRA fine-tuning), grpo (sample-F1 "
                    "reward RL) and phi (GRPO rounds with missed-code hints).",
        epilog="Overrides are TOML values on dotted keys, e.g. sft.lr=1e-4 train.max_steps=10 "
               "model.path=runs/demo/model")
    p.add_argument("--stage", required=True, choices=STAGES,
                   help="training stage: sft, grpo or phi")
    p.add_argument("--config", required=True, help="TOML config file (see configs/)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in train.output_dir")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from minicd.dist import destroy_distributed

    done = False
    try:
        from minicd.config import load_config  # light: a bad config fails before torch loads

        overrides = list(args.overrides) + (["train.resume=true"] if args.resume else [])
        cfg = load_config(args.config, overrides, stage=args.stage)

        import torch

        from minicd.train.grpo import run_grpo
        from minicd.train.phi import run_phi
        from minicd.train.sft import run_sft

        if cfg.train.num_threads is not None:
            torch.set_num_threads(cfg.train.num_threads)
        run = {"sft": run_sft, "grpo": run_grpo, "phi": run_phi}[args.stage]
        result = run(cfg)
        done = True
    except MinicdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:  # ranks meet at a barrier only when all finished; an error path just tears down
        destroy_distributed(sync=done)
    keys = ("round", "step", "loss", "reward_mean", "train_micro_recall", "train_micro_f1",
            "val/micro_f1", "val/macro_f1")
    print(" ".join(f"{k}={result[k]:.4g}" if isinstance(result[k], float) else f"{k}={result[k]}"
                   for k in keys if k in result))
    return 0


if __name__ == "__main__":
    from minicd.dist import exit_process

    exit_process(main())  # under torchrun: os._exit after the clean teardown (see exit_process)
