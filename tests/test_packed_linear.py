"""minicd.model.packed_linear: oneDNN-packed decode products against F.linear, with and without
LoRA, and the torch engine's tokens with packing against the unpacked engine and a full-forward
reference loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from minicd.model import packed_linear
from minicd.model.decoder import DecoderConfig, DecoderLM
from minicd.model.hub import build_model
from minicd.model.lora import LoRAConfig, inject_lora, lora_modules
from minicd.model.packed_linear import MIN_PACKED_ELEMENTS, packed_linears, packing_supported
from minicd.rollout.engine import SamplingParams
from minicd.rollout.torch_engine import TorchEngine

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12], [3, 40, 77, 1]]


def model_with_packable_layers(seed: int = 0) -> DecoderLM:
    """Small Qwen3 whose attention and MLP weights (256 x 256, 512 x 256) exceed the packing
    threshold while the head (128 x 256) stays below it."""
    cfg = DecoderConfig(model_type="qwen3", vocab_size=128, hidden_size=256,
                        intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=64, qk_norm=True,
                        initializer_range=0.2, rope_theta=10000.0)
    return build_model(cfg, seed=seed).eval()


def expected_packed(model: nn.Module) -> int:
    return sum(isinstance(m, nn.Linear) and m.weight.numel() >= MIN_PACKED_ELEMENTS
               for m in model.modules())


def test_packing_is_supported_on_this_cpu_build():
    # CI's torch wheel has oneDNN: the engine's fast path must not silently fall back
    assert packing_supported(model_with_packable_layers())


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-2)])
def test_packed_decode_forward_equals_f_linear(dtype, tol, monkeypatch):
    model = model_with_packable_layers().to(dtype)
    x = torch.randint(0, 128, (5, 7))
    calls = []
    real = packed_linear.packed_product
    monkeypatch.setattr(packed_linear, "packed_product",
                        lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        plain = model(x).float()
        with packed_linears(model) as n:
            packed = model(x).float()
    # per layer q, o (256 x 256), gate, up (512 x 256), down (256 x 512); k, v (128 x 256 =
    # 32,768 elements) and the head (128 x 256) stay below the threshold
    assert n == expected_packed(model) == 2 * 5
    assert len(calls) == n  # every packed layer computed through oneDNN once
    assert (packed - plain).abs().max().item() <= tol * max(1.0, plain.abs().max().item())
    for m in model.modules():  # nothing left behind
        assert "_packed_weight" not in m.__dict__ and "forward" not in m.__dict__


def test_lora_layers_keep_their_update_when_packed():
    model = model_with_packable_layers()
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules="all-linear"),
                generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lora_modules(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.1)
    x = torch.randint(0, 128, (3, 6))
    with torch.no_grad():
        plain = model(x)
        with packed_linears(model) as n:
            packed = model(x)
        for layer in lora_modules(model).values():
            layer.disabled = True
        no_lora = model(x)
    assert n == expected_packed(model) == 10
    assert (packed - plain).abs().max().item() <= 1e-4
    assert (plain - no_lora).abs().max().item() > 1e-2  # the adapter matters here


def test_disabled_or_unsupported_packs_nothing():
    model = model_with_packable_layers()
    with packed_linears(model, enabled=False) as n:
        assert n == 0
    model64 = model_with_packable_layers().double()
    assert not packing_supported(model64)
    with packed_linears(model64) as n:
        assert n == 0


@torch.no_grad()
def reference_greedy(model, prompt, n_new):
    seq = list(prompt)
    for _ in range(n_new):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


def test_engine_tokens_with_packed_decode_equal_unpacked_and_reference():
    model = model_with_packable_layers()
    packed, plain = TorchEngine(model), TorchEngine(model, packed_decode=False)
    greedy = SamplingParams(n=2, temperature=0.0, max_new_tokens=10)
    out = packed.generate(PROMPTS, greedy)
    assert [[g.token_ids for g in row] for row in out] == \
        [[g.token_ids for g in row] for row in plain.generate(PROMPTS, greedy)]
    for i, p in enumerate(PROMPTS):
        assert out[i][0].token_ids == reference_greedy(model, p, 10)
    seeded = SamplingParams(n=4, temperature=1.0, max_new_tokens=10, seed=3)
    assert [[g.token_ids for g in row] for row in packed.generate(PROMPTS, seeded)] == \
        [[g.token_ids for g in row] for row in plain.generate(PROMPTS, seeded)]
    # weights edited in place between calls: the next call packs the new weights
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.mul_(-1.5)
    after = packed.generate(PROMPTS, greedy)
    for i, p in enumerate(PROMPTS):
        assert after[i][0].token_ids == reference_greedy(model, p, 10)
    assert [r[0].token_ids for r in after] != [r[0].token_ids for r in out]
