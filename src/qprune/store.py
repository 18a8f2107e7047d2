"""The run directory: what a run leaves on disk, written atomically, read back to resume.

    run.json                     identity of the run (config fingerprint) — resuming checks it
    checkpoints/init.pt          the initial weights (state_dict)
    checkpoints/rewind.pt        the rewind point, when it is not the initialisation
    levels/level_NN/masks.pt     the level's masks, packed 8 per byte (``pack_masks``)
    levels/level_NN/weights.pt   the level's trained weights
    levels/level_NN/optimizer.pt protocol.phase_b_optimizer=carry: the optimizer state the next
                                 level continues from (kept for the two newest levels)
    levels/level_NN/result.json  the level's row and per-epoch history — written last: its
                                 presence is what marks the level finished
    mask_rounds/round_NN/        protocol=paper, phase A: masks.pt, result.json and, for the
                                 newest round only, state.pt (weights and optimizer state)

Every file goes through a temporary file and ``os.replace``, so a crash never leaves a half
file that looks finished. Tensors load with ``weights_only=True``.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import ConfigError


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_save(obj: Any, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def host_copies(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Compact CPU copies: a view (one run's slice of stacked weights) must not drag its whole storage into the file."""
    return {k: v.detach().to("cpu", copy=True) for k, v in tensors.items()}


def load_tensors(path: Path) -> dict[str, Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_masks(masks: dict[str, Tensor]) -> dict[str, Tensor]:
    """Bool masks -> 1 bit per weight (``<name>`` packed uint8, ``<name>.shape``): an 8x smaller run directory."""
    packed = {}
    for name, mask in masks.items():
        flat = mask.detach().cpu().flatten()
        flat = torch.cat((flat, flat.new_zeros((-flat.numel()) % 8)))
        packed[name] = (flat.view(-1, 8).to(torch.uint8) * _BIT_WEIGHTS).sum(1, dtype=torch.uint8)
        packed[f"{name}.shape"] = torch.tensor(mask.shape, dtype=torch.long)
    return packed


def unpack_masks(packed: dict[str, Tensor]) -> dict[str, Tensor]:
    masks = {}
    for name, bits in packed.items():
        if name.endswith(".shape"):
            continue
        shape = torch.Size(packed[f"{name}.shape"].tolist())
        flat = (bits.view(-1, 1) & _BIT_WEIGHTS).ne(0).flatten()
        masks[name] = flat[: shape.numel()].view(shape)
    return masks


class RunDirectory:
    def __init__(self, path: Path):
        self.path = Path(path)

    # ------------------------------------------------------------------ identity
    def claim(self, identity: dict[str, Any], resume: bool) -> None:
        """Start a new run here, or check that what is here is the same run (to resume it)."""
        marker = self.path / "run.json"
        if marker.is_file() and not resume:
            for child in ("run.json", "checkpoints", "levels", "mask_rounds", "levels.csv", "levels.json"):
                target = self.path / child
                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        elif marker.is_file():
            previous = json.loads(marker.read_text())["identity"]
            if previous != identity:
                changed = sorted(k for k in previous.keys() | identity.keys() if previous.get(k) != identity.get(k))
                raise ConfigError(
                    f"{self.path} holds a different run (changed: {', '.join(changed)}); choose another "
                    "directory (hydra.run.dir=...) or pass resume=false to start this one over"
                )
            return
        atomic_write_text(marker, json.dumps({"identity": identity}, indent=2, sort_keys=True))

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint(self, name: str) -> Path:
        return self.path / "checkpoints" / f"{name}.pt"

    def save_checkpoint(self, name: str, state: dict[str, Tensor]) -> None:
        atomic_save(host_copies(state), self._checkpoint(name))

    def load_checkpoint(self, name: str) -> dict[str, Tensor] | None:
        path = self._checkpoint(name)
        return load_tensors(path) if path.is_file() else None

    # ------------------------------------------------------------------ levels
    def level_dir(self, level: int) -> Path:
        return self.path / "levels" / f"level_{level:02d}"

    def save_level(self, level: int, masks: dict[str, Tensor], weights: dict[str, Tensor], record: dict) -> None:
        directory = self.level_dir(level)
        atomic_save(pack_masks(masks), directory / "masks.pt")
        atomic_save(host_copies(weights), directory / "weights.pt")
        atomic_write_text(directory / "result.json", json.dumps(record, indent=2))

    def finished_levels(self) -> list[dict]:
        """Records of the levels finished so far, 0, 1, ... without gaps."""
        records = []
        while (file := self.level_dir(len(records)) / "result.json").is_file():
            records.append(json.loads(file.read_text()))
        return records

    def load_level(self, level: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        directory = self.level_dir(level)
        if not (directory / "weights.pt").is_file():
            raise ConfigError(
                f"{directory} has no weights.pt to resume from (save.weights=none?); pass resume=false to start over"
            )
        return self.load_masks(level), load_tensors(directory / "weights.pt")

    def level_finished(self, level: int) -> bool:
        return (self.level_dir(level) / "result.json").is_file()

    def save_level_optimizer(self, level: int, state: dict[str, dict[str, Tensor]]) -> None:
        atomic_save({n: host_copies(s) for n, s in state.items()}, self.level_dir(level) / "optimizer.pt")

    def load_level_optimizer(self, level: int) -> dict[str, dict[str, Tensor]]:
        path = self.level_dir(level) / "optimizer.pt"
        if not path.is_file():
            raise ConfigError(f"{path} is missing: the next level carries this level's optimizer state on "
                              f"(protocol.phase_b_optimizer=carry); delete {path.parent} to retrain that level, "
                              "or pass resume=false to start over")
        return load_tensors(path)

    def drop_level_optimizer(self, level: int) -> None:
        (self.level_dir(level) / "optimizer.pt").unlink(missing_ok=True)

    def load_masks(self, level: int) -> dict[str, Tensor]:
        return unpack_masks(load_tensors(self.level_dir(level) / "masks.pt"))

    # ------------------------------------------------------------------ phase A rounds (protocol=paper)
    def round_dir(self, round_: int) -> Path:
        return self.path / "mask_rounds" / f"round_{round_:02d}"

    def save_round(self, round_: int, masks: dict[str, Tensor], state: dict, record: dict) -> None:
        """A finished mask-making round; the previous round's state is dropped once this one is on disk."""
        directory = self.round_dir(round_)
        atomic_save(pack_masks(masks), directory / "masks.pt")
        atomic_save({"weights": host_copies(state["weights"]),
                     "optimizer": {n: host_copies(s) for n, s in state["optimizer"].items()}}, directory / "state.pt")
        atomic_write_text(directory / "result.json", json.dumps(record, indent=2))
        if round_ > 0:
            (self.round_dir(round_ - 1) / "state.pt").unlink(missing_ok=True)

    def round_result(self, round_: int) -> dict | None:
        file = self.round_dir(round_) / "result.json"
        return json.loads(file.read_text()) if file.is_file() else None

    def load_round_masks(self, round_: int) -> dict[str, Tensor]:
        return unpack_masks(load_tensors(self.round_dir(round_) / "masks.pt"))

    def load_round_state(self, round_: int) -> dict:
        path = self.round_dir(round_) / "state.pt"
        if not path.is_file():
            raise ConfigError(f"{path} is missing: phase A cannot continue; pass resume=false to start over")
        return load_tensors(path)

    def drop_weights(self, level: int) -> None:
        """Free the disk space of a level's weights once a later level exists (save.weights=last)."""
        (self.level_dir(level) / "weights.pt").unlink(missing_ok=True)
