"""Bad input at the command line, as users meet it: every case is one line ``s2bnn: error: ...``
on stderr naming the problem, exit status 2, no traceback, and nothing that already existed in
the workspace (run dirs, teachers, data) changed, byte for byte and mtime for mtime.

The library-level checks behind these messages are tested next to their code (test_config,
test_data, test_teachers, test_engine, test_eval); this table checks what the CLI makes of them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import faults
import numpy as np
import pytest
import torch

from s2bnn.checkpoint import load_checkpoint, save_checkpoint
from s2bnn.cli import main

TINY = """\
epochs: 1
batch_size: 16
progress: false
device: cpu
log_every: 1
seed: 1
data: {name: "synthetic:1:8:32:4"}
model: {name: reactnet_small, width_mult: 0.0625}
method: {name: mocov2, queue_size: 32, momentum: 0.9}
optim: {name: adam, lr: 0.01}
"""
TEACHER_KW = "method.teacher.kwargs.width_mult=0.0625"


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tree(root: Path, images: bool = True) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 2)):
        for cls in ("a", "b"):
            d = root / split / cls
            d.mkdir(parents=True)
            (d / "README.txt").write_text("not an image\n")
            for i in range(n if images else 0):
                pixels = rng.integers(0, 255, (12, 12), dtype=np.uint8)
                Image.fromarray(pixels).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """A workspace: a recipe, a finished and an unfinished run, teacher files and image trees."""
    ws = tmp_path_factory.mktemp("ws")
    (ws / "tiny.yaml").write_text(TINY)
    (ws / "typo.yaml").write_text(TINY + "extra: {}\n".replace("extra", "optimiser"))
    torch.set_num_threads(1)
    assert main(["train", str(ws / "tiny.yaml"), f"output_dir={ws / 'done'}"]) == 0
    # An unfinished run: the same checkpoint marked as taken after epoch 1 of 2.
    shutil.copytree(ws / "done", ws / "open")
    state = load_checkpoint(ws / "open")
    state["finished"] = False
    save_checkpoint(state, ws / "open" / "checkpoints" / "last.pt")
    # Teacher files: a state dict with keys missing; a file that is not a checkpoint.
    backbone = dict(load_checkpoint(ws / "done")["backbone"]["state_dict"])
    for key in sorted(backbone)[:3]:
        del backbone[key]
    torch.save(backbone, ws / "partial_teacher.pt")
    (ws / "garbage" / "checkpoints").mkdir(parents=True)
    (ws / "garbage" / "checkpoints" / "last.pt").write_bytes(b"not a checkpoint")
    # Image trees: class folders without images; a corrupt and a truncated image.
    _tree(ws / "no_images", images=False)
    _tree(ws / "corrupt")
    (ws / "corrupt" / "train" / "b" / "3.png").write_bytes(b"\x89PNG but not really")
    _tree(ws / "truncated")
    cut = ws / "truncated" / "train" / "a" / "5.png"
    cut.write_bytes(cut.read_bytes()[:60])
    return ws


def snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_file()}


def _train(*over: str, recipe: str = "tiny.yaml") -> Callable[[Path, Path], list[str]]:
    def argv(ws: Path, out: Path) -> list[str]:
        return ["train", str(ws / recipe), f"output_dir={out}",
                *(o.replace("{ws}", str(ws)) for o in over)]
    return argv


def _argv(*args: str) -> Callable[[Path, Path], list[str]]:
    return lambda ws, out: [a.replace("{ws}", str(ws)) for a in args]


S2BNN = ("method.name=s2bnn", "method.teacher.arch=reactnet_small")
CASES: list[tuple[str, Callable[[Path, Path], list[str]], tuple[str, ...]]] = [
    # configuration
    ("unknown key", _train("bogus_key=1"), ("unknown config key 'bogus_key'",)),
    ("unknown key in the file", _train(recipe="typo.yaml"), ("unknown config key 'optimiser'",)),
    ("wrong type", _train("epochs=three"), ("config key 'epochs'",)),
    ("wrong nested type", _train("optim.lr=fast"), ("config key 'optim.lr'",)),
    ("bad choice", _train("resume=maybe"), ("'resume'", "never, auto")),
    ("non-boolean teacher centring", _train(*S2BNN, "method.teacher.center=maybe"),
     ("config key 'method.teacher.center'", "not a valid bool")),
    ("unparseable time budget", _train("time_budget=soon"), ("config key 'time_budget'",)),
    ("non-positive time budget", _train("time_budget=-5"), ("config key 'time_budget'", "> 0")),
    ("non-positive steps", _train("steps=0"), ("config key 'steps'", "> 0")),
    ("steps and epochs both given", _train("steps=10", "epochs=2"),
     ("'epochs' and 'steps' both size the run", "set only one")),
    ("budget under one step", _train("time_budget=0.001"),
     ("config key 'time_budget'", "less than one optimiser step")),
    ("missing config file", _argv("train", "{ws}/absent.yaml", "output_dir={ws}/x"),
     ("config file not found",)),
    # data
    ("missing dataset", _train("data.name={ws}/no_such_dir"), ("does not exist",)),
    ("ImageFolder without images", _train("data.name={ws}/no_images"), ("has no images",)),
    ("corrupt image", _train("data.name={ws}/corrupt", "batch_size=4"),
     ("cannot decode image", "3.png", "skip_corrupt")),
    ("truncated image", _train("data.name={ws}/truncated", "batch_size=4"),
     ("cannot decode image", "5.png", "skip_corrupt")),
    # (the same error raised in a DataLoader worker: test_worker_error_is_one_line_...)
    # channels
    ("model in_chans differs from the data", _train("model.kwargs.in_chans=3"),
     ("model.kwargs.in_chans=3", "1-channel")),
    ("teacher channels differ from the data",
     _train(*S2BNN, "method.teacher.path={ws}/done", "data.name=synthetic:3:8:32:4"),
     ("takes 1-channel images", "has 3")),
    ("eval on data with other channels",
     _argv("eval", "knn", "{ws}/done", "--data", "synthetic:3:8:32:4"), ("3-channel",)),
    ("no teacher stages", _train(*S2BNN, "method.teacher.stages=0"),
     ("method.teacher.stages must be >= 1, got 0",)),
    ("teacher stages of an online teacher",
     _train("method.name=s2bnn", "method.teacher.kind=online", "method.teacher.stages=2"),
     ("method.teacher.stages > 1", "method.teacher.kind=offline")),
    ("no teacher grid", _train(*S2BNN, "method.teacher.grid=0"),
     ("method.teacher.grid must be >= 1, got 0",)),
    ("a teacher grid of an online teacher",
     _train("method.name=s2bnn", "method.teacher.kind=online", "method.teacher.grid=2"),
     ("method.teacher.grid > 1", "method.teacher.kind=offline")),
    ("no student stages", _train(*S2BNN, "method.student_stages=0"),
     ("method.student_stages must be >= 1, got 0",)),
    ("negative deep-supervision weight", _train(*S2BNN, "method.stage_weight=-1"),
     ("method.stage_weight must be >= 0, got -1",)),
    ("deep supervision with a contrastive term",
     _train(*S2BNN, "method.student_stages=2", "method.contrastive_weight=1"),
     ("method.student_stages > 1", "method.contrastive_weight 0")),
    ("more student stages than the student has",
     _train(*S2BNN, "method.teacher.path={ws}/done", "method.student_stages=9"),
     ("method.student_stages=9 but the student has",)),
    ("whitening an uncentred target",
     _train(*S2BNN, "method.teacher.whiten=true", "method.teacher.center=false"),
     ("method.teacher.whiten whitens the centred target", "method.teacher.center=true")),
    ("centring an online teacher",
     _train("method.name=s2bnn", "method.teacher.kind=online", "method.teacher.center=true"),
     ("method.teacher.center applies to an offline teacher",)),
    ("too few views for an online teacher",
     _train("method.name=s2bnn", "method.teacher.kind=online", "data.augment.num_views=1"),
     ("needs 2 augmented views", "but data.augment.num_views=1")),
    # teachers and checkpoints
    ("teacher file missing", _train(*S2BNN, "method.teacher.path={ws}/no_teacher.pt"),
     ("teacher not found",)),
    ("extra teacher file missing",
     _train(*S2BNN, "method.teacher.path={ws}/done",
            "method.teacher.extra_paths=[{ws}/no_teacher.pt]"),
     ("teacher not found", "no_teacher.pt")),
    ("extra teachers not a list",
     _train(*S2BNN, "method.teacher.path={ws}/done", "method.teacher.extra_paths={ws}/done"),
     ("config key 'method.teacher.extra_paths'",)),
    ("extra teachers with the contrastive term",
     _train(*S2BNN, "method.teacher.path={ws}/done", "method.teacher.extra_paths=[{ws}/done]",
            "method.contrastive_weight=1"), ("extra_paths", "contrastive_weight 0")),
    ("teacher of another architecture",
     _train("method.name=s2bnn", "method.teacher.arch=resnet_small",
            "method.teacher.path={ws}/done"), ("'reactnet_small' teacher", "resnet_small")),
    ("teacher with missing keys",
     _train(*S2BNN, "method.teacher.path={ws}/partial_teacher.pt", TEACHER_KW,
            "method.teacher.kwargs.in_chans=1"), ("missing keys",)),
    ("init_from another architecture",
     _train("model.name=resnet_small", "model.init_from={ws}/done"),
     ("'reactnet_small' backbone", "resnet_small")),
    ("unreadable checkpoint in the output dir",
     _argv("train", "{ws}/tiny.yaml", "output_dir={ws}/garbage", "resume=auto"),
     ("refusing to load", "last.pt", "force=true")),
    # run dirs
    ("resume with a different config",
     _argv("train", "{ws}/tiny.yaml", "output_dir={ws}/open", "resume=auto", "seed=9"),
     ("different config", "seed: 1 -> 9", "force=true")),
    ("unfinished run without resume",
     _argv("train", "{ws}/tiny.yaml", "output_dir={ws}/open"), ("unfinished run", "resume=auto")),
    ("output dir holds a finished run",
     _argv("train", "{ws}/tiny.yaml", "output_dir={ws}/done"), ("finished run", "force=true")),
    ("finished run with resume=auto",
     _argv("train", "{ws}/tiny.yaml", "output_dir={ws}/done", "resume=auto"),
     ("finished run", "force=true")),
    ("output dir is a file", _argv("train", "{ws}/tiny.yaml", "output_dir={ws}/tiny.yaml"),
     ("is a file",)),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_touches_nothing(ws: Path, case, capsys) -> None:
    name, argv, needles = case
    out = ws / ("new_" + "".join(c if c.isalnum() else "_" for c in name))
    before = snapshot(ws)
    capsys.readouterr()
    code = main(argv(ws, out))
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("s2bnn: error: ") and err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    after = snapshot(ws)
    changed = [k for k in before if after.get(k) != before[k]]
    assert changed == [], changed
    # Only the case's own new output dir may have appeared (a run that fails while training).
    fresh = [k for k in after if k not in before and not k.startswith(out.name + os.sep)]
    assert fresh == [], fresh


def test_too_few_views_is_refused_before_the_run_dir_exists(ws: Path, capsys) -> None:
    out = ws / "new_views"
    argv = ["train", str(ws / "tiny.yaml"), f"output_dir={out}", "method.name=s2bnn",
            "method.contrastive_weight=1", f"method.teacher.path={ws / 'done'}",
            "method.teacher.arch=reactnet_small", "data.augment.num_views=1"]
    assert main(argv) == 2
    assert "needs 2 augmented views" in capsys.readouterr().err
    assert not out.exists()


def test_full_disk_during_checkpoint_keeps_the_previous_one(ws: Path, tmp_path: Path,
                                                            capsys, monkeypatch) -> None:
    """ENOSPC half-way through writing last.pt: one-line error naming the file and the fix;
    last.pt is untouched, no temporary file is left; once there is space, resume=auto works."""
    run = tmp_path / "run"
    shutil.copytree(ws / "open", run)
    last = run / "checkpoints" / "last.pt"
    before = (last.stat().st_mtime_ns, last.read_bytes())
    argv = ["train", str(ws / "tiny.yaml"), f"output_dir={run}", "resume=auto", "epochs=2"]
    faults.install("enospc:last.pt:1", monkeypatch.setattr)  # only the first write fails
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("s2bnn: error: cannot write checkpoint") and err.count("\n") == 1, err
    assert str(last) in err and "No space left on device" in err and "resume=auto" in err
    assert "previous checkpoint" in err
    assert (last.stat().st_mtime_ns, last.read_bytes()) == before
    assert not list(last.parent.glob(".*.tmp"))
    assert main(argv) == 0
    assert load_checkpoint(run)["epoch"] == 2 and load_checkpoint(run)["finished"]


@pytest.mark.slow
def test_worker_error_is_one_line_in_a_real_process(ws: Path, tmp_path: Path) -> None:
    """A real process whose truncated image is met in a DataLoader worker: stderr holds exactly
    the one line (torch re-raises worker errors with the worker's traceback in the message)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    before = snapshot(ws)
    proc = subprocess.run(
        [sys.executable, "-m", "s2bnn", "train", str(ws / "tiny.yaml"),
         f"output_dir={tmp_path / 'run'}", f"data.name={ws / 'truncated'}", "batch_size=4",
         "data.num_workers=1"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("s2bnn: error: cannot decode image"), proc.stderr
    assert "5.png" in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert snapshot(ws) == before
