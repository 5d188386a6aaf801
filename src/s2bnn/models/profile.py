"""Parameter counts, FLOPs, BOPs, OPs and model size (the ``s2bnn profile`` contract).

Counting follows the ReActNet / Bi-Real papers: only convolutions and linear layers are counted,
one operation per multiply-accumulate (BatchNorm, activations, pooling and additions are left
out). A layer whose input *and* weights are both binary (a :class:`~s2bnn.nn.QuantConv2d` /
``QuantLinear`` with binary input and weight quantizers) contributes binary operations (BOPs);
every other conv / linear, including binary-activation real-weight layers (step 1 of two-step
training), contributes FLOPs. ``ops = bops / 64 + flops``.

Binary parameters are the weights of layers with a binary weight quantizer; everything else
(biases, BatchNorm, RSign / RPReLU, real layers) is real. ``size_packed_bytes`` stores binary
weights at 1 bit and the rest as float32; ``size_float32_bytes`` stores everything as float32.
Buffers (BatchNorm running statistics) are not counted.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from s2bnn.errors import ModelError
from s2bnn.nn.quantizers import is_binary

__all__ = ["profile_model", "format_profile"]


def _binary_weight(module: nn.Module) -> bool:
    return is_binary(getattr(module, "weight_quantizer", None))


def _binary_input(module: nn.Module) -> bool:
    return is_binary(getattr(module, "input_quantizer", None))


def profile_model(model: nn.Module, image_size: int = 224, in_chans: int = 3) -> dict[str, Any]:
    """Count parameters and operations of ``model`` for one ``in_chans x image_size^2`` image.

    Runs one forward pass in eval mode under ``no_grad`` with forward hooks on every conv and
    linear layer; the model's training mode is restored afterwards. Returns the keys
    ``real_params``, ``binary_params``, ``flops``, ``bops``, ``ops``, ``size_float32_bytes``,
    ``size_packed_bytes`` (plus ``image_size`` and ``in_chans``).
    """
    if image_size < 1 or in_chans < 1:
        raise ModelError(
            f"image size and channels must be positive, got image_size={image_size}, "
            f"in_chans={in_chans}"
        )
    model_chans = getattr(model, "in_chans", in_chans)
    if model_chans != in_chans:
        raise ModelError(
            f"model takes {model_chans}-channel images but in_chans={in_chans} was asked; "
            "pass the same --in-chans to the model and the profile"
        )
    min_size = int(getattr(model, "min_image_size", 1))
    if image_size < min_size:
        raise ModelError(f"image size {image_size} is too small; the minimum is {min_size} px")

    binary_params = 0
    real_params = 0
    seen: set[int] = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if name == "weight" and _binary_weight(module):
                binary_params += p.numel()
            else:
                real_params += p.numel()

    counts = {"flops": 0, "bops": 0}

    def hook(module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            macs = output.numel() * (module.in_channels // module.groups) * k
        else:  # nn.Linear
            macs = output.numel() * module.in_features
        key = "bops" if _binary_input(module) and _binary_weight(module) else "flops"
        counts[key] += int(macs)

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    was_training = model.training
    try:
        model.eval()
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        with torch.no_grad():
            model(torch.zeros(1, in_chans, image_size, image_size, device=device))
    except RuntimeError as err:
        raise ModelError(
            f"model cannot take {in_chans}x{image_size}x{image_size} images "
            f"({str(err).splitlines()[0]}); try a larger --image-size"
        ) from err
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    flops, bops = counts["flops"], counts["bops"]
    return {
        "image_size": image_size,
        "in_chans": in_chans,
        "real_params": real_params,
        "binary_params": binary_params,
        "flops": flops,
        "bops": bops,
        "ops": bops / 64 + flops,
        "size_float32_bytes": 4 * (real_params + binary_params),
        "size_packed_bytes": 4 * real_params + (binary_params + 7) // 8,
    }


def format_profile(name: str, prof: dict[str, Any]) -> str:
    """A short human-readable table of :func:`profile_model`'s result."""

    def mib(n: float) -> str:
        return f"{n / 2**20:.2f} MiB"

    rows = [
        ("model", name),
        ("input", f"{prof['in_chans']}x{prof['image_size']}x{prof['image_size']}"),
        ("real params", f"{prof['real_params']:,}"),
        ("binary params", f"{prof['binary_params']:,}"),
        ("FLOPs", f"{prof['flops']:.3e}"),
        ("BOPs", f"{prof['bops']:.3e}"),
        ("OPs", f"{prof['ops']:.3e}  (BOPs/64 + FLOPs)"),
        ("size float32", mib(prof["size_float32_bytes"])),
        ("size packed", mib(prof["size_packed_bytes"])),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:>{width}}  {v}" for k, v in rows)
