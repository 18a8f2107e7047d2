"""Sweep aggregation: every run's levels in one table, mean ± std over seeds checked against the per-run files."""

from __future__ import annotations

import csv
import json
import logging
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from qprune.aggregate import aggregate, main, sweep_figure
from qprune.cli import config_dir
from qprune.reporting import read_levels_csv, write_levels_csv

REPO = Path(__file__).resolve().parents[1]


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


PARAMS = {("lenet_300_100", "real3"): 266_610, ("lenet_300_100", "quat"): 67_710,
          ("conv4", "real3"): 2_425_930, ("conv4", "quat"): 609_226}   # README's table


def write_run(run_dir: Path, model: str, algebra: str, seed: int, accuracies: list[float]) -> None:
    """A run directory as the runner leaves it: levels.csv and levels.json with the resolved config."""
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=[f"model={model}", f"algebra={algebra}", f"seed={seed}"])
    config = OmegaConf.to_container(cfg, resolve=True)
    total, real = PARAMS[(model, algebra)], PARAMS[(model, "real3")]
    rows = [{"level": level, "prunable_remaining": round(0.8**level, 6), "params_nonzero": round(total * 0.8**level),
             "params_total": total, "pct_of_real": round(100 * total * 0.8**level / real, 4), "test_acc": acc,
             "best_val_acc": None, "train_loss": 0.1, "epochs": 1, "steps": 10, "train_seconds": 0.5}
            for level, acc in enumerate(accuracies)]
    run_dir.mkdir(parents=True)
    write_levels_csv(rows, run_dir / "levels.csv")
    (run_dir / "levels.json").write_text(json.dumps({"config": config, "levels": rows}))


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    """LeNet and Conv-4, real3 and quat, 3 seeds; one LeNet/quat seed stopped after level 1; runs
    nested as a later change may write them (job/trial_k/levels.csv)."""
    root = tmp_path_factory.mktemp("sweep")
    accuracy = {  # (model, algebra) -> per seed, per level
        ("lenet_300_100", "real3"): [[98.0, 97.0, 96.0], [98.2, 97.4, 95.0], [97.8, 97.6, 94.0]],
        ("lenet_300_100", "quat"): [[97.0, 96.5, 96.0], [97.2, 96.1, 95.5], [96.8, 96.3]],
        ("conv4", "real3"): [[80.0, 81.0, 79.0], [82.0, 83.0, 80.0], [81.0, 82.0, 81.0]],
        ("conv4", "quat"): [[78.0, 79.0, 78.5], [79.0, 80.0, 79.5], [80.0, 81.0, 80.5]],
    }
    for job, ((model, algebra), seeds) in enumerate(accuracy.items()):
        for seed, accs in enumerate(seeds):
            write_run(root / f"{job}-{model}-{algebra}" / f"trial_{seed}", model, algebra, seed, accs)
    return root, accuracy


def test_mean_and_std_over_seeds_per_curve(two_models, tmp_path):
    root, accuracy = two_models
    summary = aggregate([root], tmp_path)
    means = read_csv(tmp_path / "sweep_mean.csv")
    assert [c.label for c in summary.curves] == ["conv4 real3", "conv4 quat", "lenet_300_100 real3", "lenet_300_100 quat"]
    assert "model.plan" not in means[0] and "train.lr" not in means[0], "keys that follow from the model are not curves"
    for (model, algebra), seeds in accuracy.items():
        rows = [r for r in means if r["model.name"] == model and r["algebra.name"] == algebra]
        assert [int(r["level"]) for r in rows] == [0, 1, 2]
        for r in rows:
            values = [accs[int(r["level"])] for accs in seeds if len(accs) > int(r["level"])]
            assert int(r["runs"]) == len(values)
            assert float(r["test_acc_mean"]) == pytest.approx(statistics.fmean(values), abs=1e-4)
            assert float(r["test_acc_std"]) == pytest.approx(statistics.stdev(values), abs=1e-4)
    lenet_quat = [r for r in means if r["curve"] == "lenet_300_100 quat"]
    assert (lenet_quat[2]["runs"], float(lenet_quat[2]["test_acc_mean"]), float(lenet_quat[2]["test_acc_std"])) == ("2", 95.75, pytest.approx(0.353553, abs=1e-4))
    assert float(lenet_quat[0]["pct_of_real"]) == pytest.approx(100 * 67_710 / 266_610, abs=1e-3)
    # sweep.csv: every run's rows, as in its own levels.csv
    everything = read_csv(tmp_path / "sweep.csv")
    assert len(everything) == sum(len(accs) for seeds in accuracy.values() for accs in seeds)
    for run in summary.runs:
        mine = [r for r in everything if r["run"] == str(run.path)]
        assert [float(r["test_acc"]) for r in mine] == [r["test_acc"] for r in read_levels_csv(run.path / "levels.csv")]
        assert {r["seed"] for r in mine} == {str(run.config["seed"])}


def test_the_figure_has_a_panel_per_model_and_dataset_with_std_error_bars(two_models):
    """Unrelated experiments never share an axis; colour says the algebra, the legend only what differs
    within the panel, and each point's bar spans mean ± sample std over the seeds that reached it."""
    import matplotlib.colors as mcolors

    root, accuracy = two_models
    summary = aggregate([root], root)
    fig = sweep_figure(summary.curves)
    conv4, lenet = fig.axes
    assert (conv4.get_title(), lenet.get_title()) == ("conv4 on cifar10", "lenet_300_100 on mnist")
    for ax, model in ((conv4, "conv4"), (lenet, "lenet_300_100")):
        assert ax.get_xscale() == "log"
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["real3 (3 runs)", "quat (3 runs)"]
        real3, quat = [line for line in ax.lines if not line.get_label().startswith("_")]  # not the bars' caps
        assert mcolors.to_hex(real3.get_color()) == "#1f77b4" and mcolors.to_hex(quat.get_color()) == "#2ca02c"
        for line, algebra in ((real3, "real3"), (quat, "quat")):
            seeds = accuracy[(model, algebra)]
            means = [statistics.fmean(a[i] for a in seeds if len(a) > i) for i in range(3)]
            stds = [statistics.stdev([a[i] for a in seeds if len(a) > i]) for i in range(3)]
            assert list(line.get_ydata()) == pytest.approx(means, abs=1e-4)
            bars = next(c for c in ax.containers if mcolors.to_hex(c.lines[2][0].get_color()[0]) == mcolors.to_hex(line.get_color()))
            spans = sorted(v for seg in bars.lines[2][0].get_segments() for v in (seg[:, 1].min(), seg[:, 1].max()))
            assert spans == pytest.approx(sorted(v for m, s in zip(means, stds) for v in (m - s, m + s)), abs=1e-3)
        caption = " ".join(" ".join(t.get_text().split()) for t in ax.texts)
        assert "40 epochs per level" in caption and "the full training set" in caption and "protocol lth" in caption
        assert caption.endswith("mean ± std over 3 seeds")
    assert (root / "accuracy_vs_sparsity.png").stat().st_size > 20_000


def test_the_percent_axis_labels_1_2_5_in_every_decade():
    from qprune.reporting import percent_of_real_axis, pyplot

    fig, ax = pyplot().subplots()
    percent_of_real_axis(ax, [100.0, 40.0, 3.1, 0.3])
    fig.canvas.draw()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0.5", "1", "2", "5", "10", "20", "50", "100"]
    assert ax.get_xlim()[0] > ax.get_xlim()[1], "dense on the left"


def test_a_real_sweep_aggregates_to_its_jobs_numbers(basic_sweep):
    """The callback's output at the end of a real multirun, against each job's own levels.csv."""
    sweep_dir, result = basic_sweep
    means = read_csv(sweep_dir / "sweep_mean.csv")
    jobs = {}
    for job in sweep_dir.glob("*/levels.csv"):
        config = json.loads((job.parent / "levels.json").read_text())["config"]
        jobs.setdefault(config["algebra"]["name"], []).append(read_levels_csv(job))
    assert sorted(jobs) == ["quat", "real3"] and all(len(runs) == 2 for runs in jobs.values())
    assert [r["curve"] for r in means] == ["real3", "real3", "quat", "quat"]
    for r in means:
        values = [rows[int(r["level"])]["test_acc"] for rows in jobs[r["algebra.name"]]]
        assert float(r["test_acc_mean"]) == pytest.approx(statistics.fmean(values), abs=1e-4)
        assert float(r["test_acc_std"]) == pytest.approx(statistics.stdev(values), abs=1e-4)
        assert r["seeds"] == "0 1"
    assert len(read_csv(sweep_dir / "sweep.csv")) == 8
    assert (sweep_dir / "accuracy_vs_sparsity.png").stat().st_size > 20_000
    assert "sweep: 4 runs, 2 curves" in result.stdout + result.stderr


def test_aggregate_script_on_finished_sweeps(two_models, tmp_path):
    root, _ = two_models
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "aggregate.py"), str(root), "--out", str(tmp_path / "agg")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "lenet_300_100 quat: 3 runs, 3 levels" in out.stdout
    assert len(read_csv(tmp_path / "agg" / "sweep_mean.csv")) == 12
    assert (tmp_path / "agg" / "accuracy_vs_sparsity.png").is_file()


def test_aggregate_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "multirun.yaml").write_text("{}\n")   # a sweep whose jobs all failed
    assert main([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no runs (levels.csv with levels.json) under" in err
    assert main([str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    assert "pass --out" in capsys.readouterr().err


def test_aggregate_writes_into_dir_only_when_it_is_a_sweep(two_models, tmp_path, capsys, caplog):
    """A folder of runs that is no sweep (the system's temp folder, say) is read, never written into, unasked."""
    root, _ = two_models
    before = sorted(p.name for p in root.iterdir())
    assert main([str(root)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a sweep's directory" in err and "pass --out" in err
    assert sorted(p.name for p in root.iterdir()) == before
    sweep = tmp_path / "sweep"
    shutil.copytree(root, sweep)
    (sweep / "multirun.yaml").write_text("{}\n")
    assert main([str(sweep)]) == 0
    assert (sweep / "sweep_mean.csv").is_file() and (sweep / "accuracy_vs_sparsity.png").is_file()


def test_runs_found_twice_are_counted_once_with_one_line(two_models, tmp_path, caplog):
    root, _ = two_models
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    with caplog.at_level(logging.WARNING, logger="qprune"):
        summary = aggregate([root, copy], tmp_path / "out")
    assert len(summary.runs) == 12
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("12 run(s) found twice")


def test_curves_of_the_hypercomplex_algebras_are_named_and_coloured_by_algebra(tmp_path):
    """One curve per algebra: labelled without the null keys of the others, each in its algebra's colour."""
    from qprune.aggregate import ALGEBRA_COLOURS

    PARAMS.update({("lenet_300_100", "complex"): 134_010, ("lenet_300_100", "phm2"): 134_026,
                   ("lenet_300_100", "phm"): 67_838, ("lenet_300_100", "phm_quaternion"): 67_838})
    for job, algebra in enumerate(["real3", "complex", "quat", "phm2", "phm", "phm_quaternion"]):
        write_run(tmp_path / f"{job}-{algebra}", "lenet_300_100", algebra, 0, [97.0 + job / 10, 96.0])
    summary = aggregate([tmp_path], tmp_path)
    labels = [c.label for c in summary.curves]
    assert labels == ["real3", "complex", "quat", "phm n=2 rules=random", "phm n=4 rules=quaternion", "phm n=4 rules=random"]
    lines = sweep_figure(summary.curves, "t").axes[0].lines
    colours = [ALGEBRA_COLOURS[t] for t in ("real3", "complex", "quat", "phm2", "phm4q", "phm4")]
    import matplotlib.colors as mcolors

    assert [mcolors.to_hex(line.get_color()) for line in lines] == [mcolors.to_hex(c) for c in colours]


def test_a_paper_figure_says_whose_choices_its_runs_used():
    """The caption of a protocol=paper figure names the fidelity choices: a reader must not mistake
    the original code's behaviour for qprune's corrections or the other way round."""
    from qprune.aggregate import SweepRun, schedule_caption

    def runs(**choices):
        config = {"seed": 0, "train": {"epochs": 2}, "protocol": {"name": "paper", **choices.get("protocol", {})},
                  "prune": {"rate": 0.2}, "algebra": {"name": "quat", **choices.get("algebra", {})}}
        return [SweepRun(Path("run"), config, [], {"train": 4000})]

    original = runs(algebra={"init": "study"}, protocol={"phase_b_optimizer": "carry", "stop_rule": "study"})
    assert "protocol paper (the original code's choices)" in schedule_caption(original)
    assert "protocol paper (qprune's corrections)" in schedule_caption(runs())  # keys absent: the defaults
    mixed = runs(algebra={"init": "he"}, protocol={"phase_b_optimizer": "carry", "stop_rule": "study"})
    assert "protocol paper (init he, phase-B optimizer carry, stop rule study)" in schedule_caption(mixed)
    assert "(" not in schedule_caption([SweepRun(Path("run"), {"seed": 0, "train": {"epochs": 2},
                                                               "protocol": {"name": "lth"}}, [], {})]).split(";")[0]
