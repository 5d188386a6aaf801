"""The training engine: one loop for every method (``train``), and what it is built from.

* :mod:`.loop` -- :class:`Trainer` and :func:`train`, the loop itself;
* :mod:`.build` -- :class:`Parts` and :func:`build_parts`: data, model and method builders;
* :mod:`.sizing` -- steps from ``epochs``, ``steps`` or a measured ``time_budget``;
* :mod:`.state` -- the checkpoint schema, RNG discipline and position in the data;
* :mod:`.callbacks` -- what watches a run (metrics log, progress bar, monitors);
* :mod:`.ddp`, :mod:`.optim`, :mod:`.rundir` -- DDP, optimisers and schedules, run-dir rules.

The engine imports nothing above it: evaluation monitors are callbacks the caller hands in.
"""

from s2bnn.engine.build import Parts, backbone_kwargs, build_parts
from s2bnn.engine.callbacks import Callback
from s2bnn.engine.loop import Trainer, train

__all__ = ["Callback", "Parts", "Trainer", "backbone_kwargs", "build_parts", "train"]
