"""Read back what an offline W&B run wrote (``<dir>/wandb/offline-run-*/run-<id>.wandb``).

The file is a LevelDB-style log (32 KiB blocks, 7-byte chunk headers) after a 7-byte ``:W&B``
header, holding W&B's protobuf ``Record`` messages. Reading it checks what really reached the
disk (and would be uploaded by ``wandb sync``), not what the code meant to log.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

BLOCK, CHUNK_HEADER, FILE_HEADER = 32768, 7, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


@dataclass
class OfflineRun:
    path: Path
    run_id: str = ""
    name: str = ""
    group: str = ""
    job_type: str = ""
    tags: list = field(default_factory=list)
    config: dict = field(default_factory=dict)
    history: list = field(default_factory=list)     # one dict per log() call
    summary: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)     # define_metric: name -> step metric
    exit_code: int | None = None


def _payloads(data: bytes):
    assert data[:4] == b":W&B", "not a W&B run file"
    pos, parts = FILE_HEADER, []
    while pos + CHUNK_HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < CHUNK_HEADER:  # block trailer padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        payload = data[pos + CHUNK_HEADER:pos + CHUNK_HEADER + length]
        pos += CHUNK_HEADER + length
        if kind == FULL:
            yield payload
        elif kind == FIRST:
            parts = [payload]
        elif kind == MIDDLE:
            parts.append(payload)
        elif kind == LAST:
            yield b"".join([*parts, payload])


def _items(items) -> dict:
    return {(item.key or "/".join(item.nested_key)): json.loads(item.value_json) for item in items}


def read_offline_run(run_dir: Path) -> OfflineRun:
    """``run_dir``: an ``offline-run-*`` folder."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = Path(run_dir).glob("run-*.wandb")
    run = OfflineRun(path)
    for payload in _payloads(path.read_bytes()):
        record = pb.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run.run_id, run.name, run.group, run.job_type = r.run_id, r.display_name, r.run_group, r.job_type
            run.tags = list(r.tags)
            run.config.update(_items(r.config.update))
        elif kind == "config":
            run.config.update(_items(record.config.update))
        elif kind == "history":
            run.history.append(_items(record.history.item))
        elif kind == "summary":
            run.summary.update(_items(record.summary.update))
        elif kind == "metric":
            run.metrics[record.metric.name] = record.metric.step_metric
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    return run


def offline_runs(folder: Path, superseded: bool = False) -> list[OfflineRun]:
    """Every offline W&B run under ``folder`` that ``wandb sync .../offline-run-*`` would upload, oldest first
    (``superseded``: the older copies qprune moved aside instead)."""
    found = [p for p in Path(folder).rglob("offline-run-*") if ("superseded" in p.parts) == superseded]
    return [read_offline_run(p) for p in sorted(found, key=lambda p: p.name)]
