"""The training fast paths against PyTorch's ops, on the demo's student: the compiled RSign /
RPReLU kernels, the GEMM weight gradient of small-map bf16 convolutions, fused Adam.

    python benchmarks/bench_kernels.py [--quick] [--rounds 9] [--threads 2] [--batch 128]
                                       [--size 28] [--model reactnet_compact]
                                       [--teacher resnet_small]

Four tables, each a baseline and the change measured in the same run, interleaved (one call of
each variant per round) so that a machine whose speed drifts affects both alike; a speed-up is
the median of the per-round ratios.

1. Layers: every RSign (with ReActSign) and RPReLU of the model, forward and backward at the
   input shapes and dtypes they meet in a training step (shapes recorded by hooks on one
   forward pass), as PyTorch's ops (:mod:`s2bnn.nn._kernels` switched off) and as the kernels.
2. Convolutions (bf16 only): every binary convolution of the model, forward and backward at
   the shapes it meets (its RSign on the kernel both ways), oneDNN's weight gradient against
   :mod:`s2bnn.nn._conv`'s GEMM where it takes the layer (``gemm``; the others run oneDNN's
   both ways, a check on the noise).
   Then the weight gradient alone, both ways for every convolution: where the GEMM's map
   threshold (``_conv.MAX_GEMM_MAP``) should lie on this machine.
3. Optimiser: Adam's step over the student's and head's parameters, torch's default
   implementation against ``fused=True`` (what :func:`s2bnn.engine.optim.build_optimizer`
   picks).
4. Steps: the S2-BNN student's training step (backbone, MLP head, soft cross-entropy against
   fixed unit-vector targets, the engine's Adam), under bf16 autocast where the CPU has bf16 and
   in float32, fast paths off and on; the same step of the demo's teacher network
   (``--teacher``), whose small late maps take the GEMM weight gradient too.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from s2bnn.engine.optim import build_optimizer
from s2bnn.losses import soft_cross_entropy
from s2bnn.methods.base import mlp_head
from s2bnn.models import build_model
from s2bnn.nn import QuantConv2d, RPReLU, RSign, _conv, _kernels
from s2bnn.runtime import tune_malloc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_all import interleaved  # noqa: E402

Call = Callable[[], None]


def _autocast(bf16: bool) -> contextlib.AbstractContextManager:
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def layer_inputs(model: torch.nn.Module, x: torch.Tensor, bf16: bool,
                 kinds: tuple[type, ...] = (RSign, RPReLU)
                 ) -> list[tuple[torch.nn.Module, torch.Tensor]]:
    """(layer, a copy of its input) for every layer of ``kinds``, from one forward pass."""
    seen: list[tuple[torch.nn.Module, torch.Tensor]] = []

    def hook(mod: torch.nn.Module, inp: tuple[torch.Tensor, ...]) -> None:
        seen.append((mod, inp[0].detach().clone()))

    handles = [m.register_forward_pre_hook(hook) for m in model.modules()
               if isinstance(m, kinds)]
    with torch.no_grad(), _autocast(bf16):
        model(x)
    for h in handles:
        h.remove()
    return seen


def layer_pass(items: list[tuple[torch.nn.Module, torch.Tensor]], bf16: bool, on: bool) -> Call:
    """Forward and backward of every recorded layer on its recorded input."""
    inputs = [(m, t.requires_grad_()) for m, t in items]
    with torch.no_grad(), _autocast(bf16):  # output-shaped (a convolution changes the shape)
        grads = [torch.randn_like(m(t), dtype=torch.float32) for m, t in inputs]

    def run() -> None:
        with _kernels.switched(on):
            for (mod, t), g in zip(inputs, grads):
                with _autocast(bf16):
                    y = mod(t)
                y.backward(g.to(y.dtype))
                t.grad = None
                mod.zero_grad(set_to_none=True)

    return run


def student_step(name: str, batch: int, size: int, bf16: bool, on: bool) -> Call:
    """One S2-BNN student training step of network ``name`` (fixed input and targets), the
    fast paths on or off."""
    torch.manual_seed(0)
    net = build_model(name, num_classes=0, in_chans=1)
    head = mlp_head(net.feature_dim, None, 128)
    opt = build_optimizer(torch.nn.ModuleList([net, head]), "adam", 3e-3)
    x = torch.randn(batch, 1, size, size).contiguous(memory_format=torch.channels_last)
    target = F.normalize(torch.randn(batch, 128), dim=1)

    def step() -> None:
        with _kernels.switched(on), _autocast(bf16):
            loss = soft_cross_entropy(F.normalize(head(net(x)).float(), dim=1), target, 0.2)
        opt.zero_grad(set_to_none=True)
        with _kernels.switched(on):
            loss.backward()
        opt.step()

    return step


@contextlib.contextmanager
def gemm_grad(on: bool) -> Iterator[None]:
    """The GEMM weight gradient on or off, the RSign / RPReLU kernels on either way."""
    before = _conv.MAX_GEMM_MAP
    _conv.MAX_GEMM_MAP = before if on else 0
    try:
        with _kernels.switched(True):
            yield
    finally:
        _conv.MAX_GEMM_MAP = before


def with_gemm(call: Call, on: bool) -> Call:
    """``call`` with the GEMM weight gradient on or off, the other fast paths on."""

    def run() -> None:
        with gemm_grad(on):
            call()

    return run


def weight_grad_calls(conv: QuantConv2d, x: torch.Tensor) -> tuple[Call, Call]:
    """oneDNN's bf16 weight gradient of ``conv`` at input ``x``'s shape, and the GEMM's."""
    xb = torch.randn_like(x).sign().to(torch.bfloat16)  # a binary input, as the conv gets it
    w = conv.weight.detach().to(torch.bfloat16)
    s, p = tuple(conv.stride), tuple(conv.padding)
    g = torch.randn_like(F.conv2d(xb, w, None, s, p))

    def onednn() -> None:
        torch.ops.aten.convolution_backward(g, xb, w, None, list(s), list(p), [1, 1], False,
                                            [0, 0], 1, [False, True, False])

    def gemm() -> None:
        _conv.weight_grad(g, xb, tuple(conv.kernel_size), s, p)

    return onednn, gemm


def conv_case(conv: QuantConv2d, x: torch.Tensor) -> str:
    """``k3 192->192 s2 4x4 -> 2x2 (gemm)``: a convolution, its maps and its path when on."""
    with torch.autocast("cpu", dtype=torch.bfloat16), _kernels.switched(True):
        path = "gemm" if _conv.takes_gemm_grad(conv, x, conv.weight) else "oneDNN"
        out = conv(x).shape[-2:]
    k, s = conv.kernel_size[0], conv.stride[0]
    return (f"k{k} {conv.in_channels}->{conv.out_channels} s{s} {x.shape[-2]}x{x.shape[-1]} "
            f"-> {out[0]}x{out[1]} ({path})")


def adam_step(model: torch.nn.Module, fused: bool) -> Call:
    """Adam's step over ``model``'s parameters with fixed gradients."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torch.optim.Adam(params, 3e-3, fused=fused or None)
    return opt.step


def report(title: str, times: dict[str, list[float]], pairs: list[tuple[str, str, str]],
           unit_count: int | None = None, names: tuple[str, str] = ("torch", "kernels")
           ) -> None:
    print(f"\n{title}")
    a, b = names
    head = f"{'case':<50} {a + ' ms':>9} {b + ' ms':>11} {'speed-up':>9}"
    print(head + (f" {'img/s ' + a:>12} {'img/s ' + b:>14}" if unit_count else ""))
    for label, base, new in pairs:
        b, n = statistics.median(times[base]), statistics.median(times[new])
        ratio = statistics.median(x / y for x, y in zip(times[base], times[new]))
        line = f"{label:<50} {b * 1e3:>9.2f} {n * 1e3:>11.2f} {ratio:>8.2f}x"
        if unit_count:
            line += f" {unit_count / b:>12.0f} {unit_count / n:>14.0f}"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two timed rounds (a smoke run)")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--model", default="reactnet_compact")
    parser.add_argument("--teacher", default="resnet_small",
                        help="a real network timed in the same step (the demo's teacher)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tuned = tune_malloc()
    rounds = 2 if args.quick else args.rounds
    if _kernels.library() is None:
        print("the training kernels are not built here (no C compiler?): nothing to compare")
        return
    bf16_ok = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    precisions = [("bf16 autocast", True)] if bf16_ok else []
    precisions.append(("fp32", False))
    print(f"{args.model}, {args.size} px, batch {args.batch}, threads={args.threads}, "
          f"malloc_tuned={tuned}, bf16 on this CPU: {bf16_ok}, rounds={rounds}")

    torch.manual_seed(0)
    model = build_model(args.model, num_classes=0, in_chans=1)
    x = torch.randn(args.batch, 1, args.size, args.size).contiguous(
        memory_format=torch.channels_last)
    calls: dict[str, Call] = {}
    pairs = []
    for label, bf16 in precisions:
        items = layer_inputs(model, x, bf16)
        for kind in (RSign, RPReLU):
            mine = [(m, t) for m, t in items if isinstance(m, kind)]
            n_el = sum(t.numel() for _, t in mine)
            dtypes = sorted({str(t.dtype).removeprefix("torch.") for _, t in mine})
            case = f"{kind.__name__} x{len(mine)} ({'/'.join(dtypes)}, {n_el / 1e6:.1f} M el.)"
            calls[f"{label} {kind.__name__} torch"] = layer_pass(mine, bf16, on=False)
            calls[f"{label} {kind.__name__} kernels"] = layer_pass(mine, bf16, on=True)
            pairs.append((f"{label}: {case}", f"{label} {kind.__name__} torch",
                          f"{label} {kind.__name__} kernels"))
    times = interleaved(calls, rounds, warmup=2)
    report("Layers, forward + backward of all of them (one call = every layer once)", times,
           pairs)

    if bf16_ok:
        calls, pairs = {}, []
        for i, (conv, t) in enumerate(layer_inputs(model, x, True, (QuantConv2d,))):
            case = conv_case(conv, t)
            calls[f"{i} off"] = with_gemm(layer_pass([(conv, t)], True, on=True), False)
            calls[f"{i} on"] = with_gemm(layer_pass([(conv, t)], True, on=True), True)
            pairs.append((case, f"{i} off", f"{i} on"))
        times = interleaved(calls, rounds, warmup=2)
        report("Binary convolutions under bf16 autocast, forward + backward, oneDNN's weight "
               "gradient against the GEMM", times, pairs, names=("oneDNN", "GEMM"))

        calls, pairs = {}, []
        for i, (conv, t) in enumerate(layer_inputs(model, x, True, (QuantConv2d,))):
            calls[f"{i} oneDNN"], calls[f"{i} GEMM"] = weight_grad_calls(conv, t)
            pairs.append((conv_case(conv, t).rsplit(" (", 1)[0], f"{i} oneDNN", f"{i} GEMM"))
        times = interleaved(calls, rounds, warmup=2)
        report(f"The weight gradient alone, bf16, both ways for every convolution (the GEMM "
               f"takes output maps of at most {_conv.MAX_GEMM_MAP} pixels)", times, pairs,
               names=("oneDNN", "GEMM"))

    torch.manual_seed(0)
    heads = torch.nn.ModuleList([build_model(args.model, num_classes=0, in_chans=1),
                                 mlp_head(model.feature_dim, None, 128)])
    n_par = sum(1 for _ in heads.parameters())
    times = interleaved({"default": adam_step(heads, False), "fused": adam_step(heads, True)},
                        rounds, warmup=2)
    report("Adam's step (torch's default implementation against fused=True)", times,
           [(f"{n_par} tensors, {sum(p.numel() for p in heads.parameters()) / 1e6:.2f} M "
             "values", "default", "fused")], names=("default", "fused"))

    calls, pairs = {}, []
    for label, bf16 in precisions:
        for role, net in (("student", args.model), ("teacher", args.teacher)):
            calls[f"{role} {label} torch"] = student_step(net, args.batch, args.size, bf16, False)
            calls[f"{role} {label} fast"] = student_step(net, args.batch, args.size, bf16, True)
            pairs.append((f"{role} ({net}) step, {label}", f"{role} {label} torch",
                          f"{role} {label} fast"))
            if bf16:  # what the GEMM weight gradient adds to the other fast paths
                calls[f"{role} {label} no gemm"] = with_gemm(
                    student_step(net, args.batch, args.size, bf16, True), False)
                pairs.append(("  the same, GEMM weight gradient off -> on",
                              f"{role} {label} no gemm", f"{role} {label} fast"))
    times = interleaved(calls, rounds, warmup=2)
    report("Training step of the S2-BNN student, and of the teacher network in the same step "
           "(no teacher forward, no data loading; fused Adam both ways)", times, pairs,
           unit_count=args.batch, names=("torch", "fast"))


if __name__ == "__main__":
    main()
