"""Fidelity to the original study's code: the quaternion init scale, the carried optimizer, its stopping rule.

Expected values come from the formulas of the original code (hTorch's ``initialize_linear`` /
``initialize_conv``: sigma = 1/sqrt(8 * n_in * prod(kernel_size)) with an integer kernel size) and
from counting optimizer steps, never from qprune's own helpers.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from helpers import load_script
from qprune import build_model
from qprune.cli import config_dir
from qprune.errors import ConfigError
from qprune.protocols import ProtocolSettings, StudyProtocol
from qprune.quaternion import QConv2d, QLinear
from qprune.reporting import read_levels_csv
from qprune.runner import LevelRunner
from qprune.settings import Settings
from qprune.store import RunDirectory, load_tensors
from qprune.training import EagerTrainer

STEPS = 6
PAPER = ["experiment=paper/lenet_300_100_mnist", "algebra=quat", "train.epochs=1", f"train.max_steps={STEPS}",
         "data.train_size=600", "data.test_size=200", "progress=none", "logger=csv"]


def compose_settings(overrides, data_root, cache_dir):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, f"data.root={data_root}", f"data.cache={cache_dir}"])
    return Settings.from_config(cfg), OmegaConf.to_container(cfg, resolve=True)


def run(overrides, run_dir, data_root, cache_dir):
    settings, config = compose_settings(overrides, data_root, cache_dir)
    LevelRunner(settings, run_dir, config).run()
    return read_levels_csv(run_dir / "levels.csv")


def quaternion_layers(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (QLinear, QConv2d))]


# ---------------------------------------------------------------------------------------------- init
def study_sigma(layer) -> float:
    """The original code's scale: 1/sqrt(8 * input quaternions * kernel size *as an integer* (3 for 3x3))."""
    n_in = layer.weight.shape[2]
    k = 3 if isinstance(layer, QConv2d) else 1  # every conv of the study's models is 3x3, given as the int 3
    return 1 / math.sqrt(8 * n_in * k)


def he_sigma(layer) -> float:
    """Parcollet's He criterion: 1/sqrt(2 * fan_in), fan_in = input quaternions x kernel area."""
    n_in = layer.weight.shape[2]
    area = 9 if isinstance(layer, QConv2d) else 1
    return 1 / math.sqrt(2 * n_in * area)


@pytest.mark.parametrize("model_name", ["conv4", "lenet_300_100"])
@pytest.mark.parametrize("init, sigma", [("study", study_sigma), ("he", he_sigma)])
def test_quaternion_weight_scale_follows_the_formula(model_name, init, sigma):
    torch.manual_seed(0)
    layers = quaternion_layers(build_model(model_name, "quat", 10, init=init))
    assert len(layers) == (6 if model_name == "conv4" else 2)
    for name, layer in layers:
        q = layer.weight.detach().double().reshape(4, -1)
        n = q.shape[1]
        # E|q|^2 = 4 sigma^2 (|q|/sigma ~ chi with 4 dof: |q|^2/sigma^2 has mean 4, variance 8), so the
        # per-component std estimate sqrt(mean|q|^2 / 4) has relative sd ~ sqrt(8)/(2*4*sqrt(n)); 5 sd.
        estimate = (q.pow(2).sum(0).mean() / 4).sqrt().item()
        tolerance = 5 * math.sqrt(8) / (8 * math.sqrt(n))
        assert estimate == pytest.approx(sigma(layer), rel=tolerance), f"{model_name}/{name} ({n} quaternions)"
        assert q.mean().abs().item() < 5 * sigma(layer) / math.sqrt(4 * n)


def test_the_two_scales_differ_by_the_formulas_ratio_for_the_same_draws():
    """Same seed: the moduli are drawn from the same numbers, so |q| scales exactly by sigma_he / sigma_study:
    2 for a linear layer, sqrt(24/18) = 1.1547 for a 3x3 conv (the original counted the kernel as 3)."""
    moduli = {}
    for init in ("he", "study"):
        torch.manual_seed(7)
        model = build_model("conv4", "quat", 10, init=init)
        moduli[init] = {name: m.weight.detach().double().norm(dim=0) for name, m in quaternion_layers(model)}
    for name, he in moduli["he"].items():
        expected = 2 / math.sqrt(3) if name.startswith("features") else 2.0
        ratio = he / moduli["study"][name]
        assert torch.allclose(ratio, torch.full_like(ratio, expected), rtol=1e-5), name


def test_study_axis_is_a_normalised_cube_vector_not_a_uniform_direction():
    """The original normalises U(-1,1)^3: more mass towards the cube's diagonals than a uniform
    direction. E[x^2 y^2] over the axis is 1/15 for a uniform direction and 0.0766 for the cube's (Monte Carlo, 2e7 draws)."""
    torch.manual_seed(0)
    layer = QLinear(4 * 400, 4 * 400, init="study")
    axis = layer.weight.detach().double()[1:].reshape(3, -1)
    axis = axis / axis.norm(dim=0)
    moment = (axis[0] ** 2 * axis[1] ** 2).mean().item()
    # 160,000 axes: the sd of this mean is below 0.0002; the two laws' values (0.0667, 0.0766) are 0.0099 apart
    assert moment == pytest.approx(0.0766, abs=0.002) and abs(moment - 1 / 15) > 0.006


def test_bad_init_is_one_line():
    with pytest.raises(ConfigError, match="algebra.init must be one of he, study"):
        build_model("conv4", "quat", init="xavier")


def test_real_layers_keep_torchs_default_init_under_either_choice():
    for init in ("he", "study"):
        torch.manual_seed(3)
        state = build_model("conv4", "real3", init=init).state_dict()
        torch.manual_seed(3)
        reference = build_model("conv4", "real3").state_dict()
        assert all(torch.equal(state[k], reference[k]) for k in state)


# ---------------------------------------------------------------------------------------------- optimizer
def _spy_steps(monkeypatch):
    """Record, per train_level call, whether a state came in and the Adam step count it ended with."""
    calls = []
    original = EagerTrainer.train_level

    def train_level(self, masks, generators, observers=None, optimizer_states=None, epochs=None):
        result = original(self, masks, generators, observers, optimizer_states, epochs)
        state = next(iter(self.optimizer_states()[0].values()))
        calls.append((optimizer_states is not None, int(state["step"])))
        return result

    monkeypatch.setattr(EagerTrainer, "train_level", train_level)
    return calls


@pytest.mark.parametrize("phase_b", ["carry", "fresh"])
def test_phase_b_optimizer_carries_or_restarts(phase_b, monkeypatch, data_root, cache_dir, tmp_path):
    calls = _spy_steps(monkeypatch)
    levels = 3
    run([*PAPER, f"prune.levels={levels}", f"protocol.phase_b_optimizer={phase_b}", "protocol.stop_below=null"],
        tmp_path / phase_b, data_root, cache_dir)
    store = RunDirectory(tmp_path / phase_b)
    if phase_b == "carry":
        # level 0 (= round 0), then phase A's rounds 1..3 carried on, then phase B's levels 1..3 in order,
        # level 1 continuing from round 3's state: the step count never restarts
        assert calls == [(False, STEPS), (True, 2 * STEPS), (True, 3 * STEPS), (True, 4 * STEPS),
                         (True, 5 * STEPS), (True, 6 * STEPS), (True, 7 * STEPS)]
        saved = [int(next(iter(load_tensors(store.level_dir(lv) / "optimizer.pt").values()))["step"])
                 for lv in (2, 3)]
        assert saved == [6 * STEPS, 7 * STEPS]
        assert not (store.level_dir(1) / "optimizer.pt").exists(), "only the two newest levels keep their state"
    else:
        # interleaved: round L (carried on) then level L (fresh) for every level
        assert calls == [(False, STEPS), (True, 2 * STEPS), (False, STEPS), (True, 3 * STEPS), (False, STEPS),
                         (True, 4 * STEPS), (False, STEPS)]
        assert not list(store.path.glob("levels/*/optimizer.pt"))


def test_carried_levels_keep_pruned_weights_at_zero(data_root, cache_dir, tmp_path):
    """A carried state holds moments of weights this level prunes: they must not move them."""
    run([*PAPER, "prune.levels=2", "protocol.stop_below=null"], tmp_path / "r", data_root, cache_dir)
    store = RunDirectory(tmp_path / "r")
    for level in (1, 2):
        masks, weights = store.load_level(level)
        for name, mask in masks.items():
            assert (weights[name][~mask] == 0).all(), f"level {level} {name}"
            assert (weights[name][mask] != 0).float().mean() > 0.99


class _Crash(Exception):
    pass


@pytest.mark.parametrize("where", ["phase_a", "phase_b"])
def test_a_crashed_carry_run_resumes_to_the_same_results(where, monkeypatch, data_root, cache_dir, tmp_path):
    overrides = [*PAPER, "prune.levels=3", "protocol.stop_below=null"]
    reference = tmp_path / "ref"
    rows = run(overrides, reference, data_root, cache_dir)

    crashed = tmp_path / "crashed"
    method = "save_round" if where == "phase_a" else "save_level"
    original = getattr(RunDirectory, method)

    def crash_at_2(self, index, *args):
        if index == 2:
            raise _Crash  # after training round/level 2, before any of its files are written
        return original(self, index, *args)

    monkeypatch.setattr(RunDirectory, method, crash_at_2)
    with pytest.raises(_Crash):
        run(overrides, crashed, data_root, cache_dir)
    monkeypatch.setattr(RunDirectory, method, original)
    resumed = run(overrides, crashed, data_root, cache_dir)

    strip = lambda rs: [{k: v for k, v in r.items() if k != "train_seconds"} for r in rs]  # noqa: E731
    assert strip(resumed) == strip(rows)
    for level in range(4):
        a = load_tensors(RunDirectory(reference).level_dir(level) / "weights.pt")
        b = load_tensors(RunDirectory(crashed).level_dir(level) / "weights.pt")
        assert all(torch.equal(a[k], b[k]) for k in a), f"level {level}"


def test_carry_run_cannot_be_extended_once_phase_b_started(data_root, cache_dir, tmp_path):
    overrides = [*PAPER, "protocol.stop_below=null"]
    run([*overrides, "prune.levels=2"], tmp_path / "r", data_root, cache_dir)
    with pytest.raises(ConfigError, match="phase B already started from phase A's state after round 2"):
        run([*overrides, "prune.levels=3"], tmp_path / "r", data_root, cache_dir)


def test_carry_works_with_trials(data_root, cache_dir, tmp_path):
    settings, config = compose_settings([*PAPER, "prune.levels=2", "protocol.stop_below=null", "trials=2"],
                                        data_root, cache_dir)
    rows = LevelRunner(settings, tmp_path / "k", config).run()
    assert [(r["seed"], r["level"]) for r in rows] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    for k in range(2):
        state = load_tensors(RunDirectory(tmp_path / "k" / f"trial_{k}").level_dir(2) / "optimizer.pt")
        assert int(next(iter(state.values()))["step"]) == 5 * STEPS  # rounds 0-2, then levels 1 and 2


# ---------------------------------------------------------------------------------------------- stopping
class _Store:
    def __init__(self, rounds):
        self.rounds = rounds

    def round_result(self, r):
        return {"row": {"test_acc": self.rounds[r]}} if r < len(self.rounds) else None


def _protocol(rule, rounds, levels, carry=False):
    p = ProtocolSettings("paper", stop_below=30, stop_after=2, stop_rule=rule,
                         phase_b_optimizer="carry" if carry else "fresh")
    settings = SimpleNamespace(protocol=p, train=SimpleNamespace(epochs=1), prune=SimpleNamespace(levels=20))
    trial = SimpleNamespace(store=_Store(rounds), records=[{"row": {"test_acc": a}} for a in levels])
    return StudyProtocol(SimpleNamespace(settings=settings, trials=[trial]))


def test_study_rule_stops_phase_b_at_its_first_level_below():
    assert _protocol("study", [90, 80, 70], [90, 25]).stop_reason(2) is not None
    assert _protocol("two_below", [90, 80, 70], [90, 25]).stop_reason(2) is None  # needs two in a row
    assert _protocol("two_below", [90, 80, 70, 60], [90, 25, 20]).stop_reason(3) is not None


def test_study_rule_never_goes_past_phase_as_last_round():
    # phase A: rounds 2 and 3 below 30% -> no round 4; phase B's levels are all above the threshold
    rounds, levels = [90, 50, 20, 10], [90, 80, 70, 60]
    protocol = _protocol("study", rounds, levels)
    reason = protocol.stop_reason(4)
    assert reason is not None and "after round 3" in reason
    assert _protocol("study", rounds, levels[:3]).stop_reason(3) is None
    assert _protocol("two_below", rounds, levels).stop_reason(4) is None


def test_paper_experiments_use_the_original_choices_and_fidelity_corrected_undoes_them(data_root, cache_dir):
    original, _ = compose_settings(["experiment=paper/conv4_cifar10", "algebra=quat"], data_root, cache_dir)
    assert (original.algebra.init, original.protocol.phase_b_optimizer, original.protocol.stop_rule) == \
        ("study", "carry", "study")
    corrected, _ = compose_settings(["experiment=paper/conv4_cifar10", "algebra=quat", "fidelity=corrected"],
                                    data_root, cache_dir)
    assert (corrected.algebra.init, corrected.protocol.phase_b_optimizer, corrected.protocol.stop_rule) == \
        ("he", "fresh", "two_below")
    plain, _ = compose_settings(["algebra=quat"], data_root, cache_dir)
    assert (plain.protocol.name, plain.algebra.init) == ("lth", "he")


def test_lth_refuses_paper_only_options(data_root, cache_dir):
    with pytest.raises(ConfigError, match="belong to protocol=paper"):
        compose_settings(["protocol.phase_b_optimizer=carry"], data_root, cache_dir)


def test_study_view_cuts_every_seed_to_the_shortest_and_drops_low_means():
    from qprune.aggregate import Curve, study_view

    def point(level, acc):
        return {"level": level, "test_acc_mean": acc}

    runs = [SimpleNamespace(rows=[{}] * 4), SimpleNamespace(rows=[{}] * 3)]  # one seed stopped after level 2
    curve = Curve({}, "quat", runs)
    curve.points = [point(0, 90.0), point(1, 30.0), point(2, 45.0), point(3, 80.0)]
    # level 3 only one seed reached (cut), level 1's mean is not above 30% (dropped)
    assert [p["level"] for p in study_view(curve)] == [0, 2]


def test_carry_diagnostic_compares_fresh_and_carried_first_steps(data_root, cache_dir, tmp_path, capsys):
    """scripts/carry_diagnostic.py on a small paper run: a fresh Adam's first step is lr on every weight
    with a gradient (max |Δw|/lr = 1 up to eps), and the carried state's is not."""
    import os
    import subprocess
    import sys as _sys

    run_dir = tmp_path / "run"
    subprocess.run([_sys.executable, "-m", "qprune", "experiment=paper/lenet_300_100_mnist", "algebra=real3",
                    "train.epochs=1", "data.train_size=600", "data.test_size=200", "prune.levels=2", "logger=csv",
                    "progress=none", f"data.root={data_root}", f"data.cache={cache_dir}", f"hydra.run.dir={run_dir}"],
                   check=True, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    carry_diagnostic = load_script("carry_diagnostic")

    assert carry_diagnostic.main([str(run_dir), "--levels", "1,2", "--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "phase A's state after round 2 (Adam step 30)" in out  # rounds 0-2, 10 steps each (600 images, batch 60)
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert [r[2] for r in rows] == ["fresh", "carried", "fresh", "carried"]
    max_over_lr = {(r[0], r[2]): float(r[5]) for r in rows}
    assert max_over_lr[("| 1", "fresh")] == pytest.approx(1.0, abs=0.05)
    assert max_over_lr[("| 2", "fresh")] == pytest.approx(1.0, abs=0.05)
    for level in ("| 1", "| 2"):
        assert abs(max_over_lr[(level, "carried")] - 1.0) > 0.05, "the carried moments change the first step"

    # a level phase B has not trained yet uses phase A's round masks (the same masks): the same numbers
    import shutil

    shutil.rmtree(run_dir / "levels" / "level_02")
    assert carry_diagnostic.main([str(run_dir), "--levels", "2", "--steps", "3"]) == 0
    again = [line.split(" | ")[2:] for line in capsys.readouterr().out.splitlines() if line.startswith("| 2 |")]
    assert again == [r[2:] for r in rows[2:]]
    with pytest.raises(SystemExit):
        carry_diagnostic.main([str(run_dir), "--levels", "1,5"])
    assert "has no masks for level 5 yet (phase A made rounds 0-2)" in capsys.readouterr().err
