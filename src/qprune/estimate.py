"""What a run will cost before it starts: how many trainings of how many steps, and a timed guess.

``dry_run=true`` shows this. The step time is measured, not guessed: a few training steps of the
real model on random images of the dataset's shape, on the device the run would use, and one
evaluation batch. Data sizes come from the known datasets (an image folder's are unknown until it
is read, so its estimate is left out). The guess ignores start-up (data loading, a CUDA graph's
capture) and is rough on a GPU, where the captured step runs faster than the eager one timed here.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data import RawSplits, device_data
from .data.pipeline import _size
from .models import build_model
from .reporting import duration  # noqa: F401 - re-exported for the dry run
from .settings import Settings
from .training import make_optimizer

# (train, test) images of the datasets qprune knows (the CIFAR JPEG copy has the same), their shape and classes
DATASET_SIZES = {"mnist": (60_000, 10_000), "fashion_mnist": (60_000, 10_000),
                 "cifar10": (50_000, 10_000), "cifar100": (50_000, 10_000)}
DATASET_IMAGES = {"mnist": (1, 28, 28), "fashion_mnist": (1, 28, 28), "cifar10": (3, 32, 32), "cifar100": (3, 32, 32)}
CLASSES = {"cifar100": 100}


@dataclass(frozen=True)
class Sizes:
    train: int
    val: int
    test: int


def split_sizes(s: Settings) -> Sizes | None:
    """The images a run trains and evaluates on (the data pipeline's own rules), or None when unknown."""
    if s.dataset.name not in DATASET_SIZES:
        return None
    train, test = DATASET_SIZES[s.dataset.name]
    val = _size(s.data.val_size, train, "data.val_size")
    train -= val
    if s.data.train_size is not None:
        train = _size(s.data.train_size, train + 1, "data.train_size") or train
    if s.data.test_size is not None:
        test = _size(s.data.test_size, test + 1, "data.test_size") or test
    return Sizes(train, val, test)


def image_shape(s: Settings) -> tuple[int, int, int] | None:
    if s.dataset.name in DATASET_IMAGES:
        return DATASET_IMAGES[s.dataset.name]
    if s.dataset.image_size:
        return (s.dataset.channels, s.dataset.image_size, s.dataset.image_size)
    return None


@dataclass(frozen=True)
class Trainings:
    """How much training a run still has: trainings (a level's, a baseline's, a phase-A round's) and their steps."""

    trainings: int
    steps: int
    evaluations: int     # epochs evaluated (each on the test and validation images)


def remaining_work(s: Settings, sizes: Sizes, finished_levels: int = 0, finished_rounds: int = 0) -> Trainings:
    """The trainings a run has left: its levels from ``finished_levels`` on with their baselines, and
    (``protocol=paper``) phase A's rounds from ``finished_rounds`` on (rounds 0 .. finished_rounds-1 are
    on disk; round 0 is level 0's own training when the epochs agree)."""
    steps_per_epoch = s.train.steps_per_epoch(sizes.train)
    trainings = steps = evaluations = 0

    def train(epochs: int) -> None:
        nonlocal trainings, steps, evaluations
        n = epochs * steps_per_epoch if s.train.max_steps is None else min(epochs * steps_per_epoch, s.train.max_steps)
        trainings, steps, evaluations = trainings + 1, steps + n, evaluations + math.ceil(n / steps_per_epoch)

    for level in range(finished_levels, s.prune.levels + 1):
        train(s.train.epochs)
        if level > 0:
            for _ in s.baselines:
                train(s.train.epochs)
    if s.protocol.name == "paper":   # phase A's rounds beside phase B's trainings
        mask_epochs = s.protocol.mask_epochs or s.train.epochs
        for round_ in range(finished_rounds, s.prune.levels + 1):
            if round_ > 0 or mask_epochs != s.train.epochs:
                train(mask_epochs)
    return Trainings(trainings * s.trials, steps * s.trials, evaluations * s.trials)


@dataclass(frozen=True)
class Timing:
    step_seconds: float
    eval_seconds_per_image: float
    device: str


def time_steps(s: Settings, device: torch.device, budget: float = 0.5) -> Timing | None:
    """Seconds per training step and per evaluated image, measured on random images (None: shape unknown)."""
    shape = image_shape(s)
    if shape is None:
        return None
    g = torch.Generator().manual_seed(0)
    batch = s.train.batch_size
    images = torch.randint(0, 256, (max(batch, 2), *shape), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (len(images),), generator=g)
    raw = RawSplits(images, labels, images, labels, [str(i) for i in range(10)], "random")
    data = device_data(raw, device, mean=s.dataset.mean, std=s.dataset.std,
                       add_gray=s.algebra.adds_gray and shape[0] == 3)
    torch.manual_seed(0)
    model = build_model(s.model, s.algebra, CLASSES.get(s.dataset.name, 10), shape, **s.model_options).to(device)
    optimizer = make_optimizer(model, s.train)
    x, y = data.model_input(data.train.x[:batch]), data.train.y[:batch]

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        optimizer.step()

    step_seconds = _timed(step, device, budget)
    model.eval()
    with torch.no_grad():
        eval_seconds = _timed(lambda: model(x), device, budget / 2)
    return Timing(step_seconds, eval_seconds / len(x), str(device))


def _timed(call, device: torch.device, budget: float) -> float:
    """Seconds per call after one warm-up call, over as many calls as fit in ``budget`` (at least one)."""
    call()
    _sync(device)
    calls, start = 0, time.perf_counter()
    while calls == 0 or (time.perf_counter() - start < budget and calls < 20):
        call()
        _sync(device)
        calls += 1
    return (time.perf_counter() - start) / calls


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def estimate_seconds(work: Trainings, sizes: Sizes, timing: Timing) -> float:
    eval_images = sizes.test + sizes.val
    return work.steps * timing.step_seconds + work.evaluations * eval_images * timing.eval_seconds_per_image


