"""A Hydra callback: check that the output folder can be written before Hydra writes into it.

Hydra creates the run directory, its ``.hydra/`` and the job's log file before qprune's code
runs, so an output folder on a read-only filesystem (or without write permission) used to end
in a logging traceback. Now a new run (or a sweep) there stops with one line naming the folder,
and a run that is already there is looked at without writing anything — Hydra's files and log
file are left out — so a finished run on a read-only filesystem still reports itself, while one
with levels left to train says in one line how to resume it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write


class CheckOutputs(Callback):
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        run_dir = _resolved(config, "hydra.run.dir")
        if run_dir is None or (problem := unwritable(run_dir)) is None:
            return
        if (run_dir / "run.json").is_file():
            with read_write(config.hydra), open_dict(config.hydra):
                config.hydra.output_subdir = None
                _console_only(config.hydra.job_logging)
            return
        _fail(f"cannot write the run directory {run_dir} ({problem}); write the outputs to a writable folder "
              "(QPRUNE_OUTPUTS=... or hydra.run.dir=...)")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = _resolved(config, "hydra.sweep.dir")
        if sweep_dir is not None and (problem := unwritable(sweep_dir)) is not None:
            _fail(f"cannot write the sweep directory {sweep_dir} ({problem}); write the outputs to a writable "
                  "folder (QPRUNE_OUTPUTS=... or hydra.sweep.dir=...)")


def unwritable(folder: Path) -> str | None:
    """Why ``folder`` (or, when it does not exist yet, the folder it would be made in) cannot be written; None if it can."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if os.access(existing, os.W_OK):
        return None
    try:
        if os.statvfs(existing).f_flag & os.ST_RDONLY:
            return "read-only file system"
    except (OSError, AttributeError):
        pass
    return "permission denied"


def _resolved(config: DictConfig, key: str) -> Path | None:
    try:
        return Path(str(OmegaConf.select(config, key))).absolute()
    except Exception:  # noqa: BLE001 - an interpolation only Hydra's job can resolve: Hydra reports it
        return None


def _console_only(job_logging: DictConfig) -> None:
    """Drop the job's file handlers (the log file cannot be written)."""
    handlers = job_logging.get("handlers") or {}
    files = [name for name, handler in handlers.items() if "filename" in (handler or {})]
    for name in files:
        del handlers[name]
    for logger in [job_logging.get("root") or {}, *(job_logging.get("loggers") or {}).values()]:
        if logger and "handlers" in logger:
            logger["handlers"] = [h for h in logger["handlers"] if h not in files]


def _fail(message: str) -> None:
    print(f"qprune: error: {message}", file=sys.stderr)
    sys.exit(2)
