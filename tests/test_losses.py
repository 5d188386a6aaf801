"""Each loss against a direct, loop-by-loop computation of its formula, and its gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from s2bnn.losses import (
    block_soft_cross_entropy,
    dino_loss,
    info_nce,
    seed_loss,
    soft_cross_entropy,
)


def _unit(*shape: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=gen, dtype=torch.float64), dim=-1)


def _softmax(row: list[float], temp: float) -> list[float]:
    exps = [math.exp(v / temp) for v in row]
    total = sum(exps)
    return [e / total for e in exps]


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(sum(float(x) * float(y) for x, y in zip(a, b)))


def test_info_nce_matches_formula() -> None:
    q, k, queue, temp = _unit(4, 8, seed=0), _unit(4, 8, seed=1), _unit(6, 8, seed=2), 0.2
    expected = 0.0
    for n in range(4):
        pos = math.exp(_dot(q[n], k[n]) / temp)
        neg = sum(math.exp(_dot(q[n], u) / temp) for u in queue)
        expected += -math.log(pos / (pos + neg))
    expected /= 4
    assert info_nce(q, k, queue, temp).item() == pytest.approx(expected, rel=1e-6)


def test_info_nce_gradient_reaches_only_queries() -> None:
    q = _unit(4, 8, seed=0).float().requires_grad_()
    k = _unit(4, 8, seed=1).float().requires_grad_()
    queue = _unit(6, 8, seed=2).float().requires_grad_()
    info_nce(q, k, queue, 0.2).backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert k.grad is None and queue.grad is None


def test_soft_cross_entropy_matches_formula() -> None:
    s, t, tau = _unit(5, 7, seed=3), _unit(5, 7, seed=4), 0.2
    expected = 0.0
    for n in range(5):
        p_t = _softmax([float(v) for v in t[n]], tau)
        p_s = _softmax([float(v) for v in s[n]], tau)
        expected += -sum(pt * math.log(ps) for pt, ps in zip(p_t, p_s))
    expected /= 5
    assert soft_cross_entropy(s, t, tau).item() == pytest.approx(expected, rel=1e-6)


def test_soft_cross_entropy_gradient_and_no_teacher_grad() -> None:
    s = _unit(5, 7, seed=3).requires_grad_()
    t = _unit(5, 7, seed=4).requires_grad_()
    tau = 0.2
    soft_cross_entropy(s, t, tau).backward()
    assert t.grad is None
    # d/ds of -sum p_t log softmax(s/tau), averaged over N: (softmax(s/tau) - p_t) / (tau N)
    expected = (F.softmax(s.detach() / tau, 1) - F.softmax(t.detach() / tau, 1)) / (tau * 5)
    torch.testing.assert_close(s.grad, expected)


def test_soft_cross_entropy_is_minimal_at_the_teacher() -> None:
    t, s, tau = _unit(5, 16, seed=5), _unit(5, 16, seed=6), 0.2
    p_t = F.softmax(t / tau, 1)
    entropy = -(p_t * p_t.log()).sum(1).mean()
    assert soft_cross_entropy(t, t, tau).item() == pytest.approx(entropy.item(), rel=1e-9)
    assert soft_cross_entropy(s, t, tau).item() > entropy.item()


def test_multi_teacher_loss_is_the_mean_of_the_paper_loss_per_teacher() -> None:
    tau = 0.2
    s = torch.cat([_unit(5, 7, seed=10 + k) for k in range(3)], 1)
    t = torch.cat([_unit(5, 7, seed=20 + k) for k in range(3)], 1)
    expected = sum(soft_cross_entropy(s[:, 7 * k:7 * (k + 1)], t[:, 7 * k:7 * (k + 1)], tau)
                   for k in range(3)) / 3
    torch.testing.assert_close(block_soft_cross_entropy(s, t, tau, 3), expected)
    # One teacher: the paper's loss itself. Blocks are not one softmax over all 21 dims.
    one = block_soft_cross_entropy(s[:, :7], t[:, :7], tau, 1)
    torch.testing.assert_close(one, soft_cross_entropy(s[:, :7], t[:, :7], tau))
    assert abs(block_soft_cross_entropy(s, t, tau, 3).item()
               - soft_cross_entropy(s, t, tau).item()) > 0.1
    with pytest.raises(ValueError, match="do not split into blocks 2"):
        block_soft_cross_entropy(s, t, tau, 2)
    with pytest.raises(ValueError, match="do not split"):
        block_soft_cross_entropy(s[:, :14], t, tau, 3)


def test_block_loss_with_blocks_of_different_widths() -> None:
    """Stages of one teacher (method.teacher.stages) are blocks of different widths, each its
    own softmax, weighted equally whatever its width."""
    tau = 0.2
    s = torch.cat([_unit(5, 3, seed=1), _unit(5, 9, seed=2)], 1)
    t = torch.cat([_unit(5, 3, seed=3), _unit(5, 9, seed=4)], 1)
    expected = (soft_cross_entropy(s[:, :3], t[:, :3], tau)
                + soft_cross_entropy(s[:, 3:], t[:, 3:], tau)) / 2
    torch.testing.assert_close(block_soft_cross_entropy(s, t, tau, (3, 9)), expected)
    torch.testing.assert_close(block_soft_cross_entropy(s, t, tau, [12]),
                               soft_cross_entropy(s, t, tau))
    with pytest.raises(ValueError, match=r"do not split into blocks \(3, 8\)"):
        block_soft_cross_entropy(s, t, tau, (3, 8))


def test_seed_loss_matches_formula() -> None:
    s, t, queue = _unit(3, 6, seed=7), _unit(3, 6, seed=8), _unit(5, 6, seed=9)
    ts, tt = 0.2, 0.07
    expected = 0.0
    for n in range(3):
        anchors = [t[n]] + list(queue)
        p_t = _softmax([_dot(t[n], a) for a in anchors], tt)
        p_s = _softmax([_dot(s[n], a) for a in anchors], ts)
        expected += -sum(a * math.log(b) for a, b in zip(p_t, p_s))
    expected /= 3
    assert seed_loss(s, t, queue, ts, tt).item() == pytest.approx(expected, rel=1e-6)


def test_seed_loss_no_grad_to_teacher_or_queue() -> None:
    s = _unit(3, 6, seed=7).requires_grad_()
    t = _unit(3, 6, seed=8).requires_grad_()
    queue = _unit(5, 6, seed=9).requires_grad_()
    seed_loss(s, t, queue, 0.2, 0.07).backward()
    assert s.grad is not None and t.grad is None and queue.grad is None


def test_dino_loss_matches_formula_and_skips_same_view() -> None:
    gen = torch.Generator().manual_seed(10)
    students = [torch.randn(3, 5, generator=gen, dtype=torch.float64) for _ in range(4)]
    teachers = [torch.randn(3, 5, generator=gen, dtype=torch.float64) for _ in range(2)]
    center = torch.randn(1, 5, generator=gen, dtype=torch.float64)
    ts, tt = 0.1, 0.04
    total, pairs = 0.0, 0
    for i, t in enumerate(teachers):
        for j, s in enumerate(students):
            if i == j:
                continue
            for n in range(3):
                p_t = _softmax([float(t[n, c] - center[0, c]) for c in range(5)], tt)
                p_s = _softmax([float(v) for v in s[n]], ts)
                total += -sum(a * math.log(b) for a, b in zip(p_t, p_s)) / 3
            pairs += 1
    assert pairs == 6
    got = dino_loss(students, teachers, center, ts, tt).item()
    assert got == pytest.approx(total / pairs, rel=1e-6)


def test_dino_loss_no_grad_to_teacher_or_center() -> None:
    gen = torch.Generator().manual_seed(11)
    students = [torch.randn(3, 5, generator=gen).requires_grad_() for _ in range(2)]
    teachers = [torch.randn(3, 5, generator=gen).requires_grad_() for _ in range(2)]
    center = torch.zeros(1, 5, requires_grad=True)
    dino_loss(students, teachers, center, 0.1, 0.04).backward()
    assert all(s.grad is not None for s in students)
    assert all(t.grad is None for t in teachers) and center.grad is None


def test_dino_loss_needs_a_pair() -> None:
    x = torch.randn(2, 3)
    with pytest.raises(ValueError):
        dino_loss([x], [x], torch.zeros(1, 3), 0.1, 0.04)


def test_losses_run_in_float32_under_bfloat16_inputs() -> None:
    s, t = _unit(4, 8, seed=12).bfloat16(), _unit(4, 8, seed=13).bfloat16()
    out = soft_cross_entropy(s, t, 0.2)
    assert out.dtype == torch.float32
    ref = soft_cross_entropy(s.double(), t.double(), 0.2)
    assert out.item() == pytest.approx(ref.item(), rel=1e-5)


def test_losses_ignore_bfloat16_autocast() -> None:
    q, k, queue = _unit(4, 8, seed=14).float(), _unit(4, 8, seed=15).float(), _unit(9, 8, seed=16)
    ref = info_nce(q, k, queue.float(), 0.2)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = info_nce(q, k, queue.float(), 0.2)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(ref.item(), rel=1e-6)
