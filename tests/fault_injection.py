"""``python -m qprune`` with a fault at an exact point, for tests/test_faults.py.

``QPRUNE_FAULT=<SIGNAL>:<path suffix>[:after]``: the process sends itself SIGNAL (SIGKILL, SIGINT,
SIGTERM) just before — or, with ``:after``, just after — the ``os.replace`` that puts a file whose
path ends with the suffix in place (every file qprune writes goes through one). Before it, the
file's temporary copy is complete on disk, so a SIGKILL there is a kill in the middle of a save.

    QPRUNE_FAULT=SIGKILL:levels/level_01/weights.pt python tests/fault_injection.py model=... ...
"""

from __future__ import annotations

import os
import signal


def install(spec: str) -> None:
    name, suffix, *when = spec.split(":")
    sig, after = getattr(signal, name), when == ["after"]
    real_replace = os.replace
    if sig == signal.SIGINT:
        # As in a terminal: a shell that starts jobs in the background (nohup, `&` without job
        # control) leaves SIGINT ignored, and Python then installs no KeyboardInterrupt handler.
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def replace(src, dst, *args, **kwargs):
        hit = str(dst).endswith(suffix)
        if hit and not after:
            os.kill(os.getpid(), sig)
        real_replace(src, dst, *args, **kwargs)
        if hit and after:
            os.kill(os.getpid(), sig)

    os.replace = replace


if __name__ == "__main__":
    if spec := os.environ.get("QPRUNE_FAULT"):
        install(spec)
    from qprune.cli import main

    main()
