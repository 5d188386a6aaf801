"""The paper's linear probe (S2-BNN / MoCo ``main_lincls.py``) on a frozen, eval-mode backbone.

The backbone is frozen in eval mode (BatchNorm uses its running statistics and never updates
them), a linear layer on the pooled features sees freshly augmented crops every epoch, SGD with
momentum 0.9, no weight decay, lr 0.1 for 100 epochs, divided by 10 at epochs 60 and 80, batch
256. A check afterwards proves the backbone's weights and BatchNorm statistics are bit-for-bit
unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from s2bnn.devices import resolve_device
from s2bnn.eval.features import (
    make_loader,
    num_classes_of,
    supervised_epoch,
    to_float_images,
    topk_accuracy,
)

__all__ = ["linear_probe_protocol", "snapshot_state", "assert_state_unchanged"]


def snapshot_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every parameter and buffer (BatchNorm running stats included)."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_state_unchanged(module: nn.Module, before: dict[str, torch.Tensor]) -> None:
    """Raise ``RuntimeError`` naming the tensors of ``module`` that differ from ``before``."""
    after = module.state_dict()
    changed = [k for k, v in before.items() if k not in after or not torch.equal(v, after[k])]
    if changed:
        raise RuntimeError(
            f"the frozen backbone changed during linear evaluation ({len(changed)} tensors, "
            f"e.g. {', '.join(changed[:3])}): a module updates weights or BatchNorm statistics "
            "in eval mode"
        )


def _evaluate_head(
    backbone: nn.Module, head: nn.Module, dataset: Dataset, batch_size: int, num_workers: int,
    device: torch.device,
) -> dict:
    scores, labels = [], []
    head.eval()
    with torch.no_grad():
        for x, y in make_loader(dataset, batch_size, num_workers=num_workers, device=device):
            x = to_float_images(x).to(device, non_blocking=True)
            scores.append(head(backbone(x).flatten(1)).float().cpu())
            labels.append(torch.as_tensor(y).long())
    return topk_accuracy(torch.cat(scores), torch.cat(labels))


def linear_probe_protocol(
    backbone: nn.Module,
    train_ds: Dataset,
    test_ds: Dataset,
    *,
    num_classes: int | None = None,
    epochs: int = 100,
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    milestones: Sequence[int] | None = None,
    gamma: float = 0.1,
    batch_size: int = 256,
    num_workers: int = 0,
    seed: int = 0,
    device: str | torch.device = "auto",
    feature_norm: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict:
    """The paper's linear evaluation: a linear layer on a frozen, eval-mode backbone.

    ``train_ds`` should apply the training augmentation (a fresh crop each epoch), ``test_ds`` the
    eval transform. ``milestones`` default to 60 % and 80 % of ``epochs`` (60 and 80 of 100).
    ``feature_norm`` puts a BatchNorm without affine parameters before the linear layer (part of
    the head, trained with it); ``False`` (the default) gives the bare linear layer of the
    reference ``main_lincls.py`` (fc initialised N(0, 0.01), bias 0; SGD momentum 0.9, wd 0,
    lr 0.1 in its README command, x0.1 at epochs 60 and 80 of 100, batch 256). The reference
    trains on RandomResizedCrop(224) at torchvision's default scale (0.08-1) with horizontal
    flips and tests on Resize(256) + CenterCrop(224): ``train_ds`` / ``test_ds`` should do that.
    The backbone is left exactly as it was: its ``requires_grad`` flags and mode are restored,
    and a ``RuntimeError`` is raised if any weight or buffer changed.
    """
    t0 = time.perf_counter()
    dev = resolve_device(device)
    if num_classes is None:
        num_classes = num_classes_of(train_ds)
    if milestones is None:
        milestones = [int(epochs * 0.6), int(epochs * 0.8)]
    torch.manual_seed(seed)
    was_training = backbone.training
    flags = {name: p.requires_grad for name, p in backbone.named_parameters()}
    backbone.to(dev).eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    before = snapshot_state(backbone)

    feature_dim = getattr(backbone, "feature_dim", None)
    if not isinstance(feature_dim, int):
        x0, _ = train_ds[0]
        with torch.no_grad():
            feature_dim = backbone(to_float_images(x0).unsqueeze(0).to(dev)).flatten(1).shape[1]
    linear = nn.Linear(feature_dim, num_classes)
    nn.init.normal_(linear.weight, std=0.01)
    nn.init.zeros_(linear.bias)
    # Binary nets' pooled features are large and far from zero-mean; at lr 0.1 a bare linear
    # layer on them diverges. A parameter-free BatchNorm in the head (MAE's linear probe) fixes
    # the scale without touching the frozen backbone.
    head = nn.Sequential(nn.BatchNorm1d(feature_dim, affine=False), linear) if feature_norm \
        else nn.Sequential(linear)
    head.to(dev)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(milestones), gamma=gamma)
    history = []

    def probe(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # the backbone stays frozen: only the head learns
            feats = backbone(x).flatten(1)
        return head(feats)

    try:
        n = len(train_ds)  # type: ignore[arg-type]
        # A last batch of one image would break the head's BatchNorm: drop it.
        drop_last = n > batch_size and n % batch_size == 1
        for epoch in range(epochs):
            head.train()
            loader = make_loader(train_ds, batch_size, shuffle=True, num_workers=num_workers,
                                 drop_last=drop_last, seed=seed + epoch, device=dev)
            loss = supervised_epoch(probe, loader, opt, dev)
            row = {"epoch": epoch + 1, "loss": loss, "lr": opt.param_groups[0]["lr"]}
            history.append(row)
            sched.step()
            if log is not None:
                log(f"linear epoch {epoch + 1}/{epochs}: loss {row['loss']:.4f} lr {row['lr']:.4g}")
        acc = _evaluate_head(backbone, head, test_ds, batch_size, num_workers, dev)
        assert_state_unchanged(backbone, before)
    finally:
        for name, p in backbone.named_parameters():
            p.requires_grad_(flags[name])
        backbone.train(was_training)
    return {
        "mode": "protocol",
        "linear_top1": acc["top1"],
        "linear_top5": acc.get("top5"),
        "top1": acc["top1"],
        "top5": acc.get("top5"),
        "epochs": epochs,
        "lr": lr,
        "momentum": momentum,
        "weight_decay": weight_decay,
        "milestones": list(milestones),
        "gamma": gamma,
        "feature_norm": feature_norm,
        "head": [type(m).__name__ for m in head],
        "batch_size": batch_size,
        "num_train": len(train_ds),  # type: ignore[arg-type]
        "num_test": len(test_ds),  # type: ignore[arg-type]
        "backbone_unchanged": True,
        "history": history,
        "seconds": round(time.perf_counter() - t0, 3),
    }
