#!/usr/bin/env python
"""Set two results tables side by side: what moves when one choice changes.

    python scripts/compare_results.py docs/results/conv4_cifar10.csv docs/results/conv4_cifar10_original.csv \\
        --labels corrected,original --out docs/results/conv4_cifar10_fidelity

Reads two per-level tables as scripts/reproduce.py writes them (<name>.csv: one row per curve and
level, mean and sample std over the seeds) and writes <out>.md and <out>.png: every curve's accuracy
at the same shares of the real model's parameters under both, the change with its standard error,
the gap of every curve to the base curve (e.g. quat − real3) under both, and the share below which
each curve stays ahead of the base.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from qprune.aggregate import MATCH_POINTS, accuracy_at, algebra_colours  # noqa: E402
from qprune.reporting import percent_of_real_axis, pyplot, save_figure  # noqa: E402

GRID = 400  # points of the log-% grid on which the lead is traced


def read_table(path: Path) -> dict[str, list[dict]]:
    """curve label -> its points (level, pct_of_real, test_acc_mean, test_acc_std, runs), dense first."""
    curves: dict[str, list[dict]] = {}
    with open(path, newline="") as f:
        for line, row in enumerate(csv.DictReader(f), start=2):
            number = lambda key: float(row[key]) if row.get(key) not in (None, "") else None  # noqa: E731
            try:
                curves.setdefault(row["curve"], []).append({
                    "level": int(row["level"]), "pct_of_real": float(row["pct_of_real"]),
                    "test_acc_mean": number("test_acc_mean"), "test_acc_std": number("test_acc_std"),
                    "runs": int(row["runs"]), "algebra": row.get("algebra.name") or row["curve"],
                })
            except (KeyError, TypeError, ValueError) as exc:
                raise SystemExit(f"compare_results: {path} line {line}: not a table written by scripts/reproduce.py "
                                 f"({type(exc).__name__}: {exc})") from None
    if not curves:
        raise SystemExit(f"compare_results: {path} has no rows (expected a table written by scripts/reproduce.py)")
    return {label: sorted(points, key=lambda p: p["level"]) for label, points in curves.items()}


def change(a: list[dict], b: list[dict], pct: float) -> tuple[float, float | None] | None:
    """b − a at ``pct`` and its standard error sqrt(s_a²/n_a + s_b²/n_b) (None with a single seed)."""
    ya, yb = accuracy_at(a, pct), accuracy_at(b, pct)
    if ya is None or yb is None:
        return None
    sa, sb = accuracy_at(a, pct, "test_acc_std"), accuracy_at(b, pct, "test_acc_std")
    na, nb = min(p["runs"] for p in a), min(p["runs"] for p in b)
    se = None if sa is None or sb is None else math.sqrt(sa ** 2 / na + sb ** 2 / nb)
    return yb - ya, se


def common_range(*curves: list[dict]) -> tuple[float, float] | None:
    lo = max(min(p["pct_of_real"] for p in c) for c in curves)
    hi = min(max(p["pct_of_real"] for p in c) for c in curves)
    return (lo, hi) if lo < hi else None


def lead_below(base: list[dict], other: list[dict]) -> float | None:
    """The share of real parameters below which ``other`` beats ``base`` all the way down to the
    lowest share both reach (None if it does not lead there): where the curves last cross."""
    span = common_range(base, other)
    if span is None:
        return None
    lo, hi = span
    grid = [lo, *(math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * i / GRID) for i in range(1, GRID)), hi]
    gaps = [accuracy_at(other, x) - accuracy_at(base, x) for x in grid]
    if gaps[0] <= 0:
        return None
    for (x0, g0), (x1, g1) in zip(zip(grid, gaps), zip(grid[1:], gaps[1:])):
        if g1 <= 0:  # the sign changes between x0 and x1: the zero, linear in log %
            return math.exp(math.log(x0) + (math.log(x1) - math.log(x0)) * g0 / (g0 - g1))
    return hi


def _signed(value: float | None, se: float | None = None) -> str:
    if value is None:
        return ""
    return f"{value:+.2f}" + (f" ± {se:.2f}" if se is not None else "")


def _rows(cells_at) -> list[str]:
    """One table row per share of :data:`MATCH_POINTS` where ``cells_at(pct)`` has something to show."""
    rows = []
    for pct in MATCH_POINTS:
        cells = cells_at(pct)
        if any(cells):
            rows.append(f"| {pct:g} | " + " | ".join(cells) + " |")
    return rows


def report(a: dict, b: dict, labels: tuple[str, str], sources: tuple[str, str], base: str, name: str) -> str:
    la, lb = labels
    shared = [c for c in a if c in b]
    lines = [f"# {name}: {la} against {lb}", "",
             f"- {la}: `{sources[0]}`", f"- {lb}: `{sources[1]}`", "", f"![{name}]({name}.png)", "",
             "## Each curve under both", "",
             "Mean test accuracy at the same share of the real model's parameters (interpolated linearly in "
             f"log % between levels); Δ = {lb} − {la} ± its standard error over the seeds "
             "(sqrt(s₁²/n₁ + s₂²/n₂)).", "",
             "| % of real | " + " | ".join(f"{c} {la} | {c} {lb} | {c} Δ" for c in shared) + " |",
             "| ---: | " + " | ".join("---: | ---: | ---:" for _ in shared) + " |"]

    def accuracies(pct: float) -> list[str]:
        cells = []
        for c in shared:
            ya, yb, d = accuracy_at(a[c], pct), accuracy_at(b[c], pct), change(a[c], b[c], pct)
            cells += ["" if ya is None else f"{ya:.2f}", "" if yb is None else f"{yb:.2f}", _signed(*(d or (None,)))]
        return cells

    lines += _rows(accuracies)
    others = [c for c in shared if c != base]
    if base in shared and others:
        lines += ["", f"## The gap to {base}", "",
                  f"Each curve minus {base} at the same share, under {la} and {lb} (± standard error), and how much the "
                  "gap moved. \"Ahead below x%\": where the two curves last cross, traced on a fine grid.", "",
                  "| % of real | " + " | ".join(f"{c} − {base} {la} | {c} − {base} {lb} | moved" for c in others) + " |",
                  "| ---: | " + " | ".join("---: | ---: | ---:" for _ in others) + " |"]

        def gaps(pct: float) -> list[str]:
            cells = []
            for c in others:
                ga, gb = change(a[base], a[c], pct), change(b[base], b[c], pct)
                moved = None if ga is None or gb is None else (
                    gb[0] - ga[0], None if ga[1] is None or gb[1] is None else math.hypot(ga[1], gb[1]))
                cells += [_signed(*(ga or (None,))), _signed(*(gb or (None,))), _signed(*(moved or (None,)))]
            return cells

        lines += [*_rows(gaps), ""]
        for c in others:
            said = [f"ahead below {x:.2g}% of the real parameters" if x is not None
                    else "not ahead at the lowest share both reach" for x in (lead_below(t[base], t[c]) for t in (a, b))]
            lines.append(f"- {c} against {base}: {said[0]} under {la}; {said[1]} under {lb}.")
    return "\n".join(lines) + "\n"


def figure(a: dict, b: dict, labels: tuple[str, str], base: str, path: Path) -> None:
    plt = pyplot()
    shared = [c for c in a if c in b]
    colours = algebra_colours(a[c][0]["algebra"] for c in shared)
    others = [c for c in shared if c != base] if base in shared else []
    fig, axes = plt.subplots(1, 2 if others else 1, figsize=(12 if others else 6.5, 4.6), squeeze=False)
    ax = axes[0][0]
    xs = [p["pct_of_real"] for t in (a, b) for c in shared for p in t[c]]
    for c in shared:
        colour = colours.get(a[c][0]["algebra"], "black")
        for table, label, style in ((a, labels[0], "--"), (b, labels[1], "-")):
            points = [p for p in table[c] if p["test_acc_mean"] is not None]
            ax.plot([p["pct_of_real"] for p in points], [p["test_acc_mean"] for p in points], style, marker="o",
                    markersize=3, color=colour, alpha=0.55 if style == "--" else 1.0, label=f"{c} ({label})")
    percent_of_real_axis(ax, xs)
    ax.set_ylabel("test accuracy (%), mean over seeds")
    ax.set_title(f"accuracy: {labels[0]} dashed, {labels[1]} solid")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if others:
        ax = axes[0][1]
        for c in others:
            colour = colours.get(a[c][0]["algebra"], "black")
            for table, label, style in ((a, labels[0], "--"), (b, labels[1], "-")):
                span = common_range(table[base], table[c])
                if span is None:
                    continue
                grid = sorted({p["pct_of_real"] for p in table[base] + table[c] if span[0] <= p["pct_of_real"] <= span[1]})
                ax.plot(grid, [accuracy_at(table[c], x) - accuracy_at(table[base], x) for x in grid], style,
                        marker="o", markersize=3, color=colour, alpha=0.55 if style == "--" else 1.0,
                        label=f"{c} − {base} ({label})")
        ax.axhline(0, color="black", linewidth=0.8)
        percent_of_real_axis(ax, xs)
        ax.set_ylabel(f"accuracy minus {base} (points)")
        ax.set_title(f"the gap to {base} at the same share of parameters")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("first", type=Path, help="the reference table (<name>.csv from scripts/reproduce.py)")
    p.add_argument("second", type=Path, help="the table to compare with it")
    p.add_argument("--labels", default="first,second", help="two names for the tables, comma-separated")
    p.add_argument("--base", default="real3", help="the curve the others' gaps are measured from")
    p.add_argument("--out", type=Path, required=True, help="writes OUT.md and OUT.png")
    args = p.parse_args(argv)
    labels = tuple(args.labels.split(","))
    if len(labels) != 2:
        p.error(f"--labels needs two names separated by a comma, got {args.labels!r}")
    for path in (args.first, args.second):
        if not path.is_file():
            p.error(f"{path} does not exist (give the .csv that scripts/reproduce.py wrote)")
    a, b = read_table(args.first), read_table(args.second)
    if not set(a) & set(b):
        p.error(f"the tables share no curve ({', '.join(a)} against {', '.join(b)})")
    name = args.out.name
    args.out.parent.mkdir(parents=True, exist_ok=True)
    shown = tuple(str(path.resolve().relative_to(REPO)) if path.resolve().is_relative_to(REPO) else str(path)
                  for path in (args.first, args.second))
    (args.out.parent / f"{name}.md").write_text(report(a, b, labels, shown, args.base, name))
    figure(a, b, labels, args.base, args.out.parent / f"{name}.png")
    print(f"wrote {args.out}.md and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
