"""scripts/bench_resnet.py runs on the CPU (tiny) and prints its table."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_bench_resnet_prints_a_table_of_step_times():
    args = ["--device", "cpu", "--batch", "2", "--image", "8", "--repeats", "2", "--warmup", "1"]
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_resnet.py"), *args],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    rows = [line.strip("|").split("|") for line in out.splitlines() if line.startswith("| ") and "variant" not in line and "---" not in line]
    table = {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows}
    assert list(table) == ["real3", "real4", "quat (qbn=norm)", "quat (qbn=whiten)", "complex (qbn=norm)", "phm4 (qbn=norm)"]
    assert [table[v][0] for v in table] == ["272,474", "272,618", "69,230", "72,170", "137,026", "70,574"]
    assert table["real3"][3] == "1.00"
    real3 = float(table["real3"][1])
    for _params, median, _best, ratio in table.values():
        # the ratio is each variant's median over real3's, printed to 2 decimals like the times it is made of
        expected = float(median) / real3
        rounding = 0.005 + expected * (0.005 / float(median) + 0.005 / real3)
        assert float(ratio) == pytest.approx(expected, abs=rounding)
