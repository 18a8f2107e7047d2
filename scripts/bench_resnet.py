"""Time one training step of a batch-normed model in each algebra (the QResNet step-time targets).

    python scripts/bench_resnet.py                      # ResNet-20, batch 128, fp32, on the GPU if any
    python scripts/bench_resnet.py --device cpu --batch 16 --repeats 5 --warmup 2

A step is what the training loop does: forward, cross-entropy, backward, the gradient masks (one
foreach multiply) and the optimizer step (SGD with momentum and weight decay, as the ResNet recipe,
or Adam). The input is a batch as ``DeviceData.model_input`` gives it (normalised; 4 channels for
real4/quat/complex/phm4). Warm-up steps are excluded; the time is the median of ``--repeats`` steps, each timed
with CUDA events (GPU) or ``perf_counter`` (CPU), the variants taking turns step by step (a drift
of a shared machine hits them alike). fp32 means TF32 off for matmuls and cuDNN convs (``--tf32``
turns it on). Prints a markdown table with each variant's ratio to real3.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from qprune import build_model, count_parameters
from qprune.algebra import Algebra
from qprune.pruning import Masks, prunable_weights
from qprune.training import TrainSettings, make_optimizer

VARIANTS = {
    "real3": Algebra("real3"),
    "real4": Algebra("real4"),
    "quat (qbn=norm)": Algebra("quat", qbn="norm"),
    "quat (qbn=whiten)": Algebra("quat", qbn="whiten"),
    "complex (qbn=norm)": Algebra("complex"),
    "phm4 (qbn=norm)": Algebra("phm", n=4),
}


def training_step(model_name: str, algebra: Algebra, args, device: torch.device):
    """A closure running one training step of a fresh model, and the model's parameter count."""
    torch.manual_seed(0)
    model = build_model(model_name, algebra, 10, (3, args.image, args.image)).to(device).train()
    optimizer = make_optimizer(model, TrainSettings(optimizer=args.optimizer, lr=0.01, weight_decay=1e-4))
    params, masks = Masks.ones(model, prunable_weights(model)).parameters_of(model)
    x = torch.randn(args.batch, algebra.input_channels(3), args.image, args.image, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        torch._foreach_mul_([p.grad for p in params], masks)
        optimizer.step()

    return step, count_parameters(model)


def time_steps(steps: dict, repeats: int, device: torch.device) -> dict[str, list[float]]:
    """Milliseconds per step; the variants take turns, so drifts of a shared machine hit them alike."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = {name: [] for name in steps}
        for _ in range(repeats):
            for name, step in steps.items():
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step()
                end.record()
                events[name].append((start, end))
        torch.cuda.synchronize(device)
        return {name: [s.elapsed_time(e) for s, e in pairs] for name, pairs in events.items()}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(1000 * (time.perf_counter() - start))
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--image", type=int, default=32, help="image side (CIFAR: 32)")
    parser.add_argument("--optimizer", default="sgd", choices=("sgd", "adam"))
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="VARIANT")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 matmuls/convs (default: true fp32)")
    parser.add_argument("--json", type=Path, help="also write the table as JSON (scripts/gpu_check.py reads it)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.model} training step ({args.optimizer}), batch {args.batch}, {args.image}x{args.image}, "
          f"{'tf32' if args.tf32 else 'fp32'}, {where}, torch {torch.__version__}; "
          f"median of {args.repeats} after {args.warmup} warm-up steps\n")
    steps, params = {}, {}
    for name in args.variants:
        steps[name], params[name] = training_step(args.model, VARIANTS[name], args, device)
        for _ in range(args.warmup):
            steps[name]()
    times = time_steps(steps, args.repeats, device)
    rows = [(name, params[name], statistics.median(times[name]), min(times[name])) for name in steps]
    base = next((median for name, _, median, _ in rows if name == "real3"), rows[0][2])
    print("| variant | parameters | ms/step (median) | ms/step (min) | × real3 |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, params, median, best in rows:
        print(f"| {name} | {params:,} | {median:.2f} | {best:.2f} | {median / base:.2f} |")
    sys.stdout.flush()
    if args.json:
        args.json.write_text(json.dumps([{"variant": name, "parameters": params, "ms_median": median, "ms_min": best,
                                          "x_real3": median / base} for name, params, median, best in rows], indent=1))


if __name__ == "__main__":
    main()
