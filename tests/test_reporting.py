"""The per-run plots: training curves show every level's test accuracy per epoch."""

from __future__ import annotations

from qprune.reporting import plot_training_curves, training_curves_figure


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
