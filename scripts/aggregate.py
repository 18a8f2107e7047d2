#!/usr/bin/env python
"""Aggregate finished sweeps: scripts/aggregate.py DIR... [--out OUT] [--wandb]

Collects every run under DIR... (each levels.csv, searched recursively) into sweep.csv,
sweep_mean.csv (mean ± std over seeds) and accuracy_vs_sparsity.png; see qprune/aggregate.py.
"""

import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
if (SRC / "qprune").is_dir():  # a source checkout: use its code
    sys.path.insert(0, str(SRC))

from qprune.aggregate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
