"""Fault injection: every fault ends in one clear line or a clean recovery, never in silently wrong data.

Tiny real-data runs (LeNet-300-100 on MNIST slices, one CPU thread) are interrupted, corrupted,
locked, filled up and made to diverge, and the outcome is checked exactly: results equal to an
uninterrupted run's after a resume, one-line messages naming the file and the fix, strict JSON.
The default run keeps a fast representative of each fault (in-process runs and one subprocess);
``-m slow`` adds SIGKILL at several points, real read-only mounts and the CLI's own lines.
"""

from __future__ import annotations

import errno
import gzip
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import qprune.data
import qprune.files
import qprune.reporting
import qprune.store
from helpers import run_qprune
from qprune.algebra import Algebra
from qprune.cli import config_dir
from qprune.data import DataSettings, load_raw
from qprune.data.sources import read_idx
from qprune.engine import Engine
from qprune.errors import ConfigError, DataError, RunDirectoryBusy, RunDirectoryError, StorageError
from qprune.files import atomic_write_bytes
from qprune.levels import level_generator
from qprune.models import build_model
from qprune.pruning import Masks, PruneSettings, prunable_weights, prune
from qprune.reporting import read_levels_csv
from qprune.runner import LevelRunner
from qprune.settings import Settings, run_identity
from qprune.store import RunDirectory, load_tensors
from qprune.training import TrainSettings

REPO = Path(__file__).resolve().parents[1]
# 3 levels of 10 steps, rewinding to step 5 (so checkpoints/rewind.pt exists)
BASE = ["model=lenet_300_100", "train.max_steps=10", "prune.levels=2", "prune.rewind=5it", "data.train_size=1000",
        "data.test_size=500", "progress=none", "logger=csv"]


# --------------------------------------------------------------------------- helpers

@pytest.fixture
def one_thread():
    """In-process runs at one thread, as the subprocesses (OMP_NUM_THREADS=1): equal results need equal counts."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _fast(mnist, setattr) -> None:
    """The runs' data from the session's decoded MNIST, and no figures (neither is under test here)."""
    setattr(qprune.data, "load_raw", lambda name, *args, **kwargs: mnist)
    setattr(qprune.reporting, "plot_accuracy_vs_sparsity", lambda *args: None)
    setattr(qprune.reporting, "plot_training_curves", lambda *args: None)


@pytest.fixture
def fast_mnist(mnist, monkeypatch):
    _fast(mnist, monkeypatch.setattr)


def config(overrides, data_root: Path, cache_dir: Path) -> tuple[Settings, dict]:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, f"data.root={data_root}", f"data.cache={cache_dir}"])
    return Settings.from_config(cfg), OmegaConf.to_container(cfg, resolve=True)


def runner_for(overrides, run_dir: Path, data_root: Path, cache_dir: Path) -> LevelRunner:
    """The level runner of ``python -m qprune OVERRIDES hydra.run.dir=RUN_DIR``, in this process."""
    settings, cfg = config(overrides, data_root, cache_dir)
    return LevelRunner(settings, run_dir, cfg)


def run(overrides, run_dir: Path, data_root: Path, cache_dir: Path) -> list[dict]:
    runner_for(overrides, run_dir, data_root, cache_dir).run()
    return read_levels_csv(run_dir / "levels.csv")


def without_timing(rows):
    return [{k: v for k, v in r.items() if k != "train_seconds"} for r in rows]


def strict_load(path: Path):
    """JSON as strict parsers read it: a bare NaN or Infinity fails."""
    def refuse(constant):
        raise AssertionError(f"{path} holds a bare {constant}: not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


def same_levels(a: Path, b: Path, levels: int) -> None:
    assert without_timing(read_levels_csv(a / "levels.csv")) == without_timing(read_levels_csv(b / "levels.csv"))
    for level in range(levels):
        for name in ("masks.pt", "weights.pt"):
            x = load_tensors(a / f"levels/level_{level:02d}" / name)
            y = load_tensors(b / f"levels/level_{level:02d}" / name)
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), f"level {level} {name}"


def temporaries(folder: Path) -> list[Path]:
    return list(folder.rglob(".*.tmp*"))


@pytest.fixture(scope="module")
def reference(data_root, cache_dir, tmp_path_factory, mnist):
    """An uninterrupted run of BASE (3 levels), at one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        _fast(mnist, patch.setattr)
        run_dir = tmp_path_factory.mktemp("reference") / "run"
        run(BASE, run_dir, data_root, cache_dir)
    torch.set_num_threads(before)
    return run_dir


@pytest.fixture
def copy_of(reference, tmp_path):
    def make(name: str = "run") -> Path:
        target = tmp_path / name
        shutil.copytree(reference, target)
        return target
    return make


# --------------------------------------------------------------------------- 1. the image-folder cache

def _cifar_jpegs(count: int) -> list[bytes]:
    """The first real CIFAR-10 JPEGs of the offline archive."""
    from conftest import DATA_ROOT

    found = []
    with tarfile.open(DATA_ROOT / "cifar10-jpeg.tar.xz") as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".jpg"):
                found.append(tar.extractfile(member).read())
                if len(found) == count:
                    return found
    raise AssertionError("the archive has too few images")


def _image_folder(root: Path, jpegs: list[bytes], per_class: dict[str, int]) -> Path:
    folder, i = root / "pets", 0
    for split in ("train", "test"):
        for cls, n in per_class.items():
            (folder / split / cls).mkdir(parents=True, exist_ok=True)
            for k in range(n if split == "train" else 1):
                (folder / split / cls / f"{k}.jpg").write_bytes(jpegs[i])
                i += 1
    return folder


def test_image_folder_cache_follows_edits_inside_class_folders(tmp_path, caplog):
    jpegs = _cifar_jpegs(14)
    folder = _image_folder(tmp_path, jpegs, {"a": 3, "b": 3})
    cache = tmp_path / "cache"
    first = load_raw("imagefolder", tmp_path, cache, False, path=folder)
    assert len(first.train_x) == 6
    caplog.set_level(logging.INFO)
    caplog.clear()
    assert torch.equal(load_raw("imagefolder", tmp_path, cache, False, path=folder).train_x, first.train_x)
    assert "decoding" not in caplog.text, "an unchanged folder comes from the cache"

    top = folder.stat().st_mtime_ns
    for k in range(3, 7):  # 4 images more in train/a: the top folder's size and mtime do not change
        (folder / "train" / "a" / f"{k}.jpg").write_bytes(jpegs[8 + k - 3])
    assert folder.stat().st_mtime_ns == top
    more = load_raw("imagefolder", tmp_path, cache, False, path=folder)
    assert len(more.train_x) == 10 and more.train_y.tolist().count(0) == 7

    replaced = folder / "train" / "b" / "0.jpg"  # another image under the same name
    replaced.write_bytes(jpegs[12])
    again = load_raw("imagefolder", tmp_path, cache, False, path=folder)
    expected = load_raw("imagefolder", tmp_path, None, False, path=folder)  # decoded without any cache
    assert torch.equal(again.train_x, expected.train_x)
    assert not torch.equal(again.train_x, more.train_x)


# --------------------------------------------------------------------------- 6. corrupt data files

def test_unreadable_images_are_named_or_skipped(tmp_path, caplog):
    jpegs = _cifar_jpegs(8)
    folder = _image_folder(tmp_path, jpegs, {"a": 2, "b": 2})
    (folder / "train" / "a" / "2.jpg").write_bytes(jpegs[0][: len(jpegs[0]) // 2])   # truncated
    (folder / "train" / "b" / "notes.jpg").write_text("not an image at all")        # text named .jpg
    with pytest.raises(DataError) as info:
        load_raw("imagefolder", tmp_path, tmp_path / "cache", False, path=folder)
    assert str(info.value) == (f"{folder}/train/a/2.jpg is not a readable image (truncated, or not an image) "
                               "(and 1 more): remove it, or set data.bad_images=skip to leave unreadable images out")
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").rglob("*.pt")), "nothing cached"

    caplog.set_level(logging.WARNING)
    raw = load_raw("imagefolder", tmp_path, tmp_path / "cache", False, path=folder, bad_images="skip")
    assert len(raw.train_x) == 4 and raw.train_y.tolist() == [0, 0, 1, 1]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"left out 2 unreadable images (data.bad_images=skip), the first {folder}/train/a/2.jpg"]
    # skipping is its own cache entry: the default still refuses
    with pytest.raises(DataError, match="2.jpg is not a readable image"):
        load_raw("imagefolder", tmp_path, tmp_path / "cache", False, path=folder)
    with pytest.raises(ConfigError, match="data.bad_images must be null"):
        DataSettings(bad_images="ignore")


def test_corrupt_mnist_files_are_named(data_root, tmp_path):
    raw = data_root / "MNIST" / "raw"
    labels = (raw / "t10k-labels-idx1-ubyte.gz").read_bytes()
    cases = {  # file -> (its damaged contents, what the message says about it)
        "t10k-labels-idx1-ubyte.gz": (labels[: len(labels) // 2], "cannot be read (truncated)"),
        "train-labels-idx1-ubyte.gz": (b"\x00\x01 garbage, not gzip", "cannot be read (Not a gzipped file"),
        "t10k-labels-idx1-ubyte": (gzip.decompress(labels)[:5000],
                                   "is truncated or corrupt (4992 bytes of data where its header declares 10000)"),
    }
    fix = "replace it with a good copy (delete it and set data.download=true when online)"
    for name, (data, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(DataError) as info:
            read_idx(path)
        assert str(info.value).startswith(f"{path} {message}") and str(info.value).endswith(fix), str(info.value)
    # and through the loader, in MNIST's own layout, the good files beside the damaged one
    root = tmp_path / "root"
    (root / "MNIST" / "raw").mkdir(parents=True)
    for file in raw.glob("*.gz"):
        if file.name != "t10k-labels-idx1-ubyte.gz":
            (root / "MNIST" / "raw" / file.name).symlink_to(file)
    damaged = root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz"
    damaged.write_bytes(labels[: len(labels) // 2])
    with pytest.raises(DataError) as info:
        load_raw("mnist", root, None, download=False)
    assert str(info.value) == f"{damaged} cannot be read (truncated): {fix}"


# --------------------------------------------------------------------------- 2. the run-directory lock

def _hold_lock(run_dir: Path) -> subprocess.Popen:
    """Another process holding the run directory's lock, as a running qprune would."""
    run_dir.mkdir(parents=True, exist_ok=True)
    code = ("import fcntl, os, sys, time\n"
            "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "os.write(fd, str(os.getpid()).encode())\n"
            "print('held', flush=True)\n"
            "time.sleep(300)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(run_dir / "run.lock")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_process_is_refused_at_once_naming_the_holder(tmp_path, data_root, cache_dir, fast_mnist):
    run_dir = tmp_path / "run"
    holder = _hold_lock(run_dir)
    try:
        runner = runner_for(BASE, run_dir, data_root, cache_dir)
        with pytest.raises(RunDirectoryBusy) as info:
            runner.run()
        assert str(info.value) == (f"{run_dir} is in use by another qprune process (pid {holder.pid}): wait for it to "
                                   "finish, or stop it and rerun this command to resume")
        assert not hasattr(runner, "data") and not (run_dir / "run.json").exists(), "refused before anything else"
    finally:
        holder.kill()
        holder.wait()
    with RunDirectory(run_dir).lock() as lock:  # a killed holder's lock is gone: the OS released it
        assert lock.fd is not None and (run_dir / "run.lock").read_text().strip() == str(os.getpid())


# --------------------------------------------------------------------------- 3. divergence

def test_a_nan_learning_rate_marks_the_level_diverged_and_stops_the_run(tmp_path, data_root, cache_dir, fast_mnist,
                                                                        one_thread, caplog):
    run_dir = tmp_path / "run"
    caplog.set_level(logging.INFO, logger="qprune")
    rows = run([*BASE, "train=sgd", "train.lr=1e3", "prune.rewind=init"], run_dir, data_root, cache_dir)
    assert [(r["level"], r["status"], r["train_loss"], r["epochs"]) for r in rows] == [(0, "diverged", None, 1)]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == ["level 0 diverged: the training loss was not finite at epoch 1; its row is marked "
                        "status=diverged and the run stops after this level (lower train.lr?)"]
    assert "stopping before level 1: level 0 diverged" in caplog.text
    record = strict_load(run_dir / "levels/level_00/result.json")
    assert record["row"]["train_loss"] is None and record["epochs"][0]["train_loss"] is None
    assert strict_load(run_dir / "levels.json")["levels"][0]["status"] == "diverged"
    # a rerun does not train on from NaN weights
    caplog.clear()
    run([*BASE, "train=sgd", "train.lr=1e3", "prune.rewind=init"], run_dir, data_root, cache_dir)
    assert "stopping before level 1: level 0 diverged" in caplog.text and len(read_levels_csv(run_dir / "levels.csv")) == 1


def test_a_level_that_diverges_keeps_its_pruned_weights_at_zero(copy_of, data_root, cache_dir, fast_mnist, one_thread):
    """Level 3 of a healthy run trained with a NaN-producing learning rate (run.json edited to let it resume)."""
    run_dir = copy_of()
    marker = run_dir / "run.json"
    identity = json.loads(marker.read_text())
    settings, cfg = config([*BASE, "train=sgd", "train.lr=1e3", "prune.levels=4"], data_root, cache_dir)
    identity["identity"] = run_identity(cfg)
    marker.write_text(json.dumps(identity))
    LevelRunner(settings, run_dir, cfg).run()
    rows = read_levels_csv(run_dir / "levels.csv")
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "diverged"], "the run stops after the diverged level 3"
    masks = RunDirectory(run_dir).load_masks(3)
    weights = load_tensors(run_dir / "levels/level_03/weights.pt")
    for name, mask in masks.items():
        assert torch.equal(weights[name][~mask], torch.zeros(int((~mask).sum()))), name  # not NaN (NaN x 0)
        assert torch.isnan(weights[name][mask]).any(), "the kept weights did diverge"
    nonzero = sum(int((w != 0).sum()) for w in weights.values())
    assert nonzero == rows[3]["params_nonzero"], "params_nonzero counts what is really there"
    strict_load(run_dir / "levels/level_03/result.json")


def test_nan_weights_are_pruned_first_never_ranked_large():
    model = build_model("lenet_300_100", Algebra("real3"), 10, (1, 28, 28))
    weights = prunable_weights(model, True)
    params = dict(model.named_parameters())
    first = weights[0].name
    with torch.no_grad():
        for w in weights:
            params[w.name].copy_(torch.linspace(1, 2, params[w.name].numel()).view_as(params[w.name]))
        params[first].view(-1)[:100] = float("nan")
    masks = prune(model, Masks.ones(model, weights), weights, PruneSettings(rate=0.2, scope="layerwise"))
    assert not masks[first].view(-1)[:100].any(), "the NaN weights are the first pruned"
    kept = int(masks[first].sum())
    assert kept == params[first].numel() - round(0.2 * params[first].numel())
    masks.apply_(model)
    assert int(torch.isnan(params[first]).sum()) == 0, "pruned NaN weights read zero"


def test_one_run_of_several_diverges_alone(mnist, one_thread):
    """trials=K: the engine stops a diverged run after its epoch and trains the others on."""
    data = qprune.data.device_data(mnist, torch.device("cpu"), mean=(0.13,), std=(0.3,), add_gray=False, train_size=600,
                                   test_size=200)
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(build_model("lenet_300_100", Algebra("real3"), 10, (1, 28, 28)))
    weights = prunable_weights(models[0], True)
    with torch.no_grad():
        dict(models[1].named_parameters())[weights[0].name].fill_(float("nan"))
    engine = Engine(models, data, TrainSettings(epochs=3, batch_size=100), [w.name for w in weights])
    masks = [Masks.ones(m, weights) for m in models]
    results = engine.train_level(masks, [level_generator(s, 0, torch.device("cpu")) for s in (0, 1)])
    assert (results[0].diverged, len(results[0].epochs), results[0].steps) == (False, 3, 18)
    assert (results[1].diverged, len(results[1].epochs), results[1].steps) == (True, 1, 6)


# --------------------------------------------------------------------------- 4, 5, 10. corrupt run directories

def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


RESUME = "pass resume=false to start over"


def _level_fix(run_dir: Path, level: int) -> str:
    return f"delete {run_dir}/levels/level_{level:02d} to retrain that level (the levels after it are retrained too), or {RESUME}"


# (file, damage, the message after "<run dir>/<file> ")
CORRUPTIONS = {
    "init-truncated": ("checkpoints/init.pt", _truncate, "is unreadable ({reason}): " + RESUME),
    "rewind-deleted": ("checkpoints/rewind.pt", Path.unlink,
                       "is missing: prune.rewind=5it rewinds every level to it; {fix0}"),
    "latest-weights-truncated": ("levels/level_02/weights.pt", _truncate, "is corrupt ({size} bytes, {written} were written): {fix2}"),
    "older-weights-truncated": ("levels/level_00/weights.pt", _truncate, "is corrupt ({size} bytes, {written} were written): {fix0}"),
    "latest-masks-deleted": ("levels/level_02/masks.pt", Path.unlink, "is missing: {fix2}"),
    "older-masks-deleted": ("levels/level_01/masks.pt", Path.unlink, "is missing: {fix1}"),
    "latest-weights-deleted": ("levels/level_02/weights.pt", Path.unlink, "is missing: the next level prunes these weights; {fix2}"),
    "latest-weights-flipped": ("levels/level_02/weights.pt", _flip_a_byte,
                               "is corrupt (its sha256 differs from the one recorded when it was written): the next level "
                               "prunes these weights; {fix2}"),
    "result-empty": ("levels/level_02/result.json", lambda p: p.write_text(""), "is empty: {fix2}"),
    "run-json-garbage": ("run.json", lambda p: p.write_text("{\"identity\": {"), "is not valid JSON: " + RESUME +
                         ", or delete it to resume the levels in {run_dir} with this command's settings"),
    "run-json-empty": ("run.json", lambda p: p.write_text(""), "is empty: " + RESUME +
                       ", or delete it to resume the levels in {run_dir} with this command's settings"),
}
FAST = ("init-truncated", "rewind-deleted", "older-weights-truncated", "latest-masks-deleted", "result-empty",
        "latest-weights-flipped")


@pytest.mark.parametrize("case", [c if c in FAST else pytest.param(c, marks=pytest.mark.slow) for c in CORRUPTIONS])
def test_a_damaged_run_directory_is_one_line_naming_the_file_and_the_fix(case, copy_of, data_root, cache_dir,
                                                                         fast_mnist, one_thread):
    run_dir = copy_of()
    name, damage, message = CORRUPTIONS[case]
    path = run_dir / name
    written = path.stat().st_size
    damage(path)
    runner = runner_for([*BASE, "prune.levels=3"], run_dir, data_root, cache_dir)
    with pytest.raises(RunDirectoryError) as info:
        runner.run()
    text = str(info.value)
    reason = text[text.find("(") + 1: text.find(")")] if "unreadable" in text else ""
    expected = f"{path} " + message.format(
        reason=reason, size=path.stat().st_size if path.exists() else 0, written=written, run_dir=run_dir,
        fix0=_level_fix(run_dir, 0), fix1=_level_fix(run_dir, 1), fix2=_level_fix(run_dir, 2))
    assert text == expected and "\n" not in text
    assert "save.weights=none" not in text
    assert not (run_dir / "levels/level_03").exists(), "nothing trained on damaged files"


def test_a_finished_run_does_not_need_its_checkpoints(copy_of, data_root, cache_dir, fast_mnist, one_thread, caplog):
    run_dir = copy_of()
    _truncate(run_dir / "checkpoints/init.pt")
    caplog.set_level(logging.INFO, logger="qprune")
    rows = runner_for(BASE, run_dir, data_root, cache_dir).run()
    assert len(rows) == 3 and "all 3 levels are finished already" in caplog.text


def test_a_run_of_several_resumes_when_one_of_them_is_finished(tmp_path, data_root, cache_dir, fast_mnist, one_thread):
    """trials=2 killed between saving the two runs' last levels: the finished one needs its checkpoints still."""
    overrides = [*BASE, "prune.levels=1", "trials=2"]
    run_dir = tmp_path / "run"
    runner_for(overrides, run_dir, data_root, cache_dir).run()
    expected = {k: load_tensors(run_dir / f"trial_{k}/levels/level_01/weights.pt") for k in (0, 1)}
    shutil.rmtree(run_dir / "trial_1/levels/level_01")
    runner_for(overrides, run_dir, data_root, cache_dir).run()
    for k in (0, 1):
        weights = load_tensors(run_dir / f"trial_{k}/levels/level_01/weights.pt")
        assert all(torch.equal(weights[n], expected[k][n]) for n in weights)


def test_deleting_a_damaged_level_retrains_it_and_the_ones_after_it(reference, copy_of, data_root, cache_dir,
                                                                   fast_mnist, one_thread):
    run_dir = copy_of()
    _truncate(run_dir / "levels/level_01/weights.pt")
    with pytest.raises(RunDirectoryError, match="level_01/weights.pt is corrupt"):
        run(BASE, run_dir, data_root, cache_dir)
    shutil.rmtree(run_dir / "levels/level_01")  # the fix the message offers
    run(BASE, run_dir, data_root, cache_dir)
    same_levels(run_dir, reference, 3)


def test_protocol_paper_files_are_checked_too(tmp_path, data_root, cache_dir, fast_mnist, one_thread):
    paper = [*BASE, "prune.rewind=init", "protocol=paper", "protocol.phase_b_optimizer=carry", "protocol.stop_below=null"]
    run_dir = tmp_path / "paper"
    run(paper, run_dir, data_root, cache_dir)
    record = strict_load(run_dir / "levels/level_01/result.json")
    assert set(record["files"]) == {"masks.pt", "weights.pt", "optimizer.pt"}
    assert record["files"]["optimizer.pt"]["bytes"] == (run_dir / "levels/level_01/optimizer.pt").stat().st_size
    # as if the run had stopped after level 1, and level 1's optimizer state (level 2 carries it on) were lost
    shutil.rmtree(run_dir / "levels/level_02")
    (run_dir / "levels/level_01/optimizer.pt").unlink()
    with pytest.raises(RunDirectoryError) as info:
        run(paper, run_dir, data_root, cache_dir)
    assert str(info.value) == (f"{run_dir}/levels/level_01/optimizer.pt is missing: the next level carries this level's "
                               f"optimizer state on (protocol.phase_b_optimizer=carry); {_level_fix(run_dir, 1)}")
    # phase A's files: a truncated round
    shutil.rmtree(run_dir / "levels/level_01")
    masks = run_dir / "mask_rounds/round_01/masks.pt"
    written = strict_load(masks.parent / "result.json")["files"]["masks.pt"]["bytes"]
    _truncate(masks)
    with pytest.raises(RunDirectoryError) as info:
        run(paper, run_dir, data_root, cache_dir)
    assert str(info.value) == (f"{masks} is corrupt ({masks.stat().st_size} bytes, {written} were written): "
                               f"phase A continues from it; {RESUME}")


# --------------------------------------------------------------------------- 7. a full disk; durable writes

def test_a_full_disk_is_one_line_leaves_no_temporary_files_and_resumes(reference, tmp_path, data_root, cache_dir,
                                                                      fast_mnist, one_thread, monkeypatch):
    run_dir = tmp_path / "run"
    real_open = open

    class FillsUp(io.FileIO):
        """Writes half of what it is given, then reports the disk full (ENOSPC), as a filling disk does."""

        def write(self, data):
            super().write(bytes(data)[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def open_(path, mode="r", *args, **kwargs):
        if "w" in mode and Path(path).name.startswith(".weights.pt.tmp") and "level_01" in str(path):
            return FillsUp(path, "w")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(qprune.files, "open", open_, raising=False)
    with pytest.raises(StorageError) as info:
        run(BASE, run_dir, data_root, cache_dir)
    target = run_dir / "levels/level_01/weights.pt"
    assert str(info.value) == (f"cannot write {target}: No space left on device (nothing half-written is left); free some "
                               "space, or move the outputs (QPRUNE_OUTPUTS=... or hydra.run.dir=...), then rerun the "
                               "same command to resume")
    assert temporaries(run_dir) == [] and not (run_dir / "levels/level_01/result.json").exists()
    monkeypatch.setattr(qprune.files, "open", real_open, raising=False)  # space freed
    # what a kill -9 in the middle of a save leaves behind is swept when the run starts again
    stale = run_dir / "levels/level_01/.masks.pt.tmp4194303"
    stale.write_bytes(b"half")
    run(BASE, run_dir, data_root, cache_dir)
    assert temporaries(run_dir) == []
    same_levels(run_dir, reference, 3)


def test_writes_reach_the_disk_before_the_rename(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(qprune.files.os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                              real_fsync(fd)))
    atomic_write_bytes(tmp_path / "a" / "result.json", b"{}")
    assert synced == [str(tmp_path / "a" / f".result.json.tmp{os.getpid()}"), str(tmp_path / "a")]


# --------------------------------------------------------------------------- 8. read-only

def test_a_finished_run_on_a_read_only_filesystem_is_reported_without_writing(copy_of, data_root, cache_dir, fast_mnist,
                                                                               one_thread, monkeypatch, caplog):
    run_dir = copy_of()
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    real_open = os.open
    monkeypatch.setattr(qprune.store.os, "open", lambda path, flags, *a: read_only() if flags & os.O_CREAT else
                        real_open(path, flags, *a))
    monkeypatch.setattr(qprune.files, "open", read_only, raising=False)
    caplog.set_level(logging.INFO, logger="qprune")
    rows = runner_for(BASE, run_dir, data_root, cache_dir).run()
    assert [r["level"] for r in rows] == [0, 1, 2] and "all 3 levels are finished already" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before
    with pytest.raises(RunDirectoryError) as info:
        runner_for([*BASE, "prune.levels=3"], run_dir, data_root, cache_dir).run()
    assert str(info.value) == (f"{run_dir} cannot be written (a read-only filesystem) and level 3 is left to train: copy "
                               "it to a writable folder and rerun with hydra.run.dir=<the copy> to resume it")


# --------------------------------------------------------------------------- 13. threads

def test_resuming_at_another_thread_count_is_recorded_and_warned(copy_of, data_root, cache_dir, fast_mnist, caplog):
    run_dir = copy_of()
    assert strict_load(run_dir / "run.json")["threads"] == 1
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        caplog.set_level(logging.WARNING, logger="qprune")
        run([*BASE, "prune.levels=3"], run_dir, data_root, cache_dir)
    finally:
        torch.set_num_threads(before)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [f"{run_dir} was started with 1 CPU threads and now runs with 2: CPU results are reproducible only "
                        "at one thread count, so the levels trained now may differ from an uninterrupted run's (set "
                        "OMP_NUM_THREADS=1 to match)"]
    assert [strict_load(run_dir / f"levels/level_{k:02d}/result.json")["threads"] for k in range(4)] == [1, 1, 1, 2]


# --------------------------------------------------------------------------- 9. SIGINT, and SIGKILL at several points

def run_with_fault(fault: str | None, args, data_root, cache_dir, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "QPRUNE_DATA": str(data_root), "QPRUNE_CACHE": str(cache_dir), "OMP_NUM_THREADS": "1",
           "QPRUNE_OUTPUTS": str(cwd / "outputs"), "QPRUNE_FAULT": fault or ""}
    return subprocess.run([sys.executable, str(REPO / "tests" / "fault_injection.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_ctrl_c_is_one_line_and_the_same_command_resumes(reference, tmp_path, data_root, cache_dir, fast_mnist,
                                                         one_thread):
    run_dir = tmp_path / "run"
    result = run_with_fault("SIGINT:levels/level_01/weights.pt", [*BASE, f"hydra.run.dir={run_dir}"], data_root,
                            cache_dir, tmp_path)
    assert result.returncode == 130, result.stderr
    assert result.stderr.splitlines()[-1] == "qprune: interrupted during level 1; rerun the same command to resume"
    assert "Traceback" not in result.stderr + result.stdout
    assert temporaries(run_dir) == [] and not (run_dir / "levels/level_01/result.json").exists()
    run(BASE, run_dir, data_root, cache_dir)
    same_levels(run_dir, reference, 3)


KILL_POINTS = [
    "SIGKILL:checkpoints/init.pt",                    # before the initial weights are on disk
    "SIGKILL:levels/level_00/result.json:after",      # right after level 0 finished
    "SIGKILL:levels/level_01/weights.pt",             # mid-save: masks written, weights only as a temporary file
    "SIGKILL:levels/level_01/result.json",            # masks and weights written, the level not marked finished
    "SIGTERM:levels/level_02/masks.pt",
]


@pytest.mark.slow
@pytest.mark.parametrize("fault", KILL_POINTS)
def test_killed_at_any_point_the_same_command_resumes_to_equal_results(fault, reference, tmp_path, data_root,
                                                                       cache_dir, one_thread):
    run_dir = tmp_path / "run"
    args = [*BASE, f"hydra.run.dir={run_dir}"]
    killed = run_with_fault(fault, args, data_root, cache_dir, tmp_path)
    assert killed.returncode == -getattr(signal, fault.split(":")[0]), killed.stderr
    if fault.endswith("level_01/weights.pt"):
        assert [p.name for p in temporaries(run_dir)] == [f".weights.pt.tmp{_pid_of(run_dir)}"], "killed mid-save"
    resumed = run_with_fault(None, args, data_root, cache_dir, tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert temporaries(run_dir) == []
    same_levels(run_dir, reference, 3)


def _pid_of(run_dir: Path) -> str:
    return (run_dir / "run.lock").read_text().strip()


@pytest.mark.slow
def test_a_paper_run_killed_in_phase_a_resumes_to_equal_results(tmp_path, data_root, cache_dir, one_thread, mnist,
                                                               monkeypatch):
    paper = [*BASE, "prune.rewind=init", "protocol=paper", "protocol.phase_b_optimizer=carry", "protocol.stop_below=null"]
    monkeypatch.setattr(qprune.data, "load_raw", lambda name, *a, **k: mnist)
    reference = tmp_path / "reference"
    run(paper, reference, data_root, cache_dir)
    run_dir = tmp_path / "run"
    args = [*paper, f"hydra.run.dir={run_dir}"]
    assert run_with_fault("SIGKILL:mask_rounds/round_02/state.pt", args, data_root, cache_dir, tmp_path).returncode == -9
    assert run_with_fault(None, args, data_root, cache_dir, tmp_path).returncode == 0
    same_levels(run_dir, reference, 3)


# --------------------------------------------------------------------------- the CLI's own lines (subprocesses)

@pytest.mark.slow
def test_cli_reports_a_damaged_file_and_a_held_lock_in_one_line(copy_of, tmp_path, data_root, cache_dir):
    run_dir = copy_of()
    _truncate(run_dir / "checkpoints/init.pt")
    result = run_qprune([*BASE, "prune.levels=3", f"hydra.run.dir={run_dir}"], data_root, cache_dir, tmp_path, check=False)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"qprune: error: {run_dir}/checkpoints/init.pt is unreadable (")
    holder = _hold_lock(run_dir)
    try:
        result = run_qprune([*BASE, f"hydra.run.dir={run_dir}"], data_root, cache_dir, tmp_path, check=False)
        assert result.returncode == 2
        assert result.stderr == f"qprune: error: {run_dir} is in use by another qprune process (pid {holder.pid}): " \
                                "wait for it to finish, or stop it and rerun this command to resume\n"
        # in a multirun the job is skipped, the sweep goes on
        sweep = tmp_path / "sweep"
        holder_job = sweep / "job"
        holder.kill()
        holder.wait()
        holder = _hold_lock(holder_job)
        result = run_qprune(["-m", *BASE, f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=job"], data_root, cache_dir,
                            tmp_path, check=False)
        assert result.returncode == 0, result.stderr
        assert f"skipped this job: {holder_job} is in use by another qprune process (pid {holder.pid})" in result.stdout
        assert not (holder_job / "run.json").exists()
    finally:
        holder.kill()
        holder.wait()


def _read_only_mount_command() -> list[str] | None:
    """A prefix that runs a command with ``$RO`` mounted read-only (root: a private mount namespace), or None."""
    if os.geteuid() != 0:
        return []  # chmod is enough
    if shutil.which("unshare") and subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0:
        return ["unshare", "-m", "sh", "-c", 'mount --bind "$RO" "$RO" && mount -o remount,bind,ro "$RO" "$RO" && exec "$@"',
                "sh"]
    return None


@pytest.mark.slow
def test_cli_on_a_read_only_filesystem(copy_of, tmp_path, data_root, cache_dir):
    prefix = _read_only_mount_command()
    if prefix is None:
        pytest.skip("no way to make a read-only folder here (root without mount namespaces)")
    run_dir = copy_of()
    outputs = run_dir.parent
    if not prefix:
        for p in [outputs, *outputs.rglob("*")]:
            p.chmod(p.stat().st_mode & ~0o222)
    before = {p: p.stat().st_mtime_ns for p in outputs.rglob("*")}
    env = {**os.environ, "QPRUNE_DATA": str(data_root), "QPRUNE_CACHE": str(cache_dir), "OMP_NUM_THREADS": "1",
           "RO": str(outputs), "QPRUNE_OUTPUTS": str(outputs / "outputs")}

    def qprune(*args):
        return subprocess.run([*prefix, sys.executable, "-m", "qprune", *args], env=env, capture_output=True, text=True,
                              timeout=600, cwd=tmp_path)

    try:
        finished = qprune(*BASE, f"hydra.run.dir={run_dir}")
        assert finished.returncode == 0, finished.stderr
        assert "all 3 levels are finished already" in finished.stdout and "Traceback" not in finished.stderr
        more = qprune(*BASE, "prune.levels=3", f"hydra.run.dir={run_dir}")
        assert more.returncode == 2 and more.stderr == (
            f"qprune: error: {run_dir} cannot be written (a read-only filesystem) and level 3 is left to train: copy it "
            "to a writable folder and rerun with hydra.run.dir=<the copy> to resume it\n")
        new = qprune(*BASE, "seed=5")
        assert new.returncode == 2 and new.stderr.startswith(
            f"qprune: error: cannot write the run directory {outputs / 'outputs'}/lenet_300_100-real3-mnist/")
        assert new.stderr.count("\n") == 1 and "write the outputs to a writable folder" in new.stderr
        assert {p: p.stat().st_mtime_ns for p in outputs.rglob("*")} == before, "nothing written"
    finally:
        if not prefix:
            for p in [outputs, *outputs.rglob("*")]:
                p.chmod(p.stat().st_mode | 0o200)


def test_a_log_file_that_cannot_be_written_costs_one_warning_line(tmp_path, capsys):
    """Hydra's file log on a full disk: one line on stderr, the handler silenced, logging goes on."""
    import logging

    from qprune.cli import guard_log_files

    class FullDisk(io.StringIO):
        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    logger = logging.getLogger("qprune-test-full-disk")
    logger.propagate = False
    handler = logging.FileHandler(tmp_path / "run.log", delay=True)
    handler.stream = FullDisk()
    console = logging.StreamHandler(sys.stdout)
    logger.addHandler(handler)
    logger.addHandler(console)
    try:
        guard_log_files(logger)
        logger.warning("first")
        logger.warning("second")
    finally:
        logger.removeHandler(console)
    out, err = capsys.readouterr()
    assert err.splitlines() == [f"qprune: warning: cannot write the log file {tmp_path / 'run.log'}: "
                                "No space left on device; the run goes on without it"]
    assert "Logging error" not in err and out.splitlines() == ["first", "second"]
    assert handler.level > logging.CRITICAL, "silenced: later records are not tried again"
