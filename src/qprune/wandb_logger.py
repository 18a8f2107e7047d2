"""Weights & Biases: one W&B run per qprune run, as a result destination beside the local files.

W&B is a view of the results, never where they live: the run directory is written first
(``LocalFiles``), and any W&B failure — a broken install, no network, a bad key, a broken
service — turns W&B off (or offline) with one warning, never stopping training. It never
prompts: without credentials it logs offline, to be uploaded later with ``wandb sync``.
Going online is tried once per process and bounded: a reachability probe of a few seconds
and ``logger.init_timeout``; a failure sends the rest of the process's runs offline at once.

One qprune run is one W&B run, whatever the number of sessions (resumes, extensions): its W&B
id comes from the run id (and the sweep's group and the run folder's name), so online a resumed
run continues its W&B run (``resume="allow"``) and logs only the levels it lacks. Offline, each
session writes a complete copy (it re-logs the finished levels) and moves the older copies of
the same run to ``wandb/superseded/``, so ``wandb sync <run dir>/wandb/offline-run-*`` uploads
exactly one complete copy.

Every run is finished in ``finish`` (also when training raised), because a second
``wandb.init`` in the same process without it silently returns the first run: in a Hydra
multirun with the basic launcher every job would land in job 0's W&B run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import netrc
import os
import shutil
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .errors import ConfigError
from .reporting import LEVEL_COLUMNS, RunInfo, RunLogger
from .settings import run_id_of
from .training import EpochStats

log = logging.getLogger("qprune")

MODES = ("online", "offline", "disabled")
# levels.csv columns logged per level as level/<column>, plotted against level/pct_of_real
_NOTED: set[str] = set()
LEVEL_METRICS = ("level", "test_acc", "best_val_acc", "prunable_remaining", "params_nonzero", "train_loss",
                 "mask_test_acc", "random_reinit_acc", "random_prune_acc")  # the last three: protocol=paper, baselines


@dataclass(frozen=True)
class WandbSettings:
    """The ``logger`` config group (conf/logger/wandb.yaml) with ``backend: wandb``."""

    project: str = "qprune"
    entity: str | None = None
    group: str | None = None       # None: the multirun's directory name (see cli.default_group)
    job_type: str = "prune"
    name: str | None = None        # None: model-algebra-rate-seed
    tags: tuple[str, ...] = ()
    mode: str | None = None        # None: $WANDB_MODE, else online with credentials, offline without
    dir: str | None = None         # None: the run directory
    quiet: bool = True             # W&B's own console output off; qprune prints the run's address once
    init_timeout: float = 30.0     # seconds an online start may take before falling back to offline

    def __post_init__(self):
        if self.mode is not None and self.mode not in MODES:
            raise ConfigError(f"logger.mode must be one of {', '.join(MODES)} or null (auto), got {self.mode!r}")
        if not self.project:
            raise ConfigError("logger.project must name a W&B project, got an empty value")
        if isinstance(self.init_timeout, bool) or not isinstance(self.init_timeout, (int, float)) or self.init_timeout <= 0:
            raise ConfigError(f"logger.init_timeout must be a positive number of seconds, got {self.init_timeout!r}")

    @classmethod
    def from_config(cls, logger: Mapping[str, Any]) -> "WandbSettings":
        keys = {k: v for k, v in logger.items() if k != "backend"}
        keys["tags"] = tuple(keys.get("tags") or ())
        try:
            return cls(**keys)
        except TypeError as exc:
            raise ConfigError(f"logger config does not fit W&B's settings: {exc}") from None


def has_credentials(environ: Mapping[str, str] = os.environ) -> bool:
    """An API key in the environment or in ~/.netrc (where `wandb login` puts it) for the W&B host."""
    if environ.get("WANDB_API_KEY") or environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).netloc
    path = Path(environ["NETRC"]).expanduser() if environ.get("NETRC") else Path("~/.netrc").expanduser()
    try:
        entry = netrc.netrc(str(path)).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def resolve_mode(configured: str | None, environ: Mapping[str, str] = os.environ) -> tuple[str, str | None]:
    """(mode, note): the config's ``logger.mode``, else ``$WANDB_MODE``, else online when credentials
    are set up and offline otherwise. ``note`` is a line for the person when the mode was not asked for."""
    source = "logger.mode" if configured else "WANDB_MODE"
    mode = configured or environ.get("WANDB_MODE") or None
    mode = {"dryrun": "offline", "run": "online"}.get(mode, mode)  # W&B's old names
    if mode is not None and mode not in MODES:
        raise ConfigError(f"{source} must be one of {', '.join(MODES)}, got {mode!r}")
    if mode in ("disabled", "offline"):
        return mode, None
    if has_credentials(environ):
        return "online", None
    asked = f"{source}=online but no" if mode == "online" else "no"
    return "offline", (f"W&B: {asked} credentials (WANDB_API_KEY or `wandb login`), logging offline; upload later "
                       "with `wandb sync <run dir>/wandb/offline-run-*`, or turn W&B off with logger=csv")


# What went wrong with W&B in this process, remembered so that it costs one warning and one wait, not one per run.
_FAILED: dict[str, str] = {}
PROBE_SECONDS = 3.0


def forget_failures() -> None:
    """Forget a broken import or a failed online start (tests; a long-lived process after fixing the network)."""
    _FAILED.clear()


def import_wandb(results: Path):
    """The wandb module, or None after one warning per process when it cannot be imported (a broken install)."""
    if "import" in _FAILED:
        return None
    try:
        import wandb

        return wandb
    except Exception as exc:  # noqa: BLE001 - any breakage of the install, not only ImportError
        _FAILED["import"] = f"{type(exc).__name__}: {exc}"
        log.warning("W&B: `import wandb` failed (%s); W&B logging is off, the results are still written to %s "
                    "(reinstall wandb, or turn W&B off with logger=csv)", _FAILED["import"], results)
        return None


def _probe_target(environ: Mapping[str, str] = os.environ) -> tuple[str, int]:
    """The host W&B would connect to first: the HTTPS proxy when one is set, else the W&B server."""
    proxy = environ.get("HTTPS_PROXY") or environ.get("https_proxy")
    url = urlsplit(proxy or environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    return url.hostname or "api.wandb.ai", url.port or (443 if url.scheme == "https" else 80)


def online_unavailable(environ: Mapping[str, str] = os.environ) -> str | None:
    """Why going online would fail (this process failed before, or the server is unreachable), else None.

    W&B itself waits up to ``init_timeout`` and retries for a minute and a half without a network;
    a TCP connection attempt answers within a few seconds.
    """
    if "online" in _FAILED:
        return _FAILED["online"]
    host, port = _probe_target(environ)
    try:
        socket.create_connection((host, port), timeout=PROBE_SECONDS).close()
    except OSError as exc:
        _FAILED["online"] = f"cannot reach {host}:{port} ({exc.strerror or type(exc).__name__})"
        return _FAILED["online"]
    return None


def wandb_id(config: Mapping[str, Any], group: str | None, run_dir: Path) -> str:
    """A W&B run id that stays the same for every session of a qprune run: the run id (the hash of its
    identity, per trial), then a short hash of the W&B group and the run folder's name (two sweeps of the
    same runs are two groups of W&B runs)."""
    place = hashlib.sha1(json.dumps([group, Path(run_dir).name]).encode()).hexdigest()[:6]
    return f"{run_id_of(dict(config))}-{place}"


def open_run(mode: str, directory: Path, results: Path, *, quiet: bool = True, init_timeout: float = 30.0, **init):
    """``wandb.init`` in ``directory``; online failing (no network, a rejected key) falls back to
    offline. None, after one warning, when W&B cannot start at all: ``results`` are safe on disk.

    With ``id`` in ``init`` an online run resumes the W&B run of that id when it exists.
    """
    wandb = import_wandb(results)
    if wandb is None:
        return None
    directory.mkdir(parents=True, exist_ok=True)
    hint = f"upload later with `wandb sync {directory}/wandb/offline-run-*`"
    if mode == "online" and (reason := online_unavailable()) is not None:
        if not _FAILED.get("online_warned"):
            _FAILED["online_warned"] = "yes"
            log.warning("W&B: going online failed (%s); logging offline instead for this process, %s", reason, hint)
        mode = "offline"
    settings = dict(silent=quiet, init_timeout=init_timeout)
    try:
        if wandb.run is not None:  # left open by other code: wandb.init would return it instead of a new run
            wandb.run.finish()
        resume = "allow" if mode == "online" and init.get("id") else None
        return wandb.init(mode=mode, dir=str(directory), settings=wandb.Settings(**settings), resume=resume, **init)
    except Exception as exc:  # noqa: BLE001
        if mode != "online":
            _warn_failed("starting the run", exc, results)
            return None
        _FAILED["online"] = _FAILED["online_warned"] = f"{type(exc).__name__}: {exc}"
        log.warning("W&B: going online failed (%s: %s); logging offline instead for this process, %s",
                    type(exc).__name__, exc, hint)
    try:
        return wandb.init(mode="offline", dir=str(directory), settings=wandb.Settings(**settings), **init)
    except Exception as exc:  # noqa: BLE001
        _warn_failed("starting the run offline", exc, results)
        return None


def supersede_older_copies(run) -> list[Path]:
    """Offline: move the older offline copies of ``run``'s id out of the way of ``wandb sync .../offline-run-*``.

    Called once the new copy holds everything the older ones did (a resumed run re-logs its
    finished levels first), so exactly one complete copy is left to upload.
    """
    current = Path(run.dir).parent            # .../wandb/offline-run-<time>-<id>
    if not current.name.startswith("offline-run-"):
        return []
    moved = []
    for older in sorted(current.parent.glob(f"offline-run-*-{run.id}")):
        if older == current:
            continue
        target = current.parent / "superseded" / older.name
        target.parent.mkdir(exist_ok=True)
        shutil.move(str(older), str(target))
        moved.append(target)
    return moved


def _warn_failed(what: str, exc: Exception, results: Path) -> None:
    log.warning("W&B: %s failed (%s: %s); W&B logging is off for this run, the results are still written to %s",
                what, type(exc).__name__, exc, results)


class WandbLogger(RunLogger):
    """Per epoch: train loss, test/val accuracy with the level and sparsity. Per level:
    ``level/*`` against ``level/pct_of_real``. At the end: the levels table, accuracy vs % of
    real parameters, both local plots and a summary. A resumed run re-logs its finished levels,
    so each W&B run shows the whole run; a finished run started again logs nothing new."""

    def __init__(self, settings: WandbSettings, group: str | None = None):
        self.settings = settings
        self.group = settings.group or group
        self.mode, self.note = resolve_mode(settings.mode)  # a bad WANDB_MODE stops the run before any work
        self.run = None
        self.epochs_logged = 0

    # ------------------------------------------------------------------ hooks
    def start(self, info: RunInfo, finished: list[dict]) -> None:
        self.info = info
        if self.mode == "disabled":
            return
        if info.levels is not None and len(finished) >= info.levels:
            log.info("W&B: no new levels to log (a W&B run of this run exists already, or its offline files in %s/wandb)", info.run_dir)
            return
        if self.note and self.note not in _NOTED:  # once per process, not once per job of a multirun
            _NOTED.add(self.note)
            log.warning(self.note)
        self.run = self._init(info, self.mode)
        if self.run is None:
            return
        self._guard(self._define_metrics)
        logged = 0
        if getattr(self.run, "resumed", False):  # online, this run's W&B run exists: add only what it lacks
            logged = int(self.run.summary.get("levels_logged") or 0)
            self.epochs_logged = int(self.run.summary.get("epoch/step") or 0)
        for record in finished[logged:]:
            for stats in record["epochs"]:
                self.epoch(record["row"]["level"], EpochStats(**stats), record["row"])
            self.level(record, [])
        if self.run is not None and self.run.offline:
            try:
                supersede_older_copies(self.run)
            except OSError as exc:
                log.warning("W&B: could not move older offline copies of %s aside (%s); upload only the newest", self.run.id, exc)
        if self.run is not None:
            where = Path(self.run.dir).parent if self.run.offline else self.run.url
            log.info("W&B run %s%s: %s", self.run.id, " (offline)" if self.run.offline else "", where)

    def epoch(self, level: int, stats: EpochStats, level_info: dict) -> None:
        self.epochs_logged += 1
        metrics = {
            "epoch/step": self.epochs_logged, "epoch/level": level, "epoch/epoch": stats.epoch,
            "train/loss": stats.train_loss, "test/acc": stats.test_acc,
            "sparsity/pct_of_real": level_info["pct_of_real"],
            "sparsity/prunable_remaining": level_info["prunable_remaining"],
        }
        if stats.val_acc is not None:
            metrics["val/acc"] = stats.val_acc
        self._guard(lambda: self.run.log(metrics))

    def level(self, record: dict, records: list[dict]) -> None:
        row = record["row"]
        metrics = {f"level/{k}": row[k] for k in (*LEVEL_METRICS, "pct_of_real") if row.get(k) is not None}
        self._guard(lambda: self.run.log(metrics))
        # what a resumed W&B run has already (see start)
        self._guard(lambda: self.run.summary.update({"levels_logged": row["level"] + 1}))

    def finish(self, records: list[dict], error: BaseException | None) -> None:
        if self.run is None:
            return
        if records:
            self._guard(lambda: self._log_results(records, error))
        run, self.run = self.run, None
        try:
            run.finish(exit_code=0 if error is None else 1)
        except Exception as exc:  # noqa: BLE001 - W&B must not hide the run's own outcome
            log.warning("W&B: finishing the run failed (%s: %s); the results are in %s", type(exc).__name__, exc, self.info.run_dir)

    # ------------------------------------------------------------------ W&B calls
    def _init(self, info: RunInfo, mode: str):
        s = self.settings
        session = info.sessions[-1] if info.sessions else {}
        return open_run(
            mode, Path(s.dir) if s.dir else info.run_dir, info.run_dir, quiet=s.quiet, init_timeout=s.init_timeout,
            id=wandb_id(info.config, self.group, info.run_dir),
            project=s.project, entity=s.entity, group=self.group, job_type=s.job_type, name=s.name or info.name,
            tags=list(s.tags),
            config={**info.config, "params": info.counts, "data_source": info.data_source, "run_dir": str(info.run_dir),
                    "data_sizes": info.data_sizes, "session": session},
        )

    def _define_metrics(self) -> None:
        run = self.run
        run.define_metric("epoch/step")
        for name in ("epoch/level", "epoch/epoch", "train/loss", "test/acc", "val/acc",
                     "sparsity/pct_of_real", "sparsity/prunable_remaining"):
            run.define_metric(name, step_metric="epoch/step")
        run.define_metric("level/pct_of_real")
        for name in LEVEL_METRICS:
            run.define_metric(f"level/{name}", step_metric="level/pct_of_real")

    def _log_results(self, records: list[dict], error: BaseException | None) -> None:
        wandb = import_wandb(self.info.run_dir)

        rows = [r["row"] for r in records]
        table = wandb.Table(columns=list(LEVEL_COLUMNS), data=[[row.get(c) for c in LEVEL_COLUMNS] for row in rows])
        results: dict[str, Any] = {
            "levels": table,
            "accuracy_vs_sparsity": wandb.plot.line(table, "pct_of_real", "test_acc", title=f"{self.info.title}: test accuracy vs % of real parameters"),
        }
        for plot in ("accuracy_vs_sparsity", "training_curves", "layer_density"):
            path = self.info.run_dir / f"{plot}.png"
            if path.is_file():
                results[f"plots/{plot}"] = wandb.Image(str(path))
        self.run.log(results)
        dense, last = rows[0], rows[-1]
        self.run.summary.update({
            "levels_finished": len(rows), "dense_test_acc": dense["test_acc"], "final_test_acc": last["test_acc"],
            "final_pct_of_real": last["pct_of_real"], "final_prunable_remaining": last["prunable_remaining"],
            "best_test_acc": max(r["test_acc"] for r in rows), "run_dir": str(self.info.run_dir),
            "status": "finished" if error is None else f"failed: {type(error).__name__}",
        })

    def _guard(self, call) -> None:
        """Run a W&B call; on failure warn once and stop logging to W&B (the local files go on)."""
        if self.run is None:
            return
        try:
            call()
        except Exception as exc:  # noqa: BLE001
            _warn_failed("logging", exc, self.info.run_dir)
            run, self.run = self.run, None
            try:
                run.finish(exit_code=1)
            except Exception:  # noqa: BLE001 - already reported
                pass

