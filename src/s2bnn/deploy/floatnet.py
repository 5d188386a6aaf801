"""The packed network run as float: what ONNX holds and what a float engine would run.

:class:`FloatNet` interprets the same op graph as :class:`~s2bnn.deploy.runtime.PackedModel`
with ordinary torch ops: a sign is ``torch.sign`` (exported as ONNX ``Sign``), a binary
convolution is a float convolution of the +-1 input with its weights pre-computed once as
``+-scale`` per output channel (alpha and BatchNorm folded in), zero-padded exactly as the
trained model. ``torch.sign`` maps an exact 0 to 0 where the trained sign gives +1; that differs
only on inputs that land exactly on a threshold.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from s2bnn.deploy.runtime import PackedModel, act_scale, weight_bits_pm1

__all__ = ["FloatNet"]


class FloatNet(nn.Module):
    """``FloatNet(packed)(x)`` = ``packed(x)`` up to float rounding, as plain float ops."""

    def __init__(self, packed: PackedModel) -> None:
        super().__init__()
        self.graph = packed.graph
        self._keys: dict[str, str] = {}
        for node in self.graph["nodes"]:
            for role, key in node.get("tensors", {}).items():
                t = packed.tensors[key]
                if node["op"] == "bconv" and role == "weight":
                    t = weight_bits_pm1(t, node["attrs"]["cin"]) * \
                        packed.tensors[node["tensors"]["scale"]].view(-1, 1, 1, 1)
                    t = t.contiguous(memory_format=torch.channels_last)
                buf = f"t{len(self._keys)}"
                self.register_buffer(buf, t.clone(), persistent=False)
                self._keys[key] = buf

    def _t(self, node: dict[str, Any], role: str) -> torch.Tensor | None:
        key = node.get("tensors", {}).get(role)
        return getattr(self, self._keys[key]) if key else None

    @staticmethod
    def _c(t: torch.Tensor) -> tuple[int, ...]:
        return (1, -1) + (1,) * (t.dim() - 2)

    def _sign(self, x: torch.Tensor, thr: torch.Tensor | None) -> torch.Tensor:
        if thr is not None:
            x = x + thr.view(self._c(x))
        return torch.sign(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        env: dict[str, torch.Tensor] = {}
        for node in self.graph["nodes"]:
            op, a = node["op"], node.get("attrs", {})
            ins = [env[v] for v in node.get("inputs", [])]
            t = lambda role, node=node: self._t(node, role)  # noqa: E731
            outs: tuple[torch.Tensor | None, ...]
            if op == "input":
                outs = (x,)
            elif op == "conv2d":
                outs = (F.conv2d(ins[0], t("weight"), t("bias"), a["stride"], a["padding"],
                                 a["dilation"], a["groups"]),)
            elif op == "affine":
                outs = (ins[0] * t("scale").view(self._c(ins[0])) +
                        t("bias").view(self._c(ins[0])),)
            elif op == "rprelu":
                u = ins[0] - t("si").view(self._c(ins[0]))
                outs = (F.prelu(u, t("slope")) + t("so").view(self._c(ins[0])),)
            elif op in ("sign", "sign_pack"):
                outs = (self._sign(ins[0], t("thr")),)
            elif op == "bconv":
                y = F.conv2d(ins[0], t("weight"), t("bias"), a["stride"], a["padding"])
                if len(ins) > 1:
                    r = ins[1]
                    if r.shape[1] != a["cout"]:
                        r = torch.cat([r] * (a["cout"] // r.shape[1]), dim=1)
                    y = y + r
                if a.get("rprelu"):
                    u = y - t("si").view(1, -1, 1, 1)
                    y = F.prelu(u, t("slope")) + t("so").view(1, -1, 1, 1)
                bits = self._sign(y, t("thr")) if a.get("bits_out") else None
                outs = (y if a.get("float_out", True) else None, bits)
            elif op == "linear":
                outs = (F.linear(ins[0], t("weight"), t("bias")),)
            elif op == "add":
                outs = (ins[0] + ins[1],)
            elif op == "mul":
                outs = (ins[0] * ins[1],)
            elif op == "act_scale":
                outs = (act_scale(ins[0], a),)
            elif op == "cat":
                outs = (torch.cat(ins, dim=a.get("dim", 1)),)
            elif op == "avgpool":
                outs = (F.avg_pool2d(ins[0], a["kernel"], a["stride"], a["padding"],
                                     a["ceil_mode"], a["count_include_pad"]),)
            elif op == "maxpool":
                outs = (F.max_pool2d(ins[0], a["kernel"], a["stride"], a["padding"],
                                     a["dilation"], a["ceil_mode"]),)
            elif op == "gap":
                outs = (ins[0].mean((2, 3), keepdim=True),)
            elif op == "flatten":
                outs = (torch.flatten(ins[0], a.get("start_dim", 1)),)
            elif op == "relu":
                outs = (F.relu(ins[0]),)
            elif op == "hardtanh":
                outs = (F.hardtanh(ins[0], a["min"], a["max"]),)
            else:  # validate_graph admits no other op
                raise ValueError(op)
            for name, val in zip(node["outputs"], outs):
                if name:
                    env[name] = val
        return env[self.graph["output"]]
