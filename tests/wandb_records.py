"""Read an offline W&B run back: its ``run-*.wandb`` file is a LevelDB-style log (32 KiB blocks, 7-byte chunk
headers: crc32, length, type) after a 7-byte file header, holding ``wandb_internal_pb2.Record`` messages."""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list[Any]:
    """Every ``Record`` in a ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    out, pos, buf = [], HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            pos += BLOCK - pos % BLOCK if pos % BLOCK else 0
            continue
        buf = chunk if kind in (FULL, FIRST) else buf + chunk
        if kind in (FULL, LAST):
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
    return out


@dataclass
class OfflineRun:
    """What an offline run recorded: run settings, config, history rows, summary keys, artifacts."""

    name: str = ""
    group: str = ""
    job_type: str = ""
    project: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    artifacts: list[tuple[str, str]] = field(default_factory=list)
    exit_code: int | None = None

    def history_keys(self) -> set[str]:
        return {k for row in self.history for k in row}

    def steps_of(self, key: str) -> list[int]:
        """``trainer/global_step`` of every history row holding ``key`` (a media key: any of its fields)."""
        rows = [r for r in self.history if any(k == key or k.startswith(key + "/") for k in r)]
        return [int(r["trainer/global_step"]) for r in rows if "trainer/global_step" in r]


def _key(item: Any) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


def read_run(run_folder: Path, wait_s: float = 15.0) -> OfflineRun:
    """The :class:`OfflineRun` of ``<run folder>/wandb/offline-run-*``, re-read for up to ``wait_s`` seconds
    until its exit record is in (the W&B service writes the file asynchronously)."""
    deadline = time.monotonic() + wait_s
    while True:
        run = _read(next(Path(run_folder).glob("run-*.wandb")))
        if run.exit_code is not None or time.monotonic() > deadline:
            return run
        time.sleep(0.2)


def _read(path: Path) -> OfflineRun:
    out = OfflineRun()
    for rec in records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run  # a later run record may update some fields only
            out.name, out.group = r.display_name or out.name, r.run_group or out.group
            out.job_type, out.project = r.job_type or out.job_type, r.project or out.project
            out.tags = list(r.tags) or out.tags
        elif kind == "config":
            for item in rec.config.update:
                value = json.loads(item.value_json)
                out.config[_key(item)] = value.get("value", value) if isinstance(value, dict) else value
        elif kind == "history":
            out.history.append({_key(i): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "summary":
            out.summary |= {_key(i): json.loads(i.value_json) for i in rec.summary.update}
        elif kind == "artifact":
            out.artifacts.append((rec.artifact.name, rec.artifact.type))
        elif kind == "exit":
            out.exit_code = rec.exit.exit_code
    return out
