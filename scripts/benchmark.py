"""Time the training loops on the current device: the original study's style, the eager loop, the engine.

    python scripts/benchmark.py                    # LeNet-300-100/MNIST and Conv-4/CIFAR-10, real3 and quat
    python scripts/benchmark.py --quick            # the same sweep with fewer steps and one repeat (~2 min on a GPU)
    python scripts/benchmark.py --models lenet_300_100,conv2,conv4,conv6 --algebras real3,real4,quat --out table.md
    python scripts/benchmark.py --models conv4 --algebras real3,complex,quat,phm2,phm4,phm4q   # step time per algebra

For each model x algebra, in one process (batch 60, Adam, a dense level: all-ones masks):

- ``original``: what the original study's code does — a torchvision ``DataLoader`` over a dataset that
  turns each image into a PIL image and runs torchvision transforms (CIFAR: ``RandomCrop(32, padding=4)``,
  ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize``; the gray channel appended per image), a copy of
  each batch to the device, an optimizer step and ``loss.item()`` every step; torch's default precision
  switches (cuDNN TF32 on, matmul TF32 off);
- ``eager``: :func:`qprune.training.train_level`, data on the device (the reference loop);
- ``graph`` (CUDA) / ``engine`` (CPU): :class:`qprune.engine.Engine`, one run;
- ``trials``: the engine with ``--trials`` runs in one batched step (run-steps/s = K x it/s);

in each ``--precisions`` (fp32 = TF32 off, tf32, bf16 autocast). Warm-up (graph capture included) is
excluded; the time is the median over ``--repeats`` of the training time of a level cut at ``--steps``
steps (evaluation excluded, the epoch's on-device shuffle and augmentation included). TFLOP/s count the
forward and backward matmul/conv FLOPs (``torch.utils.flop_counter``) of one step. The forward and the
backward pass are also timed on their own (CUDA graphs on the GPU: kernel time without launch gaps),
for every algebra, to compare quaternion and real backpropagation. Finally a full lottery-ticket run
(21 levels x the model's epochs, with an evaluation of the 10,000 test images per epoch) is estimated
from the measured step and evaluation times.

Imports only torch, torchvision, numpy/PIL and qprune modules that need no Hydra.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # this checkout's qprune, installed or not

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from qprune import build_model  # noqa: E402
from qprune.algebra import Algebra  # noqa: E402
from qprune.data import GRAY_WEIGHTS, DatasetSettings, device_data, load_raw  # noqa: E402
from qprune.engine import Engine  # noqa: E402
from qprune.pruning import Masks, prunable_weights  # noqa: E402
from qprune.training import TrainSettings, set_precision, train_level  # noqa: E402

TEST_IMAGES = 10_000  # what the evaluation of a real run reads every epoch


def _rate(per_second: float) -> str:
    """Steps per second with three significant figures at least (a slow CPU runs a few per second)."""
    return f"{per_second:,.0f}" if per_second >= 100 else f"{per_second:.3g}"


def log(message: str) -> None:
    print(message, flush=True)


# ---------------------------------------------------------------------------------------------- configs
def conf_value(path: Path, key: str) -> str:
    """A scalar from one of conf/'s yaml files (flat ``key: value`` lines; no yaml library needed)."""
    for line in path.read_text().splitlines():
        match = re.match(rf"\s*(?:- override /)?{re.escape(key)}:\s*([^#]*)", line)
        if match:
            return match.group(1).strip()
    raise KeyError(f"{key} not in {path}")


def dataset_settings(model: str) -> DatasetSettings:
    name = conf_value(REPO / "conf" / "model" / f"{model}.yaml", "dataset")
    path = REPO / "conf" / "dataset" / f"{name}.yaml"
    floats = lambda key: tuple(float(v) for v in conf_value(path, key).strip("[]").split(","))  # noqa: E731
    return DatasetSettings(name, int(conf_value(path, "channels")), floats("mean"), floats("std"),
                           conf_value(path, "augment"))


def lth_run_shape(model: str) -> tuple[int, int]:
    """(levels, epochs) of a full lottery-ticket run of ``model`` with the default schedule."""
    levels = int(conf_value(REPO / "conf" / "prune" / "imp.yaml", "levels")) + 1
    return levels, int(conf_value(REPO / "conf" / "model" / f"{model}.yaml", "epochs"))


# ---------------------------------------------------------------------------------------------- results
@dataclass
class Row:
    model: str
    algebra: str
    mode: str
    precision: str
    runs: int
    seconds_per_step: float
    flops_per_step: float  # of one run
    notes: str = ""

    @property
    def its(self) -> float:
        return 1.0 / self.seconds_per_step

    @property
    def run_steps(self) -> float:
        return self.runs * self.its

    @property
    def tflops(self) -> float:
        return self.flops_per_step * self.run_steps / 1e12


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)
    passes: list[tuple[str, str, float, float, float]] = field(default_factory=list)  # model, algebra, fwd, bwd, flops
    lth: list[tuple[str, str, str, float]] = field(default_factory=list)  # model, algebra, precision, minutes

    def add(self, row: Row) -> None:
        self.rows.append(row)
        log(f"  {row.mode:9s} {row.precision:8s} K={row.runs:<3d} {row.its:9.1f} it/s  {row.run_steps:9.1f} run-steps/s"
            f"  {1000 * row.seconds_per_step:7.3f} ms/step  {row.tflops:6.2f} TFLOP/s {row.notes}")

    def find(self, model, algebra, mode, precision=None, runs=1) -> Row | None:
        for r in self.rows:
            if (r.model, r.algebra, r.mode, r.runs) == (model, algebra, mode, runs) and precision in (None, r.precision):
                return r
        return None

    def as_json(self, machine: str) -> dict:
        rows = [{**asdict(r), "its": r.its, "run_steps": r.run_steps, "tflops": r.tflops} for r in self.rows]
        passes = [dict(zip(("model", "algebra", "forward_s", "backward_s", "flops"), p)) for p in self.passes]
        lth = [dict(zip(("model", "algebra", "loop", "minutes"), e)) for e in self.lth]
        return {"machine": machine, "rows": rows, "passes": passes, "lth_minutes": lth}

    def markdown(self, header: str) -> str:
        lines = [header, "", "| model | algebra | loop | precision | runs | ms/step | it/s | run-steps/s | TFLOP/s "
                 "| × original | × eager |", "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in self.rows:
            original = self.find(r.model, r.algebra, "original")
            eager = self.find(r.model, r.algebra, "eager", r.precision)
            ratio = lambda base: f"{r.run_steps / base.run_steps:.1f}" if base else "—"  # noqa: E731
            lines.append(f"| {r.model} | {r.algebra} | {r.mode}{' ' + r.notes if r.notes else ''} | {r.precision} "
                         f"| {r.runs} | {1000 * r.seconds_per_step:.3f} | {_rate(r.its)} | {_rate(r.run_steps)} "
                         f"| {r.tflops:.2f} | {ratio(original)} | {ratio(eager)} |")
        if self.passes:
            lines += ["", "Forward and backward pass on their own (batch 60, fp32, one run):", "",
                      "| model | algebra | forward ms | backward ms | backward / forward | GFLOP fwd+bwd "
                      "| forward × real3 | backward × real3 |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
            for model, algebra, fwd, bwd, flops in self.passes:
                real = next((p for p in self.passes if p[:2] == (model, "real3")), None)
                rel = lambda i: f"{(fwd, bwd)[i] / real[2 + i]:.2f}" if real else "—"  # noqa: E731
                lines.append(f"| {model} | {algebra} | {1000 * fwd:.3f} | {1000 * bwd:.3f} | {bwd / fwd:.2f} "
                             f"| {flops / 1e9:.2f} | {rel(0)} | {rel(1)} |")
        if self.lth:
            lines += ["", "Estimated full lottery-ticket run (one run; levels x epochs x (steps + evaluation of "
                      f"{TEST_IMAGES:,} test images)):", "", "| model | algebra | loop | minutes |",
                      "| --- | --- | --- | ---: |"]
            lines += [f"| {m} | {a} | {p} | {minutes:.1f} |" for m, a, p, minutes in self.lth]
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fresh_model(model: str, algebra: str, data, device: torch.device, seed: int = 0):
    torch.manual_seed(seed)
    net = build_model(model, Algebra.from_tag(algebra), data.num_classes, data.image_shape).to(device)
    weights = prunable_weights(net)
    return net, Masks.ones(net, weights), [w.name for w in weights]


def step_flops(net, data, batch: int) -> float:
    """Forward + backward FLOPs of one step of one run (matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    x, y = data.model_input(data.train.x[:batch]), data.train.y[:batch]
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(net(x), y).backward()
    net.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def settings(args, precision: str, steps: int) -> TrainSettings:
    return TrainSettings(lr=1e-4, batch_size=args.batch, epochs=1, max_steps=steps, precision=precision)


def time_levels(train, repeats: int) -> float:
    """Median seconds per step over ``repeats`` levels (``train()`` -> a LevelTraining; evaluation excluded)."""
    times = []
    for _ in range(repeats):
        result = train()
        times.append(result.seconds / result.steps)
    return statistics.median(times)


def generator(device: torch.device, seed: int = 0) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


class PILImages(torch.utils.data.Dataset):
    """The original study's input pipeline: every image becomes a PIL image and goes through transforms."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform):
        self.x, self.y, self.transform = x.numpy(), y.tolist(), transform

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        from PIL import Image

        image = self.x[i]
        image = Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0))
        return self.transform(image), self.y[i]


class AppendGray:
    """Per image, after Normalize: [R, G, B] -> [R, G, B, 0.2989R + 0.587G + 0.114B]."""

    def __init__(self):
        self.weights = torch.tensor(GRAY_WEIGHTS).view(3, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((x, (x * self.weights).sum(0, keepdim=True)))


def original_loop(args, dataset: DatasetSettings, data, net, masks, device, steps: int, repeats: int) -> float:
    """Seconds per step of the original study's style of loop (see the module docstring)."""
    from torchvision import transforms

    chain = []
    if dataset.augment == "crop_flip":
        chain += [transforms.RandomCrop(data.image_shape[1], padding=4), transforms.RandomHorizontalFlip()]
    chain += [transforms.ToTensor(), transforms.Normalize(dataset.mean, dataset.std)]
    if data.add_gray:
        chain.append(AppendGray())
    images = PILImages(data.train.x.cpu(), data.train.y.cpu(), transforms.Compose(chain))
    loader = torch.utils.data.DataLoader(images, batch_size=args.batch, shuffle=True, drop_last=True,
                                         num_workers=args.workers, pin_memory=device.type == "cuda",
                                         persistent_workers=args.workers > 0)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
    params, float_masks = masks.parameters_of(net)
    batches = iter(loader)

    def next_batch():
        nonlocal batches
        try:
            return next(batches)
        except StopIteration:
            batches = iter(loader)
            return next(batches)

    def run(n: int) -> float:
        sync(device)
        start = time.perf_counter()
        running = 0.0
        for _ in range(n):
            x, y = next_batch()
            x, y = x.to(device), y.to(device)
            loss = F.cross_entropy(net(x), y)
            optimizer.zero_grad()
            loss.backward()
            for p, m in zip(params, float_masks):
                p.grad.mul_(m)
            optimizer.step()
            running += loss.item()
        sync(device)
        return (time.perf_counter() - start) / n

    run(args.warmup)
    return statistics.median(run(steps) for _ in range(repeats))


def pass_times(net, data, batch: int, device: torch.device, n: int) -> tuple[float, float]:
    """(forward, backward) seconds of one training step's passes; CUDA graphs on the GPU (no launch gaps)."""
    x, y = data.model_input(data.train.x[:batch]), data.train.y[:batch]

    def forward():
        return F.cross_entropy(net(x), y)

    def forward_backward():
        net.zero_grad(set_to_none=True)
        forward().backward()

    if device.type != "cuda":
        def timed(fn) -> float:
            fn()
            times = []
            for _ in range(n):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            return statistics.median(times)

        fwd, both = timed(forward), timed(forward_backward)
        return fwd, both - fwd

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            forward_backward()
    torch.cuda.current_stream().wait_stream(side)
    graphs = []
    for fn in (forward, forward_backward):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        graphs.append(graph)
    times = []
    for graph in graphs:
        for _ in range(3):
            graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000 / n)
    del graphs
    return times[0], times[1] - times[0]


def eval_seconds(engine: Engine, data, device) -> float:
    """Seconds to evaluate ``TEST_IMAGES`` test images (scaled from the benchmark's test split)."""
    engine.correct(data.test)
    sync(device)
    start = time.perf_counter()
    engine.correct(data.test)
    sync(device)
    return (time.perf_counter() - start) * TEST_IMAGES / len(data.test)


# ---------------------------------------------------------------------------------------------- the sweep
def benchmark_model(args, model: str, device: torch.device, results: Results) -> None:
    dataset = dataset_settings(model)
    raw = load_raw(dataset.name, args.data_root, args.cache, download=False)
    for algebra in args.algebras:
        try:
            add_gray = Algebra.from_tag(algebra).adds_gray
            Algebra.from_tag(algebra).input_channels(dataset.channels, flat=model.startswith("lenet"))
        except ValueError as exc:
            log(f"[{model}/{algebra}] skipped: {exc}")
            continue
        data = device_data(raw, device, mean=dataset.mean, std=dataset.std, add_gray=add_gray and dataset.channels == 3,
                           augment=dataset.augment, train_size=args.train_size, test_size=args.test_size)
        per_epoch = -(-len(data.train) // args.batch)
        steps = {mode: min(per_epoch, n) for mode, n in args.steps.items()}
        full_epoch = -(-len(raw.train_x) // args.batch)  # a real run's steps per epoch
        log(f"[{model}/{algebra}] {len(data.train)} train images, {per_epoch} steps per epoch, on {device}")
        net, masks, _ = fresh_model(model, algebra, data, device)
        flops = step_flops(net, data, args.batch)

        if "original" in args.modes:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True  # torch's defaults
            seconds = original_loop(args, dataset, data, net, masks, device, steps["original"], args.repeats)
            results.add(Row(model, algebra, "original", "default", 1, seconds, flops, f"({args.workers} workers)"))
        del net, masks

        if "passes" in args.modes:
            set_precision("fp32")
            fwd, bwd = pass_times(fresh_model(model, algebra, data, device)[0], data, args.batch, device, args.pass_steps)
            results.passes.append((model, algebra, fwd, bwd, flops))
            log(f"  passes    fp32     forward {1000 * fwd:.3f} ms, backward {1000 * bwd:.3f} ms")

        for precision in args.precisions:
            where = (args, model, algebra, data, device, precision, flops, results)
            if "eager" in args.modes:
                measure_eager(*where, steps["eager"])
            if "graph" in args.modes:
                measure_engine(*where, steps["graph"], full_epoch)
                if args.channels_last and precision == "tf32" and not model.startswith("lenet"):
                    measure_engine(*where, steps["graph"], full_epoch, channels_last=True)
            if "trials" in args.modes and args.trials > 1:
                measure_engine(*where, steps["trials"], full_epoch, runs=args.trials)
        del data
        free(device)


def measure_eager(args, model, algebra, data, device, precision, flops, results, steps) -> None:
    net, masks, _ = fresh_model(model, algebra, data, device)
    train_level(net, data, masks, settings(args, precision, min(args.warmup, steps)), generator(device))  # warm-up

    def train():
        return train_level(net, data, masks, settings(args, precision, steps), generator(device))

    results.add(Row(model, algebra, "eager", precision, 1, time_levels(train, args.repeats), flops))


def measure_engine(args, model, algebra, data, device, precision, flops, results, steps, full_epoch,
                   runs: int = 1, channels_last: bool = False) -> None:
    """The engine with ``runs`` runs (a graph on CUDA); one run also gives the lottery-ticket run estimate."""
    nets = [fresh_model(model, algebra, data, device, seed) for seed in range(runs)]
    engine = Engine([n for n, _, _ in nets], data, settings(args, precision, steps), nets[0][2],
                    graph=device.type == "cuda", channels_last=channels_last)

    def train():
        return engine.train_level([m for _, m, _ in nets], [generator(device, k) for k in range(runs)])[0]

    start = time.perf_counter()
    train()  # warm-up: the capture and a first level
    warmup = time.perf_counter() - start
    mode = "trials" if runs > 1 else "graph" if engine.graph else "engine"
    row = Row(model, algebra, mode, precision, runs, time_levels(train, args.repeats), flops,
              "channels_last" if channels_last else "")
    results.add(row)
    if runs == 1 and not channels_last:
        levels, epochs = lth_run_shape(model)
        minutes = levels * epochs * (full_epoch * row.seconds_per_step + eval_seconds(engine, data, device)) / 60
        results.lth.append((model, algebra, f"{mode} {precision}", minutes))
        log(f"  (capture and first level {warmup:.1f} s; a full lottery-ticket run ≈ {minutes:.1f} min)")
    del engine, nets
    free(device)


def free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            name = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        name += f", {torch.get_num_threads()} threads"
    return f"{name}; torch {torch.__version__}; {datetime.date.today().isoformat()}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps, one repeat (the full sweep in a few minutes)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--data-root", default=os.environ.get("QPRUNE_DATA", str(REPO.parent / "shared" / "data")))
    parser.add_argument("--cache", default=os.environ.get("QPRUNE_CACHE", "~/.cache/qprune"), help="decoded-image cache (CIFAR JPEGs)")
    parser.add_argument("--models", default="lenet_300_100,conv4")
    parser.add_argument("--algebras", default="real3,quat",
                        help="real3, real4, complex, quat, phm<n> (PHM, random rules), phm4q (PHM-4, quaternion rules)")
    parser.add_argument("--modes", default="original,passes,eager,graph,trials")
    parser.add_argument("--precisions", default=None, help="default: fp32,tf32,bf16 on CUDA (--quick: tf32,bf16); fp32 on the CPU")
    parser.add_argument("--trials", type=int, default=10, help="runs per batched step in the trials mode")
    parser.add_argument("--batch", type=int, default=60)
    parser.add_argument("--steps", type=int, default=None, help="steps per timed level (default: by mode and device)")
    parser.add_argument("--repeats", type=int, default=None, help="timed levels per measurement, median (default 3; --quick 1)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps before the original and eager loops")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers of the original loop (default 2 on CUDA, 0 on the CPU)")
    parser.add_argument("--test-size", type=int, default=None, help="test images evaluated per level (default 1000 on CUDA, 100 on the CPU)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="also time the convnets' graph step in channels_last (tf32; default on CUDA without --quick)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--out", type=Path, help="also write the markdown tables to this file")
    parser.add_argument("--json", type=Path, help="also write the measurements as JSON (scripts/gpu_check.py reads them)")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    cuda = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    args.models, args.algebras = args.models.split(","), args.algebras.split(",")
    args.modes = set(args.modes.split(","))
    args.precisions = (args.precisions or ("fp32" if not cuda else "tf32,bf16" if args.quick else "fp32,tf32,bf16")).split(",")
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.workers = args.workers if args.workers is not None else (2 if cuda else 0)
    args.test_size = args.test_size or (1000 if cuda else 100)
    args.channels_last = args.channels_last if args.channels_last is not None else (cuda and not args.quick)
    scale = 0.4 if args.quick else 1.0
    default = ({"original": 200, "eager": 300, "graph": 1000, "trials": 300} if cuda else
               {"original": 30, "eager": 60, "graph": 60, "trials": 60})
    args.steps = {mode: args.steps or max(10, int(n * scale)) for mode, n in default.items()}
    # On the CPU a timed level is one epoch of a training subset, so the epoch's shuffle and augmentation
    # weigh per step what they weigh in a real epoch (on a GPU they are ~0.1% of an epoch anyway).
    args.train_size = None if cuda else args.batch * max(args.steps["eager"], args.steps["graph"], args.steps["trials"])
    args.pass_steps = 50 if cuda else 10
    args.warmup = args.warmup if cuda else min(args.warmup, 5)

    started = time.perf_counter()
    log(f"benchmark on {machine(device)}")
    log(f"models {args.models}, algebras {args.algebras}, precisions {args.precisions}, steps {args.steps}, "
        f"repeats {args.repeats}")
    results = Results()
    for model in args.models:
        benchmark_model(args, model, device, results)
    header = (f"Benchmark: {machine(device)}; batch {args.batch}; steps per timed level {args.steps}; median of "
              f"{args.repeats}; {time.perf_counter() - started:.0f} s in all.")
    table = results.markdown(header)
    log("\n" + table)
    if args.out:
        args.out.write_text(table)
        log(f"written to {args.out}")
    if args.json:
        args.json.write_text(json.dumps(results.as_json(machine(device)), indent=1))


if __name__ == "__main__":
    main()
