"""The GEMM weight gradient of small-map bf16 CPU convolutions (s2bnn/nn/_conv.py) against
PyTorch's convolution backward, where QuantConv2d takes it, and where it must not."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from s2bnn.nn import QuantConv2d, _conv, _kernels


def _reference(x: torch.Tensor, w: torch.Tensor, stride: int, padding: int, grad: torch.Tensor
               ) -> torch.Tensor:
    x64, w64 = x.double(), w.double().requires_grad_()
    F.conv2d(x64, w64, None, stride, padding).backward(grad.double())
    return w64.grad


# (N, Ci, H, W, Co, k, stride, padding): 1x1 with and without stride, 3x3 'same' and strided on
# odd and rectangular maps, a 3x3 without padding, a 5x5, a 1x1 map.
GEOMETRIES = [(3, 5, 4, 4, 7, 1, 1, 0), (2, 6, 5, 5, 4, 1, 2, 0), (2, 4, 4, 4, 3, 3, 1, 1),
              (3, 3, 7, 5, 6, 3, 2, 1), (2, 5, 6, 6, 2, 3, 1, 0), (1, 3, 6, 7, 4, 5, 2, 2),
              (4, 8, 1, 1, 5, 3, 1, 1)]


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
def test_weight_grad_is_the_convolution_s_weight_gradient(geometry, layout) -> None:
    n, ci, h, w_, co, k, s, p = geometry
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, ci, h, w_, generator=g)
    w = torch.randn(co, ci, k, k, generator=g)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    out = F.conv2d(x, w, None, s, p)
    grad = torch.randn(out.shape, generator=g)
    got = _conv.weight_grad(grad, x, (k, k), (s, s), (p, p))
    assert got.shape == w.shape
    torch.testing.assert_close(got.double(), _reference(x, w, s, p, grad), rtol=1e-5, atol=1e-5)


def _conv_layer(ci: int, co: int, k: int, stride: int) -> QuantConv2d:
    torch.manual_seed(0)
    return QuantConv2d(ci, co, k, stride, k // 2, input_quantizer="react_sign",
                       weight_quantizer="scaled_sign").to(memory_format=torch.channels_last)


def _grads(conv: QuantConv2d, x: torch.Tensor, on: bool) -> tuple[torch.Tensor, ...]:
    x = x.clone().requires_grad_()
    conv.zero_grad(set_to_none=True)
    with _kernels.switched(on), torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
    y.float().square().sum().backward()
    return y.detach().float(), x.grad, conv.weight.grad


@pytest.mark.parametrize("k,stride,size", [(3, 1, 4), (3, 2, 4), (1, 1, 2), (3, 2, 8)])
def test_quant_conv_takes_the_gemm_on_small_maps_and_agrees_with_onednn(
        monkeypatch, k, stride, size) -> None:
    calls = []
    real = _conv.weight_grad
    monkeypatch.setattr(_conv, "weight_grad", lambda *a: calls.append(1) or real(*a))
    conv = _conv_layer(32, 48, k, stride)
    x = torch.randn(16, 32, size, size).contiguous(memory_format=torch.channels_last)
    y_on, gx_on, gw_on = _grads(conv, x, True)
    assert calls == [1]  # every output map here has at most 16 pixels
    y_off, gx_off, gw_off = _grads(conv, x, False)
    assert calls == [1]  # switched off: oneDNN's gradient
    assert torch.equal(y_on, y_off) and torch.equal(gx_on, gx_off)
    assert gw_on.dtype == conv.weight.dtype == torch.float32
    # both round a float32 sum to bf16 once: equal up to a bf16 ulp of the largest entry
    torch.testing.assert_close(gw_on, gw_off, rtol=0, atol=2 ** -7 * gw_off.abs().max().item())


def test_large_maps_float32_frozen_grouped_or_biased_convolutions_keep_onednn() -> None:
    x = torch.randn(4, 16, 14, 14).contiguous(memory_format=torch.channels_last)
    small = torch.randn(4, 16, 4, 4).contiguous(memory_format=torch.channels_last)
    conv = _conv_layer(16, 16, 3, 1)
    with _kernels.switched(True), torch.autocast("cpu", dtype=torch.bfloat16):
        assert _conv.takes_gemm_grad(conv, small, conv.weight)
        assert not _conv.takes_gemm_grad(conv, x, conv.weight)  # 14x14 output map
        assert not _conv.takes_gemm_grad(conv, small, conv.weight.detach())  # frozen
        with torch.no_grad():
            assert not _conv.takes_gemm_grad(conv, small, conv.weight)
        grouped = QuantConv2d(16, 16, 3, 1, 1, groups=2)
        biased = QuantConv2d(16, 16, 3, 1, 1, bias=True)
        dilated = QuantConv2d(16, 16, 3, 1, 2, dilation=2)
        for other in (grouped, biased, dilated):
            assert not _conv.takes_gemm_grad(other, small, other.weight)
    with _kernels.switched(True):
        assert not _conv.takes_gemm_grad(conv, small, conv.weight)  # float32, no autocast
        assert _conv.takes_gemm_grad(conv, small.bfloat16(), conv.weight.bfloat16())
        # a bf16 input into a float32 weight without autocast is torch's error to raise
        assert not _conv.takes_gemm_grad(conv, small.bfloat16(), conv.weight)
    with _kernels.switched(False), torch.autocast("cpu", dtype=torch.bfloat16):
        assert not _conv.takes_gemm_grad(conv, small, conv.weight)


def test_patches_over_the_memory_cap_keep_onednn(monkeypatch) -> None:
    conv = _conv_layer(16, 16, 3, 1)
    x = torch.randn(4, 16, 4, 4).contiguous(memory_format=torch.channels_last)
    with _kernels.switched(True), torch.autocast("cpu", dtype=torch.bfloat16):
        assert _conv.takes_gemm_grad(conv, x, conv.weight)
        monkeypatch.setattr(_conv, "MAX_PATCH_ELEMENTS", 4 * 16 * 9 * 16 - 1)
        assert not _conv.takes_gemm_grad(conv, x, conv.weight)


def test_the_small_resnet_trains_its_late_stages_through_the_gemm(monkeypatch) -> None:
    from s2bnn.models import build_model

    shapes = []
    real = _conv.weight_grad
    monkeypatch.setattr(_conv, "weight_grad",
                        lambda grad, x, *a: shapes.append(tuple(grad.shape[2:])) or
                        real(grad, x, *a))
    torch.manual_seed(0)
    net = build_model("resnet_small", in_chans=1, width_mult=0.25)
    x = torch.randn(8, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    grads = []
    for on in (True, False):
        net.zero_grad(set_to_none=True)
        with _kernels.switched(on), torch.autocast("cpu", dtype=torch.bfloat16):
            y = net(x)
        y.float().square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in net.named_parameters()})
    # 28 px: 14x14 after the stem, then 7x7, 4x4 and 2x2: the last two stages' six
    # convolutions (two 3x3 and a strided 1x1 shortcut each) have output maps of <= 16 pixels
    assert sorted(shapes) == sorted([(4, 4)] * 3 + [(2, 2)] * 3)
    for name, g in grads[0].items():
        ref = grads[1][name]
        torch.testing.assert_close(g, ref, rtol=0.05, atol=0.02 * ref.abs().max().item())


def test_a_double_backward_through_the_gemm_path_matches_torch_s() -> None:
    # the backward is torch ops, so autograd differentiates it (gradient penalties work)
    torch.manual_seed(0)
    conv = QuantConv2d(8, 8, 3, 1, 1).to(memory_format=torch.channels_last)
    x = torch.randn(2, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    out = []
    for on in (True, False):
        xr = x.clone().requires_grad_()
        with _kernels.switched(on), torch.autocast("cpu", dtype=torch.bfloat16):
            y = conv(xr)
            gx, gw = torch.autograd.grad(y.float().square().sum(), (xr, conv.weight),
                                         create_graph=True)
            out.append(torch.autograd.grad(gx.float().square().sum() + gw.float().sum(),
                                           conv.weight))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=0.05,
                               atol=0.02 * out[1][0].abs().max().item())
