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
        elif p.stem.split("_")[0] in ("cnn", "bigru", "caml", "multirescnn", "laat", "plmicd"):
            model, *corpus, scope = p.stem.split("_")       # e.g. laat_mimic4_icd10_full
            assert cfg.classifier.model == model and cfg.data.label_scope == scope
            assert cfg.data.corpus == corpus[0]
            assert cfg.data.code_system == ("icd9" if corpus == ["mimic3"] else "icd10")
            load_config(p, stage="classifier")              # the stage's own rules pass too


@pytest.mark.parametrize("override, needle", [
    ("grpo.kl_kind=k4", r"grpo\.kl_kind = 'k4': expected one of k1, k2, k3"),
    ("grpo.agg=token_mean", r"grpo\.agg = 'token_mean': expected one of token-mean, seq-mean"),
    ("rollout.engine=vlm", r"rollout\.engine = 'vlm': expected one of torch, vllm"),
    ("lora.init_mode=merg", r"lora\.init_mode = 'merg': expected one of merge, continue"),
    ("train.mixed_precision=bf17", r"train\.mixed_precision = 'bf17'"),
    ("sft.lr=0", r"sft\.lr = 0\.0: must be > 0"),
    ("grpo.lr=-1e-5", r"grpo\.lr = -1e-05: must be > 0"),
    ("train.num_threads=0", r"train\.num_threads = 0: must be >= 1"),
    ("grpo.group_size=1", r"grpo\.group_size = 1: must be >= 2"),
    ("rollout.temperature=-0.5", r"rollout\.temperature = -0\.5: must be >= 0"),
    ("rollout.top_p=0", r"rollout\.top_p = 0\.0: must be in \(0, 1\]"),
    ("rollout.top_p=1.5", r"rollout\.top_p = 1\.5"),
    ("rollout.max_new_tokens=0", r"rollout\.max_new_tokens = 0: must be >= 1"),
    ("lora.r=0", r"lora\.r = 0: must be an integer >= 1"),
    ("data.train_limit=-5", r"data\.train_limit = -5: must be >= 1"),
    ("data.val_limit=-1", r"data\.val_limit = -1"),
    ("phi.p_inject=1.5", r"phi\.p_inject = 1\.5: must be in \[0, 1\]"),
    ("phi.mini_example=icd10", r"phi\.mini_example = 'icd10': expected one of paper, system, none"),
    ("train.max_steps=0", r"train\.max_steps = 0"),
    ("grpo.dual_clip=0.5", r"grpo\.dual_clip = 0\.5: must be > 1"),
    ("grpo.reward=fbeta:-1", r"grpo\.reward = 'fbeta:-1'"),
    ("grpo.reward=f1+missed:-1", r"grpo\.reward = 'f1\+missed:-1'.*lambda must be a number > 0"),
    ("grpo.advantage=ppo", r"grpo\.advantage = 'ppo': expected one of grpo, dr_grpo, rloo"),
    ("grpo.ratio_level=group", r"grpo\.ratio_level = 'group': expected one of token, sequence"),
    ("grpo.loss=ppo", r"grpo\.loss = 'ppo': expected one of clip, cispo"),
    ("grpo.tis_cap=0.5", r"grpo\.tis_cap = 0\.5: must be >= 1 or unset"),
    ("grpo.max_draws=0", r"grpo\.max_draws = 0: must be >= 1"),
    ("grpo.filter_groups=2", r"grpo\.filter_groups: expected true or false"),
    ("grpo.agg=sum", r"grpo\.agg = 'sum': expected one of token-mean, seq-mean, "
                     r"seq-mean-token-sum-norm"),
    ("grpo.adv_std=none", r"unknown key\(s\) grpo\.adv_std; valid keys here: .*advantage"),
    ("train.dist_timeout_s=10", r"train\.dist_timeout_s = 10\.0: must be in \[60, 86400\]"),
    ("rollout.sleep=2", r"rollout\.sleep: expected true or false"),
])
def test_every_value_is_checked_at_load(override, needle):
    """Enumerations (Literal types) and ranges fail at load, naming key, value and the rule."""
    with pytest.raises(ConfigError, match=needle):
        load_config(None, [override])


def test_stage_rules_across_sections():
    # greedy rollouts: all G samples identical -> every advantage zero; refused, not trained
    load_config(None, ["rollout.temperature=0"])           # fine for SFT / inference
    with pytest.raises(ConfigError, match=r"rollout\.temperature = 0\.0: must be > 0 for --stage grpo"):
        load_config(None, ["rollout.temperature=0"], stage="grpo")
    with pytest.raises(ConfigError, match=r"grpo\.kl_coef = 0\.001 needs lora\.enabled"):
        load_config(None, ["lora.enabled=false"], stage="grpo")
    load_config(None, ["lora.enabled=false", "grpo.kl_coef=0"], stage="grpo")
    with pytest.raises(ConfigError, match=r"lora\.enabled = false: PHI needs"):
        load_config(None, ["lora.enabled=false", "grpo.kl_coef=0"], stage="phi")
    load_config(None, ["lora.enabled=false"], stage="sft")
    with pytest.raises(ConfigError, match=r"grpo\.dual_clip = 3\.0: must be unset with grpo\.loss"):
        load_config(None, ["grpo.loss=cispo", "grpo.dual_clip=3.0"])
    load_config(None, ["grpo.loss=cispo", "grpo.ratio_level=sequence", "grpo.mask_truncated=true",
                       "grpo.advantage=rloo", "grpo.agg=seq-mean-token-sum-norm"], stage="grpo")


def test_user_reward_is_imported_and_called_at_load(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def good(text, gold):\n    return 0.5\n"
        "def text_out(text, gold):\n    return 'high'\n"
        "def nan_out(text, gold):\n    return float('nan')\n"
        "def raises(text, gold):\n    raise KeyError('gold')\n"
        "NOT_A_FUNCTION = 3\n")
    (tmp_path / "broken_rewards.py").write_text("import no_such_module_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_config(None, ["grpo.reward=my_rewards:good"]).grpo.reward == "my_rewards:good"
    for spec, needle in [("my_rewards:text_out", "returned 'high'"),
                         ("my_rewards:nan_out", "returned nan"),
                         ("my_rewards:raises", "raised KeyError"),
                         ("my_rewards:NOT_A_FUNCTION", "is not callable"),
                         ("my_rewards:missing", "cannot import it"),
                         ("broken_rewards:fn", "ModuleNotFoundError")]:
        with pytest.raises(ConfigError, match=r"grpo\.reward = '" + spec + "'.*" + needle):
            load_config(None, [f"grpo.reward={spec}"])
