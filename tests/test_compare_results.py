"""scripts/compare_results.py: two results tables side by side, numbers worked by hand.

The tables are chosen so every number has a closed form: accuracy is linear in log10(% of real)
between levels, so the gap quat − real3 is linear there too and its zero is exact.
"""

import csv
import math
from pathlib import Path

import pytest

from helpers import load_script

compare_results = load_script("compare_results")

COLUMNS = ["curve", "algebra.name", "level", "runs", "pct_of_real", "test_acc_mean", "test_acc_std"]


def write_table(path: Path, curves: dict[str, list[tuple[float, float]]], std: float = 2.0, runs: int = 2) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        for curve, points in curves.items():
            for level, (pct, acc) in enumerate(points):
                w.writerow({"curve": curve, "algebra.name": curve, "level": level, "runs": runs,
                            "pct_of_real": pct, "test_acc_mean": acc, "test_acc_std": std})
    return path


# real3 rises 20 points a decade from 1% to 10%, quat is flat: they cross where 30 + 20·t = quat, t = log10 %
FIRST = {"real3": [(100.0, 60.0), (10.0, 50.0), (1.0, 30.0)], "quat": [(10.0, 40.0), (1.0, 40.0)]}
SECOND = {"real3": [(100.0, 60.0), (10.0, 50.0), (1.0, 30.0)], "quat": [(10.0, 45.0), (1.0, 45.0)]}


def test_lead_is_where_the_curves_last_cross():
    real3 = [{"pct_of_real": x, "test_acc_mean": y} for x, y in FIRST["real3"]]
    quat = [{"pct_of_real": x, "test_acc_mean": y} for x, y in FIRST["quat"]]
    assert compare_results.lead_below(real3, quat) == pytest.approx(10 ** 0.5, rel=1e-9)  # 30 + 20·t = 40
    quat_higher = [{"pct_of_real": x, "test_acc_mean": y} for x, y in SECOND["quat"]]
    assert compare_results.lead_below(real3, quat_higher) == pytest.approx(10 ** 0.75, rel=1e-9)  # = 45
    assert compare_results.lead_below(quat, real3) is None, "real3 is behind at 1%"
    # two crossings (other dips below the flat base between 10**0.5 and 10**1.5 %): the lower one counts
    flat = [{"pct_of_real": x, "test_acc_mean": 40.0} for x in (100.0, 10.0, 1.0)]
    dip = [{"pct_of_real": x, "test_acc_mean": y} for x, y in ((100.0, 50.0), (10.0, 30.0), (1.0, 50.0))]
    assert compare_results.lead_below(flat, dip) == pytest.approx(10 ** 0.5, rel=1e-9)
    always = [{"pct_of_real": x, "test_acc_mean": 99.0} for x in (10.0, 1.0)]
    assert compare_results.lead_below(real3, always) == 10.0, "ahead over the whole common range"


def test_change_and_its_standard_error():
    a = [{"pct_of_real": x, "test_acc_mean": y, "test_acc_std": 2.0, "runs": 2} for x, y in FIRST["quat"]]
    b = [{"pct_of_real": x, "test_acc_mean": y, "test_acc_std": 1.0, "runs": 4} for x, y in SECOND["quat"]]
    delta, se = compare_results.change(a, b, 3.0)
    assert delta == pytest.approx(5.0)
    assert se == pytest.approx(math.sqrt(2.0 ** 2 / 2 + 1.0 ** 2 / 4))
    assert compare_results.change(a, b, 50.0) is None, "no extrapolation"


def test_report_and_figure(tmp_path):
    first = write_table(tmp_path / "first.csv", FIRST)
    second = write_table(tmp_path / "second.csv", SECOND)
    out = tmp_path / "report" / "cmp"
    assert compare_results.main([str(first), str(second), "--labels", "old,new", "--out", str(out)]) == 0
    text = (out.parent / "cmp.md").read_text()
    # at 10%: real3 50 under both; quat 40 -> 45; the gap −10 -> −5, moved +5 ± sqrt(se² + se²) = 2·√2
    assert "| 10 | 50.00 | 50.00 | +0.00 ± 2.00 | 40.00 | 45.00 | +5.00 ± 2.00 |" in text
    assert "| 10 | -10.00 ± 2.00 | -5.00 ± 2.00 | +5.00 ± 2.83 |" in text
    # real3 at 50%: 50 + 10·log10(5) = 56.99; quat does not reach 50%: its cells stay empty
    assert "| 50 | 56.99 | 56.99 | +0.00 ± 2.00 |  |  |  |" in text
    assert "quat against real3: ahead below 3.2% of the real parameters under old; ahead below 5.6% " \
           "of the real parameters under new." in text
    assert (out.parent / "cmp.png").stat().st_size > 10_000


def test_refuses_tables_with_nothing_in_common(tmp_path):
    first = write_table(tmp_path / "first.csv", {"real3": FIRST["real3"]})
    second = write_table(tmp_path / "second.csv", {"quat": SECOND["quat"]})
    with pytest.raises(SystemExit):
        compare_results.main([str(first), str(second), "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x.md").exists()


def test_a_table_of_another_kind_is_one_line(tmp_path, capsys):
    good = write_table(tmp_path / "good.csv", FIRST)
    other = tmp_path / "levels.csv"
    other.write_text("level,test_acc\n0,97.5\n")   # a run's own levels.csv, not a figure's table
    with pytest.raises(SystemExit) as info:
        compare_results.main([str(good), str(other), "--out", str(tmp_path / "x")])
    assert str(info.value).startswith(f"compare_results: {other} line 2: not a table written by scripts/reproduce.py")
    assert not (tmp_path / "x.md").exists() and not (tmp_path / "x.png").exists()
