"""Linear probes on frozen features: the paper's protocol and a fast cached LR sweep.

*Protocol mode* is the S2-BNN / MoCo evaluation: the backbone is frozen in eval mode (BatchNorm
uses its running statistics and never updates them), a linear layer on the pooled features sees
freshly augmented crops every epoch, SGD with momentum 0.9, no weight decay, lr 0.1 for 100
epochs, divided by 10 at epochs 60 and 80, batch 256. A check afterwards proves the backbone's
weights and BatchNorm statistics are bit-for-bit unchanged.

*Fast mode* extracts features once, standardises them, and trains many linear heads at once: the
heads' weights are one ``(D, H, C)`` tensor, so a minibatch costs one ``(B, D) x (D, H*C)``
matmul for all ``H`` learning rates and both optimisers. Gradients are written out by hand
(softmax minus one-hot), which avoids autograd overhead on this tiny convex problem. The learning
rate of each optimiser is chosen on a held-out part of the training features, never on the test
set; the chosen heads are then refit on all training features and scored on the test set.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from s2bnn.devices import resolve_device
from s2bnn.eval.features import (
    make_loader,
    num_classes_of,
    standardize,
    to_float_images,
    topk_accuracy,
)

__all__ = [
    "DEFAULT_SGD_LRS",
    "DEFAULT_ADAM_LRS",
    "fast_linear_sweep",
    "linear_probe_protocol",
    "snapshot_state",
    "assert_state_unchanged",
]

# Wide, log-spaced grids: the best probe LR moves by orders of magnitude with the pre-training
# optimiser (SGD-trained features like high LRs, Adam-trained ones low LRs).
DEFAULT_SGD_LRS: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
DEFAULT_ADAM_LRS: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


# --------------------------------------------------------------------------- fast mode
def _train_heads(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    sgd_lrs: Sequence[float],
    adam_lrs: Sequence[float],
    *,
    epochs: int,
    batch_size: int,
    momentum: float,
    betas: tuple[float, float],
    weight_decay: float,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Train ``len(sgd_lrs) + len(adam_lrs)`` softmax-regression heads together.

    Returns weights ``(D, H, C)`` and biases ``(H, C)``; SGD heads come first. Each head sees the
    same minibatches; a cosine schedule takes every learning rate to 0 over the run.

    Every step is a short, fixed list of whole-tensor ops (about 25): on a busy CPU each op can
    cost a scheduler slice, so the bias rides along as a constant-1 input column and the
    ``1/B`` of the mean loss is folded into the optimiser's scalar arguments.
    """
    n, d = x.shape
    d1 = d + 1
    hs, ha = len(sgd_lrs), len(adam_lrs)
    h = hs + ha
    c = num_classes
    hc = h * c
    dev = x.device
    x1 = torch.cat([x, torch.ones(n, 1, device=dev, dtype=x.dtype)], dim=1)
    w = torch.zeros(d1, h, c, device=dev)
    ws, wa = w[:, :hs], w[:, hs:]  # views: updates land in w
    lr_s = torch.tensor(list(sgd_lrs), device=dev, dtype=torch.float32).view(1, hs, 1)
    lr_a = torch.tensor(list(adam_lrs), device=dev, dtype=torch.float32).view(1, ha, 1)
    buf = torch.zeros(d1, hs, c, device=dev)
    m = torch.zeros(d1, ha, c, device=dev)
    v = torch.zeros(d1, ha, c, device=dev)
    b1, b2 = betas
    eps = 1e-8
    onehot = torch.eye(c, device=dev).unsqueeze(1)  # (C, 1, C): row y broadcasts over heads
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    steps_per_epoch = max(1, math.ceil(n / batch_size))
    total = epochs * steps_per_epoch
    step = 0
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen).to(dev)
        # One gather per epoch, then contiguous slices: cheaper than a gather per minibatch.
        xs, ys = x1[perm], y[perm]
        for start in range(0, n, batch_size):
            xb, yb = xs[start:start + batch_size], ys[start:start + batch_size]
            bsz = xb.shape[0]
            # d(sum CE)/d(logits) = softmax - onehot, every head at once (torch.softmax over a
            # last dim of ~10 is several times slower on CPU than these four ops).
            g = (xb @ w.view(d1, hc)).view(bsz, h, c)
            g = g.sub_(g.amax(-1, keepdim=True)).exp_()
            g.div_(g.sum(-1, keepdim=True)).sub_(onehot[yb])
            gw = (xb.T @ g.view(bsz, hc)).view(d1, h, c)  # = B x grad of the mean loss
            if weight_decay:
                gw[:d].add_(w[:d], alpha=weight_decay * bsz)  # no decay on the bias row
            scale = 0.5 * (1.0 + math.cos(math.pi * step / total))
            step += 1
            if hs:
                buf.mul_(momentum).add_(gw[:, :hs], alpha=1.0 / bsz)
                ws.sub_(buf * (lr_s * scale))
            if ha:
                ga = gw[:, hs:]
                m.mul_(b1).add_(ga, alpha=(1 - b1) / bsz)
                v.mul_(b2).addcmul_(ga, ga, value=(1 - b2) / bsz ** 2)
                # PyTorch's Adam arithmetic: lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps).
                root_bc2 = math.sqrt(1 - b2 ** step)
                upd = m / v.sqrt().add_(eps * root_bc2)
                wa.sub_(upd.mul_(lr_a * (scale * root_bc2 / (1 - b1 ** step))))
    return w[:d], w[d]


@torch.no_grad()
def _head_scores(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, chunk: int = 4096
) -> torch.Tensor:
    """Logits ``(N, H, C)`` of every head."""
    d, h, c = w.shape
    out = [(x[i:i + chunk] @ w.view(d, h * c)).view(-1, h, c) + b for i in range(0, len(x), chunk)]
    return torch.cat(out) if out else torch.zeros(0, h, c, device=x.device)


def _per_head_top1(scores: torch.Tensor, labels: torch.Tensor, w: torch.Tensor) -> list[float]:
    """Top-1 in percent per head; a head whose weights overflowed counts as 0."""
    finite = torch.isfinite(w).all(dim=0).all(dim=-1)  # (H,)
    hits = (scores.argmax(-1) == labels.view(-1, 1)).float().mean(0) * 100.0
    return [float(a) if ok else 0.0 for a, ok in zip(hits.tolist(), finite.tolist())]


def _split_train_val(
    labels: torch.Tensor, val_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified random split of indices: about ``val_fraction`` of each class held out."""
    gen = torch.Generator()
    gen.manual_seed(seed)
    fit, val = [], []
    for cls in labels.unique().tolist():
        idx = (labels == cls).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_val = int(round(len(idx) * val_fraction))
        if len(idx) >= 2:
            n_val = min(max(n_val, 1), len(idx) - 1)
        else:
            n_val = 0
        val.append(idx[:n_val])
        fit.append(idx[n_val:])
    fit_idx, val_idx = torch.cat(fit), torch.cat(val)
    if len(val_idx) == 0:  # too few samples to hold any out: select on the training fit
        val_idx = fit_idx
    return fit_idx, val_idx


def fast_linear_sweep(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    num_classes: int | None = None,
    sgd_lrs: Sequence[float] = DEFAULT_SGD_LRS,
    adam_lrs: Sequence[float] = DEFAULT_ADAM_LRS,
    epochs: int = 10,
    batch_size: int = 1024,
    momentum: float = 0.9,
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 0.0,
    val_fraction: float = 0.1,
    refit: bool = False,
    seed: int = 0,
    device: str | torch.device = "cpu",
    num_threads: int | None = 1,
    standardize_features: bool = True,
    return_head: bool = False,
) -> dict:
    """Sweep linear-probe learning rates for SGD and Adam on cached features.

    Features are standardised with training statistics (``standardize_features=False`` keeps
    them raw: the best LR then depends on the features' scale, as in the paper's protocol). The
    heads train on ``1 - val_fraction`` of the training features; the LR with the best held-out
    top-1 is chosen per optimiser; with ``refit`` the chosen heads are retrained on all training
    features before the test.

    Returns a JSON-able dict: per optimiser ``lrs``, ``val_top1`` and ``test_top1`` (the whole
    curve), ``best_lr``, ``top1``, ``top5``; overall ``linear_top1``/``linear_top5`` of the
    optimiser whose chosen head did best on the held-out split, and ``linear_top1_sgd``/``_adam``.

    On the CPU the heads train with ``num_threads`` torch threads (``None``: torch's setting).
    The default 1 is deliberate: a step is ~25 ops on ~150k-element tensors, which threads speed
    up little, while on a shared CPU every multi-threaded op waits for all its threads to be
    scheduled (measured here: 2 threads 11x slower than 1 under a load of 4 on 2 cores). One
    thread also makes the result independent of the machine's thread count.

    ``return_head``: also return ``head`` = ``{"weight": (C, D), "bias": (C,)}``, the chosen
    head of ``best_optimizer`` with the standardisation folded in, so that
    ``feats @ weight.T + bias`` gives its logits on raw features (not JSON: pop it before writing).
    """
    if not sgd_lrs and not adam_lrs:
        raise ValueError("fast_linear_sweep needs at least one SGD or Adam learning rate")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    dev = resolve_device(device)
    with _cpu_threads(num_threads if dev.type == "cpu" else None):
        t0 = time.perf_counter()
        train_labels = train_labels.long()
        test_labels = test_labels.long()
        if num_classes is None:
            num_classes = int(max(train_labels.max(), test_labels.max())) + 1
        xtr, xte = train_feats.float(), test_feats.float()
        if standardize_features:
            xtr, xte = standardize(xtr, xte)
        xtr, xte = xtr.to(dev), xte.to(dev)
        ytr, yte = train_labels.to(dev), test_labels.to(dev)
        fit_idx, val_idx = _split_train_val(train_labels, val_fraction, seed)
        fit_idx, val_idx = fit_idx.to(dev), val_idx.to(dev)
        hp = dict(epochs=epochs, batch_size=batch_size, momentum=momentum, betas=tuple(betas),
                  weight_decay=weight_decay, seed=seed)

        w, b = _train_heads(xtr[fit_idx], ytr[fit_idx], num_classes, sgd_lrs, adam_lrs, **hp)
        val_top1 = _per_head_top1(_head_scores(xtr[val_idx], w, b), ytr[val_idx], w)
        test_scores = _head_scores(xte, w, b)
        test_top1 = _per_head_top1(test_scores, yte, w)

        hs = len(sgd_lrs)
        groups = {"sgd": (list(sgd_lrs), 0), "adam": (list(adam_lrs), hs)}
        result: dict = {
            "mode": "fast",
            "num_train": int(len(fit_idx)),
            "num_val": int(len(val_idx)),
            "num_test": int(len(yte)),
            "feature_dim": int(xtr.shape[1]),
            "num_classes": int(num_classes),
            "epochs": epochs,
            "batch_size": batch_size,
            "val_fraction": val_fraction,
            "refit": refit,
            "schedule": "cosine",
            "threads": torch.get_num_threads() if dev.type == "cpu" else None,
        }
        chosen: dict[str, int] = {}
        for name, (lrs, offset) in groups.items():
            if not lrs:
                continue
            vals = val_top1[offset:offset + len(lrs)]
            best = max(range(len(lrs)), key=lambda i: (vals[i], -i))
            chosen[name] = best
            result[name] = {
                "lrs": lrs,
                "val_top1": vals,
                "test_top1": test_top1[offset:offset + len(lrs)],
                "best_lr": lrs[best],
                "best_val_top1": vals[best],
            }
        if refit:
            w, b = _train_heads(
                xtr, ytr, num_classes,
                [sgd_lrs[chosen["sgd"]]] if "sgd" in chosen else [],
                [adam_lrs[chosen["adam"]]] if "adam" in chosen else [],
                **hp,
            )
            scores = _head_scores(xte, w, b)
            head_of = {name: i for i, name in enumerate(chosen)}
        else:
            scores = test_scores
            head_of = {name: groups[name][1] + best for name, best in chosen.items()}
        for name, head in head_of.items():
            acc = topk_accuracy(scores[:, head].cpu(), test_labels)
            if not torch.isfinite(w[:, head]).all():
                acc = {key: 0.0 for key in acc}
            result[name]["top1"] = acc["top1"]
            result[name]["top5"] = acc.get("top5")
            result[f"linear_top1_{name}"] = acc["top1"]
        best_opt = max(chosen, key=lambda name: result[name]["best_val_top1"])
        result["best_optimizer"] = best_opt
        result["linear_top1"] = result[best_opt]["top1"]
        result["linear_top5"] = result[best_opt]["top5"]
        result["seconds"] = round(time.perf_counter() - t0, 3)
        if return_head:
            hw = w[:, head_of[best_opt]].double().cpu()  # (D, C), on standardised features
            hb = b[head_of[best_opt]].double().cpu()
            if standardize_features:
                raw = train_feats.double().cpu()
                mean = raw.mean(0)
                std = raw.float().std(0, unbiased=False).clamp_min(1e-6).double()
                hb = hb - (mean / std) @ hw
                hw = hw / std[:, None]
            result["head"] = {"weight": hw.t().float().contiguous(), "bias": hb.float()}
        return result


@contextlib.contextmanager
def _cpu_threads(num_threads: int | None) -> Iterator[None]:
    """Run the block with ``num_threads`` torch threads (``None``: unchanged), then restore."""
    before = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- protocol mode
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
    try:
        n = len(train_ds)  # type: ignore[arg-type]
        # A last batch of one image would break the head's BatchNorm: drop it.
        drop_last = n > batch_size and n % batch_size == 1
        for epoch in range(epochs):
            head.train()
            loader = make_loader(train_ds, batch_size, shuffle=True, num_workers=num_workers,
                                 drop_last=drop_last, seed=seed + epoch, device=dev)
            total, count = 0.0, 0
            for x, y in loader:
                x = to_float_images(x).to(dev, non_blocking=True)
                y = torch.as_tensor(y).long().to(dev)
                with torch.no_grad():
                    feats = backbone(x).flatten(1)
                loss = F.cross_entropy(head(feats), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item() * len(y)
                count += len(y)
            row = {"epoch": epoch + 1, "loss": total / max(count, 1),
                   "lr": opt.param_groups[0]["lr"]}
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
