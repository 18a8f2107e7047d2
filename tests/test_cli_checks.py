"""A command is checked before anything is written: one-line errors, typo hints, dry runs, the help page,
the smoke preset, and what a run records about where it was made (provenance) and how long it will take."""

from __future__ import annotations

import json
import socket
import subprocess
from datetime import datetime
from pathlib import Path

import pytest
import torch

from helpers import run_qprune
from qprune.errors import ConfigError
from qprune.estimate import Sizes, Timing, Trainings, estimate_seconds, remaining_work
from qprune.preflight import check_command, describe
from qprune.settings import run_id_of, run_identity

REPO = Path(__file__).resolve().parents[1]
LENET = ["model=lenet_300_100", "algebra=quat"]


@pytest.mark.parametrize("args,message", [
    (["prune.rat=0.2"], "unknown key prune.rat; did you mean prune.rate?"),
    (["trian.epochs=2"], "unknown key trian.epochs; did you mean train.epochs?"),
    (["modle=conv4"], "unknown key modle; did you mean model?"),
    (["hydra.run.dri=x"], "unknown key hydra.run.dri; did you mean hydra.run.dir?"),
    (["model=lenet_300_10"], "model=lenet_300_10 is not an option; did you mean model=lenet_300_100?"),
    (["experiment=paper/conv4_cifar11"], "experiment=paper/conv4_cifar11 is not an option; did you mean experiment=paper/conv4_cifar10?"),
    (["train.lr=fast"], "train.lr must be a number, got 'fast'"),
    ([*LENET, "prune.rewind=sometime"], "prune.rewind must be 'init'"),
    (["-m", "model=lenet_300_100", "algebra=real3,real4"], "job 1 (model=lenet_300_100 algebra=real4): algebra=real4 appends a grayscale"),
    (["logger.mode=sometimes"], "logger.mode must be one of online, offline, disabled"),
])
def test_bad_commands_are_refused_in_one_line_before_anything_runs(args, message):
    with pytest.raises(ConfigError) as info:
        check_command(args)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_hydra_info_commands_are_left_to_hydra():
    for flags in (["--help"], ["--cfg", "job"], ["--hydra-help"], ["-c", "job", "prune.rat=1"]):
        assert check_command(flags) is None


def test_the_jobs_checked_are_the_jobs_hydra_runs(basic_sweep):
    """The sweep's expansion (and each job's run id) matches what Hydra's basic sweeper really ran."""
    from helpers import TINY

    sweep_dir, _ = basic_sweep
    plan = check_command(["-m", *TINY, "algebra=real3,quat", "seed=0,1"])
    ran = sorted(p.name for p in sweep_dir.iterdir() if (p / "levels.csv").is_file())
    assert sorted(job.run_dir.name for job in plan.jobs) == ran
    assert [j.overrides[-2:] for j in plan.jobs] == [["algebra=real3", "seed=0"], ["algebra=real3", "seed=1"],
                                                     ["algebra=quat", "seed=0"], ["algebra=quat", "seed=1"]]


def test_an_experiments_sweep_and_the_command_line_combine_as_in_hydra():
    plan = check_command(["-m", "experiment=lenet_mnist", "seed=4"])   # the command line beats the experiment's seeds
    assert [(j.config["algebra"]["name"], j.config["seed"]) for j in plan.jobs] == [("real3", 4), ("quat", 4)]
    assert all("lenet_mnist-" in str(j.run_dir.parent) for j in plan.jobs)


def test_a_refused_command_and_a_run_that_cannot_start_leave_nothing(data_root, cache_dir, tmp_path):
    typo = run_qprune(["model=lenet_300_100", "prune.rat=0.2"], data_root, cache_dir, tmp_path, check=False)
    assert (typo.returncode, typo.stderr) == (2, "qprune: error: unknown key prune.rat; did you mean prune.rate?\n")
    missing = run_qprune(["model=lenet_300_100", f"data.root={tmp_path / 'none'}", "data.download=false"],
                         data_root, cache_dir, tmp_path, check=False)
    assert missing.returncode == 2 and "MNIST/raw" in missing.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "no run directory, no outputs/, no data/"


def test_dry_run_shows_config_run_directory_levels_and_time_and_writes_nothing(data_root, cache_dir, tmp_path):
    out = run_qprune([*LENET, "train.epochs=2", "prune.levels=3", "dry_run=true"], data_root, cache_dir, tmp_path)
    lines = out.stdout.splitlines()
    run_dir = next(line for line in lines if line.startswith("run directory:")).split()[2]
    run_id = next(line for line in lines if line.startswith("run id:")).split()[2]
    assert Path(run_dir) == tmp_path / "outputs" / "lenet_300_100-quat-mnist" / run_id and "(new)" in out.stdout
    assert f"root: {data_root}" in out.stdout, "the resolved config: data.root from $QPRUNE_DATA"
    assert "levels:         4 (level 0 dense, then 3 pruning 20% of the remaining weights each)" in out.stdout
    # 4 trainings of 2 epochs of 1,000 steps (60,000 images in batches of 60), 8 evaluations of 10,000 images
    estimate = next(line for line in lines if line.startswith("estimated time: ≈"))
    assert "4 trainings, 8,000 steps" in estimate and "10,000 images after each of 8 epochs" in estimate
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_dry_run_reports_how_far_an_existing_run_is(tmp_path):
    plan = check_command([*LENET, "prune.levels=4", f"hydra.run.dir={tmp_path}"])
    job = plan.jobs[0]
    (tmp_path / "run.json").write_text(json.dumps({"identity": run_identity(job.config)}))
    for level in range(2):
        (tmp_path / f"levels/level_{level:02d}").mkdir(parents=True)
        (tmp_path / f"levels/level_{level:02d}/result.json").write_text("{}")
    plan.dry_run = True
    text = describe(plan)
    assert f"run directory:  {tmp_path} (holds 2 of 5 levels: resumes at level 2)" in text
    assert f"run id:         {run_id_of(job.config)}" in text
    assert "3 trainings" in text, "only the levels left"
    other = check_command([*LENET, "prune.levels=4", "train.lr=0.1", f"hydra.run.dir={tmp_path}"])
    assert "holds a different run (changed: train.lr): this command would be refused" in describe(other)


def test_remaining_work_counts_every_training_a_run_still_has():
    def settings(*overrides):
        return check_command([*LENET, "data.train_size=1000", "train.epochs=3", "prune.levels=2", *overrides]).jobs[0].settings

    sizes = Sizes(train=1000, val=0, test=500)
    # 17 steps per epoch (16 batches of 60 and one of 40): 3 levels x 3 epochs
    assert remaining_work(settings(), sizes) == Trainings(3, 3 * 51, 9)
    assert remaining_work(settings(), sizes, finished_levels=2) == Trainings(1, 51, 3)
    assert remaining_work(settings("train.max_steps=20"), sizes) == Trainings(3, 60, 6)   # 20 steps: 2 epochs begun
    # the original study's protocol: levels 1 and 2 also train a phase-A round; a baseline once per pruned level
    assert remaining_work(settings("protocol=paper", "baselines=[random_reinit]"), sizes) == Trainings(7, 7 * 51, 21)
    assert remaining_work(settings("trials=3"), sizes) == Trainings(9, 9 * 51, 27)
    # phase A's rounds on disk are not trained again: rounds 0-1 done, level 0 done -> levels 1-2 and round 2
    assert remaining_work(settings("protocol=paper"), sizes, finished_levels=1, finished_rounds=2) == Trainings(3, 3 * 51, 9)
    # a round 0 of its own epochs (mask_epochs != train.epochs) is a training of its own
    assert remaining_work(settings("protocol=paper", "protocol.mask_epochs=1"), sizes) == Trainings(6, 3 * 51 + 3 * 17, 12)
    assert estimate_seconds(Trainings(3, 153, 9), sizes, Timing(0.01, 1e-4, "cpu")) == pytest.approx(1.53 + 9 * 500 * 1e-4)


def test_the_help_page_lists_every_option_and_examples(data_root, cache_dir, tmp_path):
    out = run_qprune(["--help"], data_root, cache_dir, tmp_path)
    assert out.stdout.startswith("qprune: pruning experiments") and "Examples:" in out.stdout
    listed = out.stdout.replace("|", " ").split()
    conf = REPO / "conf"
    for group in ("model", "algebra", "dataset", "prune", "protocol", "fidelity", "train", "logger", "experiment", "hydra/launcher"):
        for option in (conf / group).rglob("*.yaml"):
            name = option.relative_to(conf / group).with_suffix("").as_posix()
            assert name in listed, f"{group}={name} is missing from conf/hydra/help/qprune.yaml"
    for line in out.stdout.splitlines():
        if line.strip().startswith("python -m qprune"):
            assert check_command(line.split("#")[0].split()[3:]) is not None  # the examples are valid commands


def test_the_smoke_preset_is_a_tiny_run_of_any_model():
    for model in ("conv4", "resnet20", "mobilenet", "lenet_300_100"):
        (job,) = check_command(["experiment=smoke", f"model={model}", "algebra=quat"]).jobs
        s = job.settings
        assert (s.model, s.train.epochs, s.train.max_steps, s.prune.levels, s.data.train_size, s.data.test_size) == \
            (model, 1, 20, 2, 1000, 500)
        assert job.run_dir.parts[-3] == "smoke", "smoke runs stay apart from results"


# --------------------------------------------------------------------------- provenance and progress

@pytest.fixture(scope="module")
def smoke_run(data_root, tmp_path_factory):
    """experiment=smoke on LeNet, then extended by one level: two sessions of one run, with their log lines."""
    import logging

    from qprune.runner import LevelRunner

    run_dir = tmp_path_factory.mktemp("smoke") / "run"
    logs = []
    handler = logging.Handler()
    handler.emit = lambda record: logs.append(record.getMessage())
    logging.getLogger("qprune").addHandler(handler)
    logging.getLogger("qprune").setLevel(logging.INFO)
    try:
        for levels in (2, 3):
            (job,) = check_command(["experiment=smoke", *LENET, "logger=csv", "progress=plain", f"prune.levels={levels}",
                                    f"data.root={data_root}"]).jobs
            LevelRunner(job.settings, run_dir, job.config, []).run()
            logs.append("--- next session")
    finally:
        logging.getLogger("qprune").removeHandler(handler)
    first = "\n".join(logs).split("--- next session")[0]
    return run_dir, first


def test_each_session_records_code_versions_device_threads_host_and_times(smoke_run):
    run_dir, _ = smoke_run
    sessions = json.loads((run_dir / "run.json").read_text())["sessions"]
    assert json.loads((run_dir / "levels.json").read_text())["sessions"] == sessions
    assert [s["levels_trained"] for s in sessions] == [[0, 2], [3, 3]]
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True).stdout.strip())
    import qprune

    for s in sessions:
        assert s["git"] == {"commit": head, "dirty": dirty}
        assert (s["qprune"], s["torch"], s["cuda"]) == (qprune.__version__, torch.__version__, torch.version.cuda)
        assert (s["device"], s["threads"], s["host"], s["outcome"]) == ("cpu", torch.get_num_threads(), socket.gethostname(), "finished")
        assert s["device_name"]
        assert datetime.fromisoformat(s["started"]) <= datetime.fromisoformat(s["ended"])
    assert datetime.fromisoformat(sessions[0]["ended"]) <= datetime.fromisoformat(sessions[1]["started"])
    assert json.loads((run_dir / "levels.json").read_text())["data_sizes"] == {"train": 1000, "val": 0, "test": 500}


def test_progress_lines_show_evaluation_time_and_the_runs_eta(smoke_run):
    _, first = smoke_run
    lines = first.splitlines()
    epochs = [line for line in lines if " epoch 1/1: " in line]
    assert len(epochs) == 3 and all(" (train " in line and "s, eval " in line for line in epochs)
    levels = [line for line in lines if "(level took" in line]
    assert len(levels) == 3 and "run ETA" in levels[0] and "run ETA" not in levels[-1]


def test_the_run_clock_extrapolates_from_the_measured_pace(monkeypatch):
    """ETA = epochs still planned x this session's time per epoch (gaps between epochs included)."""
    import qprune.reporting as reporting

    now = [0.0]
    monkeypatch.setattr(reporting.time, "perf_counter", lambda: now[0])
    clock = reporting.RunClock(planned_epochs=10)
    assert clock.seconds_left() is None and clock.eta() == ""
    clock.level_started()
    now[0] = 10.0
    clock.epoch_done()
    assert clock.seconds_left() == 9 * 10.0
    now[0] = 20.0
    clock.epoch_done()
    now[0] = 25.0                                           # saving and pruning between levels count too
    assert clock.level_done() == 25.0
    clock.level_started()
    assert clock.seconds_left() == 8 * 12.5
    for _ in range(8):
        clock.epoch_done()
    assert clock.seconds_left() == 0.0 and clock.eta() == ""


def _spy_clocks(monkeypatch) -> list:
    """The RunClock each LevelRunner makes, kept to read after the run."""
    import qprune.runner as runner

    clocks = []

    class Spy(runner.RunClock):
        def __init__(self, planned_epochs):
            super().__init__(planned_epochs)
            self.levels_took: list[float] = []
            clocks.append(self)

        def level_done(self) -> float:
            self.levels_took.append(super().level_done())
            return self.levels_took[-1]

    monkeypatch.setattr(runner, "RunClock", Spy)
    return clocks


def _tiny(data_root, cache_dir, run_dir, *overrides, plan=False):
    checked = check_command([*LENET, "data.train_size=120", "data.test_size=100", "train.epochs=2", "progress=none",
                          "logger=csv", "protocol.stop_below=null", *overrides, f"data.root={data_root}",
                          f"data.cache={cache_dir}", f"hydra.run.dir={run_dir}"])
    return checked if plan else checked.jobs[0]


@pytest.mark.parametrize("overrides,epochs", [
    (["prune.levels=2"], 3 * 2),                                                       # 3 levels of 2 epochs
    (["protocol=paper", "baselines=[random_reinit]", "prune.levels=2"], 3 * 2 + 2 * 2 + 2 * 2),   # + rounds 1-2, baselines
    (["protocol=paper", "protocol.mask_epochs=1", "prune.levels=2"], 3 * 2 + 3 * 1),      # round 0 is its own training
    (["experiment=paper/lenet_300_100_mnist", "train.epochs=2", "prune.levels=2"], 3 * 2 + 2 * 2),  # carry: rounds first
    (["experiment=paper/lenet_300_100_mnist", "train.epochs=2", "prune.levels=2", "trials=2"], 3 * 2 + 2 * 2),
])
def test_the_eta_plans_exactly_the_epochs_a_run_trains(overrides, epochs, monkeypatch, data_root, cache_dir, tmp_path):
    """Every training's epochs (levels, phase-A rounds, baselines) are in the plan, and nothing else."""
    from qprune.runner import LevelRunner
    from qprune.store import RunDirectory

    clocks = _spy_clocks(monkeypatch)
    job = _tiny(data_root, cache_dir, tmp_path, *overrides)
    LevelRunner(job.settings, tmp_path, job.config).run()
    (clock,) = clocks
    assert (clock.planned_epochs, clock.epochs_done) == (epochs, epochs)
    if "experiment=paper/lenet_300_100_mnist" in overrides:   # carry: level 1 trains phase A's rounds first
        store = RunDirectory(tmp_path / "trial_0" if "trials=2" in overrides else tmp_path)
        trained = [store.round_result(r)["epochs"][-1]["seconds"] for r in (1, 2)] + \
                  [store.finished_levels()[1]["epochs"][-1]["seconds"]]
        assert clock.levels_took[1] >= sum(trained), "the time level 1 took includes phase A's rounds"


class _Stop(Exception):
    pass


def test_a_resumed_paper_run_plans_only_what_is_left(monkeypatch, data_root, cache_dir, tmp_path):
    """Stopped in phase A after round 1 of 3 (carry): the next session plans rounds 2-3 and levels 1-3,
    and so does the dry run's estimate."""
    from qprune.runner import LevelRunner
    from qprune.store import RunDirectory

    overrides = ["experiment=paper/lenet_300_100_mnist", "train.epochs=1", "prune.levels=3"]
    job = _tiny(data_root, cache_dir, tmp_path, *overrides)
    save_round = RunDirectory.save_round

    def stop_at_round_2(self, round_, *rest):
        if round_ == 2:
            raise _Stop
        return save_round(self, round_, *rest)

    monkeypatch.setattr(RunDirectory, "save_round", stop_at_round_2)
    with pytest.raises(_Stop):
        LevelRunner(job.settings, tmp_path, job.config).run()
    monkeypatch.setattr(RunDirectory, "save_round", save_round)
    assert RunDirectory(tmp_path).finished_rounds() == 2 and len(RunDirectory(tmp_path).finished_levels()) == 1
    assert "(5 trainings, 10 steps" in describe(_tiny(data_root, cache_dir, tmp_path, *overrides, plan=True))
    clocks = _spy_clocks(monkeypatch)
    LevelRunner(job.settings, tmp_path, job.config).run()
    assert (clocks[0].planned_epochs, clocks[0].epochs_done) == (2 + 3, 2 + 3)
