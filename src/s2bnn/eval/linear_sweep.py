"""The fast linear probe: many heads trained together on cached features, LR chosen held out.

Features are extracted once and standardised, then many linear heads train at once: the heads'
weights are one ``(D, H, C)`` tensor, so a minibatch costs one ``(B, D) x (D, H*C)`` matmul for
all ``H`` learning rates and both optimisers. Gradients are written out by hand (softmax minus
one-hot), which avoids autograd overhead on this tiny convex problem. The learning rate of each
optimiser is chosen on a held-out part of the training features, never on the test set; the
chosen heads are then refit on all training features and scored on the test set.

On a small labelled set one held-out split is too small to choose on: 10 % of 2,000 images is
200, and which head wins there moved a folder's reported top-1 by 2 points (docs/PROBE_EPOCHS.md).
There the choice is made by k-fold cross-validation instead (every training image held out
once), and the test curve comes from heads trained on all training features.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence

import torch

from s2bnn.devices import resolve_device
from s2bnn.eval.features import standardize, topk_accuracy

__all__ = ["DEFAULT_SGD_LRS", "DEFAULT_ADAM_LRS", "DEFAULT_EPOCHS", "fast_linear_sweep",
           "selection_folds", "denormals_as_zero", "denormals_flushed"]

# Wide, log-spaced grids: the best probe LR moves by orders of magnitude with the pre-training
# optimiser (SGD-trained features like high LRs, Adam-trained ones low LRs).
DEFAULT_SGD_LRS: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
DEFAULT_ADAM_LRS: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
# 30, not 10: at 10 epochs the probe had not converged on learned features (Fashion-MNIST:
# +0.6 to +3.0 linear top-1 from 10 to 30 epochs, within +-0.5 from 30 to 100) while raw pixels
# had (docs/PROBE_EPOCHS.md, benchmarks/probe_epochs.py). Tables measured before pin 10.
DEFAULT_EPOCHS = 30
# Below this many held-out images the LR is chosen by cross-validation (``folds=None``).
MIN_VAL_IMAGES = 1000
CV_FOLDS = 5


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
    weight_decays: Sequence[float],
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Train ``len(sgd_lrs) + len(adam_lrs)`` softmax-regression heads together.

    Returns weights ``(D, H, C)`` and biases ``(H, C)``; SGD heads come first. Head ``i`` has
    L2 coefficient ``weight_decays[i]`` (per image, on the weights, not the bias). Each head sees
    the same minibatches; a cosine schedule takes every learning rate to 0 over the run.

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
    if len(weight_decays) != h:
        raise ValueError(f"{len(weight_decays)} weight decays for {h} heads")
    decay = torch.tensor(list(weight_decays), device=dev, dtype=torch.float32).view(1, h, 1)
    any_decay = any(weight_decays)
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
            if any_decay:
                gw[:d].addcmul_(w[:d], decay, value=float(bsz))  # no decay on the bias row
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


def _stratified_folds(labels: torch.Tensor, folds: int, seed: int) -> torch.Tensor:
    """Fold index ``(N,)`` of each sample: every class dealt round-robin over ``folds`` folds
    in a seeded random order, so each fold holds about ``1 / folds`` of every class."""
    gen = torch.Generator()
    gen.manual_seed(seed)
    fold = torch.empty(len(labels), dtype=torch.long)
    start = 0
    for cls in labels.unique().tolist():
        idx = (labels == cls).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        fold[idx] = (torch.arange(len(idx)) + start) % folds
        start += len(idx)  # the next class starts where this one stopped: folds stay even
    return fold


def selection_folds(num_train: int, val_fraction: float) -> int:
    """Folds the LR is chosen with: 1 (one held-out split) when that split holds at least
    ``MIN_VAL_IMAGES`` images, else ``CV_FOLDS`` (fewer for a set too small to split that way)."""
    if num_train * val_fraction >= MIN_VAL_IMAGES:
        return 1
    return max(1, min(CV_FOLDS, num_train // 2))


def fast_linear_sweep(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    num_classes: int | None = None,
    sgd_lrs: Sequence[float] = DEFAULT_SGD_LRS,
    adam_lrs: Sequence[float] = DEFAULT_ADAM_LRS,
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int = 1024,
    momentum: float = 0.9,
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float | Sequence[float] = 0.0,
    val_fraction: float = 0.1,
    refit: bool = False,
    folds: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    num_threads: int | None = 1,
    standardize_features: bool = True,
    return_head: bool = False,
    flush_denormals: bool = True,
) -> dict:
    """Sweep linear-probe learning rates for SGD and Adam on cached features.

    Features are standardised with training statistics (``standardize_features=False`` keeps
    them raw: the best LR then depends on the features' scale, as in the paper's protocol). The
    heads train on ``1 - val_fraction`` of the training features; the LR with the best held-out
    top-1 is chosen per optimiser; with ``refit`` the chosen heads are retrained on all training
    features before the test. ``folds`` > 1 chooses by ``folds``-fold cross-validation instead
    (mean held-out top-1 over the folds) and scores heads trained on all training features;
    ``None``: :func:`selection_folds` (cross-validation when one held-out split would hold
    fewer than ``MIN_VAL_IMAGES`` images). ``weight_decay`` is the heads' L2 coefficient; a list
    of values makes a grid with the LRs, and the pair is chosen together on the same held-out
    split (every value adds a full set of heads: the probe's time grows with the list).

    Returns a JSON-able dict: per optimiser ``lrs``, ``val_top1`` and ``test_top1`` (the whole
    curve, at the chosen weight decay), ``best_lr``, ``best_weight_decay``, ``top1``, ``top5``
    (with several decays also ``best_val_top1_by_weight_decay``); overall
    ``linear_top1``/``linear_top5`` of the optimiser whose chosen head did best on the held-out
    split, and ``linear_top1_sgd``/``_adam``.

    On the CPU the heads train with ``num_threads`` torch threads (``None``: torch's setting).
    The default 1 is deliberate: a step is ~25 ops on ~150k-element tensors, which threads speed
    up little, while on a shared CPU every multi-threaded op waits for all its threads to be
    scheduled (measured here: 2 threads 11x slower than 1 under a load of 4 on 2 cores). One
    thread also makes the result independent of the machine's thread count.

    ``flush_denormals``: on the CPU, treat denormal floats as zero while the heads train (see
    :func:`denormals_as_zero`); the accuracies are unchanged, the probe several times faster.

    ``return_head``: also return ``head`` = ``{"weight": (C, D), "bias": (C,)}``, the chosen
    head of ``best_optimizer`` with the standardisation folded in, so that
    ``feats @ weight.T + bias`` gives its logits on raw features (not JSON: pop it before writing).
    """
    if not sgd_lrs and not adam_lrs:
        raise ValueError("fast_linear_sweep needs at least one SGD or Adam learning rate")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    wds = ((float(weight_decay),) if isinstance(weight_decay, (int, float))
           else tuple(float(v) for v in weight_decay))
    if not wds or any(v < 0 or not math.isfinite(v) for v in wds):
        raise ValueError(f"weight_decay must be >= 0 (or a non-empty list of such), got "
                         f"{weight_decay}")
    # Every (weight decay, LR) pair is one head, grouped by optimiser: SGD heads first, and
    # within an optimiser the LR varies fastest.
    grid_s = [(lr, wd) for wd in wds for lr in sgd_lrs]
    grid_a = [(lr, wd) for wd in wds for lr in adam_lrs]
    heads_s, heads_a = [lr for lr, _ in grid_s], [lr for lr, _ in grid_a]
    decays = [wd for _, wd in grid_s + grid_a]
    dev = resolve_device(device)
    cpu = dev.type == "cpu"
    with (_cpu_threads(num_threads if cpu else None),
          denormals_as_zero(cpu and flush_denormals)):
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
        hp = dict(epochs=epochs, batch_size=batch_size, momentum=momentum, betas=tuple(betas),
                  seed=seed)
        k = selection_folds(len(train_labels), val_fraction) if folds is None else int(folds)
        if k < 1:
            raise ValueError(f"folds must be >= 1, got {folds}")

        def train(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return _train_heads(x, y, num_classes, heads_s, heads_a, weight_decays=decays, **hp)

        if k == 1:
            fit_idx, val_idx = _split_train_val(train_labels, val_fraction, seed)
            fit_idx, val_idx = fit_idx.to(dev), val_idx.to(dev)
            w, b = train(xtr[fit_idx], ytr[fit_idx])
            val_top1 = _per_head_top1(_head_scores(xtr[val_idx], w, b), ytr[val_idx], w)
            num_fit, num_val = len(fit_idx), len(val_idx)
        else:
            fold = _stratified_folds(train_labels, k, seed).to(dev)
            hits = torch.zeros(len(decays), dtype=torch.float64)
            for f in range(k):
                fit, val = fold != f, fold == f
                w, b = train(xtr[fit], ytr[fit])
                top = _per_head_top1(_head_scores(xtr[val], w, b), ytr[val], w)
                hits += torch.tensor(top, dtype=torch.float64) * int(val.sum())
            val_top1 = (hits / len(ytr)).tolist()  # every training image held out once
            # The test curve: every head trained on all training features (so no refit).
            w, b = train(xtr, ytr)
            num_fit = num_val = len(ytr)
            refit = False
        test_scores = _head_scores(xte, w, b)
        test_top1 = _per_head_top1(test_scores, yte, w)

        groups = {"sgd": (list(sgd_lrs), 0), "adam": (list(adam_lrs), len(grid_s))}
        result: dict = {
            "mode": "fast",
            "num_train": int(num_fit),
            "num_val": int(num_val),
            "folds": k,
            "num_test": int(len(yte)),
            "feature_dim": int(xtr.shape[1]),
            "num_classes": int(num_classes),
            "epochs": epochs,
            "batch_size": batch_size,
            "val_fraction": val_fraction,
            "weight_decays": list(wds),
            "refit": refit,
            "schedule": "cosine",
            "threads": torch.get_num_threads() if cpu else None,
        }
        chosen: dict[str, int] = {}  # optimiser -> index of its chosen head in the grid
        for name, (lrs, offset) in groups.items():
            if not lrs:
                continue
            n = len(lrs) * len(wds)
            vals = val_top1[offset:offset + n]
            # Ties go to the smaller LR, then to the smaller weight decay (listed first).
            best = max(range(n), key=lambda i: (vals[i], -(i // len(lrs)), -(i % len(lrs))))
            chosen[name] = best
            at = (best // len(lrs)) * len(lrs)  # the chosen weight decay's curve
            result[name] = {
                "lrs": lrs,
                "val_top1": vals[at:at + len(lrs)],
                "test_top1": test_top1[offset + at:offset + at + len(lrs)],
                "best_lr": lrs[best % len(lrs)],
                "best_weight_decay": wds[best // len(lrs)],
                "best_val_top1": vals[best],
            }
            if len(wds) > 1:
                result[name]["best_val_top1_by_weight_decay"] = [
                    max(vals[j * len(lrs):(j + 1) * len(lrs)]) for j in range(len(wds))]
        if refit:
            pick = [(name, groups[name][1] + chosen[name]) for name in chosen]
            w, b = _train_heads(
                xtr, ytr, num_classes,
                [heads_s[chosen["sgd"]]] if "sgd" in chosen else [],
                [heads_a[chosen["adam"]]] if "adam" in chosen else [],
                weight_decays=[decays[i] for _, i in pick], **hp,
            )
            scores = _head_scores(xte, w, b)
            head_of = {name: i for i, (name, _) in enumerate(pick)}
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


def denormals_flushed() -> bool:
    """Whether this thread's CPU treats denormal floats as zero (``torch.set_flush_denormal``,
    which has no getter): a denormal times one is then zero."""
    return float(torch.tensor([1e-39]) * 1.0) == 0.0


@contextlib.contextmanager
def denormals_as_zero(on: bool = True) -> Iterator[None]:
    """Run the block with denormal floats flushed to zero (``on``), then restore the mode.

    Why: heads with large learning rates reach logits hundreds apart, and ``exp`` of the gap
    lands in the denormal range, where every multiply takes microcode's slow path. On a
    4,000 x 784 raw-pixel probe that made the sweep 6.3-6.8x slower with the same result
    (benchmarks/bench_eval.py). Values below 1.2e-38 cannot move a probe's accuracy. The mode
    is the calling thread's: torch's worker threads keep theirs (the sweep runs on one).
    """
    before = denormals_flushed()
    if not on or before or not torch.set_flush_denormal(True):
        yield  # off, already on, or a CPU without the mode
        return
    try:
        yield
    finally:
        torch.set_flush_denormal(False)
