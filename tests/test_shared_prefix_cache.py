"""minicd.model.shared_prefix_cache against the reference it replaces: an ordinary KVCache in
which every row holds its own copy of its prompt's prefix, attended with SDPA."""

from __future__ import annotations

import pytest
import torch

from minicd.model.decoder import DecoderConfig, KVCache, attention_mask_for
from minicd.model.shared_prefix_cache import SharedPrefixKVCache

LAYERS, KV, HD = 2, 2, 8


def config(kv: int) -> DecoderConfig:
    return DecoderConfig(model_type="qwen3", vocab_size=16, hidden_size=32, intermediate_size=32,
                         num_hidden_layers=LAYERS, num_attention_heads=6, num_key_value_heads=kv,
                         head_dim=HD)


def prefilled(cfg: DecoderConfig, lengths: list[int], gen: torch.Generator,
              dtype: torch.dtype) -> KVCache:
    """A KVCache holding a left-padded prefill of random keys/values for prompts of
    ``lengths``; pad slots hold large garbage (they must be masked, not merely small)."""
    u, w = len(lengths), max(lengths)
    valid = torch.zeros(u, w, dtype=torch.bool)  # [U, W]
    for r, n in enumerate(lengths):
        valid[r, w - n:] = True
    cache = KVCache(cfg, u, w, dtype=dtype)
    cache.begin(valid)
    for layer in range(LAYERS):
        shape = (u, cfg.num_key_value_heads, w, HD)
        k, v = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
        k[~valid[:, None, :].expand(shape[:3])] = 50.0
        v[~valid[:, None, :].expand(shape[:3])] = -50.0
        cache.update(layer, k.to(dtype), v.to(dtype))
    cache.commit()
    return cache


@pytest.mark.parametrize("kv,dtype,tol", [(2, torch.float32, 1e-5), (6, torch.float32, 1e-5),
                                          (2, torch.bfloat16, 3e-2)])
@torch.no_grad()
def test_decode_attention_equals_per_row_copies_with_sdpa(kv, dtype, tol):
    """Group size 3 (6 heads over 2 KV heads) and 1 (MHA); prompts of unequal lengths (left
    padding); unequal numbers of rows per prompt; several decode steps; rows dropped mid-way,
    including every row of one prompt. Each step's output equals SDPA over a per-row copy of
    the prefix plus the row's generated keys, with the boolean padding mask."""
    cfg, gen = config(kv), torch.Generator().manual_seed(0)
    heads = cfg.num_attention_heads
    lengths = [7, 3, 5, 1]
    owner = [0, 0, 0, 1, 2, 2, 3, 3, 3, 3]  # rows per prompt: 3, 1, 2, 4
    prefill = prefilled(cfg, lengths, gen, dtype)
    shared = SharedPrefixKVCache(prefill, owner, max_new=8)
    assert shared.prefix_keys[0].data_ptr() == prefill.keys[0].data_ptr()  # no copy
    ref = prefilled(cfg, lengths, torch.Generator().manual_seed(0), dtype)  # the same numbers
    ref.select(torch.tensor(owner))  # every row its own copy of its prompt's prefix
    w = max(lengths)
    assert torch.equal(shared.seen_tokens(), torch.tensor([lengths[o] for o in owner]))
    b = len(owner)
    for step in range(6):
        if step == 3:  # drop rows: prompt 1 (its only row 3) and rows 0, 5, 8
            keep = [1, 2, 4, 6, 7, 9]
            shared.select(keep)
            ref.select(torch.tensor(keep))
            b = len(keep)
            assert shared.prefix_keys[0].shape[0] == 3  # the rowless prompt is gone
            assert torch.equal(shared.seen_tokens(),
                               torch.tensor([lengths[owner[r]] + 3 for r in keep]))
        q = torch.randn(b, heads, 1, HD, generator=gen).to(dtype)
        k = torch.randn(b, kv, 1, HD, generator=gen).to(dtype)
        v = torch.randn(b, kv, 1, HD, generator=gen).to(dtype)
        ones = torch.ones(b, 1, dtype=torch.bool)
        assert shared.begin(ones) is None
        mask = attention_mask_for(ref.begin(ones), w + step, 1)  # [B, 1, 1, W + step + 1]
        for layer in range(LAYERS):
            q_l, k_l, v_l = q + layer, k - layer, v * (layer + 1)  # layers differ
            got = shared.attend(layer, q_l, k_l, v_l, None)  # [B, heads, 1, hd]
            expected = ref.attend(layer, q_l, k_l, v_l, mask)
            assert got.shape == expected.shape == (b, heads, 1, HD)
            assert got.dtype == dtype
            err = (got.float() - expected.float()).abs().max().item()
            assert err <= tol, (step, layer, err)
        shared.commit()
        ref.commit()
        assert shared.length == ref.length == w + step + 1


def test_shared_cache_rejects_multi_token_forwards_and_rowless_prompts():
    cfg = config(2)
    prefill = prefilled(cfg, [3, 2], torch.Generator().manual_seed(0), torch.float32)
    with pytest.raises(ValueError, match="needs >= 1 row"):
        SharedPrefixKVCache(prefill, [0, 0], max_new=4)
    shared = SharedPrefixKVCache(prefill, [0, 1, 1], max_new=1)
    with pytest.raises(ValueError, match="one token for each of its 3 rows"):
        shared.begin(torch.ones(3, 2, dtype=torch.bool))
    shared.begin(torch.ones(3, 1, dtype=torch.bool))
    shared.commit()
    with pytest.raises(ValueError, match="full"):
        shared.begin(torch.ones(3, 1, dtype=torch.bool))
