"""The shared base of every self-supervised method, and the small parts methods share.

A method is an ``nn.Module`` that owns the student ``backbone`` (the network evaluated after
training), its projection head and whatever else its loss needs (a frozen teacher, a momentum
key encoder, a queue, an EMA teacher, a centre). The engine drives it with three calls::

    loss, logs = method(views)            # one training step's loss and detached scalar logs
    loss.backward(); optimizer.step()
    method.on_train_step_end(step, total_steps)   # momentum/EMA updates, queue bookkeeping

Everything a resume needs is a parameter or a buffer, so ``training_state()`` (the state dict
less the offline teacher, which is reloaded from its own file) is the whole state.
Modules that no optimiser may touch have ``requires_grad=False``; those listed by
``ddp_ignored_names()`` (frozen teacher, momentum copies, queues) are left alone by DDP, which
would otherwise broadcast them every step. The student's projection head is always the submodule
``head`` (state-dict prefix ``head.``, :data:`s2bnn.teachers.PROJECTION_HEAD_PREFIX`), so a run of
any method can later serve as a teacher.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from s2bnn.distributed import all_gather_nograd
from s2bnn.errors import ConfigError

if TYPE_CHECKING:
    from s2bnn.config import MethodConfig
    from s2bnn.methods.registry import BuildContext

__all__ = [
    "Method",
    "mlp_head",
    "queue_length",
    "KeyQueue",
    "frozen_copy",
    "check_views",
    "distill_over_views",
    "mix_pairs",
    "sample_mixup",
]

QUEUE_MULTIPLE = 256  # queue lengths are rounded down to a multiple of this (a typical batch)


class Method(nn.Module):
    """Base class: a student ``backbone`` plus the parts one method's loss needs."""

    name: str = "method"

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        # Submodules kept in eval mode whatever method.train() is asked (the offline teacher).
        self._always_eval: list[str] = []
        # Submodule/buffer names (prefixes) whose parameters and buffers DDP must not touch.
        self._ddp_ignored: list[str] = []
        # Submodules loaded from a file of their own and never changed (the offline teacher):
        # left out of checkpoints, which would otherwise carry e.g. a ResNet-50 (~100 MB) each.
        self._frozen: list[str] = []

    # ---------------------------------------------------------------- config (registry)
    @classmethod
    def views_needed(cls, cfg: MethodConfig) -> int:
        """Augmented views per image this method trains on with ``cfg``."""
        return 1

    @classmethod
    def check_config(cls, cfg: MethodConfig) -> None:
        """Refuse bad values of this method's own ``method.*`` keys (one-line ConfigError)."""

    @classmethod
    def from_config(cls, cfg: MethodConfig, backbone: nn.Module, ctx: BuildContext) -> Method:
        """Build the method from its config around the student ``backbone``."""
        raise NotImplementedError

    # ---------------------------------------------------------------- training
    def forward(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One training step on a list of augmented views: ``(loss, detached scalar logs)``."""
        raise NotImplementedError

    def on_train_step_end(self, step: int, total_steps: int) -> None:
        """Called after ``optimizer.step()``: momentum/EMA updates and queue bookkeeping."""

    def set_total_steps(self, total_steps: int) -> None:
        """The run's length once it is known (a time budget is measured after the method is
        built); methods with step schedules fixed at construction override this."""

    def ddp_ignored_names(self) -> list[str]:
        """Fully qualified names of the parameters and buffers DDP must leave alone."""
        names = [n for n, _ in self.named_parameters()] + [n for n, _ in self.named_buffers()]
        return [n for n in names
                if any(n == p or n.startswith(p + ".") for p in self._ddp_ignored)]

    def attach_offline_teacher(self, teacher: nn.Module) -> None:
        """Hold ``teacher`` as the frozen submodule ``teacher``: no grad, always in eval mode,
        ignored by DDP and left out of :meth:`training_state`."""
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.teacher = teacher.eval()
        self._always_eval.append("teacher")
        self._ddp_ignored.append("teacher")
        self._frozen.append("teacher")

    def offline_targets(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """The offline teacher's embedding of each view (one batched forward when shapes allow)."""
        with torch.no_grad():
            if all(v.shape == views[0].shape for v in views):
                return list(self.teacher(torch.cat(views)).chunk(len(views)))
            return [self.teacher(v) for v in views]

    def _is_frozen(self, key: str) -> bool:
        return any(key.startswith(prefix + ".") for prefix in self._frozen)

    def training_state(self) -> dict[str, torch.Tensor]:
        """``state_dict()`` without the frozen submodules: what a checkpoint must hold."""
        return {k: v for k, v in self.state_dict().items() if not self._is_frozen(k)}

    def load_training_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load a :meth:`training_state` (frozen keys in ``state``, as older checkpoints hold
        them, are ignored). Raises ``RuntimeError`` on any other missing or unexpected key."""
        state = {k: v for k, v in state.items() if not self._is_frozen(k)}
        result = self.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not self._is_frozen(k)]
        if missing or result.unexpected_keys:
            raise RuntimeError(
                f"missing keys {missing[:3]}, unexpected keys {result.unexpected_keys[:3]}"
            )

    def frozen_fingerprint(self) -> str | None:
        """A cheap digest of the frozen submodules' tensors (``None`` when there are none), so a
        resume can tell that the teacher file changed under a run."""
        if not self._frozen:
            return None
        total = 0.0  # a Python float: the tensors may live on any device
        for key, value in self.state_dict().items():
            if self._is_frozen(key) and value.is_floating_point():
                v = value.detach().double()
                total += float(v.sum() + (v * v).sum() * 1e-3 + v.numel())
        return f"{total:.10e}"

    def train(self, mode: bool = True) -> Method:
        super().train(mode)
        for name in self._always_eval:
            getattr(self, name).eval()
        return self


def mlp_head(in_dim: int, hidden_dim: int | None, out_dim: int) -> nn.Module:
    """MoCo v2's projection head: Linear(in, hidden), ReLU, Linear(hidden, out).

    The layer indices (0 and 2) match the official MoCo v2 ``fc.0``/``fc.2`` keys.
    ``hidden_dim`` ``None`` is ``in_dim`` (``method.proj_hidden_dim``'s default); ``0`` gives one
    ``Linear(in, out)`` instead (MoCo v1's head).
    """
    if hidden_dim is None:
        hidden_dim = in_dim
    if hidden_dim == 0:
        return nn.Linear(in_dim, out_dim)
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim)
    )


def queue_length(requested: int, num_train: int, multiple: int = QUEUE_MULTIPLE) -> int:
    """The queue length actually used: at most the number of training images.

    A queue longer than the dataset would hold several stale keys of the same image as
    negatives. The result is rounded down to a multiple of ``multiple`` when it exceeds it,
    so that usual batch sizes tile it (the enqueue wraps around in any case).
    """
    n = max(1, min(int(requested), int(num_train)))
    return n - n % multiple if n >= multiple else n


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy with every parameter's ``requires_grad`` off (momentum/EMA encoders)."""
    clone = copy.deepcopy(module)
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone


def check_views(views: list[torch.Tensor], method: str, need: int) -> None:
    """Raise a one-line :class:`ConfigError` when fewer than ``need`` views arrive."""
    if not isinstance(views, (list, tuple)) or len(views) < need:
        got = len(views) if isinstance(views, (list, tuple)) else "a bare tensor, not a list of"
        raise ConfigError(
            f"method '{method}' needs {need} augmented views per image, got {got}; "
            f"set data.augment.num_views={need}"
        )


def distill_over_views(
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    students: list[torch.Tensor], targets: list[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distillation over several views: the mean over views of ``loss(student, target)``, and
    the mean student-teacher cosine (a detached log). With several views each image gives that
    many student-teacher pairs a step; the loss keeps the scale of one view."""
    value = torch.stack([loss(s, t) for s, t in zip(students, targets)]).mean()
    cosine = torch.stack([
        (s.detach().float() * t.float()).sum(1).mean() for s, t in zip(students, targets)
    ]).mean()
    return value, cosine


class KeyQueue(nn.Module):
    """A FIFO of ``length`` unit vectors (``keys``: length x dim), filled from every rank.

    Starts with random unit vectors drawn from a fixed-seed generator, so every rank starts
    with the same queue without communication and the global RNG stream is not consumed.
    """

    def __init__(self, length: int, dim: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        keys = nn.functional.normalize(torch.randn(length, dim, generator=gen), dim=1)
        self.register_buffer("keys", keys)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def push(self, batch: torch.Tensor) -> None:
        """Append this step's keys from all ranks (rank order), overwriting the oldest."""
        batch = all_gather_nograd(batch.detach().contiguous()).to(self.keys.dtype)
        length = self.keys.shape[0]
        if batch.shape[0] > length:
            batch = batch[-length:]
        # Index arithmetic on the device: no host sync to read the pointer.
        idx = (torch.arange(batch.shape[0], device=batch.device) + self.ptr) % length
        self.keys.index_copy_(0, idx, batch)
        self.ptr.copy_((self.ptr + batch.shape[0]) % length)


def mix_pairs(x: torch.Tensor, lam: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Mixup of a batch with a permutation of itself: ``lam_i * x_i + (1 - lam_i) * x_perm_i``."""
    lam = lam.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
    return lam * x + (1 - lam) * x[perm]


def sample_mixup(n: int, alpha: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image mixing weights ``~ Beta(alpha, alpha)`` and a random partner for each image."""
    a = torch.full((n,), float(alpha), device=device)
    lam = torch.distributions.Beta(a, a).sample()
    return lam, torch.randperm(n, device=device)
