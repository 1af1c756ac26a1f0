"""minicd.discriminative: label attention by hand, the threshold grid, shapes, gradients,
PLM-ICD segmentation and the word pipeline."""

import math

import numpy as np
import pytest
import torch

from minicd.config import ClassifierConfig
from minicd.discriminative import (MODELS, CAMLAttention, LabelAttention, PLMICD,
                                   Vocab, build_classifier, collate_segments, pad_batch, segment,
                                   tune_threshold, words)
from minicd.model.roberta import RobertaConfig, RobertaModel

T1 = math.tanh(1.0)


def _set(linear, weight, bias=None):
    with torch.no_grad():
        linear.weight.copy_(torch.tensor(weight, dtype=torch.float32))
        if bias is not None:
            linear.bias.copy_(torch.tensor(bias, dtype=torch.float32))


def test_laat_label_attention_by_hand():
    att = LabelAttention(input_size=2, projection_size=2, num_labels=2)
    _set(att.first_linear, [[1, 0], [0, 1]])        # W = I: Z = tanh(H)
    _set(att.second_linear, [[1, 0], [0, 1]])       # U = I: label l attends by Z[:, l]
    _set(att.third_linear, [[1, 2], [-1, 1]], [0.5, 0.0])
    h = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]])  # [1, 3, 2]
    # all three tokens real: label 0 scores [t, 0, 0] -> weights e^t/(e^t+2), 1/(e^t+2), 1/(e^t+2)
    q, r = math.exp(T1) / (math.exp(T1) + 2), 1 / (math.exp(T1) + 2)
    full = att(h, torch.tensor([[True, True, True]]))
    # v_0 = q*[1,0] + r*[0,1] = [q, r] -> 1*q + 2*r + 0.5; v_1 = [r, q] -> -r + q
    assert full[0].tolist() == pytest.approx([q + 2 * r + 0.5, q - r], abs=1e-6)
    # last token padded: label 0 weights softmax([t, 0]) = [s, 1-s], s = sigmoid(tanh(1))
    s = 1 / (1 + math.exp(-T1))
    padded = att(h, torch.tensor([[True, True, False]]))
    assert padded[0].tolist() == pytest.approx([s + 2 * (1 - s) + 0.5, -(1 - s) + s], abs=1e-6)
    a = att.weights(h, torch.tensor([[True, True, False]]))
    assert a[0, 2].tolist() == [0.0, 0.0] and a[0].sum(0).tolist() == pytest.approx([1, 1])


def test_caml_attention_by_hand():
    att = CAMLAttention(input_size=2, num_labels=2)
    _set(att.first_linear, [[1, 0], [0, 0]])        # u_0 = [1, 0]; u_1 = 0 (uniform weights)
    _set(att.second_linear, [[2, -1], [1, 3]], [0.0, -1.0])
    h = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])    # tanh(H) = [[t, 0], [0, t]]
    s = 1 / (1 + math.exp(-T1))                     # softmax([t, 0])[0]
    out = att(h, torch.tensor([[True, True]]))
    # v_0 = [s t, (1-s) t] -> 2 s t - (1-s) t; v_1 = [t/2, t/2] -> t/2 + 3t/2 - 1
    assert out[0].tolist() == pytest.approx([T1 * (3 * s - 1), 2 * T1 - 1], abs=1e-6)
    # a padded third token (any state) changes nothing
    h3 = torch.cat([h, torch.tensor([[[5.0, -3.0]]])], dim=1)
    out3 = att(h3, torch.tensor([[True, True, False]]))
    assert torch.allclose(out3, out, atol=1e-6)


def test_tune_threshold_by_hand():
    probs = np.array([[0.9, 0.2, 0.55],
                      [0.4, 0.7, 0.10],
                      [0.3, 0.6, 0.05]])
    gold = np.array([[1, 0, 0],
                     [0, 1, 0],
                     [1, 0, 0]])                    # label 2 is never gold (all negative)
    # t in (0.6, 0.7]: predicts 0.9, 0.7 -> tp 2, fp 0, fn 1 -> F1 = 2 / 2.5 = 0.8 (the best);
    # t in (0.55, 0.6]: + 0.6 -> 2/3; t <= 0.3: tp 3, fp 3 (0.55 of the all-negative label,
    # 0.4, 0.6) -> 3 / 4.5; t > 0.7: tp 1, fn 2 -> 0.5. Grid points 0.61 ... 0.69 tie at 0.8.
    assert tune_threshold(probs, gold) == pytest.approx(0.61)
    # every threshold ties (no gold at all: F1 0 everywhere) -> the lowest, 0.0
    assert tune_threshold(probs, np.zeros_like(gold)) == 0.0
    # torch tensors work too
    assert tune_threshold(torch.tensor(probs), torch.tensor(gold)) == pytest.approx(0.61)
    with pytest.raises(ValueError, match=r"\[N, L\]"):
        tune_threshold(probs[0], gold[0])


def _tiny_cfg(model):
    return ClassifierConfig(model=model, embed_dim=6, embed_dropout=0.0, num_filters=5,
                            kernel_size=3, kernel_sizes=[3, 5], rnn_size=4, projection_size=3)


def _tiny_encoder(seed=0):
    torch.manual_seed(seed)
    cfg = RobertaConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=12, max_position_embeddings=20, pad_token_id=1)
    return RobertaModel(cfg)


def _build(model, labels=4, seed=0):
    torch.manual_seed(seed)
    enc = _tiny_encoder(seed) if model == "plmicd" else None
    return build_classifier(_tiny_cfg(model), labels, vocab_size=20, encoder=enc)


def _inputs(model):
    seqs = [[3, 4, 5, 6, 7, 8, 9], [5, 6, 7, 8]]
    if model == "plmicd":
        return collate_segments(seqs, segment_length=3, pad_id=1)   # [2, 3, 3]
    return pad_batch(seqs)                                          # [2, 7]


@pytest.mark.parametrize("model", MODELS)
def test_output_shape_and_gradients(model):
    net = _build(model).double().eval()
    ids, mask = _inputs(model)
    out = net(ids, mask)
    assert out.shape == (2, 4) and torch.isfinite(out).all()
    # gradcheck: autograd vs central differences, w.r.t. the first parameter after the embeddings
    # (whose padding rows get no gradient by design) and the last one
    names = [n for n, p in net.named_parameters() if "embed" not in n]
    params = dict(net.named_parameters())
    picked = [names[0], names[-1]]

    def f(*tensors):
        p = {**params, **dict(zip(picked, tensors))}
        return torch.func.functional_call(net, p, (ids, mask))

    inputs = tuple(params[n].detach().clone().requires_grad_(True) for n in picked)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5)
    # every parameter gets a gradient from a BCE loss
    net.zero_grad()
    torch.nn.functional.binary_cross_entropy_with_logits(net(ids, mask), torch.ones(2, 4,
                                                         dtype=torch.float64)).backward()
    no_grad = [n for n, p in net.named_parameters()
               if p.grad is None or not p.grad.abs().sum() > 0]
    # the embedding row of an unused token and the padding row have zero gradient, never a whole tensor
    assert no_grad == [], no_grad


@pytest.mark.parametrize("model", ["caml", "laat", "bigru"])
def test_padding_does_not_change_logits(model):
    net = _build(model).eval()
    ids, mask = pad_batch([[3, 4, 5, 6]])
    more_ids, more_mask = pad_batch([[3, 4, 5, 6], [7] * 9])
    with torch.no_grad():
        assert torch.allclose(net(ids, mask)[0], net(more_ids, more_mask)[0], atol=1e-5)


def test_plmicd_segmentation_masks_padding_segments():
    seg, m = segment([10, 11, 12, 13, 14], segment_length=2, pad_id=1)
    assert seg.tolist() == [[10, 11], [12, 13], [14, 1]]
    assert m.tolist() == [[True, True], [True, True], [True, False]]
    ids, mask = collate_segments([[3, 4, 5, 6, 7], [8, 9]], segment_length=2, pad_id=1)
    assert ids.shape == mask.shape == (2, 3, 2)
    assert ids[1].tolist() == [[8, 9], [1, 1], [1, 1]]
    assert mask[1].tolist() == [[True, True], [False, False], [False, False]]

    calls = []

    class Recorder(torch.nn.Module):
        def __init__(self, enc):
            super().__init__()
            self.enc = enc

        def forward(self, x, attention_mask):
            calls.append(x.shape[0])
            return self.enc(x, attention_mask)

    enc = _tiny_encoder().eval()
    net = PLMICD(Recorder(enc), 8, num_labels=3).eval()
    with torch.no_grad():
        both = net(ids, mask)
        alone = net(*collate_segments([[8, 9]], segment_length=2, pad_id=1))
        first = net(*collate_segments([[3, 4, 5, 6, 7]], segment_length=2, pad_id=1))
    assert calls[0] == 4  # 3 + 1 real segments; the two padding segments never reach the encoder
    assert torch.allclose(both[1], alone[0], atol=1e-6)   # padding segments masked out
    assert torch.allclose(both[0], first[0], atol=1e-6)
    # the note longer than one segment: its three segments' tokens all feed the attention
    states = enc(ids[0], mask[0].long()).reshape(6, 8)
    a = net.attention.weights(states[None], mask[0].reshape(1, 6))
    assert (a[0, :5] > 0).all() and (a[0, 5] == 0).all()


def test_words_and_vocab():
    assert words("Pt. w/ CHF-exacerbation, 2 days; HTN!") == ["pt", "w", "chf", "exacerbation",
                                                             "days", "htn"]
    notes = ["chf and htn", "chf, copd", "CHF htn htn", "rare"]
    v = Vocab.build(notes, min_count=2)             # document counts: chf 3, htn 2, others 1
    assert v.itos == ["<pad>", "<unk>", "chf", "htn"]
    assert v.encode("HTN with chf") == [3, 1, 2]
    assert v.encode("htn chf chf", max_tokens=2) == [3, 2]
    assert v.encode("") == [1]
    ids, mask = pad_batch([[2, 3], [3]])
    assert ids.tolist() == [[2, 3], [3, 0]] and mask.tolist() == [[True, True], [True, False]]


def test_skipgram_pairs_by_hand():
    from minicd.discriminative.word2vec import skipgram_pairs

    c, x = skipgram_pairs([[2, 3, 1, 4], [5, 6]], window=2)
    # note 1: distance 1 -> (2,3) (3,1)x (1,4)x; distance 2 -> (2,1)x (3,4); note 2: (5,6);
    # the unknown word (1) pairs with nothing and no pair crosses notes
    pairs = sorted(zip(c.tolist(), x.tolist()))
    assert pairs == sorted([(2, 3), (3, 2), (5, 6), (6, 5), (3, 4), (4, 3)])


def test_sgns_loss_by_hand():
    from minicd.discriminative.word2vec import sgns_loss

    u = torch.tensor([[1.0, 0.0]])
    v = torch.tensor([[2.0, 0.0]])
    n = torch.tensor([[[0.0, 1.0], [-1.0, 0.0]]])
    # -log s(2) - log s(-0) - log s(1)
    expect = -(math.log(1 / (1 + math.exp(-2))) + math.log(0.5) + math.log(1 / (1 + math.exp(-1))))
    assert sgns_loss(u, v, n).item() == pytest.approx(expect, rel=1e-6)


def test_word2vec_puts_cooccurring_words_together():
    from minicd.discriminative.word2vec import train_word2vec

    g = torch.Generator().manual_seed(0)
    # two topics that never share a note: words 2-5 and words 6-9
    rng = np.random.default_rng(0)
    seqs = [list(rng.integers(2, 6, 12)) if k % 2 else list(rng.integers(6, 10, 12))
            for k in range(200)]
    w = train_word2vec(seqs, 10, 8, generator=g, epochs=5, batch_size=256, lr=0.02)
    assert w.shape == (10, 8) and (w[0] == 0).all()
    unit = torch.nn.functional.normalize(w[2:], dim=1)
    cos = unit @ unit.T                                             # [8, 8]
    same = torch.cat([cos[:4, :4][~torch.eye(4, dtype=bool)], cos[4:, 4:][~torch.eye(4, dtype=bool)]])
    across = cos[:4, 4:].flatten()
    assert same.min() > across.max()
