"""One-call GPU check: numerics, speed and memory of minicd's training paths on one GPU.

Made for a single call on a lent machine (one H100/H200, torch >= 2.11 and transformers
installed, no vLLM, no network): every model is random-initialised from a config, nothing is
downloaded. Prints ONE JSON report (also written to ``--out`` when given), section by section;
a section that fails records its error and the others still run. Sections:

- ``bf16_vs_fp32``: logits of a small Qwen3 in bf16 vs fp32 (max |diff|, argmax agreement), and
  minicd fp32 vs transformers fp32 on the same weights (max |diff|);
- ``fwd_bwd_vs_transformers``: forward + backward (next-token cross-entropy) time of minicd vs
  transformers (sdpa) on the small Qwen3 in bf16, and their ratio;
- ``grpo_update``: one ``grpo_update`` on the real Qwen3-4B shape (hidden 2560, 36 layers,
  32 / 8 heads, head_dim 128, FFN 9728, vocab 151,936), LoRA r 8, bf16, activation
  checkpointing, 8 prompts x G 8, 4,096-token prompts and 196-token responses, with
  ``grpo.shared_prefix`` on and off: time, batch tokens/s, MFU and peak memory each;
- ``torch_engine_sampling``: the torch engine sampling G 8 x 196 tokens for 8 4,096-token prompts
  on the 4B shape, seeded (key ``seeded_per_prompt``: the GRPO path, one generator per row) and
  unseeded (``unseeded_one_batch``), each one batch of 64;
- ``sft_step``: one SFT optimizer step (LoRA, bf16, activation checkpointing) on two
  8,192-token examples (micro-batch 1, two accumulation steps).

MFU = model FLOPs / (time x peak dense bf16 FLOP/s; 989e12 for H100/H200 SXM, null elsewhere).
Model FLOPs count 2 x (non-embedding parameters) per token per forward-equivalent pass plus
causal attention (2 x 2 x T^2 / 2 x heads x head_dim per layer and pass) and the LM head on the
scored tokens; a GRPO update is 3 passes (reference forward, forward, backward through the
activations: LoRA has no base weight gradients), an SFT step 3 (forward, backward counted
twice: activations and the few LoRA weights are ignored); activation recomputation is NOT
counted (MFU, not hardware utilisation).

    python bench/gpu_check.py                     # the full check on cuda:0 (about 5 minutes)
    python bench/gpu_check.py --device cpu --tiny # the same code paths on tiny shapes (< 2 min)
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import math
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from minicd.algo.logprobs import model_token_logprobs
from minicd.algo.sft import collate_sft, sft_loss
from minicd.config import GRPOConfig
from minicd.model.hf_config import DecoderConfig
from minicd.model.hub import build_model, save_model
from minicd.model.lora import LoRAConfig, inject_lora
from minicd.rollout.engine import SamplingParams
from minicd.rollout.torch_engine import TorchEngine
from minicd.train.grpo import RolloutBatch, grpo_update

MIN_TORCH = (2, 11)
PEAK_BF16 = {"H100": 989e12, "H200": 989e12}  # dense bf16 FLOP/s (SXM)

QWEN3_4B = dict(hidden_size=2560, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, intermediate_size=9728, vocab_size=151936,
                tie_word_embeddings=True)
QWEN3_SMALL = dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16,
                   num_key_value_heads=8, head_dim=128, intermediate_size=3072,
                   vocab_size=151936, tie_word_embeddings=True)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, intermediate_size=128, vocab_size=512, tie_word_embeddings=True)


@dataclasses.dataclass
class Plan:
    """Shapes of one check run (the full GPU check or the tiny CPU one)."""

    big: dict
    small: dict
    prompts: int = 8
    group: int = 8
    prompt_tokens: int = 4096
    response_tokens: int = 196
    micro_batch: int = 8
    small_batch: tuple[int, int] = (4, 1024)
    sft_tokens: int = 8192
    sft_examples: int = 2
    repeats: int = 3


FULL = Plan(big=QWEN3_4B, small=QWEN3_SMALL)
TINY_PLAN = Plan(big=TINY, small=TINY, prompts=8, group=2, prompt_tokens=48,
                 response_tokens=8, micro_batch=4, small_batch=(2, 64), sft_tokens=96,
                 repeats=1)


def qwen3(shape: dict, max_len: int) -> DecoderConfig:
    return DecoderConfig.from_hf_dict(dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"],
                                        rms_norm_eps=1e-6, rope_theta=1e6,
                                        max_position_embeddings=max_len, **shape),
                                   source="bench/gpu_check.py")


class Clock:
    """Wall time of a block, synchronising the device before and after."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __enter__(self) -> "Clock":
        self.sync()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.sync()
        self.seconds = time.perf_counter() - self.t0


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def nonembedding_params(cfg: DecoderConfig) -> int:
    """Parameters of the decoder blocks (embedding and LM head excluded)."""
    h, d = cfg.hidden_size, cfg.head_dim
    attn = h * d * (cfg.num_attention_heads * 2 + cfg.num_key_value_heads * 2)
    mlp = 3 * h * cfg.intermediate_size
    return cfg.num_hidden_layers * (attn + mlp)


def forward_flops(cfg: DecoderConfig, seq_lens: list[int], scored_tokens: int) -> float:
    """FLOPs of one forward over sequences of ``seq_lens`` tokens (causal attention) with the LM
    head applied to ``scored_tokens`` positions."""
    dense = 2 * nonembedding_params(cfg) * sum(seq_lens)
    attn = sum(2 * 2 * (t * t / 2) * cfg.num_attention_heads * cfg.head_dim
               for t in seq_lens) * cfg.num_hidden_layers
    head = 2 * cfg.hidden_size * cfg.vocab_size * scored_tokens
    return dense + attn + head


def mfu(flops: float, seconds: float, device: torch.device) -> float | None:
    peak = peak_flops(device)
    return None if peak is None else flops / seconds / peak


def lora_policy(cfg: DecoderConfig, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Random base weights, LoRA r 8 on the attention and MLP projections, checkpointing on."""
    model = build_model(cfg, seed=0, dtype=dtype, device=device)
    inject_lora(model, LoRAConfig(r=8, alpha=16.0), generator=torch.Generator().manual_seed(0))
    model.to(device)
    model.set_activation_checkpointing(True)
    model.train()
    return model


# ------------------------------------------------------------------ sections
def check_bf16_and_transformers(plan: Plan, device: torch.device, report: dict) -> None:
    """bf16 vs fp32 logits; minicd vs transformers logits (fp32) and fwd+bwd time (bf16)."""
    import transformers

    b, t = plan.small_batch
    cfg = qwen3(plan.small, max_len=2 * t)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (b, t), generator=gen).to(device)
    ours = build_model(cfg, seed=1, dtype=torch.float32, device=device).eval()
    with tempfile.TemporaryDirectory() as tmp:
        save_model(ours, tmp)
        try:
            theirs = transformers.AutoModelForCausalLM.from_pretrained(
                tmp, dtype=torch.float32, attn_implementation="sdpa")
        except TypeError:  # transformers < 4.56 names it torch_dtype
            theirs = transformers.AutoModelForCausalLM.from_pretrained(
                tmp, torch_dtype=torch.float32, attn_implementation="sdpa")
        theirs = theirs.to(device).eval()
    with torch.no_grad():
        fp32 = ours(ids).float()                                     # [b, t, V]
        hf32 = theirs(ids).logits.float()
        ours16 = copy.deepcopy(ours).to(torch.bfloat16)
        bf16 = ours16(ids).float()
    report["bf16_vs_fp32"] = {
        "shape": f"qwen3 hidden {cfg.hidden_size} x {cfg.num_hidden_layers} layers, "
                 f"vocab {cfg.vocab_size}, batch {b} x {t}",
        "max_abs_diff": float((bf16 - fp32).abs().max()),
        "mean_abs_diff": float((bf16 - fp32).abs().mean()),
        "logit_abs_max": float(fp32.abs().max()),
        "argmax_agreement": float((bf16.argmax(-1) == fp32.argmax(-1)).float().mean()),
        "minicd_vs_transformers_fp32_max_abs_diff": float((fp32 - hf32).abs().max()),
    }
    del fp32, hf32, bf16, ours

    theirs = theirs.to(torch.bfloat16).train()
    ours16.train()

    def step_ours() -> None:
        logits = ours16(ids)
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                          ids[:, 1:].flatten()).backward()

    def step_theirs() -> None:
        logits = theirs(ids).logits
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                          ids[:, 1:].flatten()).backward()

    times: dict[str, list[float]] = {"minicd": [], "transformers": []}
    for rep in range(plan.repeats + 1):  # round 0 warms up
        for name, fn, model in (("minicd", step_ours, ours16), ("transformers", step_theirs,
                                                                 theirs)):
            model.zero_grad(set_to_none=True)
            with Clock(device) as c:
                fn()
            if rep:
                times[name].append(c.seconds)
    ours_t, theirs_t = min(times["minicd"]), min(times["transformers"])
    report["fwd_bwd_vs_transformers"] = {
        "dtype": "bfloat16", "batch": f"{b} x {t}", "minicd_s": ours_t,
        "transformers_s": theirs_t, "ratio_minicd_over_transformers": ours_t / theirs_t,
        "transformers_version": transformers.__version__}


def grpo_batch(plan: Plan, vocab: int) -> RolloutBatch:
    """8 prompts x G samples: random prompt tokens, responses of exactly the response length."""
    gen = torch.Generator().manual_seed(2)
    prompts, responses = [], []
    for _ in range(plan.prompts):
        p = torch.randint(1, vocab, (plan.prompt_tokens,), generator=gen).tolist()
        for _ in range(plan.group):
            prompts.append(p)
            responses.append(torch.randint(1, vocab, (plan.response_tokens,),
                                           generator=gen).tolist())
    return RolloutBatch(prompts, responses, torch.randn(len(prompts), generator=gen))


def check_grpo_update(plan: Plan, device: torch.device, report: dict, model) -> None:
    cfg = model.config
    batch = grpo_batch(plan, cfg.vocab_size)
    rows = len(batch.prompts)
    tokens = rows * (plan.prompt_tokens + plan.response_tokens)
    out = {"shape": f"qwen3 hidden {cfg.hidden_size} x {cfg.num_hidden_layers} layers, "
                    f"heads {cfg.num_attention_heads}/{cfg.num_key_value_heads}, "
                    f"FFN {cfg.intermediate_size}, vocab {cfg.vocab_size}",
           "batch": f"{plan.prompts} prompts x G {plan.group}, prompt {plan.prompt_tokens} + "
                    f"response {plan.response_tokens} tokens, micro-batch {plan.micro_batch}",
           "lora_r": 8, "dtype": str(next(model.parameters()).dtype),
           "activation_checkpointing": True}
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    warm = True
    for shared in (True, False):
        g = GRPOConfig(lr=1e-6, shared_prefix=shared)
        with torch.no_grad():  # every run starts from the same adapter
            for n, p in model.named_parameters():
                if n in lora:
                    p.copy_(lora[n])
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=g.lr)
        if warm:  # one untimed update (kernel selection, allocator warm-up)
            grpo_update(model, opt, batch, g, micro_batch_size=plan.micro_batch, pad_id=0,
                        device=device)
            warm = False
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n in lora:
                        p.copy_(lora[n])
        reset_peak(device)
        with Clock(device) as c:
            res = grpo_update(model, opt, batch, g, micro_batch_size=plan.micro_batch, pad_id=0,
                              device=device)
        if shared:  # prompts once per group, responses attached
            seqs = [plan.prompt_tokens] * plan.prompts + [plan.response_tokens] * rows
        else:
            seqs = [plan.prompt_tokens + plan.response_tokens] * rows
        flops = 3 * forward_flops(cfg, seqs, rows * plan.response_tokens)
        out["shared_prefix_on" if shared else "shared_prefix_off"] = {
            "time_s": c.seconds, "batch_tokens_per_s": tokens / c.seconds,
            "mfu": mfu(flops, c.seconds, device), "peak_memory_gib": peak_gib(device),
            "loss": res["loss"], "grad_norm": res["grad_norm"]}
        del opt
    on, off = out["shared_prefix_on"], out["shared_prefix_off"]
    out["speedup_on_vs_off"] = off["time_s"] / on["time_s"]
    # the same update either way (up to bf16 rounding): the gradient norms agree
    out["grad_norm_rel_diff_on_vs_off"] = (abs(on["grad_norm"] - off["grad_norm"])
                                           / max(abs(off["grad_norm"]), 1e-12))
    report["grpo_update"] = out


def check_sampling(plan: Plan, device: torch.device, report: dict, model) -> None:
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, model.config.vocab_size, (plan.prompt_tokens,),
                             generator=gen).tolist() for _ in range(plan.prompts)]
    engine = TorchEngine(model, None, max_batch_size=plan.prompts * plan.group)
    out = {"batch": f"{plan.prompts} prompts x G {plan.group}, prompt {plan.prompt_tokens}, "
                    f"{plan.response_tokens} new tokens (no stop ids)"}
    base = SamplingParams(n=plan.group, temperature=1.0, max_new_tokens=plan.response_tokens)
    engine.generate(prompts[:1], dataclasses.replace(base, n=1, max_new_tokens=4, seed=0))
    for name, seed in (("seeded_per_prompt", 0), ("unseeded_one_batch", None)):
        reset_peak(device)
        with Clock(device) as c:
            groups = engine.generate(prompts, dataclasses.replace(base, seed=seed))
        new = sum(len(x.token_ids) for grp in groups for x in grp)
        out[name] = {"time_s": c.seconds, "new_tokens": new, "tokens_per_s": new / c.seconds,
                     "peak_memory_gib": peak_gib(device)}
    report["torch_engine_sampling"] = out


def check_sft(plan: Plan, device: torch.device, report: dict, model) -> None:
    cfg = model.config
    gen = torch.Generator().manual_seed(4)
    half = plan.sft_tokens // 2
    examples = [(torch.randint(1, cfg.vocab_size, (half,), generator=gen).tolist(),
                 torch.randint(1, cfg.vocab_size, (plan.sft_tokens - half,),
                               generator=gen).tolist()) for _ in range(plan.sft_examples)]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    denom = float(sum(len(c) for _, c in examples))

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        total = torch.zeros((), device=device)
        for ex in examples:  # micro-batch 1, accumulated
            b = collate_sft([ex], pad_id=0)
            logp = model_token_logprobs(model, b.input_ids.to(device),
                                        b.attention_mask.to(device))
            loss = sft_loss(logp, b.loss_mask.to(device), denom)
            loss.backward()
            total += loss.detach()
        opt.step()
        return float(total)

    step()  # warm-up
    reset_peak(device)
    with Clock(device) as c:
        loss = step()
    seqs = [plan.sft_tokens] * plan.sft_examples
    flops = 3 * forward_flops(cfg, seqs, sum(seqs))
    report["sft_step"] = {
        "batch": f"{plan.sft_examples} examples x {plan.sft_tokens} tokens, micro-batch 1",
        "time_s": c.seconds, "tokens_per_s": sum(seqs) / c.seconds,
        "mfu": mfu(flops, c.seconds, device), "peak_memory_gib": peak_gib(device),
        "loss": loss}


def run_section(name: str, fn, report: dict, deadline: float, min_left_s: float) -> None:
    """Run one section; record its wall time, or its error, or that the budget ran out."""
    left = deadline - time.perf_counter()
    if left < min_left_s:
        report.setdefault("skipped", []).append(f"{name}: {left:.0f}s left of the budget")
        return
    t0 = time.perf_counter()
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - report every failure, keep checking the rest
        report.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"
        traceback.print_exc(file=sys.stderr)
    report.setdefault("section_s", {})[name] = round(time.perf_counter() - t0, 2)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes: the code paths, fast")
    ap.add_argument("--budget-s", type=float, default=450.0,
                    help="skip sections that would start after this many seconds")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON report here")
    a = ap.parse_args(argv)
    version = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    if version < MIN_TORCH:
        print(f"gpu_check: torch {torch.__version__} is older than the supported "
              f"{'.'.join(map(str, MIN_TORCH))}; install torch >= 2.11", file=sys.stderr)
        return 2
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: --device cuda but no CUDA device is visible; use --device cpu --tiny",
              file=sys.stderr)
        return 2
    device = torch.device(a.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    plan = TINY_PLAN if a.tiny else FULL
    dtype = torch.bfloat16
    start = time.perf_counter()
    deadline = start + a.budget_s
    report: dict = {"torch": torch.__version__, "python": platform.python_version(),
                    "device": torch.cuda.get_device_name(device) if device.type == "cuda"
                    else platform.processor() or "cpu", "tiny": a.tiny,
                    "peak_bf16_flops": peak_flops(device)}
    run_section("bf16_and_transformers", lambda: check_bf16_and_transformers(plan, device, report),
                report, deadline, 0)
    holder: dict = {}

    def build_big() -> None:
        cfg = qwen3(plan.big, max_len=2 * max(plan.sft_tokens,
                                              plan.prompt_tokens + plan.response_tokens))
        with Clock(device) as c:
            holder["model"] = lora_policy(cfg, device, dtype)
        report["big_model_build_s"] = c.seconds

    run_section("build_4b", build_big, report, deadline, 60)
    if "model" in holder:
        model = holder["model"]
        run_section("grpo_update", lambda: check_grpo_update(plan, device, report, model),
                    report, deadline, 90)
        run_section("sft_step", lambda: check_sft(plan, device, report, model), report,
                    deadline, 45)
        run_section("torch_engine_sampling",
                    lambda: check_sampling(plan, device, report, model), report, deadline, 45)
    report["total_s"] = round(time.perf_counter() - start, 2)
    text = json.dumps(report, indent=1, default=lambda x: None if isinstance(x, float)
                      and not math.isfinite(x) else str(x))
    print(text)
    if a.out is not None:
        a.out.write_text(text + "\n")
    return 1 if report.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
