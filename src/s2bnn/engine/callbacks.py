"""Callbacks: what watches a run without being part of it.

The loop (:mod:`s2bnn.engine.loop`) calls every callback at fixed points and knows nothing of
what they do. The engine's own are the metrics log (``metrics.csv`` and TensorBoard) and the
progress bar; monitors that evaluate the student (the kNN probe, :mod:`s2bnn.eval.monitor`) are
handed in by the caller, so the engine imports nothing above it.

A callback may add entries to a log row in :meth:`Callback.on_log` (before it is written), which
is how a monitor's numbers reach ``metrics.csv``. Callbacks run on every rank; those that write
or evaluate check ``trainer.main`` themselves.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from s2bnn.engine.rundir import MetricsCSV

if TYPE_CHECKING:
    from s2bnn.engine.loop import Trainer

__all__ = ["Callback", "MetricsLogger", "ProgressBar"]


class Callback:
    """Base class; every hook does nothing. ``trainer`` is the running
    :class:`~s2bnn.engine.loop.Trainer` (read its ``cfg``, ``progress``, ``method``...)."""

    def on_train_start(self, trainer: Trainer) -> None:
        """After set-up, before the first step (the run dir is ready)."""

    def on_epoch_start(self, trainer: Trainer, steps: int, first: int) -> None:
        """An epoch begins: ``steps`` batches planned in it, starting at batch ``first``."""

    def on_step_end(self, trainer: Trainer) -> None:
        """After every optimiser step (skipped ones included)."""

    def on_log(self, trainer: Trainer, row: dict[str, Any], *, epoch_end: bool,
               final: bool) -> None:
        """A log point: ``row`` holds the averaged metrics since the last one; add to it here.
        ``epoch_end``: the epoch's last batch; ``final``: the run's last step."""

    def on_logged(self, trainer: Trainer, row: dict[str, Any]) -> None:
        """After every :meth:`on_log`: the finished row (written by :class:`MetricsLogger`)."""

    def on_epoch_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
        """An epoch finished; ``row`` is its last log row."""

    def on_train_end(self, trainer: Trainer) -> None:
        """After the last checkpoint, also when the run failed (close files here)."""


class MetricsLogger(Callback):
    """Rank 0 writes each log row to ``metrics.csv`` and, when installed, TensorBoard."""

    def __init__(self) -> None:
        self.csv: MetricsCSV | None = None
        self.tb: Any = None

    def on_train_start(self, trainer: Trainer) -> None:
        if not trainer.main:
            return
        resumed = trainer.plan.action == "resume"
        step = trainer.progress.step
        self.csv = MetricsCSV(trainer.run_dir / "metrics.csv",
                              keep_until_step=step if resumed else None)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # pragma: no cover - tensorboard is a dependency
            trainer.say("tensorboard is not installed: no tb/ events")
            return
        # purge_step drops events a crashed run wrote after its last checkpoint.
        self.tb = SummaryWriter(str(trainer.run_dir / "tb"),
                                purge_step=step + 1 if resumed else None)

    def on_logged(self, trainer: Trainer, row: dict[str, Any]) -> None:
        if self.csv is not None:
            self.csv.write(row)
        if self.tb is not None:
            for key, value in row.items():
                if key not in ("epoch", "step") and isinstance(value, (int, float)):
                    self.tb.add_scalar(f"train/{key}", value, row["step"])

    def on_train_end(self, trainer: Trainer) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


class ProgressBar(Callback):
    """A tqdm bar per epoch on rank 0 (``progress=true``) and a line at each epoch's end."""

    def __init__(self) -> None:
        self.bar: Any = None

    def on_epoch_start(self, trainer: Trainer, steps: int, first: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(
            total=steps, initial=first,
            desc=f"epoch {trainer.progress.epoch + 1}/{trainer.num_epochs}",
            disable=not trainer.show, dynamic_ncols=True, leave=False, file=sys.stderr,
        )

    def on_step_end(self, trainer: Trainer) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def on_logged(self, trainer: Trainer, row: dict[str, Any]) -> None:
        if self.bar is None:
            return
        post = {"loss": f"{row['loss']:.4f}", "lr": f"{row['lr']:.2e}",
                "img/s": f"{row['img_per_s']:.0f}"}
        post.update({k: f"{v:.3f}" for k, v in row.items() if k.startswith("cos")})
        self.bar.set_postfix(post, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_epoch_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
        self.close()
        if row:
            p = trainer.progress
            trainer.say(
                f"epoch {p.epoch}/{trainer.num_epochs} step {p.step}: loss {row['loss']:.4f}"
                + (f", knn_top1 {row['knn_top1']:.2f}" if "knn_top1" in row else "")
            )

    def on_train_end(self, trainer: Trainer) -> None:
        self.close()
