"""Configuration: one dataclass per concern, loaded from TOML with dotted command-line overrides.

A config file is a TOML document (optionally ``extends = "base.toml"``, a file it is layered
over, table by table) whose tables are the sections below (``[model]``, ``[lora]``,
``[data]``, ``[train]``, ``[sft]``, ``[grpo]``, ``[phi]``, ``[rollout]``, ``[classifier]``,
``[log]``). Any key can
be overridden on the command line as ``section.key=value`` where ``value`` is TOML
(``sft.lr=1e-4``, ``lora.target_modules=["q_proj","v_proj"]``, ``model.template="qwen3"``); a bare
word that is not valid TOML is taken as a string (``model.path=Qwen/Qwen3-4B``).

Where the paper and its public release disagree, the default follows the paper and the field's
comment names the release's value.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from minicd.errors import ConfigError

Stage = Literal["sft", "grpo", "phi", "classifier"]


@dataclass
class ModelConfig:
    path: str = ""                     # local HF-format dir or hub repo id (Qwen/Qwen2.5-1.5B-Instruct)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto | float32 | bfloat16 | float16 (auto: bf16 on GPU, fp32 on CPU)
    template: str | None = None        # chat template override: qwen2.5 | qwen3 | chatml (None: from checkpoint)
    activation_checkpointing: bool = False

    def validate(self) -> None:
        pass  # dtype is checked by its Literal type; template by the tokenizer (loaded first)


@dataclass
class LoRAConfigSection:
    enabled: bool = True
    r: int = 8                         # paper and release: rank 8
    alpha: float = 16.0                # release SFT: 2 x rank; release GRPO actor: alpha 8
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    init_adapter: str | None = None    # PEFT adapter dir to start from (GRPO/PHI: the SFT adapter)
    init_mode: Literal["merge", "continue"] = "merge"  # merge: fold init_adapter into the base and train a fresh
                                       #   adapter (reference policy = the init policy, as in the
                                       #   release); continue: keep training init_adapter itself
                                       #   (reference = the base model without any adapter)

    def validate(self) -> None:
        _need(self.r >= 1, "lora.r", self.r, "an integer >= 1 (paper: 8)")
        _need(self.alpha > 0, "lora.alpha", self.alpha, "> 0 (release: 2 x lora.r)")
        _need(0.0 <= self.dropout < 1.0, "lora.dropout", self.dropout, "in [0, 1)")
        _need(len(self.target_modules) > 0, "lora.target_modules", self.target_modules,
              "a non-empty list of linear layer names (e.g. [\"q_proj\", \"v_proj\"])")


@dataclass
class DataConfig:
    dir: str = ""                      # dataset dir with {train,val,test}.jsonl (prepared by python -m minicd.data)
    corpus: Literal["mimic3", "mimic4"] = "mimic3"
    code_system: Literal["icd9", "icd10"] = "icd9"
    label_scope: Literal["top50", "full"] = "top50"
    max_prompt_tokens: int = 8192      # release: cutoff 8192 for SFT, 5120 prompt tokens for GRPO
    train_limit: int | None = None     # use only the first N training examples (debugging, demo)
    val_limit: int | None = 200        # validation subset size for in-training evaluation
                                       #   (0: no in-training validation; unset: the whole split)
                                       #   (SFT/GRPO/PHI; --stage classifier tunes on all of val)

    def validate(self) -> None:
        _need(self.max_prompt_tokens >= 64, "data.max_prompt_tokens", self.max_prompt_tokens,
              ">= 64 (room for the instruction and a note)")
        _at_least_one("data.train_limit", self.train_limit, unset_ok=True)
        _need(self.val_limit is None or self.val_limit >= 0, "data.val_limit", self.val_limit,
              ">= 0 (0: no in-training validation) or unset (the whole split)")


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    mixed_precision: Literal["bfloat16", "float16", "float32"] | None = None  # compute dtype of the
                                       #   training forwards: FSDP2 MixedPrecisionPolicy under
                                       #   torchrun, torch.autocast in one process (SmolLM2 demo:
                                       #   bfloat16 on the CPU); None: the weights' dtype
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
    dist_timeout_s: float = 1800.0     # torch.distributed collective timeout (seconds); no phase
                                       #   leaves one rank alone for longer than a step

    def validate(self) -> None:
        _need(60.0 <= self.dist_timeout_s <= 86400.0, "train.dist_timeout_s", self.dist_timeout_s,
              "in [60, 86400] seconds (default 1800)")
        for key in ("micro_batch_size", "grad_accum", "eval_every", "save_every", "keep_last"):
            _at_least_one(f"train.{key}", getattr(self, key))
        _at_least_one("train.max_steps", self.max_steps, unset_ok=True)
        _at_least_one("train.num_threads", self.num_threads, unset_ok=True)
        _need(bool(self.output_dir.strip()), "train.output_dir", self.output_dir,
              "a directory path (e.g. runs/sft)")


@dataclass
class SFTConfig:
    lr: float = 1e-5                   # paper: 1e-5; release YAMLs: 1e-4
    epochs: float = 3.0
    warmup_ratio: float = 0.1          # release
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    betas: tuple[float, float] = (0.9, 0.999)
    length_grouping: bool = True

    def validate(self) -> None:
        _need(self.lr > 0, "sft.lr", self.lr, "> 0 (paper: 1e-5; release: 1e-4)")
        _need(self.epochs > 0, "sft.epochs", self.epochs, "> 0 (paper: 3)")
        _need(0.0 <= self.warmup_ratio < 1.0, "sft.warmup_ratio", self.warmup_ratio, "in [0, 1)")
        _need(self.weight_decay >= 0, "sft.weight_decay", self.weight_decay, ">= 0")
        _need(self.grad_clip > 0, "sft.grad_clip", self.grad_clip, "> 0 (release: 1.0)")
        _need(all(0.0 <= b < 1.0 for b in self.betas), "sft.betas", list(self.betas),
              "two numbers in [0, 1), e.g. [0.9, 0.999]")


@dataclass
class GRPOConfig:
    group_size: int = 8                # G
    prompts_per_step: int = 8          # B (global)
    lr: float = 1e-5                   # release: 1e-5 constant
    weight_decay: float = 1e-2         # release
    grad_clip: float = 1.0
    kl_coef: float = 1e-3              # paper: 1e-3; release shipped 1e-2
    kl_kind: Literal["k1", "k2", "k3"] = "k3"  # (release: k3 "low_var_kl", clamped to [-10, 10])
    clip_low: float = 0.2
    clip_high: float = 0.2             # release: 0.3
    dual_clip: float | None = None     # release: 3.0
    agg: Literal["token-mean", "seq-mean", "seq-mean-token-sum-norm"] = "token-mean"
                                       # token-mean (paper, release); seq-mean (DeepSeekMath);
                                       #   seq-mean-token-sum-norm: Dr. GRPO's constant normaliser
                                       #   sum / (N x rollout.max_new_tokens)
    advantage: Literal["grpo", "dr_grpo", "rloo"] = "grpo"  # grpo: Eq. 1, (r - mean) / (std + eps)
                                       #   (paper, release); dr_grpo: r - mean; rloo: r - mean of
                                       #   the other G - 1 (docs/grpo_variants.md)
    ratio_level: Literal["token", "sequence"] = "token"  # sequence: GSPO, one ratio per response
    loss: Literal["clip", "cispo"] = "clip"  # clip: Eq. 2 (paper); cispo: sg(clipped ratio) A logp
    mask_truncated: bool = False       # leave responses cut at rollout.max_new_tokens out of the
                                       #   loss (DAPO's overlong filtering; paper, release: off)
    filter_groups: bool = False        # DAPO dynamic sampling: drop groups whose G rewards are all
                                       #   equal, draw further rounds of B prompts until B groups
                                       #   are kept (paper, release: off; docs/grpo_variants.md)
    max_draws: int = 3                 # with filter_groups: the most draw ROUNDS of B prompts per
                                       #   step (1 = no refill; DAPO/verl max_num_gen_batches)
    tis_cap: float | None = None       # truncated importance sampling: weight each token's loss by
                                       #   min(exp(old_logp - rollout_logp), tis_cap) (paper,
                                       #   release: off; verl/TRL use 2)
    epochs: float = 1.0
    updates_per_batch: int = 1
    reward: str = "f1"                 # f1 (paper) | fbeta:<beta> | weighted_f1[:<default_weight>]
                                       #   | f1_release (release: span-less responses scored on
                                       #   ICD-shaped tokens) | package.module:function (response
                                       #   text, gold codes) -> float; each optionally
                                       #   +missed:<lambda> (PHI); see algo/reward.make_reward
                                       #   A module:function is IMPORTED AND RUN (at load on a
                                       #   dummy response, then on every rollout): trusted code only
    shared_prefix: bool = True         # compute each group's prompt once, not G times: the prompt
                                       #   and its samples packed in one row (same math)

    def validate(self) -> None:
        _need(self.group_size >= 2, "grpo.group_size", self.group_size,
              ">= 2 (advantages compare samples within a group; paper: 8)")
        _at_least_one("grpo.prompts_per_step", self.prompts_per_step)
        _at_least_one("grpo.updates_per_batch", self.updates_per_batch)
        _need(self.lr > 0, "grpo.lr", self.lr, "> 0 (release: 1e-5)")
        _need(self.weight_decay >= 0, "grpo.weight_decay", self.weight_decay, ">= 0")
        _need(self.grad_clip > 0, "grpo.grad_clip", self.grad_clip, "> 0 (release: 1.0)")
        _need(self.kl_coef >= 0, "grpo.kl_coef", self.kl_coef, ">= 0 (paper: 1e-3; release: 1e-2)")
        _need(0.0 <= self.clip_low < 1.0, "grpo.clip_low", self.clip_low, "in [0, 1) (paper: 0.2)")
        _need(self.clip_high >= 0, "grpo.clip_high", self.clip_high, ">= 0 (release: 0.3)")
        _need(self.dual_clip is None or self.dual_clip > 1, "grpo.dual_clip", self.dual_clip,
              "> 1 or unset (release: 3.0)")
        _need(self.epochs > 0, "grpo.epochs", self.epochs, "> 0")
        _need(self.loss != "cispo" or self.dual_clip is None, "grpo.dual_clip", self.dual_clip,
              "unset with grpo.loss = \"cispo\" (the dual clip bounds the clip loss only)")
        _at_least_one("grpo.max_draws", self.max_draws)
        _need(self.tis_cap is None or self.tis_cap >= 1, "grpo.tis_cap", self.tis_cap,
              ">= 1 or unset (off; verl/TRL use 2)")
        parse_reward_spec(self.reward, check=True)


@dataclass
class RolloutConfig:
    engine: Literal["torch", "vllm"] = "torch"
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 196          # paper: 196; release used 512 for Full
    val_temperature: float = 0.0       # in-training validation is greedy (release: T 0.6 / top-p 0.95)
    max_batch_size: int = 64           # torch engine: rows (prompt x sample) decoded together
    sleep: bool | None = None          # vLLM sleeps (weights offloaded, KV cache dropped) during
                                       #   training passes; None: on with CUDA, off on CPU

    def validate(self) -> None:
        _need(self.temperature >= 0, "rollout.temperature", self.temperature, ">= 0 (paper: 1.0)")
        _need(0.0 < self.top_p <= 1.0, "rollout.top_p", self.top_p, "in (0, 1]")
        _at_least_one("rollout.max_new_tokens", self.max_new_tokens)
        _need(self.val_temperature >= 0, "rollout.val_temperature", self.val_temperature, ">= 0")
        _at_least_one("rollout.max_batch_size", self.max_batch_size)


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
    mini_example: Literal["paper", "system", "none"] = "paper"  # the hint's mini example:
                                       #   paper = its ICD-9 example for every system (Appendix
                                       #   E); system = an ICD-10 analogue (written here) for
                                       #   ICD-10 runs; none = no example (an ablation)

    def validate(self) -> None:
        _at_least_one("phi.rounds", self.rounds)
        _need(0.0 <= self.p_inject <= 1.0, "phi.p_inject", self.p_inject, "in [0, 1] (paper: 0.5)")
        _at_least_one("phi.max_hints", self.max_hints)
        _need(self.tau > 0, "phi.tau", self.tau, "> 0 (paper: 3.0)")
        _need(self.recall_floor > 0, "phi.recall_floor", self.recall_floor, "> 0 (paper: 0.05)")
        _need(self.clip_mult > 0, "phi.clip_mult", self.clip_mult, "> 0 (paper: 3)")
        _need(1 <= self.description_limit <= 100, "phi.description_limit",
              self.description_limit, "in [1, 100] (the hint block cuts at 100 characters)")


@dataclass
class ClassifierConfig:
    # The discriminative coders of Tables 1-2 (train.py --stage classifier; minicd.discriminative).
    # Defaults: Edin et al. (2023)'s configs/model/*.yaml and configs/experiment/mimiciv_icd10/.
    # Batches: train.micro_batch_size x train.grad_accum (Edin: 8 for the word models, 16 PLM-ICD).
    model: Literal["cnn", "bigru", "caml", "multirescnn", "laat", "plmicd"] = "laat"
    encoder_path: str = ""             # plmicd: RoBERTa checkpoint dir or hub id (Edin and the
                                       #   paper: RoBERTa-base-PM-M3-Voc; safetensors weights)
    max_tokens: int = 4000             # words (or encoder tokens) kept from a note's start (Edin: 4000)
    min_count: int = 3                 # vocabulary: words in >= this many training notes (Edin: 3)
    embed_dim: int = 100               # word embedding size (Edin: word2vec vector_size 100)
    embed_init: Literal["word2vec", "random"] = "word2vec"  # word2vec: skip-gram trained on the
                                       #   training notes first (Edin: gensim word2vec, 5 epochs)
    word2vec_epochs: int = 5           # Edin: 5
    embed_dropout: float = 0.2         # Edin: 0.2 (CNN and Bi-GRU on MIMIC-IV: 0; LAAT: 0.3)
    num_filters: int = 50              # CNN: 500, CAML and MultiResCNN: 50 (Edin)
    kernel_size: int = 10              # CNN: 4, CAML: 10 (Edin)
    kernel_sizes: list[int] = field(default_factory=lambda: [3, 5, 9, 15, 19, 25])  # MultiResCNN
    rnn_size: int = 512                # LAAT: LSTM units per direction; Bi-GRU: both directions (Edin: 512)
    rnn_layers: int = 1
    rnn_dropout: float = 0.3           # between stacked LSTM layers (LAAT; Edin: 0.3)
    projection_size: int = 512         # LAAT's attention projection (Edin: 512)
    segment_length: int = 128          # PLM-ICD segment length in encoder tokens (Edin: 128)
    lr: float = 1e-3                   # AdamW (Edin: 1e-3 CNN/Bi-GRU/LAAT, 5e-3 CAML, 5e-4 MultiResCNN, 5e-5 PLM-ICD)
    weight_decay: float = 1e-3         # Edin: 1e-3 LAAT/CAML, 1e-4 MultiResCNN/Bi-GRU, 1e-5 CNN, 0 PLM-ICD
    warmup_steps: int = 2000           # linear warm-up, then linear decay to 0 (Edin: 2000)
    epochs: int = 20                   # Edin: 20
    patience: int = 6                  # stop after this many epochs without a better validation
                                       #   micro-F1 (Edin: 6, on mean average precision)
    eval_batch_size: int = 16
    score_top_k: int = 50              # per-code scores kept in each prediction row (top-k by probability)

    def validate(self) -> None:
        for key in ("max_tokens", "min_count", "embed_dim", "word2vec_epochs", "num_filters",
                    "kernel_size",
                    "rnn_size", "rnn_layers", "projection_size", "segment_length", "epochs",
                    "patience", "eval_batch_size", "score_top_k"):
            _at_least_one(f"classifier.{key}", getattr(self, key))
        _need(len(self.kernel_sizes) > 0 and all(k >= 1 for k in self.kernel_sizes),
              "classifier.kernel_sizes", self.kernel_sizes,
              "a non-empty list of integers >= 1 (Edin: [3, 5, 9, 15, 19, 25])")
        for key in ("embed_dropout", "rnn_dropout"):
            _need(0.0 <= getattr(self, key) < 1.0, f"classifier.{key}", getattr(self, key),
                  "in [0, 1)")
        _need(self.lr > 0, "classifier.lr", self.lr, "> 0 (Edin: 1e-3 for LAAT)")
        _need(self.weight_decay >= 0, "classifier.weight_decay", self.weight_decay, ">= 0")
        _need(self.warmup_steps >= 0, "classifier.warmup_steps", self.warmup_steps,
              ">= 0 (Edin: 2000)")
        _need(self.segment_length >= 3, "classifier.segment_length", self.segment_length,
              ">= 3 (Edin: 128)")


@dataclass
class LogConfig:
    tensorboard: bool = False
    wandb_project: str | None = None
    log_every: int = 1

    def validate(self) -> None:
        _at_least_one("log.log_every", self.log_every)


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
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self, stage: Stage | None = None) -> "Config":
        """Check every section, then the rules across sections (and those of ``stage``, when
        given). Raises :class:`ConfigError` naming the key, its value and what is allowed."""
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()
        if stage not in (None, "sft", "grpo", "phi", "classifier"):
            raise ConfigError(f"stage {stage!r}: expected sft, grpo, phi or classifier")
        if stage == "classifier" and self.classifier.model == "plmicd" \
                and not self.classifier.encoder_path:
            raise ConfigError("classifier.encoder_path is empty: PLM-ICD needs a RoBERTa "
                              "checkpoint (dir or hub id), e.g. classifier.encoder_path=roberta-base")
        if stage in ("grpo", "phi"):
            _need(self.rollout.temperature > 0, "rollout.temperature", self.rollout.temperature,
                  f"> 0 for --stage {stage}: greedy rollouts make the {self.grpo.group_size} "
                  "samples of a group identical, so every advantage would be zero (paper: 1.0)")
            if not self.lora.enabled and self.grpo.kl_coef != 0:
                raise ConfigError(f"grpo.kl_coef = {self.grpo.kl_coef!r} needs lora.enabled = true: "
                                  "the reference policy is the model with its adapter disabled; "
                                  "set grpo.kl_coef = 0 for full fine-tuning")
        if stage == "phi" and not self.lora.enabled:
            raise ConfigError("lora.enabled = false: PHI needs lora.enabled = true (rounds continue "
                              "a LoRA adapter; the reference is the model with its adapter disabled)")
        return self


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                stage: Stage | None = None) -> Config:
    """Read a TOML config file (or the defaults when ``path`` is None), apply overrides and
    validate the result (:meth:`Config.validate`, with the rules of ``stage`` when given), before
    any model or data is touched."""
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
    cfg = _build(Config, raw, where, prefix="")
    try:
        return cfg.validate(stage)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


# ------------------------------------------------------------------ value checks
def _need(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{key} = {value!r}: must be {rule}")


def _at_least_one(key: str, value: int | None, unset_ok: bool = False) -> None:
    if value is None and unset_ok:
        return
    _need(value is not None and value >= 1, key, value, ">= 1" + (" (or unset)" if unset_ok else ""))


def import_callable(spec: str, key: str) -> Callable[..., Any]:
    """Import ``package.module:function`` (the value of config key ``key``) and return it."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{key} = {spec!r}: expected 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except Exception as e:  # noqa: BLE001 - any failure of user code at import is the user's
        raise ConfigError(f"{key} = {spec!r}: cannot import it ({type(e).__name__}: {e}); the "
                          "module must be importable on every rank (installed, or on "
                          "PYTHONPATH)") from None
    if not callable(fn):
        raise ConfigError(f"{key} = {spec!r} is not callable; name a function")
    return fn


@dataclass(frozen=True)
class RewardSpec:
    """A parsed ``grpo.reward``: ``kind`` f1 | fbeta | weighted_f1 | f1_release | user, its
    argument (beta, default weight, or the user's function) and the missed-code bonus lambda."""

    kind: str
    arg: Any = None
    missed: float = 0.0


_REWARD_FORMS = ("'f1', 'fbeta:<beta>', 'weighted_f1[:<default_weight>]', 'f1_release' or "
                 "'package.module:function', optionally followed by '+missed:<lambda>'")


def _positive_number(text: str, spec: str, what: str, example: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"grpo.reward = {spec!r}: {what} must be a number > 0, e.g. {example!r}")
    return value


def parse_reward_spec(spec: str, check: bool = False) -> RewardSpec:
    """``grpo.reward`` -> :class:`RewardSpec` (see ``minicd.algo.reward.make_reward``).

    Forms: ``f1`` (the paper's), ``fbeta:<beta>``, ``weighted_f1`` or
    ``weighted_f1:<default_weight>``, ``f1_release`` (the public release's fallback), or
    ``package.module:function``; any of them may be followed by ``+missed:<lambda>``.
    With ``check``, a user function is called once on a dummy response (``<code>401.9</code>``
    against gold ``("401.9",)``) and must return a finite number: a broken reward fails at load,
    not after the model and the first rollout. Note: this imports and runs the user's code.
    """
    full = spec.strip()
    base, *extras = [part.strip() for part in full.split("+")]
    missed = 0.0
    for extra in extras:
        if not extra.startswith("missed:") or missed:
            raise ConfigError(f"grpo.reward = {spec!r}: after '+' expected one "
                              "'missed:<lambda>' (e.g. 'f1+missed:0.1')")
        missed = _positive_number(extra.split(":", 1)[1], spec, "the missed-code bonus lambda",
                                  "f1+missed:0.1")
    if base in ("f1", "f1_release"):
        return RewardSpec(base, None, missed)
    if base == "weighted_f1":
        return RewardSpec("weighted_f1", 1.0, missed)
    if base.startswith("fbeta:"):
        beta = _positive_number(base.split(":", 1)[1], spec, "the F-beta weight", "fbeta:2")
        return RewardSpec("fbeta", beta, missed)
    if base.startswith("weighted_f1:"):
        default = _positive_number(base.split(":", 1)[1], spec, "the default code weight",
                                   "weighted_f1:1")
        return RewardSpec("weighted_f1", default, missed)
    if ":" not in base:
        raise ConfigError(f"grpo.reward = {spec!r}: expected {_REWARD_FORMS}")
    fn = import_callable(base, "grpo.reward")
    if check:
        try:
            value = fn("<code>401.9</code>", ("401.9",))
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"grpo.reward = {spec!r}: calling it as fn(response_text, "
                              f"gold_codes) on a dummy response raised {type(e).__name__}: {e}") \
                from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value):
            raise ConfigError(f"grpo.reward = {spec!r}: returned {value!r} on a dummy response; "
                              "a reward function must return a finite number")
    return RewardSpec("user", fn, missed)


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
    if origin is Literal:
        if isinstance(value, str) and value in args:
            return value
        raise ConfigError(f"{what} = {value!r}: expected one of {', '.join(map(str, args))}")
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
