"""s2bnn.deploy: the run-time fusions of the packed runtime (chained C calls, and what the
kernels fold into a convolution's epilogue), each compiled level against the portable one and the
pure-torch path, bit for bit."""

from __future__ import annotations

import pytest
import torch
from test_deploy import CASES, _levels, randomize

from s2bnn.deploy import _build, pack
from s2bnn.deploy.runtime import _Chain
from s2bnn.models import build_model

needs_kernels = pytest.mark.skipif(_build.kernels() is None, reason="no C compiler")


def _chains(packed) -> list[_Chain]:
    return [st[0] for st in packed._plan() if type(st[0]) is _Chain]


@needs_kernels
@pytest.mark.parametrize("name,kwargs,size", CASES)
def test_chain_matches_node_by_node(name, kwargs, size):
    """The second call with the same shapes runs each run of bconvs as one C call: the same
    numbers as the first call (node by node), at every level; a new shape rebuilds the chain."""
    model = randomize(build_model(name, **kwargs), seed=size)
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(2, kwargs["in_chans"], size, size, generator=g) for _ in range(3)]
    other = torch.randn(1, kwargs["in_chans"], size + 3, size + 3, generator=g)
    packed = pack(model, isa="torch")
    ref = [packed(x) for x in xs]
    ref_other = packed(other)
    for level in ["portable"] + _levels():
        packed.set_isa(level)
        assert all(c.arr is None for c in _chains(packed))  # a new level starts node by node
        got = [packed(x) for x in xs]  # the first node by node, then chained
        for want, have in zip(ref, got):
            assert torch.equal(have, want), level
        chains = _chains(packed)
        # built, or (odd map sizes: a 2x2 pool shortcut the kernel cannot average) node by node
        assert all((c.arr is not None) != c.disabled for c in chains), level
        if size % 32 == 0:
            assert chains and all(c.arr is not None for c in chains), level
        assert torch.equal(packed(other), ref_other), level  # a new shape: rebuilt
        assert torch.equal(packed(xs[0]), ref[0]), level  # and back
        assert torch.equal(packed(xs[1]), ref[1]), level


@needs_kernels
def test_chain_follows_thread_count_and_profile():
    model = randomize(build_model("reactnet_small", num_classes=3, in_chans=1, width_mult=1.0,
                                  mid_blocks=1), seed=4)
    x = torch.randn(1, 1, 32, 32)
    packed = pack(model, num_threads=1)
    want = pack(model, isa="torch")(x)
    assert torch.equal(packed(x), want) and torch.equal(packed(x), want)
    packed.num_threads = 2  # another thread count: rebuilt, the same numbers
    assert torch.equal(packed(x), want) and torch.equal(packed(x), want)
    packed.profile = []  # profiling runs node by node
    assert torch.equal(packed(x), want)
    assert sum(1 for _, op, _ in packed.profile if op == "bconv") == \
        sum(1 for _ in packed.binary_convs())
    packed.profile = None


@needs_kernels
def test_chain_reads_a_fresh_input_each_call():
    """The chain's outside inputs (the stem's float output, its bits) are new tensors per call:
    their pointers are swapped in, including a non-contiguous one."""
    model = randomize(build_model("reactnet_small", num_classes=0, in_chans=1, width_mult=0.5,
                                  mid_blocks=1), seed=6)
    packed = pack(model)
    ref = pack(model, isa="torch")
    for seed in range(4):
        x = torch.randn(2, 1, 20, 20, generator=torch.Generator().manual_seed(seed))
        if seed % 2:
            x = x.contiguous(memory_format=torch.channels_last)
        assert torch.equal(packed(x), ref(x)), seed


@needs_kernels
@pytest.mark.parametrize("kwargs,size,batch", [
    (dict(num_classes=4, in_chans=1, width_mult=1.0, mid_blocks=1), 32, 3),
    (dict(num_classes=0, in_chans=3, width_mult=0.3, mid_blocks=1), 64, 1),  # 10.. channels
    (dict(num_classes=0, in_chans=1, width_mult=1.25, mid_blocks=0), 48, 2),
])
def test_pooled_float_output(kwargs, size, batch):
    """A bconv whose float output only a 2x2 pool shortcut reads writes the pooled map itself
    (summed in place in avg_pool2d's order): bit for bit the torch path, at every level and
    thread count (threads own whole row pairs; 3 threads split unevenly)."""
    model = randomize(build_model("reactnet_small", **kwargs), seed=size + batch)
    x = torch.randn(batch, kwargs["in_chans"], size, size,
                    generator=torch.Generator().manual_seed(size))
    want = pack(model, isa="torch")(x)
    for threads in (1, 2, 3):
        packed = pack(model, isa="portable", num_threads=threads)
        for level in ["portable"] + _levels():
            packed.set_isa(level)
            for _ in range(2):  # node by node, then chained
                assert torch.equal(packed(x), want), (level, threads)
            assert any(packed._prepooled.values()), (level, threads)  # odd maps: not all
    # odd map sizes: the pooled write is not possible; the pool runs as before
    x = torch.randn(1, kwargs["in_chans"], size - 3, size - 3)
    packed = pack(model)
    assert torch.equal(packed(x), pack(model, isa="torch")(x))


def test_xnor_activation_scale_is_lowered(tmp_path):
    """XNOR-ResNet-18's K = box filter of mean_c |BN(x)| is one ``act_scale`` per binary conv,
    multiplied in (``mul``): the packed network equals the model, every level equals the torch
    path, and the ONNX export (FloatNet) holds it too."""
    kwargs = dict(num_classes=4, in_chans=3, width_mult=0.25, stem_stride=2, layers=[1, 1, 1, 1])
    model = randomize(build_model("xnor_resnet18", **kwargs), seed=9)
    x = torch.randn(2, 3, 30, 30, generator=torch.Generator().manual_seed(3))
    packed = pack(model, isa="torch")
    ops = [n["op"] for n in packed.graph["nodes"]]
    assert ops.count("act_scale") == ops.count("bconv") == ops.count("mul") > 0
    with torch.no_grad():
        ref = model(x)
    base = packed(x)
    torch.testing.assert_close(base, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    # without K the network computes something else: the test above does check K
    no_k = randomize(build_model("xnor_resnet18", **kwargs), seed=9)
    for m in no_k.modules():
        if hasattr(m, "scale_act"):
            m.scale_act = False
    with torch.no_grad():
        assert not torch.allclose(no_k(x), ref, rtol=1e-2, atol=1e-2)
    for level in ["portable"] + _levels():
        packed.set_isa(level)
        for _ in range(2):
            assert torch.equal(packed(x), base), level
    again = packed.save(tmp_path / "xnor.s2bnn")
    from s2bnn.deploy import load

    assert torch.equal(load(again)(x), packed(x))
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from s2bnn.deploy.export import onnx_from_packed

    path = onnx_from_packed(packed, tmp_path / "xnor.onnx", 30)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(sess.run(None, {"images": x.numpy()})[0])
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
