import pytest

from minicd import ConfigError
from minicd.config import Config, dump_config, load_config


def test_defaults_follow_the_paper():
    cfg = load_config(None)
    assert cfg.sft.lr == 1e-5          # paper (release: 1e-4)
    assert cfg.grpo.kl_coef == 1e-3    # paper (release: 1e-2)
    assert cfg.grpo.group_size == 8
    assert cfg.rollout.max_new_tokens == 196
    assert cfg.lora.r == 8 and cfg.lora.alpha == 16.0
    assert cfg.phi.p_inject == 0.5 and cfg.phi.tau == 3.0 and cfg.phi.max_hints == 5


def test_toml_file_and_overrides(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[sft]\nlr = 2e-4\nepochs = 1\n[model]\npath = "m"\n')
    cfg = load_config(f, ["sft.lr=1e-4", "model.path=Qwen/Qwen3-4B", "grpo.dual_clip=3.0",
                          'lora.target_modules=["q_proj", "v_proj"]', "train.max_steps=5"])
    assert cfg.sft.lr == 1e-4
    assert cfg.sft.epochs == 1.0 and isinstance(cfg.sft.epochs, float)
    assert cfg.model.path == "Qwen/Qwen3-4B"
    assert cfg.grpo.dual_clip == 3.0
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.train.max_steps == 5


def test_dump_round_trip(tmp_path):
    cfg = load_config(None, ["sft.lr=3e-4", "data.train_limit=7", "sft.betas=[0.8, 0.95]"])
    f = tmp_path / "dumped.toml"
    f.write_text(dump_config(cfg))
    assert load_config(f) == cfg


@pytest.mark.parametrize("override, needle", [
    ("sft.lrr=1", "sft.lrr"),
    ("sft.lr=fast", "sft.lr"),
    ("train.max_steps=1.5", "train.max_steps"),
    ("nosection=1", "dotted"),
    ("model.activation_checkpointing=maybe", "model.activation_checkpointing"),
])
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(None, [override])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[sft\nlr=1")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(bad)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[sfft]\nlr=1\n")
    with pytest.raises(ConfigError, match="sfft"):
        load_config(unknown)


def test_config_is_plain_data():
    assert Config().to_dict()["grpo"]["clip_high"] == 0.2


def test_extends_layers_tables_key_by_key(tmp_path):
    (tmp_path / "base.toml").write_text('[model]\npath = "Qwen/Qwen3-4B"\ntemplate = "qwen3"\n'
                                        '[sft]\nlr = 1e-5\nepochs = 3\n')
    (tmp_path / "child.toml").write_text('extends = "base.toml"\n[sft]\nlr = 1e-4\n[data]\ncorpus = "mimic4"\n')
    cfg = load_config(tmp_path / "child.toml", ["sft.epochs=1"])
    assert cfg.model.path == "Qwen/Qwen3-4B" and cfg.model.template == "qwen3"
    assert cfg.sft.lr == 1e-4 and cfg.sft.epochs == 1.0
    assert cfg.data.corpus == "mimic4"
    (tmp_path / "loop.toml").write_text('extends = "loop.toml"\n')
    with pytest.raises(ConfigError, match="circular"):
        load_config(tmp_path / "loop.toml")
    (tmp_path / "orphan.toml").write_text('extends = "nope.toml"\n')
    with pytest.raises(ConfigError, match="nope.toml"):
        load_config(tmp_path / "orphan.toml")


def test_every_shipped_preset_loads():
    from pathlib import Path

    presets = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml"))
    assert len(presets) >= 8
    for p in presets:
        cfg = load_config(p)
        if p.name.startswith("qwen"):
            backbone, corpus, scope = p.stem.split("_")
            assert cfg.data.corpus == corpus and cfg.data.label_scope == scope
            assert cfg.data.code_system == ("icd9" if corpus == "mimic3" else "icd10")
            assert cfg.model.template == ("qwen3" if backbone.startswith("qwen3") else "qwen2.5")
            assert cfg.sft.lr == 1e-5 and cfg.grpo.kl_coef == 1e-3      # the paper's values
