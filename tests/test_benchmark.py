"""scripts/benchmark.py on the CPU: the table's arithmetic, and the configs it reads without Hydra."""

from __future__ import annotations

import pytest

from helpers import load_script


@pytest.fixture(scope="module")
def benchmark():
    return load_script("benchmark")


def test_settings_come_from_conf(benchmark):
    cifar = benchmark.dataset_settings("conv4")
    assert (cifar.name, cifar.channels, cifar.mean, cifar.augment) == ("cifar10", 3, (0.485, 0.456, 0.406), "crop_flip")
    mnist = benchmark.dataset_settings("lenet_300_100")
    assert (mnist.name, mnist.channels, mnist.std, mnist.augment) == ("mnist", 1, (0.3081,), "none")
    assert benchmark.lth_run_shape("conv4") == (21, 40) and benchmark.lth_run_shape("conv6") == (21, 60)


def test_a_tiny_sweep_times_every_loop(benchmark, data_root, tmp_path):
    out = tmp_path / "table.md"
    benchmark.main(["--device", "cpu", "--models", "lenet_300_100", "--algebras", "quat", "--steps", "4",
                    "--repeats", "1", "--trials", "2", "--data-root", str(data_root), "--out", str(out)])
    lines = [line for line in out.read_text().splitlines() if line.startswith("| lenet_300_100 | quat |")]
    rows = {line.split("|")[3].strip().split(" (")[0]: [c.strip() for c in line.split("|")[1:-1]] for line in lines}
    assert {"original", "eager", "engine", "trials"} <= set(rows)
    number = lambda text: float(text.replace(",", ""))  # noqa: E731
    trials = rows["trials"]
    assert trials[4] == "2" and number(trials[7]) == pytest.approx(2 * number(trials[6]), rel=0.01)  # run-steps = 2 × it/s
    eager = rows["eager"]
    assert number(eager[5]) * number(eager[6]) == pytest.approx(1000, rel=0.01)  # ms/step × it/s
    # × original, shown with one decimal, from rates shown with three significant figures or more
    assert number(eager[9]) == pytest.approx(number(eager[7]) / number(rows["original"][7]), rel=0.01, abs=0.06)
    # forward/backward table: the GFLOP of one step (LeNet-300-100: 2 × 3 × 266,200 multiply-adds × 60 images, minus
    # the input gradient of the first layer)
    passes = next(line for line in out.read_text().splitlines() if line.startswith("| lenet_300_100 | quat | ") and
                  line.count("|") == 9)
    assert 0.06 < float(passes.split("|")[6]) < 0.08


def test_step_time_per_hypercomplex_algebra(benchmark, data_root, tmp_path):
    out = tmp_path / "table.md"
    benchmark.main(["--device", "cpu", "--models", "lenet_300_100", "--algebras", "complex,phm2,phm4q", "--modes", "eager",
                    "--steps", "3", "--repeats", "1", "--data-root", str(data_root), "--out", str(out)])
    rows = [line.split("|") for line in out.read_text().splitlines() if line.startswith("| lenet_300_100 |")]
    eager = {cells[2].strip(): float(cells[6].replace(",", "")) for cells in rows if cells[3].strip() == "eager"}
    assert set(eager) == {"complex", "phm2", "phm4q"} and all(ms > 0 for ms in eager.values())
