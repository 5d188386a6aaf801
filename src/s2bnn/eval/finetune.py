"""Semi-supervised fine-tuning: the whole student plus a linear head on a few labels.

The backbone is trained as built: binary layers keep their quantizers (sign activations, scaled
sign weights with straight-through gradients), so the fine-tuned network is still a BNN.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from s2bnn.devices import resolve_device
from s2bnn.errors import UserError
from s2bnn.eval.features import (
    make_loader,
    num_classes_of,
    supervised_epoch,
    to_float_images,
    topk_accuracy,
)

__all__ = ["check_label_fraction", "fraction_tag", "finetune", "recalibrate_batchnorm"]


def check_label_fraction(fraction: float) -> float:
    """Return ``fraction`` as a float if it lies in (0, 1], else raise a one-line UserError."""
    try:
        value = float(fraction)
    except (TypeError, ValueError):
        value = float("nan")
    if not (0.0 < value <= 1.0):
        raise UserError(
            f"label fraction must be in (0, 1], got {fraction}; e.g. 0.01 for 1 % or 0.1 for 10 %"
        )
    return value


def fraction_tag(fraction: float) -> str:
    """``0.01 -> "1"``, ``0.1 -> "10"``, ``0.005 -> "0.5"``: the percent used in file names."""
    return f"{fraction * 100:.6g}"


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module, dataset: Dataset, batch_size: int, num_workers: int, device: torch.device
) -> None:
    """Replace every BatchNorm's running statistics by their average over one pass of
    ``dataset`` (cumulative average: ``momentum=None``). Weights are untouched."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    saved = [m.momentum for m in norms]
    was_training = model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    n = len(dataset)  # type: ignore[arg-type]
    loader = make_loader(dataset, batch_size, num_workers=num_workers,
                         drop_last=n > batch_size and n % batch_size == 1, device=device)
    for x, _ in loader:
        model(to_float_images(x).to(device, non_blocking=True))
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    model.train(was_training)


class _Classifier(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x).flatten(1))


def finetune(
    backbone: nn.Module,
    train_ds: Dataset,
    test_ds: Dataset,
    *,
    num_classes: int | None = None,
    epochs: int = 30,
    lr: float = 2e-3,
    head_lr: float | None = None,
    weight_decay: float = 0.0,
    optimizer: str = "adam",
    batch_size: int = 256,
    num_workers: int = 0,
    seed: int = 0,
    device: str | torch.device = "auto",
    recalibrate_bn: bool = True,
    calib_ds: Dataset | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Fine-tune a copy of ``backbone`` and a new linear head on ``train_ds``; test on ``test_ds``.

    ``train_ds`` is the labelled subset (e.g. ``s2bnn.data.labelled_subset(ds, 0.01, seed)``) with
    the training augmentation; ``test_ds`` has the eval transform. The caller's backbone is not
    modified. The learning rate follows a cosine schedule per step; ``head_lr`` defaults to
    ``lr``. With ``recalibrate_bn`` the BatchNorm running statistics are re-estimated at the end
    (one pass over ``calib_ds``, default ``train_ds``, ideally the labelled images under the eval
    transform): after a few hundred steps the running averages still lag behind weights trained
    on batch statistics, and a binary net tested with stale statistics can fall to chance.
    Returns top-1/top-5 in percent and the per-epoch loss history.
    """
    t0 = time.perf_counter()
    if optimizer not in ("adam", "sgd"):
        raise UserError(f"fine-tune optimizer must be adam or sgd, got '{optimizer}'")
    if epochs < 1:
        raise UserError(f"fine-tune epochs must be >= 1, got {epochs}")
    dev = resolve_device(device)
    torch.manual_seed(seed)
    if num_classes is None:
        num_classes = num_classes_of(train_ds)
    model_backbone = copy.deepcopy(backbone)
    feature_dim = getattr(model_backbone, "feature_dim", None)
    if not isinstance(feature_dim, int):
        x0, _ = train_ds[0]
        with torch.no_grad():
            model_backbone.eval()
            feature_dim = model_backbone(to_float_images(x0).unsqueeze(0)).flatten(1).shape[1]
    model = _Classifier(model_backbone, feature_dim, num_classes).to(dev)
    groups = [
        {"params": list(model.backbone.parameters()), "lr": lr},
        {"params": list(model.head.parameters()), "lr": head_lr if head_lr is not None else lr},
    ]
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(groups, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(groups, momentum=0.9, weight_decay=weight_decay)
    base = [g["lr"] for g in opt.param_groups]
    n = len(train_ds)  # type: ignore[arg-type]
    bs = max(1, min(batch_size, n))
    # drop_last keeps BatchNorm away from a final batch of one image.
    drop_last = n > bs and n % bs == 1
    steps_per_epoch = n // bs if drop_last else math.ceil(n / bs)
    total = max(1, epochs * steps_per_epoch)
    step = 0
    history = []

    def cosine_step() -> None:  # per-step cosine decay of every group's LR
        nonlocal step
        scale = 0.5 * (1.0 + math.cos(math.pi * step / total))
        for g, b in zip(opt.param_groups, base):
            g["lr"] = b * scale
        step += 1

    for epoch in range(epochs):
        model.train()
        loader = make_loader(train_ds, bs, shuffle=True, num_workers=num_workers,
                             drop_last=drop_last, seed=seed + epoch, device=dev)
        history.append({"epoch": epoch + 1,
                        "loss": supervised_epoch(model, loader, opt, dev, cosine_step)})
        if log is not None:
            log(f"finetune epoch {epoch + 1}/{epochs}: loss {history[-1]['loss']:.4f}")
    if recalibrate_bn:
        recalibrate_batchnorm(model, calib_ds if calib_ds is not None else train_ds, bs,
                              num_workers, dev)
    model.eval()
    scores, labels = [], []
    with torch.no_grad():
        for x, y in make_loader(test_ds, batch_size, num_workers=num_workers, device=dev):
            scores.append(model(to_float_images(x).to(dev)).float().cpu())
            labels.append(torch.as_tensor(y).long())
    acc = topk_accuracy(torch.cat(scores), torch.cat(labels))
    return {
        "finetune_top1": acc["top1"],
        "top1": acc["top1"],
        "top5": acc.get("top5"),
        "num_labelled": n,
        "num_test": len(test_ds),  # type: ignore[arg-type]
        "epochs": epochs,
        "lr": lr,
        "head_lr": head_lr if head_lr is not None else lr,
        "optimizer": optimizer,
        "weight_decay": weight_decay,
        "batch_size": bs,
        "recalibrate_bn": recalibrate_bn,
        "history": history,
        "seconds": round(time.perf_counter() - t0, 3),
    }
