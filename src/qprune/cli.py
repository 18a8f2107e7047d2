"""The Hydra entry point: compose the config, validate it, hand it to the level runner.

``python -m qprune model=conv4 algebra=quat prune.rate=0.2`` — conf/ is found next to the
package (installed wheel: ``qprune/conf``) or at the top of a source checkout.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from .errors import ConfigError, QpruneError, RunDirectoryBusy
from .reporting import RunLogger
from .settings import Settings, run_id_of

log = logging.getLogger("qprune")


def config_dir() -> Path:
    """conf/ inside the installed package, else the source checkout's top-level conf/."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parents[1] / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise RuntimeError(f"qprune's conf/ was not found next to {here}: reinstall the package")


def run_id(*, _root_: DictConfig) -> str:
    """Short hash of the run's identity, so the same command lands in (and resumes) the same directory."""
    job = OmegaConf.masked_copy(_root_, [k for k in _root_ if k != "hydra"])  # hydra.* refers back here
    return run_id_of(OmegaConf.to_container(job, resolve=True))


OmegaConf.register_new_resolver("qprune.run_id", run_id, replace=True)

LOGGER_BACKENDS = ("wandb", "csv")


def default_group(hydra_cfg: DictConfig) -> str | None:
    """W&B group: the multirun's directory name (every job of a sweep in one group), else the experiment's name."""
    if hydra_cfg.mode == RunMode.MULTIRUN:
        return Path(str(hydra_cfg.sweep.dir)).name
    return hydra_cfg.runtime.choices.get("experiment")


def make_loggers(logger: dict | None, group: str | None) -> list[RunLogger]:
    """The ``logger`` config group's destinations, besides the local files (always written)."""
    backend = (logger or {}).get("backend", "csv")
    if backend == "csv":
        return []
    if backend == "wandb":
        from .wandb_logger import WandbLogger, WandbSettings

        return [WandbLogger(WandbSettings.from_config(logger), group)]
    raise ConfigError(f"logger.backend must be one of {', '.join(LOGGER_BACKENDS)}, got {backend!r}")


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
def _main(cfg: DictConfig) -> None:
    from .runner import LevelRunner  # after Hydra has set up logging

    guard_log_files()
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        settings = Settings.from_config(cfg)
        config = OmegaConf.to_container(cfg, resolve=True)
        group = default_group(hydra_cfg)
        # a logger follows one run: with trials=K each run (trial_<k>/) gets its own
        LevelRunner(settings, run_dir, config, lambda _trial: make_loggers(config.get("logger"), group)).run()
        log.info("results in %s", run_dir)
    except QpruneError as exc:
        if isinstance(exc, RunDirectoryBusy) and hydra_cfg.mode == RunMode.MULTIRUN:
            log.warning("skipped this job: %s", exc)  # the other process is running it
            return
        print(f"qprune: error: {exc}", file=sys.stderr)
        if hydra_cfg.mode == RunMode.MULTIRUN:
            _log_to_file(f"qprune: error: {exc}")
            raise  # Hydra records the failed job, runs the others and reports it at the end
        if isinstance(exc, RunDirectoryBusy) or not _remove_if_fresh(run_dir):
            _log_to_file(f"qprune: error: {exc}")
        sys.exit(2)


def guard_log_files(logger: logging.Logger | None = None) -> None:
    """A log file that cannot be written (a full disk) costs one warning line, not the run.

    Python's logging prints "--- Logging error ---" with a traceback for every record it cannot
    write; the run itself does not need the log (levels.csv and the checkpoints are what resume
    reads), so the first failure silences the file handler (raised above every level: removing it
    while logging iterates its handlers would skip the next one) and says so once.
    """
    root = logger or logging.getLogger()
    for handler in root.handlers:
        if isinstance(handler, logging.FileHandler):
            def handle_error(record, handler=handler):
                exc = sys.exc_info()[1]
                handler.setLevel(logging.CRITICAL + 1)
                try:
                    handler.close()
                except OSError:
                    pass
                print(f"qprune: warning: cannot write the log file {handler.baseFilename}: "
                      f"{getattr(exc, 'strerror', None) or exc}; the run goes on without it", file=sys.stderr)
            handler.handleError = handle_error


def _log_to_file(message: str) -> None:
    """The error in the run's log file too (the console has it already, once)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.emit(logging.LogRecord("qprune", logging.ERROR, __file__, 0, message, None, None))


def _remove_if_fresh(run_dir: Path) -> bool:
    """Remove what Hydra and the run lock made for a run that never started (no run.json): ``.hydra/``,
    the log, ``run.lock``, then empty folders up to (not including) the working directory.

    A command that fails before its run starts (missing data, say) then leaves nothing behind. The
    folder is left alone while another process holds its lock (it may be starting the same run).
    """
    if (run_dir / "run.json").exists() or not run_dir.is_dir():
        return False
    import shutil

    from .store import RunDirectory

    try:
        with RunDirectory(run_dir).lock():   # unlinked while held: no other process can hold this lock file
            if (run_dir / "run.json").exists():
                return False
            for handler in logging.getLogger().handlers:
                if isinstance(handler, logging.FileHandler):
                    handler.close()
            shutil.rmtree(run_dir / ".hydra", ignore_errors=True)
            for leftover in (*run_dir.glob("*.log"), run_dir / "run.lock"):
                leftover.unlink(missing_ok=True)
    except (OSError, QpruneError):   # busy (another process), or not writable
        return False
    cwd = Path.cwd().resolve()
    folder = run_dir.resolve()
    while folder != cwd and not any(folder.iterdir()):
        folder.rmdir()
        if not folder.parent.is_relative_to(cwd) or folder.parent == cwd:
            break
        folder = folder.parent
    return True


def main() -> None:
    from .preflight import preflight

    preflight(sys.argv[1:])  # a bad command stops here, before Hydra makes a run directory
    try:
        _main()
    except KeyboardInterrupt as exc:  # Ctrl-C: finished levels are on disk, so one line instead of a traceback
        print(f"qprune: {exc or 'interrupted'}; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
