"""Find, load, save and build Qwen2/Qwen3/Llama checkpoints (config.json + safetensors).

A checkpoint directory holds ``config.json`` and either ``model.safetensors`` or shards listed
in ``model.safetensors.index.json``. Only safetensors are read (never pickles). What
:func:`save_model` writes loads in transformers (``AutoModelForCausalLM``) and vLLM.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from minicd.errors import CheckpointError, ConfigError
from minicd.fileio import read_json, read_safetensors
from minicd.model.decoder import DecoderLM
from minicd.model.hf_config import DecoderConfig

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_checkpoint(path_or_repo_id: str | os.PathLike, *, revision: str | None = None,
                       cache_dir: str | os.PathLike | None = None,
                       local_files_only: bool | None = None) -> Path:
    """Local directory for a checkpoint: an existing directory as is, else a hub repo id
    ("org/name") fetched with ``huggingface_hub.snapshot_download`` (honours HF_HUB_OFFLINE;
    ``local_files_only=True`` uses the local cache only)."""
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    name = str(path_or_repo_id)
    if path.exists():
        raise CheckpointError(f"checkpoint {name!r} is a file, not a directory. Pass the "
                              "directory holding config.json and *.safetensors.")
    if not _REPO_ID.match(name) or name.startswith((".", "/", "~")):
        raise CheckpointError(f"missing checkpoint dir {name!r}: no such directory, and it is "
                              "not a hub repo id ('org/name'). Fix the path.")
    from huggingface_hub import snapshot_download

    try:
        got = snapshot_download(repo_id=name, revision=revision, cache_dir=cache_dir,
                                allow_patterns=_HUB_PATTERNS,
                                local_files_only=bool(local_files_only))
    except Exception as exc:  # network, auth, offline mode, missing repo
        reason = (str(exc).splitlines() or [""])[0]
        raise CheckpointError(
            f"checkpoint {name!r}: no local directory of that name, and fetching hub repo "
            f"{name!r} failed ({type(exc).__name__}: {reason})."
            " Pass a local checkpoint directory, or allow downloads (unset HF_HUB_OFFLINE, check "
            "the repo id, network and HF_TOKEN).") from exc
    return Path(got)


def read_config_json(checkpoint_dir: str | os.PathLike) -> tuple[dict, Path]:
    """``<dir>/config.json`` as a dict, and its path; a missing or corrupt file raises
    CheckpointError naming it."""
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing config.json in checkpoint dir. Point at a "
                              "Hugging Face style checkpoint directory.")
    return read_json(path), path


def load_config(checkpoint_dir: str | os.PathLike) -> DecoderConfig:
    """Parse ``<dir>/config.json`` into a :class:`DecoderConfig` (refusing unsupported models)."""
    data, path = read_config_json(checkpoint_dir)
    return DecoderConfig.from_hf_dict(data, source=str(path))


def resolve_dtype(dtype: torch.dtype | str | None, config: DecoderConfig,
                  device: torch.device | str = "cpu") -> torch.dtype:
    """None -> float32 on CPU, the checkpoint's dtype elsewhere; "auto" -> checkpoint's dtype."""
    if dtype is None:
        dtype = "float32" if torch.device(device).type == "cpu" else "auto"
    if dtype == "auto":
        dtype = config.torch_dtype
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ConfigError(f"dtype {dtype!r} is not supported; use one of "
                      f"{sorted(_DTYPES)}, 'auto' or a floating torch.dtype.")


def load_state_dict(checkpoint_dir: str | os.PathLike,
                    device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) safetensors checkpoint, loaded onto ``device``."""
    root = Path(checkpoint_dir)
    index = root / INDEX_NAME
    if (root / WEIGHTS_NAME).is_file():
        files = [root / WEIGHTS_NAME]
    elif index.is_file():
        index_data = read_json(index)
        weight_map = index_data.get("weight_map") if isinstance(index_data, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: key 'weight_map' missing or not an object.")
        files = [root / f for f in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{index}: lists shard {f.name!r}, which is missing from "
                                      f"{root}. Re-download or re-save the checkpoint.")
    else:
        raise CheckpointError(f"{root}: no {WEIGHTS_NAME} or {INDEX_NAME}. Only safetensors "
                              "checkpoints are read; convert pickled *.bin weights first.")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(read_safetensors(f, device=str(torch.device(device))))
    return state


def load_model(path_or_repo_id: str | os.PathLike, dtype: torch.dtype | str | None = None,
               device: torch.device | str = "cpu") -> DecoderLM:
    """Load a Qwen2/Qwen3/Llama checkpoint (local dir or hub id) with strict key matching.

    ``dtype``: see :func:`resolve_dtype` (default float32 on CPU, the checkpoint's dtype on
    accelerators). A tied checkpoint may or may not contain ``lm_head.weight``.
    """
    root = resolve_checkpoint(path_or_repo_id)
    config = load_config(root)
    target = resolve_dtype(dtype, config, device)
    config = config.replace(torch_dtype=_dtype_name(target))
    with torch.device("meta"):
        model = DecoderLM(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    state = load_state_dict(root, device)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # the embedding is the head
        expected.pop("lm_head.weight")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if state[k].shape != expected[k])
    if missing or unexpected or wrong:
        show = lambda keys: ", ".join(keys[:8]) + (" ..." if len(keys) > 8 else "")  # noqa: E731
        raise CheckpointError(
            f"{root}: weights do not match config.json ({config.model_type}, "
            f"{config.num_hidden_layers} layers): missing [{show(missing)}], unexpected "
            f"[{show(unexpected)}], wrong shape [{show(wrong)}]. Check the checkpoint is a dense "
            "Qwen2/Qwen3/Llama causal LM with merged (not LoRA) weights.")
    state = {k: v.to(target) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    return model


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


def copy_tokenizer_files(src_dir: str | os.PathLike, dst_dir: str | os.PathLike) -> list[str]:
    """Copy a checkpoint's tokenizer files (those present) next to exported weights, so the
    export loads on its own in minicd, transformers and vLLM. Returns the names copied."""
    copied = []
    for fname in TOKENIZER_FILES:
        src = Path(src_dir) / fname
        if src.is_file():
            shutil.copyfile(src, Path(dst_dir) / fname)
            copied.append(fname)
    return copied


def load_tokenizer(path_or_repo_id: str | os.PathLike, template: str | None = None):
    """The tokenizer of a checkpoint (local dir or hub repo id) with its chat template.

    ``template`` ("qwen2.5", "qwen3", "smollm2", "chatml") overrides detection from
    tokenizer_config.json;
    see :func:`minicd.model.tokenizer.load_tokenizer`.
    """
    from minicd.model.tokenizer import load_tokenizer as _load

    return _load(resolve_checkpoint(path_or_repo_id), template=template)


def build_model(config: DecoderConfig, seed: int = 0, dtype: torch.dtype | str = torch.float32,
                device: torch.device | str = "cpu") -> DecoderLM:
    """A model with fresh weights (see ``DecoderLM.init_weights``), deterministic in seed."""
    dtype = resolve_dtype(dtype, config, device)
    with torch.device("meta"):
        model = DecoderLM(config.replace(torch_dtype=_dtype_name(dtype)))
    model.to_empty(device=device)
    model.tie_weights()
    generator = torch.Generator(device=device).manual_seed(seed)
    model.init_weights(generator)
    return model.to(dtype)


def save_model(model: DecoderLM, out_dir: str | os.PathLike,
               dtype: torch.dtype | str | None = None, max_shard_bytes: int | None = None, *,
               state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``config.json``, ``generation_config.json`` (token ids) and safetensors weights.

    Weights are cast to ``dtype`` (default: as they are) and sharded with an index json when
    larger than ``max_shard_bytes``; tied models store the embedding only. ``state_dict`` (full,
    plain tensors, e.g. gathered from FSDP) replaces ``model.state_dict()``. A new ``out_dir``
    is replaced atomically (``minicd.fileio.atomic_dir``); files of an existing one other than
    weights (e.g. the tokenizer's) are carried over, stale weight shards dropped.
    """
    config = model.config
    state = model.state_dict() if state_dict is None else state_dict
    with torch.device("meta"):
        names = list(DecoderLM(config).state_dict())
    if config.tie_word_embeddings:
        names.remove("lm_head.weight")
    missing = [n for n in names if n not in state]
    if missing:
        raise CheckpointError(f"save_model({out_dir}): state dict lacks {missing[:4]} (keys "
                              f"like {list(state)[:2]}). Merge or unload LoRA adapters first.")
    tensors: dict[str, torch.Tensor] = {}
    for name in names:
        t = state[name].detach()
        if type(t) is not torch.Tensor and hasattr(t, "full_tensor"):
            raise CheckpointError(f"save_model({out_dir}): {name} is sharded (DTensor); pass a "
                                  "full state_dict gathered on this rank.")
        if dtype is not None and t.is_floating_point():
            t = t.to(resolve_dtype(dtype, config))
        tensors[name] = t.to("cpu").contiguous()
    saved = _dtype_name(tensors["model.embed_tokens.weight"].dtype)
    files = _shard(tensors, max_shard_bytes)

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"save_model: {out} exists and is not a directory.")
    from minicd.fileio import atomic_dir

    with atomic_dir(out) as tmp:
        for fname, keys in files.items():
            save_file({k: tensors[k] for k in keys}, str(tmp / fname), metadata={"format": "pt"})
        if len(files) > 1:
            index = {"metadata": {"total_size": sum(_nbytes(t) for t in tensors.values())},
                     "weight_map": {k: f for f, keys in files.items() for k in keys}}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True))
        gen = {k: getattr(config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
               if getattr(config, k) is not None}
        if gen:
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        hf = config.replace(torch_dtype=saved).to_hf_dict()
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        if out.is_dir():  # keep the other files (tokenizer ...), drop stale weight shards
            for old in out.iterdir():
                stale = old.name in (WEIGHTS_NAME, INDEX_NAME) or re.fullmatch(
                    r"model-\d+-of-\d+\.safetensors", old.name)
                if not stale and not (tmp / old.name).exists():
                    (shutil.copytree if old.is_dir() else shutil.copy2)(old, tmp / old.name)
    return out


def _shard(tensors: dict[str, torch.Tensor], max_bytes: int | None) -> dict[str, list[str]]:
    """Greedy split into files of at most ``max_bytes`` (a bigger single tensor gets its own)."""
    total = sum(_nbytes(t) for t in tensors.values())
    if max_bytes is None or total <= max_bytes:
        return {WEIGHTS_NAME: list(tensors)}
    groups: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        if groups[-1] and size + _nbytes(t) > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += _nbytes(t)
    n = len(groups)
    return {f"model-{i + 1:05d}-of-{n:05d}.safetensors": g for i, g in enumerate(groups)}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _dtype_name(dtype: torch.dtype) -> str:
    names: dict[Any, str] = {torch.float32: "float32", torch.bfloat16: "bfloat16",
                             torch.float16: "float16"}
    if dtype not in names:
        raise ConfigError(f"dtype {dtype} cannot be stored in a checkpoint; use "
                          "float32, bfloat16 or float16.")
    return names[dtype]
