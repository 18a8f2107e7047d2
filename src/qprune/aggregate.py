"""A sweep's results in one table and one figure: every run's levels, and mean ± std over seeds.

Runs are found by their ``levels.csv`` anywhere under the given folders (a Hydra multirun's
job directories, or several runs per job); each run's resolved config comes from the
``levels.json`` beside it. Runs whose identity differs only in ``seed`` form one curve; the
curves are told apart by the identity keys that differ between them (the algebra, the model,
a pruning rate...). Written into the output folder:

    sweep.csv                  every run's levels.csv rows, with the run's folder and config keys
    sweep_mean.csv             per curve and level: runs, mean % of real parameters, test accuracy mean/std
    accuracy_vs_sparsity.png   test accuracy against % of the real model's parameters, mean ± std bands

Used at the end of a multirun (``AggregateSweep``, a Hydra callback in conf/config.yaml) and
by ``scripts/aggregate.py DIR...`` for finished sweeps.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import os
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from .algebra import Algebra
from .errors import DataError, QpruneError
from .reporting import EXTRA_CURVES, LEVEL_COLUMNS, pyplot, percent_of_real_axis, read_levels_csv, save_figure
from .settings import flatten, run_identity
from .store import atomic_write_text

log = logging.getLogger("qprune")

RUN_KEYS = ("model.name", "algebra.name", "dataset.name")   # always columns of the tables
ALGEBRA_ORDER = ("real3", "real4", "complex", "quat", "phm")
# one colour per algebra in every figure (real3, real4 and quat keep the colours of the first figures)
ALGEBRA_COLOURS = {"real3": "C0", "real4": "C1", "quat": "C2", "complex": "C3", "phm2": "C4", "phm3": "C5",
                   "phm4": "C6", "phm4q": "C9"}
ACCURACIES = ("test_acc", "best_val_acc", *EXTRA_CURVES)
# drawn beside each curve in the ticket's colour (phase A's own accuracy would crowd a sweep's figure)
BASELINE_STYLES = {k: v for k, v in EXTRA_CURVES.items() if k != "mask_test_acc"}
MEAN_COLUMNS = ("level", "runs", "prunable_remaining", "pct_of_real",
                *(f"{name}_{stat}" for name in ACCURACIES for stat in ("mean", "std")))


@dataclass
class SweepRun:
    path: Path
    config: dict
    rows: list[dict]
    data_sizes: dict = field(default_factory=dict)   # images per split (levels.json; older runs lack it)

    @property
    def identity(self) -> dict[str, Any]:
        return run_identity(self.config)


@dataclass
class Curve:
    """Runs that differ only in their seed, and their per-level mean and std."""

    key: dict[str, Any]            # RUN_KEYS and the identity keys shown to tell curves apart
    label: str
    runs: list[SweepRun]
    points: list[dict] = field(default_factory=list)


def find_runs(roots: Sequence[Path]) -> list[SweepRun]:
    """Every finished-or-partial run (a levels.csv with its levels.json) under ``roots``."""
    runs: dict[str, SweepRun] = {}
    duplicates: list[tuple[SweepRun, SweepRun]] = []
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"{root} is not a folder: pass the sweep's folder (outputs/multirun/<date>)")
        for csv_path in sorted(root.rglob("levels.csv")):
            json_path = csv_path.with_name("levels.json")
            if not json_path.is_file():
                log.warning("skipping %s: no levels.json beside it (the run's config)", csv_path.parent)
                continue
            meta = json.loads(json_path.read_text())
            run = SweepRun(csv_path.parent, meta["config"], read_levels_csv(csv_path), meta.get("data_sizes") or {})
            if not run.rows:
                continue
            # the same run twice (a folder given twice, a copy): keep the one with more levels
            fingerprint = json.dumps(run.identity, sort_keys=True, default=str)
            if fingerprint in runs:
                duplicates.append((runs[fingerprint], run))
                run = max(runs[fingerprint], run, key=lambda r: len(r.rows))
            runs[fingerprint] = run
    if not runs:
        raise DataError(f"no runs (levels.csv with levels.json) under {', '.join(map(str, roots))}")
    if duplicates:
        first, second = duplicates[0]
        log.warning("%d run(s) found twice (the same identity, e.g. %s and %s); each counted once, with its copy "
                    "that has the most levels", len(duplicates), first.path, second.path)
    return list(runs.values())


def curve_keys(runs: Sequence[SweepRun]) -> tuple[list[str], list[str]]:
    """(varying, shown): the identity keys whose values differ between runs, other than the seed,
    and those of them that tell curves apart for a person — a key that follows from the others
    (conv6's ``model.plan`` and ``train.epochs`` from ``model.name``) is not shown."""
    identities = [r.identity for r in runs]

    def values(i: dict, keys: Sequence[str]) -> str:
        return json.dumps([i.get(k) for k in keys], default=str)

    keys = sorted(set().union(*identities) - {"seed"})
    varying = [k for k in keys if len({values(i, [k]) for i in identities}) > 1]
    shown: list[str] = []
    for k in [*(k for k in RUN_KEYS if k in varying), *(k for k in varying if k not in RUN_KEYS)]:
        seen: dict[str, str] = {}
        if any(seen.setdefault(values(i, shown), values(i, [k])) != values(i, [k]) for i in identities):
            shown.append(k)
    return varying, shown


def _label(key: dict[str, Any], varying: Sequence[str]) -> str:
    """``quat``, ``conv4 quat``, ``prune.rate=0.1``; an algebra's own options without their prefix
    (``phm n=4 rules=quaternion``) and keys that do not apply to a curve (null) left out."""
    parts = [str(key[k]) if k.endswith(".name") else f"{k.removeprefix('algebra.')}={_compact(key[k])}"
             for k in varying if key[k] is not None]
    return " ".join(parts) or str(key["algebra.name"])


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":")) if isinstance(value, (list, dict)) else f"{value:g}" if isinstance(value, float) else str(value)


def _sort_key(curve: Curve) -> tuple:
    algebra = curve.key["algebra.name"]
    order = ALGEBRA_ORDER.index(algebra) if algebra in ALGEBRA_ORDER else len(ALGEBRA_ORDER)
    return (str(curve.key["model.name"]), order, json.dumps(curve.key, sort_keys=True, default=str))


def mean_curves(runs: Sequence[SweepRun]) -> list[Curve]:
    """Group runs into curves and average each level over the runs that reached it."""
    varying, shown = curve_keys(runs)
    groups: dict[str, Curve] = {}
    for run in runs:
        identity = run.identity
        name = json.dumps([identity.get(k) for k in varying], default=str)
        key = {k: identity.get(k) for k in (*RUN_KEYS, *shown)}
        groups.setdefault(name, Curve(key, _label(key, shown), [])).runs.append(run)
    curves = sorted(groups.values(), key=_sort_key)
    for curve in curves:
        levels = sorted({row["level"] for run in curve.runs for row in run.rows})
        for level in levels:
            rows = [row for run in curve.runs for row in run.rows if row["level"] == level]
            curve.points.append({
                "level": level, "runs": len(rows),
                "prunable_remaining": round(statistics.fmean(r["prunable_remaining"] for r in rows), 6),
                "pct_of_real": round(statistics.fmean(r["pct_of_real"] for r in rows), 4),
                **{k: v for name in ACCURACIES for k, v in _mean_std(name, [r.get(name) for r in rows]).items()},
            })
    return curves


def study_view(curve: Curve, threshold: float = 30.0) -> list[dict]:
    """The curve as the original study's plots aggregated it: every seed cut to the shortest seed's
    levels, and the levels whose mean test accuracy is at or below ``threshold`` dropped.

    qprune's own points (:func:`mean_curves`) instead average each level over the seeds that reached
    it and show that count, so a seed that stopped early does not hide the others' deeper levels.
    """
    shortest = min(len(run.rows) for run in curve.runs)
    return [p for p in curve.points if p["level"] < shortest
            and p["test_acc_mean"] is not None and p["test_acc_mean"] > threshold]


# shares of the real model's parameters (%) at which reports set curves side by side
MATCH_POINTS = (50, 25, 20, 15, 10, 7, 5, 4, 3, 2, 1.5, 1, 0.7, 0.5, 0.3)


def accuracy_at(points: Sequence[dict], pct: float, key: str = "test_acc_mean") -> float | None:
    """``key`` at ``pct`` % of the real model's parameters, linear in log % between the two nearest
    levels (levels are geometric in %, so this is linear in the level); None outside the levels run."""
    xy = sorted((p["pct_of_real"], p[key]) for p in points if p.get(key) is not None)
    for (x0, y0), (x1, y1) in zip(xy, xy[1:]):
        if x0 <= pct <= x1:
            t = 0.0 if x1 == x0 else (math.log(pct) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + t * (y1 - y0)
    return None


def _mean_std(name: str, values: list) -> dict:
    """Mean and sample standard deviation (n - 1); None where a value is missing or n = 1 for the std."""
    if not values or any(v is None for v in values):
        return {f"{name}_mean": None, f"{name}_std": None}
    std = statistics.stdev(values) if len(values) > 1 else None
    return {f"{name}_mean": round(statistics.fmean(values), 4), f"{name}_std": None if std is None else round(std, 4)}


SPARE_COLOURS = ("C7", "C8", "black")  # algebras without a colour of their own
# the other swept values (rate, model options, ...): line style and marker
LINE_STYLES = (("-", "o"), ("--", "s"), ("-.", "^"), (":", "D"), ((0, (5, 1, 1, 1)), "v"), ((0, (1, 3)), "P"))
ERROR_BARS_UP_TO = 3   # runs per point: with this few, error bars read better than overlapping bands


def algebra_tag(config: dict) -> str:
    """``real3``, ``quat``, ``phm4``, ``phm4q``: :attr:`qprune.algebra.Algebra.tag` of a run's config."""
    algebra = config.get("algebra") or {}
    known = {f.name for f in fields(Algebra)}
    try:
        return Algebra(**{k: v for k, v in algebra.items() if k in known}).tag
    except QpruneError:   # a config this version cannot read: its name will do
        return str(algebra.get("name"))


def algebra_colours(algebras) -> dict[str, str]:
    """Each algebra tag (:func:`algebra_tag`) its colour, the same in every figure; others the next spare one."""
    spare = iter(SPARE_COLOURS)
    return {a: ALGEBRA_COLOURS.get(a) or next(spare, "black") for a in dict.fromkeys(algebras)}


def panels(curves: Sequence[Curve]) -> list[tuple[str, list[Curve]]]:
    """One panel per model and dataset: curves of unrelated experiments never share an axis."""
    grouped: dict[tuple[str, str], list[Curve]] = {}
    for curve in curves:
        grouped.setdefault((str(curve.key["model.name"]), str(curve.key["dataset.name"])), []).append(curve)
    return [(f"{model} on {dataset}", cs) for (model, dataset), cs in sorted(grouped.items())]


def _panel_keys(curves: Sequence[Curve]) -> list[str]:
    """The keys that tell this panel's curves apart (the algebra first)."""
    keys = [k for k in curves[0].key if k not in ("model.name", "dataset.name")]
    varying = [k for k in keys if len({json.dumps(c.key.get(k), default=str) for c in curves}) > 1]
    return ["algebra.name", *(k for k in varying if k != "algebra.name")]


def _panel_label(curve: Curve, keys: Sequence[str]) -> str:
    return " ".join(str(curve.key[k]) if k.endswith(".name") else f"{k}={_compact(curve.key.get(k))}" for k in keys)


# (algebra.init, protocol.phase_b_optimizer, protocol.stop_rule): fidelity=original and =corrected
FIDELITY_KEYS = ("algebra.init", "protocol.phase_b_optimizer", "protocol.stop_rule")
CORRECTED = ("he", "fresh", "two_below")
FIDELITY = {("study", "carry", "study"): ("original", "the original code's choices"),
            CORRECTED: ("corrected", "qprune's corrections")}


def fidelity_choice(config: dict) -> tuple[str, ...]:
    """A run's (init, phase-B optimizer, stop rule); a key absent or null is qprune's default."""
    flat = flatten(config)
    return tuple(flat.get(key) or default for key, default in zip(FIDELITY_KEYS, CORRECTED))


def schedule_caption(runs: Sequence[SweepRun]) -> str:
    """The schedule the panel's numbers come from, so a short test run never passes for a result."""
    flat = [flatten(r.config) for r in runs]

    def common(key: str):
        values = {json.dumps(f.get(key), default=str) for f in flat}
        return json.loads(values.pop()) if len(values) == 1 else "varies"

    epochs, max_steps, protocol, rate = (common(k) for k in ("train.epochs", "train.max_steps", "protocol.name", "prune.rate"))
    sizes = {r.data_sizes.get("train") for r in runs}
    if len(sizes) == 1 and None not in sizes:
        images = f"{sizes.pop():,} training images"
    else:
        subset = common("data.train_size")
        images = "the full training set" if subset is None and common("data.val_size") is None else f"data.train_size={subset}"
    parts = [f"{epochs} epoch{'s' * (epochs != 1)} per level" + (f" (at most {max_steps} steps)" if max_steps not in (None, "varies") else ""),
             images, f"protocol {protocol}"]
    if protocol == "paper":  # which of the original code's choices (docs/protocol.md)
        choices = {fidelity_choice(r.config) for r in runs}
        choice = choices.pop() if len(choices) == 1 else None
        parts[-1] += (" (fidelity choices vary)" if choice is None else f" ({FIDELITY[choice][1]})" if choice in FIDELITY
                      else " (init {}, phase-B optimizer {}, stop rule {})".format(*choice))
    if isinstance(rate, (int, float)):
        parts.append(f"{100 * rate:g}% pruned per level")
    seeds = sorted({r.config.get("seed") for r in runs}, key=str)
    return "schedule: " + ", ".join(parts) + f"; mean ± std over {len(seeds)} seed{'s' * (len(seeds) != 1)}"


def sweep_figure(curves: Sequence[Curve], title: str | None = None):
    """Mean test accuracy against mean % of real parameters: a panel per model and dataset, colour by
    algebra, line style by the other swept values, ± std as error bars (few runs) or bands."""
    import math
    import textwrap

    groups = panels(curves)
    cols = min(len(groups), 2)
    rows = math.ceil(len(groups) / cols)
    fig, axes = pyplot().subplots(rows, cols, figsize=(6.6 * cols, 4.6 * rows), dpi=120, squeeze=False)
    colours = algebra_colours(algebra_tag(c.runs[0].config) for c in curves)
    for ax, (name, panel) in zip(axes.flat, groups):
        _draw_panel(ax, panel, colours)
        ax.set_title(name, fontsize=11)
        runs = [r for c in panel for r in c.runs]
        ax.annotate(textwrap.fill(schedule_caption(runs), width=120), xy=(0, 0), xycoords="axes fraction",
                    xytext=(0, -36), textcoords="offset points", va="top", fontsize=7, color="0.3")
    for ax in list(axes.flat)[len(groups):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(textwrap.fill(title, width=int(11 * 6.6 * cols)), fontsize=11)
    fig.tight_layout()
    return fig


def _draw_panel(ax, curves: Sequence[Curve], colours: dict[str, str]) -> None:
    keys = _panel_keys(curves)
    others = list(dict.fromkeys(json.dumps([c.key.get(k) for k in keys[1:]], default=str) for c in curves))
    few = max(p["runs"] for c in curves for p in c.points) <= ERROR_BARS_UP_TO
    xs: list[float] = []
    for i, curve in enumerate(curves):
        colour = colours[algebra_tag(curve.runs[0].config)]
        style, marker = LINE_STYLES[others.index(json.dumps([curve.key.get(k) for k in keys[1:]], default=str)) % len(LINE_STYLES)]
        x = [p["pct_of_real"] for p in curve.points]
        mean = [p["test_acc_mean"] for p in curve.points]
        std = [p["test_acc_std"] for p in curve.points]
        seeds = len(curve.runs)
        label = f"{_panel_label(curve, keys)} ({seeds} run{'s' * (seeds > 1)})"
        ax.plot(x, mean, color=colour, linestyle=style, marker=marker, markersize=3.5, linewidth=1.6, label=label)
        shown = [(xi, m, s) for xi, m, s in zip(x, mean, std) if s is not None]
        if shown and few:  # nudged apart (in log x) so that the curves' bars do not hide each other
            nudge = 1.0 + 0.012 * (i - (len(curves) - 1) / 2)
            bx, bm, bs = zip(*shown)
            ax.errorbar([v * nudge for v in bx], bm, yerr=bs, fmt="none", ecolor=colour, elinewidth=0.9, capsize=2.5, alpha=0.8)
        elif shown:
            bx, bm, bs = zip(*shown)
            ax.fill_between(bx, [m - s for m, s in zip(bm, bs)], [m + s for m, s in zip(bm, bs)], color=colour, alpha=0.15, linewidth=0)
        for column, (baseline_style, what) in BASELINE_STYLES.items():  # baselines: the curve's colour, thin
            points = [(xi, p[f"{column}_mean"]) for xi, p in zip(x, curve.points) if p[f"{column}_mean"] is not None]
            if points:
                ax.plot(*zip(*points), linestyle=baseline_style, color=colour, linewidth=0.9, alpha=0.8,
                        label=f"{_panel_label(curve, keys)}: {what}")
        xs += x
    percent_of_real_axis(ax, xs)
    ax.set_ylabel("test accuracy (%)")
    ax.grid(True, which="major", alpha=0.3)
    ax.grid(True, which="minor", alpha=0.1)
    ax.legend(fontsize=8)


@dataclass
class SweepSummary:
    out_dir: Path
    runs: list[SweepRun]
    curves: list[Curve]
    columns: list[str]          # sweep_mean.csv's header
    rows: list[dict]            # sweep_mean.csv's rows

    @property
    def figure(self) -> Path:
        return self.out_dir / "accuracy_vs_sparsity.png"


def aggregate(roots: Sequence[Path], out_dir: Path) -> SweepSummary:
    """Find the runs under ``roots``, write sweep.csv, sweep_mean.csv and the figure into ``out_dir``."""
    out_dir = Path(out_dir)
    runs = find_runs([Path(r) for r in roots])
    curves = mean_curves(runs)
    _, shown = curve_keys(runs)
    config_columns = [*RUN_KEYS, *(k for k in shown if k not in RUN_KEYS)]

    all_rows = []
    for run in sorted(runs, key=lambda r: str(r.path)):
        flat = flatten(run.config)
        where = {"run": _relative(run.path, out_dir), **{k: flat.get(k) for k in config_columns}, "seed": run.config.get("seed")}
        all_rows += [{**where, **row} for row in run.rows]
    _write_csv(out_dir / "sweep.csv", ["run", *config_columns, "seed", *LEVEL_COLUMNS], all_rows)

    mean_columns = ["curve", *config_columns, "seeds", *MEAN_COLUMNS]
    mean_rows = [{"curve": c.label, **c.key, "seeds": " ".join(str(r.config.get("seed")) for r in c.runs), **p}
                 for c in curves for p in c.points]
    _write_csv(out_dir / "sweep_mean.csv", mean_columns, mean_rows)

    save_figure(sweep_figure(curves), out_dir / "accuracy_vs_sparsity.png")
    return SweepSummary(out_dir, runs, curves, mean_columns, mean_rows)


def _relative(path: Path, base: Path) -> str:
    try:
        return os.path.relpath(path, base) if path.resolve().is_relative_to(base.resolve()) else str(path)
    except ValueError:  # another drive
        return str(path)


def _write_csv(path: Path, columns: Sequence[str], rows: Sequence[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(row.get(k)) for k in columns})
    atomic_write_text(path, buffer.getvalue())


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    return json.dumps(value, separators=(",", ":")) if isinstance(value, (list, dict)) else value


def log_to_wandb(summary: SweepSummary, logger: dict | None, group: str | None) -> None:
    """A summary run (job_type ``aggregate``) in the sweep's W&B group: the mean table and figure."""
    if (logger or {}).get("backend") != "wandb":
        return
    import hashlib

    from .wandb_logger import WandbSettings, import_wandb, open_run, resolve_mode, supersede_older_copies

    settings = WandbSettings.from_config(logger)
    mode, _ = resolve_mode(settings.mode)
    if mode == "disabled":
        return
    group = settings.group or group
    # one summary run per sweep folder: a resumed sweep updates it (online) or replaces its offline copy
    run_id = "summary-" + hashlib.sha1(json.dumps([group, summary.out_dir.resolve().name]).encode()).hexdigest()[:10]
    run = open_run(mode, summary.out_dir, summary.out_dir, quiet=settings.quiet, init_timeout=settings.init_timeout,
                   id=run_id, project=settings.project, entity=settings.entity,
                   group=group, job_type="aggregate", name=f"{group or 'sweep'}-summary", tags=list(settings.tags),
                   config={"sweep_dir": str(summary.out_dir), "runs": [str(r.path) for r in summary.runs],
                           "curves": [c.label for c in summary.curves]})
    if run is None:
        return
    try:
        wandb = import_wandb(summary.out_dir)
        if run.offline:
            supersede_older_copies(run)
        log.info("W&B sweep summary run %s%s: %s", run.id, " (offline)" if run.offline else "",
                 Path(run.dir).parent if run.offline else run.url)
        table = wandb.Table(columns=summary.columns, data=[[_cell(r.get(c)) for c in summary.columns] for r in summary.rows])
        run.log({
            "sweep_mean": table,
            "accuracy_vs_sparsity": wandb.plot.line_series(
                xs=[[p["pct_of_real"] for p in c.points] for c in summary.curves],
                ys=[[p["test_acc_mean"] for p in c.points] for c in summary.curves],
                keys=[c.label for c in summary.curves], title="mean test accuracy vs % of real parameters",
                xname="% of real parameters"),
            "plots/accuracy_vs_sparsity": wandb.Image(str(summary.figure)),
        })
        run.finish()
    except Exception as exc:  # noqa: BLE001 - the sweep's files are written already
        log.warning("W&B: logging the sweep summary failed (%s: %s); the sweep's files are in %s",
                    type(exc).__name__, exc, summary.out_dir)
        run.finish(exit_code=1)


class AggregateSweep(Callback):
    """Hydra callback: the sweep's table and figure after every job (a sweep stopped half-way still
    has them) and at the end, when the summary also goes to W&B."""

    def on_job_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        if config.hydra.mode == RunMode.MULTIRUN:
            self._aggregate(Path(str(config.hydra.sweep.dir)), first_jobs=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        summary = self._aggregate(sweep_dir)
        if summary is None:
            return
        log.info("sweep: %d runs, %d curves -> %s", len(summary.runs), len(summary.curves), summary.figure)
        from .cli import default_group

        try:
            logger = OmegaConf.to_container(config.logger, resolve=True) if "logger" in config else None
            log_to_wandb(summary, logger, default_group(config.hydra))
        except QpruneError as exc:
            log.warning("W&B: the sweep summary was not logged: %s", exc)

    @staticmethod
    def _aggregate(sweep_dir: Path, first_jobs: bool = False) -> SweepSummary | None:
        try:
            return aggregate([sweep_dir], sweep_dir)
        except Exception as exc:  # noqa: BLE001 - a summary must never fail the sweep
            if not (first_jobs and isinstance(exc, DataError)):  # (no runs yet: the first jobs failed)
                log.warning("sweep aggregation of %s failed (%s: %s); rerun it with scripts/aggregate.py %s",
                            sweep_dir, type(exc).__name__, exc, sweep_dir)
            return None


SWEEP_MARKER = "multirun.yaml"   # what Hydra writes into a sweep's directory


def is_sweep_dir(path: Path) -> bool:
    """A Hydra multirun's directory: the one kind of folder the aggregation writes into unasked."""
    return (Path(path) / SWEEP_MARKER).is_file()


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aggregate.py", description="Collect the runs under DIR... into sweep.csv, sweep_mean.csv and accuracy_vs_sparsity.png.")
    parser.add_argument("dirs", nargs="+", type=Path, metavar="DIR", help="sweep folders (searched recursively for levels.csv)")
    parser.add_argument("--out", type=Path, help="where to write (default: DIR, when it is one sweep's directory)")
    parser.add_argument("--wandb", action="store_true", help="also log a summary run to W&B (with the runs' own logger config)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = arguments().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.out is None and len(args.dirs) > 1:
            raise DataError("several DIRs: pass --out to say where the sweep's table and figure go")
        if args.out is None and not is_sweep_dir(args.dirs[0]):
            raise DataError(f"{args.dirs[0]} is not a sweep's directory (no {SWEEP_MARKER} from Hydra's -m in it): "
                            "pass --out to say where the table and figure go")
        out = args.out or args.dirs[0]
        summary = aggregate(args.dirs, out)
        if args.wandb:
            log_to_wandb(summary, summary.runs[0].config.get("logger"), Path(out).resolve().name)
    except QpruneError as exc:
        print(f"aggregate: error: {exc}", file=sys.stderr)
        return 2
    for curve in summary.curves:
        last = curve.points[-1]
        std = "" if last["test_acc_std"] is None else f" ± {last['test_acc_std']:.2f}"
        print(f"{curve.label}: {len(curve.runs)} runs, {len(curve.points)} levels; at {last['pct_of_real']:.3g}% of real "
              f"parameters {last['test_acc_mean']:.2f}%{std}")
    print(f"wrote {out / 'sweep.csv'}, {out / 'sweep_mean.csv'}, {summary.figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
