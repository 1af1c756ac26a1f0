"""Train a coder: `python train.py --stage sft|grpo|phi|classifier --config FILE [--resume |
--overwrite] [section.key=value ...]` (overrides may come anywhere among the options).

Run under `torchrun --nproc_per_node N train.py ...` for several devices (FSDP2; the classifier
stage, the discriminative coders of Tables 1-2, runs in one process). Exit status: 0
done, 2 a user error (one line on stderr, nothing trained), 128 + N stopped by signal N (SIGTERM,
Ctrl-C) after saving a checkpoint; the command that resumes it is printed.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys

from minicd.errors import MinicdError

STAGES = ("sft", "grpo", "phi", "classifier")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="minicd training. Stages: sft (LoRA fine-tuning), grpo (sample-F1 "
                    "reward RL), phi (GRPO rounds with missed-code hints) and classifier (a "
                    "discriminative coder: CNN, Bi-GRU, CAML, MultiResCNN, LAAT or PLM-ICD).",
        epilog="Overrides are TOML values on dotted keys, e.g. sft.lr=1e-4 train.max_steps=10 "
               "model.path=runs/demo/model; they may come anywhere among the options.")
    p.add_argument("--stage", required=True, choices=STAGES,
                   help="training stage: sft, grpo, phi or classifier")
    p.add_argument("--config", required=True, help="TOML config file (see configs/)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in train.output_dir")
    p.add_argument("--overwrite", action="store_true",
                   help="start fresh in a train.output_dir that holds a run, deleting that run's "
                        "checkpoints, metrics and exports (without it such a run is refused)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return p.parse_intermixed_args(argv)


def resume_command(argv: list[str]) -> str:
    """The command line that continues this run: the same arguments with ``--resume`` (and
    without ``--overwrite``), under ``torchrun`` when this is a multi-process run."""
    args = [a for a in argv if a not in ("--overwrite", "--resume")] + ["--resume"]
    script = sys.argv[0] if sys.argv and sys.argv[0].endswith("train.py") else "train.py"
    world = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("WORLD_SIZE") or "1"
    launcher = ["python"] if world == "1" else ["torchrun", f"--nproc_per_node={world}"]
    return shlex.join([*launcher, script, *args])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    done = False
    main_rank = os.environ.get("RANK", "0") == "0"
    try:
        from minicd.config import load_config  # light: a bad config fails before torch loads
        from minicd.fileio import claim_run_dir

        overrides = list(args.overrides) + (["train.resume=true"] if args.resume else [])
        cfg = load_config(args.config, overrides, stage=args.stage)
        # before torch and the model: an unwritable folder or another run in it is refused
        claim_run_dir(cfg.train.output_dir, resume=cfg.train.resume, overwrite=args.overwrite,
                      remove=main_rank)

        import torch

        from minicd.checkpoint import stop_signal
        from minicd.train.classifier import run_classifier
        from minicd.train.grpo import run_grpo
        from minicd.train.phi import run_phi
        from minicd.train.sft import run_sft

        if cfg.train.num_threads is not None:
            torch.set_num_threads(cfg.train.num_threads)
        run = {"sft": run_sft, "grpo": run_grpo, "phi": run_phi,
               "classifier": run_classifier}[args.stage]
        result = run(cfg)
        done = True
    except MinicdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C before the loop's handler was set, or pressed twice
        print("interrupted (Ctrl-C) outside a training step: no checkpoint saved by this stop; "
              "--resume continues from the last saved one, if any", file=sys.stderr)
        return 128 + int(signal.SIGINT)
    finally:  # ranks meet at a barrier only when all finished; an error path just tears down
        if "minicd.dist" in sys.modules:  # not imported (nor torch) when the config was refused
            sys.modules["minicd.dist"].destroy_distributed(sync=done)
    if result.get("stopped"):
        signum = stop_signal() or signal.SIGTERM  # another rank's signal stopped this one
        if main_rank:
            where = f"round {result['round']} step {result['step']}" if "round" in result \
                else f"step {result['step']}"
            print(f"stopped early by {signal.Signals(signum).name} at {where}; the checkpoint "
                  f"is saved under {cfg.train.output_dir}. Resume with:\n  "
                  f"{resume_command(argv)}", file=sys.stderr)
        return 128 + int(signum)
    keys = ("round", "step", "loss", "reward_mean", "train_micro_recall", "train_micro_f1",
            "val/micro_f1", "val/macro_f1", "threshold", "val/best_micro_f1", "test/micro_f1")
    print(" ".join(f"{k}={result[k]:.4g}" if isinstance(result[k], float) else f"{k}={result[k]}"
                   for k in keys if k in result))
    return 0


if __name__ == "__main__":
    code = main()
    if "minicd.dist" not in sys.modules:  # refused before torch was imported
        sys.exit(code)
    sys.modules["minicd.dist"].exit_process(code)  # torchrun: os._exit after the teardown
