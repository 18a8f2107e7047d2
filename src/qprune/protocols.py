"""Where each level's masks, starting weights and optimizer come from: the lottery-ticket protocol or the study's.

``lth`` (default): level L prunes ``prune.rate`` of the weights that survived level L-1, ranked
by their magnitude after level L-1's training, then rewinds the survivors (``prune.rewind``) and
trains with a fresh optimizer.

``paper`` — the original study's procedure (smlab-niser/quartLT22), in two phases:

- Phase A makes the masks. Round 0 trains the dense model; round r prunes ``prune.rate`` of the
  remaining weights of the *current* weights (the study: 20%, one global pool of conv, linear and
  the real output layer; quaternion components r, i, j, k ranked on their own — ``prune.scope=
  global``, ``prune.unit=component``, ``prune.output=true``) and keeps training them with the
  *same* optimizer state — no rewind, no optimizer reset — for ``protocol.mask_epochs`` epochs.
  The moments of the weights a round prunes are zeroed, so those weights stay exactly zero (the
  study's torch pruning multiplied them by the mask in every forward pass instead: the same
  training for the survivors).
- Phase B gives the reported numbers: for the mask of round L, every weight is reset to the
  level-0 initialisation and trained for ``train.epochs``; the row reports the last epoch's test
  accuracy (and the round's own accuracy as ``mask_test_acc``). Its optimizer
  (``protocol.phase_b_optimizer``): ``fresh`` — a new optimizer for every level (qprune's
  correction; phase A and B then interleave level by level) — or ``carry`` — the original code's
  single Adam: level 1 starts from phase A's *final* optimizer state, and every later level from the
  previous level's (so phase A runs all its rounds first, and phase B goes level by level in order).

Round 0 and phase B's level 0 are the same training (dense, from the initialisation, fresh
optimizer, the level-0 data order) when ``mask_epochs`` equals ``train.epochs``: it runs once.

Stopping (``protocol.stop_below`` percent, ``protocol.stop_after`` levels; ``protocol.stop_rule``):
``two_below`` stops once ``stop_after`` successive levels score below the threshold (what the
study describes); ``study`` is what its code did — phase A stops after ``stop_after`` successive
*rounds* below it, phase B at the *first* level below it and never past phase A's last round. With
``trials=K`` the runs stop together once each of them has met the rule.

A level (or phase A's round) whose training loss stops being finite is marked ``status=diverged``
and ends the run after it (phase A makes no round after a diverged one).

Every round is on disk (``mask_rounds/round_NN/``: masks, the result, and for the newest round the
weights and optimizer state phase A continues from; with ``carry`` the newest levels keep their
optimizer state too), so a paper run resumes exactly.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

from .errors import ConfigError
from .levels import LevelContext, Trial, copy_state
from .pruning import Masks, prune, random_masks_like
from .reporting import ProgressObserver

log = logging.getLogger("qprune")

PROTOCOLS = ("lth", "paper")
BASELINES = ("random_reinit", "random_prune")
PHASE_B_OPTIMIZERS = ("fresh", "carry")
STOP_RULES = ("two_below", "study")


@dataclass(frozen=True)
class ProtocolSettings:
    name: str = "lth"
    mask_epochs: int | None = None    # paper: epochs per phase-A round (null: train.epochs)
    stop_below: float | None = None   # stop once `stop_after` successive levels score below this (%)
    stop_after: int = 2
    stop_rule: str = "two_below"      # two_below | study (paper: the original code's rule, see above)
    phase_b_optimizer: str = "fresh"  # paper: fresh | carry (the original's one optimizer for everything)

    def __post_init__(self):
        if self.name not in PROTOCOLS:
            raise ConfigError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {self.name!r}")
        if self.mask_epochs is not None and (not isinstance(self.mask_epochs, int) or self.mask_epochs <= 0):
            raise ConfigError(f"protocol.mask_epochs must be a positive integer or null, got {self.mask_epochs}")
        if not isinstance(self.stop_after, int) or self.stop_after < 1:
            raise ConfigError(f"protocol.stop_after must be a positive integer, got {self.stop_after}")
        for key, value, allowed in (("stop_rule", self.stop_rule, STOP_RULES),
                                    ("phase_b_optimizer", self.phase_b_optimizer, PHASE_B_OPTIMIZERS)):
            if value not in allowed:
                raise ConfigError(f"protocol.{key} must be one of {', '.join(allowed)}, got {value!r}")
        if self.name == "lth" and (self.stop_rule, self.phase_b_optimizer) != ("two_below", "fresh"):
            raise ConfigError("protocol.stop_rule=study and protocol.phase_b_optimizer=carry belong to protocol=paper; "
                              "with protocol=lth leave them at two_below and fresh")

    @property
    def carry(self) -> bool:
        return self.phase_b_optimizer == "carry"


def check_baselines(baselines: list[str] | tuple[str, ...] | str | None) -> tuple[str, ...]:
    """``baselines`` as a tuple of known names (a single name or a list)."""
    if baselines in (None, "none", ""):
        return ()
    names = (baselines,) if isinstance(baselines, str) else tuple(baselines)
    if unknown := [b for b in names if b not in BASELINES]:
        raise ConfigError(f"baselines must be a list of {', '.join(BASELINES)}, got {unknown}")
    return names


def _below(rows: list[dict], n: int, threshold: float) -> bool:
    return len(rows) >= n and all(row["test_acc"] < threshold for row in rows[-n:])


def should_stop(records: list[list[dict]], settings: ProtocolSettings, after: int | None = None) -> bool:
    """The stopping rule, for every run: its last ``after`` (default ``stop_after``) levels below ``stop_below``%."""
    if settings.stop_below is None:
        return False
    n = settings.stop_after if after is None else after
    return all(_below([rec["row"] for rec in r], n, settings.stop_below) for r in records)


class LotteryTicket:
    """``lth``: prune the previous level's trained weights, rewind the survivors."""

    def __init__(self, ctx: LevelContext):
        self.ctx = ctx

    def start_weights(self, t: Trial) -> dict:
        return t.rewind

    def stop_reason(self, level: int) -> str | None:
        """Why no more levels are trained (None: train ``level``)."""
        p = self.ctx.settings.protocol
        if reason := diverged(self.ctx):
            return reason
        if should_stop([t.records for t in self.ctx.trials], p):
            return f"{p.stop_after} successive levels below {p.stop_below:g}% test accuracy"
        return None

    def level_masks(self, level: int) -> list[Masks]:
        """Each run's masks for ``level``; each model is left holding the weights the level starts from."""
        c = self.ctx
        masks = []
        for t in c.trials:
            if level == 0:
                t.model.load_state_dict(t.init)
                masks.append(Masks.ones(t.model, c.weights))
                continue
            previous_masks, previous_weights = t.store.load_level(level - 1)
            t.model.load_state_dict(previous_weights)
            level_masks = prune(t.model, Masks(previous_masks).to(c.device), c.weights, c.settings.prune)
            t.model.load_state_dict(t.rewind)
            level_masks.apply_(t.model)
            masks.append(level_masks)
        return masks

    def level_optimizers(self, level: int) -> list[dict] | None:
        """The optimizer state each run's level starts from (None: a fresh optimizer)."""
        return None

    def level_trained(self, level: int, trainings: list) -> dict[int, dict]:
        """Extra columns per run after a level's training (none here)."""
        return {}


class StudyProtocol(LotteryTicket):
    """``paper``: masks from phase A (no rewind, optimizer carried on); levels trained from the init."""

    def __init__(self, ctx: LevelContext):
        super().__init__(ctx)
        s = ctx.settings
        self.p = s.protocol
        self.mask_epochs = self.p.mask_epochs or s.train.epochs
        self.shared_round0 = self.mask_epochs == s.train.epochs
        self.state: dict[int, dict] = {}   # run index -> {"round", "weights", "optimizer", "masks"}

    def start_weights(self, t: Trial) -> dict:
        return t.init

    # ------------------------------------------------------------------ stopping
    def _rounds_stopped_before(self, round_: int) -> bool:
        """Phase A made no round ``round_``: the round before it diverged, or (``study``) ``stop_after``
        successive rounds before it were below the threshold."""
        if round_ > 0 and self._diverged_round(round_) is not None:
            return True
        if self.p.stop_rule != "study" or self.p.stop_below is None or round_ == 0:
            return False
        n = self.p.stop_after
        if round_ < n:
            return False
        results = [[t.store.round_result(r) for r in range(round_ - n, round_)] for t in self.ctx.trials]
        if any(res is None for run in results for res in run):
            return False
        return all(_below([res["row"] for res in run], n, self.p.stop_below) for run in results)

    def _diverged_round(self, below: int) -> int | None:
        """The first phase-A round before ``below`` whose training diverged (None: none did)."""
        for round_ in range(below):
            results = [t.store.round_result(round_) for t in self.ctx.trials]
            if any(r is not None and r["row"].get("status") == "diverged" for r in results):
                return round_
        return None

    def stop_reason(self, level: int) -> str | None:
        if reason := diverged(self.ctx):
            return reason
        if level > 0 and (round_ := self._diverged_round(level)) is not None:
            return f"phase A's mask round {round_} diverged, so it made no masks after it"
        if self.p.stop_rule == "two_below":
            return super().stop_reason(level)
        if self.p.stop_below is not None and should_stop([t.records for t in self.ctx.trials], self.p, after=1):
            return f"phase B's last level scored below {self.p.stop_below:g}% (protocol.stop_rule=study)"
        if level > 0:
            last = self._last_round(level)
            if last < level:
                return f"phase A stopped after round {last} ({self.p.stop_after} successive rounds below " \
                       f"{self.p.stop_below:g}%), and phase B never goes past it (protocol.stop_rule=study)"
        return None

    def _last_round(self, level: int) -> int:
        """The last round phase A makes, looking no further than ``level`` (trains rounds only under ``carry``)."""
        if self.p.carry:
            return self._finish_phase_a()
        round_ = 1
        while round_ <= level and not self._rounds_stopped_before(round_):
            if self.ctx.trials[0].store.round_result(round_) is None:
                return level  # not made yet: interleaved, it is made when its level asks for it
            round_ += 1
        return round_ - 1

    # ------------------------------------------------------------------ masks and optimizer state
    def level_masks(self, level: int) -> list[Masks]:
        c = self.ctx
        if level > 0 and self.p.carry:
            self._finish_phase_a()
        elif not (level == 0 and self.shared_round0):
            self._ensure_round(level)
        masks = []
        for t in c.trials:
            t.model.load_state_dict(t.init)
            m = Masks.ones(t.model, c.weights) if level == 0 else Masks(t.store.load_round_masks(level)).to(c.device)
            m.apply_(t.model)
            masks.append(m)
        return masks

    def level_optimizers(self, level: int) -> list[dict] | None:
        """``carry``: level 1 from phase A's final state, every later level from the level before it."""
        if not self.p.carry or level == 0:
            return None
        if level == 1:
            last = self._finish_phase_a()
            return [self._state(t, last)["optimizer"] for t in self.ctx.trials]
        return [t.store.load_level_optimizer(level - 1) for t in self.ctx.trials]

    def level_trained(self, level: int, trainings: list) -> dict[int, dict]:
        """After phase B's level: round 0 is this very training when the epochs agree; carried
        optimizer states are saved with the level; the rounds' accuracy as a column."""
        c = self.ctx
        if (level == 0 and self.shared_round0) or (self.p.carry and level > 0):
            states = c.trainer.optimizer_states()
            for t, training, optimizer in zip(c.trials, trainings, states):
                if level == 0:
                    masks = Masks.ones(t.model, c.weights)
                    self._save_round(t, 0, masks, copy_state(t.model.state_dict()), optimizer, training)
                else:  # the next level continues from it; the one before this level is needed no more
                    t.store.save_level_optimizer(level, optimizer)
                    t.store.drop_level_optimizer(level - 2)
        return {t.index: {"mask_test_acc": t.store.round_result(level)["row"]["test_acc"]} for t in c.trials}

    # ------------------------------------------------------------------ phase A
    def _finish_phase_a(self) -> int:
        """``carry``: every round phase A makes, before phase B's level 1; the last round's number."""
        c = self.ctx
        last = 0
        for round_ in range(1, c.settings.prune.levels + 1):
            if self._rounds_stopped_before(round_):
                break
            if any(t.store.round_result(round_) is None for t in c.trials) and \
                    any(t.store.level_finished(1) for t in c.trials):
                raise ConfigError(
                    f"{c.trials[0].run_dir}: phase B already started from phase A's state after round {last} "
                    f"(protocol.phase_b_optimizer=carry), so it cannot be extended to prune.levels="
                    f"{c.settings.prune.levels}; keep prune.levels={last}, or pass resume=false to start over")
            self._ensure_round(round_)
            last = round_
        return last

    def _ensure_round(self, round_: int) -> None:
        """Train phase A's round ``round_`` for every run unless all of them have it on disk."""
        c = self.ctx
        if all(t.store.round_result(round_) is not None for t in c.trials):
            return
        if round_ == 0:
            masks = []
            for t in c.trials:
                t.model.load_state_dict(t.init)
                masks.append(Masks.ones(t.model, c.weights))
            optimizers = None
        else:
            self._ensure_round(round_ - 1)
            states = [self._state(t, round_ - 1) for t in c.trials]
            masks = []
            for t, state in zip(c.trials, states):
                t.model.load_state_dict(state["weights"])
                m = prune(t.model, state["masks"].to(c.device), c.weights, c.settings.prune)
                m.apply_(t.model)
                masks.append(m)
            optimizers = [state["optimizer"] for state in states]
        several = len(c.trials) > 1
        observers = [ProgressObserver(level=round_, levels=c.settings.prune.levels, epochs=self.mask_epochs,
                                      mode=_quiet(c, t), label=f"{'seed %d ' % t.s.seed if several else ''}mask round: ",
                                      clock=c.clock_of(t))
                     for t in c.trials]
        trainings = c.trainer.train_level(masks, c.generators(round_), observers, optimizers, self.mask_epochs)
        for t, m, training, optimizer in zip(c.trials, masks, trainings, c.trainer.optimizer_states()):
            if training.diverged:
                log.warning("%smask round %d diverged: the training loss was not finite at epoch %d; phase A makes "
                            "no masks after it (lower train.lr?)", f"seed {t.s.seed}: " if several else "", round_,
                            len(training.epochs))
            self._save_round(t, round_, m, copy_state(t.model.state_dict()), optimizer, training)

    def _save_round(self, t: Trial, round_: int, masks: Masks, weights: dict, optimizer: dict, training) -> None:
        sparsity = {"round": round_, "prunable_remaining": round(masks.remaining_fraction(), 6),
                    "test_acc": round(training.test_acc, 2), "steps": training.steps,
                    "status": "diverged" if training.diverged else "ok"}
        record = {"row": sparsity, "epochs": [asdict(e) for e in training.epochs]}
        t.store.save_round(round_, masks.state_dict(), {"weights": weights, "optimizer": optimizer}, record)
        self.state[t.index] = {"round": round_, "weights": weights, "optimizer": optimizer, "masks": masks}

    def _state(self, t: Trial, round_: int) -> dict:
        """Where phase A continues from after ``round_``: in memory, or from disk when resuming."""
        state = self.state.get(t.index)
        if state is not None and state["round"] == round_:
            return state
        saved = t.store.load_round_state(round_)
        return {"round": round_, "weights": saved["weights"], "optimizer": saved["optimizer"],
                "masks": Masks(t.store.load_round_masks(round_))}


def diverged(ctx: LevelContext) -> str | None:
    """Why the runs stop after a level whose training diverged (None: none did).

    A diverged level's weights are NaN, so the masks the next level would prune from them mean
    nothing; with ``trials=K`` every run stops, since they share one training step.
    """
    for t in ctx.trials:
        if t.records and t.records[-1]["row"].get("status") == "diverged":
            seed = f" (seed {t.s.seed})" if len(ctx.trials) > 1 else ""
            return f"level {t.records[-1]['row']['level']}{seed} diverged"
    return None


def _quiet(ctx: LevelContext, t: Trial) -> str:
    return ctx.settings.progress if t.index == 0 or ctx.settings.progress == "none" else "plain"


def make_protocol(ctx: LevelContext) -> LotteryTicket:
    return StudyProtocol(ctx) if ctx.settings.protocol.name == "paper" else LotteryTicket(ctx)


def train_baselines(ctx: LevelContext, level: int, masks: list[Masks], protocol: LotteryTicket) -> dict[int, dict]:
    """The baselines of a level, per run: ``random_reinit`` trains the level's masks from a fresh
    initialisation, ``random_prune`` random masks of the same per-layer sparsity from the ticket's
    starting weights. Same data order and schedule as the ticket, a fresh optimizer; one column each
    (test accuracy)."""
    columns: dict[int, dict] = {t.index: {} for t in ctx.trials}
    if level == 0:
        return columns
    s = ctx.settings
    for baseline in s.baselines:
        level_masks = []
        for t, m in zip(ctx.trials, masks):
            if baseline == "random_reinit":
                t.model.load_state_dict(t.reinit)
            else:
                t.model.load_state_dict(protocol.start_weights(t))
                m = random_masks_like(m, ctx.generator(t.s.seed, level, stream=1 + BASELINES.index(baseline)))
            m.apply_(t.model)
            level_masks.append(m)
        observers = [ProgressObserver(level=level, levels=s.prune.levels, epochs=s.train.epochs,
                                      mode=_quiet(ctx, t), label=f"{baseline}: ", clock=ctx.clock_of(t))
                     for t in ctx.trials]
        trainings = ctx.trainer.train_level(level_masks, ctx.generators(level), observers)
        for t, training in zip(ctx.trials, trainings):
            if training.diverged:
                log.warning("%s baseline of level %d diverged (a non-finite training loss): its column is left empty",
                            baseline, level)
            columns[t.index][f"{baseline}_acc"] = None if training.diverged else round(training.test_acc, 2)
    return columns


def baseline_init(seed: int) -> int:
    """The seed of the random-reinit baseline's fresh initialisation (never a run's own seed)."""
    return seed + 1_000_003
