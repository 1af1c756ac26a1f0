"""Benchmark: fused chunked per-token log-probs vs the naive full-logits path.

Times forward + backward of the per-token log-probs of N = batch x tokens hidden states through
a frozen vocabulary head (the LoRA case: only the hidden states need a gradient), for
``minicd.algo.logprobs.token_logprobs_from_hidden`` (fused) and for
``log_softmax(h @ W.T).gather`` on the full logits (naive), alternately in ONE run, and reports
their median ratio and each one's peak extra resident memory. ``--head-trains`` gives the head a
gradient too (full fine-tuning: the chunked recompute path); ``--entropy`` adds the entropy.

    python bench/logprobs.py [--vocab 151936] [--hidden 576] [--batch 8] [--tokens 1024]
        [--chunk 1024] [--repeats 3] [--threads N] [--entropy] [--head-trains] [--checkpointed]

``--checkpointed`` also times the previous implementation (every chunk under
``torch.utils.checkpoint``, which recomputes the chunk's logits in backward).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _util import alternate, load, median  # noqa: E402

from minicd.algo import logprobs as lp  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--entropy", action="store_true")
    ap.add_argument("--head-trains", action="store_true")
    ap.add_argument("--checkpointed", action="store_true")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    gen = torch.Generator().manual_seed(0)
    n = a.batch * a.tokens
    hidden = torch.randn(n, a.hidden, generator=gen)                      # [N, H]
    weight = (torch.randn(a.vocab, a.hidden, generator=gen) * a.hidden ** -0.5)  # [V, H]
    weight.requires_grad_(a.head_trains)
    targets = torch.randint(0, a.vocab, (n,), generator=gen)              # [N]
    up = torch.randn(2, n, generator=gen)                                 # cotangents
    results: dict[str, tuple] = {}

    def loss_of(out) -> torch.Tensor:
        if a.entropy:
            return (out[0] * up[0]).sum() + (out[1] * up[1]).sum()
        return (out * up[0]).sum()

    def run(name: str, compute) -> None:
        h = hidden.detach().requires_grad_()
        if weight.grad is not None:
            weight.grad = None
        loss_of(compute(h)).backward()
        results[name] = (h.grad, weight.grad)

    def naive(h):
        logp_all = torch.log_softmax((h @ weight.t()).float(), -1)       # [N, V]
        logp = logp_all.gather(-1, targets[:, None]).squeeze(-1)
        if a.entropy:
            return logp, -(logp_all.exp() * logp_all).sum(-1)
        return logp

    def fused(h):
        return lp.token_logprobs_from_hidden(h, weight, targets, chunk_tokens=a.chunk,
                                             with_entropy=a.entropy)

    def checkpointed(h):
        out = lp._chunked_checkpointed(h, lambda x: x @ weight.t(), targets, 1.0, a.entropy,
                                       a.chunk)
        return out if a.entropy else out[0]

    fns = {"naive": lambda: run("naive", naive), "fused": lambda: run("fused", fused)}
    if a.checkpointed:
        fns["checkpointed"] = lambda: run("checkpointed", checkpointed)
    cpu: dict[str, list[float]] = {}
    times, peaks = alternate(fns, a.repeats, warmup=a.warmup, memory=True, cpu_times=cpu)
    base, cbase = median(times["naive"]), median(cpu["naive"])
    what = "logp + entropy" if a.entropy else "logp"
    head = "trained head" if a.head_trains else "frozen head"
    print(f"token log-probs fwd+bwd ({what}, {head}): {a.batch} x {a.tokens} tokens, hidden "
          f"{a.hidden}, vocab {a.vocab}, chunk {a.chunk}, fp32, {torch.get_num_threads()} "
          f"threads, median of {a.repeats} alternating runs; {load()} at the end")
    for name in fns:
        t, c = median(times[name]), median(cpu[name])
        print(f"  {name:12s}: {t:7.2f} s wall ({t / base:.2f}x naive), {c:7.2f} s CPU "
              f"({c / cbase:.2f}x naive)  peak extra "
              f"{peaks[name] / 2**30:6.2f} GiB  ({peaks[name] / max(peaks['naive'], 1):.3f}x "
              "naive)")
    for name in fns:
        if name == "naive":
            continue
        for i, what in enumerate(("hidden", "head")):
            got, ref = results[name][i], results["naive"][i]
            if ref is not None:
                print(f"  {name} max |grad {what} diff| {float((got - ref).abs().max()):.2e} "
                      f"(largest {float(ref.abs().max()):.2e})")


if __name__ == "__main__":
    main()
