"""Independent oracles for the rules the science depends on.

Every expected value here is worked out without the code under test: a plain Adam loop written
out below replays a level from the files a run leaves (``checkpoints/``, ``levels/level_NN/``),
each level's data order is drawn from the seeding that docs/testing.md documents, and pruning
thresholds are computed from the saved weights or by hand. The bug each test exists to catch is
named in its docstring; docs/testing.md has the mutation run that checks they do.
"""

from __future__ import annotations

import builtins
import inspect
import io
import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

from qprune.cli import config_dir
from qprune.models import build_model
from qprune.runner import LevelRunner
from qprune.settings import Settings
from qprune.store import RunDirectory, unpack_masks

# The run every oracle replays: LeNet-300-100, quaternion (the study's model), Adam at the
# study's lr, batches of 60 on all 60,000 MNIST training images, 10 steps a level.
LR, BATCH, STEPS = 1.2e-3, 60, 10
RUN = ["model=lenet_300_100", "algebra=quat", "dataset=mnist", "train=adam", f"train.lr={LR}",
       f"train.batch_size={BATCH}", "train.epochs=1", f"train.max_steps={STEPS}", "prune.rate=0.2", "prune.scope=global",
       "prune.unit=component", "prune.output=true", "device=cpu", "logger=csv", "progress=none"]
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
# The replay normalises pixels as (x/255 - mean)/std, the pipeline as x·scale + shift: the same
# numbers up to float32 rounding. Adam moves a weight by lr·m/(sqrt(v)+eps), so a weight whose
# gradient is ~0 can turn that rounding into part of a step: a handful of weights (2 of 67,710
# measured) may differ, every other one agrees within AGREE. A different start, mask, data order
# or optimizer state moves nearly every weight by about a step (~1e-3): > 99% of them.
AGREE = 1e-6
SAME, OTHER = 0.999, 0.5  # fractions of the parameters that agree: one training / another


# --------------------------------------------------------------------------- the documented seeding

def split_order(n_train: int, split_seed: int = 0) -> torch.Tensor:
    """The training split is the dataset's training images in this order (no validation part carved off)."""
    return torch.randperm(n_train, generator=torch.Generator().manual_seed(split_seed))


def level_order(seed: int, level: int, n: int) -> torch.Tensor:
    """Level ``level`` of the run with ``seed``: its first epoch's order over the training split."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + level))


def level_seed_state(seed: int, level: int) -> torch.Tensor:
    return torch.Generator().manual_seed(seed * 100_003 + level).get_state()


# --------------------------------------------------------------------------- a plain replay

class Replay:
    """The level a run should have trained, recomputed with nothing of qprune but the model."""

    def __init__(self, mnist):
        order = split_order(len(mnist.train_y))
        self.x = (mnist.train_x[order].float() / 255 - MNIST_MEAN) / MNIST_STD
        self.y = mnist.train_y[order]
        self.test_x = (mnist.test_x.float() / 255 - MNIST_MEAN) / MNIST_STD
        self.test_y = mnist.test_y

    def train(self, start: dict, masks: dict | None, seed: int, level: int, steps: int = STEPS) -> dict:
        """``steps`` of Adam (fresh, lr 1.2e-3) from ``start`` ⊙ ``masks``, gradients masked, on the level's order."""
        model = self.model(start, masks)
        params = dict(model.named_parameters())
        optimizer = torch.optim.Adam(model.parameters(), lr=LR)
        order = level_order(seed, level, len(self.y))
        for step in range(steps):
            batch = order[step * BATCH:(step + 1) * BATCH]
            loss = F.cross_entropy(model(self.x[batch]), self.y[batch])
            optimizer.zero_grad()
            loss.backward()
            for name, mask in (masks or {}).items():
                params[name].grad.mul_(mask)
            optimizer.step()
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def model(self, weights: dict, masks: dict | None = None) -> nn.Module:
        model = build_model("lenet_300_100", "quat")
        model.load_state_dict(weights)
        with torch.no_grad():
            for name, mask in (masks or {}).items():
                model.get_parameter(name).mul_(mask)
        return model

    @torch.no_grad()
    def test_acc(self, weights: dict) -> float:
        return 100.0 * (self.model(weights)(self.test_x).argmax(1) == self.test_y).float().mean().item()


def max_difference(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def agreement(a: dict, b: dict) -> float:
    """The fraction of all parameters on which two state dicts agree within AGREE."""
    assert set(a) == set(b)
    close = sum(int(((a[k].float() - b[k].float()).abs() <= AGREE).sum()) for k in a)
    return close / sum(a[k].numel() for k in a)


def magnitude_masks(weights: dict, alive: dict, rate: float) -> dict:
    """One global pool of every weight component on its own: the ``round(rate · alive)`` smallest |w| go."""
    names = sorted(alive)
    scores = torch.cat([weights[n].abs().flatten()[alive[n].flatten()] for n in names])
    k = round(rate * scores.numel())
    threshold = scores.kthvalue(k).values
    assert (scores == threshold).sum() == 1, "a tie at the threshold would make the expected mask ambiguous"
    return {n: alive[n] & (weights[n].abs() > threshold) for n in names}


# --------------------------------------------------------------------------- runs

def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def run(overrides: list[str], run_dir: Path, data_root: Path, cache_dir: Path) -> list[dict]:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=[*RUN, *overrides, f"data.root={data_root}", f"data.cache={cache_dir}"])
    return LevelRunner(Settings.from_config(cfg), run_dir, OmegaConf.to_container(cfg, resolve=True)).run()


@pytest.fixture(scope="module")
def replay(mnist):
    return Replay(mnist)


@pytest.fixture(scope="module")
def lth_run(data_root, cache_dir, tmp_path_factory):
    """``lth`` with rewinding to the initialisation, seed 3, levels 0-2."""
    run_dir = tmp_path_factory.mktemp("oracle-lth")
    run(["protocol=lth", "prune.rewind=init", "prune.levels=2", "seed=3"], run_dir, data_root, cache_dir)
    return run_dir


@pytest.fixture(scope="module")
def late_rewind_run(data_root, cache_dir, tmp_path_factory):
    """``lth`` rewinding to step 4 of level 0, both baselines, seed 5, only the newest weights kept;
    every call of the trainer is recorded: its masks, the weights it starts from, its data order."""
    from qprune.training import EagerTrainer

    calls = []
    train_level = EagerTrainer.train_level
    signature = inspect.signature(train_level)

    def recording(self, masks, generators, *args, **kwargs):
        arguments = signature.bind(self, masks, generators, *args, **kwargs).arguments
        calls.append({"masks": {n: m.clone() for n, m in masks[0].items()},
                      "start": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
                      "order": generators[0].get_state().clone(),
                      "carried": arguments.get("optimizer_states") is not None})
        return train_level(self, masks, generators, *args, **kwargs)

    run_dir = tmp_path_factory.mktemp("oracle-rewind")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(EagerTrainer, "train_level", recording)
        run(["protocol=lth", "prune.rewind=4it", "prune.levels=1", "seed=5", "save.weights=last",
             "baselines=[random_reinit,random_prune]"], run_dir, data_root, cache_dir)
    assert len(calls) == 4, "level 0; level 1's ticket, random_reinit and random_prune, each one trainer call"
    return run_dir, calls


@pytest.fixture(scope="module")
def extended_run(late_rewind_run, data_root, cache_dir, tmp_path_factory):
    """A copy of the finished late-rewind run, extended to level 2 by a new session (prune.levels=2)."""
    import shutil

    run_dir = tmp_path_factory.mktemp("oracle-extended") / "run"
    shutil.copytree(late_rewind_run[0], run_dir)
    run(["protocol=lth", "prune.rewind=4it", "prune.levels=2", "seed=5", "save.weights=last",
         "baselines=[random_reinit,random_prune]"], run_dir, data_root, cache_dir)
    return run_dir


# --------------------------------------------------------------------------- lth

def test_lth_masks_prune_the_smallest_trained_magnitudes_of_the_survivors(lth_run):
    """Level L's masks: 20% of the weights that survived level L-1, ranked by level L-1's *trained*
    magnitudes in one pool (conv, fc and the real output layer; each quaternion component on its own).
    Catches: ranking the initial or rewound weights, pruning 20% of all weights instead of the survivors."""
    levels = lth_run / "levels"
    dense = {n: torch.ones_like(w, dtype=torch.bool) for n, w in load(levels / "level_00/weights.pt").items()
             if n.endswith("weight")}
    assert sorted(dense) == ["hidden.0.weight", "hidden.2.weight", "output.weight"]
    expected_1 = magnitude_masks(load(levels / "level_00/weights.pt"), dense, 0.2)
    expected_2 = magnitude_masks(load(levels / "level_01/weights.pt"), expected_1, 0.2)
    for level, expected in ((1, expected_1), (2, expected_2)):
        masks = unpack_masks(load(levels / f"level_{level:02d}/masks.pt"))
        assert all(torch.equal(masks[n], expected[n]) for n in expected), f"level {level}"
    total = sum(m.numel() for m in dense.values())
    assert sum(int(m.sum()) for m in expected_2.values()) == total - round(0.2 * total) - round(0.2 * (total - round(0.2 * total)))


def test_lth_level_1_trains_init_times_mask_with_its_own_data_order(lth_run, replay):
    """Level 1 = the initialisation ⊙ level 1's mask, trained by a fresh Adam on level 1's data order.
    Catches: no rewind (iterative fine-tuning), a carried optimizer, the same data order at every level;
    and level 0 is the dense initialisation trained on level 0's order."""
    levels = lth_run / "levels"
    init = load(lth_run / "checkpoints/init.pt")
    masks = unpack_masks(load(levels / "level_01/masks.pt"))
    trained = load(levels / "level_01/weights.pt")
    assert agreement(replay.train(init, masks, seed=3, level=1), trained) > SAME, \
        "level 1 is not init ⊙ mask trained on level 1's data order (seeding changed on purpose? see docs/testing.md)"
    assert agreement(replay.train(init, None, seed=3, level=0), load(levels / "level_00/weights.pt")) > SAME
    # the oracle can tell: level 0's data order, or level 0's trained weights as the start, end elsewhere
    assert not torch.equal(level_order(3, 0, 60_000)[:BATCH], level_order(3, 1, 60_000)[:BATCH])
    assert agreement(replay.train(init, masks, seed=3, level=0), trained) < OTHER
    assert agreement(replay.train(load(levels / "level_00/weights.pt"), masks, seed=3, level=1), trained) < OTHER
    # the row reports these weights' accuracy on the 10,000 test images (0.01% per image, rounded to 2 decimals)
    row = json.loads((levels / "level_01/result.json").read_text())["row"]
    assert row["test_acc"] == pytest.approx(replay.test_acc(trained), abs=0.011)
    assert row["steps"] == STEPS and row["prunable_remaining"] == pytest.approx(0.8, abs=1e-5)


def test_a_late_rewind_point_is_the_weights_after_exactly_n_steps(late_rewind_run, replay):
    """``prune.rewind=4it``: checkpoints/rewind.pt is level 0 after exactly 4 steps, and level 1 trains
    rewind ⊙ mask. Catches an off-by-one in the snapshot, and rewinding to the initialisation instead."""
    run_dir, _ = late_rewind_run
    init, rewind = load(run_dir / "checkpoints/init.pt"), load(run_dir / "checkpoints/rewind.pt")
    assert agreement(replay.train(init, None, seed=5, level=0, steps=4), rewind) > SAME
    for steps in (3, 5):
        assert agreement(replay.train(init, None, seed=5, level=0, steps=steps), rewind) < OTHER
    masks = unpack_masks(load(run_dir / "levels/level_01/masks.pt"))
    trained = load(run_dir / "levels/level_01/weights.pt")
    assert agreement(replay.train(rewind, masks, seed=5, level=1), trained) > SAME
    # save.weights=last keeps only the newest level's weights
    assert not (run_dir / "levels/level_00/weights.pt").exists() and (run_dir / "levels/level_00/masks.pt").is_file()


def test_a_resumed_run_rewinds_to_the_saved_rewind_point(late_rewind_run, extended_run, replay):
    """A later session (here: the run extended by a level) rewinds to checkpoints/rewind.pt, not to the
    initialisation, and prunes the newest kept weights. Catches a rewind point lost on resume."""
    rewind = load(late_rewind_run[0] / "checkpoints/rewind.pt")
    assert torch.equal(load(extended_run / "checkpoints/rewind.pt")["output.weight"], rewind["output.weight"])
    masks = unpack_masks(load(extended_run / "levels/level_02/masks.pt"))
    expected = magnitude_masks(load(late_rewind_run[0] / "levels/level_01/weights.pt"),
                               unpack_masks(load(late_rewind_run[0] / "levels/level_01/masks.pt")), 0.2)
    assert all(torch.equal(masks[n], expected[n]) for n in expected)
    trained = load(extended_run / "levels/level_02/weights.pt")
    assert agreement(replay.train(rewind, masks, seed=5, level=2), trained) > SAME
    assert not (extended_run / "levels/level_01/weights.pt").exists()


def test_baselines_differ_from_the_ticket_only_where_they_should(late_rewind_run):
    """random_reinit: the ticket's masks on a fresh initialisation; random_prune: random masks with the
    ticket's per-layer counts on the ticket's start (the rewind point). Both: level 1's data order and a
    fresh optimizer, like the ticket. Catches baselines that are the ticket in disguise or train otherwise."""
    run_dir, calls = late_rewind_run
    init, rewind = load(run_dir / "checkpoints/init.pt"), load(run_dir / "checkpoints/rewind.pt")
    ticket_masks = unpack_masks(load(run_dir / "levels/level_01/masks.pt"))
    level_0, ticket, reinit, random_prune = calls
    assert torch.equal(level_0["order"], level_seed_state(5, 0))
    for call in (ticket, reinit, random_prune):
        assert torch.equal(call["order"], level_seed_state(5, 1)), "a baseline trains on its level's data order"
        assert not call["carried"], "a fresh optimizer"
    assert all(torch.equal(ticket["masks"][n], m) for n, m in ticket_masks.items())
    assert max_difference(ticket["start"], {k: v * ticket_masks.get(k, 1) for k, v in rewind.items()}) == 0

    assert all(torch.equal(reinit["masks"][n], m) for n, m in ticket_masks.items())
    for name, mask in ticket_masks.items():
        fresh = reinit["start"][name][mask]
        assert (fresh == init[name][mask]).float().mean() < 0.01 and (fresh == rewind[name][mask]).float().mean() < 0.01
        assert (reinit["start"][name][~mask] == 0).all()
        # drawn by the same scheme: the spread of the layer's whole initialisation, within sampling error
        assert fresh.std().item() == pytest.approx(init[name].std().item(), rel=0.1), name

    for name, mask in ticket_masks.items():
        random = random_prune["masks"][name]
        assert random.sum() == mask.sum(), f"{name}: the ticket's per-layer count"
        density = mask.float().mean().item()
        assert (random & mask).sum().item() / mask.sum().item() == pytest.approx(density, abs=0.05), "overlap by chance only"
    assert max_difference(random_prune["start"], {k: v * random_prune["masks"].get(k, 1) for k, v in rewind.items()}) == 0


# --------------------------------------------------------------------------- pruning by hand

class MixedPool(nn.Module):
    """A quaternion layer of 4 quaternions (16 parameters) and a real output layer of 16 weights."""

    def __init__(self):
        super().__init__()
        from qprune.quaternion import QLinear

        self.hidden = QLinear(8, 8)
        self.output = nn.Linear(8, 2)


def test_a_mixed_pool_ranks_whole_quaternions_by_their_rms_against_real_weights():
    """``prune.unit=quaternion``: a quaternion scores |q|/2, the root mean square of its components, in
    the same global pool as the real head. Worked by hand: quaternions |q| = 0.4, 0.8, 1.2, 1.6 (rms 0.2,
    0.4, 0.6, 0.8; components in the ratio 0.8 : 0.4 : 0.4 : 0.2), real weights 0.025, 0.075, ..., 0.775.
    Removing 16 of 32 parameters, smallest first: 4 reals, q(0.2), 4 reals, q(0.4) — 16 exactly — so the
    threshold is rms 0.4: 2 of 4 quaternions and 8 of 16 real weights stay. Scoring |q|, the mean or the
    largest component instead keeps 3 quaternions and 4 reals, 2 and 7, 3 and 4."""
    from qprune.pruning import Masks, PruneSettings, prunable_weights, prune

    model = MixedPool()
    shape = torch.tensor([0.8, 0.4, 0.4, 0.2])                                  # |shape| = 1
    moduli = torch.tensor([[1.2, 0.4], [1.6, 0.8]])                              # |q| of quaternion (out, in)
    reals = (torch.arange(16, dtype=torch.float32) + 0.5) * 0.05
    shuffle = torch.tensor([7, 12, 0, 15, 3, 9, 5, 14, 1, 10, 6, 2, 13, 8, 4, 11])
    signs = torch.tensor([1.0, -1.0]).repeat(8)
    with torch.no_grad():
        model.hidden.weight.copy_(shape.view(4, 1, 1) * moduli * torch.tensor([1.0, -1.0, 1.0, -1.0]).view(4, 1, 1))
        model.output.weight.copy_((reals[shuffle] * signs).view(2, 8))
    weights = prunable_weights(model)
    assert [(w.name, w.layer_type, w.hypercomplex) for w in weights] == [("hidden.weight", "fc", True), ("output.weight", "output", False)]
    masks = prune(model, Masks.ones(model, weights), weights, PruneSettings(rate=0.5, scope="global", unit="quaternion"))
    kept_quaternions = masks["hidden.weight"]
    assert all(torch.equal(kept_quaternions[c], moduli > 0.8 + 1e-6) for c in range(4)), "|q| 1.2 and 1.6 stay, whole"
    assert torch.equal(masks["output.weight"], (reals[shuffle] > 0.4).view(2, 8)), "real weights above rms 0.4 stay"


# --------------------------------------------------------------------------- the grayscale channel

def test_gray_channel_is_itu_r_601_luma_of_the_normalised_rgb():
    """real4/quat's 4th channel: 0.2989 R + 0.587 G + 0.114 B of the *normalised* channels (the study's
    order of operations), computed here by hand for a red, a green, a blue and a mid-gray pixel.
    Catches other weights (0.3, 0.59, 0.11), BGR order, and gray from the raw pixels."""
    from qprune.data import RawSplits, device_data

    pixels = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255], [128, 128, 128]], dtype=torch.uint8)
    images = pixels.t().reshape(1, 3, 2, 2)  # one 2x2 image: red, green / blue, gray
    raw = RawSplits(images, torch.zeros(1, dtype=torch.long), images, torch.zeros(1, dtype=torch.long), ["x"], "hand-made")
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    data = device_data(raw, torch.device("cpu"), mean=mean, std=std, add_gray=True)
    x = data.model_input(data.test.x)
    assert x.shape == (1, 4, 2, 2)
    for i, (r, g, b) in enumerate(pixels.tolist()):
        nr, ng, nb = ((v / 255 - m) / s for v, m, s in zip((r, g, b), mean, std))
        assert x[0, :3].flatten(1)[:, i].tolist() == pytest.approx([nr, ng, nb], abs=1e-5)
        assert x[0, 3].flatten()[i].item() == pytest.approx(0.2989 * nr + 0.587 * ng + 0.114 * nb, abs=1e-5)
    # the red pixel by hand: 0.2989·2.248908 + 0.587·(−2.035714) + 0.114·(−1.804444)
    assert x[0, 3, 0, 0].item() == pytest.approx(-0.728472, abs=1e-5)


# --------------------------------------------------------------------------- crashes while saving

class _CrashingFile:
    """A file whose first write puts half the bytes on disk, then fails as a full disk would."""

    def __init__(self, file):
        self.file = file

    def write(self, data) -> int:
        data = bytes(data)
        self.file.write(data[: len(data) // 2])
        self.file.flush()
        raise OSError(28, "No space left on device (simulated)")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()

    def __getattr__(self, name):
        return getattr(self.file, name)


def crash_on_write(monkeypatch, under: Path, at: int | None = None) -> None:
    """The ``at``-th file written under ``under`` (default: every one) gets half its bytes, then the
    process 'dies' (OSError).

    Python writes a file through ``io.open`` (``open``, ``Path.write_bytes``) or ``os.write``; both are covered."""
    real_open, real_write, under, seen = io.open, os.write, under.resolve(), []

    def crashes(path) -> bool:
        """Whether this (newly opened) file under ``under`` is the one to die on."""
        if not Path(path).resolve().is_relative_to(under):
            return False
        seen.append(path)
        return at is None or len(seen) == at

    def opening(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        if isinstance(file, (str, Path)) and any(c in mode for c in "wax") and crashes(file):
            return _CrashingFile(handle)
        return handle

    def writing(fd, data):
        path = os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else ""
        if path and path not in seen and crashes(path):
            real_write(fd, bytes(data)[: len(data) // 2])
            raise OSError(28, "No space left on device (simulated)")
        return real_write(fd, data)

    monkeypatch.setattr(io, "open", opening)
    monkeypatch.setattr(builtins, "open", opening)
    monkeypatch.setattr(os, "write", writing)


def _level(value: float) -> tuple[dict, dict, dict]:
    weights = {"w": torch.full((4096,), value)}
    masks = {"w": torch.arange(4096) % 3 != 0}
    return masks, weights, {"row": {"level": 0, "test_acc": value}}


@pytest.mark.parametrize("crash", ["half-written file", "before the rename"])
def test_a_save_that_dies_half_way_leaves_the_previous_files_whole(tmp_path, monkeypatch, crash):
    """Saving over a finished level or a checkpoint and dying half-way (a half-written file, or a crash
    between writing and renaming) leaves the previous files intact and loadable. Catches a non-atomic
    writer (``path.write_bytes`` straight into the final name)."""
    store = RunDirectory(tmp_path)
    masks, weights, record = _level(1.0)
    store.save_level(0, masks, weights, record)
    store.save_checkpoint("init", weights)
    with monkeypatch.context() as patch:
        if crash == "half-written file":
            crash_on_write(patch, tmp_path)
        else:
            def dying(*args, **kwargs):
                raise OSError("killed before the rename (simulated)")
            patch.setattr(os, "replace", dying)
            patch.setattr(os, "rename", dying)
        with pytest.raises(OSError, match="simulated"):
            store.save_level(0, *_level(2.0))
        with pytest.raises(OSError, match="simulated"):
            store.save_checkpoint("init", _level(2.0)[1])
    assert [r["row"]["test_acc"] for r in store.finished_levels()] == [1.0]
    loaded_masks, loaded_weights = store.load_level(0)
    assert torch.equal(loaded_masks["w"], masks["w"]) and torch.equal(loaded_weights["w"], weights["w"])
    assert torch.equal(store.load_checkpoint("init")["w"], weights["w"])
    store.save_level(0, *_level(3.0))  # and the next save goes through
    assert store.load_level(0)[1]["w"][0].item() == 3.0 and store.finished_levels()[0]["row"]["test_acc"] == 3.0


@pytest.mark.parametrize("at", [1, 2, 3])
def test_a_level_that_dies_while_saving_is_not_finished(tmp_path, monkeypatch, at):
    """Dying at the 1st, 2nd or 3rd file of a new level never leaves it looking finished (its result.json
    is the last file written). Catches a result.json written before the masks and weights."""
    store = RunDirectory(tmp_path)
    store.save_level(0, *_level(1.0))
    with monkeypatch.context() as patch:
        crash_on_write(patch, tmp_path, at=at)
        with pytest.raises(OSError, match="simulated"):
            masks, weights, record = _level(2.0)
            store.save_level(1, masks, weights, {"row": {"level": 1}})
    assert [r["row"]["level"] for r in store.finished_levels()] == [0]


def test_run_files_load_tensors_only(tmp_path):
    """Run files are read with ``weights_only=True``: a file that smuggles in an object does not get to run
    code (here: create a file) when a run resumes from it — neither a checkpoint (no checksum is recorded
    for it, so only ``weights_only`` stands in the way) nor a level's weights (refused by its checksum too)."""
    store = RunDirectory(tmp_path)
    store.save_level(0, *_level(1.0))
    store.save_checkpoint("init", _level(1.0)[1])
    marker = tmp_path / "code-ran"

    class Smuggled:
        def __reduce__(self):
            return (Path.touch, (marker,))

    for path, load in ((store.path / "checkpoints/init.pt", lambda: store.load_checkpoint("init")),
                       (store.level_dir(0) / "weights.pt", lambda: store.load_level(0))):
        torch.save({"w": torch.zeros(4096), "extra": Smuggled()}, path)
        with pytest.raises(Exception):
            load()
        assert not marker.exists(), f"loading {path.name} ran the code it smuggled in"


# --------------------------------------------------------------------------- augmentation in the epochs

def test_training_epochs_are_augmented_and_keep_their_labels():
    """``dataset.augment=crop_flip`` reaches training: image i of an epoch is the original at position
    order[i] of the training split (the order is the generator's first draw), shifted by 0-8 pixels in
    each direction inside a 4-pixel zero padding and mirrored about half the time; its label travels
    with it. Random images make every crop unambiguous. Catches an epoch that skips augmentation, a
    shift range that misses the last offset, and labels left in the old order."""
    from qprune.data import RawSplits, device_data

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 12, 12), generator=g, dtype=torch.uint8)
    y = torch.arange(64) % 10
    raw = RawSplits(x, y, x[:8], y[:8], [str(c) for c in range(10)], "random images")
    data = device_data(raw, torch.device("cpu"), mean=(0.5,) * 3, std=(0.25,) * 3, add_gray=False, augment="crop_flip")
    epoch = data.epoch(data.train, torch.Generator().manual_seed(11))
    order = torch.randperm(64, generator=torch.Generator().manual_seed(11))
    assert torch.equal(epoch.y, data.train.y[order])
    padded = F.pad(data.train.x[order], (4, 4, 4, 4))
    found = []
    for i in range(64):
        (match,) = [(dy, dx, flip) for dy in range(9) for dx in range(9) for flip in (False, True)
                    if torch.equal(epoch.x[i], padded[i, :, dy:dy + 12, dx:dx + 12].flip(-1) if flip else padded[i, :, dy:dy + 12, dx:dx + 12])]
        found.append(match)
    assert {dy for dy, _, _ in found} == set(range(9)) and {dx for _, dx, _ in found} == set(range(9))
    assert 20 < sum(flip for _, _, flip in found) < 44, "about half mirrored"
    assert sum((dy, dx, flip) == (4, 4, False) for dy, dx, flip in found) < 5, "most images are moved"


def test_starting_over_removes_the_previous_runs_files(tmp_path):
    """``resume=false`` in a directory that holds another run: its levels and checkpoints go, so none of
    them passes for this run's. Catches a restart that keeps them (and reports 'all levels finished')."""
    first = RunDirectory(tmp_path)
    first.claim({"seed": 0}, resume=True)
    first.save_level(0, *_level(1.0))
    first.save_checkpoint("init", _level(1.0)[1])
    again = RunDirectory(tmp_path)
    again.claim({"seed": 1}, resume=False)
    assert again.finished_levels() == [] and again.load_checkpoint("init") is None
    assert json.loads((tmp_path / "run.json").read_text())["identity"] == {"seed": 1}


# --------------------------------------------------------------------------- evaluation in chunks

def test_evaluation_counts_every_test_image_once_in_cpu_chunks(mnist):
    """On the CPU the test set is evaluated 100 images at a time (faster there): every image once,
    the last chunk partial, and the accuracy of the whole set at once (a chunk's rounding may at
    most flip an image whose top two logits tie to float precision: one image of slack)."""
    from qprune.data.pipeline import device_data
    from qprune.training import eval_batch_size, evaluate

    assert eval_batch_size(1000, torch.device("cpu")) == 100
    assert eval_batch_size(1000, torch.device("cuda")) == 1000 and eval_batch_size(64, torch.device("cpu")) == 64
    data = device_data(mnist, torch.device("cpu"), mean=[MNIST_MEAN], std=[MNIST_STD], add_gray=False,
                       train_size=100, test_size=1234)
    torch.manual_seed(0)
    model = build_model("lenet_300_100", "real3")
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    accuracy = evaluate(model, data, data.test, batch_size=1000)
    assert seen == [100] * 12 + [34]
    (x, y), = data.batches(data.test, 1234)  # the whole set in one batch, normalised as evaluate sees it
    with torch.no_grad():
        whole = (model(x).argmax(1) == y).sum().item()
    assert abs(accuracy * 1234 / 100 - whole) <= 1 + 1e-6
