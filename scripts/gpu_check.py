"""Check qprune on a GPU with one command: the GPU tests, a real run through the graph engine, the benchmarks.

    python scripts/gpu_check.py --out report.md --data-root .data                 # everything, ~8 min (H100/H200)
    python scripts/gpu_check.py --out report.md --data-root .data --budget-s 300  # a sweep trimmed to 5 minutes
    python scripts/gpu_check.py --dry-run --out /tmp/report.md                    # every step at toy size, on the CPU

The steps, each in its own process (one crash does not hide the others), correctness first:

1. ``tests``: ``pytest -m gpu`` over the test files that have GPU tests (graph = eager on CUDA, the
   graphs' check and the eager fallback, trials, bf16, TF32 switches, no host syncs, QBN/ResNets);
2. ``engines``: the level runner (2 levels of Conv-4 quat on a CIFAR-10 slice) with ``train.engine=auto``
   — which must keep the CUDA graphs, not fall back — and with ``train.engine=eager``, same seed; the
   levels must agree (test accuracy within 3 points, train loss within 10%); their speed is compared;
3. ``bench_conv4``, ``bench_lenet``: ``scripts/benchmark.py`` for Conv-4/CIFAR-10 and LeNet-300-100/MNIST,
   real3 and quat, fp32/tf32/bf16, the original study's loop, the eager loop, one graph run and trials=10;
4. ``bench_resnet``: ``scripts/bench_resnet.py``, a ResNet-20 training step per algebra (batch 128, fp32).

Then the measured figures against the targets (issues 4, 5, 14): reported, not enforced — a slower GPU
is not a broken one. The markdown report (device, versions, date, every table) is rewritten after each
step, so a run cut short still leaves one; every step's output goes to ``<out>.log``. Exit status 1
if a check failed, timed out or could not run; 0 if every check that ran passed.

``--budget-s`` (default 480) trims the sweep to the time left: the benchmarks shrink to their ``--quick``
form, then the lowest-priority steps are left out (listed as skipped). The per-step estimates below are
guesses for one H100/H200 until a report has measured them.

Needs only torch, torchvision and this checkout (and pytest for step 1, which the GPU images have); no
Hydra, OmegaConf or W&B. Data: MNIST (``MNIST/raw/*.gz``) and CIFAR-10 (``cifar10-jpeg.tar.xz``) under
``--data-root``; docs/benchmarks.md says how to bring them to a machine that cannot see ../shared/data.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"

# Seconds per step on one H100/H200 (guesses until measured), by scale; the order is the priority.
ESTIMATES = {
    "tests": {"full": 150},
    "engines": {"full": 90, "quick": 50},
    "bench_conv4": {"full": 210, "quick": 90},
    "bench_resnet": {"full": 25, "quick": 15},
    "bench_lenet": {"full": 90, "quick": 40},
}
TITLES = {
    "tests": "GPU tests (pytest -m gpu)",
    "engines": "Level runner: graph engine (train.engine=auto) vs eager loop",
    "bench_conv4": "Benchmark: Conv-4 / CIFAR-10",
    "bench_resnet": "ResNet-20 training step per algebra",
    "bench_lenet": "Benchmark: LeNet-300-100 / MNIST",
}
ACCURACY_TOLERANCE = 3.0   # points of test accuracy between the graph and the eager run of a level (GPU rounding)
LOSS_TOLERANCE = 0.10      # relative train loss between them
RESERVE_S = 10             # left at the end of the budget for writing the report
NOT_ON_A_GPU_MACHINE = ("hydra", "omegaconf", "wandb")  # the dry run blocks their import


# ---------------------------------------------------------------------------------------------- the plan
@dataclass
class Planned:
    step: str
    scale: str   # full | quick | tiny (dry run) | skipped
    estimate: float


def plan(budget_s: float, dry_run: bool = False) -> list[Planned]:
    """Which steps run, at which scale, to fit ``budget_s``: all at their smallest scale, the lowest-priority
    ones dropped until that fits, then upgraded to full size in priority order while it still fits."""
    if dry_run:  # Conv-4's benchmark would be LeNet's again at toy size: run once
        return [Planned(step, "skipped" if step == "bench_conv4" else "tiny", 30.0) for step in ESTIMATES]
    smallest = {step: min(scales, key=scales.get) for step, scales in ESTIMATES.items()}
    chosen = dict(smallest)
    budget = budget_s - RESERVE_S
    for step in reversed(list(ESTIMATES)):
        if sum(ESTIMATES[s][chosen[s]] for s in chosen) <= budget:
            break
        del chosen[step]
    for step in list(chosen):
        total = sum(ESTIMATES[s][chosen[s]] for s in chosen)
        if "full" in ESTIMATES[step] and total - ESTIMATES[step][chosen[step]] + ESTIMATES[step]["full"] <= budget:
            chosen[step] = "full"
    return [Planned(step, chosen.get(step, "skipped"), ESTIMATES[step][chosen[step]] if step in chosen else 0.0)
            for step in ESTIMATES]


# ---------------------------------------------------------------------------------------------- results
@dataclass
class Outcome:
    step: str
    status: str = "not run"      # passed | FAILED | TIMED OUT | skipped (...)
    scale: str = ""
    seconds: float = 0.0
    summary: str = ""
    body: str = ""               # markdown: tables, failure output
    data: dict = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.status in ("FAILED", "TIMED OUT")


class Check:
    """Runs the planned steps as subprocesses within the budget and keeps the report up to date."""

    def __init__(self, args):
        self.args, self.started = args, time.monotonic()
        self.out: Path = args.out
        self.log_path = self.out.with_name(self.out.name + ".log")
        self.work = Path(tempfile.mkdtemp(prefix="qprune-gpu-check-"))
        self.outcomes: dict[str, Outcome] = {}
        self.environment = environment(args.dry_run)
        self.log_path.write_text("")
        self.blocked = self.work / "not-on-a-gpu-machine"
        if args.dry_run:  # what a fresh GPU machine lacks cannot be imported in the dry run either
            for package in NOT_ON_A_GPU_MACHINE:
                (self.blocked / package).mkdir(parents=True)
                (self.blocked / package / "__init__.py").write_text(
                    f"raise ImportError('{package} is not on a fresh GPU machine: gpu_check.py steps must not need it')\n")

    def remaining(self) -> float:
        return self.args.budget_s - (time.monotonic() - self.started)

    def env(self) -> dict[str, str]:
        paths = [*([str(self.blocked)] if self.args.dry_run else []), str(REPO / "src"),
                 *filter(None, [os.environ.get("PYTHONPATH")])]
        return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "PYTHONUNBUFFERED": "1",
                "QPRUNE_DATA": str(self.args.data_root), "QPRUNE_TEST_DATA": str(self.args.data_root),
                "QPRUNE_CACHE": str(self.args.cache)}

    def execute(self, command: list[str], estimate: float) -> tuple[int | None, str, float]:
        """(exit status or None on timeout, output, seconds); the output also goes to the log."""
        timeout = max(1.0, min(self.remaining() - RESERVE_S, 3 * estimate + 60))
        start = time.monotonic()
        with open(self.log_path, "a") as log:
            log.write(f"\n$ {' '.join(command)}   (timeout {timeout:.0f} s)\n")
            log.flush()
            try:
                done = subprocess.run(command, cwd=REPO, env=self.env(), capture_output=True, text=True, timeout=timeout)
                code, output = done.returncode, done.stdout + done.stderr
            except subprocess.TimeoutExpired as exc:
                code = None
                output = "".join(part.decode() if isinstance(part, bytes) else (part or "") for part in (exc.stdout, exc.stderr))
            log.write(output)
        return code, output, time.monotonic() - start

    def run(self) -> int:
        for planned in plan(self.args.budget_s, self.args.dry_run):
            if self.args.only and planned.step not in self.args.only:
                continue
            outcome = Outcome(planned.step)
            self.outcomes[planned.step] = outcome
            scale = planned.scale
            if scale not in ("skipped", "tiny") and self.remaining() - RESERVE_S < ESTIMATES[planned.step][scale]:
                smaller = min(ESTIMATES[planned.step], key=ESTIMATES[planned.step].get)
                scale = smaller if self.remaining() - RESERVE_S >= ESTIMATES[planned.step][smaller] else "skipped"
            outcome.scale = scale
            if scale == "skipped":
                outcome.status = "skipped (dry run: LeNet's benchmark at toy size)" if self.args.dry_run else "skipped (budget)"
                self.write()
                continue
            print(f"[gpu_check] {TITLES[planned.step]} ({scale}) ...", flush=True)
            started = time.monotonic()
            try:
                STEPS[planned.step](self, outcome, scale, ESTIMATES.get(planned.step, {}).get(scale, 30.0))
            except Exception:  # noqa: BLE001 - a bug in reading a step's results must not hide the other steps
                outcome.status, outcome.seconds = "FAILED", time.monotonic() - started
                outcome.summary = "gpu_check.py could not read its results"
                outcome.body += "\n" + tail(traceback.format_exc())
            print(f"[gpu_check] {TITLES[planned.step]}: {outcome.status} in {outcome.seconds:.0f} s", flush=True)
            self.write()
        self.write(final=True)
        shutil.rmtree(self.work, ignore_errors=True)
        failed = [o.step for o in self.outcomes.values() if o.failed]
        print(f"[gpu_check] {'FAILED: ' + ', '.join(failed) if failed else 'all checks that ran passed'}; report: {self.out}")
        return 1 if failed else 0

    # ------------------------------------------------------------------------------------------ report
    def write(self, final: bool = False) -> None:
        elapsed = time.monotonic() - self.started
        failed = [o for o in self.outcomes.values() if o.failed]
        verdict = ("FAILED: " + ", ".join(TITLES[o.step] for o in failed)) if failed else "every check that ran passed"
        lines = ["# qprune GPU check", "", "| | |", "| --- | --- |"]
        lines += [f"| {k} | {v} |" for k, v in self.environment.items()]
        lines += [f"| command | `{' '.join(self.args.argv)}` |",
                  f"| time | {elapsed:.0f} s of a {self.args.budget_s:.0f} s budget{'' if final else ' (still running)'} |", "",
                  f"**Result: {verdict}.**", "", "| step | scale | result | seconds | summary |", "| --- | --- | --- | ---: | --- |"]
        lines += [f"| {TITLES[o.step]} | {o.scale} | {o.status} | {o.seconds:.0f} | {o.summary.replace('|', '/')} |"
                  for o in self.outcomes.values()]
        lines += ["", "## Targets", "", targets_table(self.outcomes, judge=not self.args.dry_run), ""]
        for o in self.outcomes.values():
            if o.body:
                lines += [f"## {TITLES[o.step]}", "", o.body.rstrip(), ""]
        lines += [f"Every step's full output: `{self.log_path.name}` beside this report.", ""]
        tmp = self.out.with_name(f".{self.out.name}.tmp")
        tmp.write_text("\n".join(lines))
        os.replace(tmp, self.out)


def tail(text: str, lines: int = 25) -> str:
    return "```\n" + "\n".join(text.rstrip().splitlines()[-lines:]) + "\n```\n"


def finish(outcome: Outcome, code: int | None, output: str, seconds: float, ok: bool, summary: str) -> None:
    outcome.seconds = seconds
    if code is None:
        outcome.status, outcome.summary = "TIMED OUT", f"stopped after {seconds:.0f} s"
    else:
        outcome.status, outcome.summary = ("passed" if ok and code == 0 else "FAILED"), summary
    if outcome.failed:
        outcome.body += "\nThe end of its output:\n\n" + tail(output)


# ---------------------------------------------------------------------------------------------- the steps
def run_tests(check: Check, outcome: Outcome, scale: str, estimate: float) -> None:
    files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py") if "mark.gpu" in p.read_text())
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-p", "no:hydra_pytest", *files]
    if check.args.dry_run:
        command.append("--collect-only")  # the CPU has no GPU to test on: the files import and the tests are found
    code, output, seconds = check.execute(command, estimate)
    last = next((line.strip("= ") for line in reversed(output.splitlines()) if line.strip()), "")
    counts = {word.rstrip("s"): int(n) for n, word in
              re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed|warnings?)", last)}
    collected = re.search(r"(\d+)(?:/\d+)? tests? collected", last)
    if check.args.dry_run:
        ok = bool(collected) and int(collected.group(1)) > 0 and not counts.get("error")
    else:  # every GPU test ran (a skip means the GPU was not seen) and none failed
        ok = counts.get("passed", 0) > 0 and not any(counts.get(k) for k in ("failed", "error", "skipped", "xpassed"))
    finish(outcome, code, output, seconds, ok, last)
    outcome.body = f"`pytest -m gpu {' '.join(files)}`: {last}\n" + outcome.body


def run_engines(check: Check, outcome: Outcome, scale: str, estimate: float) -> None:
    result = check.work / "engines.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--compare-engines", str(result), "--scale", scale,
               "--data-root", str(check.args.data_root), "--cache", str(check.args.cache)]
    code, output, seconds = check.execute(command, estimate)
    if code != 0 or not result.is_file():
        finish(outcome, code, output, seconds, False, "the runs did not finish")
        return
    runs = json.loads(result.read_text())
    problems, body = compare_engines_report(runs, expect_graph=not check.args.dry_run)
    outcome.data = runs
    finish(outcome, code, output, seconds, not problems, "; ".join(problems) or runs["summary"])
    outcome.body = body + outcome.body


def run_benchmark(model: str):
    def run(check: Check, outcome: Outcome, scale: str, estimate: float) -> None:
        table, data = check.work / f"{model}.md", check.work / f"{model}.json"
        tiny = scale == "tiny"  # the dry run: LeNet-300-100 on MNIST in place of Conv-4 (no CIFAR decoding on the CPU)
        command = [sys.executable, str(SCRIPTS / "benchmark.py"), "--models", "lenet_300_100" if tiny else model,
                   "--algebras", "quat" if tiny else "real3,quat", "--out", str(table), "--json", str(data),
                   "--data-root", str(check.args.data_root), "--cache", str(check.args.cache)]
        if tiny:
            command += ["--device", "cpu", "--modes", "eager,graph,trials", "--steps", "2", "--repeats", "1",
                        "--trials", "2", "--warmup", "1", "--test-size", "50", "--precisions", "fp32"]
        else:
            command += ["--device", "cuda", "--trials", "10", "--precisions", "fp32,tf32,bf16",
                        *(["--quick"] if scale == "quick" else [])]
        code, output, seconds = check.execute(command, estimate)
        ok = code == 0 and data.is_file()
        outcome.data = json.loads(data.read_text()) if ok else {}
        finish(outcome, code, output, seconds, ok, f"{len(outcome.data.get('rows', []))} measurements" if ok else "no table")
        if table.is_file():
            outcome.body = table.read_text() + outcome.body
    return run


def run_bench_resnet(check: Check, outcome: Outcome, scale: str, estimate: float) -> None:
    data = check.work / "resnet.json"
    command = [sys.executable, str(SCRIPTS / "bench_resnet.py"), "--json", str(data)]
    command += {"tiny": ["--device", "cpu", "--batch", "2", "--image", "8", "--repeats", "2", "--warmup", "1",
                         "--variants", "real3", "quat (qbn=norm)"],
                "quick": ["--device", "cuda", "--repeats", "20", "--warmup", "5"],
                "full": ["--device", "cuda", "--repeats", "50", "--warmup", "10"]}[scale]
    code, output, seconds = check.execute(command, estimate)
    ok = code == 0 and data.is_file()
    outcome.data = {"rows": json.loads(data.read_text())} if ok else {}
    finish(outcome, code, output, seconds, ok, f"{len(outcome.data.get('rows', []))} variants" if ok else "no table")
    outcome.body = "\n".join(line for line in output.splitlines() if line.startswith(("|", "resnet")) or " step (" in line)
    outcome.body += "\n" + ("" if not outcome.failed else "\nThe end of its output:\n\n" + tail(output))


STEPS = {"tests": run_tests, "engines": run_engines, "bench_conv4": run_benchmark("conv4"),
         "bench_resnet": run_bench_resnet, "bench_lenet": run_benchmark("lenet_300_100")}


# ---------------------------------------------------------------------------------------------- engines: the runs
def compare_engines(out: Path, scale: str, data_root: str, cache: str) -> None:
    """(In its own process.) The same 2-level run with train.engine=auto and eager; their rows to ``out``."""
    sys.path.insert(0, str(REPO / "src"))
    sys.path.insert(0, str(SCRIPTS))
    import torch

    import benchmark  # conf/ values without a YAML library
    from qprune import reporting
    from qprune.runner import LevelRunner
    from qprune.settings import Settings

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    tiny = scale == "tiny"
    if tiny or importlib.util.find_spec("matplotlib") is None:  # the plots are not what is checked here
        reporting.plot_accuracy_vs_sparsity = reporting.plot_training_curves = lambda *args, **kwargs: None
    model = "lenet_300_100" if tiny else "conv4"
    dataset = benchmark.dataset_settings(model)
    config = {
        "model": {"name": model}, "algebra": {"name": "quat"},
        "dataset": {"name": dataset.name, "channels": dataset.channels, "mean": list(dataset.mean),
                    "std": list(dataset.std), "augment": dataset.augment},
        "data": {"root": data_root, "cache": cache, "download": False, "train_size": 600 if tiny else 10_000 if scale == "full" else 5_000,
                 "test_size": 200 if tiny else 2_000},
        "prune": {"rate": 0.2, "levels": 1},
        "train": {"optimizer": "adam", "lr": float(benchmark.conf_value(REPO / "conf" / "model" / f"{model}.yaml", "lr")),
                  "batch_size": 60, "epochs": 1 if tiny else 2, "max_steps": 5 if tiny else None},
        "seed": 0, "device": "cpu" if tiny else "cuda", "progress": "none", "save": {"weights": "last"}, "resume": False,
    }
    warnings: list[str] = []

    class Warnings(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING:
                warnings.append(record.getMessage())

    logging.getLogger("qprune").addHandler(Warnings())
    runs = {}
    for engine in ("auto", "eager"):
        warnings.clear()
        cfg = {**config, "train": {**config["train"], "engine": engine}}
        start = time.perf_counter()
        rows = LevelRunner(Settings.from_config(cfg), out.parent / f"run-{engine}", cfg).run()
        runs[engine] = {"rows": rows, "wall_s": time.perf_counter() - start, "warnings": list(warnings)}
    device = torch.cuda.get_device_name() if config["device"] == "cuda" else "cpu"
    summary = (f"{model} quat, {config['data']['train_size']} CIFAR-10 images" if not tiny else f"{model} quat (dry run)")
    out.write_text(json.dumps({"model": model, "device": device, "summary": summary, "config": config, "runs": runs}, indent=1))


def compare_engines_report(result: dict, expect_graph: bool) -> tuple[list[str], str]:
    """(problems, markdown) of the two runs of :func:`compare_engines`."""
    auto, eager = result["runs"]["auto"], result["runs"]["eager"]
    problems = []
    expected = "graph" if expect_graph else "eager"
    engines = {row["engine"] for row in auto["rows"]}
    if engines != {expected}:
        problems.append(f"train.engine=auto trained with {', '.join(sorted(engines))}, not {expected}")
    problems += [f"warning: {w}" for w in auto["warnings"]]
    lines = ["| level | % of real | auto: test acc | eager: test acc | auto: train loss | eager: train loss "
             "| auto: train s | eager: train s | eager / auto time |", "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for g, e in zip(auto["rows"], eager["rows"]):
        ratio = e["train_seconds"] / g["train_seconds"] if g["train_seconds"] else float("nan")
        lines.append(f"| {g['level']} | {g['pct_of_real']:.3g} | {g['test_acc']:.2f} | {e['test_acc']:.2f} | {g['train_loss']:.4f} "
                     f"| {e['train_loss']:.4f} | {g['train_seconds']:.2f} | {e['train_seconds']:.2f} | {ratio:.1f} |")
        if abs(g["test_acc"] - e["test_acc"]) > ACCURACY_TOLERANCE:
            problems.append(f"level {g['level']}: test accuracy {g['test_acc']} (auto) vs {e['test_acc']} (eager)")
        if abs(g["train_loss"] - e["train_loss"]) > LOSS_TOLERANCE * abs(e["train_loss"]):
            problems.append(f"level {g['level']}: train loss {g['train_loss']} (auto) vs {e['train_loss']} (eager)")
    if len(auto["rows"]) != 2 or len(eager["rows"]) != 2:
        problems.append(f"{len(auto['rows'])} and {len(eager['rows'])} levels instead of 2")
    c = result["config"]
    head = (f"{result['summary']}: {c['data']['train_size']} training and {c['data']['test_size']} test images, "
            f"{c['train']['epochs']} epoch(s) per level, Adam lr {c['train']['lr']:g}, batch 60, on {result['device']}; "
            f"the same seed, initialisation and data order for both. Engine of the auto run: "
            f"{', '.join(sorted(engines))}. Pass: test accuracy within {ACCURACY_TOLERANCE:g} points and train loss "
            f"within {100 * LOSS_TOLERANCE:g}% per level. Wall time (data, capture and evaluation included): "
            f"auto {auto['wall_s']:.1f} s, eager {eager['wall_s']:.1f} s.\n\n")
    return problems, head + "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- targets
def targets_table(outcomes: dict[str, Outcome], judge: bool = True) -> str:
    """The targets of issues 4, 5 and 14 against what this run measured (``judge=False``: a dry run's toy numbers)."""
    rows = []

    def bench(model: str) -> list[dict]:
        outcome = outcomes.get(f"bench_{'conv4' if model == 'conv4' else 'lenet'}")
        return outcome.data.get("rows", []) if outcome else []

    def find(model, algebra, mode, precision=None, runs=1):
        return next((r for r in bench(model) if (r["model"], r["algebra"], r["mode"], r["runs"]) == (model, algebra, mode, runs)
                     and precision in (None, r["precision"]) and not r["notes"].startswith("channels")), None)

    def add(what: str, target: str, value: float | None, met: bool | None, unit: str = "") -> None:
        shown = "not measured" if value is None else f"{value:,.2f}{unit}" if value < 100 else f"{value:,.0f}{unit}"
        verdict = "—" if met is None or value is None else "dry run" if not judge else "yes" if met else "**no**"
        rows.append(f"| {what} | {target} | {shown} | {verdict} |")

    for model, floors in (("conv4", {"real3": 900, "quat": 850}), ("lenet_300_100", {"real3": 4500, "quat": 4000})):
        for algebra, floor in floors.items():
            for precision in ("fp32", "tf32"):
                r = find(model, algebra, "graph", precision)
                add(f"{model} {algebra} graph it/s, {precision}", f"≥ {floor:,}", r and r["its"], r and r["its"] >= floor)
    for algebra in ("real3", "quat"):
        for precision in ("fp32", "tf32"):
            graph, original = find("conv4", algebra, "graph", precision), find("conv4", algebra, "original")
            ratio = graph and original and graph["run_steps"] / original["run_steps"]
            add(f"conv4 {algebra} graph / original loop, {precision}", "≥ 10×", ratio, ratio and ratio >= 10, "×")
    for precision in ("fp32", "tf32"):
        quat, real = find("conv4", "quat", "graph", precision), find("conv4", "real3", "graph", precision)
        ratio = quat and real and quat["seconds_per_step"] / real["seconds_per_step"]
        add(f"conv4 quat / real3 step time, {precision}", "≤ 1.15×", ratio, ratio and ratio <= 1.15, "×")
    for model in ("conv4", "lenet_300_100"):
        for precision, floor in (("fp32", 1.5), ("tf32", 1.5), ("bf16", 2.0)):
            for algebra in ("real3", "quat"):
                trials = next((r for r in bench(model) if (r["model"], r["algebra"], r["mode"], r["precision"]) ==
                               (model, algebra, "trials", precision)), None)
                one = find(model, algebra, "graph", precision)
                ratio = trials and one and trials["run_steps"] / one["run_steps"]
                add(f"{model} {algebra} trials=10 / one run (run-steps/s), {precision}", f"≥ {floor:g}×", ratio,
                    ratio and ratio >= floor, "×")
    resnet = {r["variant"]: r for r in outcomes["bench_resnet"].data.get("rows", [])} if "bench_resnet" in outcomes else {}
    for variant, ceiling in (("quat (qbn=norm)", 1.5), ("quat (qbn=whiten)", 3.0)):
        r = resnet.get(variant)
        add(f"resnet20 {variant} / real3 step, fp32", f"≤ {ceiling:g}×", r and r["x_real3"], r and r["x_real3"] <= ceiling, "×")
    estimates = outcomes["bench_conv4"].data.get("lth_minutes", []) if "bench_conv4" in outcomes else []
    lth = next((e for e in estimates if (e["model"], e["algebra"], e["loop"]) == ("conv4", "quat", "graph fp32")), None)
    add("conv4 quat full lottery-ticket run (21 levels × 40 epochs), estimated", "≤ 20 min", lth and lth["minutes"],
        lth and lth["minutes"] <= 20, " min")
    return "\n".join(["| figure | target | measured | met |", "| --- | --- | ---: | --- |", *rows])


# ---------------------------------------------------------------------------------------------- environment
def environment(dry_run: bool) -> dict[str, str]:
    import torch

    info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    if torch.cuda.is_available() and not dry_run:
        p = torch.cuda.get_device_properties(0)
        info["device"] = f"{p.name} (compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs)"
    else:
        info["device"] = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores){' — dry run' if dry_run else ''}"
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    info["torch"] = f"{torch.__version__}; CUDA {torch.version.cuda or 'none'}; cuDNN {cudnn or 'none'}"
    try:
        info["torch"] += f"; torchvision {importlib.metadata.version('torchvision')}"
    except importlib.metadata.PackageNotFoundError:
        info["torch"] += "; torchvision missing"
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True)
        info["driver"] = smi.stdout.strip() or "unknown"
    info["python"] = f"{platform.python_version()} ({sys.executable})"
    git = subprocess.run(["git", "-C", str(REPO), "log", "-1", "--format=%h (%cs)"], capture_output=True, text=True)
    status = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True, text=True)
    info["checkout"] = (git.stdout.strip() + (" (with local changes)" if status.stdout.strip() else "")) if git.returncode == 0 \
        else "unknown (no git metadata)"
    return info


def default_data_root() -> Path:
    """The checkout's .data/ (brought along to a GPU machine), else $QPRUNE_DATA, else ../shared/data."""
    if (REPO / ".data").is_dir():
        return REPO / ".data"
    return Path(os.environ.get("QPRUNE_DATA", REPO.parent / "shared" / "data"))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("gpu_check.md"), help="the markdown report (its log goes beside it)")
    parser.add_argument("--data-root", type=Path, default=default_data_root(), help="MNIST/raw/ and cifar10-jpeg.tar.xz")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "qprune-gpu-check-cache",
                        help="decoded CIFAR-10 images, shared by the steps")
    parser.add_argument("--budget-s", type=float, default=480.0, help="seconds the whole check may take (default 480)")
    parser.add_argument("--dry-run", action="store_true", help="every step at toy size on the CPU (tests are only collected)")
    parser.add_argument("--only", type=lambda s: s.split(","), default=None, help=f"some steps: {','.join(ESTIMATES)}")
    parser.add_argument("--compare-engines", type=Path, help=argparse.SUPPRESS)  # step 2's own process
    parser.add_argument("--scale", default="full", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.compare_engines:
        compare_engines(args.compare_engines, args.scale, str(args.data_root), str(args.cache))
        return 0
    args.argv = ["python", "scripts/gpu_check.py", *argv]
    if args.only and (unknown := set(args.only) - set(ESTIMATES)):
        parser.error(f"--only: unknown steps {sorted(unknown)}; choose from {', '.join(ESTIMATES)}")
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA GPU is visible; --dry-run runs every step at toy size on the CPU")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    return Check(args).run()


if __name__ == "__main__":
    sys.exit(main())
