"""LoRA in plain torch, saved and loaded in exactly PEFT's on-disk format.

A target ``nn.Linear`` is replaced in place by :class:`LoRALinear`, which keeps the base
``weight``/``bias`` Parameters under the same names and adds ``lora_A.weight`` ``[r, in]`` and
``lora_B.weight`` ``[out, r]``. The model's LoRA state-dict keys are therefore PEFT's keys minus the
``base_model.model.`` prefix, base checkpoint names never change, and FSDP2 can shard a decoder
block holding frozen base weights and trainable LoRA parameters as one unit.

    h = x W^T + b + (alpha / r) * dropout(x) A^T B^T        (alpha / sqrt(r) with rsLoRA)

:func:`disable_adapters` gives the base model's outputs exactly (GRPO's reference policy, no
second copy of the model). :func:`save_adapter` writes ``adapter_config.json`` +
``adapter_model.safetensors`` that ``peft.PeftModel.from_pretrained`` and vLLM's ``LoRARequest``
read; :func:`load_adapter` reads adapters written by peft or by us.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from minicd.errors import CheckpointError, ConfigError
from minicd.model.packed_linear import base_linear

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Wrapper segments that torch inserts into module names (activation checkpointing, compile, FSDP1).
_WRAPPER_SEGMENTS = ("_checkpoint_wrapped_module", "_orig_mod", "_fsdp_wrapped_module")
# PEFT config keys we cannot honour, with the value that means "feature not used".
_UNSUPPORTED = {
    "use_dora": (False, "DoRA adapters are not supported"),
    "bias": ("none", "only bias='none' is supported (LoRA adapters that train biases are not)"),
    "modules_to_save": (None, "fully trained extra modules (modules_to_save) are not supported"),
    "rank_pattern": ({}, "per-layer ranks (rank_pattern) are not supported"),
    "alpha_pattern": ({}, "per-layer alphas (alpha_pattern) are not supported"),
    "fan_in_fan_out": (False, "fan_in_fan_out (Conv1D-style weights) is not supported"),
    "lora_bias": (False, "LoRA-B biases (lora_bias) are not supported"),
    "layers_to_transform": (None, "layer subsets (layers_to_transform) are not supported"),
    "layer_replication": (None, "layer_replication is not supported"),
    "exclude_modules": (None, "exclude_modules is not supported"),
    "target_parameters": (None, "target_parameters (LoRA on raw parameters) is not supported"),
    "trainable_token_indices": (None, "trainable_token_indices is not supported"),
    "use_qalora": (False, "QALoRA is not supported"),
    "alora_invocation_tokens": (None, "activated LoRA (alora_invocation_tokens) is not supported"),
}


def _unused(value: object, ok: object) -> bool:
    """True if a PEFT config value means "feature off" (its off value, null or empty)."""
    if value is None or value == ok:
        return True
    return isinstance(value, (dict, list, str)) and len(value) == 0


@dataclass
class LoRAConfig:
    """LoRA hyper-parameters (paper/release: r 8, alpha 16, all linear layers, no dropout).

    ``target_modules`` follows PEFT: a sequence of names matched against the full module name or
    its dotted suffix, or one string, either ``"all-linear"`` (every ``nn.Linear`` but ``lm_head``)
    or a regular expression that must match the full module name.
    """

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] | str = field(default=DEFAULT_TARGETS)
    use_rslora: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"LoRA r must be a positive integer, got {self.r!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ConfigError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.target_modules, str):
            self.target_modules = tuple(self.target_modules)
        if not self.target_modules:
            raise ConfigError("LoRA target_modules is empty; name at least one linear layer")
        if isinstance(self.target_modules, str):
            try:
                re.compile(self.target_modules)
            except re.error as e:
                raise ConfigError(f"LoRA target_modules {self.target_modules!r}: bad regex: {e}")

    @property
    def scaling(self) -> float:
        """alpha / r, or alpha / sqrt(r) with rank-stabilised LoRA."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def to_peft_dict(self, base_model_name_or_path: str | None = None) -> dict:
        """The ``adapter_config.json`` content PEFT and vLLM read (long-standing keys only)."""
        targets = self.target_modules
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model_name_or_path,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": targets if isinstance(targets, str) else sorted(targets),
            "bias": "none",
            "fan_in_fan_out": False,
            "use_rslora": self.use_rslora,
            "use_dora": False,
            "init_lora_weights": True,
            "inference_mode": True,
            "modules_to_save": None,
            "layers_to_transform": None,
            "layers_pattern": None,
            "rank_pattern": {},
            "alpha_pattern": {},
            "revision": None,
        }

    @classmethod
    def from_peft_dict(cls, d: Mapping, source: str = CONFIG_NAME) -> LoRAConfig:
        """Parse a PEFT ``adapter_config.json`` dict; refuse features this module cannot run."""
        if d.get("peft_type") != "LORA":
            raise CheckpointError(
                f"{source}: key 'peft_type' is {d.get('peft_type')!r}, only 'LORA' adapters load"
            )
        if d.get("task_type") not in (None, "CAUSAL_LM"):
            raise CheckpointError(
                f"{source}: key 'task_type' is {d['task_type']!r}; only CAUSAL_LM adapters load"
            )
        for key, (ok, why) in _UNSUPPORTED.items():
            value = d.get(key)
            if not _unused(value, ok):
                raise CheckpointError(
                    f"{source}: key {key!r} = {value!r}: {why}; re-train or convert the adapter "
                    f"with {key} = {ok!r}"
                )
        targets = d.get("target_modules")
        if not targets:
            raise CheckpointError(f"{source}: key 'target_modules' is missing or empty")
        try:
            return cls(
                r=int(d["r"]),
                alpha=d.get("lora_alpha", 8),
                dropout=float(d.get("lora_dropout") or 0.0),
                target_modules=targets if isinstance(targets, str) else tuple(targets),
                use_rslora=bool(d.get("use_rslora", False)),
            )
        except KeyError as e:
            raise CheckpointError(f"{source}: required key {e.args[0]!r} is missing") from None
        except (ConfigError, TypeError, ValueError) as e:
            raise CheckpointError(f"{source}: invalid LoRA settings: {e}") from None


class LoRALinear(nn.Linear):
    """An ``nn.Linear`` with a low-rank update; holds the base ``weight``/``bias`` Parameters.

    Built from an existing linear layer, whose Parameter objects it adopts (names, sharing and
    ``requires_grad`` unchanged). ``lora_A`` is Kaiming-uniform (a = sqrt(5), as PEFT), ``lora_B``
    zero, so a fresh adapter is the identity. LoRA weights use the base dtype unless ``dtype``.
    ``generator`` (CPU) draws A; None uses torch's default generator. Dropout, as nn.Dropout,
    draws its masks from the global RNG in train mode.
    """

    def __init__(
        self,
        base: nn.Linear,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        nn.Module.__init__(self)  # skip nn.Linear.__init__: adopt the base Parameters instead
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # [out, in]
        self.bias = base.bias  # [out] or None
        self.r = r
        self.configure(alpha, dropout, use_rslora)
        device, dtype = base.weight.device, dtype or base.weight.dtype
        # Built on meta then materialised: no draw from the global RNG by nn.Linear's own init.
        self.lora_A = nn.Linear(self.in_features, r, False, "meta", dtype).to_empty(device=device)
        self.lora_B = nn.Linear(r, self.out_features, False, "meta", dtype).to_empty(device=device)
        self.disabled = False
        self.merged = False
        self.reset_lora_parameters(generator)
        self.train(base.training)

    def configure(self, alpha: float, dropout: float, use_rslora: bool) -> None:
        """Set scaling and dropout (the rank is fixed by the tensor shapes)."""
        self.alpha, self.use_rslora = alpha, use_rslora
        self.scaling = alpha / (math.sqrt(self.r) if use_rslora else self.r)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_dropout.train(self.training)

    @torch.no_grad()
    def reset_lora_parameters(self, generator: torch.Generator | None = None) -> None:
        """A ~ Kaiming-uniform(a=sqrt(5)), i.e. U(-1/sqrt(in), 1/sqrt(in)); B = 0."""
        a = self.lora_A.weight
        if a.device.type != "meta":
            # Draw on the CPU so a CPU generator works for any device, then copy over.
            tmp = torch.empty(a.shape, dtype=torch.float32)
            nn.init.kaiming_uniform_(tmp, a=math.sqrt(5), generator=generator)
            a.copy_(tmp)
        self.lora_B.weight.zero_()

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A in fp32, ``[out, in]``."""
        b, a = self.lora_B.weight.float(), self.lora_A.weight.float()
        return (b @ a) * self.scaling

    uses_base_linear = True  # its base product goes through minicd.model.packed_linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = base_linear(self, x)  # [..., out] (oneDNN-packed inside packed_linears)
        if self.disabled or self.merged:
            return out
        xa = self.lora_dropout(x.to(self.lora_A.weight.dtype))
        delta = self.lora_B(self.lora_A(xa)) * self.scaling  # [..., out]
        return out + delta.to(out.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, r={self.r}, scaling={self.scaling:g}"
        )


def _clean_name(name: str) -> str:
    """Module name without wrapper segments (checkpoint wrappers, torch.compile, FSDP1)."""
    return ".".join(p for p in name.split(".") if p not in _WRAPPER_SEGMENTS)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Every :class:`LoRALinear` of ``model`` by its clean (Hugging Face) module name."""
    return {_clean_name(n): m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def _matches(name: str, targets: tuple[str, ...] | str) -> bool:
    """PEFT's rule: a string is a full-match regex, a list entry matches the name or a suffix."""
    if isinstance(targets, str):
        if targets.lower() == "all-linear":
            return name.split(".")[-1] != "lm_head"
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _find_targets(model: nn.Module, targets: tuple[str, ...] | str) -> dict[str, nn.Linear]:
    """Linear layers matched by ``targets`` (LoRALinear included, their inner A/B excluded)."""
    found: dict[str, nn.Linear] = {}
    non_linear: list[str] = []
    linear_leaves: set[str] = set()
    inner = {id(m.lora_A) for m in lora_modules(model).values()}
    inner |= {id(m.lora_B) for m in lora_modules(model).values()}
    for raw, module in model.named_modules():
        name = _clean_name(raw)
        if not name or id(module) in inner:
            continue
        if isinstance(module, nn.Linear):
            linear_leaves.add(name.split(".")[-1])
        if not _matches(name, targets):
            continue
        if isinstance(module, nn.Linear):
            found[name] = module
        else:
            non_linear.append(name)
    if non_linear and not isinstance(targets, str):
        raise ConfigError(
            f"LoRA target_modules match non-Linear modules {non_linear[:3]}; only nn.Linear "
            "layers can carry LoRA here"
        )
    if not found:
        raise ConfigError(f"LoRA target_modules {targets!r} match no nn.Linear layer of the model")
    if not isinstance(targets, str):
        for t in targets:
            if not any(n == t or n.endswith("." + t) for n in found):
                raise ConfigError(
                    f"LoRA target module {t!r} matches no nn.Linear layer of the model; its "
                    f"linear layers are named {sorted(linear_leaves)}"
                )
    return found


def _set_child(model: nn.Module, raw_name: str, child: nn.Module) -> None:
    parent_name, _, attr = raw_name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, child)


def inject_lora(
    model: nn.Module,
    cfg: LoRAConfig,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
) -> list[str]:
    """Wrap every target linear layer in :class:`LoRALinear` and freeze all base parameters.

    Returns the wrapped module names. Afterwards only ``lora_A``/``lora_B`` weights have
    ``requires_grad=True``. ``generator`` (CPU) draws every ``lora_A`` in module order; None
    means a fresh generator seeded 0, never the global RNG. ``dtype``: LoRA weight dtype (default:
    each base weight's). Raises ConfigError if a target matches nothing or LoRA is present.
    """
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    targets = _find_targets(model, cfg.target_modules)
    present = [n for n, m in targets.items() if isinstance(m, LoRALinear)]
    if present:
        raise ConfigError(f"LoRA is already injected into {present[:3]}; inject once per model")
    holders: dict[int, int] = {}
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None:
                holders[id(p)] = holders.get(id(p), 0) + 1
    tied = [n for n, m in targets.items() if holders[id(m.weight)] > 1]
    if tied:
        raise ConfigError(
            f"LoRA target {tied[0]!r} shares its weight with another module (tied embeddings); "
            "merging would change both, so drop it from target_modules"
        )
    raw_names = {_clean_name(n): n for n, _ in model.named_modules()}
    for name, base in targets.items():
        layer = LoRALinear(base, cfg.r, cfg.alpha, cfg.dropout, cfg.use_rslora, generator, dtype)
        _set_child(model, raw_names[name], layer)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in lora_parameters(model):
        p.requires_grad_(True)
    return list(targets)


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The LoRA A and B weights (what the optimizer trains)."""
    out: list[nn.Parameter] = []
    for m in lora_modules(model).values():
        out += [m.lora_A.weight, m.lora_B.weight]
    return out


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter element counts; tied Parameters counted once."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Within the block the model computes exactly its base outputs (the reference policy).

    Every layer's previous state is restored on exit, also on exceptions; nesting is fine.
    """
    layers = lora_modules(model)
    merged = [n for n, m in layers.items() if m.merged]
    if merged:
        raise RuntimeError(f"cannot disable merged LoRA layers {merged[:3]}; unmerge_lora first")
    previous = {n: m.disabled for n, m in layers.items()}
    try:
        for m in layers.values():
            m.disabled = True
        yield
    finally:
        for n, m in layers.items():
            m.disabled = previous[n]


@torch.no_grad()
def merge_lora(model: nn.Module) -> list[str]:
    """Fold scaling * B @ A into each base weight; already merged layers are left alone.

    Returns the names merged now. The forward then skips the LoRA branch (same outputs).
    """
    done = []
    for name, m in lora_modules(model).items():
        if not m.merged:
            m.weight.copy_((m.weight.float() + m.delta_weight()).to(m.weight.dtype))
            m.merged = True
            done.append(name)
    return done


@torch.no_grad()
def unmerge_lora(model: nn.Module) -> list[str]:
    """Subtract the folded update again (exact up to float rounding); unmerged layers skipped."""
    done = []
    for name, m in lora_modules(model).items():
        if m.merged:
            m.weight.copy_((m.weight.float() - m.delta_weight()).to(m.weight.dtype))
            m.merged = False
            done.append(name)
    return done


@torch.no_grad()
def unload_lora(model: nn.Module, merge: bool = True) -> list[str]:
    """Replace every :class:`LoRALinear` by a plain ``nn.Linear`` over the same base Parameters.

    ``merge=True`` folds the adapter into the base weight first (the model then computes what it
    computed with the adapter); ``merge=False`` drops the adapter. Base parameters keep their
    ``requires_grad`` flags. Returns the module names replaced. Used to start a new adapter on
    top of a previous stage's (GRPO/PHI from the SFT adapter: the reference policy is then the
    SFT policy, as in the paper's release).
    """
    done = []
    for raw_name, m in list(model.named_modules()):
        if not isinstance(m, LoRALinear):
            continue
        if merge and not m.merged:
            m.weight.copy_((m.weight.float() + m.delta_weight()).to(m.weight.dtype))
        elif not merge and m.merged:
            m.weight.copy_((m.weight.float() - m.delta_weight()).to(m.weight.dtype))
        plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        plain.weight, plain.bias = m.weight, m.bias
        plain.train(m.training)
        _set_child(model, raw_name, plain)
        done.append(_clean_name(raw_name))
    return done


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base state dict with LoRA folded in and LoRA keys dropped; the model is unchanged."""
    layers = lora_modules(model)
    out = {}
    for key, value in model.state_dict().items():
        key = _clean_name(key)
        owner, _, leaf = key.rpartition(".")
        if _is_lora_key(key):
            continue
        m = layers.get(owner)
        if m is not None and leaf == "weight" and not m.merged:
            value = (value.float() + m.delta_weight()).to(value.dtype)
        out[key] = value
    return out


_ADAPTER_NAME = re.compile(r"\.(lora_[AB])\.[^.]+\.weight$")


def _canonical_key(key: str) -> str:
    """PEFT file key or model key -> model key (no prefix, wrappers or adapter name)."""
    if key.startswith(PEFT_PREFIX):
        key = key[len(PEFT_PREFIX) :]
    return _ADAPTER_NAME.sub(r".\1.weight", _clean_name(key))


def _is_lora_key(key: str) -> bool:
    return re.search(r"(^|\.)lora_[AB]\.", key) is not None


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """LoRA weights under PEFT's keys ``base_model.model.<name>.lora_{A,B}.weight`` (detached)."""
    out = {}
    for name, m in lora_modules(model).items():
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.weight.detach()
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.weight.detach()
    return out


def save_adapter(
    model: nn.Module | None,
    out_dir: str | os.PathLike,
    cfg: LoRAConfig,
    base_model_name_or_path: str | None = None,
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> str:
    """Write a PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``) atomically.

    ``state_dict`` (e.g. a full state dict gathered from FSDP2 shards) replaces reading the
    model; its LoRA entries are kept, under model or PEFT keys. Returns ``out_dir``.
    """
    from safetensors.torch import save_file

    if state_dict is None:
        if model is None:
            raise ValueError("save_adapter needs a model or a state_dict")
        state_dict = lora_state_dict(model)
    tensors = {
        PEFT_PREFIX + _canonical_key(k): v.detach().to("cpu").contiguous()
        for k, v in state_dict.items()
        if _is_lora_key(_canonical_key(k))
    }
    if not tensors:
        raise ValueError("no LoRA tensors to save: inject_lora first or pass the adapter state")
    from minicd.fileio import atomic_dir

    out_dir = os.fspath(out_dir)
    with atomic_dir(out_dir) as tmp:
        save_file(tensors, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt"})
        with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
            json.dump(cfg.to_peft_dict(base_model_name_or_path), f, indent=2, sort_keys=True)
    return out_dir


def _fmt(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def load_adapter(
    model: nn.Module, adapter_dir: str | os.PathLike, generator: torch.Generator | None = None
) -> LoRAConfig:
    """Load a PEFT LoRA adapter into ``model`` (injecting LoRA first if needed); returns its config.

    Every problem is a CheckpointError naming the path and key: missing files, unsupported PEFT
    features, target modules the model lacks, missing/unexpected tensors, shape mismatches. The
    tensors are checked before the model is touched.
    """
    from minicd.fileio import read_json, read_safetensors

    adapter_dir = os.fspath(adapter_dir)
    cfg_path, w_path = os.path.join(adapter_dir, CONFIG_NAME), os.path.join(adapter_dir, WEIGHTS_NAME)
    if not os.path.isdir(adapter_dir):
        raise CheckpointError(f"adapter directory {adapter_dir} does not exist")
    for path in (cfg_path, w_path):
        if not os.path.isfile(path):
            hint = " (pickled adapter_model.bin is not read; re-save with safetensors)"
            raise CheckpointError(f"adapter file {path} is missing" + (hint if path == w_path else ""))
    cfg_dict = read_json(cfg_path, fix="re-save the adapter")
    if not isinstance(cfg_dict, dict):
        raise CheckpointError(f"{cfg_path}: expected a JSON object (a PEFT adapter_config.json)")
    cfg = LoRAConfig.from_peft_dict(cfg_dict, source=cfg_path)
    loaded = read_safetensors(w_path, fix="re-save the adapter")

    try:
        targets = _find_targets(model, cfg.target_modules)
    except ConfigError as e:
        raise CheckpointError(f"{cfg_path}: key 'target_modules': {e}") from None
    existing = lora_modules(model)
    if existing and set(existing) != set(targets):
        raise CheckpointError(
            f"{cfg_path}: the model already carries LoRA on {len(existing)} layers but the adapter "
            f"targets {len(targets)} (e.g. {sorted(set(existing) ^ set(targets))[:2]}); load it "
            "into a model without LoRA"
        )
    if any(m.merged for m in existing.values()):
        raise CheckpointError(f"cannot load {adapter_dir} into a model with merged LoRA; unmerge first")
    expected = {}
    for name, m in targets.items():
        r = m.r if isinstance(m, LoRALinear) else cfg.r
        expected[f"{name}.lora_A.weight"] = (r, m.in_features)
        expected[f"{name}.lora_B.weight"] = (m.out_features, r)
    found = {}
    for key, tensor in loaded.items():
        found[_canonical_key(key)] = (key, tensor)
    for key in sorted(found):
        if key not in expected:
            raise CheckpointError(
                f"{w_path}: unexpected key {found[key][0]!r}: the model has no LoRA layer for it "
                f"(adapter for a different model or target_modules?)"
            )
    for key, shape in expected.items():
        if key not in found:
            raise CheckpointError(
                f"{w_path}: missing key {PEFT_PREFIX + key!r} for target layer {key.rsplit('.', 2)[0]}"
            )
        got = tuple(found[key][1].shape)
        if got != shape:
            raise CheckpointError(
                f"{w_path}: key {found[key][0]!r} has shape {_fmt(got)} but the model expects "
                f"{_fmt(shape)}: adapter whose shapes do not match the model (different base "
                "model or rank?)"
            )

    if not existing:
        inject_lora(model, cfg, generator=generator)
    layers = lora_modules(model)
    with torch.no_grad():
        for name, m in layers.items():
            m.configure(cfg.alpha, cfg.dropout, cfg.use_rslora)
            m.lora_A.weight.copy_(found[f"{name}.lora_A.weight"][1])
            m.lora_B.weight.copy_(found[f"{name}.lora_B.weight"][1])
    return cfg
