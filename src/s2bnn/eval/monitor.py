"""Monitors a training run calls back into: the kNN probe of the student during training.

The engine knows only :class:`s2bnn.engine.Callback`; :func:`monitors` gives the callbacks a
config asks for, and the CLI and the demo hand them to :func:`s2bnn.engine.train`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from s2bnn import distributed as D
from s2bnn.engine.callbacks import Callback

if TYPE_CHECKING:
    from s2bnn.config import Config
    from s2bnn.engine.loop import Trainer

__all__ = ["KNNMonitor", "monitors"]


class KNNMonitor(Callback):
    """kNN top-1 (%) of the student backbone on a small labelled split, every ``every`` epochs
    and at the run's end, logged as ``knn_top1``. Reported, never trained on.

    The splits come from the trainer's ``parts.knn_sets()`` (built once, on first use); rank 0
    evaluates while the other ranks wait. The monitor draws from a private RNG state, so a run
    with it trains exactly as one without.
    """

    provides = ("knn_top1",)  # the row key it adds (the engine checks knn_every has a monitor)

    def __init__(self, every: int, k: int = 20) -> None:
        self.every, self.k = int(every), int(k)
        self._data: Any = None
        self._loaded = False

    def due(self, trainer: Trainer, epoch_end: bool, final: bool) -> bool:
        """At the end of every ``every``-th epoch, and at the run's last step."""
        done = trainer.progress.epoch + 1  # the epoch being finished
        return self.every > 0 and ((epoch_end and done % self.every == 0) or final)

    def on_log(self, trainer: Trainer, row: dict[str, Any], *, epoch_end: bool,
               final: bool) -> None:
        if not self.due(trainer, epoch_end, final):
            return
        if trainer.main:
            top1 = self.evaluate(trainer)
            if top1 is not None:
                row["knn_top1"] = top1
        D.barrier()

    def evaluate(self, trainer: Trainer) -> float | None:
        """kNN top-1 of ``trainer``'s student now; ``None`` when there is no labelled split."""
        from s2bnn.eval.features import extract_features, make_loader
        from s2bnn.eval.knn import knn_eval

        if not self._loaded:
            fn = trainer.parts.knn_sets
            self._data = fn() if fn is not None else None
            self._loaded = True
            if self._data is None:
                trainer.say("kNN monitor: no labelled test split, skipped")
        if self._data is None:
            return None
        bank, queries, num_classes = self._data
        cfg, device = trainer.cfg, trainer.device
        bs = max(64, cfg.batch_size // trainer.world)
        nw = cfg.data.num_workers
        backbone = trainer.method.backbone
        # A private RNG state: the monitor must not change what training draws next.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            tr_f, tr_y = extract_features(
                backbone, make_loader(bank, bs, num_workers=nw, device=device), device)
            te_f, te_y = extract_features(
                backbone, make_loader(queries, bs, num_workers=nw, device=device), device)
        res = knn_eval(tr_f, tr_y, te_f, te_y, num_classes=num_classes, k=self.k)
        return float(res["knn_top1"])


def monitors(cfg: Config) -> list[Callback]:
    """The monitors ``cfg`` asks for: the kNN probe when ``knn_every > 0``."""
    return [KNNMonitor(cfg.knn_every, cfg.knn_k)] if cfg.knn_every > 0 else []
