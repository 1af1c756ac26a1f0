"""Does a policy read PHI's hints? A greedy probe to run before spending a PHI run on it.

PHI (paper Sec. 4.3) only has a signal when the policy, shown a missed code in the Appendix E
hint block, answers that code more often than it does without the hint: only then do hinted
samples earn more reward than their group. This probe measures that directly, with no training:

1. Per record of a split, the hints are its ``k`` gold codes least frequent in the training
   split (:func:`rarest_gold`; PHI's sampler favours rare, missed codes the same way).
2. Greedy responses of the policy to the plain coding prompt and to the same prompt with the
   Appendix E block listing those codes (the one prompt function, ``minicd.prompts.prompt_ids``,
   with PHI's descriptions, ``minicd.train.phi.make_describe``).
3. :func:`hint_copy_counts`: how many hinted codes each set of responses answers in its
   ``<code>`` span, how many it mentions anywhere in its text (a model that restates the hint
   in prose reads it, even if it does not answer in the span), how many distinct code sets
   each set of responses holds (1 for every note: the policy ignores its input), and the two
   ways a hint block can break a policy: responses with no complete ``<code>`` span (a
   response that loops to the token limit; reward 0) and responses that answer exactly the
   hint's mini example (``<code>276.2, 401.9, 584.9</code>``) instead of the note.

``python -m minicd.train.hint_probe --config FILE [--adapter DIR] [--split train] [--limit 16]
[--hints 2] [--out FILE.json] [section.key=value ...]`` prints the counts as one JSON line (and
writes them to ``--out``). Only codes and counts are reported, never note or response text.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Mapping, Sequence

from minicd.config import Config
from minicd.data.records import Record
from minicd.errors import ConfigError, MinicdError, OutputError
from minicd.fileio import atomic_file, check_writable
from minicd.parse import parse_codes


def rarest_gold(records: Sequence[Record], k: int, freq: Mapping[str, int]) -> list[list[str]]:
    """Per record, its ``k`` gold codes with the lowest ``freq`` (absent: 0; ties: code order),
    rarest first; a record with fewer gold codes gets all of them."""
    if k < 1:
        raise ConfigError(f"--hints {k}: must be >= 1 (codes shown per note)")
    return [sorted(set(r.codes), key=lambda c: (freq.get(c, 0), c))[:k] for r in records]


def code_mentioned(code: str, text: str) -> bool:
    """Whether ``code`` appears in ``text`` as a whole code: not inside a longer code or number
    (``428.0`` is not in ``428.01``, ``1428.0`` or ``428.05``)."""
    pattern = r"(?<![0-9A-Za-z.])" + re.escape(code) + r"(?![0-9A-Za-z]|\.[0-9A-Za-z])"
    return re.search(pattern, text, flags=re.IGNORECASE) is not None


def hint_copy_counts(hints: Sequence[Sequence[str]], plain: Sequence[str],
                     hinted: Sequence[str], *, example: Sequence[str] | None = None) -> dict:
    """Counts over records i of ``hints[i]`` (the codes shown), ``plain[i]`` (the response to
    the hint-free prompt) and ``hinted[i]`` (to the hinted one).

    ``answered_*``: hinted codes in the response's parsed ``<code>`` span; ``mentioned_*``:
    hinted codes anywhere in the response text (:func:`code_mentioned`); ``distinct_answers_*``:
    distinct parsed code sets over the records; ``no_span_*``: responses without a complete
    ``<code>`` span; ``example_answers_*`` (only when ``example``, the codes of the hint's mini
    example answer, is given): responses whose parsed set is exactly ``example``; ``*_rate``:
    a count over ``hinted_codes``."""
    if not len(hints) == len(plain) == len(hinted):
        raise ValueError(f"hints, plain and hinted responses differ in length: {len(hints)}, "
                         f"{len(plain)}, {len(hinted)}")
    out: dict = {"notes": len(hints), "hinted_codes": sum(len(h) for h in hints)}
    example_set = None if example is None else set(example)
    for name, texts in (("plain", plain), ("hinted", hinted)):
        parsed = [parse_codes(t) for t in texts]
        spans = [set(p.codes) for p in parsed]
        out[f"answered_{name}"] = sum(c in s for h, s in zip(hints, spans) for c in h)
        out[f"mentioned_{name}"] = sum(code_mentioned(c, t) for h, t in zip(hints, texts)
                                       for c in h)
        out[f"distinct_answers_{name}"] = len({frozenset(s) for s in spans})
        out[f"no_span_{name}"] = sum(not p.has_span for p in parsed)
        if example_set is not None:
            out[f"example_answers_{name}"] = sum(s == example_set for s in spans)
    n = out["hinted_codes"]
    for key in ("answered_plain", "answered_hinted", "mentioned_plain", "mentioned_hinted"):
        out[f"{key}_rate"] = out[key] / n if n else None
    return out


def probe_hints(cfg: Config, split: str = "train", *, adapter: str | None = None,
                limit: int | None = 16, hints_per_note: int = 2) -> dict:
    """Greedy responses of ``model.path`` + ``adapter`` (default ``lora.init_adapter``) to the
    first ``limit`` records of ``split``, plain and with :func:`rarest_gold` hints, at most
    ``rollout.max_new_tokens`` tokens each, by ``rollout.engine``; returns
    :func:`hint_copy_counts` plus the probe's settings."""
    from minicd.algo.reward import code_frequencies
    from minicd.prompts import mini_example_block, prompt_ids
    from minicd.rollout.engine import SamplingParams
    from minicd.rollout.inference import load_split, open_policy, sharded_generate
    from minicd.train.phi import make_describe

    if limit is not None and limit < 1:
        raise ConfigError(f"--limit {limit}: must be >= 1 (or left out for the whole split)")
    records = load_split(cfg, split, limit)  # inputs checked before the model loads
    freq = code_frequencies(r.codes for r in load_split(cfg, "train"))
    hints = rarest_gold(records, hints_per_note, freq)
    describe = make_describe(cfg.phi)
    mini_example = cfg.phi.mini_example
    # every prompt checks its record's code system against data.code_system
    block = mini_example_block(cfg.data.code_system, mini_example)
    example = parse_codes(block).codes if block else None
    tok, engine = open_policy(cfg, adapter)
    try:
        params = SamplingParams(temperature=0.0, max_new_tokens=cfg.rollout.max_new_tokens,
                                stop_ids=tok.stop_ids)
        texts = {}
        for name, shown in (("plain", [None] * len(records)), ("hinted", hints)):
            prompts = [prompt_ids(r, tok, cfg.data, h, describe, mini_example=mini_example)
                       for r, h in zip(records, shown)]
            groups = sharded_generate(engine, prompts, params,
                                      chunk_size=cfg.rollout.max_batch_size)
            texts[name] = [g[0].text for g in groups]
    finally:
        engine.close()
    counts = hint_copy_counts(hints, texts["plain"], texts["hinted"], example=example)
    return {"split": split, "hints_per_note": hints_per_note, "mini_example": mini_example,
            "model": cfg.model.path,
            "adapter": adapter if adapter is not None else cfg.lora.init_adapter, **counts}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m minicd.train.hint_probe",
        description="does a policy answer the codes a PHI hint shows it? (greedy, no training)",
        epilog="Overrides are TOML values on dotted keys, e.g. model.path=runs/demo/sft/merged")
    p.add_argument("--config", required=True, help="TOML config file (see configs/)")
    p.add_argument("--adapter", help="PEFT adapter dir (default: lora.init_adapter; none: base)")
    p.add_argument("--split", default="train", help="split file under data.dir (default: train)")
    p.add_argument("--limit", type=int, default=16, help="first N records (default 16)")
    p.add_argument("--hints", type=int, default=2,
                   help="codes shown per note: its rarest gold codes (default 2)")
    p.add_argument("--out", type=Path, help="also write the counts to this JSON file")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return p.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        from minicd.config import load_config

        cfg = load_config(args.config, list(args.overrides))
        if args.out is not None:
            if args.out.is_dir():
                raise OutputError(f"--out {args.out} is a folder; give a .json file path")
            check_writable(args.out.parent, "output folder")
        import torch

        if cfg.train.num_threads is not None:
            torch.set_num_threads(cfg.train.num_threads)
        result = probe_hints(cfg, args.split, adapter=args.adapter, limit=args.limit,
                             hints_per_note=args.hints)
    except MinicdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from minicd import dist

    if dist.get_rank() == 0:  # under torchrun every rank holds the same counts
        line = json.dumps(result)
        if args.out is not None:
            with atomic_file(args.out) as f:
                f.write(line + "\n")
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
