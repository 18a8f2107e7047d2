"""``train.engine=auto`` on CUDA: the CUDA-graph engine, or the eager loop when the graph cannot be trusted.

The captured step has run on fewer GPUs, drivers and torch versions than the eager loop, and a
person's first command should not fail because of it. So if building the engine, warming it up,
capturing the step, or the check of its first replays against the eager step (:func:`qprune.graphs.check`)
raises or disagrees, the run restores the weights it had before the attempt and goes on with the
trainer ``train.engine=eager`` picks (the reference loop for one run, the engine's eager step for
``trials=K``), with one warning that names the cause; each level's row records it as
``engine: "eager (fallback: <cause>)"``. ``train.engine=graph`` has no fallback: the same failures
stop the run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .engine import Engine
from .errors import ConfigError
from .levels import Trainer
from .training import LevelTraining

log = logging.getLogger("qprune")


class FailSafeTrainer:
    """The trainer interface of :class:`Engine` over a graph engine that falls back to an eager trainer.

    ``graph_trainer`` and ``eager_trainer`` build the two (the eager one only when it is needed);
    ``models`` are the runs' models, whose weights a failed attempt must not change.
    """

    def __init__(self, graph_trainer: Callable[[], Engine], eager_trainer: Callable[[], Trainer],
                 models: Sequence[nn.Module]):
        self.models, self._eager_trainer = list(models), eager_trainer
        self.fallback: str | None = None  # why the graph engine is not used, once it is not
        self._prepared = False
        try:
            self.trainer: Trainer = graph_trainer()
        except ConfigError:
            raise  # a mistake in the settings: the eager loop would refuse it too
        except Exception as exc:  # noqa: BLE001 - any failure of the graph path falls back
            self._fall_back(exc)

    @property
    def engine(self) -> str:
        """What trains this run's levels (the ``engine`` column of levels.json)."""
        return "graph" if self.fallback is None else f"eager (fallback: {self.fallback})"

    def train_level(self, masks, generators, observers=None, optimizer_states=None, epochs=None) -> list[LevelTraining]:
        if not self._prepared:
            self._prepared = True
            if self.fallback is None:
                self._prepare()
        results = self.trainer.train_level(masks, generators, observers, optimizer_states, epochs)
        for result in results:
            result.engine = self.engine
        return results

    def optimizer_states(self) -> list[dict]:
        return self.trainer.optimizer_states()

    def _prepare(self) -> None:
        """Capture and check the graphs; on any failure put the weights back and fall back."""
        saved = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in self.models]
        try:
            self.trainer.prepare_graphs()
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001
            for model, state in zip(self.models, saved):
                model.load_state_dict(state)
            self._fall_back(exc)

    def _fall_back(self, exc: Exception) -> None:
        self.fallback = describe(exc)
        log.warning("train.engine=auto: the CUDA-graph step failed (%s); this run trains with the eager loop "
                    "instead (the same training, slower; with train.engine=graph this is an error)", self.fallback)
        self.trainer = None  # drop the graphs and their memory pool before the eager trainer allocates
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.trainer = self._eager_trainer()


def describe(exc: BaseException, width: int = 200) -> str:
    """``Type: first line of the message``, at most ``width`` characters: a cause that fits a table cell."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= width else text[: width - 1] + "…"
