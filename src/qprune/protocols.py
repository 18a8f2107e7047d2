"""Where each level's masks and starting weights come from: the lottery-ticket protocol or the study's.

``lth`` (default): level L prunes ``prune.rate`` of the weights that survived level L-1, ranked
by their magnitude after level L-1's training, then rewinds the survivors (``prune.rewind``) and
trains with a fresh optimizer.

``paper`` — the original study's procedure, in two phases that qprune interleaves level by level:

- Phase A makes the masks. Round 0 trains the dense model; round r prunes ``prune.rate`` of the
  remaining weights of the *current* weights (the study: 20%, one global pool of conv, linear and
  the real output layer; quaternion components r, i, j, k ranked on their own — ``prune.scope=
  global``, ``prune.unit=component``, ``prune.output=true``) and keeps training them with the
  *same* optimizer state — no rewind, no optimizer reset — for ``protocol.mask_epochs`` epochs.
  The moments of the weights a round prunes are zeroed, so those weights stay exactly zero (the
  study's torch pruning multiplied them by the mask in every forward pass instead: the same
  training for the survivors).
- Phase B gives the reported numbers: for the mask of round L, every weight is reset to the
  level-0 initialisation and trained for ``train.epochs`` with a fresh optimizer; the row reports
  the last epoch's test accuracy (and the round's own accuracy as ``mask_test_acc``).

Round 0 and phase B's level 0 are the same training (dense, from the initialisation, fresh
optimizer, the level-0 data order) when ``mask_epochs`` equals ``train.epochs``: it runs once.
Rounds and levels stop once ``protocol.stop_after`` successive levels score below
``protocol.stop_below`` percent (the study: two levels under 30%); with ``trials=K`` the runs stop
together once each of them has met the rule.

Every round is on disk (``mask_rounds/round_NN/``: masks, the result, and for the newest round the
weights and optimizer state phase A continues from), so a paper run resumes exactly too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from .errors import ConfigError
from .pruning import Masks, prune
from .reporting import ProgressObserver

if TYPE_CHECKING:
    from .runner import LevelRunner, Trial

PROTOCOLS = ("lth", "paper")
BASELINES = ("random_reinit", "random_prune")


@dataclass(frozen=True)
class ProtocolSettings:
    name: str = "lth"
    mask_epochs: int | None = None    # paper: epochs per phase-A round (null: train.epochs)
    stop_below: float | None = None   # stop once `stop_after` successive levels score below this (%)
    stop_after: int = 2

    def __post_init__(self):
        if self.name not in PROTOCOLS:
            raise ConfigError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {self.name!r}")
        if self.mask_epochs is not None and (not isinstance(self.mask_epochs, int) or self.mask_epochs <= 0):
            raise ConfigError(f"protocol.mask_epochs must be a positive integer or null, got {self.mask_epochs}")
        if not isinstance(self.stop_after, int) or self.stop_after < 1:
            raise ConfigError(f"protocol.stop_after must be a positive integer, got {self.stop_after}")


def check_baselines(baselines: list[str] | tuple[str, ...] | str | None) -> tuple[str, ...]:
    """``baselines`` as a tuple of known names (a single name or a list)."""
    if baselines in (None, "none", ""):
        return ()
    names = (baselines,) if isinstance(baselines, str) else tuple(baselines)
    if unknown := [b for b in names if b not in BASELINES]:
        raise ConfigError(f"baselines must be a list of {', '.join(BASELINES)}, got {unknown}")
    return names


def should_stop(records: list[list[dict]], settings: ProtocolSettings) -> bool:
    """The study's stopping rule, for every run: its last ``stop_after`` levels below ``stop_below``%."""
    if settings.stop_below is None:
        return False
    n = settings.stop_after
    return all(len(r) >= n and all(rec["row"]["test_acc"] < settings.stop_below for rec in r[-n:]) for r in records)


class LotteryTicket:
    """``lth``: prune the previous level's trained weights, rewind the survivors."""

    def __init__(self, runner: "LevelRunner"):
        self.runner = runner

    def start_weights(self, t: "Trial") -> dict:
        return t.rewind

    def level_masks(self, level: int) -> list[Masks]:
        """Each run's masks for ``level``; each model is left holding the weights the level starts from."""
        r = self.runner
        masks = []
        for t in r.trials:
            if level == 0:
                t.model.load_state_dict(t.init)
                masks.append(Masks.ones(t.model, r.weights))
                continue
            previous_masks, previous_weights = t.store.load_level(level - 1)
            t.model.load_state_dict(previous_weights)
            level_masks = prune(t.model, Masks(previous_masks).to(r.data.device), r.weights, r.s.prune)
            t.model.load_state_dict(t.rewind)
            level_masks.apply_(t.model)
            masks.append(level_masks)
        return masks

    def level_trained(self, level: int, trainings: list) -> dict[int, dict]:
        """Extra columns per run after a level's training (none here)."""
        return {}


class StudyProtocol(LotteryTicket):
    """``paper``: masks from phase A (no rewind, optimizer carried on); levels trained from the init."""

    def __init__(self, runner: "LevelRunner"):
        super().__init__(runner)
        s = runner.s
        self.mask_epochs = s.protocol.mask_epochs or s.train.epochs
        self.shared_round0 = self.mask_epochs == s.train.epochs
        self.state: dict[int, dict] = {}   # run index -> {"round", "weights", "optimizer", "masks", "acc"}

    def start_weights(self, t: "Trial") -> dict:
        return t.init

    def level_masks(self, level: int) -> list[Masks]:
        r = self.runner
        if not (level == 0 and self.shared_round0):
            self._ensure_round(level)
        masks = []
        for t in r.trials:
            t.model.load_state_dict(t.init)
            m = Masks.ones(t.model, r.weights) if level == 0 else Masks(t.store.load_round_masks(level)).to(r.data.device)
            m.apply_(t.model)
            masks.append(m)
        return masks

    def level_trained(self, level: int, trainings: list) -> dict[int, dict]:
        """After phase B's level: round 0 is this very training when the epochs agree; the rounds' accuracy."""
        r = self.runner
        if level == 0 and self.shared_round0:
            states = r.trainer.optimizer_states()
            for t, training, optimizer in zip(r.trials, trainings, states):
                masks = Masks.ones(t.model, r.weights)
                self._save_round(t, 0, masks, _copy(t.model.state_dict()), optimizer, training)
        return {t.index: {"mask_test_acc": t.store.round_result(level)["row"]["test_acc"]} for t in r.trials}

    # ------------------------------------------------------------------ phase A
    def _ensure_round(self, round_: int) -> None:
        """Train phase A's round ``round_`` for every run unless all of them have it on disk."""
        r = self.runner
        if all(t.store.round_result(round_) is not None for t in r.trials):
            return
        if round_ == 0:
            masks = []
            for t in r.trials:
                t.model.load_state_dict(t.init)
                masks.append(Masks.ones(t.model, r.weights))
            optimizers = None
        else:
            self._ensure_round(round_ - 1)
            states = [self._state(t, round_ - 1) for t in r.trials]
            masks = []
            for t, state in zip(r.trials, states):
                t.model.load_state_dict(state["weights"])
                m = prune(t.model, state["masks"].to(r.data.device), r.weights, r.s.prune)
                m.apply_(t.model)
                masks.append(m)
            optimizers = [state["optimizer"] for state in states]
        several = len(r.trials) > 1
        observers = [ProgressObserver(level=round_, levels=r.s.prune.levels, epochs=self.mask_epochs, mode=_quiet(r, t),
                                      label=f"{'seed %d ' % t.s.seed if several else ''}mask round: ")
                     for t in r.trials]
        trainings = r.trainer.train_level(masks, r.generators(round_), observers, optimizers, self.mask_epochs)
        for t, m, training, optimizer in zip(r.trials, masks, trainings, r.trainer.optimizer_states()):
            self._save_round(t, round_, m, _copy(t.model.state_dict()), optimizer, training)

    def _save_round(self, t: "Trial", round_: int, masks: Masks, weights: dict, optimizer: dict, training) -> None:
        sparsity = {"round": round_, "prunable_remaining": round(masks.remaining_fraction(), 6),
                    "test_acc": round(training.test_acc, 2), "steps": training.steps}
        record = {"row": sparsity, "epochs": [asdict(e) for e in training.epochs]}
        t.store.save_round(round_, masks.state_dict(), {"weights": weights, "optimizer": optimizer}, record)
        self.state[t.index] = {"round": round_, "weights": weights, "optimizer": optimizer, "masks": masks}

    def _state(self, t: "Trial", round_: int) -> dict:
        """Where phase A continues from after ``round_``: in memory, or from disk when resuming."""
        state = self.state.get(t.index)
        if state is not None and state["round"] == round_:
            return state
        saved = t.store.load_round_state(round_)
        return {"round": round_, "weights": saved["weights"], "optimizer": saved["optimizer"],
                "masks": Masks(t.store.load_round_masks(round_))}


def _copy(state: dict) -> dict:
    return {k: v.detach().clone() for k, v in state.items()}


def _quiet(runner: "LevelRunner", t: "Trial") -> str:
    return runner.s.progress if t.index == 0 or runner.s.progress == "none" else "plain"


def make_protocol(runner: "LevelRunner") -> LotteryTicket:
    return StudyProtocol(runner) if runner.s.protocol.name == "paper" else LotteryTicket(runner)


def train_baselines(runner: "LevelRunner", level: int, masks: list[Masks], protocol: LotteryTicket) -> dict[int, dict]:
    """The baselines of a level, per run: ``random_reinit`` trains the level's masks from a fresh
    initialisation, ``random_prune`` random masks of the same per-layer sparsity from the ticket's
    starting weights. Same data order and schedule as the ticket; one column each (test accuracy)."""
    from .pruning import random_masks_like

    columns: dict[int, dict] = {t.index: {} for t in runner.trials}
    if level == 0:
        return columns
    for baseline in runner.s.baselines:
        level_masks = []
        for t, m in zip(runner.trials, masks):
            if baseline == "random_reinit":
                t.model.load_state_dict(t.reinit)
            else:
                t.model.load_state_dict(protocol.start_weights(t))
                g = runner.generator(t.s.seed, level, stream=1 + BASELINES.index(baseline))
                m = random_masks_like(m, g)
            m.apply_(t.model)
            level_masks.append(m)
        observers = [ProgressObserver(level=level, levels=runner.s.prune.levels, epochs=runner.s.train.epochs,
                                      mode=_quiet(runner, t), label=f"{baseline}: ") for t in runner.trials]
        trainings = runner.trainer.train_level(level_masks, runner.generators(level), observers)
        for t, training in zip(runner.trials, trainings):
            columns[t.index][f"{baseline}_acc"] = round(training.test_acc, 2)
    return columns


def baseline_init(seed: int) -> int:
    """The seed of the random-reinit baseline's fresh initialisation (never a run's own seed)."""
    return seed + 1_000_003

