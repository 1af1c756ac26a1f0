"""Configuration: one dataclass per concern, loaded from TOML with dotted command-line overrides.

A config file is a TOML document (optionally ``extends = "base.toml"``, a file it is layered
over, table by table) whose tables are the sections below (``[model]``, ``[lora]``,
``[data]``, ``[train]``, ``[sft]``, ``[grpo]``, ``[phi]``, ``[rollout]``, ``[log]``). Any key can
be overridden on the command line as ``section.key=value`` where ``value`` is TOML
(``sft.lr=1e-4``, ``lora.target_modules=["q_proj","v_proj"]``, ``model.template="qwen3"``); a bare
word that is not valid TOML is taken as a string (``model.path=Qwen/Qwen3-4B``).

Where the paper and its public release disagree, the default follows the paper and the field's
comment names the release's value.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minicd.errors import ConfigError


@dataclass
class ModelConfig:
    path: str = ""                     # local HF-format dir or hub repo id (Qwen/Qwen2.5-1.5B-Instruct)
    dtype: str = "auto"                # auto | float32 | bfloat16 | float16 (auto: bf16 on GPU, fp32 on CPU)
    template: str | None = None        # chat template override: qwen2.5 | qwen3 | chatml (None: from checkpoint)
    activation_checkpointing: bool = False


@dataclass
class LoRAConfigSection:
    enabled: bool = True
    r: int = 8                         # paper and release: rank 8
    alpha: float = 16.0                # release SFT: 2 x rank; release GRPO actor: alpha 8
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    init_adapter: str | None = None    # PEFT adapter dir to start from (GRPO/PHI: the SFT adapter)
    init_mode: str = "merge"           # merge: fold init_adapter into the base and train a fresh
                                       #   adapter (reference policy = the init policy, as in the
                                       #   release); continue: keep training init_adapter itself
                                       #   (reference = the base model without any adapter)


@dataclass
class DataConfig:
    dir: str = ""                      # dataset dir with {train,val,test}.jsonl (prepared by python -m minicd.data)
    corpus: str = "mimic3"             # mimic3 | mimic4
    code_system: str = "icd9"          # icd9 | icd10
    label_scope: str = "top50"         # top50 | full
    max_prompt_tokens: int = 8192      # release: cutoff 8192 for SFT, 5120 prompt tokens for GRPO
    train_limit: int | None = None     # use only the first N training examples (debugging, demo)
    val_limit: int | None = 200        # validation subset size for in-training evaluation


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    seed: int = 0
    device: str = "auto"               # auto | cpu | cuda
    mixed_precision: str | None = None # bfloat16 on GPU (FSDP2 MixedPrecisionPolicy); None on CPU
    micro_batch_size: int = 4
    grad_accum: int = 4                # global batch = micro_batch_size x grad_accum x world size
    max_steps: int | None = None       # stop after this many optimizer steps (None: epochs decide)
    eval_every: int = 200
    eval_at_start: bool = True         # greedy validation of the starting policy, logged as step 0
                                       #   (the baseline a stage's curve is read against)
    save_every: int = 200
    keep_last: int = 2
    export_merged: bool = False        # also write output_dir/merged: LoRA folded in, HF format
                                       #   (+ tokenizer) that transformers and vLLM serve directly
    resume: bool = False
    num_threads: int | None = None     # torch CPU threads (None: torch default)


@dataclass
class SFTConfig:
    lr: float = 1e-5                   # paper: 1e-5; release YAMLs: 1e-4
    epochs: float = 3.0
    warmup_ratio: float = 0.1          # release
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    betas: tuple[float, float] = (0.9, 0.999)
    length_grouping: bool = True


@dataclass
class GRPOConfig:
    group_size: int = 8                # G
    prompts_per_step: int = 8          # B (global)
    lr: float = 1e-5                   # release: 1e-5 constant
    weight_decay: float = 1e-2         # release
    grad_clip: float = 1.0
    kl_coef: float = 1e-3              # paper: 1e-3; release shipped 1e-2
    kl_kind: str = "k3"                # k1 | k2 | k3 (release: k3 "low_var_kl", clamped to [-10, 10])
    clip_low: float = 0.2
    clip_high: float = 0.2             # release: 0.3
    dual_clip: float | None = None     # release: 3.0
    agg: str = "token-mean"            # token-mean | seq-mean
    adv_std: str = "unbiased"          # unbiased | biased | none (Dr.GRPO mean-only)
    epochs: float = 1.0
    updates_per_batch: int = 1
    reward: str = "f1"                 # f1 (paper) | fbeta:<beta> | package.module:function
                                       #   (response text, gold codes) -> float; see make_reward
    shared_prefix: bool = True         # compute each group's prompt once, not G times: the prompt
                                       #   and its samples packed in one row (same math)


@dataclass
class RolloutConfig:
    engine: str = "torch"              # torch | vllm
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 196          # paper: 196; release used 512 for Full
    val_temperature: float = 0.0       # in-training validation is greedy (release: T 0.6 / top-p 0.95)
    max_batch_size: int = 64           # torch engine: rows (prompt x sample) decoded together


@dataclass
class PHIConfig:
    # PHI (paper Sec. 4.3, Appendix E): each round is one GRPO epoch ([grpo], grpo.epochs is set
    # to 1 per round; train.max_steps, when set, caps the steps of EACH round).
    rounds: int = 3                    # paper: 3 to 5
    p_inject: float = 0.5              # probability that a prompt gets hints (paper: 0.5)
    max_hints: int = 5                 # k ~ Uniform{1..min(max_hints, |pool|)} (paper: 5)
    tau: float = 3.0                   # temperature of p(c) ~ w_c^(1/tau) (paper: 3.0)
    recall_floor: float = 0.05         # a_c = 1/sqrt(freq_c) / max(recall_c, floor) (paper: 0.05)
    clip_mult: float = 3.0             # a_c clipped at clip_mult x median (paper: 3)
    description_limit: int = 100       # hint descriptions cut to this many characters (<= 100)
    description_file: str | None = None  # extra "code<TAB>description" lines over the CMS tables


@dataclass
class LogConfig:
    tensorboard: bool = False
    wandb_project: str | None = None
    log_every: int = 1
    log_text: bool = False             # opt-in: never log note text unless set


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfigSection = field(default_factory=LoRAConfigSection)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    phi: PHIConfig = field(default_factory=PHIConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a TOML config file (or the defaults when ``path`` is None) and apply overrides."""
    raw: dict[str, Any] = {}
    where = "defaults"
    if path is not None:
        where = str(path)
        raw = _read_toml(Path(path), chain=())
    if overrides:
        where += " + command-line overrides"
    for item in overrides:
        key, value = _parse_override(item)
        _set_dotted(raw, key, value)
    return _build(Config, raw, where, prefix="")


def _read_toml(p: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    """Read one TOML file; a top-level ``extends = "other.toml"`` (relative to this file) is read
    first and this file's tables are merged over it key by key."""
    if not p.is_file():
        hint = f" (extended by {chain[-1]})" if chain else ""
        raise ConfigError(f"config file {p} not found{hint}; pass an existing TOML file (see configs/)")
    if p.resolve() in chain:
        raise ConfigError(f"{p}: circular `extends` chain: {' -> '.join(map(str, chain + (p,)))}")
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: invalid TOML: {exc}") from exc
    base = raw.pop("extends", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"{p}: extends must be a path string, got {base!r}")
    merged = _read_toml((p.parent / base), chain + (p.resolve(),))
    for section, values in raw.items():
        if isinstance(values, dict) and isinstance(merged.get(section), dict):
            merged[section] = {**merged[section], **values}
        else:
            merged[section] = values
    return merged


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected section.key=value (e.g. sft.lr=1e-4)")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key or "." not in key:
        raise ConfigError(f"override {item!r}: the key must be dotted, e.g. sft.lr=1e-4")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text  # a bare word: take it as a string
    return key, value


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {part} is a value, not a section")
    node[parts[-1]] = value


def _build(cls: type, raw: dict[str, Any], where: str, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: [{prefix.rstrip('.')}] must be a table")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(prefix + u for u in unknown)}; "
                          f"valid keys here: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in raw.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, where, prefix + name + ".")
        else:
            kwargs[name] = _coerce(tp, value, f"{where}: {prefix}{name}")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, what: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, what)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{what}: invalid value {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{what}: expected a list, got {value!r}")
        return [_coerce(args[0], v, what) for v in value]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{what}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, what) for a, v in zip(args, value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{what}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{what}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{what}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{what}: expected a string, got {value!r}")
    return value


def dump_config(cfg: Config) -> str:
    """Render a config as TOML (for run directories and checkpoints)."""
    lines: list[str] = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if value is None:
                continue  # TOML has no null; absent means default None
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot render {value!r} as TOML")
