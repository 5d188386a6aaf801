"""Backbones: registry, shapes, ReActNet-A's layout, two-step loading, binary-only layers."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from s2bnn.errors import CheckpointError, ModelError
from s2bnn.models import build_model, list_models, load_backbone_state
from s2bnn.models.reactnet import ReActBlock
from s2bnn.nn import QuantConv2d, RPReLU, RSign

TORCHVISION = {
    "resnet18", "resnet34", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large"
}
BINARY = ["reactnet_a", "reactnet_small", "birealnet18", "xnor_resnet18",
          "binary_resnet18_plain"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors: intra-op threads only add synchronisation, badly so on a shared machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny_kwargs(name: str) -> dict:
    kw: dict = {"in_chans": 1}
    if name in TORCHVISION:
        kw["small_input"] = True
    elif name not in ("resnet_small",):
        kw["width_mult"] = 0.125
    return kw


def test_required_names_are_registered() -> None:
    required = {"reactnet_a", "reactnet_small", "birealnet18", "xnor_resnet18",
                "binary_resnet18_plain", "resnet_small"}
    assert required | TORCHVISION <= set(list_models())


@pytest.mark.parametrize("name", sorted(list_models()))
def test_every_model_forward_backward_tiny(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, **_tiny_kwargs(name))
    assert isinstance(model.feature_dim, int) and model.feature_dim > 0
    x = torch.randn(2, 1, 12, 12)
    feats = model(x)
    assert feats.shape == (2, model.feature_dim)
    feats.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", ["reactnet_small", "birealnet18", "resnet_small", "resnet18"])
def test_num_classes_adds_a_head(name: str) -> None:
    model = build_model(name, num_classes=7, **_tiny_kwargs(name))
    assert model(torch.randn(2, 1, 12, 12)).shape == (2, 7)


def _count_reactnet_a_params(num_classes: int) -> int:
    """Parameters of ReActNet-A from the published layout, independently of the code."""
    widths = [32, 64, 128, 128, 256, 256] + [512] * 6 + [1024, 1024]
    total = 3 * 32 * 9 + 2 * 32  # stem conv + BN
    for cin, cout in zip(widths[:-1], widths[1:]):
        total += cin * cin * 9 + cin * cout  # binary 3x3 (cin->cin), 1x1 (cin->cout in all)
        total += 2 * cin + 2 * cout  # BN after each conv
        total += 2 * cin  # RSign before each conv
        total += 3 * cin + 3 * cout  # RPReLU after each residual add
    return total + 1024 * num_classes + num_classes


def test_reactnet_a_layout_and_parameter_count() -> None:
    model = build_model("reactnet_a", num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) == _count_reactnet_a_params(1000)
    blocks = [m for m in model.modules() if isinstance(m, ReActBlock)]
    assert len(blocks) == 13
    outs = [b.bn2.num_features for b in blocks]
    assert outs == [64, 128, 128, 256, 256] + [512] * 6 + [1024, 1024]
    assert [b.conv3.stride[0] for b in blocks] == [1, 2, 1, 2, 1, 2] + [1] * 5 + [2, 1]
    assert model.stem[0].stride == (2, 2) and model.feature_dim == 1024
    assert sum(isinstance(m, RSign) for m in model.modules()) == 26
    assert sum(isinstance(m, RPReLU) for m in model.modules()) == 26


def test_reactnet_rprelu_init_slope() -> None:
    # ReActNet-A: PReLU's 0.25 as published; reactnet_small: 1 (the teacher study's winner);
    # prelu_init overrides either.
    for name, slope in (("reactnet_a", 0.25), ("reactnet_small", 1.0)):
        slopes = {float(m.slope.detach()[0]) for m in build_model(name, width_mult=0.125).modules()
                  if isinstance(m, RPReLU)}
        assert slopes == {slope}
    model = build_model("reactnet_small", width_mult=0.125, prelu_init=0.25)
    assert all(torch.all(m.slope == 0.25) for m in model.modules() if isinstance(m, RPReLU))


def test_reactnet_tail_stride_keeps_the_last_stage_at_the_previous_resolution() -> None:
    # At 28 px the published layout ends on a 1x1 map; tail_stride=1 keeps the last stage at 2x2
    # (the same weights: only the 512->1024 block's stride and its pool shortcut change).
    maps: list[tuple[int, int]] = []
    for tail in (2, 1):
        model = build_model("reactnet_small", width_mult=0.125, tail_stride=tail).eval()
        seen: list[tuple[int, ...]] = []
        hook = model.blocks[-1].register_forward_hook(
            lambda m, i, o, seen=seen: seen.append(o.shape))
        with torch.no_grad():
            feats = model(torch.randn(2, 1, 28, 28))
        hook.remove()
        assert feats.shape == (2, model.feature_dim)
        maps.append(tuple(seen[0][2:]))
        assert (model.blocks[-2].pool is None) == (tail == 1)
    assert maps == [(1, 1), (2, 2)]
    with pytest.raises(ModelError, match="tail_stride"):
        build_model("reactnet_small", tail_stride=3)


def test_reactnet_max_channels_caps_the_widths_where_a_stage_would_pass_it() -> None:
    widths = lambda m: [b.conv1.out_channels for b in m.blocks]  # noqa: E731
    free = build_model("reactnet_small", width_mult=0.5, mid_blocks=1)
    assert widths(free) == [32, 64, 64, 128, 128, 256, 256, 512, 512]
    capped = build_model("reactnet_small", width_mult=0.5, mid_blocks=1, max_channels=128)
    # Stages that would double past 128 keep 128: their first block only downsamples.
    assert widths(capped) == [32, 64, 64, 128, 128, 128, 128, 128, 128]
    assert capped.feature_dim == 128
    # A cap between two doublings holds the last width that fits it.
    odd = build_model("reactnet_small", width_mult=0.5, mid_blocks=0, max_channels=96)
    assert widths(odd) == [32, 64, 64, 64, 64, 64, 64, 64]
    with torch.no_grad():
        feats = capped.eval()(torch.randn(2, 1, 28, 28))
    assert feats.shape == (2, 128)
    # Downsampling blocks that keep their width still halve the map (pool shortcut, no cat).
    assert capped.blocks[5].pool is not None and not capped.blocks[5].duplicate
    with pytest.raises(ModelError, match="max_channels"):
        build_model("reactnet_small", max_channels=0)


@pytest.mark.parametrize("tail, last_map, last_width", [(0, (2, 2), 64), (1, (1, 1), 128),
                                                       (3, (1, 1), 128)])
def test_reactnet_tail_blocks(tail: int, last_map: tuple[int, int], last_width: int) -> None:
    model = build_model("reactnet_small", width_mult=0.125, mid_blocks=0, tail_blocks=tail)
    assert len(model.blocks) == 6 + tail and model.feature_dim == last_width
    seen: list[tuple[int, ...]] = []
    model.blocks[-1].register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape[2:])))
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 1, 28, 28)).shape == (2, last_width)
    assert seen == [last_map]
    with pytest.raises(ModelError, match="tail_blocks"):
        build_model("reactnet_small", tail_blocks=-1)


def test_no_unused_modules_in_reactnet() -> None:
    model = build_model("reactnet_small", width_mult=0.125)
    used: set[int] = set()
    hooks = [m.register_forward_hook(lambda m, i, o: used.add(id(m))) for m in model.modules()]
    model(torch.randn(2, 1, 28, 28))
    for h in hooks:
        h.remove()
    unused = [n for n, m in model.named_modules() if id(m) not in used]
    assert unused == []


def test_step1_to_step2_plain_load_and_real_counterpart_same_names() -> None:
    torch.manual_seed(0)
    step1 = build_model("reactnet_small", binary_act=True, binary_weight=False, width_mult=0.125)
    step2 = build_model("reactnet_small", binary_act=True, binary_weight=True, width_mult=0.125)
    real = build_model("reactnet_small", binary_act=False, binary_weight=False, width_mult=0.125)
    opt = torch.optim.SGD(step1.parameters(), lr=0.1)
    step1(torch.randn(4, 1, 16, 16)).square().mean().backward()
    opt.step()
    assert list(step1.state_dict()) == list(step2.state_dict()) == list(real.state_dict())
    load_backbone_state(step2, step1.state_dict(), source="step-1 checkpoint")
    for k, v in step1.state_dict().items():
        assert torch.equal(step2.state_dict()[k], v)
    convs1 = [m for m in step1.modules() if isinstance(m, QuantConv2d)]
    convs2 = [m for m in step2.modules() if isinstance(m, QuantConv2d)]
    assert all(c.binary_input and not c.binary_weight for c in convs1)
    assert all(c.binary_input and c.binary_weight for c in convs2)
    assert not any(m.binary_input or m.binary_weight for m in real.modules()
                   if isinstance(m, QuantConv2d))


def test_load_backbone_state_errors_name_keys() -> None:
    model = build_model("reactnet_small", width_mult=0.125)
    other = build_model("resnet_small")
    msg = r"from run/x.*missing key\(s\): blocks\.0\.conv3\.weight"
    with pytest.raises(CheckpointError, match=msg):
        load_backbone_state(model, other.state_dict(), source="run/x")
    wider = build_model("reactnet_small", width_mult=0.25)
    with pytest.raises(CheckpointError, match=r"shape mismatch.*\(\+\d+ more\)"):
        load_backbone_state(model, wider.state_dict(), source="wider")
    prefixed = {f"module.{k}": v for k, v in model.state_dict().items()}
    load_backbone_state(model, prefixed, source="ddp")


def test_torchvision_models_keep_torchvision_names_and_adapt_the_stem() -> None:
    import torchvision

    model = build_model("resnet18", num_classes=1000)
    load_backbone_state(model, torchvision.models.resnet18().state_dict(), source="tv")
    small = build_model("resnet18", in_chans=1, small_input=True)
    assert small.conv1.in_channels == 1 and small.conv1.stride == (1, 1)
    assert small.conv1.kernel_size == (3, 3) and isinstance(small.maxpool, nn.Identity)
    assert small(torch.randn(2, 1, 8, 8)).shape == (2, 512)
    mb = build_model("mobilenet_v3_small", in_chans=1, small_input=True)
    assert mb.features[0][0].stride == (1, 1) and mb.feature_dim == 576


class _RecordConvs(TorchFunctionMode):
    """Records the tensors every F.conv2d / F.linear call really receives."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[object, torch.Tensor, torch.Tensor]] = []
        self.current: object = None

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func in (F.conv2d, F.linear):
            self.calls.append((self.current, args[0].detach(), args[1].detach()))
        return func(*args, **kwargs)


@pytest.mark.parametrize("name", BINARY)
def test_binary_layers_see_only_pm_one_inputs_and_pm_alpha_weights(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, in_chans=1, width_mult=0.125)
    rec = _RecordConvs()

    def mark(module: nn.Module, args: tuple) -> None:
        rec.current = module

    binary = [m for m in model.modules() if isinstance(m, QuantConv2d) and m.binary_weight]
    assert binary and all(m.binary_input for m in binary)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_pre_hook(mark)
    with rec:
        model(torch.randn(2, 1, 16, 16) * 3)
    seen = {id(m) for m, _, _ in rec.calls}
    assert all(id(m) in seen for m in binary)
    for module, x, w in rec.calls:
        if module in binary:
            assert set(x.unique().tolist()) <= {-1.0, 1.0}
            alpha = module.weight.detach().abs().mean(dim=(1, 2, 3))
            torch.testing.assert_close(w.abs(), alpha.view(-1, 1, 1, 1).expand_as(w))
        elif module is not None and isinstance(module, QuantConv2d):
            raise AssertionError("a QuantConv2d in a binary net is not binary")


def test_real_counterpart_of_bireal_is_nonlinear_hardtanh() -> None:
    model = build_model("birealnet18", binary_act=False, binary_weight=False, width_mult=0.125)
    q = [m.input_quantizer for m in model.modules() if isinstance(m, QuantConv2d)]
    assert q and all(type(x).__name__ == "HardTanh" for x in q)


def _box_scale_by_loops(i: torch.Tensor, k: int, stride: int, pad: int) -> torch.Tensor:
    """XNOR-Net's K written out: A = mean_c |I|, K[y, x] = sum of A over the k x k window / k^2."""
    a = i.abs().sum(dim=1) / i.shape[1]  # (N, H, W)
    a = F.pad(a, (pad, pad, pad, pad))
    n, h, w = a.shape
    out_h, out_w = (h - k) // stride + 1, (w - k) // stride + 1
    out = torch.zeros(n, 1, out_h, out_w, dtype=i.dtype)
    for y in range(out_h):
        for x in range(out_w):
            window = a[:, y * stride:y * stride + k, x * stride:x * stride + k]
            out[:, 0, y, x] = window.sum(dim=(1, 2)) / (k * k)
    return out


@pytest.mark.parametrize("stride", [1, 2])
def test_xnor_block_is_bn_then_sign_then_conv_times_k_and_alpha(stride: int) -> None:
    """The defining maths of XNOR-Net's block on a tiny input, written out independently."""
    from s2bnn.models.resnet_binary import XnorConv

    g = torch.Generator().manual_seed(0)
    block = XnorConv(3, 4, stride, "ste_sign", "scaled_sign", scale_act=True).eval()
    with torch.no_grad():  # a BN far from identity: negative scales, shifts, odd statistics
        block.bn.weight.copy_(torch.tensor([1.5, -0.7, 0.4]))
        block.bn.bias.copy_(torch.tensor([0.3, -0.2, 0.5]))
        block.bn.running_mean.copy_(torch.tensor([0.2, -0.4, 1.0]))
        block.bn.running_var.copy_(torch.tensor([0.5, 2.0, 1.3]))
        block.conv.weight.copy_(torch.randn(4, 3, 3, 3, generator=g))
    x = torch.randn(2, 3, 5, 6, generator=g) * 2
    with torch.no_grad():
        out = block(x)
    bn = block.bn
    i = (x - bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(bn.running_var + bn.eps).view(
        1, -1, 1, 1) * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
    w = block.conv.weight.detach()
    alpha = w.abs().mean(dim=(1, 2, 3)).view(1, -1, 1, 1)
    signs = torch.where(i >= 0, 1.0, -1.0)
    k_scale = _box_scale_by_loops(i, 3, stride, 1)
    want = F.conv2d(signs, torch.where(w >= 0, 1.0, -1.0), stride=stride, padding=1) \
        * alpha * k_scale
    assert k_scale.shape == (2, 1) + out.shape[2:]
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    # Without the BN before the sign, or without K, the block would be another function.
    no_bn = F.conv2d(torch.where(x >= 0, 1.0, -1.0), torch.where(w >= 0, 1.0, -1.0),
                     stride=stride, padding=1) * alpha * _box_scale_by_loops(x, 3, stride, 1)
    assert not torch.allclose(out, no_bn, atol=1e-3)
    assert not torch.allclose(out, want / k_scale, atol=1e-3)


def test_xnor_resnet18_puts_a_bn_over_the_input_before_every_binary_conv() -> None:
    from s2bnn.models.resnet_binary import XnorConv
    from s2bnn.nn.quantizers import SteSign

    model = build_model("xnor_resnet18", in_chans=1, width_mult=0.125, layers=[1, 1, 1, 1])
    binary = [m for m in model.modules() if isinstance(m, QuantConv2d) and m.binary_weight]
    units = [m for m in model.modules() if isinstance(m, XnorConv)]
    assert len(units) == len(binary) == 8
    for u in units:
        assert u.scale_act and u.bn.num_features == u.conv.in_channels
        assert isinstance(u.conv.input_quantizer, SteSign)  # the paper's hardtanh STE
    # A BN whose output is all negative makes every sign -1: the conv sees BN(x), not x.
    seen: list[torch.Tensor] = []
    unit = units[0]
    unit.conv.input_quantizer.register_forward_hook(lambda m, a, o: seen.append(a[0]))
    with torch.no_grad():
        unit.bn.weight.zero_()
        unit.bn.bias.fill_(-1.0)
    model.eval()(torch.randn(2, 1, 16, 16))
    assert seen and torch.all(seen[0] == -1.0)
    # The real-valued/BWN variant has no activation scale.
    bwn = build_model("xnor_resnet18", in_chans=1, width_mult=0.125, binary_act=False)
    assert not any(m.scale_act for m in bwn.modules() if isinstance(m, XnorConv))


def test_plain_binary_resnet_has_no_activation_scale_and_no_bn_before_sign() -> None:
    from s2bnn.models.resnet_binary import PlainBlock, XnorConv

    model = build_model("binary_resnet18_plain", in_chans=1, width_mult=0.125)
    assert not any(isinstance(m, XnorConv) for m in model.modules())
    assert any(isinstance(m, PlainBlock) for m in model.modules())


def test_bad_inputs_raise_one_line_model_errors() -> None:
    with pytest.raises(ModelError, match="known models: .*reactnet_a"):
        build_model("reactnet_b")
    with pytest.raises(ModelError, match="does not take argument"):
        build_model("reactnet_small", depth=3)
    model = build_model("reactnet_small", width_mult=0.125)
    with pytest.raises(ModelError, match="1-channel images but got 3"):
        model(torch.randn(2, 3, 16, 16))
    with pytest.raises(ModelError, match=r"shape \(N, C, H, W\)"):
        model(torch.randn(1, 16, 16))
    with pytest.raises(ModelError, match="stem_stride"):
        build_model("reactnet_small", stem_stride=3)


@pytest.mark.parametrize("name", ["reactnet_small", "xnor_resnet18", "binary_resnet18_plain",
                                  "resnet_small"])
def test_channels_last_is_a_pure_speed_option(name: str) -> None:
    # Real-valued graphs: a binary conv's output is a sum of +-alpha that is often exactly 0
    # in exact arithmetic, and which side of 0 float rounding puts it on depends on the
    # summation order, i.e. on the memory layout; that is not a difference between graphs.
    kw = {} if name == "resnet_small" else {"binary_act": False, "binary_weight": False}
    torch.manual_seed(0)
    nhwc = build_model(name, in_chans=1, width_mult=0.125, channels_last=True, **kw)
    nchw = build_model(name, in_chans=1, width_mult=0.125, channels_last=False, **kw)
    load_backbone_state(nchw, nhwc.state_dict(), source="nhwc")
    nhwc.eval()  # batch statistics of 3 values per channel would amplify rounding differences
    nchw.eval()
    x = torch.randn(3, 1, 16, 16)
    torch.testing.assert_close(nhwc(x), nchw(x), rtol=1e-4, atol=1e-5)


def test_private_models_are_not_listed() -> None:
    from s2bnn.models import register_model

    name = "_private_listing_check"
    if name not in list_models(include_private=True):
        register_model(name)(lambda num_classes=0: nn.Identity())
    assert name not in list_models()
    assert name in list_models(include_private=True)
