"""Ranks step together through rank-sharded generation with a collective (FSDP2) model.

Under FSDP2 every forward of the policy all-gathers each block's parameters, so every rank must
run the same NUMBER of forwards (their shapes may differ: an all-gather moves parameters, not
activations). When each rank decodes its own prompts, ranks need different numbers of decode
steps. :class:`Lockstep` keeps them in step without touching the decode loop:

* a forward pre-hook on the model (run before FSDP2's own hooks) has each working rank vote
  "busy" in an all-reduce before each real forward;
* a rank that has finished its own generations (leaving the context) votes "idle" and runs a
  1-token dummy forward for every busy vote it sees, until a vote finds no rank busy.

So every rank makes the same sequence of (vote, forward) pairs, and the collectives of real and
dummy forwards match one to one. The cost is one small all-reduce (and its host sync) per forward.
"""

from __future__ import annotations

import torch
import torch.distributed as tdist
from torch import nn


def is_sharded(model: nn.Module) -> bool:
    """True when ``model`` holds FSDP2 (DTensor) parameters in a multi-rank process group."""
    if not (tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1):
        return False
    return any(hasattr(p, "full_tensor") for p in model.parameters())


class Lockstep:
    """Context manager: inside it this rank's forwards of ``model`` are matched by dummy forwards
    on ranks that have already left it (see the module docstring). ``device``: where the vote
    tensor lives (the CUDA device under NCCL)."""

    def __init__(self, model: nn.Module, device: torch.device | str) -> None:
        self.model = model
        self.device = torch.device(device)
        self._handle = None
        self._dummy = False
        self.dummy_forwards = 0  # how many forwards this rank ran for the others (for tests)

    def _vote(self, busy: int) -> int:
        flag = torch.tensor([busy], dtype=torch.int32, device=self.device)
        tdist.all_reduce(flag)
        return int(flag.item())  # the host must know whether to go on: one sync per forward

    def _pre_forward(self, module, args, kwargs):
        if not self._dummy:
            self._vote(1)

    def __enter__(self) -> "Lockstep":
        # prepend: the vote must precede FSDP2's root all-gather, which the idle ranks only
        # reach inside their dummy forward
        self._handle = self.model.register_forward_pre_hook(self._pre_forward, prepend=True,
                                                            with_kwargs=True)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._handle.remove()
        if exc_type is not None:  # do not wait for ranks that may never vote again
            return
        modes = {m: m.training for m in self.model.modules()}
        self.model.eval()  # no dropout: the global RNG stays as on the busy ranks
        ids = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        try:
            with torch.no_grad():
                while self._vote(0) > 0:
                    self._dummy = True
                    try:
                        self.model(ids, logits_to_keep=1)
                    finally:
                        self._dummy = False
                    self.dummy_forwards += 1
        finally:
            for m, training in modes.items():
                m.training = training
