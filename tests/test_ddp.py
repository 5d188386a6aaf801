"""Two ranks on CPU (gloo) through the torchrun environment variables match one process with the
same global batch.

The stand-in has no BatchNorm: with BatchNorm each rank normalises its own half-batch, so two
ranks legitimately differ from one process (that is what sync_bn is for, and SyncBatchNorm needs
GPUs). Without it, the per-sample-mean loss averaged by DDP over two half-batches has the same
gradient as the full batch, so only float summation order differs. The queue is all-gathered
and excluded from DDP's buffer broadcast (ddp_ignored_names), as in the real methods.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from test_engine import TinyBackbone, one_thread, tiny_cfg, tiny_parts  # noqa: F401

from s2bnn.checkpoint import load_checkpoint, method_state
from s2bnn.engine import train


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, port: int, out: str, nan_rank: int) -> None:
    os.environ.update({
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
        "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
    })
    torch.set_num_threads(1)
    cfg = tiny_cfg(Path(out), nan_policy="skip", optim={"name": "sgd", "lr": 0.1})
    # A non-finite loss on one rank only: every rank must skip that step together.
    nan_at = (3,) if rank == nan_rank else ()
    train(cfg, parts=tiny_parts(bn=False, noise=0.0, nan_at=nan_at))


@pytest.mark.slow
def test_two_ranks_match_one_process(tmp_path: Path) -> None:
    single = tmp_path / "single"
    train(tiny_cfg(single, nan_policy="skip", optim={"name": "sgd", "lr": 0.1}),
          parts=tiny_parts(bn=False, noise=0.0, nan_at=(3,)))

    ddp = tmp_path / "ddp"
    # fork: the children start in a moment with torch already imported (spawn costs ~10 s here).
    mp.start_processes(_worker, args=(2, _free_port(), str(ddp), 1), nprocs=2, join=True,
                       start_method="fork")

    a, b = load_checkpoint(single), load_checkpoint(ddp)
    assert b["world_size"] == 2 and b["finished"] and b["step"] == a["step"]
    assert a["bad_steps"] == b["bad_steps"] == 1
    ma, mb = method_state(a), method_state(b)
    for key, value in ma.items():
        other = mb[key]
        if key == "queue":
            # Gathered keys enter the queue in rank order, not in the single process's order.
            value, other = (q[q.sum(1).argsort()] for q in (value, other))
        assert torch.allclose(value.float(), other.float(), atol=1e-5), key
    # Training moved the weights far beyond that tolerance, so the comparison means something.
    torch.manual_seed(3)  # the runs' seed: the engine seeds it before building the backbone
    start = TinyBackbone(6, bn=False).state_dict()["net.0.weight"]
    assert (ma["backbone.net.0.weight"] - start).abs().max() > 100 * 1e-5


# --------------------------------------------------------------------------- shuffle BN
def _shuffle_bn_worker(rank: int, world: int, port: int, out: str) -> None:
    """MoCo's shuffle BN (moco/builder.py _batch_shuffle_ddp / _batch_unshuffle_ddp, written
    here from the MoCo paper's description): gather the key images of all ranks, permute them
    with one permutation shared by all ranks, let each rank encode its slice (BatchNorm in
    training mode: statistics of that slice), gather the keys and undo the permutation."""
    import copy

    import torch.distributed as dist
    from helpers import TinyNet

    from s2bnn.methods.base import mlp_head
    from s2bnn.methods.mocov2 import MomentumContrast

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        torch.manual_seed(0)
        backbone, head = TinyNet(in_chans=1, width=4, bn=True), mlp_head(8, 8, 4)
        moco = MomentumContrast(backbone, head, queue_len=16, dim=4, temperature=0.2,
                                momentum=0.999, shuffle=True, groups=2).train()
        n = 4  # per rank
        xs = [torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(10 + r))
              for r in range(world)]
        step = 3
        moco.step.fill_(step)
        ref_bb, ref_head = copy.deepcopy(backbone).train(), copy.deepcopy(head)
        k = moco.keys(xs[rank], backbone, head)
        # The reference procedure, with the permutation every rank shares (MoCo broadcasts it
        # from rank 0; here it comes from a generator seeded by the step, identical on all ranks).
        x_all = torch.cat(xs)
        perm = torch.randperm(world * n, generator=torch.Generator().manual_seed(1_000_003 + step))
        mine = perm.view(world, n)[rank]
        with torch.no_grad():
            k_mine = F.normalize(ref_head(ref_bb(x_all[mine])), dim=1)
        k_all = [torch.empty_like(k_mine) for _ in range(world)]
        dist.all_gather(k_all, k_mine)
        k_shuffled = torch.cat(k_all)
        k_expected = torch.empty_like(k_shuffled)
        k_expected[perm] = k_shuffled
        k_expected = k_expected.view(world, n, -1)[rank]
        assert torch.allclose(k, k_expected, atol=1e-6), (k - k_expected).abs().max()
        # The key encoder's BN statistics moved with this rank's shuffled slice, as MoCo's do.
        bn = [m for m in moco.key_backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)][0]
        ref = [m for m in ref_bb.modules() if isinstance(m, torch.nn.BatchNorm2d)][0]
        assert torch.allclose(bn.running_mean, ref.running_mean, atol=1e-6)
        # Shuffling matters: encoding the rank's own batch gives other keys, and the slices mix
        # images of both ranks.
        with torch.no_grad():
            local = F.normalize(copy.deepcopy(head)(copy.deepcopy(backbone).train()(xs[rank])),
                                dim=1)
        assert not torch.allclose(k, local, atol=1e-3)
        assert len({int(i) // n for i in mine}) == world
        torch.save({"k": k, "perm": perm}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_shuffle_bn_on_two_gloo_ranks_matches_moco(tmp_path: Path) -> None:
    mp.start_processes(_shuffle_bn_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2,
                       join=True, start_method="fork")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert torch.equal(r0["perm"], r1["perm"])  # one permutation for all ranks
    assert not torch.allclose(r0["k"], r1["k"])


# --------------------------------------------------------------------------- time budget
def _budget_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update({
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
        "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
    })
    torch.set_num_threads(1)
    cfg = tiny_cfg(Path(out), epochs=None, time_budget="4", optim={"name": "sgd", "lr": 0.1})
    train(cfg, parts=tiny_parts(bn=False, noise=0.0))


def _run_ranks_or_fail(worker, out: Path, hang: str, seconds: float = 120) -> None:
    """Two forked gloo ranks of ``worker``; a run that has not ended after ``seconds`` hung
    (ranks waiting on each other): kill it and fail with ``hang``."""
    ctx = mp.start_processes(worker, args=(2, _free_port(), str(out)), nprocs=2, join=False,
                             start_method="fork")
    deadline = time.monotonic() + seconds
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(hang)


@pytest.mark.slow
def test_time_budget_under_ddp_gives_every_rank_the_same_steps(tmp_path: Path) -> None:
    """Each rank times its own steps; the run takes the slowest, so the ranks agree on the
    number of steps (ranks that disagreed would wait forever in the gradient all-reduce)."""
    _run_ranks_or_fail(_budget_worker, tmp_path / "ddp",
                       "the ranks of a time-budgeted run did not finish together")
    ck = load_checkpoint(tmp_path / "ddp")
    assert ck["finished"] and ck["world_size"] == 2 and ck["step"] == ck["total_steps"] >= 1


def _disagreeing_budget_worker(rank: int, world: int, port: int, out: str) -> None:
    import s2bnn.engine.sizing as sizing

    # Each rank measures its own set-up time, so near a step boundary their answers can differ
    # by a step; force a difference to show the ranks still agree (on the smaller one).
    sizing.steps_in_budget = lambda *a, **k: (5 + 2 * rank, f"rank {rank}")  # type: ignore
    _budget_worker(rank, world, port, out)


@pytest.mark.slow
def test_ranks_whose_budget_arithmetic_differs_agree_on_the_smaller(tmp_path: Path) -> None:
    _run_ranks_or_fail(_disagreeing_budget_worker, tmp_path / "ddp",
                       "ranks with different step counts hung")
    ck = load_checkpoint(tmp_path / "ddp")
    assert ck["finished"] and ck["step"] == ck["total_steps"] == 5
