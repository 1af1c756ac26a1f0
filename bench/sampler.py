"""Benchmark: the torch rollout engine's new tokens/s vs vLLM CPU's on the same requests.

P prompts x G samples x N new tokens at temperature 1 (no stop ids: every row runs N tokens), on
SmolLM2-135M's shape (random init, fp32) or ``--model``. The model is saved in Hugging Face
format to a temporary directory for vLLM (in-process engine, ``VLLM_CPU_KVCACHE_SPACE=1``).
The two engines run alternately in ONE process; the ratio of median throughputs is printed.

    python bench/sampler.py [--model runs/smollm2] [--prompts 8] [--samples 8]
        [--new-tokens 64] [--prompt-tokens 256] [--repeats 2] [--threads N] [--no-vllm]
        [--compile] [--unpacked]

Prompt lengths are drawn uniformly from [0.75, 1.25] x --prompt-tokens (so rows are padded).
Both engines sample SEEDED (seed 0), as GRPO / PHI rollouts do: the torch engine one generator
per row, all P x G rows in one batch; vLLM one seeded request per prompt (``VLLMEngine`` turns
off chunked prefill on CPU, whose generator rewind crashed seeded requests).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from _util import alternate, load, median  # noqa: E402
from models import add_model_args, describe, model_from_args  # noqa: E402

from minicd.model.hub import save_model  # noqa: E402
from minicd.rollout.engine import SamplingParams  # noqa: E402
from minicd.rollout.torch_engine import TorchEngine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-vllm", action="store_true")
    ap.add_argument("--unpacked", action="store_true",
                    help="also time the torch engine with packed_decode=False (F.linear in the "
                         "decode steps instead of oneDNN-packed weights)")
    ap.add_argument("--compile", action="store_true",
                    help="also time the torch engine on torch.compile(model, dynamic=True) "
                         "(the warm-up rounds absorb the compilation)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    model, cfg = model_from_args(a)
    model.eval()
    gen = torch.Generator().manual_seed(0)
    lo, hi = int(0.75 * a.prompt_tokens), int(1.25 * a.prompt_tokens)
    prompts = [torch.randint(3, cfg.vocab_size, (int(n),), generator=gen).tolist()
               for n in torch.randint(lo, hi + 1, (a.prompts,), generator=gen)]
    # all P x G rows in one batch either way, both seeded (the GRPO path)
    seeded = SamplingParams(n=a.samples, temperature=1.0, max_new_tokens=a.new_tokens, seed=0)
    params = {"torch": seeded, "vllm": seeded}
    engines = {"torch": TorchEngine(model, max_batch_size=a.prompts * a.samples)}
    if a.unpacked:
        engines["torch-unpacked"] = TorchEngine(model, max_batch_size=a.prompts * a.samples,
                                                packed_decode=False)
        params["torch-unpacked"] = params["torch"]
    if a.compile:
        engines["torch-compiled"] = TorchEngine(torch.compile(model, dynamic=True),
                                                max_batch_size=a.prompts * a.samples)
        params["torch-compiled"] = params["torch"]
    tmp = None
    if not a.no_vllm:
        from minicd.rollout.vllm_engine import VLLMEngine
        tmp = tempfile.TemporaryDirectory(prefix="minicd-bench-sampler-")
        save_model(model, tmp.name)
        engines["vllm"] = VLLMEngine(tmp.name, dtype="float32",
                                     max_model_len=hi + a.new_tokens + 16)
    counts: dict[str, int] = {}

    def run(name: str) -> None:
        out = engines[name].generate(prompts, params[name])
        counts[name] = sum(len(g.token_ids) for row in out for g in row)

    fns = {k: (lambda k=k: run(k)) for k in engines}
    times, _ = alternate(fns, a.repeats, warmup=a.warmup)
    rate = {k: counts[k] / median(times[k]) for k in engines}
    print(f"sampling {a.prompts} prompts ({lo}-{hi} tokens) x {a.samples} samples x "
          f"{a.new_tokens} new tokens, T 1 (both seeded), "
          f"{describe(cfg, a.model)}, fp32, "
          f"{torch.get_num_threads()} threads, median of {a.repeats} alternating runs; "
          f"{load()} at the end")
    for k in engines:
        print(f"  {k:14s}: {rate[k]:7.1f} new tokens/s ({median(times[k]):.2f} s, "
              f"{counts[k]} tokens)")
    if "vllm" in rate:
        print(f"  torch / vLLM: {rate['torch'] / rate['vllm']:.2f}x")
    if "torch-unpacked" in rate:
        print(f"  packed / unpacked torch: {rate['torch'] / rate['torch-unpacked']:.2f}x")
    if "torch-compiled" in rate:
        print(f"  compiled / eager torch: {rate['torch-compiled'] / rate['torch']:.2f}x")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
