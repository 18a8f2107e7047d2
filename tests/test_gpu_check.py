"""scripts/gpu_check.py, the one command for a GPU machine, kept from rotting by its dry run on the CPU."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from helpers import REPO, load_script

SCRIPT = REPO / "scripts" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    return load_script("gpu_check")


def run_check(args, data_root, cache_dir):
    return subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--data-root", str(data_root), "--cache", str(cache_dir),
                           *args], capture_output=True, text=True, timeout=900)


def test_the_dry_run_runs_every_step_and_writes_the_report(data_root, cache_dir, tmp_path):
    report = tmp_path / "out" / "report.md"
    done = run_check(["--out", str(report)], data_root, cache_dir)
    assert done.returncode == 0, done.stdout + done.stderr
    text = report.read_text()
    for row in ("| date |", "| device | CPU", "| torch | ", "| python |", "| checkout |", "**Result: every check that ran passed.**"):
        assert row in text
    steps = [line for line in text.splitlines() if line.startswith("| ") and "| tiny | passed |" in line]
    assert len(steps) == 4 and "| skipped | skipped (dry run: LeNet's benchmark at toy size) |" in text, text
    assert "tests collected" in text  # pytest -m gpu found the GPU tests (collected only: no GPU here)
    # the level runner's two runs, 2 levels each, identical on the CPU (both train with the eager loop)
    levels = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith(("| 0 | ", "| 1 | "))]
    assert len(levels) == 2 and all(cells[2] == cells[3] and cells[4] == cells[5] for cells in levels)
    assert text.count("| lenet_300_100 | quat | trials | fp32 | 2 |") == 1
    assert "| quat (qbn=norm) | 69,230 |" in text
    assert "| resnet20 quat (qbn=norm) / real3 step, fp32 | ≤ 1.5× |" in text and "| dry run |" in text
    log = report.with_name("report.md.log").read_text()
    assert log.count("\n$ ") == 4 and "benchmark.py" in log and "bench_resnet.py" in log


def test_a_failing_step_fails_the_check_and_the_others_still_run(cache_dir, tmp_path):
    report = tmp_path / "report.md"
    empty = tmp_path / "no-data"
    empty.mkdir()
    done = run_check(["--out", str(report), "--only", "engines,bench_resnet"], empty, cache_dir)
    assert done.returncode == 1
    text = report.read_text()
    assert "**Result: FAILED: Level runner" in text
    assert "| Level runner: graph engine (train.engine=auto) vs eager loop | tiny | FAILED |" in text
    assert "| ResNet-20 training step per algebra | tiny | passed |" in text  # needs no data
    assert "The end of its output:" in text and "MNIST" in text  # why: the data is missing


def test_the_dry_run_cannot_import_what_a_fresh_gpu_machine_lacks(gpu_check, tmp_path):
    args = gpu_check.argparse.Namespace(dry_run=True, out=tmp_path / "r.md", data_root=tmp_path, cache=tmp_path, budget_s=60)
    check = gpu_check.Check(args)
    env = check.env()
    for package in ("hydra", "omegaconf", "wandb"):
        done = subprocess.run([sys.executable, "-c", f"import {package}"], env=env, capture_output=True, text=True)
        assert done.returncode != 0 and "is not on a fresh GPU machine" in done.stderr
    assert subprocess.run([sys.executable, "-c", "import qprune.runner, qprune.engine"], env=env).returncode == 0
    shutil.rmtree(check.work)


def test_the_budget_trims_the_sweep(gpu_check):
    def scales(budget):
        planned = gpu_check.plan(budget)
        assert sum(p.estimate for p in planned) <= budget - gpu_check.RESERVE_S
        return {p.step: p.scale for p in planned}

    everything = sum(e["full"] for e in gpu_check.ESTIMATES.values()) + gpu_check.RESERVE_S
    assert set(scales(everything).values()) == {"full"}
    assert scales(everything - 1) == {**{step: "full" for step in gpu_check.ESTIMATES}, "bench_lenet": "quick"}
    assert scales(480) == {"tests": "full", "engines": "full", "bench_conv4": "quick", "bench_resnet": "full",
                           "bench_lenet": "full"}
    assert scales(300) == {"tests": "full", "engines": "quick", "bench_conv4": "quick", "bench_resnet": "skipped",
                           "bench_lenet": "skipped"}
    assert scales(170) == {"tests": "full", "engines": "skipped", "bench_conv4": "skipped", "bench_resnet": "skipped",
                           "bench_lenet": "skipped"}
    assert {p.step: p.scale for p in gpu_check.plan(10, dry_run=True)} == {**{s: "tiny" for s in gpu_check.ESTIMATES},
                                                                           "bench_conv4": "skipped"}


def bench_row(model, algebra, mode, precision, runs, ms, notes=""):
    per_second = 1000 / ms
    return {"model": model, "algebra": algebra, "mode": mode, "precision": precision, "runs": runs,
            "seconds_per_step": ms / 1000, "flops_per_step": 0, "notes": notes, "its": per_second,
            "run_steps": runs * per_second, "tflops": 0}


def test_targets_are_judged_from_the_measurements(gpu_check):
    conv4 = [bench_row("conv4", "real3", "original", "default", 1, 10.0),
             bench_row("conv4", "real3", "graph", "fp32", 1, 1.0),       # 1,000 it/s, 10x the original loop
             bench_row("conv4", "quat", "graph", "fp32", 1, 1.25),       # 800 it/s, 1.25x real3's step
             bench_row("conv4", "real3", "graph", "tf32", 1, 0.5, "channels_last"),  # not the plain graph row
             bench_row("conv4", "quat", "trials", "fp32", 10, 6.0)]      # 1,667 run-steps/s: 2.08x one quat run
    outcomes = {"bench_conv4": gpu_check.Outcome("bench_conv4", data={"rows": conv4, "lth_minutes": [
                    {"model": "conv4", "algebra": "quat", "loop": "graph fp32", "minutes": 25.0}]}),
                "bench_resnet": gpu_check.Outcome("bench_resnet", data={"rows": [
                    {"variant": "quat (qbn=norm)", "x_real3": 1.4}, {"variant": "quat (qbn=whiten)", "x_real3": 3.2}]})}
    table = {cells[0]: cells[2:] for cells in
             ([c.strip() for c in line.split("|")[1:-1]] for line in gpu_check.targets_table(outcomes).splitlines()[2:])}
    assert table["conv4 real3 graph it/s, fp32"] == ["1,000", "yes"]
    assert table["conv4 quat graph it/s, fp32"] == ["800", "**no**"]
    assert table["conv4 real3 graph it/s, tf32"] == ["not measured", "—"]
    assert table["conv4 real3 graph / original loop, fp32"] == ["10.00×", "yes"]
    assert table["conv4 quat / real3 step time, fp32"] == ["1.25×", "**no**"]
    assert table["conv4 quat trials=10 / one run (run-steps/s), fp32"] == ["2.08×", "yes"]
    assert table["resnet20 quat (qbn=norm) / real3 step, fp32"] == ["1.40×", "yes"]
    assert table["resnet20 quat (qbn=whiten) / real3 step, fp32"] == ["3.20×", "**no**"]
    assert table["conv4 quat full lottery-ticket run (21 levels × 40 epochs), estimated"] == ["25.00 min", "**no**"]
    assert table["lenet_300_100 quat graph it/s, fp32"] == ["not measured", "—"]


def test_the_engine_comparison_names_each_problem(gpu_check):
    def row(level, acc, loss, engine="graph"):
        return {"level": level, "pct_of_real": 25.0, "test_acc": acc, "train_loss": loss, "train_seconds": 1.0, "engine": engine}

    result = {"summary": "conv4 quat", "device": "GPU", "config": {"data": {"train_size": 10, "test_size": 5},
                                                                   "train": {"epochs": 2, "lr": 3e-4}},
              "runs": {"auto": {"rows": [row(0, 50.0, 1.0), row(1, 52.0, 1.0)], "wall_s": 1, "warnings": []},
                       "eager": {"rows": [row(0, 49.0, 1.05, "eager"), row(1, 52.5, 1.0, "eager")], "wall_s": 2, "warnings": []}}}
    problems, body = gpu_check.compare_engines_report(result, expect_graph=True)
    assert problems == [] and body.count("\n| 0 | 25 | 50.00 | 49.00 |") == 1
    result["runs"]["auto"]["rows"] = [row(0, 45.0, 1.0, "eager (fallback: RuntimeError: x)"), row(1, 52.0, 1.2)]
    problems, _ = gpu_check.compare_engines_report(result, expect_graph=True)
    assert problems == ["train.engine=auto trained with eager (fallback: RuntimeError: x), graph, not graph",
                        "level 0: test accuracy 45.0 (auto) vs 49.0 (eager)", "level 1: train loss 1.2 (auto) vs 1.0 (eager)"]
