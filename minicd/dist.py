"""Process group set-up and FSDP2 sharding.

One process per device, launched by ``torchrun``. On GPUs the backend is NCCL and each rank owns
``cuda:LOCAL_RANK``; on CPU it is gloo. A single process (no torchrun variables) runs without a
process group and every helper here degrades to the obvious single-rank behaviour, so stage loops
never branch on "distributed or not".

FSDP2 (``torch.distributed.fsdp.fully_shard``) shards each decoder block, then the root module
(embeddings, final norm, lm_head). Frozen base weights and trainable LoRA tensors live in the same
unit; only trainable parameters go to the optimizer.
"""

from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch import nn

from minicd.errors import ConfigError, DistributedError

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: rank, world size, local rank and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto", backend: str | None = None,
                     timeout_s: float = 1800.0) -> DistInfo:
    """Initialise the process group from torchrun's environment.

    ``device``: "auto" (CUDA when available, else CPU), "cpu" or "cuda". ``backend`` defaults to
    NCCL on CUDA and gloo on CPU. Without torchrun variables this returns a single-rank
    :class:`DistInfo` and creates no process group.
    """
    present = [v for v in _TORCHRUN_VARS if v in os.environ]
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"train.device = {device!r}: expected 'auto', 'cpu' or 'cuda'")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("train.device = 'cuda' but no CUDA device is visible; use 'cpu' or 'auto'")
    if not present:
        dev = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(dev)
        return DistInfo(rank=0, world_size=1, local_rank=0, device=dev)
    missing = [v for v in _TORCHRUN_VARS if v not in os.environ]
    if missing:
        raise DistributedError(
            f"partial torchrun environment: {', '.join(present)} set but {', '.join(missing)} missing; "
            "launch with `torchrun --nproc_per_node N ...` or unset these variables for one process")
    try:
        rank = int(os.environ["RANK"])
        world = int(os.environ["WORLD_SIZE"])
        local = int(os.environ["LOCAL_RANK"])
    except ValueError as exc:
        raise DistributedError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers: {exc}") from exc
    if not 0 <= rank < world:
        raise DistributedError(f"RANK={rank} outside [0, WORLD_SIZE={world})")
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise DistributedError(
                f"LOCAL_RANK={local} but only {torch.cuda.device_count()} CUDA devices are visible")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    backend = backend or ("nccl" if use_cuda else "gloo")
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"backend": backend, "timeout": datetime.timedelta(seconds=timeout_s)}
        if use_cuda:
            kwargs["device_id"] = dev
        dist.init_process_group(**kwargs)
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev)


def destroy_distributed(*, sync: bool = False) -> None:
    """Tear down the process group if one exists (safe to call always).

    With ``sync`` the ranks first meet at a barrier, so none closes its connections while another
    is still using them (entry points then leave through :func:`exit_process`)."""
    if dist.is_available() and dist.is_initialized():
        if sync and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def exit_process(code: int = 0) -> None:
    """End a torchrun entry point: ``sys.exit`` for one process; for a rank of a multi-process
    run, flush stdout/stderr and leave with ``os._exit``, skipping interpreter finalisation.

    Call it after every output is written and closed and :func:`destroy_distributed` ran. FSDP2's
    device mesh still references the gloo backend then, and its teardown during finalisation
    occasionally aborts a rank ("terminate called without an active exception"; seen about 1 run
    in 15 on a loaded 2-core machine), which fails the whole torchrun after the work is done."""
    world = os.environ.get("WORLD_SIZE", "1")
    if world.isdigit() and int(world) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(value: torch.Tensor | float) -> torch.Tensor:
    """Sum a tensor (or float) over ranks; returns a new tensor (float64 for Python numbers)."""
    t = value.detach().clone() if isinstance(value, torch.Tensor) else torch.tensor(float(value), dtype=torch.float64)
    if is_distributed():
        if dist.get_backend() == "nccl" and t.device.type != "cuda":
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Broadcast a picklable Python object from ``src`` to every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj: Any) -> list[Any]:
    """Gather one picklable object per rank, in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


_MP_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
              "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}


def mp_dtype(name: str) -> torch.dtype:
    """The torch dtype of a ``train.mixed_precision`` name."""
    if name not in _MP_DTYPES:
        raise ConfigError(f"train.mixed_precision = {name!r}: expected one of "
                          f"{', '.join(sorted(_MP_DTYPES))}")
    return _MP_DTYPES[name]


def shard_model(model: nn.Module, *, mixed_precision: str | None = None,
                reshard_after_forward: bool = True) -> nn.Module:
    """Apply FSDP2 ``fully_shard`` to each decoder block, then to the root.

    ``mixed_precision`` (e.g. "bfloat16") sets a ``MixedPrecisionPolicy`` computing in that dtype
    with fp32 gradient reduction; None keeps the parameters' dtype. A no-op without a process
    group, so single-process runs use the plain module.
    """
    if not is_distributed():
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs: dict[str, Any] = {"reshard_after_forward": reshard_after_forward}
    if mixed_precision is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=mp_dtype(mixed_precision),
                                                   reduce_dtype=torch.float32)
    layers = _decoder_layers(model)
    for block in layers:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def _decoder_layers(model: nn.Module) -> Iterable[nn.Module]:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise DistributedError(f"{type(model).__name__} has no model.layers to shard per block")
    return list(layers)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters with ``requires_grad`` (LoRA tensors when adapters are used) for the optimizer."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters: enable LoRA (lora.r > 0) "
                          "or set lora.enabled = false for full fine-tuning")
    return params


def full_state_dict(model: nn.Module, *, trainable_only: bool = True) -> dict[str, torch.Tensor]:
    """Gather full (unsharded) tensors on CPU; meaningful on rank 0, empty elsewhere when sharded.

    ``trainable_only`` keeps only parameters with ``requires_grad`` (the adapter for LoRA runs).
    Every rank must call this (it is collective under FSDP2).
    """
    if not is_distributed():
        keep = {n for n, p in model.named_parameters() if p.requires_grad}
        return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()
                if not trainable_only or k in keep}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    return get_model_state_dict(model, options=opts)

