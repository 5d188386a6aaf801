"""``s2bnn export --format packed | onnx`` and ``s2bnn predict``: run dir -> deployable file.

The exported network is the run's backbone and, where ``s2bnn eval linear --save-head`` left a
``head.safetensors`` in the run dir, its linear classifier: the file then maps images to class
logits and carries what ``predict`` needs (image size, channels, normalisation, class names).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from s2bnn.errors import CheckpointError, DataError, RunDirError

__all__ = ["export_packed", "export_onnx", "predict_files", "build_deploy_model"]

HEAD_FILE = "head.safetensors"


class _WithHead(nn.Module):
    def __init__(self, backbone: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head
        self.in_chans = getattr(backbone, "in_chans", None)
        self.min_image_size = getattr(backbone, "min_image_size", 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def _head_path(path: Path) -> Path | None:
    from s2bnn.eval.loading import run_dir_of

    rd = run_dir_of(path)
    for cand in ([rd / HEAD_FILE] if rd else []) + [path.parent / HEAD_FILE]:
        if cand.is_file():
            return cand
    return None


def build_deploy_model(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The backbone of ``path`` (+ its saved head) in eval mode, and the file's ``meta``."""
    from s2bnn.checkpoint import load_safetensors
    from s2bnn.eval.loading import load_backbone

    path = Path(path)
    backbone, info = load_backbone(path)
    meta: dict[str, Any] = {"source": str(path), "backbone": info["name"],
                            "kwargs": info["kwargs"], "epoch": info.get("epoch"),
                            "output": "features", "feature_dim": info.get("feature_dim")}
    cfg_data = ((info.get("config") or {}).get("data") or {})
    pre: dict[str, Any] = {"in_chans": info.get("in_chans")}
    if cfg_data.get("name"):
        pre["data"] = cfg_data["name"]
        pre["image_size"] = cfg_data.get("image_size")
        try:
            from s2bnn.data import dataset_stats

            mean, std = dataset_stats(cfg_data["name"])
            pre.update(mean=list(mean), std=list(std))
        except Exception:  # the dataset may not exist where the export runs
            pass
    model: nn.Module = backbone
    head_file = _head_path(path)
    if head_file is not None:
        obj = load_safetensors(head_file)
        hm, st = obj["metadata"], obj["state_dict"]
        w, b = st.get("weight"), st.get("bias")
        fd = int(getattr(backbone, "feature_dim", 0) or 0)
        if w is None or b is None or w.dim() != 2 or (fd and w.shape[1] != fd):
            raise CheckpointError(f"{head_file} does not fit this backbone (expected a "
                                  f"(classes, {fd}) weight); run `s2bnn eval linear RUN_DIR "
                                  "--save-head` again")
        head = nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            head.weight.copy_(w)
            head.bias.copy_(b)
        model = _WithHead(backbone, head).eval()
        meta.update(output="logits", classes=list(hm.get("classes") or []),
                    head_file=str(head_file))
        pre.update({k: hm[k] for k in ("data", "image_size", "in_chans", "mean", "std")
                    if hm.get(k) is not None})
    meta["preprocess"] = pre
    return model, meta


def _check_out(out: Path, suffixes: tuple[str, ...], force: bool) -> None:
    if out.suffix not in suffixes:
        raise RunDirError(f"export target {out} must end in {' or '.join(suffixes)}")
    if out.exists() and not force:
        raise RunDirError(f"{out} already exists; pass --force to overwrite it")


def export_packed(path: str | Path, out: str | Path, force: bool = False) -> Path:
    """Write the packed network of a run dir / checkpoint / export to ``out`` (``.s2bnn``)."""
    from s2bnn.deploy import pack

    out = Path(out)
    _check_out(out, (".s2bnn", ".bin", ".packed"), force)
    model, meta = build_deploy_model(path)
    packed = pack(model, meta=meta, isa="torch")  # built and checked before anything is written
    return packed.save(out)


def export_onnx(path: str | Path, out: str | Path, force: bool = False,
                image_size: int | None = None, check: bool = True) -> Path:
    """The packed network as float ONNX (signs as ``Sign``, binary weights as +-scale)."""
    from s2bnn.deploy import pack

    out = Path(out)
    _check_out(out, (".onnx",), force)
    model, meta = build_deploy_model(path)
    packed = pack(model, meta=meta, isa="torch")
    size = int(image_size or meta["preprocess"].get("image_size") or 224)
    return onnx_from_packed(packed, out, size, check=check)


def onnx_from_packed(packed: Any, out: str | Path, image_size: int, check: bool = True) -> Path:
    """Export ``FloatNet(packed)`` to ``out`` (batch and image size dynamic)."""
    import io
    import json
    import warnings

    from s2bnn.checkpoint import atomic_write_bytes
    from s2bnn.deploy.floatnet import FloatNet

    try:
        import onnx
    except ImportError:
        raise DataError("ONNX export needs the onnx package: pip install onnx onnxruntime") \
            from None
    net = FloatNet(packed).eval()
    x = torch.randn(1, packed.in_chans, image_size, image_size)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (x,), buf, input_names=["images"], output_names=["output"],
                          dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"},
                                        "output": {0: "batch"}},
                          opset_version=17, dynamo=False)
    model = onnx.load_from_string(buf.getvalue())
    for key, value in (("s2bnn_meta", json.dumps(packed.meta)),
                       ("s2bnn_note", "float interchange model: 1-bit layers run as float "
                                      "(Sign + convolution with +-scale weights)")):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    if check:
        onnx.checker.check_model(model)
    atomic_write_bytes(out, model.SerializeToString())
    return Path(out)


# --------------------------------------------------------------------------- predict
def load_image(path: str | Path, pre: dict[str, Any]) -> torch.Tensor:
    """One image file -> the ``(C, H, W)`` float tensor the network was evaluated on."""
    from PIL import Image, UnidentifiedImageError

    size = int(pre.get("image_size") or 224)
    chans = int(pre.get("in_chans") or 3)
    try:
        with Image.open(path) as im:
            im = im.convert("L" if chans == 1 else "RGB")
            w, h = im.size
            short = size if size <= 64 else int(round(size / 0.875))
            scale = short / min(w, h)
            im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))),
                           Image.BILINEAR)
            w, h = im.size
            left, top = (w - size) // 2, (h - size) // 2
            im = im.crop((left, top, left + size, top + size))
            data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    except FileNotFoundError:
        raise DataError(f"image {path} does not exist") from None
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise DataError(f"{path} is not a readable image ({str(err).splitlines()[0]})") from None
    x = data.reshape(size, size, chans).permute(2, 0, 1).float() / 255.0
    mean = torch.tensor(pre.get("mean") or [0.0] * chans).view(-1, 1, 1)
    std = torch.tensor(pre.get("std") or [1.0] * chans).view(-1, 1, 1)
    return (x - mean) / std


def predict_files(packed_path: str | Path, images: list[str], top: int = 5
                  ) -> list[dict[str, Any]]:
    """Top-``top`` classes (name, index, probability) of each image, from the packed file alone."""
    from s2bnn.deploy import load

    packed = load(packed_path)
    meta = packed.meta
    if meta.get("output") != "logits":
        raise CheckpointError(f"{packed_path} has no classifier (it outputs features); run "
                              "`s2bnn eval linear RUN_DIR --save-head`, then export again")
    pre = meta.get("preprocess") or {}
    xs = torch.stack([load_image(p, pre) for p in images])  # every image checked first
    probs = torch.softmax(packed(xs), dim=1)
    classes = meta.get("classes") or []
    k = min(top, probs.shape[1])
    out = []
    for path, p in zip(images, probs):
        val, idx = p.topk(k)
        out.append({"image": str(path), "top": [
            {"class": classes[i] if i < len(classes) else str(i), "index": int(i),
             "prob": float(v)} for v, i in zip(val.tolist(), idx.tolist())]})
    return out


def print_predictions(results: list[dict[str, Any]], file: Any = None) -> None:
    file = file or sys.stdout
    for r in results:
        print(r["image"], file=file)
        for rank, t in enumerate(r["top"], 1):
            print(f"  {rank}. {t['class']:<24} {100 * t['prob']:6.2f} %", file=file)
