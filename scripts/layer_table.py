#!/usr/bin/env python
"""Accuracy and each layer's share of weights kept, per level, for one or more run directories.

    python scripts/layer_table.py RUN_DIR [RUN_DIR ...]

One markdown table per run: the level, the share of prunable weights left, the unpruned parameters as a
% of the dense real model's (levels.csv's `pct_of_real`; for a phase-A round no level has trained yet,
worked out from its masks the same way), the level's test accuracy (phase B for `protocol=paper`),
phase A's accuracy with the same masks (`protocol=paper`), and the share of each pruned layer's weights
the masks keep. A `protocol=paper` run still in phase A (or one
whose phase B stopped early) has rows for its rounds too, with phase A's accuracy only. Why: a global
magnitude ranking can empty one layer long before the model is sparse, and that layer, not the
model's sparsity, explains a level whose accuracy falls off a cliff.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from qprune.errors import QpruneError  # noqa: E402
from qprune.layer_density import density_table, layer_density  # noqa: E402
from qprune.store import RunDirectory  # noqa: E402


def _acc(value) -> str:
    return "" if value is None else f"{value:.2f}"


def pct_of_real(rows: list[dict], level: int, dense: dict) -> float | None:
    """Level ``level``'s unpruned parameters as a % of the dense real model's, from its masks (``rows``:
    layer_density's) and level 0's levels.csv row ``dense``: as the runner counts them, every parameter
    but the pruned weights (biases and norm parameters count as kept)."""
    if "params_total" not in dense or not dense.get("pct_of_real"):
        return None
    dense_real = 100 * dense["params_total"] / dense["pct_of_real"]
    pruned = sum(r["total"] - r["kept"] for r in rows if r["level"] == level)
    return 100 * (dense["params_total"] - pruned) / dense_real


def table(run_dir: Path) -> list[str]:
    """The run's markdown table (its lines)."""
    store = RunDirectory(run_dir)
    rows = layer_density(run_dir)
    layers, kept = density_table(rows)
    levels = {r["row"]["level"]: r["row"] for r in store.finished_levels()}
    lines = [f"{run_dir}:", "",
             "| level | % of prunable left | % of real | test acc | phase A test acc | "
             + " | ".join(f"{name} % kept" for name in layers) + " |",
             "| ---: | ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in layers) + " |"]
    for level in sorted(kept):
        row = levels.get(level, {})
        round_ = (store.round_result(level) or {}).get("row", {})
        left = row.get("prunable_remaining", round_.get("prunable_remaining"))
        real = row.get("pct_of_real", pct_of_real(rows, level, levels.get(0, {})))
        phase_a = round_.get("test_acc", row.get("mask_test_acc"))
        lines.append(f"| {level} | {'' if left is None else f'{100 * left:.2f}'} | {'' if real is None else f'{real:.2f}'} | "
                     f"{_acc(row.get('test_acc'))} | {_acc(phase_a)} | "
                     + " | ".join(f"{kept[level][name]:.1f}" for name in layers) + " |")
    return [*lines, ""]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    args = p.parse_args(argv)
    for run_dir in args.run_dirs:
        if not (run_dir / "run.json").is_file():
            p.error(f"{run_dir} is not a run directory (no run.json): pass a folder a qprune run wrote")
        try:
            print("\n".join(table(run_dir)))
        except QpruneError as exc:
            p.error(f"{run_dir}: {exc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
