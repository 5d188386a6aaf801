"""DINO (Caron et al., ICCV 2021): self-distillation from an EMA teacher with multi-crop.

Read top to bottom:

* **Views.** ``views[:2]`` are the global crops, ``views[2:]`` local crops (multi-crop). The
  student sees all views; the teacher only the global ones.
* **Heads.** Student and teacher end with a DINO head: an MLP (feat -> hidden -> hidden ->
  ``proj_dim`` bottleneck), L2 normalisation, then a weight-normalised linear layer onto
  ``dino_out_dim`` prototypes (norm fixed at 1), i.e. cosine logits. It is the submodule
  ``dino_head`` (not ``head``: its outputs are prototype scores, not an embedding to distil).
* **EMA teacher.** ``ema_backbone``/``ema_head`` are copies of the student, updated after each
  step as ``theta_t <- m theta_t + (1 - m) theta_s`` with ``m`` raised from ``ema_momentum`` to 1
  by a cosine schedule over the run: momentum encoders (:mod:`.momentum`), which follow the
  method's train mode (batch statistics, as DINO's teacher) and are re-copied from the student at
  the first training forward.
* **Centring and sharpening.** The teacher's outputs minus the centre ``c`` (an EMA, momentum
  ``dino_center_momentum``, of the teacher's batch mean over all ranks) go through a softmax at a
  low temperature; centring keeps one prototype from dominating, sharpening keeps the output from
  going uniform. The teacher temperature warms up linearly from ``dino_warmup_teacher_temp`` over
  the first ``dino_warmup_teacher_temp_frac`` of the run.
* **Loss.** :func:`s2bnn.losses.dino_loss`: cross-entropy of every student view against every
  teacher (global) view except the same view.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from s2bnn.distributed import all_reduce_mean
from s2bnn.errors import ConfigError
from s2bnn.losses import dino_loss
from s2bnn.methods.base import Method, check_views
from s2bnn.methods.momentum import MomentumEncoders
from s2bnn.methods.registry import BuildContext, check_range, register_method

if TYPE_CHECKING:
    from s2bnn.config import MethodConfig

__all__ = ["DINOHead", "DINO", "cosine_momentum"]


def cosine_momentum(base: float, step: int, total_steps: int) -> float:
    """EMA momentum at ``step``: ``1 - (1 - base) * (cos(pi * step / total) + 1) / 2``."""
    frac = min(max(step, 0), total_steps) / max(total_steps, 1)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * frac) + 1.0) / 2.0


class DINOHead(nn.Module):
    """MLP -> L2 norm -> cosine similarity to ``out_dim`` learnable prototypes."""

    def __init__(self, in_dim: int, hidden_dim: int, bottleneck_dim: int, out_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )
        # Weight normalisation with the norm fixed to 1, written out: the prototypes are
        # normalised in forward, so only their directions are learnt.
        self.prototypes = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        nn.init.trunc_normal_(self.prototypes, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.mlp(x), dim=1)
        return z @ F.normalize(self.prototypes, dim=1).t()


def _by_resolution(views: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Consecutive views of equal shape, grouped (each group is one forward pass)."""
    groups: list[list[torch.Tensor]] = []
    for v in views:
        if groups and groups[-1][0].shape == v.shape:
            groups[-1].append(v)
        else:
            groups.append([v])
    return groups


@register_method
class DINO(Method, MomentumEncoders):
    """Student backbone + DINO head, EMA teacher, multi-crop, centring and sharpening."""

    name = "dino"

    @classmethod
    def views_needed(cls, cfg: MethodConfig) -> int:
        return 2

    @classmethod
    def check_config(cls, cfg: MethodConfig) -> None:
        for key in ("ema_momentum", "dino_center_momentum", "dino_warmup_teacher_temp_frac"):
            check_range(cfg, key, 0.0, 1.0)
        for key in ("dino_student_temp", "dino_teacher_temp", "dino_warmup_teacher_temp"):
            check_range(cfg, key, 0.0, strict_low=True)
        if cfg.proj_hidden_dim == 0:  # DINO's head is a 3-layer MLP; it has no linear form
            raise ConfigError("method.proj_hidden_dim must be > 0 for dino (0, a linear head, "
                              "is for mocov2, s2bnn and seed)")

    @classmethod
    def from_config(cls, cfg: MethodConfig, backbone: nn.Module, ctx: BuildContext) -> DINO:
        return cls(
            backbone, total_steps=ctx.total_steps, out_dim=cfg.dino_out_dim,
            bottleneck_dim=cfg.proj_dim, hidden_dim=cfg.proj_hidden_dim,
            student_temp=cfg.dino_student_temp, teacher_temp=cfg.dino_teacher_temp,
            warmup_teacher_temp=cfg.dino_warmup_teacher_temp,
            warmup_frac=cfg.dino_warmup_teacher_temp_frac,
            center_momentum=cfg.dino_center_momentum, ema_momentum=cfg.ema_momentum,
        )

    def __init__(
        self,
        backbone: nn.Module,
        *,
        total_steps: int,
        out_dim: int = 4096,
        bottleneck_dim: int = 128,
        hidden_dim: int | None = None,
        student_temp: float = 0.1,
        teacher_temp: float = 0.04,
        warmup_teacher_temp: float = 0.04,
        warmup_frac: float = 0.0,
        center_momentum: float = 0.9,
        ema_momentum: float = 0.996,
    ) -> None:
        super().__init__(backbone)
        feat = int(backbone.feature_dim)
        self.dino_head = DINOHead(feat, hidden_dim or feat, bottleneck_dim, out_dim)
        self.ema_backbone = self.add_momentum_copy("ema_backbone", backbone)
        self.ema_head = self.add_momentum_copy("ema_head", self.dino_head)
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        self.student_temp = student_temp
        self.teacher_temp = teacher_temp
        self.warmup_teacher_temp = warmup_teacher_temp
        self.warmup_frac = warmup_frac
        self.set_total_steps(total_steps)
        self.center_momentum = center_momentum
        self.ema_momentum = ema_momentum
        self._ddp_ignored = ["ema_backbone", "ema_head", "center"]
        self._pending_center: torch.Tensor | None = None

    def set_total_steps(self, total_steps: int) -> None:
        self.total_steps = max(int(total_steps), 1)
        self.warmup_steps = int(self.warmup_frac * self.total_steps)

    def teacher_temp_at(self, step: int) -> float:
        """Linear warm-up from ``warmup_teacher_temp`` to ``teacher_temp``."""
        if step >= self.warmup_steps:
            return self.teacher_temp
        frac = step / self.warmup_steps
        return self.warmup_teacher_temp + frac * (self.teacher_temp - self.warmup_teacher_temp)

    def forward(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        check_views(views, self.name, 2)
        if self.training:
            self.sync_momentum(self.backbone, self.dino_head)
        student_out: list[torch.Tensor] = []
        for group in _by_resolution(list(views)):
            out = self.dino_head(self.backbone(torch.cat(group)))
            student_out.extend(out.chunk(len(group)))
        with torch.no_grad():
            teacher_out = list(self.ema_head(self.ema_backbone(torch.cat(views[:2]))).chunk(2))
        temp = self.teacher_temp_at(int(self.steps_done))
        loss = dino_loss(student_out, teacher_out, self.center, self.student_temp, temp)
        self._pending_center = torch.cat(teacher_out).float().mean(dim=0, keepdim=True)
        logs = {"loss_dino": loss.detach(),
                "teacher_temp": torch.tensor(temp, device=loss.device)}
        return loss, logs

    @torch.no_grad()
    def on_train_step_end(self, step: int, total_steps: int) -> None:
        m = cosine_momentum(self.ema_momentum, step, total_steps)
        self.update_momentum(m, self.backbone, self.dino_head)
        if self._pending_center is not None:
            batch_center = all_reduce_mean(self._pending_center)
            self.center.mul_(self.center_momentum).add_(
                batch_center * (1.0 - self.center_momentum))
            self._pending_center = None
        self.steps_done.add_(1)
