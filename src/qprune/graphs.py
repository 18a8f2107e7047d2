"""The engine's step as CUDA graphs: the capture, and the check that decides whether to trust it.

A CUDA graph replays the kernels of one recorded step on the memory they used when they were
recorded; nothing of the Python that issued them runs again. So a captured step is right only if
everything the step reads lives at the same address at every replay (weights, masks, optimizer
state, the data buffers and the step counter: all reset *in place*), if no value the step depends
on comes from the host or from Python control flow (no ``.item()``, no tensors made from Python
data, no random numbers, no data-dependent shapes), and if the settings that choose kernels (TF32,
bf16 autocast, cuDNN autotuning, optimizer hyperparameters) are those of the capture.
docs/architecture.md lists each hazard and how it is ruled out or tested.

Because the graph path has met fewer GPUs, drivers and torch versions than the eager one,
:func:`check` replays the first steps of an epoch and runs the very same steps eagerly from the
same state before a run trusts the graphs: a capture that went wrong shows as a loss or an update
that differs (see :data:`UPDATE_TOLERANCE`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .engine import Engine

WARMUP_STEPS = 3  # eager steps per batch shape before the capture (lazy optimizer state, cuDNN autotuning)
CHECK_STEPS = 3   # full-batch steps the check compares (plus the last partial batch, if any)
CHECK_SEED = 7_919

# The graph and the eager step run the same kernels (the check autotunes both alike), so they differ
# only where a GPU reduction's order is not fixed. A wrong capture changes the update by a good part of
# its own size: replaying the next batch instead of the cursor's moves the weights 0.47-0.94x the update
# away (CPU, LeNet-300-100 real3/quat, Adam and SGD, 3 seeds, the check's 4 steps), and the loss by
# 0.4-12% (fp32 catches it there already).
LOSS_TOLERANCE = {"fp32": 1e-3, "tf32": 1e-2, "bf16": 5e-2}   # relative, per step and run
UPDATE_TOLERANCE = {"fp32": 0.1, "tf32": 0.1, "bf16": 0.2}    # |graph - eager| / |eager - start| of the weights


class GraphCheckError(RuntimeError):
    """The captured step does not do what the same step does eagerly from the same state."""


@contextlib.contextmanager
def capture_settings() -> Iterator[None]:
    """cuDNN autotuning on while the step is warmed up, captured and checked (its shapes never change)."""
    autotune = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = autotune


def capture(engine: "Engine") -> dict[int, "torch.cuda.CUDAGraph"]:
    """Warm up on a side stream, capture one graph per batch shape; the weights end as they started.

    The warm-up creates the optimizer's state and the quaternion layers' index tables, and lets
    cuDNN pick its kernels, so that the capture itself allocates nothing that must outlive it. Its
    optimizer state is left behind (a level starts by zeroing it in place).
    """
    state = [*engine.params.values(), *engine.buffers.values()]
    saved = [t.detach().clone() for t in state]
    graphs: dict[int, torch.cuda.CUDAGraph] = {}
    with capture_settings():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                for batch in engine.batch_sizes():
                    engine.cursor.zero_()
                    engine._step(batch)
        torch.cuda.current_stream().wait_stream(side)
        pool = None
        for batch in engine.batch_sizes():
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):  # the graphs run one after the other: one memory pool
                engine._step(batch)
            pool = graph.pool()
            graphs[batch] = graph
    with torch.no_grad():
        for tensor, value in zip(state, saved):
            tensor.copy_(value)
    return graphs


def check(engine: "Engine", graphs: dict[int, "torch.cuda.CUDAGraph"]) -> None:
    """Replay the first steps of the epoch in the data buffers and run them eagerly, each from the same
    state with a fresh optimizer; raise :class:`GraphCheckError` if loss or update differ. Leaves the
    engine's state as it found it."""
    state = _state_tensors(engine)
    saved = [t.detach().clone() for t in state]
    start = [p.detach().clone() for p in engine.params.values()]
    plan = check_plan(engine)

    def run(replay: bool) -> tuple[Tensor, list[Tensor]]:
        with torch.no_grad():
            for tensor, value in zip(state, saved):
                tensor.copy_(value)
        engine.zero_optimizer_state()
        losses = []
        for position, batch in plan:
            engine.cursor.fill_(position)
            engine.loss_sum.zero_()
            if replay:
                graphs[batch].replay()
            else:
                engine._step(batch)
            losses.append(engine.loss_sum / batch)
        return torch.stack(losses), [p.detach().clone() for p in engine.params.values()]

    try:
        with capture_settings():
            eager = run(replay=False)
            graphed = run(replay=True)
        problem = disagreement(start, eager, graphed, engine.trials, engine.settings.precision)
    finally:
        with torch.no_grad():
            for tensor, value in zip(state, saved):
                tensor.copy_(value)
        engine.optimizer.zero_grad(set_to_none=True)  # the eager steps' gradients (the graphs keep their own)
    if problem:
        raise GraphCheckError(problem)


def check_plan(engine: "Engine") -> list[tuple[int, int]]:
    """(step of the epoch, batch size) of the steps :func:`check` compares: every captured shape."""
    batch, steps, tail = engine.settings.batch_size, engine.steps_per_epoch, engine.tail
    full = steps - (tail != batch)
    plan = [(i, batch) for i in range(min(CHECK_STEPS, full))]
    return plan + ([(steps - 1, tail)] if tail != batch else [])


def disagreement(
    start: list[Tensor], eager: tuple[Tensor, list[Tensor]], graphed: tuple[Tensor, list[Tensor]], trials: int,
    precision: str,
) -> str | None:
    """Why the graphed steps (losses (steps, K), weights) are not the eager ones, or None if they agree."""
    (eager_loss, eager_weights), (graph_loss, graph_weights) = eager, graphed
    eager_finite = bool(torch.isfinite(eager_loss).all()) and all(bool(torch.isfinite(w).all()) for w in eager_weights)
    graph_finite = bool(torch.isfinite(graph_loss).all()) and all(bool(torch.isfinite(w).all()) for w in graph_weights)
    if not eager_finite:
        return None  # the training itself diverges at once; not the graph's doing
    if not graph_finite:
        return "the graph step gives a non-finite loss or weights where the eager step does not"
    relative = ((graph_loss - eager_loss).abs() / eager_loss.abs().clamp_min(1e-12)).max().item()
    if relative > LOSS_TOLERANCE[precision]:
        return (f"the graph step's loss differs from the eager step's by {relative:.2g} (relative; "
                f"tolerance {LOSS_TOLERANCE[precision]:g})")
    moved = _per_run_norm([e - s for e, s in zip(eager_weights, start)], trials)
    apart = _per_run_norm([g - e for g, e in zip(graph_weights, eager_weights)], trials)
    ratio = (apart / moved.clamp_min(torch.finfo(moved.dtype).tiny)).max().item()
    if ratio > UPDATE_TOLERANCE[precision]:
        return (f"the graph step's weights are {ratio:.2g}x the eager update away from the eager step's "
                f"(tolerance {UPDATE_TOLERANCE[precision]:g})")
    return None


def _per_run_norm(tensors: list[Tensor], trials: int) -> Tensor:
    """(K,) Euclidean norm over all tensors of each run (dim 0 is the run when K > 1)."""
    return torch.stack([t.double().reshape(trials, -1).square().sum(1) for t in tensors]).sum(0).sqrt()


def _state_tensors(engine: "Engine") -> list[Tensor]:
    """Everything a step changes: weights, buffers, optimizer state, step counter, loss sums."""
    optimizer = [v for s in engine.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return [*engine.params.values(), *engine.buffers.values(), *optimizer, engine.cursor, engine.loss_sum]

