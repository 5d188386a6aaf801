"""Lower a trained PyTorch network to the packed op graph (see :mod:`s2bnn.deploy.runtime`).

Generic, not per network: the eval model is traced with ``torch.fx`` (the project's layers,
``QuantConv2d``, ``QuantLinear``, ``RSign``, ``RPReLU`` and the quantizers, kept as leaves), every
node becomes one primitive op, then a few rewrites fuse the chains a binary network is made of:

1. a ``QuantConv2d`` with binary input and weights becomes ``sign_pack`` (its RSign threshold)
   + ``bconv`` (sign bits of W packed along input channels, scale alpha per output channel);
2. BatchNorm after a convolution folds into its scale and bias (float convs: into W and b);
3. ``bconv -> add(residual)`` takes the residual into the kernel's epilogue (``cat(y, y)`` as a
   channel-modulo read of ``y``), then a following RPReLU;
4. a ``sign_pack`` reading a ``bconv``'s output moves into that bconv's epilogue, which then
   writes bits (and the float output only if something else still reads it).

XNOR-Net's activation scale ``K`` (:func:`s2bnn.models.resnet_binary.activation_scale`, the box
filter of ``mean_c |I|``) is traced as one call and lowered to ``act_scale`` on the float input
of the sign, and ``y * K`` to ``mul``: both run as float ops, with the model's own operations.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from s2bnn.errors import ModelError
from s2bnn.models.resnet_binary import activation_scale
from s2bnn.nn import Conv2d, QuantConv2d, QuantLinear, RPReLU, RSign
from s2bnn.nn.quantizers import HardTanh, Identity, Quantizer, ScaledSign, is_binary

__all__ = ["lower_model"]

_LEAVES = (Conv2d, QuantConv2d, QuantLinear, RSign, RPReLU, Quantizer)


class _Tracer(fx.Tracer):
    def __init__(self) -> None:
        # XNOR-Net's activation scale K stays one call in the graph (lowered to ``act_scale``)
        super().__init__(autowrap_functions=(activation_scale,))

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _LEAVES) or super().is_leaf_module(m, qualname)


def _pair(v: Any) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(x) for x in v]


class _Graph:
    def __init__(self) -> None:
        self.nodes: list[dict[str, Any]] = []
        self.tensors: dict[str, torch.Tensor] = {}
        self._n = 0

    def add(self, op: str, inputs: list[str], attrs: dict[str, Any] | None = None,
            tensors: dict[str, torch.Tensor | None] | None = None, label: str = "") -> str:
        name = f"n{self._n}_{op}"
        self._n += 1
        roles = {}
        for role, t in (tensors or {}).items():
            if t is None:
                continue
            key = f"{name}.{role}"
            self.tensors[key] = t.detach().to(torch.float32 if t.is_floating_point() else t.dtype)\
                .contiguous().clone()
            roles[role] = key
        self.nodes.append({"op": op, "name": name, "inputs": list(inputs), "outputs": [name],
                           "attrs": dict(attrs or {}), "tensors": roles, "label": label})
        return name

    def t(self, node: dict[str, Any], role: str) -> torch.Tensor | None:
        key = node["tensors"].get(role)
        return self.tensors[key] if key else None

    def set_t(self, node: dict[str, Any], role: str, value: torch.Tensor | None) -> None:
        key = f"{node['name']}.{role}"
        if value is None:
            node["tensors"].pop(role, None)
            self.tensors.pop(key, None)
        else:
            self.tensors[key] = value.contiguous()
            node["tensors"][role] = key


def _threshold(q: nn.Module) -> torch.Tensor | None:
    """The per-channel threshold of a sign quantizer: RSign's beta, or none."""
    return q.beta.detach() if isinstance(q, RSign) else None


def _act_sign_like(q: nn.Module) -> bool:
    return is_binary(q)


def _effective_weight(q: nn.Module, w: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return q(w).detach()


def _bn_affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    if bn.running_mean is None or bn.running_var is None:
        raise ModelError(f"BatchNorm {bn} has no running statistics; it cannot be deployed")
    scale = 1.0 / torch.sqrt(bn.running_var.double() + bn.eps)
    bias = -bn.running_mean.double() * scale
    if bn.affine:
        scale = scale * bn.weight.double()
        bias = bias * bn.weight.double() + bn.bias.double()
    return scale.float(), bias.float()


def _pack_weight_bits(w: torch.Tensor) -> torch.Tensor:
    """``(Cout, Cin, KH, KW)`` -> uint8 ``(Cout, KH, KW, ceil(Cin/8))``: bit set where w < 0."""
    cout, cin, kh, kw = w.shape
    neg = (w.permute(0, 2, 3, 1) < 0).to(torch.uint8)
    nb = (cin + 7) // 8
    neg = torch.nn.functional.pad(neg, (0, nb * 8 - cin)).reshape(cout, kh, kw, nb, 8)
    shifts = torch.arange(8, dtype=torch.uint8)
    return (neg << shifts).sum(-1, dtype=torch.uint8).contiguous()


class _Lowerer:
    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.mods = dict(model.named_modules())
        self.g = _Graph()
        self.env: dict[fx.Node, Any] = {}

    def arg(self, a: Any) -> Any:
        if isinstance(a, fx.Node):
            return self.env[a]
        if isinstance(a, (tuple, list)):
            return [self.arg(x) for x in a]
        return a

    def run(self) -> str:
        tracer = _Tracer()
        # Input-check pre-hooks (models.common.attach_input_check) cannot read a Proxy; the
        # packed runtime checks inputs itself.
        saved = {m: dict(m._forward_pre_hooks) for m in self.model.modules()}
        for m in saved:
            m._forward_pre_hooks.clear()
        try:
            graph = tracer.trace(self.model)
        except Exception as err:
            raise ModelError(f"cannot trace {type(self.model).__name__} for packing "
                             f"({str(err).splitlines()[0]})") from None
        finally:
            for m, hooks in saved.items():
                m._forward_pre_hooks.update(hooks)
        out = None
        for node in graph.nodes:
            if node.op == "placeholder":
                self.env[node] = self.g.add("input", [])
            elif node.op == "call_module":
                self.env[node] = self.module(node.target, self.mods[node.target],
                                             [self.arg(a) for a in node.args])
            elif node.op in ("call_function", "call_method"):
                self.env[node] = self.function(node)
            elif node.op == "output":
                out = self.arg(node.args[0])
            else:
                raise ModelError(f"cannot lower graph node {node.op} {node.target}")
        if not isinstance(out, str):
            raise ModelError("the model must return one tensor to be packed")
        return out

    # ----------------------------------------------------------------- modules
    def module(self, name: str, m: nn.Module, args: list[Any]) -> str:
        g = self.g
        x = args[0]
        if isinstance(m, QuantConv2d):
            return self.quant_conv(name, m, x)
        if isinstance(m, nn.Conv2d):
            return self.conv(name, m, x, m.weight.detach())
        if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            s, b = _bn_affine(m)
            return g.add("affine", [x], {"channels": m.num_features}, {"scale": s, "bias": b},
                         name)
        if isinstance(m, RPReLU):
            return g.add("rprelu", [x], {"channels": m.slope.numel()},
                         {"si": m.shift_in, "slope": m.slope, "so": m.shift_out}, name)
        if isinstance(m, RSign):
            return self.quantize(name, m, x, m.beta.numel())
        if isinstance(m, Quantizer):
            return self.quantize(name, m, x, None)
        if isinstance(m, QuantLinear):
            x = self.quantize(name + ".input_quantizer", m.input_quantizer, x, m.in_features)
            w = _effective_weight(m.weight_quantizer, m.weight)
            return g.add("linear", [x], {"in_features": m.in_features,
                                         "out_features": m.out_features},
                         {"weight": w, "bias": self._bias(m.bias, m.out_features)}, name)
        if isinstance(m, nn.Linear):
            return g.add("linear", [x], {"in_features": m.in_features,
                                         "out_features": m.out_features},
                         {"weight": m.weight, "bias": self._bias(m.bias, m.out_features)}, name)
        if isinstance(m, nn.AvgPool2d):
            return g.add("avgpool", [x], {"kernel": _pair(m.kernel_size),
                                          "stride": _pair(m.stride or m.kernel_size),
                                          "padding": _pair(m.padding), "ceil_mode": m.ceil_mode,
                                          "count_include_pad": m.count_include_pad}, label=name)
        if isinstance(m, nn.MaxPool2d):
            return g.add("maxpool", [x], {"kernel": _pair(m.kernel_size),
                                          "stride": _pair(m.stride or m.kernel_size),
                                          "padding": _pair(m.padding),
                                          "dilation": _pair(m.dilation),
                                          "ceil_mode": m.ceil_mode}, label=name)
        if isinstance(m, nn.AdaptiveAvgPool2d) and _pair(m.output_size) == [1, 1]:
            return g.add("gap", [x], label=name)
        if isinstance(m, nn.Flatten):
            return g.add("flatten", [x], {"start_dim": m.start_dim}, label=name)
        if isinstance(m, nn.ReLU):
            return g.add("relu", [x], label=name)
        if isinstance(m, nn.Hardtanh):
            return g.add("hardtanh", [x], {"min": m.min_val, "max": m.max_val}, label=name)
        if isinstance(m, nn.Identity):
            return x
        raise ModelError(f"cannot pack module {name} ({type(m).__name__}): the packed runtime "
                         "knows convolutions, BatchNorm, RSign/RPReLU, pooling and linear layers")

    @staticmethod
    def _bias(b: torch.Tensor | None, n: int) -> torch.Tensor:
        return b.detach() if b is not None else torch.zeros(n)

    def quantize(self, name: str, q: nn.Module, x: str, channels: int | None) -> str:
        """A standalone (float) quantizer: sign, hardtanh, shift or nothing."""
        thr = _threshold(q)
        inner = q.quantizer if isinstance(q, RSign) else q
        if is_binary(q):
            return self.g.add("sign", [x], {"channels": channels or 0, "has_thr": thr is not None},
                              {"thr": thr}, name)
        if thr is not None:  # real-valued RSign: a shift
            x = self.g.add("affine", [x], {"channels": thr.numel()},
                           {"scale": torch.ones_like(thr), "bias": thr}, name)
        if isinstance(inner, HardTanh):
            return self.g.add("hardtanh", [x], {"min": -1.0, "max": 1.0}, label=name)
        if isinstance(inner, Identity) or inner is None:
            return x
        raise ModelError(f"cannot pack quantizer {name} ({type(inner).__name__})")

    def _check_conv(self, name: str, m: nn.Conv2d) -> None:
        if m.padding_mode != "zeros" or isinstance(m.padding, str):
            raise ModelError(f"cannot pack {name}: only numeric zero padding is supported")

    def conv(self, name: str, m: nn.Conv2d, x: str, w: torch.Tensor) -> str:
        self._check_conv(name, m)
        return self.g.add("conv2d", [x], {
            "cin": m.in_channels, "cout": m.out_channels, "kernel": _pair(m.kernel_size),
            "stride": _pair(m.stride), "padding": _pair(m.padding),
            "dilation": _pair(m.dilation), "groups": m.groups,
        }, {"weight": w, "bias": self._bias(m.bias, m.out_channels)}, name)

    def quant_conv(self, name: str, m: QuantConv2d, x: str) -> str:
        ks, st, pd = _pair(m.kernel_size), _pair(m.stride), _pair(m.padding)
        square = ks[0] == ks[1] and st[0] == st[1] and pd[0] == pd[1]
        packable = (m.binary_input and m.binary_weight and m.groups == 1
                    and _pair(m.dilation) == [1, 1] and square and ks[0] * ks[1] <= 64)
        if not packable:
            xq = self.quantize(name + ".input_quantizer", m.input_quantizer, x, m.in_channels)
            return self.conv(name, m, xq, _effective_weight(m.weight_quantizer, m.weight))
        self._check_conv(name, m)
        w = m.weight.detach()
        if isinstance(m.weight_quantizer, ScaledSign):
            alpha = w.abs().mean(dim=(1, 2, 3))
        else:  # a plain sign of the weights
            alpha = torch.ones(m.out_channels)
        thr = _threshold(m.input_quantizer)
        bits = self.g.add("sign_pack", [x], {"channels": m.in_channels,
                                             "has_thr": thr is not None}, {"thr": thr},
                          name + ".input_quantizer")
        bias = self._bias(m.bias, m.out_channels)
        return self.g.add("bconv", [bits], {
            "cin": m.in_channels, "cout": m.out_channels, "kernel": ks, "stride": st[0],
            "padding": pd[0], "rprelu": False, "residual": False, "float_out": True,
            "bits_out": False, "has_thr": False,
        }, {"weight": _pack_weight_bits(w), "scale": alpha, "bias": bias}, name)

    # ----------------------------------------------------------------- functions
    def function(self, node: fx.Node) -> str:
        t = node.target
        args = [self.arg(a) for a in node.args]
        kwargs = {k: self.arg(v) for k, v in node.kwargs.items()}
        if t in (operator.add, torch.add, "add") and len(args) == 2 and not kwargs and \
                all(isinstance(a, str) for a in args):
            return self.g.add("add", args)
        if t in (operator.mul, torch.mul, "mul") and len(args) == 2 and not kwargs and \
                all(isinstance(a, str) for a in args):
            return self.g.add("mul", args)  # broadcasting, e.g. y * K
        if t is activation_scale:
            names = ["x", "kernel_size", "stride", "padding"]
            bound = dict(zip(names, args), **kwargs)
            k = int(bound["kernel_size"])
            return self.g.add("act_scale", [bound["x"]], {
                "kernel": k, "stride": int(bound.get("stride", 1)),
                "padding": int(bound.get("padding", 0))})
        if t in (torch.cat, torch.concat) or t == "cat":
            tensors = args[0]
            dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
            if dim != 1:
                raise ModelError(f"cannot pack torch.cat along dim {dim} (only channels)")
            return self.g.add("cat", list(tensors), {"dim": 1})
        if t in (torch.flatten, "flatten"):
            start = kwargs.get("start_dim", args[1] if len(args) > 1 else
                               (0 if t is torch.flatten else 0))
            return self.g.add("flatten", [args[0]], {"start_dim": int(start)})
        if t in (torch.relu, torch.nn.functional.relu, "relu"):
            return self.g.add("relu", [args[0]])
        if t in ("contiguous",):
            return args[0]
        raise ModelError(f"cannot pack the operation {getattr(t, '__name__', t)} in "
                         f"{type(self.model).__name__}.forward")


# --------------------------------------------------------------------------- rewrites
def _consumers(nodes: list[dict[str, Any]], output: str) -> dict[str, list[dict[str, Any]]]:
    uses: dict[str, list[dict[str, Any]]] = {}
    for n in nodes:
        for v in n["inputs"]:
            uses.setdefault(v, []).append(n)
    uses.setdefault(output, []).append({"op": "__output__", "name": "__output__"})
    return uses


def _rename(nodes: list[dict[str, Any]], old: str, new: str) -> None:
    for n in nodes:
        n["inputs"] = [new if v == old else v for v in n["inputs"]]


def _fuse(g: _Graph, output: str) -> str:
    nodes = g.nodes
    producer = {o: n for n in nodes for o in n["outputs"] if o}
    changed = True
    while changed:
        changed = False
        uses = _consumers(nodes, output)
        for n in list(nodes):
            if n["op"] not in ("conv2d", "bconv") or n["attrs"].get("bits_out"):
                continue
            a = n["attrs"]
            fout = n["outputs"][0]
            users = uses.get(fout, [])
            if len(users) != 1:
                continue
            u = users[0]
            if u["op"] == "affine" and not a.get("residual") and not a.get("rprelu"):
                s, b = g.t(u, "scale"), g.t(u, "bias")
                if n["op"] == "conv2d":
                    g.set_t(n, "weight", g.t(n, "weight") * s.view(-1, 1, 1, 1))
                else:
                    g.set_t(n, "scale", g.t(n, "scale") * s)
                g.set_t(n, "bias", g.t(n, "bias") * s + b)
            elif n["op"] == "bconv" and u["op"] == "add" and not a["residual"] \
                    and not a["rprelu"]:
                other = u["inputs"][1] if u["inputs"][0] == fout else u["inputs"][0]
                if other == fout:
                    continue
                src = producer.get(other)
                if src is not None and src["op"] == "cat" and \
                        len(set(src["inputs"])) == 1 and len(src["inputs"]) > 1:
                    other = src["inputs"][0]  # cat(y, y, ...) read as y[c % C]
                n["inputs"] = [n["inputs"][0], other]
                a["residual"] = True
            elif n["op"] == "bconv" and u["op"] == "rprelu" and not a["rprelu"]:
                for role in ("si", "slope", "so"):
                    g.set_t(n, role, g.t(u, role))
                a["rprelu"] = True
            else:
                continue
            # n takes u's place (after all of u's inputs), under u's output name.
            nodes.remove(n)
            nodes.insert(nodes.index(u), n)
            n["outputs"] = [u["outputs"][0]] + n["outputs"][1:]
            producer[n["outputs"][0]] = n
            for k in list(u["tensors"]):
                g.set_t(u, k, None)
            nodes.remove(u)
            changed = True
            break
    # sign_pack into the producing bconv's epilogue.
    uses = _consumers(nodes, output)
    for sp in [n for n in nodes if n["op"] == "sign_pack"]:
        src = producer.get(sp["inputs"][0])
        if src is None or src["op"] != "bconv" or src["attrs"]["bits_out"]:
            continue
        src["attrs"]["bits_out"] = True
        thr = g.t(sp, "thr")
        src["attrs"]["has_thr"] = thr is not None
        g.set_t(src, "thr", thr)
        others = [u for u in uses.get(src["outputs"][0], []) if u is not sp]
        src["attrs"]["float_out"] = bool(others)
        fname = src["outputs"][0]
        src["outputs"] = [fname if others else None, sp["outputs"][0]]
        g.set_t(sp, "thr", None)
        nodes.remove(sp)
    # Drop what nothing reads.
    while True:
        uses = _consumers(nodes, output)
        dead = [n for n in nodes if n["op"] != "input"
                and not any(o and uses.get(o) for o in n["outputs"])]
        if not dead:
            break
        for n in dead:
            for k in list(n["tensors"]):
                g.set_t(n, k, None)
            nodes.remove(n)
    return output


def lower_model(model: nn.Module, in_chans: int | None = None) -> tuple[dict[str, Any],
                                                                         dict[str, torch.Tensor]]:
    """``(graph, tensors)`` of the packed network computing ``model.eval()``'s forward."""
    was_training = model.training
    model.eval()
    try:
        lw = _Lowerer(model)
        with torch.no_grad():
            out = lw.run()
    finally:
        model.train(was_training)
    g = lw.g
    out = _fuse(g, out)
    if not any(n["op"] == "bconv" for n in g.nodes):
        raise ModelError(f"{type(model).__name__} has no binary convolution (binary activations "
                         "and binary weights) to pack; export it as safetensors or onnx instead")
    if in_chans is None:
        in_chans = getattr(model, "in_chans", None)
    if in_chans is None:
        first = next((n for n in g.nodes if n["op"] in ("conv2d", "bconv")), None)
        in_chans = first["attrs"]["cin"] if first else 0
    graph = {"nodes": g.nodes, "output": out, "in_chans": int(in_chans),
             "min_image_size": int(getattr(model, "min_image_size", 1)), "meta": {}}
    return graph, g.tensors
