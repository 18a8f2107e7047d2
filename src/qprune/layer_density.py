"""Which layers the masks keep: the share of each layer's weights left at every level.

A global magnitude ranking pools all layers, so a network can be "3% of the real model" while one
layer (often the small real output layer of a quaternion network) is nearly gone — the likeliest
reason a level's accuracy falls off a cliff. The numbers come from the masks on disk, so they can
be read from any run directory, finished or not, old or new.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

from .files import atomic_write_text
from .store import RunDirectory

COLUMNS = ("level", "layer", "kept", "total", "pct_kept")


def _levels_on_disk(store: RunDirectory) -> list[int]:
    """Levels with masks: finished levels, then (``protocol=paper``) phase-A rounds no level has used yet."""
    return list(range(max(store.finished_level_count(), store.finished_rounds())))


def layer_density(run_dir: Path) -> list[dict]:
    """One row per level and pruned layer: weights kept, the layer's weights, % kept (masks from disk).

    Level L of ``protocol=paper`` uses phase A's round-L masks, so a run still in phase A already
    has rows for the rounds it has made.
    """
    store = RunDirectory(Path(run_dir))
    rows = []
    for level in _levels_on_disk(store):
        for name, mask in store.trained_masks(level).items():
            kept, total = int(mask.sum()), mask.numel()
            rows.append({"level": level, "layer": name.removesuffix(".weight"), "kept": kept, "total": total,
                         "pct_kept": round(100 * kept / total, 3)})
    return rows


def write_layer_density_csv(rows: Sequence[dict], path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def density_table(rows: Sequence[dict]) -> tuple[list[str], dict[int, dict[str, float]]]:
    """Layers in network order and {level: {layer: % kept}}: the shape a table or a plot wants."""
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    table: dict[int, dict[str, float]] = {}
    for r in rows:
        table.setdefault(r["level"], {})[r["layer"]] = r["pct_kept"]
    return layers, table

