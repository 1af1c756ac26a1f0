"""Atomic training checkpoints, exact resume, and merged Hugging Face export.

Layout of one checkpoint (``run_dir/checkpoints/step-00000042/``)::

    adapter/                  PEFT adapter (LoRA runs)   | model/  full weights (no LoRA)
    optimizer.safetensors     tensor state, keys ``state.{param_index}.{name}``
    optimizer.json            param_groups, non-tensor state, parameter names by index
    rng.safetensors           torch CPU / CUDA RNG states (uint8), keys ``rank{r}.torch_cpu`` ...
    config.toml               the run's config as given by the caller
    trainer_state.json        step, caller's state (epoch, data position), scheduler, python and
                              numpy RNG states; written last, so its presence marks completion

Everything is written into a temporary directory and renamed into place
(``minicd.fileio.atomic_dir``); then ``checkpoints/latest`` (one line, the directory name) is
replaced atomically (``minicd.fileio.atomic_file``), and only then are
checkpoints beyond ``keep_last`` deleted. A crash at any point leaves the previous checkpoint and
``latest`` intact; stale ``.tmp-*`` directories are ignored and removed by the next save.
Nothing is pickled to disk: tensors go to safetensors, the rest to JSON / TOML.

Under FSDP2 every rank calls :func:`save_checkpoint` / :func:`load_checkpoint` (they are
collective); rank 0 reads and writes the files. The optimizer files are identical in one process
and under FSDP2 (full, unsharded tensors indexed like ``optimizer.state_dict()``).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from minicd import dist
from minicd.errors import CheckpointError
from minicd.fileio import (atomic_dir, check_safetensors, read_json, read_safetensors,
                           write_text_atomic)
from minicd.model.lora import LoRAConfig, _clean_name, load_adapter, lora_modules, save_adapter

CKPT_DIR = "checkpoints"
LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"step-(\d{8})")
_REQUIRED = ("optimizer.safetensors", "optimizer.json", "rng.safetensors", "config.toml")


# ----------------------------------------------------------------------------------------- RNG
@dataclass
class RngState:
    """Global RNG states of one process (python ``random``, torch CPU/CUDA) and a numpy Generator."""

    python: list
    torch_cpu: torch.Tensor  # [N] uint8
    cuda: list[torch.Tensor] = field(default_factory=list)
    numpy: dict | None = None  # np.random.Generator.bit_generator.state


def capture_rng(np_generator: np.random.Generator | None = None) -> RngState:
    """Snapshot python, torch (CPU and every CUDA device) and optionally a numpy Generator."""
    version, internal, gauss = random.getstate()
    cuda = list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else []
    return RngState(python=[version, list(internal), gauss], torch_cpu=torch.get_rng_state(),
                    cuda=cuda, numpy=None if np_generator is None else np_generator.bit_generator.state)


def restore_rng(state: RngState, np_generator: np.random.Generator | None = None) -> None:
    """Put back what :func:`capture_rng` took; ``np_generator`` gets the saved numpy state."""
    version, internal, gauss = state.python
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state.torch_cpu)
    if state.cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state.cuda)
    if np_generator is not None:
        if state.numpy is None:
            raise CheckpointError("the checkpoint holds no numpy Generator state; pass "
                                  "np_generator to capture_rng when saving")
        np_generator.bit_generator.state = state.numpy


# ----------------------------------------------------------------------------------- optimizer
def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Clean parameter names in the optimizer's index order (param_groups, then position)."""
    by_id = {id(p): _clean_name(n) for n, p in model.named_parameters()}
    names = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in by_id:
                raise CheckpointError("the optimizer holds a parameter that is not in the model; "
                                      "build the optimizer from model.parameters()")
            names.append(by_id[id(p)])
    return names


def _optimizer_files(model: nn.Module, optimizer: torch.optim.Optimizer
                     ) -> tuple[dict[str, torch.Tensor], dict] | None:
    """Full optimizer state as (safetensors dict, JSON dict) on rank 0, None elsewhere. Collective."""
    names = _param_names(model, optimizer)
    if dist.is_distributed():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        sd = get_optimizer_state_dict(model, optimizer, options=opts)  # keyed by FQN
        if dist.get_rank() != 0:
            return None
        index = {n: i for i, n in enumerate(names)}
        state = {index[k]: v for k, v in sd["state"].items()}
        groups = [{**g, "params": [index[n] for n in g["params"]]} for g in sd["param_groups"]]
    else:
        sd = optimizer.state_dict()
        state, groups = sd["state"], sd["param_groups"]
    tensors: dict[str, torch.Tensor] = {}
    other: dict[str, dict[str, Any]] = {}
    for i, entry in state.items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{i}.{name}"] = value.detach().to("cpu").contiguous()
            else:
                other.setdefault(str(i), {})[name] = value
    meta = {"param_names": names, "param_groups": groups, "state": other}
    return tensors, meta


def _retuple(saved: dict, current: dict) -> dict:
    """JSON turned tuples (AdamW's betas) into lists; give them the current group's type back."""
    return {k: tuple(v) if isinstance(v, list) and isinstance(current.get(k), tuple) else v
            for k, v in saved.items()}


def _load_optimizer(ckpt: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    names = _param_names(model, optimizer)
    sd: dict = {}
    if dist.get_rank() == 0:
        meta = read_json(ckpt / "optimizer.json")
        if meta["param_names"] != names:
            diff = sorted(set(meta["param_names"]) ^ set(names))[:3]
            raise CheckpointError(
                f"{ckpt / 'optimizer.json'}: key 'param_names' lists {len(meta['param_names'])} "
                f"parameters, the optimizer has {len(names)} (differing: {diff}); build the model "
                "and optimizer as in the saved run (same LoRA targets, same param groups)")
        state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in meta["state"].items()}
        for key, t in read_safetensors(ckpt / "optimizer.safetensors").items():
            _, i, name = key.split(".", 2)
            state.setdefault(int(i), {})[name] = t
        groups = [_retuple(g, c) for g, c in zip(meta["param_groups"], optimizer.param_groups)]
        sd = {"state": state, "param_groups": groups}
        if dist.is_distributed():  # DCP wants FQN keys
            sd = {"state": {names[i]: v for i, v in state.items()},
                  "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in groups]}
    if dist.is_distributed():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_optimizer_state_dict(model, optimizer, sd, options=opts)
    else:
        optimizer.load_state_dict(sd)


# ---------------------------------------------------------------------------------- save/load
def _write_json(path: Path, obj: Any) -> None:  # inside an atomic_dir (fsync'ed there)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True))


def _rng_payload(rng: RngState) -> tuple[dict, dict[str, torch.Tensor]]:
    tensors = {"torch_cpu": rng.torch_cpu.clone()}
    tensors.update({f"cuda{i}": t.cpu().clone() for i, t in enumerate(rng.cuda)})
    return {"python": rng.python, "numpy": rng.numpy, "cuda_devices": len(rng.cuda)}, tensors


def save_checkpoint(run_dir: str | os.PathLike, step: int, *, model: nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler: Any = None,
                    lora_cfg: LoRAConfig | None = None, trainer_state: dict | None = None,
                    config_text: str = "", rng: RngState | None = None,
                    keep_last: int | None = 2) -> Path | None:
    """Write checkpoint ``step`` atomically; collective (every rank calls it, rank 0 writes).

    ``lora_cfg`` given: the adapter goes to ``adapter/`` (PEFT); None: full weights to ``model/``
    (HF layout for a decoder; a plain ``model.safetensors`` for a module without ``config``).
    ``trainer_state``: JSON-able caller state (epoch, sampler position, metrics). ``rng``: this
    rank's :func:`capture_rng` (default: capture now, without numpy); every rank's is stored.
    ``keep_last``: complete checkpoints kept (None keeps all). Returns the path on rank 0.
    """
    if keep_last is not None and keep_last < 1:
        raise CheckpointError(f"keep_last = {keep_last}: keep at least 1 checkpoint (or None)")
    try:
        json.dumps(trainer_state or {})
    except TypeError as e:
        raise CheckpointError(f"trainer_state must be JSON-serialisable: {e}") from None
    rng = capture_rng() if rng is None else rng
    rng_all = dist.all_gather_objects(_rng_payload(rng))
    weights = dist.full_state_dict(model, trainable_only=lora_cfg is not None)
    optim = _optimizer_files(model, optimizer)
    if dist.get_rank() != 0:
        dist.barrier()
        return None
    root = Path(run_dir) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    for stale in [*root.glob("*.tmp-*"), *root.glob("*.old-*")]:  # left by a crash mid-save
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
    name = f"step-{step:08d}"
    final = root / name
    try:
        with atomic_dir(final) as tmp:  # re-saving a step swaps, never leaving the name empty
            if lora_cfg is not None:
                save_adapter(None, tmp / "adapter", lora_cfg, state_dict=weights)
            elif getattr(model, "config", None) is None:  # a plain module (minicd.discriminative)
                (tmp / "model").mkdir()
                save_file({k: v.contiguous() for k, v in weights.items()},
                          str(tmp / "model" / "model.safetensors"), metadata={"format": "pt"})
            else:
                from minicd.model.hub import save_model

                save_model(model, tmp / "model", state_dict=weights)
            assert optim is not None
            tensors, meta = optim
            save_file(tensors, str(tmp / "optimizer.safetensors"), metadata={"format": "pt"})
            _write_json(tmp / "optimizer.json", meta)
            rng_tensors = {f"rank{r}.{k}": t for r, (_, ts) in enumerate(rng_all)
                           for k, t in ts.items()}
            save_file(rng_tensors, str(tmp / "rng.safetensors"))
            (tmp / "config.toml").write_text(config_text)
            state = {"format_version": FORMAT_VERSION, "step": step, "trainer": trainer_state or {},
                     "scheduler": None if scheduler is None else scheduler.state_dict(),
                     "rng": [meta_r for meta_r, _ in rng_all]}
            _write_json(tmp / TRAINER_STATE, state)  # last: marks the checkpoint complete
        write_text_atomic(root / LATEST, name + "\n")
    except BaseException:
        dist.barrier()
        raise
    if keep_last is not None:
        older = [p for p in _complete_checkpoints(root) if p != final]
        for p in older[: max(0, len(older) - (keep_last - 1))]:
            shutil.rmtree(p, ignore_errors=True)
    dist.barrier()
    return final


def _complete_checkpoints(root: Path) -> list[Path]:
    """Finished checkpoint dirs under ``root``, by ascending step."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.fullmatch(p.name)
             and (p / TRAINER_STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint named by ``checkpoints/latest``; if that is missing or incomplete, the
    complete checkpoint with the highest step; None when there is none. Temp dirs are ignored."""
    root = Path(run_dir) / CKPT_DIR
    pointer = root / LATEST
    if pointer.is_file():
        name = pointer.read_text().strip()
        if _STEP_DIR.fullmatch(name) and (root / name / TRAINER_STATE).is_file():
            return root / name
    done = _complete_checkpoints(root)
    return done[-1] if done else None


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Check, without loading tensors, that checkpoint ``path`` is whole: every file present,
    the JSON and TOML files parse, every safetensors file's header and size are intact. Raises
    CheckpointError naming the first bad file. Local (not collective)."""
    ckpt = Path(path)
    has_adapter = (ckpt / "adapter").is_dir()
    required = [*_REQUIRED, TRAINER_STATE, "adapter" if has_adapter else "model"]
    missing = [f for f in required if not (ckpt / f).exists()]
    if missing:
        raise CheckpointError(f"checkpoint {ckpt} is incomplete: missing {missing}; resume from "
                              "an earlier checkpoint or start fresh")
    fix = "resume from an earlier checkpoint (delete this one) or start fresh"
    state = read_json(ckpt / TRAINER_STATE, fix)
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        got = state.get("format_version") if isinstance(state, dict) else None
        raise CheckpointError(f"{ckpt / TRAINER_STATE}: key 'format_version' is {got!r}, this "
                              f"minicd reads {FORMAT_VERSION}")
    read_json(ckpt / "optimizer.json", fix)
    try:
        tomllib.loads((ckpt / "config.toml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise CheckpointError(f"{ckpt / 'config.toml'}: unreadable ({exc}); {fix}") from None
    tensors = [ckpt / "optimizer.safetensors", ckpt / "rng.safetensors"]
    if has_adapter:
        from minicd.model.lora import CONFIG_NAME, WEIGHTS_NAME

        read_json(ckpt / "adapter" / CONFIG_NAME, fix)
        tensors.append(ckpt / "adapter" / WEIGHTS_NAME)
    else:
        shards = sorted((ckpt / "model").glob("*.safetensors"))
        if not shards:
            raise CheckpointError(f"checkpoint {ckpt}: no weights in {ckpt / 'model'}; {fix}")
        tensors += shards
    for f in tensors:
        check_safetensors(f, fix)


def resume_checkpoint(run_dir: str | os.PathLike) -> Path:
    """The checkpoint to resume from: :func:`latest_checkpoint` if it passes
    :func:`verify_checkpoint`, else the newest earlier complete one that does (with a warning
    naming what was skipped and why); a CheckpointError saying how to start fresh when none
    does. Collective under torchrun (rank 0 reads the files and tells the others)."""
    root = Path(run_dir) / CKPT_DIR
    chosen, problem = None, f"no complete checkpoint under {root}"
    if dist.get_rank() == 0:
        latest = latest_checkpoint(run_dir)
        candidates = [] if latest is None else [latest]
        candidates += [p for p in reversed(_complete_checkpoints(root)) if p != latest]
        for path in candidates:
            try:
                verify_checkpoint(path)
            except CheckpointError as exc:
                print(f"warning: skipping checkpoint {path}: {exc}", file=sys.stderr)
                problem = f"no loadable checkpoint under {root} (newest: {exc})"
                continue
            if path != candidates[0]:
                print(f"warning: resuming from the earlier checkpoint {path}", file=sys.stderr)
            chosen = str(path)
            break
    chosen, problem = dist.all_gather_objects((chosen, problem))[0]
    if chosen is None:
        raise CheckpointError(f"--resume: {problem}; check the run directory, or drop --resume "
                              "(with --overwrite) to start a fresh run")
    return Path(chosen)


def load_checkpoint(path: str | os.PathLike, *, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None) -> dict:
    """Restore weights, optimizer and scheduler from ``path``; collective under FSDP2.

    Returns ``{"step", "trainer" (the caller's dict), "scheduler", "rng" (this rank's RngState,
    None if the world size changed), "config_text"}``. RNG is NOT restored here: call
    :func:`restore_rng` with the returned state (and the numpy Generator the data order uses).
    """
    ckpt = Path(path)
    has_adapter = (ckpt / "adapter").is_dir()
    if dist.get_rank() == 0:  # a bad file is named here, before any tensor is touched
        verify_checkpoint(ckpt)
    state = read_json(ckpt / TRAINER_STATE)
    _load_weights(ckpt, model, has_adapter)
    if optimizer is not None:
        _load_optimizer(ckpt, model, optimizer)
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    rank, world = dist.get_rank(), dist.get_world_size()
    rng = None
    if len(state["rng"]) == world:
        tensors = read_safetensors(ckpt / "rng.safetensors")
        meta = state["rng"][rank]
        rng = RngState(python=meta["python"], torch_cpu=tensors[f"rank{rank}.torch_cpu"],
                       cuda=[tensors[f"rank{rank}.cuda{i}"] for i in range(meta["cuda_devices"])],
                       numpy=meta["numpy"])
    return {"step": state["step"], "trainer": state["trainer"], "scheduler": state["scheduler"],
            "rng": rng, "config_text": (ckpt / "config.toml").read_text()}


def _load_weights(ckpt: Path, model: nn.Module, has_adapter: bool) -> None:
    if not dist.is_distributed():
        if has_adapter:
            load_adapter(model, ckpt / "adapter")
            return
        _load_full_single(ckpt / "model", model)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    sd: dict[str, torch.Tensor] = {}
    if dist.get_rank() == 0:
        sd = _read_weights(ckpt, model, has_adapter)
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    set_model_state_dict(model, sd, options=opts)


def _read_weights(ckpt: Path, model: nn.Module, has_adapter: bool) -> dict[str, torch.Tensor]:
    """Model-keyed tensors from ``adapter/`` (PEFT prefix dropped) or ``model/`` shards."""
    if has_adapter:
        from minicd.model.lora import PEFT_PREFIX, WEIGHTS_NAME

        raw = read_safetensors(ckpt / "adapter" / WEIGHTS_NAME)
        names = {_clean_name(n) for n, _ in model.named_parameters()}
        sd = {k.removeprefix(PEFT_PREFIX): v for k, v in raw.items()}
        unknown = sorted(set(sd) - names)
        if unknown:
            raise CheckpointError(f"{ckpt / 'adapter'}: tensors {unknown[:3]} have no parameter "
                                  "in the model; inject LoRA with the saved adapter config first")
        return sd
    sd = {}
    for f in sorted((ckpt / "model").glob("*.safetensors")):
        sd.update(read_safetensors(f))
    return sd


def _load_full_single(model_dir: Path, model: nn.Module) -> None:
    sd = _read_weights(model_dir.parent, model, has_adapter=False)
    result = model.load_state_dict(sd, strict=False)
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    missing = [k for k in result.missing_keys if not (tied and k == "lm_head.weight")]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{model_dir}: weights do not fit the model: missing {missing[:3]}, "
                              f"unexpected {result.unexpected_keys[:3]}")


# ------------------------------------------------------------------------------ config, export
def config_diff(old_text: str, new_text: str) -> list[str]:
    """Dotted keys whose values differ between two TOML texts (added and removed keys too)."""

    def flat(d: dict, prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    try:
        a, b = flat(tomllib.loads(old_text)), flat(tomllib.loads(new_text))
    except tomllib.TOMLDecodeError as e:
        raise CheckpointError(f"config_diff: invalid TOML: {e}") from None
    return sorted(k for k in set(a) | set(b) if a.get(k, _MISSING) != b.get(k, _MISSING))


_MISSING = object()


def export_merged(model: nn.Module, out_dir: str | os.PathLike, *,
                  dtype: torch.dtype | str | None = None,
                  tokenizer_dir: str | os.PathLike | None = None) -> Path | None:
    """HF-format weights with LoRA folded in (transformers / vLLM load it); collective.

    ``tokenizer_dir``: copy its tokenizer files next to the weights so the export is servable.
    Returns ``out_dir`` on rank 0, None elsewhere.
    """
    from minicd.model.hub import copy_tokenizer_files, save_model
    from minicd.model.lora import merged_state_dict

    if dist.is_distributed():
        full = dist.full_state_dict(model, trainable_only=False)
        if dist.get_rank() != 0:
            dist.barrier()
            return None
        merged = {}
        layers = lora_modules(model)
        for key, value in full.items():
            owner, _, leaf = key.rpartition(".")
            if re.search(r"(^|\.)lora_[AB]\.", key):
                continue
            m = layers.get(owner)
            if m is not None and leaf == "weight" and not m.merged:
                a, b = full[f"{owner}.lora_A.weight"].float(), full[f"{owner}.lora_B.weight"].float()
                value = (value.float() + (b @ a) * m.scaling).to(value.dtype)
            merged[key] = value
    else:
        merged = merged_state_dict(model)
    out = save_model(model, out_dir, dtype=dtype, state_dict=merged)
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, out)
    dist.barrier()
    return out


# ------------------------------------------------------------------------------------ signals
class SigtermFlag:
    """Context manager: SIGTERM/SIGINT only set ``triggered``; the loop polls it, saves, exits.

    A second SIGINT raises KeyboardInterrupt (to force quit). Previous handlers come back on exit.
    Outside the main thread no handler can be installed and the flag stays False.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self.signals = signals
        self.triggered = False
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    last_signum: int | None = None  # the latest signal any flag caught (see stop_signal)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.triggered and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.triggered, self.signum = True, signum
        SigtermFlag.last_signum = signum

    def any_rank(self) -> bool:
        """True if any rank was signalled (collective: every rank must call it together)."""
        return bool(dist.all_reduce_sum(float(self.triggered)).item() > 0)

    def __enter__(self) -> SigtermFlag:
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()


def stop_signal() -> int | None:
    """The signal that last stopped a training loop in this process (None: none did). The CLI
    exits with 128 + this number after the stop checkpoint is saved."""
    return SigtermFlag.last_signum
