"""What made a run: code version and commit, torch/CUDA, device, threads, host, start and end times.

Recorded per session (each start of the same run: the first one, every resume or extension) in
``run.json`` and ``levels.json``, so a result can be traced to the code and machine that made it,
and a run resumed elsewhere (another thread count gives other CPU results, see the README) shows it.
"""

from __future__ import annotations

import os
import platform
import socket
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import torch

from . import __version__

SOURCE = Path(__file__).resolve().parents[2]   # the checkout, when qprune runs from one


def now() -> str:
    return datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")


def git_state(folder: Path = SOURCE) -> dict | None:
    """{commit, dirty} of the checkout qprune runs from; None for an installed package or without git."""
    if not (folder / ".git").exists():
        return None
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()

        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def session(device: torch.device) -> dict:
    """This process's facts, with ``started`` now and ``ended`` to be filled in at the end."""
    return {
        "qprune": __version__,
        "git": git_state(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "host": socket.gethostname(),
        "started": now(),
        "ended": None,
    }
