"""The packed network: its file format, its checks, and the CPU runtime that runs it.

A packed network is an op graph (JSON) plus named tensors. Float values are ``(N, C, H, W)``
tensors in channels-last memory; bit values are ``(N, H, W, ceil(C/64))`` int64 words, bit
``c % 64`` of word ``c // 64`` set where the sign is -1 (see ``kernels.c``). Ops:

- ``input``; ``conv2d`` (float, BatchNorm folded in); ``affine`` (per-channel scale and bias);
  ``linear``; ``add``; ``mul`` (broadcasting); ``act_scale`` (XNOR-Net's K); ``cat``;
  ``avgpool``; ``maxpool``; ``gap`` (global average pool); ``flatten``; ``relu``; ``hardtanh``;
  ``rprelu``; ``sign`` (float +-1, for binary-activation real-weight layers).
- ``sign_pack``: float -> bits of ``sign(x + thr)``.
- ``bconv``: bits -> ``dot * scale + bias [+ residual] [-> RPReLU]`` as float and/or as the bits of
  ``sign(y + thr)``: the XNOR/popcount convolution with its whole float epilogue fused in one pass.

File (``.s2bnn``): a safetensors file (no pickles) whose metadata holds ``format``
(``s2bnn-packed``), ``version``, ``graph`` (JSON) and ``sha256`` (of the graph and every tensor's
name, dtype, shape and bytes). :func:`load` checks all of them and every tensor's shape and dtype
against the graph, so a truncated, tampered or newer file fails in one line.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from s2bnn.errors import CheckpointError, ModelError

__all__ = ["PackedModel", "load", "FORMAT", "VERSION", "unpack_bits", "pack_bits_torch"]

FORMAT = "s2bnn-packed"
VERSION = 1
_CL = torch.channels_last


# --------------------------------------------------------------------------- bits in torch
_SHIFTS = torch.arange(64, dtype=torch.int64)


def pack_bits_torch(v: torch.Tensor, thr: torch.Tensor | None = None) -> torch.Tensor:
    """``(N, C, H, W)`` float -> ``(N, H, W, ceil(C/64))`` int64 bits of ``sign(v + thr)``."""
    x = v.permute(0, 2, 3, 1)
    if thr is not None:
        x = x + thr
    neg = (x < 0).to(torch.int64)
    c = neg.shape[-1]
    wd = (c + 63) // 64
    neg = F.pad(neg, (0, wd * 64 - c)).reshape(*neg.shape[:-1], wd, 64)
    return (neg << _SHIFTS).sum(-1).contiguous()


def unpack_bits(bits: torch.Tensor, c: int) -> torch.Tensor:
    """``(N, H, W, WD)`` int64 bits -> ``(N, C, H, W)`` float +-1 (bit 1 -> -1)."""
    b = (bits.unsqueeze(-1) >> _SHIFTS) & 1
    b = b.reshape(*bits.shape[:-1], -1)[..., :c]
    return (1.0 - 2.0 * b.to(torch.float32)).permute(0, 3, 1, 2)


_BYTE_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int32)


def weight_bits_pm1(packed: torch.Tensor, cin: int) -> torch.Tensor:
    """Packed weight bytes ``(Cout, KH, KW, ceil(Cin/8))`` -> float +-1 ``(Cout, Cin, KH, KW)``."""
    shifts = torch.arange(8, dtype=torch.int32)
    b = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & 1
    b = b.reshape(*packed.shape[:3], -1)[..., :cin]
    return (1.0 - 2.0 * b.to(torch.float32)).permute(0, 3, 1, 2).contiguous()


def act_scale(x: torch.Tensor, a: dict[str, Any]) -> torch.Tensor:
    """XNOR-Net's activation scale K of ``x`` (N, C, H, W): the ``kernel`` box filter (zero
    padding counted) of the mean of ``|x|`` over channels, at the conv's stride: (N, 1, H', W').
    The same operations as ``s2bnn.models.resnet_binary.activation_scale``."""
    m = x.abs().mean(dim=1, keepdim=True)
    return F.avg_pool2d(m, a["kernel"], a["stride"], a["padding"], count_include_pad=True)


# --------------------------------------------------------------------------- graph checks
def _expected_tensors(node: dict[str, Any]) -> dict[str, tuple[str, tuple[int, ...] | None]]:
    """Tensor role -> (dtype, shape or None when only the rank is free) for one node."""
    op, a = node["op"], node.get("attrs", {})
    f32 = "float32"
    if op == "bconv":
        cout, cin, kh, kw = a["cout"], a["cin"], a["kernel"][0], a["kernel"][1]
        spec = {"weight": ("uint8", (cout, kh, kw, (cin + 7) // 8)),
                "scale": (f32, (cout,)), "bias": (f32, (cout,))}
        if a.get("rprelu"):
            spec.update(si=(f32, (cout,)), slope=(f32, (cout,)), so=(f32, (cout,)))
        if a.get("bits_out") and a.get("has_thr"):
            spec["thr"] = (f32, (cout,))
        return spec
    if op in ("sign_pack", "sign"):
        return {"thr": (f32, (a["channels"],))} if a.get("has_thr") else {}
    if op == "conv2d":
        cout, cin_g, kh, kw = a["cout"], a["cin"] // a["groups"], a["kernel"][0], a["kernel"][1]
        return {"weight": (f32, (cout, cin_g, kh, kw)), "bias": (f32, (cout,))}
    if op == "affine":
        return {"scale": (f32, (a["channels"],)), "bias": (f32, (a["channels"],))}
    if op == "rprelu":
        c = a["channels"]
        return {"si": (f32, (c,)), "slope": (f32, (c,)), "so": (f32, (c,))}
    if op == "linear":
        return {"weight": (f32, (a["out_features"], a["in_features"])),
                "bias": (f32, (a["out_features"],))}
    return {}


_OPS = {"input", "conv2d", "affine", "linear", "add", "mul", "cat", "avgpool", "maxpool", "gap",
        "flatten", "relu", "hardtanh", "rprelu", "sign", "sign_pack", "bconv", "act_scale"}


def _digest(graph_json: str, tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(graph_json.encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def validate_graph(graph: dict[str, Any], tensors: dict[str, torch.Tensor], source: str) -> None:
    """Every node known, every input defined before use, every tensor as the graph says."""
    def bad(msg: str) -> CheckpointError:
        return CheckpointError(f"{source} is not a valid packed network: {msg}")

    nodes = graph.get("nodes")
    if not isinstance(nodes, list) or not nodes:
        raise bad("no nodes")
    defined: set[str] = set()
    used: set[str] = set()
    for node in nodes:
        if not isinstance(node, dict) or node.get("op") not in _OPS:
            raise bad(f"unknown op {node.get('op') if isinstance(node, dict) else node!r}")
        for v in node.get("inputs", []):
            if v not in defined:
                raise bad(f"node {node.get('name')} reads {v} before it is computed")
        for role, (dtype, shape) in _expected_tensors(node).items():
            key = node.get("tensors", {}).get(role)
            t = tensors.get(key) if key else None
            if t is None:
                raise bad(f"node {node['name']} lacks its tensor '{role}'")
            if str(t.dtype).removeprefix("torch.") != dtype or (
                shape is not None and tuple(t.shape) != shape
            ):
                raise bad(f"tensor {key} is {str(t.dtype).removeprefix('torch.')} "
                          f"{tuple(t.shape)}, the graph says {dtype} {shape}")
            used.add(key)
        defined.update(v for v in node["outputs"] if v)
    if graph.get("output") not in defined:
        raise bad("its output is never computed")
    extra = set(tensors) - used
    if extra:
        raise bad(f"{len(extra)} tensor(s) no node uses, e.g. {sorted(extra)[0]}")


# --------------------------------------------------------------------------- the model
class _Chain:
    """A run of binary-convolution steps of one model executed by one C call (see
    ``PackedModel._chains``). ``ext_names``: what the run reads from outside it (name, memory
    format), in a fixed order; ``ext``: per call, (argument block, field, name, format) to set."""

    def __init__(self, steps: list[tuple[Any, ...]]) -> None:
        self.steps = list(steps)
        produced: set[str] = set()
        alias: dict[str, str] = {}
        self.reads: list[tuple[str, int, str, Any]] = []  # (node name, input slot, name, fmt)
        names: dict[str, Any] = {}
        for node, _, ins, outs, _ in self.steps:
            if node["op"] != "bconv":  # a deferred pool: passes its input through
                for _, o in outs:
                    alias[o] = alias.get(ins[0], ins[0])
                continue
            for k, v in enumerate(ins):
                v = alias.get(v, v)
                fmt = torch.contiguous_format if k == 0 else _CL
                if v not in produced:
                    names.setdefault(v, fmt)
                    self.reads.append((node["name"], k, v, fmt))
            produced.update(o for _, o in outs)
        self.ext_names = tuple(names.items())
        self.reset()

    def reset(self) -> None:
        self.arr = None
        self.key = None
        self.args: list[Any] = []
        self.ext: list[tuple[Any, str, str, Any]] = []
        self.values: dict[str, tuple[Any, ...]] = {}
        self.disabled = False

    def build(self, model: PackedModel, key: tuple[Any, ...]) -> None:
        """After a call node by node: collect the nodes' argument blocks and kept outputs."""
        import ctypes

        from s2bnn.deploy._build import BconvArgs

        self.reset()
        for node, _, _, _, _ in self.steps:
            if node["op"] != "bconv":
                continue
            fast = model._fast.get(node["name"])
            if fast is None or fast[6] or fast[2] != key[0]:
                self.disabled = True  # a pool the kernel does not take, or no fast path
                return
            self.args.append(fast[3])
            self.values[node["name"]] = (fast[4], fast[5])
        by_name = {n["name"]: model._fast[n["name"]][3] for n, *_ in self.steps
                   if n["op"] == "bconv"}
        self.ext = [(by_name[nn], "x" if k == 0 else "res", v, fmt)
                    for nn, k, v, fmt in self.reads]
        self.arr = (ctypes.POINTER(BconvArgs) * len(self.args))(
            *[ctypes.pointer(a) for a in self.args])
        self.key = key


class PackedModel:
    """A lowered binary network: ``PackedModel(x)`` maps float ``(N, C, H, W)`` images to what the
    source model's ``eval()`` forward returns (features or logits).

    ``isa``: ``auto`` (``$S2BNN_DEPLOY_ISA`` or the fastest level), ``portable``, ``popcnt``,
    ``avx2``, ``avx512`` or ``torch`` (pure torch, no compiled code). ``num_threads``: threads of
    the compiled kernels (default: torch's thread count).
    """

    def __init__(self, graph: dict[str, Any], tensors: dict[str, torch.Tensor],
                 isa: str = "auto", num_threads: int | None = None) -> None:
        self.graph = graph
        # Canonical strides (a size-1 dim may carry any stride): the float convs then pick the
        # same algorithm, and round the same way, for a packed model and its reloaded file.
        self.tensors = {k: torch.empty(v.shape, dtype=v.dtype).copy_(v)
                        for k, v in tensors.items()}
        self.meta: dict[str, Any] = graph.get("meta", {})
        self.in_chans = int(graph["in_chans"])
        self.num_threads = num_threads
        self._prepared: dict[str, dict[str, torch.Tensor]] = {}
        # Output buffers of the compiled ops, kept per node and shape from call to call: a fresh
        # multi-MB tensor per layer costs more in page faults than the layer's arithmetic.
        self._bufs: dict[tuple[str, int], torch.Tensor] = {}
        self._buf_ptrs: set[int] = set()
        self._args: dict[str, tuple[tuple[int, ...], Any]] = {}
        # Per bconv node, once its buffers and arguments exist: (input shape, residual shape,
        # threads, arguments, float view, bits) -- a repeated call only swaps the pointers.
        self._fast: dict[str, tuple[Any, ...]] = {}
        self._steps: list[tuple[Any, ...]] | None = None
        # bconv node -> the 2x2 avgpool node whose output is its residual and nothing else's:
        # the compiled epilogue averages the pool's input itself (see _plan).
        self._pool_res: dict[str, dict[str, Any]] = {}
        # bconv node -> that pool, where the pool's input is a bconv's float output that nothing
        # else reads: that bconv writes the pooled map itself (its name in _pool_src), which
        # the convolution then reads as a plain residual (_prepooled: as it was on the last call)
        self._pool_out: dict[str, dict[str, Any]] = {}
        self._pool_src: dict[str, str] = {}
        self._prepooled: dict[str, bool] = {}
        self._lock = threading.Lock()
        self.set_isa(isa)
        self._last_use = self._compute_last_use()
        self.profile: list[tuple[str, str, float]] | None = None

    # ----------------------------------------------------------------- set-up
    def set_isa(self, isa: str = "auto") -> None:
        from s2bnn.deploy import _build

        isa = _build.default_isa() if isa == "auto" else isa
        if isa not in ("torch", *_build.ISA_LEVELS):
            raise ModelError(f"unknown ISA level '{isa}'; choose auto, torch, "
                             f"{', '.join(_build.ISA_LEVELS)}")
        self._lib = None if isa == "torch" else _build.kernels()
        if self._lib is not None and isa not in _build.available_isas():
            raise ModelError(f"this CPU cannot run the '{isa}' kernels; it has "
                             f"{', '.join(_build.available_isas())}")
        self.isa = isa if self._lib is not None else "torch"
        self._isa_level = _build.ISA_LEVELS.get(self.isa, 0)
        self._align = self._lib.s2d_lp_align(self._isa_level) if self._lib is not None else 1
        self._prepared = {}
        self._args = {}
        self._fast = {}
        self._prepooled = {}
        for step in self._steps or ():
            if type(step[0]) is _Chain:
                step[0].reset()

    def _compute_last_use(self) -> dict[str, int]:
        last: dict[str, int] = {}
        for i, node in enumerate(self.graph["nodes"]):
            for v in node.get("inputs", []):
                last[v] = i
        last[self.graph["output"]] = len(self.graph["nodes"])
        return last

    def _t(self, node: dict[str, Any], role: str) -> torch.Tensor | None:
        key = node.get("tensors", {}).get(role)
        return self.tensors[key] if key else None

    def _prep_bconv(self, node: dict[str, Any]) -> dict[str, torch.Tensor]:
        got = self._prepared.get(node["name"])
        if got is not None:
            return got
        a = node["attrs"]
        w = self._t(node, "weight")  # (cout, kh, kw, ceil(cin/8)) uint8
        cout, kh, kw, nbytes = w.shape
        wd = (a["cin"] + 63) // 64
        taps = kh * kw
        # At most 32 input channels (one half-empty word per tap): two taps per word, tap t in
        # bytes 4 * (t % 2) onwards of word t // 2 -- the kernel gathers the patch likewise.
        tap2 = taps > 1 and a["cin"] <= 32
        nw = (taps + 1) // 2 if tap2 else taps * wd
        lp = (nw + self._align - 1) // self._align * self._align
        if tap2:
            wb = torch.zeros(cout, nw * 2, 4, dtype=torch.uint8)
            wb[:, :taps, :nbytes] = w.reshape(cout, taps, nbytes)
            words = wb.reshape(cout, nw * 8).view(torch.int64)
        else:
            words = F.pad(w.reshape(cout, taps, nbytes), (0, wd * 8 - nbytes)).contiguous()
            words = words.view(torch.int64).reshape(cout, taps * wd)
        words = F.pad(words, (0, lp - nw)).contiguous()
        # (taps, cout): the border correction runs over output channels, contiguous
        wpc = _BYTE_POPCOUNT[w.reshape(cout, taps, nbytes).long()].sum(-1).to(torch.int32)
        got = {"words": words, "wpc": wpc.t().contiguous(), "lp": torch.tensor(lp),
               "tap2": torch.tensor(int(tap2)),
               "pm1": weight_bits_pm1(w, a["cin"])}
        self._prepared[node["name"]] = got
        return got

    # ----------------------------------------------------------------- running
    def check_input(self, x: Any) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ModelError(f"expected images of shape (N, C, H, W), got {shape}")
        if not x.dtype.is_floating_point:
            raise ModelError(f"expected float images, got dtype {str(x.dtype).split('.')[-1]}; "
                             "convert with x.float() (and normalise as in training)")
        if x.shape[1] != self.in_chans:
            raise ModelError(f"this network takes {self.in_chans}-channel images but got "
                             f"{x.shape[1]} channels")
        if min(x.shape[2], x.shape[3]) < int(self.graph.get("min_image_size", 1)):
            raise ModelError(f"image size {x.shape[2]}x{x.shape[3]} is too small; the minimum "
                             f"is {self.graph.get('min_image_size')} px")
        return x.detach().to(torch.float32).contiguous(memory_format=_CL)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), self._lock:  # the reused buffers: one call at a time
            out = self._run(self.check_input(x))
            if out.untyped_storage().data_ptr() in self._buf_ptrs:
                out = out.clone(memory_format=torch.preserve_format)
            return out

    def _buf(self, node: dict[str, Any], slot: int, shape: tuple[int, ...],
             dtype: torch.dtype) -> torch.Tensor:
        """The reused output buffer ``slot`` of ``node`` (reallocated when the shape changes)."""
        key = (node["name"], slot)
        t = self._bufs.get(key)
        if t is None or tuple(t.shape) != shape or t.dtype != dtype:
            if t is not None:
                self._buf_ptrs.discard(t.untyped_storage().data_ptr())
            t = torch.empty(shape, dtype=dtype)
            self._bufs[key] = t
            self._buf_ptrs.add(t.untyped_storage().data_ptr())
        return t

    def _plan(self) -> list[tuple[Any, ...]]:
        """Per node, resolved once: (node, op method or None for the input, input names,
        (slot, output name) pairs, names whose last use this node is).

        A 2x2 / stride 2 average pool whose output only a binary convolution's residual reads
        (ReActNet's downsampling shortcut) is deferred: it passes its input through, and that
        convolution's epilogue adds the 2x2 average itself, in torch's order of operations (or,
        where the kernel cannot, runs the pool first, as before)."""
        if self._steps is None:
            nodes = self.graph["nodes"]
            readers: dict[str, list[tuple[dict[str, Any], int]]] = {}
            for node in nodes:
                for k, v in enumerate(node.get("inputs", [])):
                    readers.setdefault(v, []).append((node, k))
            self._pool_res = {}
            self._pool_out = {}
            self._pool_src = {}
            producer = {o: n for n in nodes for o in n["outputs"] if o}
            deferred = set()
            for node in nodes:
                a = node.get("attrs", {})
                if node["op"] != "avgpool" or node["outputs"][0] == self.graph["output"]:
                    continue
                if (list(a.get("kernel", [])) != [2, 2] or list(a.get("stride", [])) != [2, 2]
                        or list(a.get("padding", [])) != [0, 0]):
                    continue
                rd = readers.get(node["outputs"][0], [])
                if len(rd) == 1 and rd[0][0]["op"] == "bconv" and rd[0][1] == 1:
                    self._pool_res[rd[0][0]["name"]] = node
                    deferred.add(node["name"])
                    src = producer.get(node["inputs"][0])
                    if (src is not None and src["op"] == "bconv" and
                            len(readers.get(node["inputs"][0], [])) == 1 and
                            node["inputs"][0] != self.graph["output"] and
                            src["outputs"][0] == node["inputs"][0]):
                        self._pool_out[src["name"]] = node
                        self._pool_src[rd[0][0]["name"]] = src["name"]
            steps = []
            for i, node in enumerate(nodes):
                ins = tuple(node.get("inputs", []))
                fn = None if node["op"] == "input" else getattr(self, "_op_" + node["op"])
                if node["name"] in deferred:
                    fn = self._op_deferred_pool
                outs = tuple((k, v) for k, v in enumerate(node["outputs"]) if v)
                drops = tuple(v for v in dict.fromkeys(ins) if self._last_use.get(v, -1) <= i)
                steps.append((node, fn, ins, outs, drops))
            self._steps = self._chains(steps)
        return self._steps

    def _chains(self, steps: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        """Runs of consecutive binary convolutions (and the deferred pools between them, which
        only pass their input on) become one step: after a first call node by node, one C call
        runs the whole run (``s2d_bconv_chain``), with only the pointers of what it reads from
        outside it swapped per call."""
        out: list[tuple[Any, ...]] = []
        run: list[tuple[Any, ...]] = []

        def flush() -> None:
            if sum(1 for st in run if st[1] == self._op_bconv) >= 2:
                out.append((_Chain(run), None, (), (), ()))
            else:
                out.extend(run)
            run.clear()

        for st in steps:
            if st[1] in (self._op_bconv, self._op_deferred_pool):
                run.append(st)
            else:
                flush()
                out.append(st)
        flush()
        return out

    def _exec(self, step: tuple[Any, ...], env: dict[str, torch.Tensor], x: torch.Tensor,
              prof: list[tuple[str, str, float]] | None) -> None:
        node, fn, in_names, out_names, drops = step
        t0 = time.perf_counter() if prof is not None else 0.0
        outs = x if fn is None else fn(node, [env[v] for v in in_names])
        if type(outs) is not tuple:
            outs = (outs,)
        for k, name in out_names:
            env[name] = outs[k]
        for v in drops:
            env.pop(v, None)
        if prof is not None:
            prof.append((node["name"], node["op"], time.perf_counter() - t0))

    def _run_chain(self, chain: _Chain, env: dict[str, torch.Tensor],
                   prof: list[tuple[str, str, float]] | None) -> None:
        if self._lib is None or prof is not None or chain.disabled:
            for st in chain.steps:
                self._exec(st, env, None, prof)
            return
        key = (self._nthreads(), self._isa_level,
               tuple((tuple(env[v].shape), env[v].is_contiguous(memory_format=fmt))
                     for v, fmt in chain.ext_names))
        if chain.arr is None or chain.key != key:
            for st in chain.steps:
                self._exec(st, env, None, None)
            chain.build(self, key)
            return
        keep = []
        for (args, field, name, fmt) in chain.ext:
            t = env[name]
            if not t.is_contiguous(memory_format=fmt):
                t = t.contiguous(memory_format=fmt)
            keep.append(t)
            setattr(args, field, t.data_ptr())
        rc = self._lib.s2d_bconv_chain(chain.arr, len(chain.args))
        if rc != 0:
            raise MemoryError(f"binary convolution kernel failed ({rc})")
        for node, _, ins, outs, drops in chain.steps:
            vals = chain.values.get(node["name"])
            if vals is None:  # a deferred pool: its input passes through
                vals = (env[ins[0]],)
            for k, name in outs:
                env[name] = vals[k]
            for v in drops:
                env.pop(v, None)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        env: dict[str, torch.Tensor] = {}
        prof = self.profile
        for step in self._plan():
            if type(step[0]) is _Chain:
                self._run_chain(step[0], env, prof)
            else:
                self._exec(step, env, x, prof)
        return env[self.graph["output"]]

    def _nthreads(self) -> int:
        return int(self.num_threads or torch.get_num_threads())

    # ----------------------------------------------------------------- ops
    def _op_conv2d(self, node, ins):
        a = node["attrs"]
        y = F.conv2d(ins[0], self._t(node, "weight"), self._t(node, "bias"), a["stride"],
                     a["padding"], a["dilation"], a["groups"])
        return y.contiguous(memory_format=_CL)

    def _op_affine(self, node, ins):
        x = ins[0]
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * self._t(node, "scale").view(shape) + self._t(node, "bias").view(shape)

    def _op_rprelu(self, node, ins):
        x = ins[0]
        shape = (1, -1) + (1,) * (x.dim() - 2)
        u = x - self._t(node, "si").view(shape)
        return torch.where(u > 0, u, u * self._t(node, "slope").view(shape)) + \
            self._t(node, "so").view(shape)

    def _op_sign(self, node, ins):
        x = ins[0]
        thr = self._t(node, "thr")
        if thr is not None:
            x = x + thr.view((1, -1) + (1,) * (x.dim() - 2))
        return torch.where(x < 0, -1.0, 1.0).to(torch.float32)

    def _op_linear(self, node, ins):
        return F.linear(ins[0], self._t(node, "weight"), self._t(node, "bias"))

    def _op_add(self, node, ins):
        return ins[0] + ins[1]

    def _op_mul(self, node, ins):
        return ins[0] * ins[1]

    def _op_act_scale(self, node, ins):
        return act_scale(ins[0], node["attrs"])

    def _op_cat(self, node, ins):
        return torch.cat(ins, dim=node["attrs"].get("dim", 1))

    def _op_avgpool(self, node, ins):
        a = node["attrs"]
        return F.avg_pool2d(ins[0], a["kernel"], a["stride"], a["padding"], a["ceil_mode"],
                            a["count_include_pad"]).contiguous(memory_format=_CL)

    def _op_deferred_pool(self, node, ins):
        return ins[0]

    def _op_maxpool(self, node, ins):
        a = node["attrs"]
        return F.max_pool2d(ins[0], a["kernel"], a["stride"], a["padding"], a["dilation"],
                            a["ceil_mode"]).contiguous(memory_format=_CL)

    def _op_gap(self, node, ins):
        return ins[0].mean((2, 3), keepdim=True)

    def _op_flatten(self, node, ins):
        return torch.flatten(ins[0], node["attrs"].get("start_dim", 1))

    def _op_relu(self, node, ins):
        return F.relu(ins[0])

    def _op_hardtanh(self, node, ins):
        return F.hardtanh(ins[0], node["attrs"]["min"], node["attrs"]["max"])

    def _op_sign_pack(self, node, ins):
        x = ins[0]
        thr = self._t(node, "thr")
        c = x.shape[1]
        if self._lib is None:
            return pack_bits_torch(x, thr)
        x = x.contiguous(memory_format=_CL)
        n, _, h, w = x.shape
        out = self._buf(node, 0, (n, h, w, (c + 63) // 64), torch.int64)
        self._lib.s2d_sign_pack(x.data_ptr(), n * h * w, c,
                                thr.data_ptr() if thr is not None else None, out.data_ptr(),
                                self._isa_level, self._nthreads())
        return out

    def _op_bconv(self, node, ins):
        bits = ins[0]
        res = ins[1] if len(ins) > 1 else None
        pool = self._pool_res.get(node["name"]) if res is not None else None
        if pool is not None and self._prepooled.get(self._pool_src.get(node["name"], "")):
            pool = None  # its producer wrote the pooled map
        fast = self._fast.get(node["name"])
        if fast is not None and bits.shape == fast[0] and bits.is_contiguous() and (
                fast[2] == self._nthreads()) and (
                res.shape == fast[1] if res is not None else fast[1] is None):
            # The same shapes as last time: the same buffers and arguments, new input pointers.
            if res is not None:
                if fast[6]:  # a deferred pool the kernel does not take: run it here
                    res = self._op_avgpool(pool, [res])
                res = res.contiguous(memory_format=_CL)
            args = fast[3]
            args.x = bits.data_ptr()
            args.res = res.data_ptr() if res is not None else None
            rc = self._lib.s2d_bconv(args)
            if rc != 0:
                raise MemoryError(f"binary convolution kernel failed ({rc})")
            return fast[4], fast[5]
        res_shape = res.shape if res is not None else None
        a = node["attrs"]
        n, h, w, wd = bits.shape
        kh, kw = a["kernel"]
        s, p = a["stride"], a["padding"]
        oh, ow = (h + 2 * p - kh) // s + 1, (w + 2 * p - kw) // s + 1
        cout = a["cout"]
        res_pool = 0
        if pool is not None:
            # the deferred 2x2 pool: in the kernel where the shapes are exactly 2x, else here
            if self._lib is not None and tuple(res.shape[2:]) == (2 * oh, 2 * ow):
                res_pool = 1
            else:
                res = self._op_avgpool(pool, [res])
        if res is not None and (res.shape[0] != n or tuple(res.shape[2:]) != (
                (2 * oh, 2 * ow) if res_pool else (oh, ow))):
            raise ModelError(f"node {node['name']}: residual of shape {tuple(res.shape)} does "
                             f"not fit the convolution's output {(n, cout, oh, ow)}")
        prep = self._prep_bconv(node)
        scale, bias = self._t(node, "scale"), self._t(node, "bias")
        si, slope, so = self._t(node, "si"), self._t(node, "slope"), self._t(node, "so")
        thr = self._t(node, "thr")
        want_float, want_bits = a.get("float_out", True), a.get("bits_out", False)
        # Only a deferred 2x2 pool reads the float output: write the pooled map instead.
        out_pool = int(self._lib is not None and want_float and node["name"] in self._pool_out
                       and oh % 2 == 0 and ow % 2 == 0)
        if node["name"] in self._pool_out:
            self._prepooled[node["name"]] = bool(out_pool)
        if self._lib is None:
            dot = F.conv2d(unpack_bits(bits, a["cin"]), prep["pm1"], None, s, p)
            y = dot * scale.view(1, -1, 1, 1)
            y = y + bias.view(1, -1, 1, 1)
            if res is not None:
                rc = res.shape[1]
                if rc != cout:
                    res = res.repeat(1, cout // rc, 1, 1)
                y = y + res
            if slope is not None:
                u = y - si.view(1, -1, 1, 1)
                y = torch.where(u > 0, u, u * slope.view(1, -1, 1, 1)) + so.view(1, -1, 1, 1)
            y = y.contiguous(memory_format=_CL)
            return (y if want_float else None, pack_bits_torch(y, thr) if want_bits else None)
        out = self._buf(node, 0, (n, oh // 2, ow // 2, cout) if out_pool else (n, oh, ow, cout),
                        torch.float32) if want_float else None
        obits = self._buf(node, 1, (n, oh, ow, (cout + 63) // 64), torch.int64) \
            if want_bits else None
        if res is not None:
            res = res.contiguous(memory_format=_CL)
        # The argument block is built once per node and input shape; per call only the
        # activation pointers change.
        key = (n, h, w, wd, int(res.shape[1]) if res is not None else 0, self._nthreads(),
               res_pool, out_pool)
        cached = self._args.get(node["name"])
        if cached is None or cached[0] != key:
            from s2bnn.deploy._build import BconvArgs

            ptr = (lambda t: t.data_ptr() if t is not None else None)  # noqa: E731
            args = BconvArgs(
                w=prep["words"].data_ptr(), wpc=prep["wpc"].data_ptr(),
                n=n, h=h, w_=w, wd=wd, cin=a["cin"], cout=cout, kh=kh, kw=kw, stride=s, pad=p,
                oh=oh, ow=ow, lp=int(prep["lp"]), scale=scale.data_ptr(), bias=bias.data_ptr(),
                res_c=key[4], si=ptr(si), slope=ptr(slope), so=ptr(so), thr=ptr(thr),
                dot_out=None, isa=self._isa_level, nthreads=key[5], tap2=int(prep["tap2"]),
                res_pool=res_pool, out_pool=out_pool,
            )
            self._args[node["name"]] = (key, args)
        else:
            args = cached[1]
        args.x = bits.data_ptr()
        args.res = res.data_ptr() if res is not None else None
        args.out = out.data_ptr() if out is not None else None
        args.out_bits = obits.data_ptr() if obits is not None else None
        rc = self._lib.s2d_bconv(args)
        if rc != 0:
            raise MemoryError(f"binary convolution kernel failed ({rc})")
        view = out.permute(0, 3, 1, 2) if out is not None else None
        self._fast[node["name"]] = (bits.shape, res_shape, key[5], args, view, obits,
                                    pool is not None and not res_pool)
        return view, obits

    # ----------------------------------------------------------------- info and files
    def binary_convs(self) -> Iterable[dict[str, Any]]:
        return (n for n in self.graph["nodes"] if n["op"] == "bconv")

    def save(self, path: str | Path) -> Path:
        """Write the packed file atomically (temp file, fsync, rename)."""
        from safetensors.torch import save as st_save

        from s2bnn.checkpoint import atomic_write_bytes

        graph_json = json.dumps(self.graph, sort_keys=True)
        tensors = {k: v.contiguous() for k, v in self.tensors.items()}
        meta = {"format": FORMAT, "version": str(VERSION), "graph": graph_json,
                "sha256": _digest(graph_json, tensors)}
        path = Path(path)
        atomic_write_bytes(path, st_save(tensors, metadata=meta))
        return path


def _read_header(data: bytes, source: str) -> dict[str, Any]:
    if len(data) < 8:
        raise CheckpointError(f"{source} is truncated or not a packed network (too short)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise CheckpointError(f"{source} is truncated or not a packed network (its header says "
                              f"{n} bytes, the file has {len(data) - 8})")
    try:
        header = json.loads(data[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{source} is not a packed network (unreadable header)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{source} is not a packed network (unreadable header)")
    return header


def load(path: str | Path, isa: str = "auto", num_threads: int | None = None) -> PackedModel:
    """Read and check a packed file (see the module docstring) and return the runnable model."""
    from safetensors.torch import load as st_load

    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise CheckpointError(f"packed network {source} does not exist")
    data = path.read_bytes()
    header = _read_header(data, source)
    meta = header.get("__metadata__") or {}
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{source} is not an s2bnn packed network (format "
                              f"{meta.get('format')!r}); write one with "
                              "`s2bnn export RUN_DIR --format packed`")
    try:
        version = int(meta.get("version", ""))
    except ValueError:
        raise CheckpointError(f"{source} has no valid format version") from None
    if version > VERSION:
        raise CheckpointError(f"{source} was written by a newer s2bnn (packed format version "
                              f"{version}, this one reads up to {VERSION}); upgrade s2bnn")
    # Each tensor's extent must lie inside the file: safetensors checks it too, but a precise
    # message says "truncated".
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
              default=0)
    need = 8 + struct.unpack("<Q", data[:8])[0] + end
    if len(data) < need:
        raise CheckpointError(f"{source} is truncated ({len(data)} bytes; its header needs "
                              f"{need})")
    try:
        tensors = st_load(data)
    except Exception as err:  # safetensors raises its own error type for malformed files
        raise CheckpointError(f"{source} is corrupt ({str(err).splitlines()[0]})") from None
    graph_json = meta.get("graph", "")
    if _digest(graph_json, tensors) != meta.get("sha256"):
        raise CheckpointError(f"{source} fails its checksum: the file was modified or damaged; "
                              "export it again")
    try:
        graph = json.loads(graph_json)
    except json.JSONDecodeError:
        raise CheckpointError(f"{source} has an unreadable graph") from None
    validate_graph(graph, tensors, source)
    return PackedModel(graph, tensors, isa=isa, num_threads=num_threads)


def file_size(path: str | Path) -> int:
    return os.path.getsize(path)
