"""minicd.rollout.torch_engine against independent references: a full-forward argmax loop,
transformers' generate, the chunked log-prob function, and hand-computed distributions."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from scipy.stats import chisquare

from minicd.algo.logprobs import model_token_logprobs
from minicd.errors import ConfigError, DataError
from minicd.model.decoder import DecoderConfig, DecoderLM
from minicd.model.hub import build_model, save_model
from minicd.model.lora import LoRAConfig, inject_lora, lora_modules
from minicd.model.tokenizer import train_bpe_tokenizer
from minicd.rollout.engine import Generation, RolloutEngine, SamplingParams
from minicd.rollout.torch_engine import TorchEngine, top_p_filter

VOCAB = 128
PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12], [3, 40, 77, 1]]


def tiny_model(vocab: int = VOCAB, seed: int = 0) -> DecoderLM:
    """Tiny random Qwen3; initializer_range 0.2 makes next-token distributions peaked enough
    that greedy margins are large and temperature visibly changes them."""
    cfg = DecoderConfig(model_type="qwen3", vocab_size=vocab, hidden_size=64, intermediate_size=128,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=16, qk_norm=True, initializer_range=0.2, rope_theta=10000.0)
    return build_model(cfg, seed=seed)


def greedy(n_new: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_new_tokens=n_new, **kw)


@torch.no_grad()
def reference_greedy(model, prompt, n_new, stop_ids=()):
    """Full forward on the growing sequence of one prompt alone; argmax; raw log-probs."""
    seq, tokens, logps = list(prompt), [], []
    for _ in range(n_new):
        logits = model(torch.tensor([seq]))[0, -1].float()
        tok = int(logits.argmax())
        tokens.append(tok)
        logps.append(torch.log_softmax(logits, -1)[tok].item())
        seq.append(tok)
        if tok in stop_ids:
            break
    return tokens, logps


@torch.no_grad()
def next_token_probs(model, prompt, temperature=1.0):
    return torch.softmax(model(torch.tensor([prompt]))[0, -1].double() / temperature, -1)


def first_token_counts(engine, prompt, params) -> torch.Tensor:
    gens = engine.generate([prompt], params)[0]
    return torch.bincount(torch.tensor([g.token_ids[0] for g in gens]), minlength=VOCAB).double()


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Chi-square goodness of fit, tokens with expected count < 5 pooled into one bin."""
    expected = probs * counts.sum()
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    return float(chisquare(obs.numpy(), exp.numpy()).pvalue)


def test_greedy_batched_matches_reference_loop_and_logprobs():
    model = tiny_model()
    engine = TorchEngine(model)
    assert isinstance(engine, RolloutEngine)
    out = engine.generate(PROMPTS, greedy(12, return_logprobs=True))
    assert len(out) == len(PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        (gen,) = out[i]
        ref_tokens, ref_logps = reference_greedy(model, prompt, 12)
        assert gen.token_ids == ref_tokens
        assert gen.finish_reason == "length" and gen.text == ""
        assert torch.allclose(torch.tensor(gen.logprobs), torch.tensor(ref_logps), atol=1e-5)
        with torch.no_grad():
            full = torch.tensor([prompt + gen.token_ids])
            trainer = model_token_logprobs(model, full, last_n=12)[0]
        assert torch.allclose(torch.tensor(gen.logprobs), trainer, atol=1e-5)
    assert len({tuple(o[0].token_ids) for o in out}) == len(PROMPTS)  # not degenerate


def test_greedy_matches_transformers_generate(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model()
    save_model(model, tmp_path / "ckpt")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32,
                                              attn_implementation="eager").eval()
    prompts = PROMPTS[:2]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        expected = hf.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                               pad_token_id=0)[:, width:]
    out = TorchEngine(model).generate(prompts, greedy(10))
    assert [o[0].token_ids for o in out] == expected.tolist()


def test_stop_ids_finish_reason_and_text(tmp_path):
    texts = [f"patient {i} has code {i % 17}.{i % 7} and note {i * 31 % 97}" for i in range(300)]
    tok = train_bpe_tokenizer(texts, 300, tmp_path / "tok")
    model = tiny_model(vocab=tok.vocab_size, seed=1)
    engine = TorchEngine(model, tok)
    prompt = tok.encode("patient 12 has code")
    free = engine.generate([prompt], greedy(8))[0][0].token_ids
    # A stop id that the model really emits: the first token not seen before, from step 2 on.
    k = next(j for j in range(2, 8) if free[j] not in free[:j])
    stop = free[k]
    assert tok.decode([stop]) != ""  # dropping it from the text is observable
    other = next(p for p in (tok.encode(t) for t in texts) if stop not in
                 reference_greedy(model, p, 8)[0])
    out = engine.generate([prompt, other], greedy(8, stop_ids=(stop,)))
    stopped, unstopped = out[0][0], out[1][0]
    assert stopped.token_ids == free[: k + 1]  # includes the stop token
    assert stopped.finish_reason == "stop"
    assert stopped.text == tok.decode(free[:k])
    assert unstopped.finish_reason == "length" and len(unstopped.token_ids) == 8
    assert unstopped.text == tok.decode(unstopped.token_ids)
    # Stop token generated exactly at the budget still counts as "stop".
    edge = engine.generate([prompt], greedy(k + 1, stop_ids=(stop,)))[0][0]
    assert edge.finish_reason == "stop" and edge.token_ids == free[: k + 1]
    short = engine.generate([prompt], greedy(k, stop_ids=(stop,)))[0][0]
    assert short.finish_reason == "length" and short.token_ids == free[:k]


def test_seeded_sampling_reproducible_and_global_rng_untouched():
    engine = TorchEngine(tiny_model())
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=10, seed=1)

    def tokens(p):
        return [[g.token_ids for g in row] for row in engine.generate(PROMPTS, p)]

    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = tokens(params)
    assert torch.equal(torch.get_rng_state(), state)
    tokens(SamplingParams(temperature=1.0, max_new_tokens=5, seed=None))
    assert torch.equal(torch.get_rng_state(), state)
    assert tokens(params) == first
    torch.manual_seed(999)  # the global RNG plays no part
    assert tokens(params) == first
    assert tokens(SamplingParams(n=4, temperature=1.0, max_new_tokens=10, seed=2)) != first


def test_first_token_distribution_matches_softmax():
    model = tiny_model()
    engine = TorchEngine(model, max_batch_size=4000)
    prompt = PROMPTS[0]
    p1, p_half = next_token_probs(model, prompt), next_token_probs(model, prompt, 0.5)
    counts = first_token_counts(engine, prompt, SamplingParams(n=4000, max_new_tokens=1, seed=0))
    assert chi2_pvalue(counts, p1) > 1e-3
    assert chi2_pvalue(counts, p_half) < 1e-6  # the test can tell the two apart
    cold = first_token_counts(engine, prompt, SamplingParams(n=4000, temperature=0.5,
                                                             max_new_tokens=1, seed=0))
    assert chi2_pvalue(cold, p_half) > 1e-3
    assert chi2_pvalue(cold, p1) < 1e-6
    assert cold.max() > counts.max()  # lower temperature concentrates on the top token


def test_top_p_keeps_smallest_nucleus():
    model = tiny_model()
    engine = TorchEngine(model, max_batch_size=4000)
    prompt = PROMPTS[0]
    probs = next_token_probs(model, prompt)
    top, order = probs.sort(descending=True)
    assert top[1] > top[2]  # two tokens survive, deterministically
    top_p = float(top[0] + 0.5 * top[1])  # needs the top two tokens, not a third
    counts = first_token_counts(engine, prompt, SamplingParams(n=4000, top_p=top_p,
                                                               max_new_tokens=1, seed=3))
    assert set(counts.nonzero().flatten().tolist()) == set(order[:2].tolist())
    share = counts[order[0]] / 4000
    expected = top[0] / (top[0] + top[1])
    assert abs(share - expected) < 4 * (expected * (1 - expected) / 4000) ** 0.5
    # top_p below every top probability: only the argmax survives, i.e. greedy.
    sampled = engine.generate(PROMPTS, SamplingParams(n=2, top_p=1e-4, max_new_tokens=10,
                                                      seed=5))
    greedy_out = engine.generate(PROMPTS, greedy(10))
    for row, ref in zip(sampled, greedy_out):
        assert [g.token_ids for g in row] == [ref[0].token_ids] * 2


def test_top_p_filter_by_hand():
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    assert torch.allclose(top_p_filter(probs, 0.4), torch.tensor([[0.0, 1.0, 0.0, 0.0]]))
    assert torch.allclose(top_p_filter(probs, 0.7), torch.tensor([[0.0, 0.625, 0.0, 0.375]]))
    assert torch.allclose(top_p_filter(probs, 0.85),
                          torch.tensor([[0.15, 0.5, 0.0, 0.3]]) / 0.95)
    assert torch.equal(top_p_filter(probs, 1.0), probs)


def test_n_samples_order_and_chunking_equal_one_batch():
    model = tiny_model()
    stop = reference_greedy(model, PROMPTS[1], 6)[0][3]  # rows then finish at different steps
    params = greedy(9, n=3, stop_ids=(stop,), return_logprobs=True)
    big = TorchEngine(model, max_batch_size=64).generate(PROMPTS, params)
    small = TorchEngine(model, max_batch_size=2).generate(PROMPTS, params)
    assert {g.finish_reason for row in big for g in row} == {"stop", "length"}
    for i, (row_big, row_small) in enumerate(zip(big, small)):
        assert [(g.prompt_index, g.sample_index) for g in row_big] == [(i, 0), (i, 1), (i, 2)]
        assert [(g.prompt_index, g.sample_index) for g in row_small] == [(i, 0), (i, 1), (i, 2)]
        ref, _ = reference_greedy(model, PROMPTS[i], 9, stop_ids=(stop,))
        for a, b in zip(row_big, row_small):
            assert a.token_ids == b.token_ids == ref
            assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5)
    sampled = TorchEngine(model).generate(PROMPTS, SamplingParams(n=5, max_new_tokens=8, seed=0))
    for i, row in enumerate(sampled):
        assert [(g.prompt_index, g.sample_index) for g in row] == [(i, s) for s in range(5)]
        assert all(isinstance(g, Generation) and len(g.token_ids) == 8 for g in row)
        assert len({tuple(g.token_ids) for g in row}) > 1


def test_lora_live_weights_and_weight_version():
    model = tiny_model()
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules="all-linear"),
                generator=torch.Generator().manual_seed(0))
    engine = TorchEngine(model)
    before = engine.generate(PROMPTS, greedy(10))
    for i, p in enumerate(PROMPTS):  # lora_B = 0: the base model's outputs
        assert before[i][0].token_ids == reference_greedy(model, p, 10)[0]
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lora_modules(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen))
    after = engine.generate(PROMPTS, greedy(10))  # no sync: the engine reads live weights
    assert [o[0].token_ids for o in after] != [o[0].token_ids for o in before]
    for i, p in enumerate(PROMPTS):
        assert after[i][0].token_ids == reference_greedy(model, p, 10)[0]
    v0 = engine.weight_version
    assert engine.sync_policy(model) == v0 + 1 == engine.weight_version
    assert engine.sync_policy(model) == v0 + 2 == engine.weight_version


def test_eval_mode_during_generation_and_restored():
    model = tiny_model().train()
    model.model.layers[1].eval()  # mixed modes are restored module by module
    seen = []
    model.model.layers[0].register_forward_hook(lambda m, i, o: seen.append(m.training))
    out = TorchEngine(model).generate(PROMPTS[:1], greedy(3), progress=True)
    assert out[0][0].token_ids == reference_greedy(model.eval(), PROMPTS[0], 3)[0]
    model.train()
    model.model.layers[1].eval()
    seen.clear()
    TorchEngine(model).generate(PROMPTS[:1], greedy(3))
    assert seen and not any(seen)
    assert model.training and model.model.layers[0].training
    assert not model.model.layers[1].training
    assert torch.is_grad_enabled()


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ConfigError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ConfigError, match="temperature"):
        SamplingParams(temperature=-1.0)
    with pytest.raises(ConfigError, match="n must"):
        SamplingParams(n=0)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)
    with pytest.raises(DataError, match="prompt 1 is empty"):
        TorchEngine(tiny_model()).generate([[1, 2], []], greedy(2))


def test_sampled_logprobs_are_raw_model_logprobs():
    """With temperature and top-p the returned log-probs stay those of the untempered model."""
    model = tiny_model()
    stop = reference_greedy(model, PROMPTS[0], 4)[0][1]
    params = SamplingParams(n=3, temperature=0.7, top_p=0.9, max_new_tokens=8, seed=4,
                            stop_ids=(stop,), return_logprobs=True)
    for prompt, row in zip(PROMPTS, TorchEngine(model).generate(PROMPTS, params)):
        for g in row:
            assert len(g.logprobs) == len(g.token_ids)
            with torch.no_grad():
                full = torch.tensor([prompt + g.token_ids])
                expected = model_token_logprobs(model, full, last_n=len(g.token_ids))[0]
            assert torch.allclose(torch.tensor(g.logprobs), expected, atol=1e-5)


def test_decode_reads_shared_prefix_without_copies_and_finished_rows_compact_rarely(
        monkeypatch):
    """Decoding runs on a SharedPrefixKVCache built from the prefill cache: its prefix tensors
    ARE the prefill's (no per-sample copy), no decode step goes through SDPA, and an unpadded
    batch needs no padding bias; rows that finish stay in the cache until a quarter of them are
    done, so the cache is compacted far less often than rows finish."""
    import torch.nn.functional as F

    from minicd.model import decoder, shared_prefix_cache
    from minicd.rollout import torch_engine

    model = tiny_model()
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12], [3, 40, 77, 1]]
    sdpa_queries, caches = [], []
    real_sdpa = F.scaled_dot_product_attention
    real_init = shared_prefix_cache.SharedPrefixKVCache.__init__

    def spy_sdpa(q, k, v, attn_mask=None, **kw):
        sdpa_queries.append(q.shape[2])
        return real_sdpa(q, k, v, attn_mask=attn_mask, **kw)

    def spy_init(self, prefix, owner, max_new):
        real_init(self, prefix, owner, max_new)
        caches.append((self, [k.data_ptr() for k in prefix.keys], list(owner)))

    monkeypatch.setattr(decoder.F, "scaled_dot_product_attention", spy_sdpa)
    monkeypatch.setattr(shared_prefix_cache.SharedPrefixKVCache, "__init__", spy_init)
    out = TorchEngine(model).generate(prompts, greedy(6, n=2))
    assert sdpa_queries == [4, 4]  # the prefill (2 layers); the 5 decode steps: no SDPA
    for p, row in zip(prompts, out):
        assert [g.token_ids for g in row] == [reference_greedy(model, p, 6)[0]] * 2
    ((cache, prefill_ptrs, owner),) = caches
    assert owner == [0, 0, 1, 1, 2, 2]
    assert [k.data_ptr() for k in cache.prefix_keys] == prefill_ptrs  # read in place
    assert cache.prefix_keys[0].shape[0] == 3 and cache.prefix_bias is None
    caches.clear()
    TorchEngine(model).generate(PROMPTS, greedy(3))  # unequal lengths: padded, masked
    assert caches[0][0].prefix_bias is not None
    monkeypatch.setattr(decoder.F, "scaled_dot_product_attention", real_sdpa)

    # 16 rows finishing one by one (each sample stops at a different step): few compactions
    stops = reference_greedy(model, PROMPTS[0], 9)[0]
    selects = []
    real_select = shared_prefix_cache.SharedPrefixKVCache.select
    monkeypatch.setattr(shared_prefix_cache.SharedPrefixKVCache, "select",
                        lambda self, rows: (selects.append(len(rows)), real_select(self, rows)))
    params = SamplingParams(n=16, temperature=1.0, max_new_tokens=9, seed=0,
                            stop_ids=tuple(set(stops)))
    gens = TorchEngine(model).generate([PROMPTS[0]], params)[0]
    finish_steps = {len(g.token_ids) for g in gens if g.finish_reason == "stop"}
    assert len(finish_steps) >= 3  # rows finished at several different steps
    assert selects and all(n <= 0.75 * 16 for n in selects[:1])
    assert len(selects) < len(finish_steps)
    assert torch_engine.COMPACT_AT == 0.75


def test_sample_next_inverse_cdf_by_hand():
    """Inverse-CDF draws: zero-probability tokens never come out, frequencies follow the
    probabilities (3 tokens: 0.5 / 0 / 0.5 -> about half each), and a seed fixes the draws."""
    from minicd.rollout.torch_engine import sample_next

    logits = torch.log(torch.tensor([[0.5, 0.0, 0.5, 0.0]])).expand(20000, 4).contiguous()
    draws = sample_next(logits, 1.0, 1.0, torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=4)
    assert counts[1] == counts[3] == 0
    assert abs(counts[0].item() / 20000 - 0.5) < 4 * (0.25 / 20000) ** 0.5
    again = sample_next(logits, 1.0, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)
    one = torch.tensor([[-1e9, 3.0, -1e9]])  # a single possible token
    assert sample_next(one, 0.7, 1.0, torch.Generator().manual_seed(1)).tolist() == [1]


def test_seeded_rows_do_not_depend_on_the_other_prompts_or_batching(monkeypatch):
    """Seeded sampling: each (prompt, sample) row draws from its own generator, so a prompt's
    samples are the same alone, among other prompts (in another position, with ``seeds``), and
    whatever ``max_batch_size`` and whenever finished rows are compacted out of the cache."""
    from minicd.model import shared_prefix_cache

    model = tiny_model()
    a, b, c = PROMPTS
    stops = tuple(set(reference_greedy(model, a, 9)[0][1:5]))  # rows finish at various steps
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=9, seed=7, stop_ids=stops)
    selects = []
    real_select = shared_prefix_cache.SharedPrefixKVCache.select
    monkeypatch.setattr(shared_prefix_cache.SharedPrefixKVCache, "select",
                        lambda self, rows: (selects.append(len(rows)), real_select(self, rows)))

    def tokens(engine, prompts, p):
        return [[g.token_ids for g in row] for row in engine.generate(prompts, p)]

    gens = TorchEngine(model, max_batch_size=64).generate([a, b, c], params)  # seeds 7, 11, 15
    base = [[g.token_ids for g in row] for row in gens]
    lengths = {len(g.token_ids) for row in gens for g in row if g.finish_reason == "stop"}
    assert len(lengths) >= 2 and {g.finish_reason for row in gens for g in row} == {
        "stop", "length"}  # rows finished at different steps ...
    assert any(n < 12 for n in selects)  # ... and the cache was compacted mid-decode
    assert len({tuple(t) for row in base for t in row}) > 6  # a real sampled stream
    assert len({tuple(t) for t in base[0]}) > 1  # a prompt's samples differ

    for size in (1, 3, 5, 64):  # 3 and 5 split a prompt's samples over two batches
        assert tokens(TorchEngine(model, max_batch_size=size), [a, b, c], params) == base
        alone = tokens(TorchEngine(model, max_batch_size=size), [a], params)
        assert alone == base[:1]
        swapped = dataclasses.replace(params, seed=None, seeds=(15, 7))
        assert tokens(TorchEngine(model, max_batch_size=size), [c, a], swapped) == [base[2],
                                                                                    base[0]]
    moved = dataclasses.replace(params, seed=None, seeds=(11, 15, 7))
    assert tokens(TorchEngine(model), [b, c, a], moved) == [base[1], base[2], base[0]]
    other = dataclasses.replace(params, seed=None, seeds=(7, 99, 15))  # only B's seed differs
    changed = tokens(TorchEngine(model), [a, b, c], other)
    assert changed[0] == base[0] and changed[2] == base[2] and changed[1] != base[1]


@torch.no_grad()
def test_seeded_tokens_by_hand_from_row_seed():
    """Row (i, s) of a seeded call samples its t-th token with the t-th draw of
    ``torch.Generator().manual_seed(prompt_seed_i + s)`` (prompt seed ``seed + i * n``):
    softmax(logits / T), top-p filter, cumulative sum, ``torch.rand(1) * total``, searchsorted."""
    model = tiny_model()
    temperature, top_p, seed, n = 0.8, 0.9, 7, 4
    params = SamplingParams(n=n, temperature=temperature, top_p=top_p, max_new_tokens=2,
                            seed=seed)
    out = TorchEngine(model).generate(PROMPTS, params)

    def by_hand(prompt, generator):
        probs = torch.softmax(model(torch.tensor([prompt]))[0, -1].float() / temperature, -1)
        sorted_p, order = probs.sort(descending=True)
        keep = (sorted_p.cumsum(0) - sorted_p) < top_p  # mass strictly before < top_p
        filtered = torch.zeros_like(probs)
        filtered[order[keep]] = probs[order[keep]]
        cdf = filtered.cumsum(0)
        u = torch.rand(1, generator=generator) * cdf[-1]
        return int(torch.searchsorted(cdf, u, right=True).clamp_max(len(cdf) - 1))

    expected = {}
    for i, s in [(0, 0), (0, 3), (1, 2), (2, 1), (2, 3)]:
        g = torch.Generator().manual_seed(seed + i * n + s)
        first = by_hand(PROMPTS[i], g)
        second = by_hand(PROMPTS[i] + [first], g)  # the row's stream, one draw per token
        expected[i, s] = [first, second]
        assert out[i][s].token_ids == expected[i, s]
    assert len({t[0] for t in expected.values()}) > 1  # the seeds matter


def test_sample_next_with_given_uniforms():
    """``u``: one uniform per row, mapped through the row's CDF; a wrong shape is an error."""
    from minicd.rollout.torch_engine import row_uniform_table, sample_next

    logits = torch.log(torch.tensor([[0.5, 0.0, 0.5, 0.0]])).expand(4, 4).contiguous()
    u = torch.tensor([0.0, 0.25, 0.5, 0.999])  # CDF 0.5, 0.5, 1, 1
    assert sample_next(logits, 1.0, 1.0, u=u).tolist() == [0, 0, 2, 2]
    with pytest.raises(ValueError, match="u has shape"):
        sample_next(logits, 1.0, 1.0, u=u[:3])
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    table = row_uniform_table(gens, 20)  # [2, 20]: row r = the first 20 draws of generator r
    for r, seed in enumerate((3, 4)):
        one_by_one = torch.Generator().manual_seed(seed)
        assert table[r].tolist() == [torch.rand(1, generator=one_by_one).item()
                                     for _ in range(20)]


@torch.no_grad()
def reference_rows(model, prompts, params):
    """The tokens of each (prompt, sample) row computed alone by full forwards on the growing
    sequence (no cache, no batching): argmax when greedy, else the row's own generator seeded
    ``seed + i * n + s`` drawing ``torch.rand(1)`` per token into ``sample_next``."""
    from minicd.rollout.torch_engine import sample_next

    out = []
    for i, prompt in enumerate(prompts):
        row = []
        for s in range(params.n):
            g = None if params.greedy else torch.Generator().manual_seed(
                params.seed + i * params.n + s)
            seq, toks = list(prompt), []
            for _ in range(params.max_new_tokens):
                logits = model(torch.tensor([seq]))[0, -1:].float()  # [1, V]
                if g is None:
                    tok = int(logits.argmax())
                else:
                    tok = int(sample_next(logits, params.temperature, params.top_p,
                                          u=torch.rand(1, generator=g))[0])
                toks.append(tok)
                seq.append(tok)
                if tok in params.stop_ids:
                    break
            row.append(toks)
        out.append(row)
    return out


@pytest.mark.parametrize("arch", ["qwen3-gqa", "llama-mha"])
def test_shared_prefix_decode_equals_unbatched_reference(arch):
    """Several prompts of different lengths (left padding), n > 1, stop ids that finish rows at
    different steps (so the cache is compacted mid-decode and prompts lose rows unequally):
    greedy and seeded-sampled tokens equal the unbatched, uncached reference row by row."""
    if arch == "qwen3-gqa":
        model = tiny_model()
    else:
        cfg = DecoderConfig(model_type="llama", vocab_size=VOCAB, hidden_size=48,
                            intermediate_size=96, num_hidden_layers=2, num_attention_heads=3,
                            num_key_value_heads=3, head_dim=16, initializer_range=0.2,
                            rope_theta=10000.0)
        model = build_model(cfg, seed=3)
    prompts = PROMPTS + [[9, 8, 7, 6, 5, 4, 3, 2, 90, 91]]
    free = reference_rows(model, prompts, greedy(10))
    stops = tuple({row[0][k] for row, k in zip(free, (2, 5, 8, 3))} - {free[3][0][0]})
    for params in (greedy(10, n=3, stop_ids=stops),
                   SamplingParams(n=5, temperature=1.0, top_p=0.95, max_new_tokens=10, seed=3,
                                  stop_ids=stops)):
        got = [[g.token_ids for g in row] for row in TorchEngine(model).generate(prompts, params)]
        assert got == reference_rows(model, prompts, params)
        stopped = {len(t) for row in got for t in row if t[-1] in stops}
        assert len(stopped) >= 2  # rows finished at different steps
