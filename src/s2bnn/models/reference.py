"""Published ReActNet-A checkpoints -> this project's backbone (and head, key encoder, queue).

Two layouts are read (weights-only, through :func:`s2bnn.checkpoint.load_checkpoint`):

* **S2-BNN** (szq0214/S2-BNN, every strategy): what its ``main_moco.py`` saves, a dict
  ``{'epoch', 'arch', 'state_dict', 'optimizer'}`` whose ``state_dict`` is the DDP-wrapped MoCo
  model: ``module.encoder_q.*`` (the student: ``ReActNet.py``'s module names plus the MLP ``fc``),
  ``module.encoder_k.*`` (its momentum copy) and ``module.queue`` (dim x K) /
  ``module.queue_ptr``. ``ReActNet.py`` builds, in every block, both the plain ``binary_pw`` /
  ``bn2`` pair and the downsampling ``binary_pw_down1/2`` / ``bn2_1/2`` pairs, and runs only one of
  them: the unused pair holds untrained tensors, which are dropped here by name.
* **ReActNet** (liuzechun/ReActNet ``mobilenet/*/train.py``): ``{'epoch', 'state_dict',
  'best_top1_acc', 'optimizer'}`` of a DataParallel model, ``module.feature.*`` with only the used
  layers, binary convolutions storing their latent weights flat as ``.weights`` (numel x 1), and
  the 1000-class ``fc`` classifier.

Per block ``feature.(i+1)`` -> ``blocks.i`` (``feature.0`` is the stem)::

    move11.bias               -> conv3.input_quantizer.beta       RSign: sign(x + b)
    binary_3x3.weight[s]      -> conv3.weight
    bn1                       -> bn1
    move12 / prelu1 / move13  -> act1 (shift_in = -move12, slope, shift_out = move13)
    move21.bias               -> conv1.input_quantizer.beta
    binary_pw, bn2            -> conv1, bn2                                (cout == cin)
    binary_pw_down1/2         -> conv1 = cat(down1, down2)                 (cout == 2 cin)
    bn2_1/2                   -> bn2 = cat(bn2_1, bn2_2)                   (cout == 2 cin)
    move22 / prelu2 / move23  -> act2

The downsampling block's two ``cin -> cin`` convolutions, each with its own BN and the shortcut
``y``, then concatenated, are one ``cin -> 2 cin`` convolution with a BN over ``2 cin`` channels
and the shortcut ``cat(y, y)``: the same function (alpha and BN are per output channel).
The MLP ``fc.0`` / ``fc.2`` becomes the projection head ``head.0`` / ``head.2``; a ``fc``
classifier is kept as ``classifier``.

:func:`load_reference_checkpoint` returns the backbone; :func:`convert_reference_checkpoint`
writes an s2bnn checkpoint (``backbone`` entry + ``method`` state: ``head.*`` and, from an S2-BNN
file, ``moco.key_backbone.*``, ``moco.key_head.*``, ``moco.queue.*``) that works as
``model.init_from`` (with ``model.init_scope=model`` the head, key encoder and queue too), in
``s2bnn eval`` and ``s2bnn export``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from s2bnn.errors import CheckpointError, ModelError, few

__all__ = [
    "REFERENCE_ARCHS",
    "reference_layout",
    "convert_reference_state",
    "load_reference_checkpoint",
    "convert_reference_checkpoint",
]

REFERENCE_ARCHS = ("reactnet_a",)
_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _strip(sd: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _state_dict_of(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    sd = ckpt.get("state_dict", ckpt)
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor)
                                                    for v in sd.values()):
        raise CheckpointError("not a reference checkpoint: no state_dict of tensors")
    if all(k.startswith("module.") for k in sd):
        sd = _strip(sd, "module.")
    return dict(sd)


def reference_layout(ckpt: dict[str, Any]) -> str:
    """``s2bnn`` (a MoCo-wrapped ReActNet from szq0214/S2-BNN), ``reactnet`` (liuzechun/ReActNet)
    or ``unknown``; this project's own checkpoints are ``own``."""
    if isinstance(ckpt.get("backbone"), dict):
        return "own"
    try:
        sd = _state_dict_of(ckpt)
    except CheckpointError:
        return "unknown"
    if any(k.startswith("encoder_q.") for k in sd):
        return "s2bnn"
    if any(k.startswith("feature.") for k in sd):
        return "reactnet"
    return "unknown"


class _Mapper:
    """Builds our backbone's state dict from a reference ReActNet state dict, recording the
    reference keys it reads so that the rest can be reported (or dropped, if known unused)."""

    def __init__(self, sd: dict[str, torch.Tensor], source: str) -> None:
        self.sd = sd
        self.source = source
        self.used: set[str] = set()
        self.missing: list[str] = []
        self.bad_shapes: list[str] = []

    def take(self, key: str) -> torch.Tensor | None:
        if key in self.sd:
            self.used.add(key)
            return self.sd[key]
        self.missing.append(key)
        return None

    def conv(self, prefix: str, shape: torch.Size) -> torch.Tensor | None:
        for suffix in (".weight", ".weights"):
            if prefix + suffix in self.sd:
                self.used.add(prefix + suffix)
                w = self.sd[prefix + suffix]
                if w.numel() != shape.numel():
                    self.bad_shapes.append(f"{prefix}{suffix} {tuple(w.shape)} vs {tuple(shape)}")
                    return None
                return w.reshape(shape)
        self.missing.append(prefix + ".weight")
        return None

    def vec(self, key: str, n: int) -> torch.Tensor | None:
        t = self.take(key)
        if t is not None and t.numel() != n:
            self.bad_shapes.append(f"{key} {tuple(t.shape)} vs ({n},)")
            return None
        return None if t is None else t.reshape(n)

    def bn(self, prefix: str, n: int) -> dict[str, torch.Tensor | None]:
        out: dict[str, torch.Tensor | None] = {}
        for name in _BN:
            if name == "num_batches_tracked":
                out[name] = self.take(f"{prefix}.{name}")
            else:
                out[name] = self.vec(f"{prefix}.{name}", n)
        return out


def _rprelu(m: _Mapper, pre: str, a: str, p: str, b: str, n: int) -> dict[str, Any]:
    shift_in = m.vec(f"{pre}.{a}.bias", n)
    return {"shift_in": None if shift_in is None else -shift_in,
            "slope": m.vec(f"{pre}.{p}.weight", n),
            "shift_out": m.vec(f"{pre}.{b}.bias", n)}


def _unused_keys(block: str, duplicate: bool) -> tuple[str, ...]:
    """Prefixes of the layers S2-BNN's ReActNet.py creates in a block but never calls."""
    if duplicate:
        return (f"{block}.binary_pw.", f"{block}.bn2.")
    return (f"{block}.binary_pw_down1.", f"{block}.binary_pw_down2.", f"{block}.bn2_1.",
            f"{block}.bn2_2.")


def _convert_reactnet(model: nn.Module, sd: dict[str, torch.Tensor], source: str
                      ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """-> (our backbone state dict, leftover ``fc.*`` tensors with the prefix removed)."""
    from s2bnn.models.reactnet import ReActNet

    if not isinstance(model, ReActNet):
        raise ModelError(f"reference conversion supports {', '.join(REFERENCE_ARCHS)} only")
    m = _Mapper(sd, source)
    own = model.state_dict()
    out: dict[str, Any] = {}
    out["stem.0.weight"] = m.conv("feature.0.conv1", own["stem.0.weight"].shape)
    c0 = own["stem.0.weight"].shape[0]
    out.update({f"stem.1.{k}": v for k, v in m.bn("feature.0.bn1", c0).items()})
    ignorable: list[str] = []
    for i, block in enumerate(model.blocks):
        ref, ours = f"feature.{i + 1}", f"blocks.{i}"
        cin, cout = block.conv3.weight.shape[0], block.conv1.weight.shape[0]
        out[f"{ours}.conv3.input_quantizer.beta"] = m.vec(f"{ref}.move11.bias", cin)
        out[f"{ours}.conv3.weight"] = m.conv(f"{ref}.binary_3x3", block.conv3.weight.shape)
        out.update({f"{ours}.bn1.{k}": v for k, v in m.bn(f"{ref}.bn1", cin).items()})
        out.update({f"{ours}.act1.{k}": v
                    for k, v in _rprelu(m, ref, "move12", "prelu1", "move13", cin).items()})
        out[f"{ours}.conv1.input_quantizer.beta"] = m.vec(f"{ref}.move21.bias", cin)
        if block.duplicate:
            half = torch.Size((cin, cin, 1, 1))
            w1 = m.conv(f"{ref}.binary_pw_down1", half)
            w2 = m.conv(f"{ref}.binary_pw_down2", half)
            out[f"{ours}.conv1.weight"] = None if w1 is None or w2 is None else torch.cat((w1, w2))
            b1, b2 = m.bn(f"{ref}.bn2_1", cin), m.bn(f"{ref}.bn2_2", cin)
            for k in _BN:
                if k == "num_batches_tracked":
                    out[f"{ours}.bn2.{k}"] = b1[k]
                else:
                    both = (b1[k], b2[k])
                    out[f"{ours}.bn2.{k}"] = None if None in both else torch.cat(both)
        else:
            out[f"{ours}.conv1.weight"] = m.conv(f"{ref}.binary_pw", block.conv1.weight.shape)
            out.update({f"{ours}.bn2.{k}": v for k, v in m.bn(f"{ref}.bn2", cout).items()})
        out.update({f"{ours}.act2.{k}": v
                    for k, v in _rprelu(m, ref, "move22", "prelu2", "move23", cout).items()})
        ignorable += _unused_keys(ref, block.duplicate)
    head = {k[len("fc."):]: v for k, v in sd.items() if k.startswith("fc.")}
    unexpected = [k for k in sd if k not in m.used and not k.startswith("fc.")
                  and not k.startswith(tuple(ignorable))]
    if m.missing or unexpected or m.bad_shapes:
        parts = []
        if m.missing:
            parts.append(f"{len(m.missing)} missing key(s): {few(m.missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {few(unexpected)}")
        if m.bad_shapes:
            parts.append(f"shape mismatch (file vs model): {few(m.bad_shapes)}")
        raise CheckpointError(
            f"{source} is not a ReActNet-A checkpoint of this layout ({'; '.join(parts)}); "
            "is it another architecture, or another width?"
        )
    state = {k: v.detach().clone().to(own[k].dtype) for k, v in out.items()}
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):  # defensive: the mapping above sets shapes
            raise CheckpointError(f"{source}: {k} converts to {tuple(v.shape)}, "
                                  f"expected {tuple(own[k].shape)}")
    return state, head


def _split_head(head: dict[str, torch.Tensor], source: str
                ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``fc.*`` -> (projection head as ``0/2.*`` of an MLP, classifier ``weight/bias``)."""
    if not head:
        return {}, {}
    if set(head) <= {"weight", "bias"}:
        return {}, dict(head)
    if all(k.split(".")[0].isdigit() for k in head):
        return dict(head), {}
    raise CheckpointError(f"{source}: cannot read the fc layer (keys {few(list(head))})")


def _infer_kwargs(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Width, input channels and number of 512-channel blocks from the stem and block count
    (1.0, 3 and 5 for the published ReActNet-A), so narrower variants convert too."""
    stem = sd.get("feature.0.conv1.weight")
    if not isinstance(stem, torch.Tensor) or stem.dim() != 4:
        return {}
    blocks = {int(k.split(".")[1]) for k in sd if k.startswith("feature.")
              and k.split(".")[1].isdigit()} - {0}
    out: dict[str, Any] = {"in_chans": int(stem.shape[1])}
    if stem.shape[0] != 32:
        out["width_mult"] = stem.shape[0] / 32
    if blocks and len(blocks) - 8 != 5 and len(blocks) >= 8:
        out["mid_blocks"] = len(blocks) - 8
    return out


def convert_reference_state(
    ckpt: dict[str, Any], arch: str = "reactnet_a", *, binary_weight: bool | None = None,
    source: str = "checkpoint", **model_kwargs: Any,
) -> dict[str, Any]:
    """Convert a loaded reference checkpoint; returns a dict with ``layout``, ``kwargs`` (for
    ``build_model(arch, **kwargs)``), ``backbone`` (state dict), ``head`` (MLP ``0.*``/``2.*``,
    possibly empty), ``classifier`` (``weight``/``bias``, possibly empty) and ``method`` (the
    s2bnn method state: ``head.*``, plus ``moco.*`` key encoder and queue from an S2-BNN file).

    ``binary_weight`` None: True for the binary ``.weights`` of ReActNet's files and, for S2-BNN
    files (whose step-1 and step-2 names are the same), True, the published models being step 2.
    """
    from s2bnn.models import build_model

    if arch not in REFERENCE_ARCHS:
        raise ModelError(f"--arch {arch}: reference checkpoints exist for "
                         f"{', '.join(REFERENCE_ARCHS)} only")
    layout = reference_layout(ckpt)
    if layout == "own":
        found = ckpt["backbone"].get("name")
        if found != arch:
            raise CheckpointError(
                f"{source} is already an s2bnn checkpoint of a '{found}' backbone, not --arch "
                f"{arch}; it needs no conversion (use it directly, with model.name={found})"
            )
        raise CheckpointError(f"{source} is already an s2bnn checkpoint ({arch}); it needs no "
                              "conversion: use it directly as model.init_from or in s2bnn eval")
    if layout == "unknown":
        raise CheckpointError(
            f"{source} is not a reference ReActNet checkpoint (expected S2-BNN's "
            "module.encoder_q.feature.* or ReActNet's module.feature.* keys)"
        )
    sd = _state_dict_of(ckpt)
    query = _strip(sd, "encoder_q.") if layout == "s2bnn" else sd
    if layout == "s2bnn":
        stray = [k for k in sd if not k.startswith(("encoder_q.", "encoder_k."))
                 and k not in ("queue", "queue_ptr")]
        if stray:
            raise CheckpointError(f"{source}: unexpected keys in an S2-BNN checkpoint: "
                                  f"{few(stray)}")
    if binary_weight is None:
        binary_weight = True
    kwargs = {"num_classes": 0, "binary_act": True, "binary_weight": bool(binary_weight),
              **_infer_kwargs(query), **model_kwargs}
    model = build_model(arch, **kwargs)
    backbone, fc = _convert_reactnet(model, query, source)
    head, classifier = _split_head(fc, source)
    method: dict[str, torch.Tensor] = {f"backbone.{k}": v for k, v in backbone.items()}
    method.update({f"head.{k}": v.detach().clone() for k, v in head.items()})
    if layout == "s2bnn" and any(k.startswith("encoder_k.") for k in sd):
        key_bb, key_fc = _convert_reactnet(model, _strip(sd, "encoder_k."), f"{source} (encoder_k)")
        key_head, _ = _split_head(key_fc, source)
        method.update({f"moco.key_backbone.{k}": v for k, v in key_bb.items()})
        method.update({f"moco.key_head.{k}": v.detach().clone() for k, v in key_head.items()})
        method["moco.initialized"] = torch.tensor(True)
        if "queue" in sd:
            method["moco.queue.keys"] = sd["queue"].detach().t().contiguous().clone()
            ptr = sd.get("queue_ptr", torch.zeros(1, dtype=torch.long))
            method["moco.queue.ptr"] = ptr.detach().reshape(()).to(torch.long).clone()
    return {"layout": layout, "arch": arch, "kwargs": kwargs, "backbone": backbone, "head": head,
            "classifier": classifier, "method": method, "epoch": ckpt.get("epoch")}


def load_reference_checkpoint(
    path: str | Path, arch: str = "reactnet_a", *, binary_weight: bool | None = None,
    with_classifier: bool = False, **model_kwargs: Any,
) -> nn.Module:
    """Our backbone (eval mode) from a published S2-BNN or ReActNet checkpoint; its pooled
    features (``num_classes=0``) equal the reference network's before its ``fc``. With
    ``with_classifier`` and a classifier ``fc`` in the file (ReActNet's 1000-class release),
    the backbone gets that classifier and returns its logits."""
    from s2bnn.checkpoint import load_checkpoint
    from s2bnn.models import build_model

    conv = convert_reference_state(load_checkpoint(path), arch, binary_weight=binary_weight,
                                   source=str(path), **model_kwargs)
    kwargs, state = dict(conv["kwargs"]), dict(conv["backbone"])
    cls = conv["classifier"]
    if with_classifier:
        if not cls:
            raise CheckpointError(f"{path} holds no classifier fc (only a projection head)")
        kwargs["num_classes"] = int(cls["weight"].shape[0])
        state.update({f"fc.{k}": v for k, v in cls.items()})
    model = build_model(arch, **kwargs)
    model.load_state_dict(state, strict=True)
    return model.eval()


def convert_reference_checkpoint(
    src: str | Path, out: str | Path, arch: str = "reactnet_a", *,
    binary_weight: bool | None = None, force: bool = False,
) -> dict[str, Any]:
    """Write ``src`` (a reference checkpoint) as an s2bnn checkpoint at ``out``; returns a summary
    (``layout``, ``arch``, ``kwargs``, ``head``, ``classifier``, ``key_encoder``, ``out``)."""
    from s2bnn.checkpoint import load_checkpoint, save_checkpoint
    from s2bnn.errors import RunDirError

    out = Path(out)
    if out.exists() and not force:
        raise RunDirError(f"{out} already exists; pass --force to overwrite it")
    conv = convert_reference_state(load_checkpoint(src), arch, binary_weight=binary_weight,
                                   source=str(src))
    ckpt: dict[str, Any] = {
        "format": "s2bnn", "version": 1, "converted_from": {"path": str(src),
                                                            "layout": conv["layout"]},
        "epoch": conv["epoch"], "step": None, "finished": True,
        "backbone": {"name": arch, "kwargs": conv["kwargs"], "state_dict": conv["backbone"]},
        # The backbone is stored once, under "backbone" (s2bnn.checkpoint.method_state).
        "method": {k: v for k, v in conv["method"].items() if not k.startswith("backbone.")},
    }
    if conv["classifier"]:
        ckpt["classifier"] = conv["classifier"]
    out.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(ckpt, out)
    return {"layout": conv["layout"], "arch": arch, "kwargs": conv["kwargs"],
            "head": bool(conv["head"]), "classifier": bool(conv["classifier"]),
            "key_encoder": any(k.startswith("moco.") for k in conv["method"]), "out": str(out)}
