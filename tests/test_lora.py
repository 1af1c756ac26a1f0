"""Tests for minicd.model.lora against transformers + peft (the on-disk format is PEFT's)."""

from __future__ import annotations

import json
import math
import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from minicd.errors import CheckpointError, ConfigError
from minicd.model import lora as L

VOCAB, HIDDEN, INTER, LAYERS = 300, 64, 128, 2
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _hf_classes(kind: str):
    from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                              Qwen3Config, Qwen3ForCausalLM)

    return {"qwen3": (Qwen3Config, Qwen3ForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
            "llama": (LlamaConfig, LlamaForCausalLM)}[kind]


def _hf_config(kind: str, hidden: int = HIDDEN):
    cfg_cls, _ = _hf_classes(kind)
    extra = {"head_dim": 16} if kind == "qwen3" else {}
    return cfg_cls(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=INTER,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=(kind != "qwen3"),  # cover tied and untied heads
        **extra,
    )


def _hf_model(kind: str, seed: int = 0, hidden: int = HIDDEN) -> nn.Module:
    _, model_cls = _hf_classes(kind)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = model_cls(_hf_config(kind, hidden))
        if kind == "qwen2":  # random (not zero) q/k/v biases so the bias path is exercised
            for name, p in model.named_parameters():
                if name.endswith("_proj.bias"):
                    p.data.normal_(0, 0.1)
    return model.eval()


@pytest.fixture(scope="module", params=["qwen3", "qwen2", "llama"])
def ckpt(request, tmp_path_factory):
    """(kind, dir) of a tiny random checkpoint saved by transformers."""
    path = tmp_path_factory.mktemp(f"base_{request.param}")
    _hf_model(request.param).save_pretrained(path)
    return request.param, str(path)


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("base_qwen3_shared")
    _hf_model("qwen3").save_pretrained(path)
    return str(path)


def _minicd(path: str) -> nn.Module:
    from minicd.model.hub import load_model

    return load_model(path, dtype=torch.float32).eval()


def _hf_from(kind: str, path: str) -> nn.Module:
    _, model_cls = _hf_classes(kind)
    return model_cls.from_pretrained(path, dtype=torch.float32).eval()


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out


IDS = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(7))  # [B, T]


def _randomize_b(model: nn.Module, seed: int = 3, std: float = 0.05) -> None:
    """Nonzero lora_B so the adapter changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in L.lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * std)


def _adapted(path: str, cfg: L.LoRAConfig | None = None, seed: int = 1) -> nn.Module:
    model = _minicd(path)
    L.inject_lora(model, cfg or L.LoRAConfig(), generator=torch.Generator().manual_seed(seed))
    _randomize_b(model)
    return model


def _peft_adapter(kind: str, path: str, out: str, **lora_kwargs) -> torch.Tensor:
    """Write an adapter with peft itself (random A and B); return the peft model's logits."""
    from peft import LoraConfig, get_peft_model

    kw = {"r": 8, "lora_alpha": 16, "target_modules": list(ALL)} | lora_kwargs
    with torch.random.fork_rng():
        torch.manual_seed(11)
        peft_model = get_peft_model(
            _hf_from(kind, path), LoraConfig(init_lora_weights=False, task_type="CAUSAL_LM", **kw)
        )
    peft_model.eval()
    peft_model.save_pretrained(out)
    return _logits(peft_model, IDS)


# ----------------------------------------------------------------------------- PEFT interop


# Qwen3, Llama: the paper's defaults; Qwen2: rank-stabilised scaling alpha / sqrt(r) on a subset.
SAVE_CFGS = {
    "qwen3": L.LoRAConfig(),
    "qwen2": L.LoRAConfig(r=4, alpha=12, use_rslora=True, target_modules=("q_proj", "down_proj")),
    "llama": L.LoRAConfig(r=8, alpha=16),
}


def test_minicd_adapter_loads_into_peft(ckpt, tmp_path):
    from peft import PeftModel

    kind, path = ckpt
    lcfg = SAVE_CFGS[kind]
    base = _logits(_minicd(path), IDS)
    model = _adapted(path, lcfg)
    ours = _logits(model, IDS)
    assert (ours - base).abs().max() > 1e-3  # the adapter matters
    L.save_adapter(model, tmp_path / "ad", lcfg, base_model_name_or_path=path)

    peft_model = PeftModel.from_pretrained(_hf_from(kind, path), str(tmp_path / "ad")).eval()
    torch.testing.assert_close(_logits(peft_model, IDS), ours, atol=1e-5, rtol=0)

    cfg = json.loads((tmp_path / "ad" / L.CONFIG_NAME).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"]) == (lcfg.r, lcfg.alpha, 0.0)
    assert sorted(cfg["target_modules"]) == sorted(lcfg.target_modules)
    assert cfg["use_rslora"] is lcfg.use_rslora
    assert cfg["bias"] == "none" and cfg["fan_in_fan_out"] is False and cfg["use_dora"] is False
    assert cfg["inference_mode"] is True and cfg["modules_to_save"] is None
    assert cfg["base_model_name_or_path"] == path
    tensors = load_file(str(tmp_path / "ad" / L.WEIGHTS_NAME))
    assert len(tensors) == 2 * len(lcfg.target_modules) * LAYERS
    assert all(k.startswith("base_model.model.model.layers.") for k in tensors)
    assert all(t.is_contiguous() for t in tensors.values())


@pytest.mark.parametrize(
    ("lora_kwargs", "n_wrapped"),
    [
        ({}, 7 * LAYERS),
        ({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "use_rslora": True}, 4),
        ({"r": 2, "lora_alpha": 5, "target_modules": ["down_proj"], "lora_dropout": 0.1}, 2),
        ({"target_modules": r".*\.1\.mlp\.(up|down)_proj"}, 2),  # PEFT regex form
    ],
    ids=["default", "rslora-qv", "dropout-down", "regex"],
)
def test_peft_adapter_loads_into_minicd(ckpt, tmp_path, lora_kwargs, n_wrapped):
    kind, path = ckpt
    expected = _peft_adapter(kind, path, str(tmp_path / "peft"), **lora_kwargs)
    model = _minicd(path)
    base = _logits(model, IDS)
    cfg = L.load_adapter(model, tmp_path / "peft")
    kw = {"r": 8, "lora_alpha": 16, "target_modules": list(ALL)} | lora_kwargs
    assert (cfg.r, cfg.alpha, cfg.use_rslora) == (kw["r"], kw["lora_alpha"], kw.get("use_rslora", False))
    assert cfg.dropout == kw.get("lora_dropout", 0.0)
    assert len(L.lora_modules(model)) == n_wrapped
    got = _logits(model, IDS)
    assert (got - base).abs().max() > 1e-3
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_state_dict_keys_are_peft_keys(ckpt, tmp_path):
    kind, path = ckpt
    _peft_adapter(kind, path, str(tmp_path / "peft"))
    peft_keys = set(load_file(str(tmp_path / "peft" / L.WEIGHTS_NAME)))
    model = _minicd(path)
    base_keys = set(model.state_dict())
    L.inject_lora(model, L.LoRAConfig())
    keys = set(model.state_dict())
    assert base_keys <= keys  # base parameter names unchanged
    assert {"base_model.model." + k for k in keys - base_keys} == peft_keys
    assert set(L.lora_state_dict(model)) == peft_keys


def test_save_load_roundtrip_and_overwrite(qwen3_dir, tmp_path):
    path = qwen3_dir
    out = tmp_path / "ad"
    first = _adapted(path)
    L.save_adapter(first, out, L.LoRAConfig())
    second = _adapted(path, seed=2)
    _randomize_b(second, seed=4)
    L.save_adapter(second, out, L.LoRAConfig())  # overwrites in place
    assert sorted(os.listdir(tmp_path)) == ["ad"]  # no temp dirs left
    fresh = _minicd(path)
    L.load_adapter(fresh, out)
    assert torch.equal(_logits(fresh, IDS), _logits(second, IDS))
    assert not torch.equal(_logits(fresh, IDS), _logits(first, IDS))

    # A gathered full state dict (model keys, base weights included) saves the same adapter.
    L.save_adapter(None, tmp_path / "from_sd", L.LoRAConfig(), state_dict=second.state_dict())
    a, b = load_file(str(out / L.WEIGHTS_NAME)), load_file(str(tmp_path / "from_sd" / L.WEIGHTS_NAME))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # Loading into a model that already carries LoRA replaces tensors and scaling.
    L.save_adapter(first, out, L.LoRAConfig(alpha=4))
    L.load_adapter(fresh, out)
    assert all(m.scaling == 0.5 for m in L.lora_modules(fresh).values())
    with torch.no_grad():
        for m in L.lora_modules(first).values():
            m.configure(4, 0.0, False)
    assert torch.equal(_logits(fresh, IDS), _logits(first, IDS))


# ----------------------------------------------------------------------------- merge / disable


def test_merge_unmerge(ckpt):
    _, path = ckpt
    model = _adapted(path)
    adapted = _logits(model, IDS)
    before = {n: m.weight.detach().clone() for n, m in L.lora_modules(model).items()}
    merged_sd = L.merged_state_dict(model)
    assert len(L.merge_lora(model)) == 7 * LAYERS
    assert L.merge_lora(model) == []  # a second merge is a no-op
    for n, m in L.lora_modules(model).items():
        b, a = m.lora_B.weight, m.lora_A.weight
        torch.testing.assert_close(m.weight, before[n] + b @ a * 2.0, atol=1e-6, rtol=0)
        torch.testing.assert_close(merged_sd[f"{n}.weight"], m.weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(_logits(model, IDS), adapted, atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError, match="merged"):
        with L.disable_adapters(model):
            pass
    assert len(L.unmerge_lora(model)) == 7 * LAYERS
    assert L.unmerge_lora(model) == []
    for n, m in L.lora_modules(model).items():
        torch.testing.assert_close(m.weight, before[n], atol=1e-6, rtol=0)
    torch.testing.assert_close(_logits(model, IDS), adapted, atol=1e-5, rtol=0)
    assert not any(L._is_lora_key(k) for k in merged_sd)


def test_disable_adapters_is_exact_base(ckpt):
    _, path = ckpt
    base = _logits(_minicd(path), IDS)
    model = _adapted(path)
    adapted = _logits(model, IDS)
    assert not torch.equal(adapted, base)
    with L.disable_adapters(model):
        assert torch.equal(_logits(model, IDS), base)
        with L.disable_adapters(model):  # nesting keeps the outer state
            pass
        assert torch.equal(_logits(model, IDS), base)
    assert torch.equal(_logits(model, IDS), adapted)
    with pytest.raises(ValueError, match="boom"):
        with L.disable_adapters(model):
            raise ValueError("boom")
    assert torch.equal(_logits(model, IDS), adapted)


# ----------------------------------------------------------------------------- errors


def test_adapter_for_other_hidden_size_is_refused(qwen3_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    path = qwen3_dir
    small = get_peft_model(_hf_model("qwen3", hidden=32), LoraConfig(r=8, target_modules=list(ALL)))
    small.save_pretrained(str(tmp_path / "small"))
    model = _minicd(path)
    with pytest.raises(CheckpointError, match="adapter whose shapes do not match") as e:
        L.load_adapter(model, tmp_path / "small")
    msg = str(e.value)
    # First mismatch in model order: layer 0's q_proj A ([r, hidden]); found 32, expected 64.
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in msg
    assert "[8, 32]" in msg and "[8, 64]" in msg
    assert L.lora_modules(model) == {}  # the model was not touched


def _tamper(adapter_dir, edit) -> None:
    path = os.path.join(adapter_dir, L.WEIGHTS_NAME)
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


KEY = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"


@pytest.mark.parametrize(
    ("edit", "pattern"),
    [
        (lambda t: t.__setitem__(KEY, torch.zeros(INTER, 4)), rf"{KEY}.*\[128, 4\].*\[128, 8\]"),
        (lambda t: t.pop(KEY), f"missing key '{KEY}'"),
        (
            lambda t: t.__setitem__(KEY.replace("layers.1", "layers.5"), torch.zeros(INTER, 8)),
            "unexpected key 'base_model.model.model.layers.5.mlp.up_proj.lora_B.weight'",
        ),
    ],
    ids=["shape", "missing", "unexpected"],
)
def test_tampered_adapter_is_refused(qwen3_dir, tmp_path, edit, pattern):
    path = qwen3_dir
    L.save_adapter(_adapted(path), tmp_path / "ad", L.LoRAConfig())
    _tamper(tmp_path / "ad", edit)
    with pytest.raises(CheckpointError, match=pattern):
        L.load_adapter(_minicd(path), tmp_path / "ad")


def test_adapter_name_segment_is_accepted(qwen3_dir, tmp_path):
    """Keys like '...lora_A.default.weight' (PEFT's in-memory names) load too."""
    path = qwen3_dir
    model = _adapted(path)
    L.save_adapter(model, tmp_path / "ad", L.LoRAConfig())
    _tamper(tmp_path / "ad", lambda t: t.update(
        {k.replace(".weight", ".default.weight"): t.pop(k) for k in list(t)}
    ))
    fresh = _minicd(path)
    L.load_adapter(fresh, tmp_path / "ad")
    assert torch.equal(_logits(fresh, IDS), _logits(model, IDS))


def test_missing_paths_are_refused(tmp_path):
    model = nn.Sequential()
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / "nowhere"))):
        L.load_adapter(model, tmp_path / "nowhere")
    (tmp_path / "ad").mkdir()
    (tmp_path / "ad" / L.CONFIG_NAME).write_text(json.dumps(L.LoRAConfig().to_peft_dict()))
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / "ad" / L.WEIGHTS_NAME))):
        L.load_adapter(model, tmp_path / "ad")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("use_dora", True),
        ("bias", "all"),
        ("modules_to_save", ["lm_head"]),
        ("rank_pattern", {"q_proj": 4}),
        ("alpha_pattern", {"q_proj": 4}),
        ("layers_to_transform", [0]),
        ("peft_type", "IA3"),
        ("target_modules", ["q_proj", "qkv_proj"]),
    ],
)
def test_unsupported_adapter_config_is_refused(qwen3_dir, tmp_path, key, value):
    path = qwen3_dir
    L.save_adapter(_adapted(path), tmp_path / "ad", L.LoRAConfig())
    cfg_path = tmp_path / "ad" / L.CONFIG_NAME
    cfg = json.loads(cfg_path.read_text()) | {key: value}
    cfg_path.write_text(json.dumps(cfg))
    model = _minicd(path)
    with pytest.raises(CheckpointError, match=f"'{key}'") as e:
        L.load_adapter(model, tmp_path / "ad")
    assert str(cfg_path) in str(e.value)
    assert L.lora_modules(model) == {}


# ----------------------------------------------------------------------------- injection


def test_injection_freezes_base_and_inits_like_peft(ckpt):
    _, path = ckpt
    model = _minicd(path)
    base = _logits(model, IDS)
    names = L.inject_lora(model, L.LoRAConfig(), generator=torch.Generator().manual_seed(5))
    assert len(names) == 7 * LAYERS and all(n.split(".")[-1] in ALL for n in names)
    assert not any("lm_head" in n for n in names)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{x}.weight" for n in names for x in "AB"}
    # Per layer r * (in + out): q 64->64, k/v 64->32, o 64->64, gate/up 64->128, down 128->64.
    per_layer = 8 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 2 * (64 + 128) + (128 + 64))
    assert L.count_trainable(model)[0] == LAYERS * per_layer
    assert sum(p.numel() for p in L.lora_parameters(model)) == LAYERS * per_layer
    assert torch.equal(_logits(model, IDS), base)  # B = 0: a fresh adapter is the identity

    for m in L.lora_modules(model).values():
        a = m.lora_A.weight
        bound = 1 / math.sqrt(m.in_features)  # Kaiming-uniform with a = sqrt(5)
        assert a.abs().max() <= bound and a.abs().max() > 0.9 * bound
        assert abs(a.std().item() - bound / math.sqrt(3)) < 0.1 * bound  # U(-b, b) std
        assert torch.equal(m.lora_B.weight, torch.zeros_like(m.lora_B.weight))

    again = _minicd(path)
    L.inject_lora(again, L.LoRAConfig(), generator=torch.Generator().manual_seed(5))
    other = _minicd(path)
    L.inject_lora(other, L.LoRAConfig(), generator=torch.Generator().manual_seed(6))
    pa, pb, pc = (L.lora_parameters(x) for x in (model, again, other))
    assert all(torch.equal(x, y) for x, y in zip(pa, pb))
    assert not torch.equal(pa[0], pc[0])
    assert not torch.equal(pa[0], pa[14])  # layer 1's q_proj A differs from layer 0's

    # Without a generator: deterministic, and the global RNG is not consumed.
    d1, d2 = _minicd(path), _minicd(path)
    state = torch.get_rng_state()
    L.inject_lora(d1, L.LoRAConfig())
    L.inject_lora(d2, L.LoRAConfig())
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(x, y) for x, y in zip(L.lora_parameters(d1), L.lora_parameters(d2)))


def test_injection_errors(ckpt):
    kind, path = ckpt
    model = _minicd(path)
    with pytest.raises(ConfigError, match="nope_proj"):
        L.inject_lora(model, L.LoRAConfig(target_modules=("q_proj", "nope_proj")))
    with pytest.raises(ConfigError, match="non-Linear"):
        L.inject_lora(model, L.LoRAConfig(target_modules=("mlp",)))
    assert L.lora_modules(model) == {}
    L.inject_lora(model, L.LoRAConfig(target_modules=("q_proj",)))
    with pytest.raises(ConfigError, match="already"):
        L.inject_lora(model, L.LoRAConfig(target_modules=("q_proj",)))
    head_only = L.LoRAConfig(target_modules=("lm_head",))
    if kind != "qwen3":  # tied embeddings: LoRA on the shared head weight is refused
        with pytest.raises(ConfigError, match="tied"):
            L.inject_lora(_minicd(path), head_only)
    else:
        assert L.inject_lora(_minicd(path), head_only) == ["lm_head"]
    with pytest.raises(ConfigError, match="r must be"):
        L.LoRAConfig(r=0)


# ----------------------------------------------------------------------------- one layer


def _toy_layer(dropout: float = 0.0, use_rslora: bool = False) -> tuple[nn.Linear, L.LoRALinear]:
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(6, 5)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(5, 6, generator=g))
        lin.bias.copy_(torch.randn(5, generator=g))
    layer = L.LoRALinear(lin, r=4, alpha=6, dropout=dropout, use_rslora=use_rslora, generator=g)
    with torch.no_grad():
        layer.lora_B.weight.copy_(torch.randn(5, 4, generator=g))
    return lin, layer


@pytest.mark.parametrize(("use_rslora", "scaling"), [(False, 6 / 4), (True, 6 / 2)])
def test_forward_formula(use_rslora, scaling):
    lin, layer = _toy_layer(use_rslora=use_rslora)
    assert layer.weight is lin.weight and layer.bias is lin.bias
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
    a, b = layer.lora_A.weight, layer.lora_B.weight
    expected = x @ lin.weight.T + lin.bias + scaling * (x @ a.T @ b.T)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)
    assert set(layer.state_dict()) == {"weight", "bias", "lora_A.weight", "lora_B.weight"}


def test_dropout_only_in_train_mode():
    lin, layer = _toy_layer(dropout=0.5)
    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(1))
    a, b = layer.lora_A.weight, layer.lora_B.weight
    no_dropout = x @ lin.weight.T + lin.bias + 1.5 * (x @ a.T @ b.T)
    layer.eval()
    torch.testing.assert_close(layer(x), no_dropout, atol=1e-5, rtol=0)
    torch.testing.assert_close(layer(x), no_dropout, atol=1e-5, rtol=0)
    layer.train()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        y1, y2 = layer(x), layer(x)
    assert (y1 - no_dropout).abs().max() > 1e-2 and (y1 - y2).abs().max() > 1e-2
    # Dropout acts on the LoRA input only: the difference lies in B's column space, x B A scaled.
    with torch.random.fork_rng():
        torch.manual_seed(0)
        mask = torch.nn.functional.dropout(torch.ones_like(x), 0.5, training=True)
    torch.testing.assert_close(
        y1, x @ lin.weight.T + lin.bias + 1.5 * ((x * mask) @ a.T @ b.T), atol=1e-5, rtol=0
    )
    with L.disable_adapters(layer):
        torch.testing.assert_close(layer(x), lin(x), atol=0, rtol=0)


def test_lora_dtype_follows_base_unless_given():
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(8, 4).to(torch.bfloat16)
    assert L.LoRALinear(lin, r=2, alpha=4).lora_A.weight.dtype == torch.bfloat16
    layer = L.LoRALinear(lin, r=2, alpha=4, generator=g, dtype=torch.float32)
    assert layer.lora_A.weight.dtype == layer.lora_B.weight.dtype == torch.float32
    with torch.no_grad():
        layer.lora_B.weight.copy_(torch.randn(4, 2, generator=g))
    x = torch.randn(3, 8, generator=g).to(torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    a, b, w = layer.lora_A.weight, layer.lora_B.weight, lin.weight.float()
    xf = x.float()
    expected = xf @ w.T + lin.bias.float() + 2.0 * (xf @ a.T @ b.T)
    torch.testing.assert_close(y.float(), expected, atol=0.05, rtol=0.02)


def test_unload_merges_and_leaves_plain_linears(ckpt):
    _, path = ckpt
    model = _adapted(path)
    adapted = _logits(model, IDS)
    names = L.unload_lora(model, merge=True)
    assert len(names) > 0 and not L.lora_modules(model)
    assert all(type(model.get_submodule(n)) is nn.Linear for n in names)
    assert not any("lora_" in k for k in model.state_dict())
    torch.testing.assert_close(_logits(model, IDS), adapted, rtol=0, atol=1e-5)
    # a fresh adapter on top starts as the identity of the merged (e.g. SFT) policy
    L.inject_lora(model, L.LoRAConfig(r=4), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(model, IDS), adapted, rtol=0, atol=1e-5)
    base = _minicd(path)
    dropped = _adapted(path)
    L.unload_lora(dropped, merge=False)
    assert torch.equal(_logits(dropped, IDS), _logits(base, IDS))
