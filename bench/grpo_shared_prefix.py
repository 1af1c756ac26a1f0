"""Benchmark: one GRPO update with each group's prompt computed once vs collated rows.

Prints the wall time of ``grpo_update`` (reference log-probs + forward/backward + AdamW step)
with ``grpo.shared_prefix`` on and off, measured alternately in ONE run (machines are noisy), and
their ratio, plus the largest log-prob gradient difference between the two paths.

    .venv/bin/python bench/grpo_shared_prefix.py [--prompt-tokens 450] [--response-tokens 30]
        [--groups 8] [--group-size 8] [--hidden 160] [--layers 4] [--heads 4] [--kv-heads 2]
        [--head-dim 40] [--ffn 480] [--vocab 1536] [--model-type qwen3] [--tied]
        [--lora-r 16] [--repeats 3] [--device cpu]

Defaults mirror the CPU demo (tiny Qwen3, 450-token notes, ~30-token answers, 8 prompts x G 8).
SmolLM2-135M's shape: ``--model-type qwen2 --hidden 576 --layers 30 --heads 9 --kv-heads 3
--head-dim 64 --ffn 1536 --vocab 49152 --tied --lora-r 8``; Qwen3-4B's: ``--hidden 2560
--layers 36 --heads 32 --kv-heads 8 --head-dim 128 --ffn 9728 --vocab 151936 --tied``.
"""

from __future__ import annotations

import argparse
import copy
import os
import dataclasses
import statistics
import time

import torch

from minicd.config import GRPOConfig
from minicd.model.hub import build_model
from minicd.model.lora import LoRAConfig, inject_lora
from minicd.model.hf_config import DecoderConfig
from minicd.train.grpo import RolloutBatch, grpo_update


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt-tokens", type=int, default=450)
    ap.add_argument("--response-tokens", type=int, default=30)
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=160)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=1536)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=None, help="default hidden / heads")
    ap.add_argument("--ffn", type=int, default=None, help="default 3 x hidden")
    ap.add_argument("--model-type", default="qwen3", choices=("qwen2", "qwen3"))
    ap.add_argument("--tied", action="store_true", help="tie lm_head to the embedding")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()

    cfg = DecoderConfig(model_type=a.model_type, vocab_size=a.vocab, hidden_size=a.hidden,
                        intermediate_size=a.ffn or 3 * a.hidden, num_hidden_layers=a.layers,
                        num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                        head_dim=a.head_dim or a.hidden // a.heads, tie_word_embeddings=a.tied,
                        max_position_embeddings=4 * (a.prompt_tokens + a.response_tokens))
    model = build_model(cfg, seed=0).to(a.device)
    inject_lora(model, LoRAConfig(r=a.lora_r, alpha=2.0 * a.lora_r),
                generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    prompts, responses = [], []
    for _ in range(a.groups):
        p = torch.randint(1, a.vocab, (a.prompt_tokens,), generator=gen).tolist()
        for _ in range(a.group_size):
            prompts.append(p)
            n = int(torch.randint(a.response_tokens // 2, a.response_tokens * 3 // 2 + 1, (1,),
                                  generator=gen))
            responses.append(torch.randint(1, a.vocab, (n,), generator=gen).tolist())
    batch = RolloutBatch(prompts, responses, torch.randn(len(prompts), generator=gen))
    base = GRPOConfig(lr=1e-4, kl_coef=1e-3)

    times: dict[bool, list[float]] = {True: [], False: []}
    grads: dict[bool, dict[str, torch.Tensor]] = {}
    for rep in range(a.repeats + 1):  # the first round warms up and is not timed
        for shared in (True, False):
            m = copy.deepcopy(model)
            opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=base.lr)
            g = dataclasses.replace(base, shared_prefix=shared)
            t0 = time.perf_counter()
            grpo_update(m, opt, batch, g, micro_batch_size=a.micro_batch, pad_id=0,
                        device=a.device)
            if rep:
                times[shared].append(time.perf_counter() - t0)
            grads[shared] = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    diff = max(float((grads[True][n] - grads[False][n]).abs().max()) for n in grads[True])
    scale = max(float(v.abs().max()) for v in grads[False].values())
    on, off = statistics.median(times[True]), statistics.median(times[False])
    rows = len(prompts)
    print(f"grpo_update, {a.groups} prompts x G {a.group_size} = {rows} rows, prompt "
          f"{a.prompt_tokens} + response ~{a.response_tokens} tokens, {a.model_type} hidden "
          f"{a.hidden} x {a.layers} layers, {a.heads}/{a.kv_heads} heads x {cfg.head_dim}, vocab "
          f"{a.vocab}, LoRA r {a.lora_r}, {a.device}, median of {a.repeats}; load average "
          f"{os.getloadavg()[0]:.2f} at the end:")
    print(f"  shared prefix : {on:.3f} s")
    print(f"  collated rows : {off:.3f} s")
    print(f"  speed-up      : {off / on:.2f}x")
    print(f"  max |grad diff| {diff:.2e} (largest grad {scale:.2e})")


if __name__ == "__main__":
    main()
