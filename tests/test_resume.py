"""Resume equality: stop in epoch 2, resume with resume=auto, and end bit-identical (CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import assert_identical
from test_engine import one_thread, read_metrics, tiny_cfg, tiny_parts  # noqa: F401

from s2bnn.checkpoint import load_checkpoint, method_state, save_checkpoint
from s2bnn.engine import train
from s2bnn.eval.monitor import KNNMonitor


def test_checkpoint_that_repeats_the_backbone_still_resumes(tmp_path: Path) -> None:
    """Checkpoints written before the backbone was stored once also hold it as ``backbone.*``
    keys of ``method``: such a checkpoint resumes and ends as the uninterrupted run."""
    common = {"deterministic": True}
    full, run = tmp_path / "full", tmp_path / "run"
    train(tiny_cfg(full, **common), parts=tiny_parts())
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny_cfg(run, **common), parts=tiny_parts(crash_at=9))
    old = load_checkpoint(run)
    assert not any(k.startswith("backbone.") for k in old["method"])
    old["method"] = method_state(old)  # the earlier layout
    assert any(k.startswith("backbone.") for k in old["method"])
    save_checkpoint(old, run / "checkpoints" / "last.pt")
    train(tiny_cfg(run, resume="auto", **common), parts=tiny_parts())
    a, b = load_checkpoint(full), load_checkpoint(run)
    for key in ("backbone", "method", "optimizer"):
        assert_identical(a[key], b[key], key)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_equals_uninterrupted_run(tmp_path: Path, workers: int) -> None:
    common = {"deterministic": True, "data": {"num_workers": workers},
              "optim": {"name": "adam", "lr": 0.02, "warmup_epochs": 0.5}}
    full = tmp_path / "full"
    train(tiny_cfg(full, **common), parts=tiny_parts())

    run = tmp_path / "run"
    # Crash mid-epoch 2 (call 11 of 12), after a metrics row for step 10 was written.
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny_cfg(run, **common), parts=tiny_parts(crash_at=11))
    assert load_checkpoint(run)["epoch"] == 1
    assert [r["step"] for r in read_metrics(run)][-1] == "10"
    train(tiny_cfg(run, resume="auto", **common), parts=tiny_parts())

    a, b = load_checkpoint(full), load_checkpoint(run)
    assert b["finished"] and b["epoch"] == 2 and b["step"] == a["step"] == 12
    for key in ("method", "backbone", "optimizer", "scheduler"):
        assert_identical(a[key], b[key], key)
    # The rows of the crashed part were dropped and re-logged once: same rows as uninterrupted.
    rows_a, rows_b = read_metrics(full), read_metrics(run)
    strip = [{k: v for k, v in r.items() if k != "img_per_s"} for r in rows_a]
    assert strip == [{k: v for k, v in r.items() if k != "img_per_s"} for r in rows_b]


def test_resume_in_a_three_epoch_run(tmp_path: Path) -> None:
    """A crash early in epoch 2 of 3 (right after the first checkpoint) resumes exactly too."""
    run = tmp_path / "run"
    with pytest.raises(RuntimeError):
        train(tiny_cfg(run, epochs=3), parts=tiny_parts(crash_at=7))
    full = tmp_path / "full"
    train(tiny_cfg(full, epochs=3), parts=tiny_parts())
    train(tiny_cfg(run, epochs=3, resume="auto"), parts=tiny_parts())
    for key in ("backbone", "method"):
        assert_identical(load_checkpoint(full)[key], load_checkpoint(run)[key], key)


def test_resume_real_method_with_augmentation_and_knn(tmp_path: Path) -> None:
    """The real MoCo v2 (key encoder, queue, shuffle BN) on a binary student, random
    augmentations and the kNN monitor: the resumed run is bit-identical too."""
    from s2bnn.config import config_from_dict

    def cfg(out: Path, **over):
        base = {
            "output_dir": str(out), "epochs": 2, "batch_size": 16, "progress": False,
            "device": "cpu", "log_every": 1, "knn_every": 1, "knn_train_size": 32,
            "knn_test_size": 16, "data": {"name": "synthetic:1:16:48:4"},
            "model": {"name": "reactnet_small", "width_mult": 0.125},
            "method": {"name": "mocov2", "queue_size": 32, "momentum": 0.9},
        }
        return config_from_dict({**base, **over})

    crashing = _crashing_parts(5)  # in epoch 2 (3 steps per epoch)
    train(cfg(tmp_path / "full"), callbacks=[KNNMonitor(every=1)])
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg(tmp_path / "run"), parts=crashing, callbacks=[KNNMonitor(every=1)])
    train(cfg(tmp_path / "run", resume="auto"), callbacks=[KNNMonitor(every=1)])
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "run")
    for key in ("backbone", "method", "optimizer", "scheduler"):
        assert_identical(a[key], b[key], key)
    knn = [r["knn_top1"] for r in read_metrics(tmp_path / "run") if r["knn_top1"]]
    assert knn == [r["knn_top1"] for r in read_metrics(tmp_path / "full") if r["knn_top1"]]
    assert len(knn) == 2


def test_offline_teacher_is_reloaded_not_checkpointed(tmp_path: Path) -> None:
    """S2-BNN checkpoints leave the frozen teacher out (it is reloaded from its own file), a
    resume still ends bit-identical, and a resume whose teacher file changed is refused."""
    import shutil

    from s2bnn.config import config_from_dict
    from s2bnn.errors import CheckpointError

    def cfg(out: Path, name: str = "s2bnn", seed: int = 0, **over):
        base = {
            "output_dir": str(out), "epochs": 2, "batch_size": 16, "progress": False,
            "device": "cpu", "knn_every": 0, "seed": seed,
            "data": {"name": "synthetic:1:16:48:4", "augment": {"num_views": 1}},
            "model": {"name": "reactnet_small", "width_mult": 0.125},
            "method": {"name": name, "queue_size": 32, "teacher": {
                "path": str(tmp_path / "teacher"), "arch": "reactnet_small",
                "kwargs": {"width_mult": 0.125}}},
        }
        if name == "mocov2":
            base["data"]["augment"]["num_views"] = 2
            base["epochs"] = 1
        return config_from_dict({**base, **over})

    train(cfg(tmp_path / "teacher", "mocov2"))
    train(cfg(tmp_path / "full"))
    ckpt = load_checkpoint(tmp_path / "full")
    assert ckpt["method"] and not [k for k in ckpt["method"] if k.startswith("teacher.")]
    assert ckpt["frozen_fingerprint"]

    crashing = _crashing_parts(4)  # in epoch 2 (3 steps per epoch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg(tmp_path / "run"), parts=crashing)
    train(cfg(tmp_path / "run", resume="auto"))
    for key in ("backbone", "method", "optimizer", "scheduler"):
        assert_identical(ckpt[key], load_checkpoint(tmp_path / "run")[key], key)

    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg(tmp_path / "moved"), parts=crashing)
    train(cfg(tmp_path / "other_teacher", "mocov2", seed=1))
    shutil.rmtree(tmp_path / "teacher")
    shutil.copytree(tmp_path / "other_teacher", tmp_path / "teacher")
    with pytest.raises(CheckpointError, match="teacher's weights differ"):
        train(cfg(tmp_path / "moved", resume="auto"))


def _crashing_parts(n: int):
    """``parts`` for :func:`train` whose method raises at its ``n``-th forward call."""
    from s2bnn.engine import build_parts

    def parts(cfg):
        built = build_parts(cfg)
        inner = built.build_method

        def build(backbone, total):
            method = inner(backbone, total)
            forward, calls = method.forward, {"n": 0}

            def fwd(views):
                calls["n"] += 1
                if calls["n"] == n:
                    raise RuntimeError("simulated crash")
                return forward(views)

            method.forward = fwd
            return method

        built.build_method = build
        return built

    return parts
