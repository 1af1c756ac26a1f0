"""minicd.model.decoder against transformers' Qwen2/Qwen3 (the independent reference)."""

from __future__ import annotations

import pytest
import torch
from tiny_hf import TINY, perturbed_hf_model
from transformers import LlamaConfig, Qwen2Config, Qwen3Config

from minicd.model.decoder import DecoderConfig, DecoderLM, KVCache

ATOL = 1e-5


def hf_model(kind: str, tied: bool = False, seed: int = 0, **extra) -> torch.nn.Module:
    return perturbed_hf_model(kind, tied, seed, rope_theta=500.0, eager=True, **extra)


def ours_from(hf: torch.nn.Module) -> DecoderLM:
    cfg = DecoderConfig.from_hf_dict(hf.config.to_dict())
    model = DecoderLM(cfg)
    state = dict(hf.state_dict())
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight")  # as in HF tied checkpoints
    model.load_state_dict(state, strict=True)
    return model.eval()


CASES = [
    ("qwen2", False, {}),
    ("qwen2", True, {}),
    ("qwen3", False, {"head_dim": 24}),
    ("qwen3", True, {"head_dim": 24}),
    ("qwen3", False, {"head_dim": 16, "attention_bias": True}),
    # Llama: MHA tied; GQA untied with an explicit head_dim; biases (attention + MLP)
    ("llama", True, {"num_key_value_heads": 4}),
    ("llama", False, {"head_dim": 24, "num_key_value_heads": 1}),
    ("llama", False, {"attention_bias": True, "mlp_bias": True, "rms_norm_eps": 1e-5}),
]


@pytest.mark.parametrize("kind,tied,extra", CASES)
def test_logits_match_transformers(kind, tied, extra):
    hf = hf_model(kind, tied, **extra)
    ours = ours_from(hf)
    assert set(ours.state_dict()) == set(hf.state_dict())
    assert ours.config.head_dim == extra.get("head_dim", 16)
    assert ours.config.rope_theta == 500.0
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == tied
    assert ours.num_parameters() == hf.num_parameters()
    attn, mlp = ours.model.layers[0].self_attn, ours.model.layers[0].mlp
    if kind == "qwen2":
        assert attn.q_proj.bias is not None
        assert attn.o_proj.bias is None
    if kind == "llama":
        assert not hasattr(attn, "q_norm")
        assert ours.config.num_key_value_heads == extra.get("num_key_value_heads", 2)
        assert (attn.o_proj.bias is not None) == extra.get("attention_bias", False)
        assert (mlp.down_proj.bias is not None) == extra.get("mlp_bias", False)
    ids = torch.randint(0, 300, (2, 13), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    assert got.shape == (2, 13, 300)
    assert (got - expected).abs().max().item() <= ATOL
    # Explicit (shifted) positions are honoured like HF's position_ids.
    pos = torch.arange(5, 18)[None].expand(2, 13)
    with torch.no_grad():
        assert (ours(ids, position_ids=pos) - hf(ids, position_ids=pos).logits).abs().max() <= ATOL


def test_hidden_states_and_logits_to_keep():
    ours = ours_from(hf_model("qwen3", head_dim=24))
    ids = torch.randint(0, 300, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = ours(ids)
        hidden = ours.hidden_states(ids)
        last = ours(ids, logits_to_keep=2)
    assert hidden.shape == (2, 7, 64)
    assert torch.allclose(hidden @ ours.lm_head.weight.T, logits, atol=ATOL)
    assert torch.allclose(last, logits[:, -2:], atol=ATOL)


def _left_pad(rows: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_left_padded_rows_match_unpadded(kind):
    ours = ours_from(hf_model(kind))
    gen = torch.Generator().manual_seed(1)
    rows = [torch.randint(1, 300, (n,), generator=gen) for n in (9, 4, 1)]
    ids, mask = _left_pad(rows)
    with torch.no_grad():
        batched = ours(ids, attention_mask=mask)
        assert torch.isfinite(batched).all()  # padded query rows too
        for i, r in enumerate(rows):
            single = ours(r[None])[0]
            assert (batched[i, ids.shape[1] - len(r):] - single).abs().max() <= ATOL


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_kv_cache_greedy_matches_full_forward_and_transformers(kind):
    hf = hf_model(kind, **({"head_dim": 24} if kind == "qwen3" else {}))
    ours = ours_from(hf)
    gen = torch.Generator().manual_seed(2)
    rows = [torch.randint(1, 300, (n,), generator=gen) for n in (6, 3, 4)]
    ids, mask = _left_pad(rows)
    steps = 6
    # Capacity 4 < prompt width 6: the cache has to grow.
    cache = KVCache(ours.config, batch_size=3, max_len=4)
    tokens = []
    seq, seq_mask = ids, mask
    with torch.no_grad():
        logits = ours(ids, attention_mask=mask, kv_cache=cache)[:, -1]
        for _ in range(steps):
            full = ours(seq, attention_mask=seq_mask)[:, -1]
            assert (logits - full).abs().max() <= ATOL
            nxt = logits.argmax(-1)  # [B]
            tokens.append(nxt)
            seq = torch.cat([seq, nxt[:, None]], 1)
            seq_mask = torch.cat([seq_mask, torch.ones(3, 1, dtype=torch.long)], 1)
            logits = ours(nxt[:, None], kv_cache=cache)[:, -1]
        expected = hf.generate(ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                               pad_token_id=0)[:, ids.shape[1]:]
    assert cache.length == ids.shape[1] + steps
    assert torch.equal(torch.stack(tokens, 1), expected)


def test_kv_cache_select_rows():
    ours = ours_from(hf_model("qwen3", head_dim=24))
    gen = torch.Generator().manual_seed(4)
    rows = [torch.randint(1, 300, (n,), generator=gen) for n in (5, 2, 3)]
    ids, mask = _left_pad(rows)
    cache = KVCache.for_model(ours, batch_size=3, max_len=16)
    nxt = torch.tensor([[7], [8], [9]])
    with torch.no_grad():
        ours(ids, attention_mask=mask, kv_cache=cache)
        keep = torch.tensor([0, 2])
        cache.select(keep)
        step = ours(nxt[keep], kv_cache=cache)[:, -1]
        full = ours(torch.cat([ids, nxt], 1)[keep],
                    attention_mask=torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1)[keep])
    assert (step - full[:, -1]).abs().max() <= ATOL


def test_activation_checkpointing_same_loss_grads_and_saves_less():
    ours = ours_from(hf_model("qwen3", head_dim=24)).train()
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(5))

    def run(enabled: bool) -> tuple[float, dict[str, torch.Tensor], int]:
        ours.set_activation_checkpointing(enabled)
        ours.zero_grad(set_to_none=True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t,
                                                      lambda t: t):
            logits = ours(ids)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 300),
                                                     ids[:, 1:].reshape(-1))
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in ours.named_parameters()}, sum(saved)

    loss0, grads0, saved0 = run(False)
    loss1, grads1, saved1 = run(True)
    assert loss0 == pytest.approx(loss1, abs=1e-7)
    assert grads0.keys() == grads1.keys()
    for name in grads0:
        assert torch.allclose(grads0[name], grads1[name], atol=1e-7, rtol=0), name
    assert saved1 < saved0 / 2  # the blocks' activations were not kept


def test_init_weights_deterministic_and_hf_like():
    cfg = DecoderConfig.from_hf_dict(Qwen2Config(**TINY, tie_word_embeddings=True).to_dict())

    def fresh(seed: int) -> DecoderLM:
        model = DecoderLM(cfg)
        model.init_weights(torch.Generator().manual_seed(seed))
        return model

    a, b, c = fresh(1), fresh(1), fresh(2)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if name.endswith("bias"):
            assert torch.count_nonzero(pa) == 0
        elif "norm" in name:
            assert torch.equal(pa, torch.ones_like(pa))
        else:
            assert not torch.equal(pa, pc), name
    emb = a.model.embed_tokens.weight
    assert emb.std().item() == pytest.approx(0.02, rel=0.05)
    assert a.lm_head.weight is emb


def test_config_round_trip():
    for d in (Qwen2Config(**TINY).to_dict(), Qwen3Config(**TINY, head_dim=24).to_dict(),
              LlamaConfig(**TINY, head_dim=24, mlp_bias=True).to_dict()):
        cfg = DecoderConfig.from_hf_dict(d)
        assert DecoderConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
