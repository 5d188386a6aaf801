"""The run directory: deciding whether to start, resume or refuse, and the metrics CSV.

Layout::

    OUTPUT_DIR/config.yaml            resolved config of the run
    OUTPUT_DIR/checkpoints/last.pt    written atomically after every epoch (and every
                                      save_every_steps steps)
    OUTPUT_DIR/checkpoints/epoch_N.pt with save_every
    OUTPUT_DIR/metrics.csv            one row per log point
    OUTPUT_DIR/tb/                    TensorBoard events

Every decision here is taken before anything is written, so a refused run leaves the directory
exactly as it was.
"""

from __future__ import annotations

import csv
import io
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from s2bnn.checkpoint import atomic_write_bytes, load_checkpoint
from s2bnn.errors import CheckpointError, RunDirError

__all__ = [
    "RESUME_MUTABLE_KEYS",
    "RunPlan",
    "plan_run",
    "config_differences",
    "clear_run_dir",
    "remove_stale_temp_files",
    "MetricsCSV",
]

# Keys that may differ between a run and its resumption: where things are written, how they are
# shown, where the data lives, and how long to train. Anything else changes what is trained, so a
# resume with another value is refused unless force=true.
RESUME_MUTABLE_KEYS: frozenset[str] = frozenset({
    "output_dir", "resume", "force", "progress", "log_every", "knn_every", "knn_train_size",
    "knn_test_size", "knn_k", "save_every", "save_every_steps", "epochs", "steps", "time_budget",
    "time_budget_max_epochs", "time_budget_replan",
    "max_steps", "device", "compile",
    "nan_policy", "max_bad_steps", "data.root", "data.num_workers", "model.init_from",
})


@dataclass
class RunPlan:
    """What :func:`plan_run` decided: ``fresh`` (start, clearing old run files) or ``resume``."""

    action: str
    run_dir: Path
    checkpoint: Path | None = None  # the checkpoint to resume from
    note: str = ""


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ, ignoring :data:`RESUME_MUTABLE_KEYS`, as ``key: a -> b``."""
    a, b = _flatten(old), _flatten(new)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key in RESUME_MUTABLE_KEYS:
            continue
        if a.get(key, "<unset>") != b.get(key, "<unset>"):
            diffs.append(f"{key}: {a.get(key, '<unset>')!r} -> {b.get(key, '<unset>')!r}")
    return diffs


def plan_run(run_dir: str | Path, config: dict[str, Any], resume: str, force: bool) -> RunPlan:
    """Decide what to do with ``run_dir`` for a run of ``config`` (a plain dict); write nothing.

    - no ``checkpoints/last.pt``: start fresh;
    - a finished run: refuse unless ``force`` (then start fresh);
    - an unfinished run with ``resume=never``: refuse unless ``force`` (then start fresh);
    - an unfinished run with ``resume=auto``: resume, refusing a changed config unless ``force``.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"output_dir {run_dir} is a file; choose a directory")
    last = run_dir / "checkpoints" / "last.pt"
    if not last.is_file():
        return RunPlan("fresh", run_dir)
    where = f"output_dir {run_dir}"
    try:
        ckpt = load_checkpoint(last)
    except CheckpointError as err:
        if force:
            return RunPlan("fresh", run_dir, note=f"force=true: replacing unreadable {last}")
        raise CheckpointError(f"{err}; set force=true to start the run in {run_dir} over") from None
    if ckpt.get("finished"):
        if force:
            return RunPlan("fresh", run_dir, note=f"force=true: overwriting the finished run in "
                                                  f"{run_dir}")
        raise RunDirError(
            f"{where} holds a finished run (epoch {ckpt.get('epoch')}); choose another output_dir "
            "or set force=true to overwrite it"
        )
    if resume != "auto":
        if force:
            return RunPlan("fresh", run_dir, note=f"force=true: discarding the unfinished run in "
                                                  f"{run_dir}")
        raise RunDirError(
            f"{where} holds an unfinished run (checkpoint after epoch {ckpt.get('epoch')}); "
            "set resume=auto to continue it or force=true to start over"
        )
    diffs = config_differences(ckpt.get("config") or {}, config)
    if diffs and not force:
        shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
        raise RunDirError(
            f"{where} was made with a different config ({shown}); resume with the same config, "
            "choose another output_dir, or set force=true to resume anyway"
        )
    note = f"resuming from {last} (epoch {ckpt.get('epoch')}, step {ckpt.get('step')})"
    if diffs:
        note += f" with a changed config (force=true): {'; '.join(diffs)}"
    return RunPlan("resume", run_dir, checkpoint=last, note=note)


def clear_run_dir(run_dir: Path) -> None:
    """Remove the files a previous run left (only those this engine writes)."""
    ckpt_dir = run_dir / "checkpoints"
    if ckpt_dir.is_dir():
        for path in list(ckpt_dir.glob("last.pt")) + list(ckpt_dir.glob("epoch_*.pt")):
            path.unlink()
    for name in ("metrics.csv", "config.yaml"):
        (run_dir / name).unlink(missing_ok=True)
    tb = run_dir / "tb"
    if tb.is_symlink():
        tb.unlink()  # never delete what a link points to, outside the run dir
    elif tb.is_dir():
        shutil.rmtree(tb)


def remove_stale_temp_files(run_dir: Path) -> list[Path]:
    """Delete the temporary files of atomic writes a killed run left behind; return them.

    Only names :func:`s2bnn.checkpoint.atomic_write_bytes` makes (``.NAME.XXXX.tmp``) in the run
    dir and its ``checkpoints/``: a checkpoint-sized file per crash would otherwise pile up.
    """
    removed = []
    for folder in (run_dir, run_dir / "checkpoints"):
        if folder.is_dir():
            for path in folder.glob(".*.tmp"):
                if path.is_file() and not path.is_symlink():
                    path.unlink(missing_ok=True)
                    removed.append(path)
    return removed


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return "" if value is None else str(value)


class MetricsCSV:
    """``metrics.csv`` with a header that grows when a new key first appears.

    ``keep_until_step`` (on resume) drops rows logged after the checkpoint being resumed, so
    re-run steps are not written twice. Rows are not kept in memory: a long run stays flat.
    """

    BASE = ("epoch", "step", "loss", "lr", "img_per_s")

    def __init__(self, path: Path, keep_until_step: int | None = None) -> None:
        self.path = path
        self.columns: list[str] = list(self.BASE)
        if keep_until_step is not None and path.is_file():
            columns, rows = self._read()
            self.columns = columns or self.columns
            kept = []
            for row in rows:
                try:
                    if int(row.get("step") or 0) <= keep_until_step:
                        kept.append(row)
                except ValueError:
                    continue
            self._rewrite(kept)

    def _read(self) -> tuple[list[str], list[dict[str, str]]]:
        with self.path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
            return list(reader.fieldnames or []), rows

    def _rewrite(self, rows: list[dict[str, str]]) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.columns, restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_bytes(self.path, buf.getvalue().encode())

    def write(self, row: dict[str, Any]) -> None:
        """Append one row; keys not seen before become new columns (the file is rewritten)."""
        text = {k: _fmt(v) for k, v in row.items()}
        new_keys = [k for k in text if k not in self.columns]
        if new_keys or not self.path.is_file():
            rows = self._read()[1] if self.path.is_file() else []
            self.columns.extend(new_keys)
            self._rewrite(rows + [text])
            return
        with self.path.open("a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=self.columns, restval="").writerow(text)
