"""Momentum (EMA) encoders, written once for MoCo v2's key encoder, the online teacher and DINO.

A momentum encoder is a frozen copy of an online module that follows it after every optimiser
step, ``theta_t <- m theta_t + (1 - m) theta_s``. Two rules hold for every one of them:

* the copy is (re)synchronised from the online module at the first *training* forward, after DDP
  has broadcast the student, so all ranks start equal even if they were initialised differently;
  a flag buffer (``initialized``) keeps a resumed run from re-copying;
* it follows the owner's train/eval mode (batch statistics in training, as MoCo and DINO do).

:class:`MomentumEncoders` holds the pairs; the owning module names where the copies live, so the
state-dict keys are the owner's (``key_backbone``, ``ema_head``...) and old checkpoints load.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from s2bnn.methods.base import frozen_copy

__all__ = ["MomentumEncoders", "ema_update"]


@torch.no_grad()
def ema_update(targets: Sequence[nn.Module], sources: Sequence[nn.Module], momentum: float
               ) -> None:
    """``theta_t <- m theta_t + (1 - m) theta_s`` for every parameter of each (target, source)."""
    for dst, src in zip(targets, sources):
        torch._foreach_lerp_(list(dst.parameters()), [p.detach() for p in src.parameters()],
                             1.0 - momentum)


class MomentumEncoders(nn.Module):
    """A mixin for a module that owns momentum copies of online modules.

    Call :meth:`add_momentum_copy` in ``__init__`` for each online module, then
    :meth:`sync_momentum` at the start of each training forward and :meth:`update_momentum`
    after each optimiser step. The online modules are passed to the calls, not stored: they may
    belong to another module (MoCo's query encoder is the method's student).
    """

    def __init__(self) -> None:
        super().__init__()
        self._copies: list[str] = []
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self._synced = False

    def add_momentum_copy(self, name: str, online: nn.Module) -> nn.Module:
        """Register a frozen copy of ``online`` as the submodule ``name``."""
        self.add_module(name, frozen_copy(online))
        self._copies.append(name)
        return getattr(self, name)

    def _momentum_targets(self) -> list[nn.Module]:
        return [getattr(self, name) for name in self._copies]

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        self._synced = False  # loaded copies (and flag) replace whatever was synced before
        super()._load_from_state_dict(*args, **kwargs)

    @torch.no_grad()
    def sync_momentum(self, *online: nn.Module) -> None:
        """Copy ``online`` (in :meth:`add_momentum_copy` order) into the copies, once per run:
        the first call in a fresh run copies, later calls and resumed runs do nothing."""
        if self._synced:
            return
        if not bool(self.initialized):
            for src, dst in zip(online, self._momentum_targets()):
                dst.load_state_dict(src.state_dict())
            self.initialized.fill_(True)
        self._synced = True

    def update_momentum(self, momentum: float, *online: nn.Module) -> None:
        """One EMA step of every copy towards its online module."""
        ema_update(self._momentum_targets(), online, momentum)
