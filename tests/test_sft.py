"""Masked SFT loss: hand computation, prompt masking, micro-batch invariance."""

import math

import pytest
import torch

from minicd.algo.sft import collate_sft, sft_loss


def _naive_logp(logits, input_ids):
    return torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)


def test_collate_layout():
    b = collate_sft([([5, 6, 7], [8, 9]), ([1], [2, 3, 4])], pad_id=0)
    assert b.input_ids.tolist() == [[5, 6, 7, 8, 9], [1, 2, 3, 4, 0]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    # targets: row 0 predicts 6 7 8 9 -> completion targets 8, 9 at t = 2, 3
    assert b.loss_mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 0]]
    assert b.num_response_tokens == 5


def test_loss_equals_hand_computation():
    # vocabulary of 2, uniform logits except one position: -log p by hand
    b = collate_sft([([0], [1, 1])], pad_id=0)                 # ids [0, 1, 1], targets 1, 1
    logits = torch.zeros(1, 3, 2)
    logits[0, 1] = torch.tensor([0.0, math.log(3.0)])          # p(1) = 3/4 at t = 1
    logp = _naive_logp(logits, b.input_ids)
    expected = -(math.log(0.5) + math.log(0.75)) / 2
    assert sft_loss(logp, b.loss_mask).item() == pytest.approx(expected, abs=1e-6)


def test_prompt_targets_do_not_change_the_loss():
    g = torch.Generator().manual_seed(0)
    b = collate_sft([([3, 1, 4], [1, 5]), ([9, 2], [6, 5, 3])], pad_id=0)
    logits = torch.randn(2, 5, 10, generator=g)
    base = sft_loss(_naive_logp(logits, b.input_ids), b.loss_mask)
    changed_ids = b.input_ids.clone()
    changed_ids[0, 1] = 7                                       # a prompt target (t = 0)
    changed_logits = logits.clone()
    changed_logits[0, 0] += torch.randn(10, generator=g)        # logits predicting prompt tokens
    other = sft_loss(_naive_logp(changed_logits, changed_ids), b.loss_mask)
    assert other.item() == pytest.approx(base.item(), abs=1e-7)
    # but changing a completion target does change it
    changed_ids[0, 4] = 8
    assert sft_loss(_naive_logp(logits, changed_ids), b.loss_mask).item() != pytest.approx(base.item())


def test_split_into_micro_batches_gives_same_loss_and_grad():
    g = torch.Generator().manual_seed(1)
    examples = [([1, 2, 3], [4, 5]), ([6], [7, 8, 9, 1]), ([2, 2], [3]), ([4, 4, 4, 4], [5, 6])]
    W = torch.randn(10, 10, generator=g, requires_grad=True)

    def logits_of(ids):
        return torch.nn.functional.one_hot(ids, 10).float() @ W

    full = collate_sft(examples, pad_id=0)
    loss = sft_loss(_naive_logp(logits_of(full.input_ids), full.input_ids), full.loss_mask)
    (grad_full,) = torch.autograd.grad(loss, W)

    total_tokens = full.num_response_tokens
    acc = torch.zeros(())
    grad_acc = torch.zeros_like(W)
    for part in (examples[:1], examples[1:]):                  # uneven micro-batches
        mb = collate_sft(part, pad_id=0)
        l = sft_loss(_naive_logp(logits_of(mb.input_ids), mb.input_ids), mb.loss_mask, total_tokens)
        (gr,) = torch.autograd.grad(l, W)
        acc += l.detach()
        grad_acc += gr
    assert acc.item() == pytest.approx(loss.item(), abs=1e-6)
    torch.testing.assert_close(grad_acc, grad_full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("head_trains", [False, True])
def test_loss_only_projection_matches_full_projection(head_trains):
    """``target_mask``: only the loss positions' hidden states go through the head; the SFT loss
    and every gradient equal those of projecting every position (naive full logits), on a
    right-padded batch, with a frozen head (LoRA) and with a training head (full fine-tuning)."""
    from minicd.algo.logprobs import model_token_logprobs
    from minicd.model.decoder import DecoderLM as QwenForCausalLM
    from minicd.model.hf_config import DecoderConfig as QwenConfig

    cfg = QwenConfig(model_type="qwen2", vocab_size=40, hidden_size=16, intermediate_size=32,
                     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                     head_dim=8, tie_word_embeddings=True)
    model = QwenForCausalLM(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(20.0)  # sharper outputs
    model.lm_head.weight.requires_grad_(head_trains)  # tied: the embedding too
    g = torch.Generator().manual_seed(1)
    examples = [(torch.randint(1, 40, (n,), generator=g).tolist(),
                 torch.randint(1, 40, (k,), generator=g).tolist()) for n, k in ((7, 3), (2, 5))]
    b = collate_sft(examples, pad_id=0)
    params = [p for p in model.parameters() if p.requires_grad]

    logits = model(b.input_ids, attention_mask=b.attention_mask)           # [B, T, V]
    ref = sft_loss(_naive_logp(logits, b.input_ids), b.loss_mask)
    ref_grads = torch.autograd.grad(ref, params)
    logp = model_token_logprobs(model, b.input_ids, b.attention_mask, target_mask=b.loss_mask)
    assert logp.shape == b.loss_mask.shape
    assert torch.equal(logp[b.loss_mask == 0], torch.zeros(int((b.loss_mask == 0).sum())))
    loss = sft_loss(logp, b.loss_mask)
    assert abs(loss.item() - ref.item()) <= 1e-5
    for got, want in zip(torch.autograd.grad(loss, params), ref_grads):
        assert (got - want).abs().max() <= 1e-5 * max(1.0, float(want.abs().max()))
    with pytest.raises(ValueError, match="target_mask"):
        model_token_logprobs(model, b.input_ids, target_mask=b.loss_mask[:, 1:])
