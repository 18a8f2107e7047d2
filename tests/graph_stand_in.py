"""CUDA graphs stood in for on the CPU, so that the engine's capture, check and fallback run for real.

A stand-in capture runs nothing (neither does a real one); it records which step it captured and
what a real graph would bake in: the address of every tensor the step reads, the modules' training
mode, the precision switches and cuDNN autotuning. A replay first checks that those addresses have
not changed (a real graph would read stale memory), then runs the step eagerly. Faults can be
injected: a capture that raises, a replay that raises or does something else than the captured step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

import qprune.engine as engine_module
from qprune.engine import Engine
from qprune.training import make_optimizer


class MovedTensor(AssertionError):
    """A tensor a captured step reads was reallocated between capture and replay."""


def addresses(engine: Engine) -> dict[str, int]:
    """Where every tensor the step reads lives (what a captured graph has baked in)."""
    named = {f"param {n}": p for n, p in engine.params.items()}
    named |= {f"buffer {n}": b for n, b in engine.buffers.items()}
    named |= {f"mask {n}": m for n, m in zip(engine.masked_names, engine.masks)}
    names = {p: n for n, p in engine.params.items()}
    for param, state in engine.optimizer.state.items():
        named |= {f"optimizer {names[param]}.{k}": v for k, v in state.items() if torch.is_tensor(v)}
    named |= {"x": engine.x, "y": engine.y, "cursor": engine.cursor, "loss_sum": engine.loss_sum,
              "input scale": engine.data._scale, "input shift": engine.data._shift}
    return {name: t.data_ptr() for name, t in named.items()}


class StandInGraph:
    def __init__(self, stand_in: "StandIns"):
        self.stand_in, self.run, self.addresses, self.engine = stand_in, None, None, None

    def replay(self) -> None:
        now = addresses(self.engine)
        moved = sorted(k for k in self.addresses.keys() | now.keys() if self.addresses.get(k) != now.get(k))
        if moved:
            raise MovedTensor(f"reallocated after the capture: {', '.join(moved)}")
        self.stand_in.replays += 1
        if self.stand_in.replay_fault is not None:
            self.stand_in.replay_fault(self.engine, self.run)
        else:
            self.run()

    def pool(self):
        return None


class StandIns:
    """The installed stand-ins: what they captured, and the faults to inject."""

    def __init__(self):
        self.captures: list[dict] = []   # per capture: batch, training mode, switches
        self.replays = 0
        self.capture_fault: Exception | None = None                            # raised when a capture starts
        self.replay_fault: Callable[[Engine, Callable[[], None]], None] | None = None  # instead of a replay
        self._capturing: StandInGraph | None = None

    def step(self, original):
        stand_in = self

        def step(engine: Engine, batch: int) -> None:
            graph = stand_in._capturing
            if graph is None:
                return original(engine, batch)
            graph.engine, graph.addresses = engine, addresses(engine)
            graph.run = lambda: original(engine, batch)
            stand_in.captures.append({
                "batch": batch, "training": all(m.training for m in engine.models),
                "tf32": (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32),
                "autotune": torch.backends.cudnn.benchmark,
            })

        return step

    @contextlib.contextmanager
    def graph(self, graph: StandInGraph, pool=None):
        if self.capture_fault is not None:
            raise self.capture_fault
        self._capturing = graph
        try:
            yield
        finally:
            self._capturing = None


class _Stream:
    def wait_stream(self, other) -> None:
        pass


def install(monkeypatch) -> StandIns:
    """Stand in for CUDA graphs: ``supports_graphs`` says yes on the CPU, capture and replay as above."""
    stand_in = StandIns()
    monkeypatch.setattr(engine_module, "supports_graphs", lambda device: True)
    # the CPU's Adam cannot be 'capturable' (state on the device); nothing is really captured here
    monkeypatch.setattr(engine_module, "make_optimizer",
                        lambda params, settings, fused=None, capturable=False: make_optimizer(params, settings))
    monkeypatch.setattr(Engine, "_step", stand_in.step(Engine._step))
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: StandInGraph(stand_in))
    monkeypatch.setattr(torch.cuda, "graph", stand_in.graph)
    monkeypatch.setattr(torch.cuda, "Stream", _Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: _Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    return stand_in
