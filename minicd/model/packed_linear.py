"""oneDNN-packed linear weights for CPU generation.

A decode step multiplies a few dozen rows by every weight matrix of the model; for such skinny
products on the CPU, oneDNN with the weight reordered once into its blocked layout
(``torch.ops.mkldnn._reorder_linear_weight`` / ``_linear_pointwise``, the kernels inductor's CPU
backend uses) ran 1.4x faster than ``F.linear`` (MKL) on SmolLM2's MLP shapes, 64 rows, 2 threads
(1.3x on a 2,048-row prefill).

:func:`packed_linears` attaches a packed copy of every large ``nn.Linear`` weight of a model for
the duration of a ``with`` block (the weights must not change inside it, as during one rollout
call), and :func:`base_linear` is the product every linear layer computes: packed when a copy is
attached, else ``F.linear``. Packing costs one pass over the weights (~80 ms for SmolLM2) and
their size in extra memory while the block runs; it is skipped where the kernels are missing
(torch built without oneDNN), off the CPU, for dtypes other than fp32/bf16 and for sharded
(FSDP2) weights.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

_ATTR = "_packed_weight"
MIN_PACKED_ELEMENTS = 65_536  # smaller weights (LoRA A/B factors) stay on F.linear
PACK_ROWS_HINT = 64           # the row count oneDNN chooses its layout for (a GRPO decode batch)


def base_linear(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``x @ W.T + b`` of ``module`` (``x`` ``[..., in]`` -> ``[..., out]``), through the packed
    weight when :func:`packed_linears` attached one and ``x`` has the weight's dtype."""
    packed = module.__dict__.get(_ATTR)
    if packed is not None and x.dtype == packed.dtype:
        return packed_product(x, packed, module.bias)
    return F.linear(x, module.weight, module.bias)


def packed_product(x: torch.Tensor, packed: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """oneDNN's ``x @ W.T + b`` with ``packed`` = ``_reorder_linear_weight(W)``."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def packing_supported(model: nn.Module) -> bool:
    """Whether :func:`packed_linears` would pack anything for ``model``: a CPU model in fp32 or
    bf16, unsharded, on a torch built with oneDNN and its packed-linear kernels."""
    try:
        ops = (torch.ops.mkldnn._reorder_linear_weight, torch.ops.mkldnn._linear_pointwise)
    except (AttributeError, RuntimeError):
        return False
    if not (all(ops) and torch.backends.mkldnn.is_available()):
        return False
    p = next(model.parameters(), None)
    return (p is not None and p.device.type == "cpu" and p.dtype in (torch.float32, torch.bfloat16)
            and type(p.data) is torch.Tensor)  # a DTensor (FSDP2 shard) is not packed


def _packable(m: nn.Module) -> bool:
    w = getattr(m, "weight", None)
    return (isinstance(m, nn.Linear) and isinstance(w, torch.Tensor)
            and w.numel() >= MIN_PACKED_ELEMENTS and type(w.data) is torch.Tensor)


@contextlib.contextmanager
def packed_linears(model: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Attach packed weights to the large linear layers of ``model`` inside the block (yields
    how many were packed; 0 when disabled or unsupported). Plain ``nn.Linear`` layers get an
    instance ``forward`` calling :func:`base_linear`; subclasses that call :func:`base_linear`
    themselves (``LoRALinear``) only get the packed weight. Everything is removed on exit."""
    if not (enabled and packing_supported(model)):
        yield 0
        return
    done = []
    try:
        with torch.no_grad():
            for m in model.modules():
                if not (_packable(m) and (type(m) is nn.Linear
                                          or getattr(m, "uses_base_linear", False))):
                    continue
                w = m.weight.detach()
                m.__dict__[_ATTR] = torch.ops.mkldnn._reorder_linear_weight(w, PACK_ROWS_HINT)
                if type(m) is nn.Linear:
                    m.forward = lambda x, m=m: base_linear(m, x)
                done.append(m)
        yield len(done)
    finally:
        for m in done:
            m.__dict__.pop(_ATTR, None)
            m.__dict__.pop("forward", None)
