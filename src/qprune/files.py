"""Files that survive crashes: atomic, durable writes, strict JSON, and the sweep of what a killed write left.

A file is written to a temporary ``.<name>.tmp<pid>`` beside it, flushed to the disk (fsync), renamed
over the target (``os.replace``), and the directory is flushed too: after a crash or a power loss
either the old file or the new one is there — never an empty or half-written one, which is what a
rename without fsync can leave behind. A write that fails (a full disk, a read-only filesystem)
removes its temporary file and raises a one-line :class:`~qprune.errors.StorageError` naming the
file; temporary files of a killed process (``kill -9``) are removed by :func:`sweep_temporaries`
when the next run starts.

JSON is written strictly (RFC 8259): a non-finite float — a diverged loss — becomes ``null``,
never the bare ``NaN`` that Python writes by default and other tools refuse.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
from pathlib import Path
from typing import Any

from .errors import StorageError

TEMPORARY = re.compile(r"^\..+\.tmp(\d+)$")   # .<name>.tmp<pid>


def temporary_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = temporary_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_directory(path.parent)
    except BaseException as exc:  # a full disk, a read-only filesystem, Ctrl-C: leave nothing half-written
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, StorageError):
            raise StorageError(write_failure(path, exc)) from None
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (skipped where a filesystem cannot sync a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def write_failure(path: Path, exc: OSError) -> str:
    """One line: which file could not be written, why, and what to do."""
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"cannot write {path}: {reason} (nothing half-written is left); free some space, or move the outputs "
                "(QPRUNE_OUTPUTS=... or hydra.run.dir=...), then rerun the same command to resume")
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return (f"cannot write {path}: {reason}; write the outputs to a writable folder "
                "(QPRUNE_OUTPUTS=... or hydra.run.dir=...)")
    return f"cannot write {path}: {reason}; fix that, then rerun the same command to resume"


def strict_json(obj: Any, **kwargs: Any) -> str:
    """JSON other tools can read: NaN and infinities become null."""
    return json.dumps(finite(obj), allow_nan=False, **kwargs)


def finite(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None (recursively through dicts, lists, tuples)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, strict_json(obj, indent=2))


def sweep_temporaries(folder: Path, only_dead: bool = False) -> int:
    """Remove the temporary files that killed writes left under ``folder``; how many.

    ``only_dead``: keep those of processes still running (a folder that no lock protects).
    """
    removed = 0
    if not Path(folder).is_dir():
        return 0
    for file in Path(folder).rglob(".*.tmp*"):
        match = TEMPORARY.match(file.name)
        if not match or not file.is_file() or (only_dead and _alive(int(match.group(1)))):
            continue
        with contextlib.suppress(OSError):  # a read-only directory: nothing can be written there either
            file.unlink()
            removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True   # exists, owned by someone else
    return True
