"""Quantizers, RSign, RPReLU and QuantConv2d against their formulas and reference versions."""

from __future__ import annotations

import pytest
import torch
from reference_ops import (
    reference_react_sign,
    reference_scaled_sign,
    reference_ste_sign,
    use_reference_ops,
)

from s2bnn.errors import ModelError
from s2bnn.nn import (
    QuantConv2d,
    QuantLinear,
    RPReLU,
    RSign,
    get_quantizer,
    react_sign,
    scaled_sign,
    ste_sign,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors: intra-op threads only add synchronisation, badly so on a shared machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _grid() -> torch.Tensor:
    # Points in every piece, avoiding the kinks at -1, 0, 1 where one-sided slopes differ.
    x = torch.linspace(-2.0, 2.0, 401, dtype=torch.float64)
    return x[(x.abs() - 1).abs().gt(1e-6) & x.abs().gt(1e-6)]


def _grad(fn, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    fn(x).backward(g)
    return x.grad


def test_sign_values_are_pm_one_and_both_zeros_map_to_plus_one() -> None:
    x = torch.tensor([-3.0, -0.5, 0.0, -0.0, -1e-30, 0.25, 7.0])
    expected = torch.tensor([-1.0, -1.0, 1.0, 1.0, -1.0, 1.0, 1.0])
    assert torch.equal(react_sign(x), expected)
    assert torch.equal(ste_sign(x), expected)
    assert torch.equal(scaled_sign(x.view(1, -1)).sign(), expected.view(1, -1))


def test_react_sign_gradient_is_the_piecewise_polynomial() -> None:
    x = _grid()
    g = torch.rand_like(x) + 0.5
    expected = torch.zeros_like(x)
    left = (x >= -1) & (x < 0)
    right = (x >= 0) & (x < 1)
    expected[left] = 2 + 2 * x[left]
    expected[right] = 2 - 2 * x[right]
    torch.testing.assert_close(_grad(react_sign, x, g), g * expected)


def test_ste_sign_gradient_is_hardtanh_gradient() -> None:
    x = _grid()
    g = torch.randn_like(x)
    torch.testing.assert_close(_grad(ste_sign, x, g), g * (x.abs() < 1).double())


@pytest.mark.parametrize("shape", [(6, 3, 3, 3), (5, 7)])
def test_scaled_sign_values_and_gradient(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    w = torch.randn(*shape, dtype=torch.float64) * 0.8
    out = scaled_sign(w)
    alpha = w.abs().reshape(shape[0], -1).mean(1)
    for c in range(shape[0]):
        assert torch.allclose(out[c].abs(), alpha[c].expand_as(out[c]))
        assert torch.equal(torch.sign(out[c]), torch.sign(w[c]))
    g = torch.randn_like(w)
    # Gradient of clamp(w, -1, 1): alpha is a constant.
    torch.testing.assert_close(_grad(scaled_sign, w, g), g * (w.abs() <= 1).double())


@pytest.mark.parametrize(
    "fused, reference, shape",
    [
        (react_sign, reference_react_sign, (4, 3, 5, 5)),
        (ste_sign, reference_ste_sign, (4, 3, 5, 5)),
        (scaled_sign, reference_scaled_sign, (8, 3, 3, 3)),
    ],
)
def test_fused_matches_reference_values_and_gradients(fused, reference, shape) -> None:
    torch.manual_seed(1)
    x = torch.randn(*shape, dtype=torch.float64) * 1.2
    g = torch.randn_like(x)
    # The reference's detach trick (b - c + c) rounds, so values agree to float precision.
    torch.testing.assert_close(fused(x), reference(x))
    torch.testing.assert_close(_grad(fused, x, g), _grad(reference, x, g))


def test_get_quantizer_names_and_unknown() -> None:
    assert get_quantizer("react_sign").binary
    assert get_quantizer("scaled_sign").binary
    assert not get_quantizer(None).binary
    assert not get_quantizer("hardtanh").binary
    with pytest.raises(ModelError, match="known: "):
        get_quantizer("sgn")


def test_rsign_shape_threshold_and_learnable_beta() -> None:
    rs = RSign(3)
    assert [n for n, _ in rs.named_parameters()] == ["beta"]
    assert rs.beta.shape == (3,)
    x = torch.full((2, 3, 4, 4), -0.3)
    assert torch.equal(rs(x), -torch.ones_like(x))
    with torch.no_grad():
        rs.beta.copy_(torch.tensor([0.5, 0.0, 0.5]))
    y = rs(x)
    assert y.shape == x.shape
    assert torch.equal(y[:, 0], torch.ones_like(y[:, 0])) and torch.equal(y[:, 1], -y[:, 0])
    y.sum().backward()
    # d/dbeta of sign(x + beta) via the polynomial STE at x+beta=0.2: (2 - 0.4) per element.
    torch.testing.assert_close(rs.beta.grad[0], torch.tensor(1.6 * 32))
    real = RSign(3, quantizer=None)
    assert not real.binary and torch.equal(real(x), x)


def test_rprelu_fused_matches_reference_and_has_three_learnable_vectors() -> None:
    torch.manual_seed(2)
    fused, ref = RPReLU(4), RPReLU(4, fused=False)
    with torch.no_grad():
        for p in fused.parameters():
            p.uniform_(-0.5, 0.5)
    ref.load_state_dict(fused.state_dict())
    assert {n: tuple(p.shape) for n, p in fused.named_parameters()} == {
        "shift_in": (4,), "slope": (4,), "shift_out": (4,)
    }
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    g = torch.randn_like(x)
    fused.double()
    ref.double()
    outs, grads = [], []
    for m in (fused, ref):
        xi = x.clone().requires_grad_(True)
        y = m(xi)
        y.backward(g)
        outs.append(y)
        grads.append([xi.grad] + [p.grad for p in m.parameters()])
    torch.testing.assert_close(outs[0], outs[1])
    for a, b in zip(grads[0], grads[1]):
        torch.testing.assert_close(a, b)
    # The formula itself: PReLU(x - gamma) + zeta.
    t = x - fused.shift_in.view(1, -1, 1, 1)
    expected = torch.where(t > 0, t, t * fused.slope.view(1, -1, 1, 1))
    torch.testing.assert_close(outs[0], expected + fused.shift_out.view(1, -1, 1, 1))


def test_quant_conv_is_one_class_for_real_binary_act_and_binary() -> None:
    torch.manual_seed(3)
    real = QuantConv2d(3, 4, 3, padding=1)
    step1 = QuantConv2d(3, 4, 3, padding=1, input_quantizer="react_sign")
    step2 = QuantConv2d(
        3, 4, 3, padding=1, input_quantizer="react_sign", weight_quantizer="scaled_sign"
    )
    assert (real.binary_input, real.binary_weight) == (False, False)
    assert (step1.binary_input, step1.binary_weight) == (True, False)
    assert (step2.binary_input, step2.binary_weight) == (True, True)
    sd = real.state_dict()
    assert list(sd) == list(step1.state_dict()) == list(step2.state_dict())
    step1.load_state_dict(sd)
    step2.load_state_dict(sd)
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(real(x), torch.nn.functional.conv2d(x, real.weight, padding=1))
    torch.testing.assert_close(
        step2(x), torch.nn.functional.conv2d(react_sign(x), scaled_sign(real.weight), padding=1)
    )
    lin = QuantLinear(5, 2, input_quantizer="ste_sign", weight_quantizer="scaled_sign")
    v = torch.randn(3, 5)
    torch.testing.assert_close(lin(v), ste_sign(v) @ scaled_sign(lin.weight).t() + lin.bias)


def test_reference_ops_give_same_model_function() -> None:
    from s2bnn.models import build_model

    torch.manual_seed(4)
    a = build_model("reactnet_small", width_mult=0.125, mid_blocks=1)
    b = build_model("reactnet_small", width_mult=0.125, mid_blocks=1)
    b.load_state_dict(a.state_dict())
    use_reference_ops(b)
    assert list(a.state_dict()) == list(b.state_dict())
    # float64: rounding differences of the reference must not flip a sign downstream.
    a.double()
    b.double()
    x = torch.randn(4, 1, 16, 16, dtype=torch.float64)
    ya, yb = a(x), b(x)
    torch.testing.assert_close(ya, yb)
    ya.square().sum().backward()
    yb.square().sum().backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-5, msg=name)


def _cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((ln for ln in fh if ln.startswith("flags")), "")
    except OSError:
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(flags.split()))


@pytest.mark.parametrize("stride", [1, 2])
def test_bf16_conv_on_a_1x1_map_uses_the_centre_tap_with_the_same_result(stride, monkeypatch):
    """Under CPU bf16 a 'same'-padded conv of a 1x1 map is computed from the kernel's centre tap
    alone (oneDNN's bf16 weight gradient for that shape returns garbage at random); values and
    gradients are those of the full convolution, the other taps' gradients exactly zero."""
    torch.manual_seed(0)
    conv = QuantConv2d(16, 8, 3, stride=stride, padding=1, input_quantizer="react_sign",
                       weight_quantizer="scaled_sign")
    x = torch.randn(4, 16, 1, 1)
    seen = []
    real_conv2d = torch.nn.functional.conv2d
    monkeypatch.setattr(torch.nn.functional, "conv2d",
                        lambda inp, w, *a: seen.append(tuple(w.shape)) or real_conv2d(inp, w, *a))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x)
    out.float().sum().backward()
    assert seen == [(8, 16, 1, 1)]
    grad = conv.weight.grad.clone()
    assert torch.isfinite(grad).all()
    assert grad[:, :, [0, 0, 0, 1, 1, 2, 2, 2], [0, 1, 2, 0, 2, 0, 1, 2]].eq(0).all()
    conv.weight.grad = None
    ref = real_conv2d(react_sign(x), scaled_sign(conv.weight), None, stride, 1)
    ref.sum().backward()
    torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=0.02)
    torch.testing.assert_close(grad, conv.weight.grad, atol=0.05, rtol=0.02)
    # Every other case keeps the plain convolution: fp32, a larger map.
    seen.clear()
    conv(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        conv(torch.randn(4, 16, 3, 3))
    assert seen == [(8, 16, 3, 3), (8, 16, 3, 3)]


@pytest.mark.skipif(not _cpu_has_bf16(), reason="the bug shows only where the CPU computes bf16")
def test_bf16_weight_gradients_on_1x1_maps_stay_finite():
    """The failure the centre-tap path avoids: 200 bf16 backward passes of a stride-2 conv of a
    1x1 map, whose weight gradient was non-finite in 2-12 % of them with a plain conv."""
    torch.manual_seed(0)
    conv = QuantConv2d(64, 64, 3, stride=2, padding=1, input_quantizer="react_sign",
                       weight_quantizer="scaled_sign")
    bad = 0
    for _ in range(200):
        conv.weight.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = conv(torch.randn(16, 64, 1, 1))
        out.float().mul(1e-3).sum().backward()
        bad += not bool(torch.isfinite(conv.weight.grad).all())
    assert bad == 0
