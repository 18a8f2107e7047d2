"""The composed Hydra config -> validated, typed settings, before any training starts.

Each concern owns its settings dataclass and validates it (``prune.rate must be in (0, 1)``);
this module only gathers them, checks what spans concerns (an algebra that does not fit the
dataset, a quaternion width not divisible by 4) and names what identifies a run.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .algebra import Algebra
from .data import DataSettings, DatasetSettings
from .errors import ConfigError
from .models import MODELS, build_model
from .protocols import ProtocolSettings, check_baselines
from .pruning import PruneSettings
from .training import TrainSettings

if TYPE_CHECKING:  # OmegaConf only when a Hydra config comes in: the runner works without it (scripts/gpu_check.py)
    from omegaconf import DictConfig

DEVICES = ("auto", "cpu", "cuda")
SAVE_WEIGHTS = ("all", "last")
PROGRESS = ("auto", "bar", "plain", "none")

# Keys that do not change a run's results: a run resumed with other values is the same run.
# prune.levels is among them so that a finished run can be extended with more levels.
NOT_IDENTITY = (
    "hydra", "logger", "device", "resume", "save", "progress", "dry_run",
    "data.root", "data.cache", "data.download", "prune.levels", "train.engine",
)


@dataclass(frozen=True)
class Settings:
    model: str
    model_options: dict
    algebra: Algebra
    dataset: DatasetSettings
    data: DataSettings
    prune: PruneSettings
    train: TrainSettings
    protocol: ProtocolSettings = ProtocolSettings()
    baselines: tuple[str, ...] = ()  # random_reinit, random_prune: trained beside every level
    seed: int = 0
    trials: int = 1                 # runs with seeds seed, seed+1, ... trained side by side
    device: str = "auto"
    resume: bool = True
    save_weights: str = "all"
    progress: str = "auto"

    @classmethod
    def from_config(cls, cfg: DictConfig | dict) -> "Settings":
        c = _plain(cfg)
        try:
            prune = dict(c["prune"])
            layer_rates = prune.pop("rates", None) or {}
            prune_output = prune.pop("output", True)
            settings = cls(
                model=c["model"]["name"],
                model_options={k: (tuple(v) if isinstance(v, list) else v) for k, v in c["model"].items() if k != "name"},
                algebra=Algebra(**c["algebra"]),
                dataset=DatasetSettings(**c["dataset"]),
                data=DataSettings(**c["data"]),
                prune=PruneSettings(**prune, layer_rates=layer_rates, prune_output=prune_output),
                train=TrainSettings(**c["train"]),
                protocol=ProtocolSettings(**c.get("protocol", {})),
                baselines=check_baselines(c.get("baselines")),
                seed=c.get("seed", 0),
                trials=c.get("trials", 1),
                device=c.get("device", "auto"),
                resume=c.get("resume", True),
                save_weights=c.get("save", {}).get("weights", "all"),
                progress=c.get("progress", "auto"),
            )
        except TypeError as exc:  # an unexpected key in a config group file
            raise ConfigError(f"config does not fit qprune's settings: {exc}") from None
        settings._check()
        return settings

    def _check(self) -> None:
        if self.model not in MODELS:
            raise ConfigError(f"model must be one of {', '.join(MODELS)}, got {self.model!r}")
        for key, value, allowed in (
            ("device", self.device, DEVICES), ("save.weights", self.save_weights, SAVE_WEIGHTS),
            ("progress", self.progress, PROGRESS),
        ):
            if value not in allowed:
                raise ConfigError(f"{key} must be one of {', '.join(allowed)}, got {value!r}")
        if self.protocol.name == "paper" and self.prune.rewind not in ("init", 0, "0"):
            raise ConfigError(f"protocol=paper resets every level to the initialisation: prune.rewind must be init, got {self.prune.rewind!r}")
        if not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.trials, int) or self.trials < 1:
            raise ConfigError(f"trials must be a positive integer (runs with seeds seed, seed+1, ...), got {self.trials!r}")
        if self.train.engine == "graph" and (self.device == "cpu" or not torch.cuda.is_available()):
            raise ConfigError("train.engine=graph needs a CUDA device; use train.engine=auto (graph on CUDA, eager on the CPU) or eager")
        # Fails here, before any data is read, when the algebra does not fit the images or a
        # width does not fit the algebra.
        self.algebra.input_channels(self.dataset.channels, flat=MODELS[self.model].flat)
        with torch.device("meta"):
            build_model(self.model, self.algebra, 10, None, **self.model_options)


def _plain(cfg: DictConfig | dict) -> dict[str, Any]:
    if isinstance(cfg, dict):
        return cfg
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def run_identity(cfg: DictConfig | dict) -> dict[str, Any]:
    """The dotted config keys that define a run's results (see NOT_IDENTITY).

    Keys whose value is null are left out: an option added later with a null default (its
    behaviour unchanged) then keeps every earlier run's identity, so old runs still resume.
    """
    flat = flatten({k: v for k, v in _plain(cfg).items() if k != "hydra"})
    return {
        k: (list(v) if isinstance(v, tuple) else v)
        for k, v in sorted(flat.items())
        if v is not None and not any(k == skip or k.startswith(skip + ".") for skip in NOT_IDENTITY)
    }



def run_id_of(cfg: DictConfig | dict) -> str:
    """The run id: a short hash of the run's identity (the run directory's name, the W&B run's id)."""
    return hashlib.sha1(json.dumps(run_identity(cfg), sort_keys=True, default=str).encode()).hexdigest()[:8]
