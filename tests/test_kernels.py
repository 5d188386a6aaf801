"""The compiled RSign / RPReLU training kernels (s2bnn/nn/kernels.c) against float64 formulas,
the pure-torch path, every layout and dtype they accept, and the build helper's failure modes."""

from __future__ import annotations

import pytest
import torch

from s2bnn import _cbuild
from s2bnn.nn import RPReLU, RSign, _kernels

needs_kernels = pytest.mark.skipif(_kernels.library() is None, reason="no C compiler")

# (N, C, H, W): odd widths, one row shorter than a vector, runs that end mid-row, more than
# FLUSH_RUNS runs in a thread, tensors above PAR_MIN (several threads), and NCHW samples both
# under and over TILE_MAX elements (tiled, or walked plane by plane, also on a tiny map).
SHAPES = [(2, 3, 5, 5), (4, 24, 7, 7), (3, 37, 6, 6), (8, 130, 9, 9), (128, 24, 14, 14),
          (2, 1, 4, 4), (5, 16, 1, 1), (3, 2100, 2, 2)]
LAYOUTS = ["channels_last", "nchw"]


def every_case(test):
    """Run ``test(shape, layout, dtype)`` on every shape, layout and dtype the kernels take."""
    for mark in (pytest.mark.parametrize("shape", SHAPES),
                 pytest.mark.parametrize("layout", LAYOUTS),
                 pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16]), needs_kernels):
        test = mark(test)
    return test


def _make(shape: tuple[int, ...], layout: str, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * 1.3
    x = x.to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _params(c: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(c, generator=g) - 0.5 for _ in range(3)]


def _view(p: torch.Tensor) -> torch.Tensor:
    return p.double().view(1, -1, 1, 1)


def _tol(dtype: torch.dtype) -> dict[str, float]:
    # bf16 outputs: one rounding of a float32 result (8 significant bits).
    return {"rtol": 1e-2, "atol": 1e-2} if dtype == torch.bfloat16 else {"rtol": 1e-5,
                                                                          "atol": 1e-5}


@every_case
def test_rprelu_kernel_matches_float64_formula(shape, layout, dtype) -> None:
    x = _make(shape, layout, dtype)
    si, slope, so = _params(shape[1])
    y = _kernels.rprelu_forward(x, si, slope, so)
    assert y.dtype == dtype and y.stride() == x.stride()
    t = x.double() - _view(si)
    expected = torch.where(t > 0, t, t * _view(slope)) + _view(so)
    torch.testing.assert_close(y.double(), expected.to(dtype).double(), **_tol(dtype))
    if dtype == torch.float32:  # the same float32 operations as torch: bit for bit
        tf = x - si.view(1, -1, 1, 1)
        assert torch.equal(y, torch.where(tf > 0, tf, tf * slope.view(1, -1, 1, 1))
                           + so.view(1, -1, 1, 1))

    g = _make(shape, layout, dtype, seed=5)
    gx, g_si, g_slope, g_so = _kernels.rprelu_backward(g, x, si, slope)
    assert gx.dtype == dtype and gx.stride() == x.stride()
    gd = g.double()
    pos = t > 0
    exp_gx = torch.where(pos, gd, gd * _view(slope))
    torch.testing.assert_close(gx.double(), exp_gx.to(dtype).double(), **_tol(dtype))
    dims = (0, 2, 3)
    for got, exp in ((g_si, -exp_gx.sum(dims)), (g_slope, torch.where(pos, 0, gd * t).sum(dims)),
                     (g_so, gd.sum(dims))):
        assert got.dtype == torch.float32 and got.shape == (shape[1],)
        # Sums of ~10^5 terms: float32 slots, float64 totals.
        torch.testing.assert_close(got.double(), exp, rtol=1e-4, atol=1e-3)


@every_case
def test_rsign_kernel_matches_float64_formula(shape, layout, dtype) -> None:
    x = _make(shape, layout, dtype)
    beta = _params(shape[1])[0]
    v = x.double() + _view(beta)
    for out in (torch.float32, torch.bfloat16):
        y = _kernels.rsign_forward(x, beta, out)
        assert y.dtype == out and y.stride() == x.stride()
        # x + beta is rounded to float32 first, as torch does: compare with that sum.
        vf = x.float() + beta.view(1, -1, 1, 1)
        assert torch.equal(y.float(), torch.where(vf < 0, -1.0, 1.0))
    g = _make(shape, layout, dtype, seed=5)
    gx, g_beta = _kernels.rsign_backward(g, x, beta)
    assert gx.dtype == dtype and gx.stride() == x.stride()
    exp_gx = g.double() * (2 - 2 * v.abs()).clamp_min(0)
    torch.testing.assert_close(gx.double(), exp_gx.to(dtype).double(), **_tol(dtype))
    torch.testing.assert_close(g_beta.double(), exp_gx.sum((0, 2, 3)), rtol=1e-4, atol=1e-3)


@needs_kernels
def test_two_dimensional_tensors_and_a_gradient_in_another_layout() -> None:
    x = torch.randn(33, 70)
    si, slope, so = _params(70)
    y = _kernels.rprelu_forward(x, si, slope, so)
    t = x - si
    assert torch.equal(y, torch.where(t > 0, t, t * slope) + so)
    # A channels-last input whose incoming gradient is NCHW (or bf16) is brought to x's layout.
    x4 = _make((4, 8, 5, 5), "channels_last", torch.bfloat16)
    g = torch.randn(4, 8, 5, 5)
    gx, *_ = _kernels.rprelu_backward(g, x4, si[:8], slope[:8])
    gx_ref, *_ = _kernels.rprelu_backward(
        g.bfloat16().contiguous(memory_format=torch.channels_last), x4, si[:8], slope[:8])
    assert torch.equal(gx, gx_ref)


@needs_kernels
def test_sign_of_zero_and_negative_zero_is_plus_one() -> None:
    x = torch.tensor([0.0, -0.0, -1e-30, 1e-30, -0.5, 0.5]).view(1, 6, 1, 1)
    beta = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.5, -0.5])
    y = _kernels.rsign_forward(x, beta, torch.float32)
    assert y.flatten().tolist() == [1.0, 1.0, -1.0, 1.0, 1.0, 1.0]


@needs_kernels
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layers_take_the_kernels_and_agree_with_the_torch_path(layout) -> None:
    torch.manual_seed(3)
    x0 = _make((6, 20, 7, 7), layout, torch.float32)
    rs, act = RSign(20), RPReLU(20)
    with torch.no_grad():
        for p in [*rs.parameters(), *act.parameters()]:
            p.uniform_(-0.5, 0.5)
    g = torch.randn(6, 20, 7, 7)
    results = []
    for on in (True, False):
        with _kernels.switched(on):
            x = x0.clone().requires_grad_()
            y = act(x) * 0.7 + rs(x)
            names = {type(y.grad_fn.next_functions[0][0].next_functions[0][0]).__name__,
                     type(y.grad_fn.next_functions[1][0]).__name__}
            y.backward(g)
        results.append((names, y.detach(), x.grad, rs.beta.grad.clone(),
                        [p.grad.clone() for p in act.parameters()]))
        rs.zero_grad()
        act.zero_grad()
    (k_names, *k), (t_names, *t) = results
    assert any("Kernel" in n for n in k_names) and not any("Kernel" in n for n in t_names)
    torch.testing.assert_close(k[0], t[0])
    torch.testing.assert_close(k[1], t[1])
    torch.testing.assert_close(k[2], t[2], rtol=1e-4, atol=1e-4)
    for a, b in zip(k[3], t[3]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@needs_kernels
def test_rsign_output_is_bf16_under_cpu_autocast_and_double_backward_refuses() -> None:
    rs = RSign(4)
    x = _make((2, 4, 3, 3), "channels_last", torch.float32).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = rs(x)
    assert y.dtype == torch.bfloat16 and "Kernel" in type(y.grad_fn).__name__
    assert rs(x).dtype == torch.float32
    (gx,) = torch.autograd.grad(rs(x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(gx.sum(), x)


def test_unusable_inputs_and_a_missing_library_take_the_torch_path(monkeypatch) -> None:
    x = torch.randn(2, 4, 3, 3)
    rs = RSign(4).double()  # float32 input, float64 threshold: the sum is float64
    y = rs(x)
    assert y.dtype == torch.float64 and "Kernel" not in type(y.grad_fn).__name__
    assert not _kernels.usable(x.double())
    assert not _kernels.usable(x[:, :, :, :2])  # not contiguous in any layout
    assert not _kernels.usable(x.view(2, 4, 9))
    assert not _kernels.usable(torch.empty(0, 4, 3, 3))
    with _kernels.switched(False):
        assert not _kernels.usable(x)
    monkeypatch.setenv(_kernels.ENV, "0")
    assert not _kernels.usable(x)
    monkeypatch.delenv(_kernels.ENV)
    monkeypatch.setattr(_kernels, "library", lambda: None)
    assert not _kernels.usable(x)
    act = RPReLU(4)
    y = act(x.requires_grad_())
    assert "Kernel" not in type(y.grad_fn).__name__
    y.sum().backward()
    assert x.grad is not None


@needs_kernels
def test_results_do_not_depend_on_timing() -> None:
    x = _make((64, 48, 14, 14), "channels_last", torch.bfloat16)
    g = _make((64, 48, 14, 14), "channels_last", torch.bfloat16, seed=9)
    si, slope, _ = _params(48)
    a = _kernels.rprelu_backward(g, x, si, slope)
    b = _kernels.rprelu_backward(g, x, si, slope)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def test_build_without_a_compiler_says_so_in_one_line(monkeypatch, tmp_path, capsys) -> None:
    monkeypatch.setattr(_cbuild, "find_compiler", lambda: None)
    assert _cbuild.compile_cached(_kernels.SOURCE, _kernels.FLAGS, "t", "the torch path runs")\
        is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no C compiler" in err[0] and "the torch path runs" in err[0]


def test_build_of_a_broken_source_fails_in_one_line_and_a_good_one_is_cached(
        monkeypatch, tmp_path, capsys) -> None:
    if _cbuild.find_compiler() is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("S2BNN_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "bad.c"
    bad.write_text("int f(void) { return }\n")
    assert _cbuild.compile_cached(bad, ["-O1", "-fPIC", "-shared"], "bad", "slow path") is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "compiling bad.c failed" in err[0]
    assert not list((tmp_path / "cache").glob("*.tmp"))  # no half-written file left
    good = tmp_path / "good.c"
    good.write_text("int f(void) { return 7; }\n")
    path = _cbuild.compile_cached(good, ["-O1", "-fPIC", "-shared"], "good", "slow path")
    assert path is not None and path.is_file()
    stamp = path.stat().st_mtime_ns
    assert _cbuild.compile_cached(good, ["-O1", "-fPIC", "-shared"], "good", "x") == path
    assert path.stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert _cbuild.load_library(path, "x").f() == 7


@needs_kernels
def test_a_jit_trace_records_the_torch_path_not_the_kernels() -> None:
    import torch.nn as nn

    model = nn.Sequential(RPReLU(4), RSign(4)).eval()
    x1, x2 = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    traced = torch.jit.trace(model, x1)
    # A kernel call would be recorded as an opaque Python op around a ctypes call.
    assert "KernelFn" not in str(traced.inlined_graph)
    assert torch.equal(traced(x2), model(x2))


def test_a_compiler_without_target_clones_gets_the_plain_build(monkeypatch, tmp_path,
                                                               capsys) -> None:
    if _cbuild.find_compiler() is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("S2BNN_CACHE", str(tmp_path))
    real = _cbuild.compile_cached
    tried = []

    def no_clones(source, flags, stem, what, verbose=False, quiet=False):
        tried.append(list(flags))
        if "-DS2T_NO_CLONES" not in flags:  # as an old GCC would fail on arch=x86-64-v4
            return None
        return real(source, flags, stem, what, verbose, quiet)

    monkeypatch.setattr(_cbuild, "compile_cached", no_clones)
    path = _kernels._build()
    assert path is not None and len(tried) == 2 and capsys.readouterr().err == ""
    lib = _kernels._load(path)
    x = torch.randn(3, 5, 4, 4)
    beta = torch.randn(5)
    y = torch.empty_like(x)
    assert lib.s2t_rsign_fwd(x.data_ptr(), 0, y.data_ptr(), 0, 3, 5, 16, beta.data_ptr()) == 0
    assert torch.equal(y, torch.where(x + beta.view(1, -1, 1, 1) < 0, -1.0, 1.0))


def test_an_unknown_switch_value_is_named_once_and_leaves_the_kernels_on(monkeypatch,
                                                                         capsys) -> None:
    assert not _kernels._env_switch("OFF") and not _kernels._env_switch(" 0 ")
    assert _kernels._env_switch("yes") and _kernels._env_switch("1")
    monkeypatch.setattr(_kernels, "_warned", set())
    assert _kernels._env_switch("maybe") and _kernels._env_switch("maybe")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "S2BNN_TRAIN_KERNELS='maybe'" in err[0] and "set it to 0" in err[0]
