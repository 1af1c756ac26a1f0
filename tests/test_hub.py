"""minicd.model.hub: HF checkpoints in, transformers-loadable checkpoints out, clear refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_hf import TINY, perturbed_hf_model
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen3Config

from minicd import CheckpointError
from minicd.model.hub import (build_model, load_config, load_model, resolve_checkpoint,
                              save_model)
from minicd.model.hf_config import DecoderConfig

ATOL = 1e-5
IDS = torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(0))


def hf_checkpoint(path: Path, kind: str, tied: bool, seed: int = 0, **save_kw) -> torch.nn.Module:
    """Save a tiny random HF model (norms and biases moved off init) to ``path``."""
    extra = {"head_dim": 24} if kind == "qwen3" else {}
    if kind == "llama":  # tied: MHA; untied: GQA with an explicit head_dim
        extra = {"num_key_value_heads": 4} if tied else {"head_dim": 24}
    model = perturbed_hf_model(kind, tied, seed, eos_token_id=7, **extra)
    model.save_pretrained(path, **save_kw)
    return model


def hf_logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def our_logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS)


@pytest.mark.parametrize("kind,tied,shard", [("qwen2", True, None), ("qwen3", False, "40KB"),
                                             ("llama", True, None), ("llama", False, "40KB")])
def test_load_hf_checkpoint(tmp_path, kind, tied, shard):
    kw = {"max_shard_size": shard} if shard else {}
    hf = hf_checkpoint(tmp_path, kind, tied, **kw)
    assert (tmp_path / "model.safetensors.index.json").exists() == bool(shard)
    if not shard:  # HF omits the tied head
        assert ("lm_head.weight" in load_file(tmp_path / "model.safetensors")) == (not tied)
    ours = load_model(str(tmp_path))
    assert ours.config.rope_theta == 1000.0 and ours.config.eos_token_id == 7
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == tied
    assert all(p.dtype == torch.float32 and p.requires_grad for p in ours.parameters())
    assert (our_logits(ours) - hf_logits(hf)).abs().max() <= ATOL


@pytest.mark.parametrize("kind,tied", [("qwen2", True), ("qwen3", False), ("llama", True),
                                       ("llama", False)])
def test_saved_model_loads_in_transformers(tmp_path, kind, tied):
    hf_checkpoint(tmp_path / "src", kind, tied)
    ours = load_model(tmp_path / "src")
    out = save_model(ours, tmp_path / "out")
    tensors = load_file(out / "model.safetensors")
    assert ("lm_head.weight" in tensors) == (not tied)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [f"{kind.capitalize()}ForCausalLM"]
    assert config["torch_dtype"] == config["dtype"] == "float32"
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 7
    back = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(back).__name__ == f"{kind.capitalize()}ForCausalLM"
    assert back.config.tie_word_embeddings == tied
    assert (hf_logits(back) - our_logits(ours)).abs().max() <= ATOL


def test_sharded_save_round_trip(tmp_path):
    cfg = DecoderConfig.from_hf_dict(Qwen3Config(**TINY, head_dim=24).to_dict())
    model = build_model(cfg, seed=3)
    out = save_model(model, tmp_path / "ckpt", max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 2 and not (out / "model.safetensors").exists()
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    stored = {k: v for s in shards for k, v in load_file(s).items()}
    assert set(stored) == set(model.state_dict()) == set(index["weight_map"])
    back = load_model(out)
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert (hf_logits(hf) - our_logits(model)).abs().max() <= ATOL


def test_tied_checkpoint_that_includes_lm_head(tmp_path):
    hf = hf_checkpoint(tmp_path, "qwen2", tied=True)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ours = load_model(tmp_path)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    assert (our_logits(ours) - hf_logits(hf)).abs().max() <= ATOL


def _config_variants(base: dict) -> dict[str, dict]:
    hub = {k: v for k, v in base.items() if k not in ("rope_parameters", "dtype", "layer_types")}
    hub.update(rope_theta=1000.0, rope_scaling=None, torch_dtype="float32",
               use_sliding_window=False, sliding_window=32768, max_window_layers=28)
    new = {k: v for k, v in base.items() if k not in ("rope_theta", "torch_dtype")}
    new.update(rope_parameters={"rope_type": "default", "rope_theta": 1000.0}, dtype="float32",
               layer_types=["full_attention"] * 2, sliding_window=None)
    return {"hub": hub, "transformers5": new}


@pytest.mark.parametrize("style", ["hub", "transformers5"])
def test_both_config_styles(tmp_path, style):
    hf = hf_checkpoint(tmp_path, "qwen2", tied=False)
    base = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(_config_variants(base)[style]))
    cfg = load_config(tmp_path)
    assert (cfg.rope_theta, cfg.torch_dtype, cfg.head_dim) == (1000.0, "float32", 16)
    assert (our_logits(load_model(tmp_path)) - hf_logits(hf)).abs().max() <= ATOL


REFUSALS = {
    "rope_scaling": ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                       "original_max_position_embeddings": 32768}},
                     "rope_scaling"),
    "rope_parameters": ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6,
                                             "factor": 4.0}}, "rope_parameters.rope_type"),
    "sliding_flag": ({"use_sliding_window": True, "sliding_window": 4096}, "use_sliding_window"),
    "sliding_layers": ({"layer_types": ["full_attention", "sliding_attention"]},
                       "layer_types[1]"),
    "moe_type": ({"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"]},
                 "model_type"),
    "moe_keys": ({"num_experts": 8, "num_experts_per_tok": 2}, "num_experts"),
    "architecture": ({"architectures": ["MistralForCausalLM"], "model_type": "mistral"},
                     "architectures"),
    "architecture_mismatch": ({"architectures": ["LlamaForCausalLM"]}, "architectures"),
    "llama3_rope": ({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                     "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 8192}},
                    "rope_scaling"),
    "mlp_bias_not_llama": ({"mlp_bias": True}, "mlp_bias"),
    "model_type": ({"architectures": None, "model_type": "mistral"}, "model_type"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_unsupported_configs_are_refused(tmp_path, case):
    hf_checkpoint(tmp_path, "qwen3", tied=False)
    config = json.loads((tmp_path / "config.json").read_text())
    change, key = REFUSALS[case]
    config.update(change)
    if config["architectures"] is None:
        del config["architectures"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path)
    message = str(err.value)
    assert str(tmp_path / "config.json") in message and f"'{key}'" in message


def test_missing_checkpoint_dir(tmp_path):
    missing = tmp_path / "no_such_run"
    with pytest.raises(CheckpointError, match="missing checkpoint dir") as err:
        load_model(missing)
    assert str(missing) in str(err.value)


def test_mismatched_weights_are_listed(tmp_path):
    hf_checkpoint(tmp_path, "qwen3", tied=False)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_norm.weight"]
    tensors["model.layers.1.extra.weight"] = torch.zeros(2)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path)
    assert "model.layers.1.self_attn.k_norm.weight" in str(err.value)
    assert "model.layers.1.extra.weight" in str(err.value)


def test_dtype_options(tmp_path):
    hf_checkpoint(tmp_path / "src", "qwen3", tied=True)
    ours = load_model(tmp_path / "src", dtype="bfloat16")
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    save_model(load_model(tmp_path / "src"), tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert load_file(tmp_path / "bf16" / "model.safetensors")[
        "model.norm.weight"].dtype == torch.bfloat16
    auto = load_model(tmp_path / "bf16", dtype="auto")
    default = load_model(tmp_path / "bf16")  # CPU default: float32
    assert auto.dtype == torch.bfloat16 and default.dtype == torch.float32
    assert torch.equal(auto.model.norm.weight, ours.model.norm.weight)


def test_save_into_existing_dir_replaces_weights_only(tmp_path):
    cfg = DecoderConfig.from_hf_dict(Qwen2Config(**TINY).to_dict())
    out = tmp_path / "run"
    save_model(build_model(cfg, seed=0), out, max_shard_bytes=40_000)
    (out / "tokenizer.json").write_text("{}")
    model = build_model(cfg, seed=1)
    save_model(model, out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors",
                                                     "tokenizer.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no temp dirs left behind
    stored = load_file(out / "model.safetensors")
    assert torch.equal(stored["model.embed_tokens.weight"], model.model.embed_tokens.weight)


def test_build_model_is_seeded():
    cfg = DecoderConfig.from_hf_dict(Qwen3Config(**TINY, tie_word_embeddings=True).to_dict())
    a, b, c = build_model(cfg, seed=0), build_model(cfg, seed=0), build_model(cfg, seed=1)
    assert a.lm_head.weight is a.model.embed_tokens.weight
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.model.layers[0].mlp.up_proj.weight,
                           c.model.layers[0].mlp.up_proj.weight)


def _fake_hub_cache(cache: Path, repo: str, source: Path) -> Path:
    folder = cache / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snap = folder / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in source.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    return snap


def test_resolve_repo_id_from_offline_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    hf_checkpoint(tmp_path / "src", "qwen2", tied=True)
    snap = _fake_hub_cache(tmp_path / "cache", "acme/tiny-qwen", tmp_path / "src")
    assert resolve_checkpoint("acme/tiny-qwen", cache_dir=tmp_path / "cache") == snap
    with pytest.raises(CheckpointError) as err:
        resolve_checkpoint("acme/not-cached", cache_dir=tmp_path / "cache")
    message = str(err.value)
    assert "acme/not-cached" in message and "HF_HUB_OFFLINE=0" in message  # the hub's reason
    assert "local checkpoint directory" in message


def test_hub_load_tokenizer_resolves_local_dirs(tmp_path):
    from minicd.model.hub import load_tokenizer
    from minicd.model.tokenizer import train_bpe_tokenizer

    texts = ["discharge diagnosis: hypertension", "brief hospital course: stable"] * 20
    trained = train_bpe_tokenizer(texts, 300, tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    assert tok.template == "chatml"
    assert tok.encode("hypertension stable") == trained.encode("hypertension stable")
    assert tok.stop_ids[0] == tok.token_to_id("<|im_end|>")
    with pytest.raises(CheckpointError):
        load_tokenizer(tmp_path / "missing")


def test_config_defaults_follow_model_type_and_save_faithfully(tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = DecoderConfig(model_type="qwen3", vocab_size=300, hidden_size=64, intermediate_size=128,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    assert cfg.qk_norm is True and cfg.attention_bias is False
    q2 = cfg.replace(model_type="qwen2", qk_norm=None, attention_bias=None)
    assert q2.qk_norm is False and q2.attention_bias is True
    with pytest.raises(ValueError, match="qk_norm"):
        cfg.replace(qk_norm=False)
    model = build_model(cfg, seed=3)
    with torch.no_grad():  # move the q/k norms off their init so a dropped norm would show
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.mul_(1.7)
    save_model(model, tmp_path / "m")
    hf, info = AutoModelForCausalLM.from_pretrained(tmp_path / "m", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        torch.testing.assert_close(hf(IDS).logits, model(IDS), rtol=0, atol=ATOL)
