"""The per-run plots: training curves show every level's test accuracy per epoch."""

from __future__ import annotations

import pytest
import torch

from helpers import load_script
from qprune.layer_density import density_table, layer_density
from qprune.reporting import plot_layer_density, plot_training_curves, training_curves_figure
from qprune.store import RunDirectory


def _record(level: int, accuracies: list[float]) -> dict:
    row = {"level": level, "pct_of_real": 100 * 0.8**level}
    return {"row": row, "epochs": [{"epoch": e + 1, "test_acc": a} for e, a in enumerate(accuracies)]}


def test_training_curves_have_one_line_per_level_with_its_epochs(tmp_path):
    records = [_record(0, [90.0, 95.0, 96.0]), _record(1, [91.0, 95.5, 96.5]), _record(2, [85.0, 93.0])]
    ax = training_curves_figure(records, "t").axes[0]
    assert [list(line.get_xdata()) for line in ax.lines] == [[1, 2, 3], [1, 2, 3], [1, 2]]
    assert [list(line.get_ydata()) for line in ax.lines] == [[90.0, 95.0, 96.0], [91.0, 95.5, 96.5], [85.0, 93.0]]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["0: 100%", "1: 80%", "2: 64%"]
    assert ax.lines[0].get_color() != ax.lines[2].get_color(), "levels are told apart by colour"
    plot_training_curves(records, tmp_path / "training_curves.png", "t")
    assert (tmp_path / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_training_curves_with_one_epoch_have_one_tick_and_a_visible_last_level():
    import matplotlib.colors as mcolors

    records = [_record(level, [90.0 + level]) for level in range(21)]
    ax = training_curves_figure(records, "t").axes[0]
    assert list(ax.get_xticks()) == [1] and ax.get_xlim() == (0.5, 1.5)

    def luminance(colour) -> float:   # WCAG relative luminance
        r, g, b = (c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in mcolors.to_rgb(colour))
        return 0.2126 * r + 0.7152 * g + 0.0722 * b

    contrast = 1.05 / (luminance(ax.lines[-1].get_color()) + 0.05)
    assert contrast >= 2, f"the last level's colour is too pale on white (contrast {contrast:.2f})"


def _masks(kept_a: int, kept_b: int) -> dict:
    a, b = torch.zeros(10, 10, dtype=torch.bool), torch.zeros(4, dtype=torch.bool)
    a.view(-1)[:kept_a], b[:kept_b] = True, True
    return {"fc.weight": a, "out.weight": b}


def _paper_run_in_phase_b(path):
    """Level 0 is finished; rounds 0-2 exist (round 0's masks are not level 0's here: levels must win)."""
    store = RunDirectory(path)
    # 104 prunable weights and 16 other parameters; the dense real model has 240
    store.save_level(0, _masks(100, 4), {}, {"row": {"level": 0, "prunable_remaining": 1.0, "params_nonzero": 120,
                                                     "params_total": 120, "pct_of_real": 50.0, "test_acc": 91.5,
                                                     "mask_test_acc": 91.5}, "epochs": []})
    for round_, (a, b, acc) in enumerate([(90, 4, 91.5), (60, 3, 88.25), (33, 1, 40.0)]):
        store.save_round(round_, _masks(a, b), {"weights": {}, "optimizer": {}},
                         {"row": {"round": round_, "prunable_remaining": (a + b) / 104, "test_acc": acc}})
    (path / "run.json").write_text("{}")


def test_layer_density_reads_finished_levels_then_phase_a_rounds_not_yet_used(tmp_path):
    """Rounds 1 and 2 fill in levels 1 and 2, which phase B has not trained yet."""
    _paper_run_in_phase_b(tmp_path)
    rows = layer_density(tmp_path)
    assert [(r["level"], r["layer"], r["kept"], r["total"], r["pct_kept"]) for r in rows] == [
        (0, "fc", 100, 100, 100.0), (0, "out", 4, 4, 100.0), (1, "fc", 60, 100, 60.0), (1, "out", 3, 4, 75.0),
        (2, "fc", 33, 100, 33.0), (2, "out", 1, 4, 25.0)]
    layers, table = density_table(rows)
    assert layers == ["fc", "out"] and table[2] == {"fc": 33.0, "out": 25.0}
    plot_layer_density(rows, tmp_path / "layer_density.png", "t")
    assert (tmp_path / "layer_density.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_layer_table_script_shows_both_phases_accuracy_and_each_layers_share(tmp_path, capsys):
    layer_table = load_script("layer_table")

    _paper_run_in_phase_b(tmp_path)
    assert layer_table.main([str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2] == "| level | % of prunable left | % of real | test acc | phase A test acc | fc % kept | out % kept |"
    assert lines[4:7] == ["| 0 | 100.00 | 50.00 | 91.50 | 91.50 | 100.0 | 100.0 |",
                          "| 1 | 60.58 | 32.92 |  | 88.25 | 60.0 | 75.0 |",   # 63 of 104 weights left: 79 of 240
                          "| 2 | 32.69 | 20.83 |  | 40.00 | 33.0 | 25.0 |"]   # 34 left: 50 of 240
    with pytest.raises(SystemExit):
        layer_table.main([str(tmp_path / "levels")])
    assert "is not a run directory (no run.json)" in capsys.readouterr().err
