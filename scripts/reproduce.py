#!/usr/bin/env python
"""Reproduce one figure of the original study end to end: runs, aggregation, docs/results/<figure>.md/.png.

    python scripts/reproduce.py conv4_cifar10                       # the study's schedule, 5 seeds
    python scripts/reproduce.py conv4_cifar10 --seeds 0,1 --algebras real3,quat -- train.epochs=2

Each (algebra, seed) is one `python -m qprune experiment=paper/<figure> ...` run in
<work>/<figure>/<algebra>-s<seed>/: run the same command again after a crash or a time limit and
every run resumes after its last finished level (finished runs are skipped). Arguments after
`--` are passed to every run; any that changes the study's schedule marks the results
"small-scale" in the written report. `--levels real3=18,quat=12` caps the levels per algebra.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("figure", help="an experiment under conf/experiment/paper/, e.g. conv4_cifar10")
    p.add_argument("--algebras", help="comma-separated (default: the experiment's)")
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--levels", default="", help="per-algebra level caps, e.g. real3=18,quat=12")
    p.add_argument("--work", type=Path, default=Path(os.environ.get("QPRUNE_OUTPUTS", "outputs")) / "reproduce")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "results")
    p.add_argument("--name", help="file name of the report, figure and table (default: the figure's name), "
                                  "e.g. to keep another schedule's or choice's report beside it")
    p.add_argument("--label", default="", help="a line for the report (e.g. what machine, why the schedule is short)")
    p.add_argument("--aggregation", choices=("both", "mean", "study"), default="both",
                   help="mean: each level over the seeds that reached it (n shown); study: the original's plots "
                        "(every seed cut to the shortest, means <= 30%% dropped); both (default)")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    own, overrides = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    args = p.parse_args(own)
    args.overrides = overrides  # after --: config overrides for every run
    return args


def experiment_algebras(figure: str) -> list[str]:
    text = (REPO / "conf" / "experiment" / "paper" / f"{figure}.yaml").read_text()
    line = next(l for l in text.splitlines() if l.strip().startswith("algebra:"))
    return line.split(":", 1)[1].strip().split(",")


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    cpu = platform.processor() or "CPU"
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU: {cpu}, {os.cpu_count()} cores (torch {torch.__version__})"


def _shown(path: str) -> str:
    """A data path as a reader can follow it: relative to the checkout when it lies beside it."""
    try:
        return os.path.relpath(path, REPO) if Path(path).is_absolute() and Path(path).is_relative_to(REPO.parent) else path
    except ValueError:
        return path


def round_seconds(run_dir: Path, config: dict) -> float:
    """Training seconds of phase A's own rounds (round 0 is level 0's training when the epochs agree)."""
    mask_epochs = (config.get("protocol") or {}).get("mask_epochs")
    shared_round0 = mask_epochs in (None, (config.get("train") or {}).get("epochs"))
    total = 0.0
    for result in sorted(run_dir.glob("mask_rounds/round_*/result.json"))[1 if shared_round0 else 0:]:
        epochs = json.loads(result.read_text()).get("epochs") or []
        total += epochs[-1]["seconds"] if epochs else 0.0
    return total


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def choices(runs: list[dict]) -> str:
    """Which of the original code's choices the runs used (fidelity=original) and which are qprune's corrections."""
    from qprune.aggregate import FIDELITY

    def named(choice) -> str:
        return f": {FIDELITY[choice][1]} (fidelity={FIDELITY[choice][0]})" if choice in FIDELITY else ""

    return "; ".join(f"quaternion init `{i}`, phase-B optimizer `{o}`, stop rule `{r}`" + named((i, o, r))
                     for i, o, r in sorted({r["fidelity"] for r in runs}))


def report(figure: str, summary, runs: list[dict], args, wall: float) -> str:
    """docs/results/<name>.md (--name, default the figure's): how it was made, then mean ± std per level and algebra."""
    name = args.name or figure
    small = [o for o in args.overrides if not o.startswith(("logger", "progress", "data.root", "data.cache", "device"))]
    lines = [f"# {figure}: test accuracy against % of the real model's parameters", ""]
    if small or args.levels:
        lines += [f"**Small-scale run, not the study's schedule**: overrides `{' '.join(small)}`"
                  + (f", levels `{args.levels}`" if args.levels else "") + ".", ""]
    if args.label:
        lines += [args.label, ""]
    sources = sorted({r["data_source"] for r in runs})
    lines += [
        f"- command: `python scripts/reproduce.py {figure} --seeds {args.seeds}"
        + (f" --algebras {args.algebras}" if args.algebras else "") + (f" --levels {args.levels}" if args.levels else "")
        + (f" --name {args.name}" if args.name else "")
        + (f" -- {' '.join(args.overrides)}" if args.overrides else "") + "`",
        f"- protocol: `paper` (conf/experiment/paper/{figure}.yaml); seeds {args.seeds}; {choices(runs)}",
        f"- device: {device_name()}; date {datetime.now(timezone.utc):%Y-%m-%d}",
        f"- time: training summed over the {len(runs)} runs: {_duration(sum(r['train_seconds'] for r in runs))} for the "
        f"reported levels (phase B) + {_duration(sum(r['mask_seconds'] for r in runs))} for phase A's mask rounds "
        f"(evaluation and start-up not included); this invocation's wall time {_duration(wall)} (runs that were "
        "already finished are skipped, so a resumed figure counts only its new levels)",
        f"- data: {', '.join(_shown(s) for s in sources)}"
        + (" (the JPEG copy of CIFAR-10: absolute accuracies run a little lower than on the original images)"
           if any("jpeg" in s for s in sources) else ""),
        "", f"![{name}]({name}.png)", "",
    ]
    curves = summary.curves
    lines += ["| level | " + " | ".join(f"{c.label}: % of real | {c.label}: test acc" for c in curves) + " |",
              "| ---: | " + " | ".join("---: | ---:" for _ in curves) + " |"]
    levels = sorted({p["level"] for c in curves for p in c.points})
    for level in levels:
        cells = []
        for c in curves:
            p = next((p for p in c.points if p["level"] == level), None)
            if p is None:
                cells += ["", ""]
                continue
            std = f" ± {p['test_acc_std']:.2f}" if p["test_acc_std"] is not None else ""
            cells += [f"{p['pct_of_real']:.2f}", f"{p['test_acc_mean']:.2f}{std} (n={p['runs']})"]
        lines.append(f"| {level} | " + " | ".join(cells) + " |")
    lines += ["", "Mean ± sample std over seeds; `n` runs reached the level. Full tables: "
              f"`{name}.csv` (per level and algebra, with the phase-A accuracy `mask_test_acc`).", ""]
    if args.aggregation in ("both", "mean"):
        lines += matched_table(curves)
    if args.aggregation in ("both", "study"):
        from types import SimpleNamespace

        from qprune.aggregate import study_view

        study = [SimpleNamespace(label=c.label, points=study_view(c)) for c in curves]
        lines += ["The same comparison aggregated as the original study's plots did (every seed cut to the "
                  "shortest seed's levels, levels whose mean is at or below 30% dropped):", ""]
        lines += matched_table(study) or ["(no share of the real parameters is covered by two curves)", ""]
    lines += layer_tables(curves)
    return "\n".join(lines)


def layer_tables(curves) -> list[str]:
    """% of each layer's weights the masks keep, per algebra (its first seed): a layer nearly gone
    explains an accuracy cliff that the whole model's sparsity hides."""
    from qprune.layer_density import density_table, layer_density

    lines = ["Where the masks keep weights (% of each layer's weights kept; every run writes these per level "
             "to `layer_density.csv`):", ""]
    for curve in curves:
        run = min(curve.runs, key=lambda r: r.config.get("seed") or 0)
        layers, table = density_table(layer_density(run.path))
        pct = {row["level"]: row["pct_of_real"] for row in run.rows}
        lines += [f"{curve.label}, seed {run.config.get('seed')}:", "",
                  "| level | % of real | " + " | ".join(layers) + " |",
                  "| ---: | ---: | " + " | ".join("---:" for _ in layers) + " |"]
        for level, kept in sorted(table.items()):
            shown = f"{pct[level]:.2f}" if level in pct else "(phase A only)"
            lines.append(f"| {level} | {shown} | " + " | ".join(f"{kept[layer]:.1f}" if layer in kept else ""
                                                               for layer in layers) + " |")
        lines.append("")
    return lines


def matched_table(curves) -> list[str]:
    """Accuracy of each curve at the same % of real parameters: where the curves cross."""
    from qprune.aggregate import MATCH_POINTS, accuracy_at

    rows = []
    for pct in MATCH_POINTS:
        values = [accuracy_at(c.points, pct) for c in curves]
        if sum(v is not None for v in values) >= 2:
            rows.append((pct, values))
    if not rows:
        return []
    base = curves[0].label
    lines = ["At the same share of the real model's parameters (mean accuracy interpolated linearly in log % "
             "between the two nearest levels; only where a curve covers that share):", "",
             "| % of real | " + " | ".join(c.label for c in curves) + " | best | " +
             " | ".join(f"{c.label} − {base}" for c in curves[1:]) + " |",
             "| ---: | " + " | ".join("---:" for _ in curves) + " | --- | " + " | ".join("---:" for _ in curves[1:]) + " |"]
    for pct, values in rows:
        cells = ["" if v is None else f"{v:.2f}" for v in values]
        known = [(v, c.label) for v, c in zip(values, curves) if v is not None]
        best = max(known)[1]
        diffs = ["" if v is None or values[0] is None else f"{v - values[0]:+.2f}" for v in values[1:]]
        lines.append(f"| {pct:g} | " + " | ".join(cells) + f" | {best} | " + " | ".join(diffs) + " |")
    return [*lines, ""]


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    algebras = args.algebras.split(",") if args.algebras else experiment_algebras(args.figure)
    caps = dict(item.split("=") for item in args.levels.split(",") if item)
    work = args.work / args.figure
    start = time.time()
    runs = {(algebra, seed): work / f"{algebra}-s{seed}" for algebra in algebras for seed in args.seeds.split(",")}
    for (algebra, seed), run_dir in runs.items():
        cmd = [sys.executable, "-m", "qprune", f"experiment=paper/{args.figure}", f"algebra={algebra}",
               f"seed={seed}", f"hydra.run.dir={run_dir}", *args.overrides]
        if algebra in caps:
            cmd.append(f"prune.levels={caps[algebra]}")
        print("+", " ".join(cmd[1:]), flush=True)
        if not args.dry_run:
            subprocess.run(cmd, check=True)
    if args.dry_run:
        return 0
    sys.path.insert(0, str(REPO / "src"))
    from qprune.aggregate import aggregate, fidelity_choice

    summary = aggregate(list(runs.values()), work)  # just the runs asked for: others may share the folder
    facts = []
    for run in summary.runs:
        meta = json.loads((run.path / "levels.json").read_text())
        config = meta.get("config") or {}
        facts.append({"data_source": meta.get("data_source", "?"), "train_seconds": sum(r["train_seconds"] for r in run.rows),
                      "mask_seconds": round_seconds(run.path, config), "fidelity": fidelity_choice(config)})
    name = args.name or args.figure
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(summary.figure, args.out / f"{name}.png")
    shutil.copyfile(work / "sweep_mean.csv", args.out / f"{name}.csv")
    (args.out / f"{name}.md").write_text(report(args.figure, summary, facts, args, time.time() - start))
    print(f"wrote {args.out / name}.md, .png and .csv", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
