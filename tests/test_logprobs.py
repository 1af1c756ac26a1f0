"""minicd.algo.logprobs against the naive full-logits log_softmax / entropy."""

from __future__ import annotations

import pytest
import torch

from minicd.algo.logprobs import model_token_logprobs, token_logprobs_from_hidden
from minicd.model.decoder import DecoderConfig, DecoderLM

B, T, H, V = 2, 6, 16, 50
ATOL = 1e-5


def inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=gen, requires_grad=True)
    weight = (0.5 * torch.randn(V, H, generator=gen)).requires_grad_()
    targets = torch.randint(0, V, (B, T), generator=gen)
    upstream = torch.randn(2, B, T, generator=gen)  # random cotangents for logp and entropy
    return hidden, weight, targets, upstream


def naive(hidden, weight, targets, temperature=1.0):
    logp_all = torch.log_softmax((hidden @ weight.T).float() / temperature, -1)  # [B, T, V]
    logp = logp_all.gather(-1, targets[..., None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("chunk", [1, 5, 7, 12, 64])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_values_entropy_and_grads_match_naive(chunk, temperature):
    hidden, weight, targets, up = inputs()
    logp, ent = token_logprobs_from_hidden(hidden, weight, targets, chunk_tokens=chunk,
                                           temperature=temperature, with_entropy=True)
    ref_logp, ref_ent = naive(hidden, weight, targets, temperature)
    assert logp.shape == ent.shape == (B, T) and logp.dtype == torch.float32
    assert (logp - ref_logp).abs().max() <= ATOL
    assert (ent - ref_ent).abs().max() <= ATOL
    got = grads((logp * up[0]).sum() + (ent * up[1]).sum(), hidden, weight)
    ref = grads((ref_logp * up[0]).sum() + (ref_ent * up[1]).sum(), hidden, weight)
    for g, r in zip(got, ref):
        assert (g - r).abs().max() <= ATOL


def test_temperature_changes_result():
    hidden, weight, targets, _ = inputs(1)
    hot = token_logprobs_from_hidden(hidden, weight, targets, temperature=2.0)
    cold = token_logprobs_from_hidden(hidden, weight, targets)
    assert (hot - naive(hidden, weight, targets, 2.0)[0]).abs().max() <= ATOL
    assert (hot - cold).abs().max() > 1e-2


def test_module_and_callable_heads():
    hidden, weight, targets, up = inputs(2)
    linear = torch.nn.Linear(H, V, bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight)
    logp = token_logprobs_from_hidden(hidden, linear, targets, chunk_tokens=5)
    ref = naive(hidden, weight, targets)[0]
    assert (logp - ref).abs().max() <= ATOL
    g = grads((logp * up[0]).sum(), linear.weight)[0]
    assert (g - grads((ref * up[0]).sum(), weight)[0]).abs().max() <= ATOL
    # A LoRA-style head: W + B A, given as a plain callable.
    lora_a = torch.randn(2, H, generator=torch.Generator().manual_seed(3), requires_grad=True)
    lora_b = torch.randn(V, 2, generator=torch.Generator().manual_seed(4), requires_grad=True)
    logp = token_logprobs_from_hidden(hidden, lambda h: h @ weight.T + (h @ lora_a.T) @ lora_b.T,
                                      targets, chunk_tokens=4)
    ref = naive(hidden, weight + lora_b @ lora_a, targets)[0]
    assert (logp - ref).abs().max() <= ATOL
    for g, r in zip(grads(logp.sum(), lora_a, lora_b), grads(ref.sum(), lora_a, lora_b)):
        assert (g - r).abs().max() <= ATOL


@pytest.mark.parametrize("chunk", [1, 5, 64])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_frozen_head_fused_path_matches_naive(chunk, temperature, with_entropy):
    """The LoRA case: the head is frozen, only the hidden states need a gradient (the fused
    path stores d logp / d h and d H / d h in the forward), with ignored (-100) targets."""
    hidden, weight, targets, up = inputs(9)
    weight = weight.detach()
    masked = targets.clone()
    masked[1, 3:] = -100  # padding
    out = token_logprobs_from_hidden(hidden, weight, masked, chunk_tokens=chunk,
                                     temperature=temperature, with_entropy=with_entropy)
    logp, ent = out if with_entropy else (out, None)
    ref_logp, ref_ent = naive(hidden, weight, targets, temperature)
    ref_logp = ref_logp.masked_fill(masked < 0, 0.0)
    assert (logp - ref_logp).abs().max() <= ATOL
    assert torch.equal(logp[1, 3:], torch.zeros(3))
    loss, ref_loss = (logp * up[0]).sum(), (ref_logp * up[0]).sum()
    if with_entropy:
        assert (ent - ref_ent).abs().max() <= ATOL
        loss, ref_loss = loss + (ent * up[1]).sum(), ref_loss + (ref_ent * up[1]).sum()
    g, r = grads(loss, hidden)[0], grads(ref_loss, hidden)[0]
    assert (g - r).abs().max() <= ATOL
    assert r[1, 3:].abs().max() > 0 if with_entropy else torch.equal(g[1, 3:], torch.zeros(3, H))


def test_frozen_head_backward_recomputes_nothing():
    """With a frozen head the backward pass runs no matrix product (it only scales the
    per-token vectors stored in the forward); a training head recomputes each chunk once."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountMatmuls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm,
                                       torch.ops.aten.addmm_, torch.ops.aten.bmm):
                self.count += 1
            return func(*args, **(kwargs or {}))

    hidden, weight, targets, up = inputs(10)
    # 3 chunks; a training head: logits h W^T again, dz @ W and dz^T @ h per chunk
    for trains, expected in ((False, 0), (True, 3 * 3)):
        w = weight.detach().requires_grad_(trains)
        logp = token_logprobs_from_hidden(hidden, w, targets, chunk_tokens=4)
        counter = CountMatmuls()
        with counter:
            (logp * up[0]).sum().backward()
        assert counter.count == expected


def test_negative_targets_are_ignored():
    hidden, weight, targets, _ = inputs(5)
    masked = targets.clone()
    masked[0, :2] = -100
    logp = token_logprobs_from_hidden(hidden, weight, masked, chunk_tokens=3)
    assert torch.equal(logp[0, :2], torch.zeros(2))
    assert (logp[0, 2:] - naive(hidden, weight, targets)[0][0, 2:]).abs().max() <= ATOL


def _saved_vocab_numel(fn, weight: torch.Tensor) -> int:
    """Total size of tensors autograd keeps for backward that have a vocabulary-sized dim,
    other than views of the head weight itself."""
    total = []

    def pack(t):
        if V in t.shape and t.untyped_storage().data_ptr() != weight.untyped_storage().data_ptr():
            total.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(total)


def test_backward_does_not_keep_chunk_logits():
    hidden, weight, targets, _ = inputs(6)
    lean = _saved_vocab_numel(lambda: token_logprobs_from_hidden(
        hidden, weight, targets, chunk_tokens=4, with_entropy=True), weight)
    full = _saved_vocab_numel(lambda: naive(hidden, weight, targets), weight)
    assert full >= B * T * V  # the measurement sees stored logits
    assert lean < B * T * V // 4


def test_no_grad_and_bad_arguments():
    hidden, weight, targets, _ = inputs(7)
    with torch.no_grad():
        logp = token_logprobs_from_hidden(hidden, weight, targets, chunk_tokens=5)
    assert not logp.requires_grad
    assert (logp - naive(hidden, weight, targets)[0]).abs().max() <= ATOL
    with pytest.raises(ValueError):
        token_logprobs_from_hidden(hidden, weight, targets, temperature=0.0)


def tiny_model() -> DecoderLM:
    cfg = DecoderConfig(model_type="qwen3", vocab_size=V, hidden_size=H, intermediate_size=32,
                     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                     head_dim=8, qk_norm=True)
    model = DecoderLM(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    with torch.no_grad():  # an untrained-looking model has near-uniform outputs; sharpen them
        model.lm_head.weight.mul_(50.0)
    return model


def test_model_token_logprobs_match_naive():
    model = tiny_model()
    ids = torch.randint(0, V, (B, 8), generator=torch.Generator().manual_seed(8))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    logp, ent = model_token_logprobs(model, ids, attention_mask=mask, chunk_tokens=3,
                                     temperature=0.9, with_entropy=True)
    logits = model(ids, attention_mask=mask)[:, :-1].float() / 0.9
    ref_all = torch.log_softmax(logits, -1)
    ref = ref_all.gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert logp.shape == (B, 7)
    assert (logp - ref).abs().max() <= ATOL
    assert (ent + (ref_all.exp() * ref_all).sum(-1)).abs().max() <= ATOL
    params = [model.lm_head.weight, model.model.layers[0].self_attn.q_proj.weight]
    for g, r in zip(grads(logp[mask[:, 1:].bool()].sum(), *params),
                    grads(ref[mask[:, 1:].bool()].sum(), *params)):
        # grads reach ~24 here: both paths are ~1e-5 from a float64 reference
        torch.testing.assert_close(g, r, rtol=1e-5, atol=ATOL)
    with torch.no_grad():  # last_n: only the last targets (temperature 1)
        last = model_token_logprobs(model, ids, attention_mask=mask, last_n=3)
        plain = torch.log_softmax(model(ids, attention_mask=mask)[:, :-1].float(), -1)
    plain = plain.gather(-1, ids[:, 1:, None]).squeeze(-1)  # [B, 7]
    assert last.shape == (B, 3)
    assert (last - plain[:, -3:]).abs().max() <= ATOL


def test_shared_prefix_logprobs_equal_per_row_forwards():
    """Each prompt computed once (packed with its samples under a block mask) = every row run
    alone, unpadded: log-probs, entropies and the gradients of a weighted sum, through a LoRA
    adapter too; a one-token prompt and uneven groups included."""
    from minicd.algo.logprobs import shared_prefix_logprobs
    from minicd.model.lora import LoRAConfig, inject_lora

    model = tiny_model()
    inject_lora(model, LoRAConfig(r=2, alpha=4.0), generator=torch.Generator().manual_seed(3))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # nonzero B: the adapter changes the outputs
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(4))
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(1, V, (n,), generator=gen).tolist() for n in (6, 1, 9)]
    owner = [0, 0, 0, 1, 2, 2]
    responses = [torch.randint(1, V, (n,), generator=gen).tolist() for n in (3, 1, 4, 2, 4, 1)]
    weights = torch.randn(len(owner), 4, generator=gen)
    params = [p for p in model.parameters() if p.requires_grad]

    logp, ent = shared_prefix_logprobs(model, prompts, responses, owner, pad_id=0,
                                       with_entropy=True)
    assert logp.shape == ent.shape == (6, 4)
    total = 0.0
    ref_rows = []
    for i, (o, r) in enumerate(zip(owner, responses)):
        ids = torch.tensor([prompts[o] + r])
        logp_all = torch.log_softmax(model(ids)[0, len(prompts[o]) - 1:-1].float(), -1)  # [n, V]
        ref = logp_all.gather(-1, torch.tensor(r)[:, None]).squeeze(-1)
        ref_ent = -(logp_all.exp() * logp_all).sum(-1)
        assert (logp[i, :len(r)] - ref).abs().max() <= ATOL, i
        assert (ent[i, :len(r)] - ref_ent).abs().max() <= ATOL, i
        total = total + (ref * weights[i, :len(r)]).sum()
        ref_rows.append(len(r))
    mask = torch.tensor([[1.0] * n + [0.0] * (4 - n) for n in ref_rows])
    expected = grads(total, *params)
    # grads reach ~45 here, and fp32 rounding differs between one packed row and per-row
    # forwards (each is up to ~5e-5 from a float64 run): compare at 1e-5 of each tensor's scale
    for g, r in zip(grads((logp * mask * weights).sum(), *params), expected):
        assert (g - r).abs().max() <= 1e-5 * r.abs().max(), (g - r).abs().max()
    model.set_activation_checkpointing(True)  # the packed mask goes through checkpointed blocks
    again = shared_prefix_logprobs(model, prompts, responses, owner, pad_id=0)
    for g, r in zip(grads((again * mask * weights).sum(), *params), expected):
        assert (g - r).abs().max() <= 1e-5 * r.abs().max(), (g - r).abs().max()
    model.set_activation_checkpointing(False)
    with pytest.raises(ValueError, match=">= 1 token"):
        shared_prefix_logprobs(model, [[]], [[1, 2]], [0], pad_id=0)
    with pytest.raises(ValueError, match="owner"):
        shared_prefix_logprobs(model, prompts, responses, owner[:-1], pad_id=0)
