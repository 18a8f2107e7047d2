#!/usr/bin/env python
"""What the original's carried Adam does to one phase-B level: fresh against carried, side by side.

    python scripts/carry_diagnostic.py RUN_DIR --levels 1,14,17 [--steps N]

RUN_DIR is a finished or partial `protocol=paper` run (any `phase_b_optimizer`). For each level it
starts from the level's mask applied to the level-0 initialisation (phase B's starting point) and
trains N steps on the run's own data twice: with a fresh Adam, and with the optimizer state phase A
ended with (the state `carry` hands to phase B's first level; the pruned weights' moments zeroed, as
the runner does). It prints the size of the first update relative to the weights and to lr, the
loss after N steps and the test accuracy. Why: under `carry`, Adam's step count is in the
thousands, so there is no bias correction, and its second moments are those of the end of training,
when gradients were small; rewound to the initialisation, where gradients are large, the first
steps are larger. A fresh Adam's first step is lr on every weight with a gradient (max |Δw|/lr = 1);
under a carried state a weight whose moments were near zero moves (1-β1)·sqrt(1-β2^t)/sqrt(1-β2) ≈ 3 lr
(β = 0.9, 0.999; t in the thousands, so Adam's first-moment bias correction is gone).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from qprune.data import load_data  # noqa: E402
from qprune.errors import QpruneError  # noqa: E402
from qprune.models import build_model  # noqa: E402
from qprune.settings import Settings  # noqa: E402
from qprune.store import RunDirectory  # noqa: E402
from qprune.training import evaluate, load_optimizer_state, make_optimizer  # noqa: E402


def level_start(run: RunDirectory, settings: Settings, data, level: int):
    """The model at phase B's start of ``level`` (init ⊙ mask) and its masks."""
    torch.manual_seed(settings.seed)
    model = build_model(settings.model, settings.algebra, data.num_classes, data.image_shape, **settings.model_options)
    model.load_state_dict(run.load_checkpoint("init"))
    masks = run.trained_masks(level)   # a level phase B has not reached yet: phase A's round masks
    with torch.no_grad():
        for name, mask in masks.items():
            model.get_parameter(name).mul_(mask.to(torch.float32))
    return model, {name: mask.to(torch.float32) for name, mask in masks.items()}


def train(model, masks, data, settings: Settings, steps: int, carried: dict | None) -> dict:
    params = dict(model.named_parameters())
    optimizer = make_optimizer(params.values(), settings.train)
    if carried is not None:
        load_optimizer_state(optimizer, params, carried, masks)
    generator = torch.Generator().manual_seed(settings.seed)
    model.train()
    first, losses, step = None, [], 0
    while step < steps:
        for x, y in data.batches(data.train, settings.train.batch_size, generator):
            before = {n: p.detach().clone() for n, p in params.items() if n in masks}
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            for name, mask in masks.items():
                params[name].grad.mul_(mask)
            optimizer.step()
            if first is None:
                deltas = [params[n].detach() - w for n, w in before.items()]
                change = math.sqrt(sum(float(d.pow(2).sum()) for d in deltas))
                norm = math.sqrt(sum(float(w.pow(2).sum()) for w in before.values()))
                alive = sum(int(m.sum()) for m in masks.values())
                largest = max(float(d.abs().max()) for d in deltas)
                first = {"relative": change / norm, "rms_over_lr": change / math.sqrt(alive) / settings.train.lr,
                         "max_over_lr": largest / settings.train.lr}
            losses.append(float(loss.detach()))
            step += 1
            if step >= steps:
                break
    return {**first, "loss": sum(losses[-10:]) / len(losses[-10:]),
            "test_acc": evaluate(model, data, data.test, settings.train.eval_batch_size)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--levels", default="1", help="comma-separated levels")
    p.add_argument("--steps", type=int, default=None, help="steps per training (default: one epoch)")
    args = p.parse_args(argv)
    try:
        return diagnose(p, args)
    except QpruneError as exc:   # missing data, a damaged run file: one line naming it and the fix
        p.error(str(exc))


def diagnose(p: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if not (args.run_dir / "levels.json").is_file():
        p.error(f"{args.run_dir} has no levels.json: give the directory of a qprune run")
    config = json.loads((args.run_dir / "levels.json").read_text())["config"]
    settings = Settings.from_config(config)
    if settings.protocol.name != "paper":
        p.error(f"{args.run_dir} is a protocol={settings.protocol.name} run: phase A's state exists for protocol=paper only")
    run = RunDirectory(args.run_dir)
    data = load_data(settings.dataset, settings.data, settings.algebra.adds_gray, torch.device("cpu"))
    last_round = max(int(d.name.split("_")[1]) for d in (args.run_dir / "mask_rounds").glob("round_*")
                     if (d / "state.pt").is_file())
    carried = run.load_round_state(last_round)["optimizer"]
    steps = args.steps or settings.train.steps_per_epoch(len(data.train))
    step_counts = {float(s["step"]) for s in carried.values() if "step" in s}
    print(f"{args.run_dir}: phase A's state after round {last_round} (Adam step {', '.join(f'{s:.0f}' for s in step_counts)}); "
          f"{steps} steps from init ⊙ mask, lr {settings.train.lr:g}")
    print("| level | % of real | optimizer | first update ‖Δw‖/‖w‖ | rms Δw / lr | max |Δw| / lr | "
          f"loss, last 10 of {steps} steps | test acc |")
    print("| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    rows = {int(r["level"]): r for r in json.loads((args.run_dir / "levels.json").read_text())["levels"]}
    levels = [int(v) for v in args.levels.split(",")]
    if missing := [level for level in levels if run.round_result(level) is None and not run.level_finished(level)]:
        p.error(f"{args.run_dir} has no masks for level {', '.join(map(str, missing))} yet (phase A made rounds 0-"
                f"{run.finished_rounds() - 1}): pick levels it has")
    for level in levels:
        for name, state in (("fresh", None), ("carried", carried)):
            model, masks = level_start(run, settings, data, level)
            r = train(model, masks, data, settings, steps, state)
            pct = rows.get(level, {}).get("pct_of_real")   # a level phase B has not trained has no row yet
            shown = "(phase A only)" if pct is None else f"{pct:.2f}"
            print(f"| {level} | {shown} | {name} | {r['relative']:.4f} | {r['rms_over_lr']:.2f} | {r['max_over_lr']:.1f} | "
                  f"{r['loss']:.3f} | {r['test_acc']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
