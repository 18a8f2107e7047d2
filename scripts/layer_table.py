#!/usr/bin/env python
"""Accuracy and each layer's share of weights kept, per level, for one or more run directories.

    python scripts/layer_table.py RUN_DIR [RUN_DIR ...]

One markdown table per run: the level, the share of prunable weights left, the level's test accuracy
(phase B for `protocol=paper`), phase A's accuracy with the same masks (`protocol=paper`), and the
share of each pruned layer's weights the masks keep. A `protocol=paper` run still in phase A (or one
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


def table(run_dir: Path) -> list[str]:
    """The run's markdown table (its lines)."""
    store = RunDirectory(run_dir)
    layers, kept = density_table(layer_density(run_dir))
    levels = {r["row"]["level"]: r["row"] for r in store.finished_levels()}
    lines = [f"{run_dir}:", "",
             "| level | % of prunable left | test acc | phase A test acc | " + " | ".join(f"{name} % kept" for name in layers) + " |",
             "| ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in layers) + " |"]
    for level in sorted(kept):
        row = levels.get(level, {})
        round_ = (store.round_result(level) or {}).get("row", {})
        left = row.get("prunable_remaining", round_.get("prunable_remaining"))
        phase_a = round_.get("test_acc", row.get("mask_test_acc"))
        lines.append(f"| {level} | {'' if left is None else f'{100 * left:.2f}'} | {_acc(row.get('test_acc'))} | "
                     f"{_acc(phase_a)} | " + " | ".join(f"{kept[level][name]:.1f}" for name in layers) + " |")
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
