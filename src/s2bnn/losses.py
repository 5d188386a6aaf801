"""The losses of every method, as pure functions whose docstrings state the maths.

Conventions: embeddings are rows of an ``(N, D)`` tensor; queues are ``(K, D)`` tensors of past
keys (one key per row). Every tensor that plays the role of a target (a teacher, a key, a queue,
a centre) is detached here, so no gradient can reach it whatever the caller passes. Losses are
computed in (at least) float32 with autocast off, even inside a bf16 autocast region: softmaxes
at temperatures of 0.04-0.2 need the precision.

The S2-BNN loss is :func:`soft_cross_entropy` (strategy 3 of the paper); strategy 2 adds
:func:`info_nce`; strategy 1 (MoCo v2) is :func:`info_nce` alone.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.nn.functional as F

__all__ = [
    "info_nce", "soft_cross_entropy", "block_soft_cross_entropy", "seed_loss", "dino_loss",
]


def _up(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (bf16/fp16 inputs are upcast, float64 stays)."""
    return x if x.dtype == torch.float64 else x.float()


_F = TypeVar("_F", bound=Callable[..., torch.Tensor])


def _full_precision(fn: _F) -> _F:
    """Run ``fn`` with autocast disabled on the device of its first tensor argument."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> torch.Tensor:
        first = args[0][0] if isinstance(args[0], (list, tuple)) else args[0]
        with torch.autocast(device_type=first.device.type, enabled=False):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


@_full_precision
def info_nce(
    q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float
) -> torch.Tensor:
    r"""MoCo's InfoNCE with a queue of negatives.

    For L2-normalised queries ``q`` (N x D), positive keys ``k`` (N x D) and negatives
    ``queue`` (K x D), with temperature :math:`T`:

    .. math::
        L = -\frac{1}{N}\sum_n \log
            \frac{\exp(q_n \cdot k_n / T)}
                 {\exp(q_n \cdot k_n / T) + \sum_{j=1}^{K} \exp(q_n \cdot u_j / T)}

    i.e. a (K+1)-way cross-entropy whose correct class is the positive key. ``k`` and ``queue``
    are detached: only ``q`` receives gradient.
    """
    q = _up(q)
    k = _up(k.detach())
    queue = _up(queue.detach())
    l_pos = (q * k).sum(dim=1, keepdim=True)
    l_neg = q @ queue.t()
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature
    # Written as logsumexp - positive rather than F.cross_entropy with zero labels: same value,
    # no label tensor to allocate on the device.
    return (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()


@_full_precision
def soft_cross_entropy(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float
) -> torch.Tensor:
    r"""S2-BNN's distillation loss (Shen et al., CVPR 2021, Eq. 4).

    For L2-normalised student and teacher embeddings :math:`s, t` (N x D) and temperature
    :math:`\tau` (0.2 in the paper), the teacher's and the student's distributions over the D
    embedding dimensions are :math:`p^T_n = \mathrm{softmax}(t_n/\tau)` and
    :math:`p^S_n = \mathrm{softmax}(s_n/\tau)`, and

    .. math::
        L = -\frac{1}{N}\sum_n \sum_{c=1}^{D} p^T_{n,c} \log p^S_{n,c}

    The teacher is detached: no gradient reaches it. Note the loss is bounded below by the
    teacher's entropy, which is close to :math:`\log D` for unit vectors at :math:`\tau = 0.2`,
    so its value moves little while the student-teacher cosine rises.
    """
    p_teacher = F.softmax(_up(teacher.detach()) / temperature, dim=1)
    log_p_student = F.log_softmax(_up(student) / temperature, dim=1)
    return -(p_teacher * log_p_student).sum(dim=1).mean()


def block_soft_cross_entropy(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float,
    blocks: int | Sequence[int],
) -> torch.Tensor:
    """:func:`soft_cross_entropy` averaged over blocks of the embedding dimension.

    ``teacher`` holds several unit embeddings side by side (several teachers, as
    :class:`s2bnn.teachers.TeacherEnsemble` gives them, or several stages of one teacher,
    ``method.teacher.stages``) and ``student`` one unit embedding per block in the same layout;
    block k of the student matches block k of the teacher, each with its own softmax.
    ``blocks``: the number of equal blocks, or the block widths in order. With one block this is
    :func:`soft_cross_entropy` itself.
    """
    width = student.shape[-1]
    if isinstance(blocks, int):
        sizes = [width // blocks] * blocks if blocks > 0 and width % blocks == 0 else []
    else:
        sizes = [int(b) for b in blocks]
    if student.shape != teacher.shape or student.dim() != 2 or sum(sizes) != width or not sizes:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} "
                         f"embeddings do not split into blocks {blocks}")
    pairs = zip(student.split(sizes, dim=1), teacher.split(sizes, dim=1))
    return torch.stack([soft_cross_entropy(s, t, temperature) for s, t in pairs]).mean()


@_full_precision
def seed_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    queue: torch.Tensor,
    student_temp: float,
    teacher_temp: float,
) -> torch.Tensor:
    r"""SEED (Fang et al., ICLR 2021): match similarity distributions over a queue of teacher keys.

    With L2-normalised student/teacher embeddings :math:`s_n, t_n` and a queue
    :math:`u_1..u_K` of past teacher embeddings, the anchors are :math:`a = (t_n, u_1, .., u_K)`
    (the teacher's own embedding first, as in SEED). Then

    .. math::
        p^T_n = \mathrm{softmax}_j(t_n \cdot a_j / \tau_T), \quad
        p^S_n = \mathrm{softmax}_j(s_n \cdot a_j / \tau_S), \quad
        L = -\frac{1}{N}\sum_n \sum_j p^T_{n,j} \log p^S_{n,j}

    The teacher and the queue are detached.
    """
    s = _up(student)
    t = _up(teacher.detach())
    queue = _up(queue.detach())
    t_logits = torch.cat([(t * t).sum(dim=1, keepdim=True), t @ queue.t()], dim=1)
    s_logits = torch.cat([(s * t).sum(dim=1, keepdim=True), s @ queue.t()], dim=1)
    p_teacher = F.softmax(t_logits / teacher_temp, dim=1)
    log_p_student = F.log_softmax(s_logits / student_temp, dim=1)
    return -(p_teacher * log_p_student).sum(dim=1).mean()


@_full_precision
def dino_loss(
    student_out: Sequence[torch.Tensor],
    teacher_out: Sequence[torch.Tensor],
    center: torch.Tensor,
    student_temp: float,
    teacher_temp: float,
) -> torch.Tensor:
    r"""DINO (Caron et al., ICCV 2021): cross-entropy from the centred, sharpened teacher.

    ``student_out`` holds the student's head outputs (logits over P prototypes), one ``(N, P)``
    tensor per view (global views first); ``teacher_out`` one per global view. With centre
    :math:`c` (EMA of the teacher's batch means):

    .. math::
        p^T_i = \mathrm{softmax}((g^T_i - c)/\tau_T), \quad
        \log p^S_j = \mathrm{log\,softmax}(g^S_j/\tau_S), \quad
        L = \frac{1}{|\{(i,j): i \ne j\}|} \sum_{i}\sum_{j \ne i}
            -\frac{1}{N}\sum_n \sum_p p^T_{i,n,p} \log p^S_{j,n,p}

    where pairs with the same view for teacher and student (:math:`i = j`) are skipped. Centring
    (subtracting :math:`c`) prevents one prototype from dominating; a low :math:`\tau_T`
    sharpens, preventing the uniform collapse. The teacher and the centre are detached.
    """
    center = _up(center.detach())
    p_teachers = [F.softmax((_up(t.detach()) - center) / teacher_temp, dim=1)
                  for t in teacher_out]
    log_p_students = [F.log_softmax(_up(s) / student_temp, dim=1) for s in student_out]
    total = log_p_students[0].new_zeros(())
    pairs = 0
    for i, p_t in enumerate(p_teachers):
        for j, log_p_s in enumerate(log_p_students):
            if i == j:
                continue
            total = total - (p_t * log_p_s).sum(dim=1).mean()
            pairs += 1
    if pairs == 0:
        raise ValueError("dino_loss needs at least two views (one teacher-student pair)")
    return total / pairs
