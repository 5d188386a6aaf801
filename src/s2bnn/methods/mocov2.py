"""MoCo v2 (strategy 1 of S2-BNN), and the momentum-contrast part other methods reuse.

Query ``q = normalize(head(backbone(view 0)))``; key ``k`` from a momentum copy of backbone and
head on view 1 (no gradient); loss = InfoNCE of ``q`` against ``k`` and a queue of past keys
(:func:`s2bnn.losses.info_nce`, T 0.2). After each optimiser step the key encoder moves towards
the query encoder (``theta_k <- m theta_k + (1 - m) theta_q``, m 0.999) and the keys are queued.

BatchNorm shortcut ("shuffle BN"). Keys are encoded in train mode, with batch statistics; if a
query and its key were normalised with statistics of the same sub-batch, the network could find
its positive from those statistics alone instead of from the image. MoCo encodes keys in an order
shuffled across GPUs, so a key's statistics come from other images than its query's. Here:

* under DDP: the key views of all ranks are gathered, permuted (the same permutation on every rank,
  from a generator seeded by the step counter, so no broadcast is needed), each rank encodes its
  slice, and the keys are gathered back and un-permuted -- MoCo's per-rank shuffle;
* on one device: the batch is treated as ``shuffle_bn_groups`` virtual devices. Queries are
  encoded in that many contiguous groups (each with its own BN statistics) and keys in as many
  groups of a shuffled order, which is exactly what G ranks would compute ("split BN"). It costs G
  smaller forward passes instead of one; with ``shuffle_bn=syncbn`` or ``none`` nothing is done.

The key encoder is a momentum encoder (:mod:`.momentum`): it follows the method's train/eval mode
and is (re)copied from the query encoder at the first training forward.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from s2bnn.distributed import all_gather_nograd, is_distributed, rank, world_size
from s2bnn.losses import info_nce
from s2bnn.methods.base import KeyQueue, Method, check_views, mlp_head, queue_length
from s2bnn.methods.momentum import MomentumEncoders
from s2bnn.methods.registry import BuildContext, check_range, register_method

if TYPE_CHECKING:
    from s2bnn.config import MethodConfig

__all__ = ["MomentumContrast", "MoCoV2", "moco_kwargs"]


def moco_kwargs(cfg: MethodConfig, num_train: int) -> dict[str, Any]:
    """The momentum-contrast arguments of ``cfg`` (shared by MoCo v2 and S2-BNN's terms)."""
    return dict(
        proj_dim=cfg.proj_dim, hidden_dim=cfg.proj_hidden_dim, temperature=cfg.temperature,
        queue_len=queue_length(cfg.queue_size, num_train), momentum=cfg.momentum,
        shuffle=cfg.shuffle_bn in ("auto", "shuffle"), groups=cfg.shuffle_bn_groups,
    )


class MomentumContrast(MomentumEncoders):
    """Momentum key encoder + key queue + shuffle-BN for a query encoder (backbone, head).

    The query encoder is not registered here (it belongs to the method); it is passed to the
    calls that need it.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        *,
        queue_len: int,
        dim: int,
        temperature: float,
        momentum: float,
        shuffle: bool,
        groups: int,
    ) -> None:
        super().__init__()
        self.key_backbone = self.add_momentum_copy("key_backbone", backbone)
        self.key_head = self.add_momentum_copy("key_head", head)
        self.queue = KeyQueue(queue_len, dim)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))  # seeds the shuffle
        self.temperature = temperature
        self.momentum = momentum
        self.shuffle = shuffle
        self.groups = groups
        self._pending: torch.Tensor | None = None

    def _local_groups(self, n: int) -> int:
        if not self.shuffle or is_distributed() or self.groups <= 1:
            return 1
        return self.groups if n >= 2 * self.groups else 1  # BN needs >1 sample per group

    def query(self, backbone: nn.Module, head: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Normalised query embeddings, in BN groups on a single device (see module doc)."""
        g = self._local_groups(x.shape[0])
        if g == 1:
            return F.normalize(head(backbone(x)), dim=1)
        return torch.cat([F.normalize(head(backbone(c)), dim=1) for c in x.chunk(g)])

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.key_head(self.key_backbone(x)), dim=1)

    @torch.no_grad()
    def keys(self, x: torch.Tensor, backbone: nn.Module, head: nn.Module) -> torch.Tensor:
        """Normalised keys of ``x`` from the momentum encoder, with shuffle-BN."""
        if self.training:
            self.sync_momentum(backbone, head)
        gen = torch.Generator().manual_seed(1_000_003 + int(self.step))
        if self.shuffle and is_distributed():
            x_all = all_gather_nograd(x)
            perm = torch.randperm(x_all.shape[0], generator=gen).to(x.device)
            k_local = self._encode(x_all[perm].chunk(world_size())[rank()])
            k_gathered = all_gather_nograd(k_local)
            k_all = torch.empty_like(k_gathered)
            k_all[perm] = k_gathered
            return k_all.chunk(world_size())[rank()]
        g = self._local_groups(x.shape[0])
        if g == 1:
            return self._encode(x)
        perm = torch.randperm(x.shape[0], generator=gen).to(x.device)
        k_shuffled = torch.cat([self._encode(c) for c in x[perm].chunk(g)])
        k = torch.empty_like(k_shuffled)
        k[perm] = k_shuffled
        return k

    def loss(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """InfoNCE of ``q`` against ``k`` and the queue; ``k`` is queued at the step's end."""
        self._pending = k.detach()
        return info_nce(q, k, self.queue.keys, self.temperature)

    def pairs_loss(self, pairs: list[tuple[torch.Tensor, torch.Tensor]],
                   queued: list[torch.Tensor]) -> torch.Tensor:
        """The mean InfoNCE over ``(query, key)`` pairs, all against the same queue; the keys
        in ``queued`` are queued at the step's end."""
        loss = sum(info_nce(q, k, self.queue.keys, self.temperature) for q, k in pairs)
        self._pending = torch.cat(queued).detach()
        return loss / len(pairs)

    @torch.no_grad()
    def step_end(self, backbone: nn.Module, head: nn.Module) -> None:
        """Momentum update of the key encoder, then enqueue this step's keys."""
        self.update_momentum(self.momentum, backbone, head)
        if self._pending is not None:
            self.queue.push(self._pending)
            self._pending = None
        self.step.add_(1)


@register_method
class MoCoV2(Method):
    """MoCo v2: backbone + MLP head (feat -> hidden -> dim), momentum key encoder and queue.

    ``symmetric=True`` adds the loss with the views swapped (as MoCo v3 does) and averages the
    two; the paper's MoCo v2 is one-way (the default). Views after the first two (e.g. the
    small crops of ``data.augment.local_crops``) are extra queries only: each is contrasted
    with the key of view 1 (and of view 0 when symmetric), and the loss is the mean over all
    query-key pairs, as in SwAV's multi-crop. Keys always come from the two full views.
    """

    name = "mocov2"

    @classmethod
    def views_needed(cls, cfg: MethodConfig) -> int:
        return 2

    @classmethod
    def check_config(cls, cfg: MethodConfig) -> None:
        check_range(cfg, "momentum", 0.0, 1.0)

    @classmethod
    def from_config(cls, cfg: MethodConfig, backbone: nn.Module, ctx: BuildContext) -> MoCoV2:
        return cls(backbone, symmetric=cfg.symmetric, **moco_kwargs(cfg, ctx.num_train))

    def __init__(
        self,
        backbone: nn.Module,
        *,
        proj_dim: int = 128,
        hidden_dim: int | None = None,
        temperature: float = 0.2,
        queue_len: int = 65536,
        momentum: float = 0.999,
        shuffle: bool = True,
        groups: int = 2,
        symmetric: bool = False,
    ) -> None:
        super().__init__(backbone)
        self.symmetric = symmetric
        feat = int(backbone.feature_dim)
        self.head = mlp_head(feat, hidden_dim, proj_dim)
        self.moco = MomentumContrast(
            backbone, self.head, queue_len=queue_len, dim=proj_dim, temperature=temperature,
            momentum=momentum, shuffle=shuffle, groups=groups,
        )
        self._ddp_ignored = ["moco"]

    def forward(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        check_views(views, self.name, 2)
        q = self.moco.query(self.backbone, self.head, views[0])
        k = self.moco.keys(views[1], self.backbone, self.head)
        extra = [self.moco.query(self.backbone, self.head, v) for v in views[2:]]
        if self.symmetric:  # view 1 is also a query, against view 0's key
            q2 = self.moco.query(self.backbone, self.head, views[1])
            k0 = self.moco.keys(views[0], self.backbone, self.head)
            loss = self.moco.pairs_loss(
                [(q, k), (q2, k0)] + [(e, key) for e in extra for key in (k0, k)], [k0, k])
        elif extra:
            loss = self.moco.pairs_loss([(q, k)] + [(e, k) for e in extra], [k])
        else:
            loss = self.moco.loss(q, k)
        logs = {"loss_contrastive": loss.detach(),
                "cosine": (q.detach().float() * k.float()).sum(1).mean()}
        return loss, logs

    def on_train_step_end(self, step: int, total_steps: int) -> None:
        self.moco.step_end(self.backbone, self.head)
