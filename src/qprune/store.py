"""The run directory: what a run leaves on disk, written atomically, read back to resume.

    run.json                     identity of the run (config fingerprint) — resuming checks it —
                                 and the CPU thread count it was started with
    run.lock                     held (``flock``) by the process running it: a second one refuses
    checkpoints/init.pt          the initial weights (state_dict)
    checkpoints/rewind.pt        the rewind point, when it is not the initialisation
    levels/level_NN/masks.pt     the level's masks, packed 8 per byte (``pack_masks``)
    levels/level_NN/weights.pt   the level's trained weights
    levels/level_NN/optimizer.pt protocol.phase_b_optimizer=carry: the optimizer state the next
                                 level continues from (kept for the two newest levels)
    levels/level_NN/result.json  the level's row and per-epoch history, and the size and sha256 of
                                 the files above — written last: its presence marks the level finished
    mask_rounds/round_NN/        protocol=paper, phase A: masks.pt, result.json and, for the
                                 newest round only, state.pt (weights and optimizer state)

Every file goes through :mod:`qprune.files` (temporary file, fsync, ``os.replace``), so a crash
never leaves a half file that looks finished. Tensors load with ``weights_only=True``. What a
resume reads is checked: every finished level's files against the sizes its ``result.json``
recorded, the files it loads against their sha256 too; a missing, truncated or unreadable file
is a one-line :class:`~qprune.errors.RunDirectoryError` that names it and the fix.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import ConfigError, RunDirectoryBusy, RunDirectoryError, StorageError
from .files import atomic_write_bytes, atomic_write_text, strict_json, write_failure, write_json  # noqa: F401

log = logging.getLogger("qprune")

START_OVER = "pass resume=false to start over"


def atomic_save(obj: Any, path: Path) -> dict[str, Any]:
    """``torch.save`` through an atomic write; the file's size and sha256 (to verify it when it is read back)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getvalue()
    atomic_write_bytes(path, data)
    return _digest(data)


def host_copies(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Compact CPU copies: a view (one run's slice of stacked weights) must not drag its whole storage into the file."""
    return {k: v.detach().to("cpu", copy=True) for k, v in tensors.items()}


def load_tensors(path: Path) -> dict[str, Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def read_tensors(path: Path, fix: str, recorded: dict | None = None) -> Any:
    """``torch.load`` of a run-directory file, checked against its ``recorded`` size and sha256 when known.

    Any failure is one line naming the file and ``fix``.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise RunDirectoryError(f"{path} is missing: {fix}") from None
    except OSError as exc:
        raise RunDirectoryError(f"{path} cannot be read ({exc.strerror}): {fix}") from None
    if recorded is not None:
        if len(data) != recorded["bytes"]:
            raise RunDirectoryError(f"{path} is corrupt ({len(data)} bytes, {recorded['bytes']} were written): {fix}")
        if hashlib.sha256(data).hexdigest() != recorded["sha256"]:
            raise RunDirectoryError(f"{path} is corrupt (its sha256 differs from the one recorded when it was written): {fix}")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a truncated zip, pickle garbage, ...: all mean the same to a person
        raise RunDirectoryError(f"{path} is unreadable ({_first_line(exc)}): {fix}") from None


def read_json(path: Path, fix: str) -> Any:
    """A run-directory JSON file; an empty, garbage or unreadable one is one line naming it and ``fix``."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise RunDirectoryError(f"{path} is missing: {fix}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RunDirectoryError(f"{path} cannot be read ({_first_line(exc)}): {fix}") from None
    try:
        return json.loads(text)
    except ValueError:
        what = "is empty" if not text.strip() else "is not valid JSON"
        raise RunDirectoryError(f"{path} {what}: {fix}") from None


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."


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


def level_fix(directory: Path) -> str:
    return f"delete {directory} to retrain that level (the levels after it are retrained too), or {START_OVER}"


class RunLock:
    """An exclusive ``flock`` on ``run.lock``: one process per run directory.

    The operating system releases it when the process ends, however it ends (``kill -9``
    included), so a stale lock never blocks a rerun. Where the directory cannot be written
    (a read-only filesystem) no lock is taken: no process can change the run there either.
    """

    def __init__(self, directory: Path):
        self.directory, self.fd = Path(directory), None
        self.read_only = False

    def __enter__(self) -> "RunLock":
        path = self.directory / "run.lock"
        try:
            import fcntl
        except ImportError:  # not a POSIX system: no lock
            return self
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM) and (self.directory / "run.json").is_file():
                self.read_only = True
                return self
            raise StorageError(write_failure(path, exc)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunDirectoryBusy(
                    f"{self.directory} is in use by another qprune process (pid {holder}): wait for it to finish, "
                    "or stop it and rerun this command to resume") from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc_info) -> None:
        if self.fd is not None:
            os.close(self.fd)   # releases the lock; the file stays (removing it would race a waiting process)
            self.fd = None


class RunDirectory:
    def __init__(self, path: Path):
        self.path = Path(path)

    def lock(self) -> RunLock:
        return RunLock(self.path)

    # ------------------------------------------------------------------ identity
    def claim(self, identity: dict[str, Any], resume: bool, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Start a new run here, or check that what is here is the same run (to resume it); run.json's contents.

        ``extra`` (the thread count, say) is recorded beside the identity when the run starts.
        """
        marker = self.path / "run.json"
        if marker.exists() and not resume:
            for child in ("run.json", "checkpoints", "levels", "mask_rounds", "levels.csv", "levels.json"):
                target = self.path / child
                try:
                    shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
                except OSError as exc:
                    raise StorageError(write_failure(target, exc)) from None
        elif marker.exists():
            fix = (f"{START_OVER}, or delete it to resume the levels in {self.path} with this command's settings")
            content = read_json(marker, fix)
            if not isinstance(content, dict) or not isinstance(content.get("identity"), dict):
                raise RunDirectoryError(f"{marker} holds no run identity: {fix}")
            previous = content["identity"]
            if previous != identity:
                changed = sorted(k for k in previous.keys() | identity.keys() if previous.get(k) != identity.get(k))
                raise ConfigError(
                    f"{self.path} holds a different run (changed: {', '.join(changed)}); choose another "
                    "directory (hydra.run.dir=...) or pass resume=false to start this one over"
                )
            return content
        content = {"identity": identity, **(extra or {})}
        atomic_write_text(marker, strict_json(content, indent=2, sort_keys=True))
        return content

    def sweep_temporaries(self) -> int:
        """Remove the temporary files of writes that a killed process left (call it holding the lock)."""
        from .files import sweep_temporaries

        return sweep_temporaries(self.path)

    def sessions(self) -> list[dict]:
        """Provenance of the sessions that made this run so far (see qprune.provenance), from run.json."""
        marker = self.path / "run.json"
        content = read_json(marker, START_OVER) if marker.exists() else {}
        return list(content.get("sessions") or []) if isinstance(content, dict) else []

    def save_sessions(self, sessions: list[dict]) -> None:
        """The sessions in run.json, beside the identity (claim wrote it)."""
        marker = self.path / "run.json"
        content = read_json(marker, START_OVER)
        atomic_write_text(marker, strict_json({**content, "sessions": sessions}, indent=2, sort_keys=True))

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint(self, name: str) -> Path:
        return self.path / "checkpoints" / f"{name}.pt"

    def save_checkpoint(self, name: str, state: dict[str, Tensor]) -> None:
        atomic_save(host_copies(state), self._checkpoint(name))

    def load_checkpoint(self, name: str, fix: str = START_OVER) -> dict[str, Tensor] | None:
        path = self._checkpoint(name)
        return read_tensors(path, fix) if path.exists() else None

    # ------------------------------------------------------------------ levels
    def level_dir(self, level: int) -> Path:
        return self.path / "levels" / f"level_{level:02d}"

    def save_level(self, level: int, masks: dict[str, Tensor], weights: dict[str, Tensor], record: dict) -> None:
        """The level's files, then its ``result.json`` with their sizes and checksums (the optimizer state
        the protocol saved for the next level included)."""
        directory = self.level_dir(level)
        files = {"masks.pt": atomic_save(pack_masks(masks), directory / "masks.pt"),
                 "weights.pt": atomic_save(host_copies(weights), directory / "weights.pt")}
        if (optimizer := directory / "optimizer.pt").is_file():
            files["optimizer.pt"] = _digest(optimizer.read_bytes())
        write_json(directory / "result.json", {**record, "files": files})

    def finished_levels(self) -> list[dict]:
        """Records of the levels finished so far, 0, 1, ... without gaps."""
        return [self._result(level) for level in range(self.finished_level_count())]

    def finished_level_count(self) -> int:
        """How many levels are finished, 0, 1, ... without gaps."""
        n = 0
        while self.level_finished(n):
            n += 1
        return n

    def _result(self, level: int) -> dict:
        directory = self.level_dir(level)
        record = read_json(directory / "result.json", level_fix(directory))
        if not isinstance(record, dict) or not isinstance(record.get("row"), dict):
            raise RunDirectoryError(f"{directory / 'result.json'} holds no level row: {level_fix(directory)}")
        return record

    def _recorded(self, level: int, name: str) -> dict | None:
        """The size and sha256 that ``result.json`` recorded for one of the level's files (None: not recorded)."""
        if not (self.level_dir(level) / "result.json").exists():
            return None
        return self._result(level).get("files", {}).get(name)

    def verify_levels(self, records: list[dict]) -> None:
        """Every finished level's files are there with the sizes written (weights and optimizer state
        may have been dropped on purpose: ``save.weights=last``, carry's two newest levels)."""
        for level, record in enumerate(records):
            directory = self.level_dir(level)
            for name, recorded in (record.get("files") or {}).items():
                path = directory / name
                if not path.exists():
                    if name == "masks.pt":
                        raise RunDirectoryError(f"{path} is missing: {level_fix(directory)}")
                    continue
                if path.stat().st_size != recorded["bytes"]:
                    raise RunDirectoryError(f"{path} is corrupt ({path.stat().st_size} bytes, {recorded['bytes']} "
                                            f"were written): {level_fix(directory)}")

    def discard_levels_from(self, level: int) -> list[Path]:
        """Remove level directories from ``level`` on (an unfinished one, or levels after a deleted one:
        they came from the levels before and are retrained); the finished ones removed."""
        removed = []
        for directory in sorted((self.path / "levels").glob("level_*")):
            suffix = directory.name.removeprefix("level_")
            if suffix.isdigit() and int(suffix) >= level and directory.is_dir():
                if (directory / "result.json").exists():
                    removed.append(directory)
                try:
                    shutil.rmtree(directory)
                except OSError as exc:
                    raise StorageError(write_failure(directory, exc)) from None
        return removed

    def load_level(self, level: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The level's masks and trained weights (what the next level of ``lth`` prunes)."""
        directory = self.level_dir(level)
        weights = read_tensors(directory / "weights.pt", f"the next level prunes these weights; {level_fix(directory)}",
                               self._recorded(level, "weights.pt"))
        return self.load_masks(level), weights

    def level_finished(self, level: int) -> bool:
        return (self.level_dir(level) / "result.json").exists()

    def save_level_optimizer(self, level: int, state: dict[str, dict[str, Tensor]]) -> None:
        atomic_save({n: host_copies(s) for n, s in state.items()}, self.level_dir(level) / "optimizer.pt")

    def load_level_optimizer(self, level: int) -> dict[str, dict[str, Tensor]]:
        directory = self.level_dir(level)
        fix = (f"the next level carries this level's optimizer state on (protocol.phase_b_optimizer=carry); "
               f"{level_fix(directory)}")
        return read_tensors(directory / "optimizer.pt", fix, self._recorded(level, "optimizer.pt"))

    def drop_level_optimizer(self, level: int) -> None:
        (self.level_dir(level) / "optimizer.pt").unlink(missing_ok=True)

    def load_masks(self, level: int) -> dict[str, Tensor]:
        directory = self.level_dir(level)
        return unpack_masks(read_tensors(directory / "masks.pt", level_fix(directory), self._recorded(level, "masks.pt")))

    def trained_masks(self, level: int) -> dict[str, Tensor]:
        """The masks level ``level`` trains: the finished level's own or, for a ``protocol=paper`` level
        phase B has not reached yet, phase A's round-``level`` masks (the same ones)."""
        return self.load_masks(level) if self.level_finished(level) else self.load_round_masks(level)

    # ------------------------------------------------------------------ phase A rounds (protocol=paper)
    def round_dir(self, round_: int) -> Path:
        return self.path / "mask_rounds" / f"round_{round_:02d}"

    def save_round(self, round_: int, masks: dict[str, Tensor], state: dict, record: dict) -> None:
        """A finished mask-making round; the previous round's state is dropped once this one is on disk."""
        directory = self.round_dir(round_)
        files = {"masks.pt": atomic_save(pack_masks(masks), directory / "masks.pt"),
                 "state.pt": atomic_save({"weights": host_copies(state["weights"]),
                                          "optimizer": {n: host_copies(s) for n, s in state["optimizer"].items()}},
                                         directory / "state.pt")}
        write_json(directory / "result.json", {**record, "files": files})
        if round_ > 0:
            (self.round_dir(round_ - 1) / "state.pt").unlink(missing_ok=True)

    def finished_rounds(self) -> int:
        """How many phase-A rounds are on disk, 0, 1, ... without gaps."""
        n = 0
        while (self.round_dir(n) / "result.json").is_file():
            n += 1
        return n

    def round_result(self, round_: int) -> dict | None:
        file = self.round_dir(round_) / "result.json"
        return read_json(file, START_OVER) if file.exists() else None

    def _round_file(self, round_: int, name: str) -> Any:
        recorded = (self.round_result(round_) or {}).get("files", {}).get(name)
        fix = f"phase A continues from it; {START_OVER}"
        return read_tensors(self.round_dir(round_) / name, fix, recorded)

    def load_round_masks(self, round_: int) -> dict[str, Tensor]:
        return unpack_masks(self._round_file(round_, "masks.pt"))

    def load_round_state(self, round_: int) -> dict:
        return self._round_file(round_, "state.pt")

    def drop_weights(self, level: int) -> None:
        """Free the disk space of a level's weights once a later level exists (save.weights=last)."""
        (self.level_dir(level) / "weights.pt").unlink(missing_ok=True)


def _digest(data: bytes) -> dict[str, Any]:
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
