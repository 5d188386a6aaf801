"""Fault injection for the reliability tests; the library itself has no test hooks.

``$S2BNN_FAULT=POINT[:FILE]:N`` makes the N-th matching event of the process fail:

* ``kill-step:N`` -- SIGKILL right after the N-th optimiser step (a training callback);
* ``kill-write:FILE:N`` -- SIGKILL half-way through writing the temporary file of the N-th atomic
  write of a file named FILE (e.g. ``last.pt``), leaving that half-written file behind;
* ``kill-rename:FILE:N`` -- SIGKILL once that temporary file is complete, before its rename;
* ``enospc:FILE:N`` -- that write fails with "No space left on device".

:func:`install` patches the process (``s2bnn.checkpoint``'s temporary-file writer and the
engine's ``train``); run as a script, ``python tests/faults.py ARGS...`` installs the fault named
by the variable and then runs ``s2bnn ARGS...`` in the same process, so the kill is as hard as
``kill -9`` (no handler, no ``finally``, no flush).
"""

from __future__ import annotations

import errno
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

FAULT_ENV = "S2BNN_FAULT"


def parse(spec: str) -> tuple[str, str, int]:
    """``POINT[:FILE]:N`` -> (point, file name or "", N)."""
    *where, nth = spec.split(":")
    point, name = where[0], (where[1] if len(where) > 1 else "")
    return point, name, int(nth)


def install(spec: str, patch: Callable[[Any, str, Any], None] = setattr) -> None:
    """Make the event ``spec`` names fail in this process (see the module doc). In a test, pass
    ``monkeypatch.setattr`` as ``patch`` so the fault is removed afterwards."""
    point, name, nth = parse(spec)
    seen = [0]

    def hit(file_name: str = "") -> bool:
        if file_name != name:
            return False
        seen[0] += 1
        return seen[0] == nth

    if point == "kill-step":
        import s2bnn.engine as engine
        from s2bnn.engine import Callback

        class KillAtStep(Callback):
            def on_step_end(self, trainer) -> None:  # type: ignore[no-untyped-def]
                if hit():
                    os.kill(os.getpid(), signal.SIGKILL)

        real_train = engine.train

        def train(cfg, *, parts=None, callbacks=()):  # type: ignore[no-untyped-def]
            return real_train(cfg, parts=parts, callbacks=[*callbacks, KillAtStep()])

        patch(engine, "train", train)  # the CLI imports it at call time
        return

    import s2bnn.checkpoint as ckpt

    real_write = ckpt._write_temp

    def write_temp(path: Path, data: bytes) -> Path:
        if not hit(path.name):
            return real_write(path, data)
        if point == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path.name)
        if point == "kill-write":
            real_write(path, data[: len(data) // 2])
        else:  # kill-rename: the whole temporary file, then no rename
            real_write(path, data)
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("unreachable")

    patch(ckpt, "_write_temp", write_temp)


if __name__ == "__main__":
    if os.environ.get(FAULT_ENV):
        install(os.environ[FAULT_ENV])
    from s2bnn.cli import main

    sys.exit(main(sys.argv[1:]))
