"""Security: checkpoints never run code, configuration is never evaluated, and the engine writes
only inside its run dir.

Every load path (``load_checkpoint``, ``load_teacher``, eval's ``load_backbone``,
``model.init_from``, resuming a run dir, the CLI) is given crafted pickles whose unpickling
would create a marker file; each must refuse with a one-line message and the marker must not
appear. A source scan keeps unsafe loaders (``torch.load`` without ``weights_only=True``,
``pickle``, ``eval``/``exec``, ``yaml.load``) out of ``src/s2bnn``.
"""

from __future__ import annotations

import ast
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

import s2bnn
from s2bnn.checkpoint import load_checkpoint, save_checkpoint
from s2bnn.cli import main
from s2bnn.errors import CheckpointError, ConfigError

TINY = """\
epochs: 1
batch_size: 16
progress: false
device: cpu
log_every: 1
data: {name: "synthetic:1:8:32:4"}
model: {name: reactnet_small, width_mult: 0.0625}
method: {name: mocov2, queue_size: 32, momentum: 0.9}
optim: {name: adam, lr: 0.01}
"""


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class _Touch:
    """Unpickling this runs ``touch MARKER``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _payload(marker: Path) -> dict:
    return {"format": "s2bnn", "state_dict": {"w": torch.ones(2)}, "backbone": _Touch(marker)}


@pytest.fixture
def evil(tmp_path: Path) -> dict[str, Path]:
    """Crafted files in three encodings: torch's zip format, raw pickle protocols 2 and 4."""
    marker = tmp_path / "PWNED"
    files = {"zip": tmp_path / "evil_zip.pt", "p2": tmp_path / "evil_p2.pt",
             "p4": tmp_path / "evil_p4.pth.tar"}
    torch.save(_payload(marker), files["zip"])
    for key, proto in (("p2", 2), ("p4", 4)):
        with open(files[key], "wb") as fh:
            pickle.dump(_payload(marker), fh, protocol=proto)
    return {"marker": marker, **files}


def test_the_crafted_files_really_run_code(evil: dict[str, Path]) -> None:
    """Guards the tests below: unsafe loading of these files does create the marker."""
    torch.load(evil["zip"], weights_only=False)
    assert evil["marker"].exists()
    evil["marker"].unlink()
    with open(evil["p2"], "rb") as fh:
        pickle.load(fh)  # noqa: S301 - on purpose: proves the payload is live
    assert evil["marker"].exists()


@pytest.mark.parametrize("kind", ["zip", "p2", "p4"])
def test_every_library_load_path_refuses_crafted_pickles(evil: dict[str, Path], kind: str,
                                                         tmp_path: Path) -> None:
    from s2bnn.eval.loading import export_backbone, load_backbone
    from s2bnn.teachers import load_teacher

    path = evil[kind]
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(path, run / "checkpoints" / "last.pt")
    loaders = {
        "load_checkpoint": lambda: load_checkpoint(path),
        "load_checkpoint(run dir)": lambda: load_checkpoint(run),
        "load_teacher": lambda: load_teacher(path, "reactnet_small"),
        "load_backbone": lambda: load_backbone(path),
        "export_backbone": lambda: export_backbone(path, tmp_path / "out.safetensors"),
    }
    for name, load in loaders.items():
        with pytest.raises(CheckpointError, match="refusing to load") as info:
            load()
        assert "\n" not in str(info.value), name
        assert not evil["marker"].exists(), f"{name} ran the payload"
    assert not (tmp_path / "out.safetensors").exists()


def test_cli_load_paths_refuse_crafted_pickles(evil: dict[str, Path], tmp_path: Path,
                                               capsys) -> None:
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(evil["zip"], run / "checkpoints" / "last.pt")
    out = str(tmp_path / "new")
    commands = {
        "model.init_from": ["train", str(recipe), f"output_dir={out}",
                            f"model.init_from={evil['p4']}"],
        "teacher": ["train", str(recipe), f"output_dir={out}", "method.name=s2bnn",
                    "method.teacher.arch=reactnet_small", f"method.teacher.path={evil['zip']}"],
        "resume": ["train", str(recipe), f"output_dir={run}", "resume=auto"],
        "eval": ["eval", "knn", str(evil["p2"])],
        "export": ["export", str(run), "--out", str(tmp_path / "x.safetensors")],
    }
    for name, argv in commands.items():
        capsys.readouterr()
        assert main(argv) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("s2bnn: error: refusing to load") and err.count("\n") == 1, err
        assert not evil["marker"].exists(), f"{name} ran the payload"
    assert not (tmp_path / "new").exists() and not (tmp_path / "x.safetensors").exists()


def test_yaml_tags_and_config_strings_are_never_evaluated(tmp_path: Path) -> None:
    from s2bnn.config import load_config

    marker = tmp_path / "PWNED"
    recipe = tmp_path / "evil.yaml"
    recipe.write_text(f"output_dir: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="cannot parse YAML"):
        load_config(recipe)
    code = f"__import__('os').system('touch {marker}')"
    with pytest.raises(ConfigError, match="'epochs'"):
        load_config(None, ["output_dir=x", f"epochs={code}"])
    cfg = load_config(None, [f"output_dir={code}", f"data.name={code}"])
    assert cfg.output_dir == code and cfg.data.name == code  # plain strings, never run
    assert not marker.exists()


# --------------------------------------------------------------------------- source scan
UNSAFE_NAMES = {"eval", "exec", "__import__"}
UNSAFE_ATTRS = {
    ("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"), ("marshal", "loads"),
    ("marshal", "load"), ("shelve", "open"), ("yaml", "load"), ("yaml", "unsafe_load"),
    ("yaml", "full_load"), ("dill", "load"), ("dill", "loads"), ("cloudpickle", "loads"),
}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "?"


def unsafe_calls(source: str, filename: str = "<src>") -> list[str]:
    """Calls in ``source`` that could run code from data: eval/exec, pickle-family loaders,
    ``torch.load`` without a literal ``weights_only=True``, ``np.load(allow_pickle=True)``."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        parts = tuple(name.split("."))
        kw = {k.arg: k.value for k in node.keywords if k.arg}
        where = f"{filename}:{node.lineno} {name}"
        if isinstance(node.func, ast.Name) and node.func.id in UNSAFE_NAMES:
            found.append(where)
        elif len(parts) >= 2 and parts[-2:] in UNSAFE_ATTRS:
            found.append(where)
        elif parts[-2:] == ("torch", "load") or name == "load" and "weights_only" in kw:
            value = kw.get("weights_only")
            if not (isinstance(value, ast.Constant) and value.value is True):
                found.append(where + " without weights_only=True")
        elif parts[-1:] == ("load",) and parts[0] in ("np", "numpy"):
            value = kw.get("allow_pickle")
            if value is not None and not (isinstance(value, ast.Constant) and not value.value):
                found.append(where + " with allow_pickle")
    return found


def test_source_scan_catches_what_it_should() -> None:
    bad = (
        "import torch, pickle, yaml, numpy as np\n"
        "torch.load(f)\n"
        "torch.load(f, weights_only=False)\n"
        "torch.load(f, weights_only=flag)\n"
        "pickle.loads(b)\n"
        "yaml.load(t)\n"
        "eval(s)\n"
        "exec(s)\n"
        "np.load(p, allow_pickle=True)\n"
    )
    assert len(unsafe_calls(bad)) == 8
    good = (
        "import torch, yaml, numpy as np\n"
        "torch.load(f, map_location='cpu', weights_only=True)\n"
        "yaml.safe_load(t)\n"
        "model.eval()\n"
        "np.load(p, allow_pickle=False)\n"
        "np.load(p)\n"
    )
    assert unsafe_calls(good) == []


def test_no_module_loads_unsafely() -> None:
    root = Path(s2bnn.__file__).parent
    files = sorted(root.rglob("*.py"))
    assert len(files) > 20
    found = [hit for f in files for hit in unsafe_calls(f.read_text(), str(f.relative_to(root)))]
    assert found == []


# --------------------------------------------------------------------------- run dir paths
def snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_engine_writes_only_inside_its_run_dir(tmp_path: Path) -> None:
    """``..`` in output_dir, an output_dir recorded in the checkpoint that points elsewhere, a
    ``tb`` symlink leading out of the run dir, and the user's own files in it: a resume and a
    forced restart write inside the run dir only and delete only the engine's own files."""
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY)
    run = tmp_path / "run"
    assert main(["train", str(recipe), f"output_dir={run}"]) == 0
    # An unfinished run whose checkpoint claims another output_dir.
    state = load_checkpoint(run)
    state["finished"] = False
    state["config"]["output_dir"] = str(tmp_path / "elsewhere")
    save_checkpoint(state, run / "checkpoints" / "last.pt")
    (run / "notes.txt").write_text("mine")
    (run / "checkpoints" / "best_by_hand.pt").write_bytes(b"mine")
    outside = tmp_path / "outside_tb"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep me")
    shutil.rmtree(run / "tb")
    (run / "tb").symlink_to(outside, target_is_directory=True)
    (tmp_path / "sub").mkdir()
    dotted = tmp_path / "sub" / ".." / "run"

    def outside_run() -> dict[str, tuple[int, bytes]]:
        return {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("run" + os.sep)}

    before = outside_run()
    assert main(["train", str(recipe), f"output_dir={dotted}", "resume=auto", "epochs=2"]) == 0
    # The resumed run wrote its TensorBoard events through the user's symlink: that is the
    # user's choice of storage; nothing else outside the run dir changed.
    events = "outside_tb" + os.sep + "events."
    assert {k: v for k, v in outside_run().items() if not k.startswith(events)} == before
    assert not (tmp_path / "elsewhere").exists()
    assert load_checkpoint(run)["epoch"] == 2 and load_checkpoint(run)["finished"]

    # force=true starts over: the engine's files go, the user's stay, the link's target stays.
    before = outside_run()
    assert main(["train", str(recipe), f"output_dir={dotted}", "force=true", "seed=4"]) == 0
    assert (run / "notes.txt").read_text() == "mine"
    assert (run / "checkpoints" / "best_by_hand.pt").read_bytes() == b"mine"
    assert (outside / "precious.txt").read_text() == "keep me"
    assert {k: v for k, v in outside_run().items() if k in before} == before
    assert not (run / "tb").is_symlink() and any((run / "tb").iterdir())
    assert load_checkpoint(run)["config"]["seed"] == 4
