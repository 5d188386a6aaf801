"""SEED (Fang et al., ICLR 2021): self-supervised distillation through similarity distributions.

The frozen teacher embeds each view; a queue holds past teacher embeddings. Student and teacher
each turn their similarities to (the teacher's own embedding, then the queue) into a softmax with
their own temperature, and the student matches the teacher's distribution
(:func:`s2bnn.losses.seed_loss`). With several views the loss is averaged over views, as in
:mod:`.s2bnn`; the teacher embeddings of the first view are queued after each step (gathered
from all ranks).

Temperatures: the official SEED code (jacobswan1/SEED, ``tools/opts.py``) defaults to 0.2 for the
student (``--temp``) and 1e-4 for the teacher (``--distill-t``), which makes the teacher's
distribution almost one-hot on its own embedding; those are the defaults here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from s2bnn.errors import ConfigError
from s2bnn.losses import seed_loss
from s2bnn.methods.base import (
    KeyQueue,
    Method,
    check_views,
    distill_over_views,
    mlp_head,
    queue_length,
)
from s2bnn.methods.registry import BuildContext, check_range, offline_teacher, register_method

if TYPE_CHECKING:
    from s2bnn.config import MethodConfig

__all__ = ["SEED"]


@register_method
class SEED(Method):
    """Student backbone + MLP head distilled from a frozen teacher through a queue."""

    name = "seed"

    @classmethod
    def check_config(cls, cfg: MethodConfig) -> None:
        check_range(cfg, "seed_student_temp", 0.0, strict_low=True)
        check_range(cfg, "seed_teacher_temp", 0.0, strict_low=True)
        if cfg.teacher.kind != "offline":
            raise ConfigError("method 'seed' distils from an offline teacher only; "
                              "set method.teacher.kind=offline")

    @classmethod
    def from_config(cls, cfg: MethodConfig, backbone: nn.Module, ctx: BuildContext) -> SEED:
        teacher = offline_teacher(cfg.teacher, cls.name, ctx.in_chans, cfg.proj_dim)
        return cls(backbone, teacher=teacher, proj_dim=cfg.proj_dim,
                   hidden_dim=cfg.proj_hidden_dim,
                   queue_len=queue_length(cfg.queue_size, ctx.num_train),
                   student_temp=cfg.seed_student_temp, teacher_temp=cfg.seed_teacher_temp)

    def __init__(
        self,
        backbone: nn.Module,
        *,
        teacher: nn.Module,
        proj_dim: int = 128,
        hidden_dim: int | None = None,
        queue_len: int = 65536,
        student_temp: float = 0.2,
        teacher_temp: float = 1e-4,
    ) -> None:
        super().__init__(backbone)
        feat = int(backbone.feature_dim)
        self.head = mlp_head(feat, hidden_dim, proj_dim)
        self.attach_offline_teacher(teacher)
        self.queue = KeyQueue(queue_len, proj_dim)
        self.student_temp = student_temp
        self.teacher_temp = teacher_temp
        self._ddp_ignored.append("queue")
        self._pending: torch.Tensor | None = None

    def forward(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        check_views(views, self.name, 1)
        targets = self.offline_targets(views)
        students = [F.normalize(self.head(self.backbone(v)), dim=1) for v in views]
        loss, cosine = distill_over_views(
            lambda s, t: seed_loss(s, t, self.queue.keys, self.student_temp, self.teacher_temp),
            students, targets)
        self._pending = targets[0].detach()
        return loss, {"loss_seed": loss.detach(), "cosine": cosine}

    def on_train_step_end(self, step: int, total_steps: int) -> None:
        if self._pending is not None:
            self.queue.push(self._pending)
            self._pending = None
