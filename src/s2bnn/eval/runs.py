"""Evaluate a saved backbone (run dir, checkpoint or export) on a named dataset, with outputs.

This is what ``s2bnn eval linear | knn | finetune`` run: rebuild the backbone, pick the dataset
the run trained on (or the one asked for), check its channels against the model, evaluate, and
write ``eval_<kind>.json`` (plus ``eval_features.npz``, a test-feature sample for the report's
2-D map) into the run dir.
"""

from __future__ import annotations

import copy
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import Dataset, Subset

from s2bnn.checkpoint import atomic_write_bytes
from s2bnn.devices import resolve_device
from s2bnn.errors import DataError

__all__ = [
    "EvalSetup",
    "prepare_eval",
    "run_linear",
    "run_knn",
    "run_finetune",
    "write_json",
    "save_embedding_sample",
    "load_embedding_sample",
]

DEFAULT_DATA = "fashion-mnist"
SAMPLE_FILE = "eval_features.npz"
# torchvision's RandomResizedCrop default, used by the reference main_lincls.py's training crops.
LINCLS_CROP_SCALE = (0.08, 1.0)


@dataclass
class EvalSetup:
    """A rebuilt backbone and the dataset it will be evaluated on."""

    backbone: nn.Module
    info: dict[str, Any]
    data: str
    root: str | None
    image_size: int
    in_chans: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    out_dir: Path
    device: torch.device
    train_raw: Dataset
    test_raw: Dataset

    def eval_sets(self) -> tuple[Dataset, Dataset]:
        """Train and test splits with the eval transform (resize, centre crop, normalise)."""
        from s2bnn.data import build_eval_transform

        tf = build_eval_transform(self.image_size, self.in_chans, self.mean, self.std)
        return _with_transform(self.train_raw, tf), _with_transform(self.test_raw, tf)

    def train_augmented(self, dataset: Dataset | None = None,
                        crop_scale: tuple[float, float] | None = LINCLS_CROP_SCALE) -> Dataset:
        """A training split that yields one randomly cropped, flipped view per item.

        RandomResizedCrop(``image_size``, scale ``crop_scale``, aspect 3/4-4/3) + horizontal
        flip, then normalisation; no colour or blur. The default ``crop_scale`` is torchvision's
        (0.08, 1), the training transform of the reference ``main_lincls.py``; ``None`` is the
        augmentation presets' sized crop scale (0.2-1, or 0.35-1 up to 64 px).
        """
        from s2bnn.data import build_train_transform

        # With colour and blur off, the preset adds nothing but crop, flip and normalise.
        tf = build_train_transform("s2bnn_lite", self.image_size, self.in_chans, num_views=1,
                                   crop_scale=crop_scale, color=False, blur=False,
                                   mean=self.mean, std=self.std)
        return _with_transform(dataset if dataset is not None else self.train_raw, tf)

    def describe(self) -> dict[str, Any]:
        """The JSON header every eval file starts with."""
        return {
            "source": self.info["source"],
            "backbone": self.info["name"],
            "kwargs": self.info["kwargs"],
            "epoch": self.info.get("epoch"),
            "step": self.info.get("step"),
            "data": self.data,
            "image_size": self.image_size,
            "num_classes": self.num_classes,
        }


def _with_transform(dataset: Dataset, transform: Any) -> Dataset:
    """A shallow copy of ``dataset`` (images shared, not copied) with another transform."""
    if isinstance(dataset, Subset):
        return Subset(_with_transform(dataset.dataset, transform), dataset.indices)
    ds = copy.copy(dataset)
    ds.transform = transform  # type: ignore[attr-defined]
    return ds


def prepare_eval(
    path: str | Path,
    data: str | None = None,
    root: str | None = None,
    image_size: int | None = None,
    device: str | torch.device = "auto",
    limit: int | None = None,
    test_limit: int | None = None,
    out_dir: str | Path | None = None,
) -> EvalSetup:
    """Rebuild the backbone at ``path`` and load the evaluation dataset.

    ``data`` defaults to the run's ``data.name`` (else Fashion-MNIST); ``image_size`` to the
    run's resolution when evaluating on its own dataset, else the dataset's default. A dataset
    whose channel count differs from the model's raises :class:`DataError` before any work.
    """
    from s2bnn import data as data_mod
    from s2bnn.eval.loading import load_backbone

    backbone, info = load_backbone(path)
    cfg_data = ((info.get("config") or {}).get("data") or {})
    own = cfg_data.get("name")
    name = data or own or DEFAULT_DATA
    same = own is not None and name == own
    if root is None and same:
        root = cfg_data.get("root")
    if image_size is None:
        image_size = cfg_data.get("image_size") if same else None
        image_size = int(image_size or data_mod.default_image_size(name))
    train_raw = data_mod.build_dataset(name, "train", root=root, limit=limit)
    ds_chans = int(getattr(train_raw, "in_chans", 0) or 0)
    model_chans = info.get("in_chans")
    if model_chans is not None and ds_chans and ds_chans != model_chans:
        raise DataError(
            f"dataset '{name}' has {ds_chans}-channel images but the model takes {model_chans} "
            f"channels; evaluate on a {model_chans}-channel dataset "
            f"(--data {own or 'NAME'})"
        )
    test_raw = data_mod.build_dataset(name, "test", root=root, limit=test_limit)
    if len(test_raw) == 0:  # type: ignore[arg-type]
        raise DataError(f"dataset '{name}' has no test split to evaluate on")
    mean, std = data_mod.dataset_stats(name)
    num_classes = int(getattr(train_raw, "num_classes", 0) or 0)
    if not num_classes:
        num_classes = int(data_mod.get_targets(train_raw).max()) + 1
    if out_dir is None:
        src = Path(path)
        out_dir = info["run_dir"] or (src if src.is_dir() else src.parent)
    return EvalSetup(
        backbone=backbone, info=info, data=name, root=root, image_size=int(image_size),
        in_chans=ds_chans or int(model_chans or 1), num_classes=num_classes,
        mean=tuple(mean), std=tuple(std), out_dir=Path(out_dir),
        device=resolve_device(device), train_raw=train_raw, test_raw=test_raw,
    )


def write_json(obj: dict[str, Any], path: str | Path) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    path = Path(path)
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())
    return path


def save_embedding_sample(sample: dict[str, torch.Tensor], path: str | Path) -> Path:
    """Store a test-feature sample (``features``, ``labels``) as ``.npz`` for later plots."""
    buf = io.BytesIO()
    np.savez_compressed(buf, features=sample["features"].float().numpy(),
                        labels=sample["labels"].long().numpy())
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def load_embedding_sample(path: str | Path) -> dict[str, np.ndarray] | None:
    """The sample written by :func:`save_embedding_sample`, or ``None`` if absent/unreadable."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as fh:
            return {"features": fh["features"], "labels": fh["labels"]}
    except (OSError, ValueError, KeyError):
        return None


def _finish(setup: EvalSetup, kind: str, result: dict[str, Any], out: str | Path | None) -> dict:
    sample = result.pop("embedding_sample", None)
    payload = {"eval": kind, **setup.describe(), **result}
    target = Path(out) if out is not None else setup.out_dir / f"eval_{kind}.json"
    write_json(payload, target)
    payload["output"] = str(target)
    if sample is not None:
        save_embedding_sample(sample, target.parent / SAMPLE_FILE)
    return payload


HEAD_FILE = "head.safetensors"
HEAD_FORMAT = "s2bnn-head"


def save_head_file(setup: EvalSetup, head: dict[str, torch.Tensor], path: str | Path,
                   optimizer: str) -> Path:
    """The chosen linear head (on raw pooled features) with what a deployed classifier needs:
    metadata ``format``, ``num_classes``, ``feature_dim``, ``classes`` (names), ``data``,
    ``image_size``, ``in_chans``, ``mean``, ``std`` (the eval transform) and ``optimizer``."""
    from s2bnn.checkpoint import save_safetensors

    classes = [str(c) for c in getattr(setup.train_raw, "classes", None) or []]
    if len(classes) != setup.num_classes:
        classes = [f"class_{i}" for i in range(setup.num_classes)]
    meta = {"format": HEAD_FORMAT, "num_classes": setup.num_classes,
            "feature_dim": int(head["weight"].shape[1]), "classes": classes,
            "data": setup.data, "image_size": setup.image_size, "in_chans": setup.in_chans,
            "mean": list(setup.mean), "std": list(setup.std), "optimizer": optimizer,
            "source": setup.info["source"]}
    save_safetensors({"weight": head["weight"], "bias": head["bias"]}, path, metadata=meta)
    return Path(path)


def run_knn(
    path: str | Path,
    *,
    k: int = 200,
    temperature: float = 0.1,
    batch_size: int = 256,
    num_workers: int = 0,
    out: str | Path | None = None,
    **prepare_kwargs: Any,
) -> dict[str, Any]:
    """Weighted kNN of a saved backbone; writes ``eval_knn.json``. Returns the JSON dict."""
    from s2bnn.eval.baselines import evaluate_backbone

    setup = prepare_eval(path, **prepare_kwargs)
    train_ds, test_ds = setup.eval_sets()
    res = evaluate_backbone(setup.backbone, train_ds, test_ds, num_classes=setup.num_classes,
                            batch_size=batch_size, num_workers=num_workers, device=setup.device,
                            knn_k=k, knn_temperature=temperature, linear=False, sample_size=2000)
    return _finish(setup, "knn", res, out)


def run_linear(
    path: str | Path,
    *,
    mode: str = "fast",
    batch_size: int = 256,
    num_workers: int = 0,
    out: str | Path | None = None,
    sweep_kwargs: dict[str, Any] | None = None,
    protocol_kwargs: dict[str, Any] | None = None,
    log: Any = None,
    save_head: bool = False,
    crop_scale: tuple[float, float] | None = LINCLS_CROP_SCALE,
    **prepare_kwargs: Any,
) -> dict[str, Any]:
    """Linear probe of a saved backbone, ``fast`` (cached LR sweep) or ``protocol`` (paper).

    Writes ``eval_linear.json`` (fast; kNN included since the features are at hand) or
    ``eval_linear_protocol.json``. Returns the JSON dict. ``save_head`` (fast mode) also writes
    the chosen head as ``head.safetensors`` next to the JSON (see :func:`save_head_file`);
    ``s2bnn export`` includes it. ``protocol`` trains on :meth:`EvalSetup.train_augmented` crops
    at ``crop_scale`` (default: the reference ``main_lincls.py``'s 0.08-1, with flips) and,
    unless ``protocol_kwargs`` say otherwise, the bare linear layer of ``main_lincls.py``.
    """
    from s2bnn.eval.baselines import evaluate_backbone
    from s2bnn.eval.linear_protocol import linear_probe_protocol

    if mode not in ("fast", "protocol"):
        raise DataError(f"linear eval mode must be fast or protocol, got '{mode}'")
    setup = prepare_eval(path, **prepare_kwargs)
    train_ds, test_ds = setup.eval_sets()
    if save_head and mode != "fast":
        raise DataError("--save-head needs the fast linear mode (the default)")
    if mode == "fast":
        if save_head:
            sweep_kwargs = {**(sweep_kwargs or {}), "return_head": True}
        res = evaluate_backbone(setup.backbone, train_ds, test_ds, num_classes=setup.num_classes,
                                batch_size=batch_size, num_workers=num_workers,
                                device=setup.device, sweep_kwargs=sweep_kwargs, sample_size=2000)
        head = res["linear"].pop("head", None)
        payload = _finish(setup, "linear", res, out)
        if head is not None:
            target = Path(payload["output"]).parent / HEAD_FILE
            save_head_file(setup, head, target, res["linear"]["best_optimizer"])
            payload["head_file"] = str(target)
        return payload
    res = linear_probe_protocol(setup.backbone, setup.train_augmented(crop_scale=crop_scale),
                                test_ds, num_classes=setup.num_classes, batch_size=batch_size,
                                num_workers=num_workers, device=setup.device, log=log,
                                **(protocol_kwargs or {}))
    res["crop_scale"] = list(crop_scale) if crop_scale is not None else None
    return _finish(setup, "linear_protocol", res, out)


def run_finetune(
    path: str | Path,
    *,
    label_fraction: float,
    seed: int = 0,
    batch_size: int = 256,
    num_workers: int = 0,
    out: str | Path | None = None,
    finetune_kwargs: dict[str, Any] | None = None,
    log: Any = None,
    **prepare_kwargs: Any,
) -> dict[str, Any]:
    """Fine-tune a saved backbone on a class-balanced ``label_fraction`` of the training labels.

    Writes ``eval_finetune_<percent>.json`` (e.g. ``eval_finetune_1.json`` for 0.01).
    """
    from s2bnn.data import labelled_subset
    from s2bnn.eval.finetune import check_label_fraction, finetune, fraction_tag

    fraction = check_label_fraction(label_fraction)
    setup = prepare_eval(path, **prepare_kwargs)
    train_eval, test_ds = setup.eval_sets()
    subset = labelled_subset(setup.train_raw, fraction, seed)
    calib = Subset(train_eval, subset.indices)  # the labelled images, eval transform
    # Fine-tuning keeps the presets' sized crops (0.2-1, 0.35-1 for small images).
    res = finetune(setup.backbone, setup.train_augmented(subset, crop_scale=None), test_ds,
                   num_classes=setup.num_classes, batch_size=batch_size, num_workers=num_workers,
                   seed=seed, device=setup.device, calib_ds=calib, log=log,
                   **(finetune_kwargs or {}))
    res = {"label_fraction": fraction, "seed": seed, **res}
    return _finish(setup, f"finetune_{fraction_tag(fraction)}", res, out)
