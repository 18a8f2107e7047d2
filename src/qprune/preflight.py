"""Check a command before Hydra writes anything; ``dry_run=true`` shows what it would do.

Hydra makes the run directory (``.hydra/``, the log file) before qprune sees the config, so a
bad value used to leave an empty run behind, and a mistyped key got Hydra's advice to append it
(``+prune.rat=0.2``). Here the configs Hydra will run are composed first — one per job of a
multirun, expanded as Hydra's basic sweeper does — and each is validated into
:class:`~qprune.settings.Settings`. A problem is one line naming the key and the fix
(``unknown key prune.rat; did you mean prune.rate?``), and nothing is written.
"""

from __future__ import annotations

import difflib
import json
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from .errors import ConfigError, QpruneError
from .settings import Settings, flatten, run_id_of, run_identity

# Hydra's flags that print something instead of running: nothing to check for them
INFO_FLAGS = ("help", "hydra_help", "cfg", "info", "shell_completion", "experimental_rerun", "config_path", "config_dir")


@dataclass
class Job:
    number: int | None          # the job's number in a multirun (None: a single run)
    overrides: list[str]        # what sets this job apart (a multirun's swept values), else the command line's
    config: dict                # the resolved job config (no hydra node)
    settings: Settings
    run_dir: Path
    run_id: str


@dataclass
class Plan:
    multirun: bool
    jobs: list[Job]
    sweep_dir: Path | None
    dry_run: bool


def preflight(argv: Sequence[str]) -> None:
    """Exit with one line (status 2) when the command is invalid, and after printing a dry run."""
    try:
        plan = check_command(argv)
        if plan is not None and plan.dry_run:
            print(describe(plan), flush=True)
            sys.exit(0)
    except QpruneError as exc:
        print(f"qprune: error: {exc}", file=sys.stderr)
        sys.exit(2)


def check_command(argv: Sequence[str], config_name: str = "config") -> Plan | None:
    """Compose and validate every job ``python -m qprune ARGV`` would run (None: a Hydra info command).

    Raises :class:`ConfigError` with one line; writes nothing.
    """
    from hydra._internal.utils import get_args_parser
    from hydra.types import RunMode

    args, _ = get_args_parser().parse_known_args(list(argv))
    if any(getattr(args, flag, None) for flag in INFO_FLAGS):
        return None
    name = getattr(args, "config_name", None) or config_name
    with _hydra() as hydra:
        if not args.multirun:
            cfg = _compose(hydra, name, args.overrides, RunMode.RUN)
            job = _job(cfg, None, list(args.overrides), lambda: Path(str(cfg.hydra.run.dir)))
            return Plan(False, [job], None, bool(job.config.get("dry_run")))
        master = _compose(hydra, name, args.overrides, RunMode.MULTIRUN)
        sweep_dir = Path(str(master.hydra.sweep.dir))
        hydra_overrides = list(master.hydra.overrides.hydra)
        jobs = []
        for number, overrides in enumerate(_sweep(hydra, master)):
            cfg = _compose(hydra, name, hydra_overrides + overrides, RunMode.RUN)
            with open_dict(cfg.hydra.job):
                cfg.hydra.job.num = number
            jobs.append(_job(cfg, number, overrides, lambda cfg=cfg: sweep_dir / str(cfg.hydra.sweep.subdir)))
        return Plan(True, jobs, sweep_dir, any(j.config.get("dry_run") for j in jobs))


@contextmanager
def _hydra() -> Iterator:
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from .cli import config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3", job_name="qprune"):
        yield GlobalHydra.instance().hydra


def _compose(hydra, name: str, overrides: Sequence[str], mode) -> DictConfig:
    from hydra.errors import HydraException, MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    try:
        return hydra.compose_config(name, list(overrides), run_mode=mode, from_shell=True)
    except MissingConfigException as exc:
        raise ConfigError(_missing_option(exc, overrides)) from None
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        raise ConfigError(_composition_error(exc, hydra, name, overrides)) from None


def _sweep(hydra, master: DictConfig) -> list[list[str]]:
    """Every job's overrides, as Hydra's basic sweeper will run them (the config's sweeper.params, then the command line)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from hydra.errors import HydraException

    task = list(master.hydra.overrides.task)
    if not str(master.hydra.sweeper.get("_target_", "")).endswith("BasicSweeper"):
        return [task]  # another sweeper chooses its own jobs: check the command line's config only
    params = [f"{k}={v}" for k, v in (master.hydra.sweeper.get("params") or {}).items()]
    try:
        parsed = OverridesParser.create(config_loader=hydra.config_loader).parse_overrides(params + task)
        return [job for chunk in BasicSweeper.split_arguments(parsed, None) for job in chunk]
    except (HydraException, ValueError) as exc:  # a sweep the basic sweeper cannot expand (an interval)
        raise ConfigError(_one_line(exc)) from None


def _job(cfg: DictConfig, number: int | None, overrides: list[str], run_dir_of: Callable[[], Path]) -> Job:
    """Resolve and validate one job's config."""
    from .cli import make_loggers
    from .runner import parse_step_count

    where = "" if number is None else f"job {number} ({' '.join(overrides) or 'no overrides'}): "
    try:
        job_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
        config = OmegaConf.to_container(job_cfg, resolve=True)
        settings = Settings.from_config(config)
        parse_step_count(settings.prune.rewind, 1)
        make_loggers(config.get("logger"), None)
        run_dir = run_dir_of()
    except QpruneError as exc:
        raise ConfigError(f"{where}{exc}") from None
    except Exception as exc:  # noqa: BLE001 - an interpolation that does not resolve, a value of the wrong type
        raise ConfigError(f"{where}{_one_line(exc)}") from None
    return Job(number, overrides, config, settings, run_dir, run_id_of(config))


# --------------------------------------------------------------------------- errors for people

def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return "; ".join(lines) or type(exc).__name__


def _missing_option(exc, overrides: Sequence[str]) -> str:
    """``model=conv5``: name the group's options, and the nearest one."""
    missing = getattr(exc, "missing_cfg_file", None) or ""
    options = list(getattr(exc, "options", None) or [])
    # the override that asked for it: experiment=paper/x is the file experiment/paper/x
    asked = [o.lstrip("+~").split("=", 1) for o in overrides if "=" in o]
    group, option = next(((k, v) for k, v in asked if f"{k.split('@')[0]}/{v}" == missing), (None, None))
    if group is None or not options:
        return _one_line(exc)
    folder = option.rpartition("/")[0]
    options = [f"{folder}/{o}" if folder else o for o in options]
    guess = difflib.get_close_matches(option, options, n=1)
    hint = f"; did you mean {group}={guess[0]}?" if guess else ""
    return f"{group}={option} is not an option{hint} (options: {', '.join(sorted(options))})"


_UNKNOWN_KEY = re.compile(r"Could not override '([^']+)'|Key '[^']+' is not in struct\s+full_key: (\S+)")


def _composition_error(exc, hydra, name: str, overrides: Sequence[str]) -> str:
    """A key that is not in the config: the nearest known key instead of Hydra's advice to append it."""
    from hydra.types import RunMode

    match = _UNKNOWN_KEY.search(str(exc))
    if not match:
        return _one_line(exc)
    key = match.group(1) or match.group(2)
    others = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != key]
    try:
        cfg = hydra.compose_config(name, others, run_mode=RunMode.RUN, from_shell=True)
    except Exception:  # noqa: BLE001 - another problem too: suggest from the defaults
        cfg = hydra.compose_config(name, [], run_mode=RunMode.RUN, from_shell=True)
    container = OmegaConf.to_container(cfg, resolve=False)
    keys = [k for k in flatten(container) if key.startswith("hydra.") or not k.startswith("hydra.")]
    keys += [f"{k}." for k in container if isinstance(container[k], dict)]  # a group's own name (model=...)
    guess = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if guess:
        return f"unknown key {key}; did you mean {guess[0].rstrip('.')}?"
    return f"unknown key {key}: `python -m qprune --cfg job` lists the keys (to add a key of your own: +{key}=...)"


# --------------------------------------------------------------------------- dry run

def run_dir_state(job: Job) -> str:
    """What the run directory holds: new, a run to resume (how far), a finished run, another run."""
    marker = job.run_dir / "run.json"
    if not marker.is_file():
        return "new"
    finished = 0
    while (job.run_dir / "levels" / f"level_{finished:02d}" / "result.json").is_file():
        finished += 1
    try:
        previous = json.loads(marker.read_text())["identity"]
    except (OSError, ValueError, KeyError, TypeError):
        return "holds an unreadable run.json"
    if not job.settings.resume:
        return f"holds {finished} finished levels: resume=false starts over"
    identity = run_identity(job.config)
    if previous != identity:
        changed = sorted(k for k in previous.keys() | identity.keys() if previous.get(k) != identity.get(k))
        return f"holds a different run (changed: {', '.join(changed)}): this command would be refused"
    total = job.settings.prune.levels + 1
    if finished >= total:
        return f"finished ({finished} levels): nothing to train"
    return f"holds {finished} of {total} levels: resumes at level {finished}" if finished else "new (nothing finished yet)"


def finished_levels(job: Job) -> int:
    n = 0
    if job.settings.resume and (job.run_dir / "run.json").is_file():
        while (job.run_dir / "levels" / f"level_{n:02d}" / "result.json").is_file():
            n += 1
    return n


def finished_rounds(job: Job) -> int:
    """Phase A's rounds on disk (``protocol=paper``): a resumed run does not train them again."""
    if not (job.settings.resume and (job.run_dir / "run.json").is_file()):
        return 0
    from .store import RunDirectory

    return RunDirectory(job.run_dir).finished_rounds()


def levels_line(s: Settings) -> str:
    per_type = s.prune.layer_rates and any(v is not None for v in s.prune.layer_rates.values())
    rate = "a per-layer-type share" if per_type else f"{100 * s.prune.rate:g}%"
    return (f"{s.prune.levels + 1} (level 0 dense, then {s.prune.levels} pruning {rate} of the remaining weights each); "
            f"protocol {s.protocol.name}, {s.train.epochs} epochs per level"
            + (f" (at most {s.train.max_steps} steps)" if s.train.max_steps else "")
            + (f", {s.trials} runs side by side" if s.trials > 1 else ""))


def estimate_line(job: Job, timings: dict) -> tuple[str, float | None]:
    """(text, seconds) of the remaining work; timings are shared between jobs that differ only in seed."""
    from .estimate import duration, estimate_seconds, remaining_work, split_sizes, time_steps
    from .runner import resolve_device

    s = job.settings
    sizes = split_sizes(s)
    if sizes is None:
        return "unknown (an image folder's size is known once it is read)", None
    work = remaining_work(s, sizes, finished_levels(job), finished_rounds(job))
    if work.trainings == 0:
        return "nothing left to train", 0.0
    key = json.dumps({k: v for k, v in run_identity(job.config).items() if k != "seed"}, sort_keys=True, default=str)
    if key not in timings:
        timings[key] = time_steps(s, resolve_device(s.device))
    timing = timings[key]
    seconds = estimate_seconds(work, sizes, timing)
    return (f"≈ {duration(seconds)} on {timing.device} ({work.trainings} trainings, {work.steps:,} steps at "
            f"{1000 * timing.step_seconds:.1f} ms, evaluation of {sizes.test + sizes.val:,} images after each of "
            f"{work.evaluations:,} epochs; start-up not included)"), seconds


def describe(plan: Plan) -> str:
    """The dry run's report: resolved config, where the run(s) would go, levels, estimated time."""
    from .estimate import duration

    first = plan.jobs[0]
    yaml = OmegaConf.to_yaml(OmegaConf.create(first.config)).rstrip()
    lines = ["dry run: nothing is trained or written", ""]
    timings: dict = {}
    if not plan.multirun:
        estimate, _ = estimate_line(first, timings)
        lines += ["config (resolved):", *("  " + line for line in yaml.splitlines()), "",
                  f"run directory:  {first.run_dir} ({run_dir_state(first)})",
                  f"run id:         {first.run_id}",
                  f"levels:         {levels_line(first.settings)}",
                  f"estimated time: {estimate}"]
        return "\n".join(lines)
    total, known = 0.0, True
    lines += [f"sweep directory: {plan.sweep_dir} (its time stamp is set when the sweep starts)",
              f"{len(plan.jobs)} jobs:"]
    for job in plan.jobs:
        estimate, seconds = estimate_line(job, timings)
        known &= seconds is not None
        total += seconds or 0.0
        lines.append(f"  job {job.number}: {' '.join(job.overrides) or '(no overrides)'}; run id {job.run_id}; "
                     f"{job.settings.prune.levels + 1} levels; {run_dir_state(job)}; {estimate}")
    lines += [f"estimated time, all jobs one after another: {'≈ ' + duration(total) if known else 'unknown'}", "",
              f"levels of job 0: {levels_line(first.settings)}",
              "config of job 0 (resolved):", *("  " + line for line in yaml.splitlines())]
    return "\n".join(lines)
