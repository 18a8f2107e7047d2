"""protocol=paper (the original study's two phases), the stopping rule and the baselines, on MNIST slices."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from helpers import load_script
from qprune.cli import config_dir
from qprune.data import DataSettings, DatasetSettings, load_data
from qprune.models import build_model
from qprune.protocols import ProtocolSettings, should_stop
from qprune.pruning import Masks, PruneSettings, prunable_weights, prune
from qprune.reporting import read_levels_csv
from qprune.levels import level_generator
from qprune.runner import LevelRunner
from qprune.settings import Settings
from qprune.store import RunDirectory, load_tensors
from qprune.training import EagerTrainer, TrainSettings, load_optimizer_state, make_optimizer

REPO = Path(__file__).resolve().parents[1]
PAPER = ["model=lenet_300_100", "algebra=quat", "protocol=paper", "train.epochs=1", "train.max_steps=15",
         "data.train_size=1200", "data.test_size=500", "progress=none", "logger=csv"]


def run(overrides, run_dir: Path, data_root: Path, cache_dir: Path) -> list[dict]:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, f"data.root={data_root}", f"data.cache={cache_dir}"])
    LevelRunner(Settings.from_config(cfg), run_dir, OmegaConf.to_container(cfg, resolve=True)).run()
    return read_levels_csv(run_dir / "levels.csv")


def without_timing(rows):
    return [{k: v for k, v in r.items() if k != "train_seconds"} for r in rows]


@pytest.fixture(scope="module")
def paper_run(data_root, cache_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("paper") / "a"
    return run_dir, run([*PAPER, "prune.levels=2"], run_dir, data_root, cache_dir)


def test_paper_masks_shrink_by_the_rate_and_nest(paper_run):
    run_dir, rows = paper_run
    store = RunDirectory(run_dir)
    masks = [Masks(store.load_round_masks(r)) for r in range(3)]
    assert [round(m.remaining_fraction(), 4) for m in masks] == [1.0, 0.8, 0.64]
    for previous, current in zip(masks, masks[1:]):
        assert all((current[n] <= previous[n]).all() for n in current), "a round only removes weights"
    assert [r["prunable_remaining"] for r in rows] == pytest.approx([1.0, 0.8, 0.64], abs=1e-4)
    # round 0 and level 0 are one training (same epochs); later rounds are phase A's own accuracy
    assert rows[0]["mask_test_acc"] == rows[0]["test_acc"]
    # 15 steps on 1,200 digits: 72.6-78.4% measured (phase A's rounds, trained on for longer, 72.6-84.2%)
    assert all(r["mask_test_acc"] > 65 and r["test_acc"] > 65 for r in rows)
    # only the newest round keeps the state phase A continues from
    assert [(store.round_dir(r) / "state.pt").is_file() for r in range(3)] == [False, False, True]


def test_phase_a_prunes_the_trained_weights_and_carries_one_optimizer_on(paper_run):
    """Round 1 removes the 20% smallest |w| of round 0's trained weights (= level 0's: one training),
    in one pool of every component and the real output layer; round 2's saved optimizer has taken
    every step of rounds 0-2 (3 × 15), not one round's 15 (an optimizer reset each round)."""
    run_dir, _ = paper_run
    level_0 = load_tensors(run_dir / "levels/level_00/weights.pt")
    names = ["hidden.0.weight", "hidden.2.weight", "output.weight"]
    scores = torch.cat([level_0[n].abs().flatten() for n in names])
    threshold = scores.kthvalue(round(0.2 * scores.numel())).values
    round_1 = RunDirectory(run_dir).load_round_masks(1)
    assert sorted(round_1) == names
    assert all(torch.equal(round_1[n], level_0[n].abs() > threshold) for n in names)
    state = torch.load(run_dir / "mask_rounds/round_02/state.pt", weights_only=True)
    assert {name: float(s["step"]) for name, s in state["optimizer"].items()} == {name: 45.0 for name in level_0}


def test_paper_levels_train_each_mask_from_the_initialisation(paper_run, data_root, cache_dir):
    run_dir, _ = paper_run
    store = RunDirectory(run_dir)
    settings = TrainSettings(lr=1.2e-3, epochs=1, max_steps=15)
    data = load_data(DatasetSettings("mnist", 1, (0.1307,), (0.3081,)),
                     DataSettings(root=str(data_root), train_size=1200, test_size=500), False, torch.device("cpu"))
    model = build_model("lenet_300_100", "quat")
    model.load_state_dict(store.load_checkpoint("init"))
    masks = Masks(store.load_round_masks(2))
    masks.apply_(model)
    EagerTrainer(model, data, settings).train_level([masks], [level_generator(0, 2, torch.device("cpu"))])
    expected = load_tensors(store.level_dir(2) / "weights.pt")
    assert all(torch.equal(model.state_dict()[k], expected[k]) for k in expected)


def test_carrying_the_optimizer_on_equals_training_without_a_break(mnist):
    from qprune.data import device_data

    data = device_data(mnist, torch.device("cpu"), mean=(0.1307,), std=(0.3081,), add_gray=False, train_size=600, test_size=200)
    settings = TrainSettings(lr=1e-3, epochs=2, batch_size=100)

    def trained(split: bool, carry: bool):
        torch.manual_seed(0)
        model = build_model("lenet_300_100", "quat")
        masks = Masks.ones(model, prunable_weights(model))
        g = torch.Generator().manual_seed(1)
        trainer = EagerTrainer(model, data, settings)
        if not split:
            trainer.train_level([masks], [g])
        else:
            trainer.train_level([masks], [g], epochs=1)
            trainer.train_level([masks], [g], optimizer_states=trainer.optimizer_states() if carry else None, epochs=1)
        return model.state_dict()

    whole, carried, restarted = trained(False, False), trained(True, True), trained(True, False)
    assert all(torch.equal(whole[k], carried[k]) for k in whole), "Adam's moments and step carried on exactly"
    assert not all(torch.equal(whole[k], restarted[k]) for k in whole)


def test_carried_moments_of_pruned_weights_are_zeroed():
    torch.manual_seed(0)
    model = build_model("lenet_300_100", "quat")
    weights = prunable_weights(model)
    optimizer = make_optimizer(model, TrainSettings())
    model(torch.randn(8, 1, 28, 28)).sum().backward()
    optimizer.step()
    params = dict(model.named_parameters())
    state = {n: {k: v.clone() for k, v in optimizer.state[p].items()} for n, p in params.items()}
    masks = prune(model, Masks.ones(model, weights), weights, PruneSettings(rate=0.5))
    fresh = make_optimizer(model, TrainSettings())
    load_optimizer_state(fresh, params, state, masks)
    for name, mask in masks.items():
        moments = fresh.state[params[name]]
        assert (moments["exp_avg"][~mask] == 0).all() and (moments["exp_avg_sq"][~mask] == 0).all()
        assert torch.equal(moments["exp_avg"][mask], state[name]["exp_avg"][mask])


def test_paper_run_resumes_with_the_same_results(paper_run, data_root, cache_dir, tmp_path):
    reference, rows = paper_run
    run_dir = tmp_path / "b"
    run([*PAPER, "prune.levels=1"], run_dir, data_root, cache_dir)
    # a crash after phase A's round 2 was saved and before level 2 finished
    assert len(run([*PAPER, "prune.levels=2"], run_dir, data_root, cache_dir)) == 3
    (RunDirectory(run_dir).level_dir(2) / "result.json").unlink()
    assert without_timing(run([*PAPER, "prune.levels=2"], run_dir, data_root, cache_dir)) == without_timing(rows)
    a = load_tensors(RunDirectory(reference).level_dir(2) / "weights.pt")
    b = load_tensors(RunDirectory(run_dir).level_dir(2) / "weights.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_study_stops_after_two_levels_below_the_threshold(data_root, cache_dir, tmp_path):
    rows = run([*PAPER, "prune.levels=5", "protocol.stop_below=99.9"], tmp_path / "s", data_root, cache_dir)
    assert [r["level"] for r in rows] == [0, 1]
    below = [{"row": {"test_acc": 20.0}}] * 2
    settings = ProtocolSettings("paper", stop_below=30, stop_after=2)
    assert should_stop([below], settings)
    assert not should_stop([below, [{"row": {"test_acc": 50.0}}, *below[:1]]], settings), "every run must have met it"
    assert not should_stop([below], ProtocolSettings("lth"))


def test_baselines_train_beside_each_level(data_root, cache_dir, tmp_path):
    overrides = ["model=lenet_300_100", "algebra=real3", "train.epochs=1", "train.max_steps=40", "prune.rate=0.9",
                 "prune.levels=1", "data.train_size=1200", "data.test_size=500", "progress=none", "logger=csv",
                 "baselines=[random_reinit,random_prune]"]
    rows = run(overrides, tmp_path / "b", data_root, cache_dir)
    assert rows[0]["random_reinit_acc"] is None and rows[0]["random_prune_acc"] is None
    assert 10 < rows[1]["random_reinit_acc"] < 100 and 10 < rows[1]["random_prune_acc"] < 100
    assert len({rows[1]["test_acc"], rows[1]["random_reinit_acc"], rows[1]["random_prune_acc"]}) == 3
    # the level's saved weights are the ticket's, not a baseline's
    store = RunDirectory(tmp_path / "b")
    weights, masks = load_tensors(store.level_dir(1) / "weights.pt"), store.load_masks(1)
    assert all((weights[n][~m] == 0).all() and (weights[n][m] != 0).any() for n, m in masks.items())


@pytest.mark.parametrize("figure,model,dataset,lr,epochs,algebras", [
    ("lenet_300_100_mnist", "lenet_300_100", "mnist", 1.2e-3, 40, "real3,quat"),
    ("lenet_300_100_mnist_80ep", "lenet_300_100", "mnist", 1.2e-3, 80, "real3,quat"),
    ("lenet_12_mnist", "lenet_12", "mnist", 1.2e-3, 20, "real3,quat"),
    ("conv2_cifar10", "conv2", "cifar10", 2e-4, 40, "real3,real4,quat"),
    ("conv4_cifar10", "conv4", "cifar10", 3e-4, 40, "real3,real4,quat"),
    ("conv6_cifar10", "conv6", "cifar10", 3e-4, 60, "real3,real4,quat"),
    ("conv4_cifar100", "conv4", "cifar100", 3e-4, 40, "real3,real4,quat"),
    ("conv6_cifar100", "conv6", "cifar100", 3e-4, 60, "real3,real4,quat"),
])
def test_paper_experiments_carry_the_studys_hyperparameters(figure, model, dataset, lr, epochs, algebras):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment=paper/{figure}"], return_hydra_config=True)
    assert cfg.hydra.sweeper.params.algebra == algebras and cfg.hydra.sweeper.params.seed == "0,1,2,3,4"
    s = Settings.from_config(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]))
    assert (s.model, s.dataset.name, s.train.lr, s.train.epochs, s.train.batch_size, s.train.optimizer) == (model, dataset, lr, epochs, 60, "adam")
    assert (s.protocol.name, s.protocol.stop_below, s.prune.rate, s.prune.levels, s.prune.scope, s.prune.unit, s.prune.prune_output) == (
        "paper", 30, 0.2, 20, "global", "component", True)
    assert dataset != "cifar10" or (s.dataset.mean, s.dataset.std) == ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def test_reproduce_script_writes_the_figure_report(data_root, cache_dir, tmp_path):
    out = tmp_path / "results"
    cmd = [sys.executable, str(REPO / "scripts" / "reproduce.py"), "lenet_12_mnist", "--seeds", "0", "--work", str(tmp_path / "work"),
           "--out", str(out), "--", "train.max_steps=10", "train.epochs=1", "prune.levels=1", "data.test_size=300", "protocol.stop_below=null",
           "logger=csv", "progress=none", f"data.root={data_root}", f"data.cache={cache_dir}"]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    report = (out / "lenet_12_mnist.md").read_text()
    assert "Small-scale run, not the study's schedule" in report and "MNIST/raw" in report and "phase A's mask rounds" in report
    assert "the original code's choices (fidelity=original)" in report
    assert "aggregated as the original study's plots did" in report
    table = [line for line in report.splitlines() if line.startswith("| 1 |") and "(n=" in line]
    assert len(table) == 1 and table[0].count("(n=1)") == 2  # real3 and quat at level 1
    assert (out / "lenet_12_mnist.png").stat().st_size > 10_000
    with open(out / "lenet_12_mnist.csv") as f:
        first = next(csv.DictReader(f))
    assert (first["algebra.name"], first["level"], float(first["pct_of_real"])) == ("real3", "0", 100.0)
    # per algebra, each layer's share kept: all of it at level 0; level 1 kept 80% of the weights in all,
    # so one layer kept at most 80% and another at least 80%
    lines = report.splitlines()
    for label in ("real3", "quat"):
        start = lines.index(f"{label}, seed 0:")
        level0, level1 = (line.split(" | ")[2:] for line in lines[start + 4:start + 6])
        assert [float(v.strip(" |")) for v in level0] == [100.0] * len(level0) and len(level0) >= 2
        shares = [float(v.strip(" |")) for v in level1]
        assert min(shares) <= 80.05 and 79.95 <= max(shares) <= 100

    # a report of some of the runs: the finished runs are skipped, and the other algebra's run is left out
    subprocess.run([*cmd[:3], "--algebras", "quat", *cmd[3:]], check=True, capture_output=True, text=True, timeout=300)
    header = next(line for line in (out / "lenet_12_mnist.md").read_text().splitlines() if line.startswith("| level |"))
    assert "quat: test acc" in header and "real3" not in header


def test_curves_compare_at_the_same_share_of_real_parameters():
    from qprune.aggregate import accuracy_at

    points = [{"pct_of_real": 10.0, "test_acc_mean": 90.0}, {"pct_of_real": 1.0, "test_acc_mean": 80.0}]
    assert accuracy_at(points, 10.0) == 90.0
    assert accuracy_at(points, 10 ** 0.5) == pytest.approx(85.0)  # halfway in log %
    assert accuracy_at(points, 20.0) is None, "no extrapolation beyond the levels run"


def test_report_counts_phase_a_time_without_counting_the_shared_round_twice(tmp_path):
    reproduce = load_script("reproduce")

    for r, seconds in enumerate((10.0, 3.0, 4.0)):
        d = tmp_path / "mask_rounds" / f"round_{r:02d}"
        d.mkdir(parents=True)
        (d / "result.json").write_text(json.dumps({"row": {}, "epochs": [{"seconds": seconds / 2}, {"seconds": seconds}]}))
    shared = {"train": {"epochs": 2}, "protocol": {"mask_epochs": None}}
    assert reproduce.round_seconds(tmp_path, shared) == 7.0  # round 0 is level 0's training
    assert reproduce.round_seconds(tmp_path, {"train": {"epochs": 2}, "protocol": {"mask_epochs": 1}}) == 17.0
