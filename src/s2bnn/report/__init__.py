"""Tables and plots from run dirs: ``report.md`` plus PNGs (matplotlib, Agg backend).

A *run* here is a plain dict, so the demo can pass rows that never had a run dir (raw pixels,
untrained seeds). Recognised keys, all optional except ``name``:

``name``, ``method``, ``backbone``, ``binary`` (bool or text), ``params``, ``binary_params``,
``ops``; accuracies in percent: ``knn_top1``, ``linear_top1``, ``linear_top1_sgd``,
``linear_top1_adam``, ``linear_protocol_top1``, ``finetune`` (``{"1": top1, "10": top1}``, keys
are label percentages) and ``<key>_std`` for any of them; ``metrics`` (rows of
``metrics.csv`` as dicts of floats); ``sweep`` or ``linear`` (the fast linear sweep dict with
``sgd``/``adam`` curves); ``embedding_sample`` (``{"features", "labels"}`` arrays or tensors of
test features). The dicts returned by ``s2bnn.eval.evaluate_backbone``, ``evaluate_pixels``
and ``evaluate_untrained`` can be passed as they are, with a ``name`` added.

:func:`collect_run` builds such a dict from a run dir and the ``eval_*.json`` files that
``s2bnn eval`` wrote into it.

Modules: :mod:`~s2bnn.report.collect` (run dirs -> rows), :mod:`~s2bnn.report.tables` (the
Markdown table), :mod:`~s2bnn.report.plots` and :mod:`~s2bnn.report.embed` (PNGs, PCA / t-SNE),
:mod:`~s2bnn.report.writer` (``report.md`` / ``report.json``).
"""

from __future__ import annotations

from s2bnn.report.collect import collect_run, read_metrics
from s2bnn.report.embed import embed_2d
from s2bnn.report.tables import format_table
from s2bnn.report.writer import write_report

__all__ = ["collect_run", "read_metrics", "write_report", "format_table", "embed_2d"]
