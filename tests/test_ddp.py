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
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from test_engine import TinyBackbone, one_thread, tiny_cfg, tiny_parts  # noqa: F401

from s2bnn.checkpoint import load_checkpoint
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
    for key, value in a["method"].items():
        other = b["method"][key]
        if key == "queue":
            # Gathered keys enter the queue in rank order, not in the single process's order.
            value, other = (q[q.sum(1).argsort()] for q in (value, other))
        assert torch.allclose(value.float(), other.float(), atol=1e-5), key
    # Training moved the weights far beyond that tolerance, so the comparison means something.
    torch.manual_seed(3)  # the runs' seed: the engine seeds it before building the backbone
    start = TinyBackbone(6, bn=False).state_dict()["net.0.weight"]
    assert (a["method"]["backbone.net.0.weight"] - start).abs().max() > 100 * 1e-5
