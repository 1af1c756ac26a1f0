"""Benchmark: one SFT step projecting only the loss positions vs every position.

A step is what ``minicd.train.sft.run_sft`` does per micro-batch: forward, the masked SFT loss
(``model_token_logprobs`` -> ``sft_loss``), backward and an AdamW step on the LoRA parameters.
"loss-only" passes ``target_mask=loss_mask`` (only the response positions reach the vocabulary
head); "every position" projects all T - 1 positions and masks the loss afterwards (the SFT loop
before). Both are timed alternately in ONE run; the ratio of medians is printed, and the largest
loss / gradient difference between them.

    python bench/sft_step.py [--model runs/smollm2] [--batch 4] [--prompt-tokens 400]
        [--response-tokens 30] [--lora-r 8] [--repeats 3] [--threads N] [--checkpointed]

Default model: SmolLM2-135M's shape, random init (bench/models.py). ``--checkpointed`` also
times every position through the previous log-prob path (each chunk checkpointed).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _util import alternate, load, median  # noqa: E402
from models import add_model_args, describe, model_from_args  # noqa: E402

from minicd.algo import logprobs as lp  # noqa: E402
from minicd.algo.sft import collate_sft, sft_loss  # noqa: E402
from minicd.model.lora import LoRAConfig, inject_lora  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=400)
    ap.add_argument("--response-tokens", type=int, default=30)
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--checkpointed", action="store_true")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    model, cfg = model_from_args(a)
    inject_lora(model, LoRAConfig(r=a.lora_r, alpha=2.0 * a.lora_r),
                generator=torch.Generator().manual_seed(0))
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():  # nonzero B: the adapter matters
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.01, generator=torch.Generator().manual_seed(1))
    model.train()
    gen = torch.Generator().manual_seed(2)
    examples = []
    for i in range(a.batch):  # uneven lengths: a right-padded batch, as in training
        n = a.prompt_tokens - 13 * i
        k = a.response_tokens + 3 * i
        examples.append((torch.randint(3, cfg.vocab_size, (n,), generator=gen).tolist(),
                         torch.randint(3, cfg.vocab_size, (k,), generator=gen).tolist()))
    b = collate_sft(examples, pad_id=2)
    opt = torch.optim.AdamW(params, lr=1e-6)
    state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    results: dict[str, tuple[float, dict]] = {}

    def step(name: str, **kw) -> None:
        opt.zero_grad(set_to_none=True)
        logp = lp.model_token_logprobs(model, b.input_ids, b.attention_mask, **kw)  # [B, T-1]
        loss = sft_loss(logp, b.loss_mask)
        loss.backward()
        results[name] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()
                                       if p.grad is not None})
        opt.step()
        with torch.no_grad():  # every run starts from the same weights
            for n, p in model.named_parameters():
                if n in state:
                    p.copy_(state[n])

    fns = {"every position": lambda: step("every position"),
           "loss-only": lambda: step("loss-only", target_mask=b.loss_mask)}
    if a.checkpointed:
        real = lp._plain_weight

        def old():
            lp._plain_weight = lambda head: None  # every head through the checkpointed path
            try:
                step("every position, checkpointed")
            finally:
                lp._plain_weight = real
        fns["every position, checkpointed"] = old
    times, _ = alternate(fns, a.repeats, warmup=a.warmup)
    base = median(times["every position"])
    resp = int(b.loss_mask.sum())
    print(f"SFT step (fwd + loss + bwd + AdamW), LoRA r {a.lora_r}, {describe(cfg, a.model)}; "
          f"batch {a.batch} x {b.input_ids.shape[1]} tokens, {resp} response tokens "
          f"({100 * resp / b.loss_mask.numel():.1f}% of positions), fp32, "
          f"{torch.get_num_threads()} threads, median of {a.repeats} alternating runs; "
          f"{load()} at the end")
    for name in fns:
        t = median(times[name])
        print(f"  {name:30s}: {t:6.2f} s  (speed-up vs every position {base / t:.2f}x)")
    ref_loss, ref_grads = results["every position"]
    loss, grads = results["loss-only"]
    diff = max(float((grads[n] - ref_grads[n]).abs().max()) for n in ref_grads)
    scale = max(float(g.abs().max()) for g in ref_grads.values())
    print(f"  loss {loss:.6f} vs {ref_loss:.6f}; max |grad diff| {diff:.2e} (largest {scale:.2e})")


if __name__ == "__main__":
    main()
