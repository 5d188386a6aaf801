"""S2-BNN (Shen et al., CVPR 2021): distil a real-valued self-supervised teacher into a student.

For every view ``x`` of an image (the teacher sees the *same* augmented view as the student)::

    s = normalize(head(backbone(x)))          # student: backbone + MLP head (feat -> feat -> D)
    t = teacher(x)                             # frozen, eval mode, no autograd; unit vectors
    L_distill = soft_cross_entropy(s, t, tau)  # -mean_n sum_c softmax(t/tau) log softmax(s/tau)
    # with K teachers (method.teacher.extra_paths): s has K unit blocks, L = mean_k L(s_k, t_k)

    loss = distill_weight * mean_over_views(L_distill)                        # strategy 3
         + contrastive_weight * info_nce(s_view0, key(view1), queue, tau)     # strategy 2, > 0

``distill_views`` says which views the distillation term covers: ``first`` distils the first
(query) view only, as the reference code does (S2-BNN ``Distillation_only`` and
``Contrastive+Distillation`` ``main_moco.py`` feed ``images[0]`` to student and teacher; the key
view ``images[1]`` only enters the contrastive term); ``all`` distils every view and averages
(each image then gives several student-teacher pairs per step, at that many times the student
and teacher compute; the loss keeps the scale of one view). ``mixup_alpha > 0`` mixes each
distilled view with a shuffled copy of its batch (weights ~ Beta(a, a) per image) before the
teacher and the student see it: the teacher labels any input, so on a small set mixing gives
the student inputs it would never see otherwise (function matching, Beyer et al., CVPR 2022; not
in the reference, off by default). The contrastive term, built only
when ``contrastive_weight > 0``, is MoCo v2's (:mod:`.mocov2`) on the same student head; it needs
two views and always uses the first view's student embedding as its query.

Deep supervision (``student_stages`` = S > 1, not in the reference, off by default): the pooled
outputs of the student's S - 1 stages before its last each get their own MLP head that predicts
the same targets, and ``stage_weight * mean_s L_distill(stage s)`` joins the distillation term
(``loss_stages`` in the logs), so early blocks get a gradient that has not passed every sign
estimator above them. On the demo's 4,000-image folder it did not lift the student
(docs/STUDENT_LEVERS.md, variant ``sstages2``).

Teachers. ``offline`` (the paper): a :class:`s2bnn.teachers.Teacher` loaded from a checkpoint,
frozen and never wrapped by DDP. ``online`` (the other scheme the paper discusses): a real-valued
``teacher_backbone`` + ``teacher_head`` trained by MoCo v2 in the same run (its loss is added
with weight 1, its optimiser is the student's), while the student distils from its detached
query embeddings of the same views.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from s2bnn.errors import ConfigError
from s2bnn.losses import block_soft_cross_entropy
from s2bnn.methods.base import (
    Method,
    check_views,
    distill_over_views,
    mix_pairs,
    mlp_head,
    sample_mixup,
)
from s2bnn.methods.mocov2 import MomentumContrast, moco_kwargs
from s2bnn.methods.registry import (
    BuildContext,
    check_range,
    offline_teacher,
    online_teacher,
    register_method,
)
from s2bnn.teachers import stage_features, stage_widths

if TYPE_CHECKING:
    from s2bnn.config import MethodConfig

__all__ = ["S2BNN"]


@register_method
class S2BNN(Method):
    """Strategy 3 (distillation) and, with ``contrastive_weight > 0``, strategy 2."""

    name = "s2bnn"

    @classmethod
    def views_needed(cls, cfg: MethodConfig) -> int:
        """2 with a contrastive term or an online (MoCo v2) teacher, else 1."""
        return 2 if cfg.contrastive_weight > 0 or cfg.teacher.kind == "online" else 1

    @classmethod
    def check_config(cls, cfg: MethodConfig) -> None:
        check_range(cfg, "momentum", 0.0, 1.0)
        check_range(cfg, "distill_weight", 0.0)
        check_range(cfg, "contrastive_weight", 0.0)
        check_range(cfg, "mixup_alpha", 0.0)
        check_range(cfg, "stage_weight", 0.0)
        if cfg.student_stages < 1:
            raise ConfigError(f"method.student_stages must be >= 1, got {cfg.student_stages}")
        if cfg.student_stages > 1 and cfg.contrastive_weight > 0:
            # The contrastive term queries one head on the pooled features.
            raise ConfigError("method.student_stages > 1 (deep supervision) needs "
                              "method.contrastive_weight 0")
        if cfg.mixup_alpha > 0 and (cfg.contrastive_weight > 0 or cfg.teacher.kind == "online"):
            # Both would learn contrastively from the mixed views, whose positives no longer
            # match: mixup is for the distillation-only recipe.
            raise ConfigError("method.mixup_alpha > 0 needs method.contrastive_weight 0 and an "
                              "offline teacher (method.teacher.kind=offline)")
        if cfg.distill_weight == 0 and cfg.contrastive_weight == 0:
            raise ConfigError("method.distill_weight and method.contrastive_weight are both 0")
        if cfg.teacher.extra_paths and (cfg.contrastive_weight > 0
                                        or cfg.teacher.kind == "online"):
            # The contrastive term and the online teacher work on one proj_dim embedding.
            raise ConfigError("method.teacher.extra_paths (several offline teachers) needs "
                              "method.contrastive_weight 0 and method.teacher.kind=offline")
        for key, what in (("stages", "several stages of an offline teacher"),
                          ("grid", "the cells of an offline teacher's maps")):
            value = getattr(cfg.teacher, key)
            if value < 1:
                raise ConfigError(f"method.teacher.{key} must be >= 1, got {value}")
            if value != 1 and (cfg.teacher.kind == "online" or cfg.contrastive_weight > 0):
                raise ConfigError(f"method.teacher.{key} > 1 ({what}) needs "
                                  "method.contrastive_weight 0 and method.teacher.kind=offline")
        if cfg.teacher.center and cfg.teacher.kind == "online":
            # The online teacher's head output is what its own contrastive loss shapes; centring
            # the target it gives the student is untested, so it is refused, not ignored.
            raise ConfigError("method.teacher.center applies to an offline teacher; set "
                              "method.teacher.center=false with method.teacher.kind=online")

    @classmethod
    def from_config(cls, cfg: MethodConfig, backbone: nn.Module, ctx: BuildContext) -> S2BNN:
        kw = dict(distill_weight=cfg.distill_weight, contrastive_weight=cfg.contrastive_weight,
                  distill_views=cfg.distill_views, mixup_alpha=cfg.mixup_alpha,
                  student_stages=cfg.student_stages, stage_weight=cfg.stage_weight,
                  **moco_kwargs(cfg, ctx.num_train))
        if cfg.teacher.kind == "online":
            return cls(backbone, online_teacher=online_teacher(cfg.teacher, ctx.in_chans,
                                                               cfg.proj_dim), **kw)
        teacher = offline_teacher(cfg.teacher, cls.name, ctx.in_chans, cfg.proj_dim,
                                  ensemble=True)
        return cls(backbone, teacher=teacher, **kw)

    def __init__(
        self,
        backbone: nn.Module,
        *,
        teacher: nn.Module | None = None,
        online_teacher: tuple[nn.Module, nn.Module] | None = None,
        proj_dim: int = 128,
        hidden_dim: int | None = None,
        temperature: float = 0.2,
        distill_weight: float = 1.0,
        contrastive_weight: float = 0.0,
        queue_len: int = 65536,
        momentum: float = 0.999,
        shuffle: bool = True,
        groups: int = 2,
        distill_views: str = "all",
        mixup_alpha: float = 0.0,
        student_stages: int = 1,
        stage_weight: float = 1.0,
    ) -> None:
        super().__init__(backbone)
        if (teacher is None) == (online_teacher is None):
            raise ValueError("S2BNN needs exactly one of teacher (offline) and online_teacher")
        if distill_views not in ("first", "all"):
            raise ValueError(f"distill_views must be 'first' or 'all', got {distill_views!r}")
        self.distill_views = distill_views
        if mixup_alpha > 0 and (contrastive_weight > 0 or online_teacher is not None):
            raise ValueError("mixup_alpha needs contrastive_weight 0 and an offline teacher")
        self.mixup_alpha = mixup_alpha
        # Several teachers (a TeacherEnsemble) or several stages of one (method.teacher.stages):
        # the head's output is cut into one unit-length block per teacher and stage.
        self.members = int(getattr(teacher, "members", 1))
        self.block_dims = tuple(getattr(teacher, "block_dims", (proj_dim,) * self.members))
        if len(self.block_dims) > 1 and (contrastive_weight > 0 or online_teacher is not None):
            raise ValueError("several teachers or teacher stages need contrastive_weight 0 and "
                             "no online teacher")
        feat = int(backbone.feature_dim)
        self.head = mlp_head(feat, hidden_dim, sum(self.block_dims))
        if student_stages < 1 or (student_stages > 1 and contrastive_weight > 0):
            raise ValueError("student_stages must be >= 1, and 1 with a contrastive term")
        self.student_stages = int(student_stages)
        self.stage_weight = stage_weight
        # Heads for the stages before the last (the last stage's is self.head).
        widths = (stage_widths(backbone, student_stages, "the student",
                               key="method.student_stages") if student_stages > 1 else (feat,))
        self.stage_heads = nn.ModuleList(
            mlp_head(w, hidden_dim, sum(self.block_dims)) for w in widths[:-1])
        self.temperature = temperature
        self.distill_weight = distill_weight
        self.contrastive_weight = contrastive_weight
        moco_kw = dict(queue_len=queue_len, dim=proj_dim, temperature=temperature,
                       momentum=momentum, shuffle=shuffle, groups=groups)
        self.moco: MomentumContrast | None = None
        if contrastive_weight > 0:
            self.moco = MomentumContrast(backbone, self.head, **moco_kw)
            self._ddp_ignored.append("moco")
        self.teacher: nn.Module | None = None
        if teacher is not None:
            self.attach_offline_teacher(teacher)
        self.teacher_moco: MomentumContrast | None = None
        if online_teacher is not None:
            self.teacher_backbone, self.teacher_head = online_teacher
            self.teacher_moco = MomentumContrast(
                self.teacher_backbone, self.teacher_head, **moco_kw)
            self._ddp_ignored.append("teacher_moco")

    def _unit_blocks(self, z: torch.Tensor) -> torch.Tensor:
        if len(self.block_dims) == 1:
            return F.normalize(z, dim=1)
        return torch.cat([F.normalize(b, dim=1) for b in z.split(self.block_dims, dim=1)], dim=1)

    def _student(self, x: torch.Tensor) -> torch.Tensor:
        """The student's embedding of ``x`` (its head on the pooled features)."""
        return self._student_stages(x)[-1]

    def _student_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The student's embeddings of ``x``: the deep-supervision stages' first, the last's
        (the method's own head on the pooled features) last."""
        if self.moco is not None:
            return [self.moco.query(self.backbone, self.head, x)]
        if not self.stage_heads:
            return [self._unit_blocks(self.head(self.backbone(x)))]
        feats = stage_features(self.backbone, x, self.student_stages, "the student",
                               key="method.student_stages")
        heads = [*self.stage_heads, self.head]
        return [self._unit_blocks(h(f)) for h, f in zip(heads, feats)]

    def forward(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        check_views(views, self.name, 2 if self.moco or self.teacher_moco else 1)
        logs: dict[str, torch.Tensor] = {}
        loss_teacher = None
        distilled = views[:1] if self.distill_views == "first" else list(views)
        if self.mixup_alpha > 0 and self.training:
            distilled = [mix_pairs(v, *sample_mixup(len(v), self.mixup_alpha, v.device))
                         for v in distilled]
        if self.teacher_moco is not None:
            tm = self.teacher_moco
            tq = [tm.query(self.teacher_backbone, self.teacher_head, v) for v in distilled]
            tk = tm.keys(views[1], self.teacher_backbone, self.teacher_head)
            loss_teacher = tm.loss(tq[0], tk)
            targets = [t.detach() for t in tq]
            logs["loss_teacher"] = loss_teacher.detach()
        else:
            targets = self.offline_targets(distilled)
        stages = [self._student_stages(v) for v in distilled]  # per view: one embedding per stage
        students = [per_view[-1] for per_view in stages]

        def distill(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return block_soft_cross_entropy(s, t, self.temperature, self.block_dims)

        loss_distill, cosine = distill_over_views(distill, students, targets)
        if self.stage_heads:
            loss_stages = torch.stack([
                distill_over_views(distill, [per_view[i] for per_view in stages], targets)[0]
                for i in range(len(self.stage_heads))]).mean()
            logs["loss_stages"] = loss_stages.detach()
            distilled_loss = loss_distill + self.stage_weight * loss_stages
        else:
            distilled_loss = loss_distill
        cosine = cosine / len(self.block_dims)  # the mean over blocks of each block's cosine
        # Not `1.0 * distilled_loss`: under torch.compile (inductor, torch 2.14 on CPU) that
        # product becomes an alias of it, and returned next to its detached copy in `logs` the
        # loss came back without a grad_fn ("element 0 of tensors does not require grad").
        loss = (distilled_loss if self.distill_weight == 1
                else self.distill_weight * distilled_loss)
        logs["loss_distill"] = loss_distill.detach()
        if self.moco is not None:
            k = self.moco.keys(views[1], self.backbone, self.head)
            loss_contrastive = self.moco.loss(students[0], k)
            loss = loss + self.contrastive_weight * loss_contrastive
            logs["loss_contrastive"] = loss_contrastive.detach()
        if loss_teacher is not None:
            loss = loss + loss_teacher
        logs["cosine"] = cosine
        return loss, logs

    def on_train_step_end(self, step: int, total_steps: int) -> None:
        if self.moco is not None:
            self.moco.step_end(self.backbone, self.head)
        if self.teacher_moco is not None:
            self.teacher_moco.step_end(self.teacher_backbone, self.teacher_head)
