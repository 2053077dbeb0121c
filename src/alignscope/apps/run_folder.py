"""A run folder: where an app's numbers land, with the settings that produced them.

- ``fingerprint.json``: everything that determines the folder's numbers (model identity with a hash of its
  weights, dtype, prompts, probe settings, package version). A folder accepts results only from the same
  fingerprint; anything else is refused with a message naming what differs, unless ``overwrite`` clears it.
- ``.alignscope.lock``: held (``filelock``) while a process writes; a second process fails at once. The
  operating system releases it when the holder dies, also on SIGKILL.
- JSON-lines logs: one record per line, written with write + flush + fsync; a reader drops a torn last line
  left by a killed writer (and the next append repairs the file first).
- :func:`write_json` writes whole files atomically (temp file + rename): a reader sees the old file or the new.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

FINGERPRINT = "fingerprint.json"
LOCK = ".alignscope.lock"


class RunFolderError(RuntimeError):
    """A run folder that cannot take this run's results; the message says why and how to proceed."""


# --------------------------------------------------------------------------------------------- fingerprints
def weights_digest(model: nn.Module) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes), in ``state_dict`` order."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            # a copy: numpy() would share (and pin the size of) the storage, which FSDP frees after gathering
            h.update(t.reshape(-1).view(torch.uint8).cpu().clone().numpy().tobytes())
    return h.hexdigest()


def text_digest(values: Any) -> str:
    """sha256 of a JSON-serialisable value (keys sorted)."""
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()


def package_version() -> str:
    from alignscope import __version__

    return __version__


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys for nested mappings; a list ``x`` gives ``x (count)`` and ``x[i]`` per item."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(value, (list, tuple)) and any(isinstance(v, (Mapping, list, tuple, str)) for v in value):
        out = {f"{prefix} (count)": len(value)}
        for i, item in enumerate(value):
            out.update(_flatten(item, f"{prefix}[{i}]"))
        return out
    return {prefix: list(value) if isinstance(value, tuple) else value}


def _short(value: Any, width: int = 60) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= width else text[: width - 3] + "..."


def differences(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``"key: stored X, now Y"`` for every dotted key of ``current`` whose stored value differs."""
    old, new = _flatten(stored), _flatten(current)
    out = []
    for key in sorted(new):
        if key not in old:
            out.append(f"{key}: not recorded in the folder, now {_short(new[key])}")
        elif old[key] != new[key]:
            out.append(f"{key}: stored {_short(old[key])}, now {_short(new[key])}")
    return out


# --------------------------------------------------------------------------------------------- files
def write_text(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically: a temp file in the same folder, fsynced, then renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json(path: Path, value: Any) -> Path:
    """Write ``value`` as indented JSON to ``path`` atomically."""
    return write_text(path, json.dumps(value, indent=2, sort_keys=True))


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file (``[]`` if absent). A torn last line (no newline, not JSON: a writer
    killed mid-write) is dropped with a warning; a bad line elsewhere is an error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number == len(lines):  # the last line has no newline: an interrupted append
                warnings.warn(
                    f"{path}: dropped a partial last line ({len(line)} bytes) left by an interrupted write",
                    stacklevel=2,
                )
                break
            raise RunFolderError(
                f"{path}, line {number}, is not valid JSON ({err.msg}); the file was edited or damaged. "
                "Remove that line, or start a new run folder."
            ) from err
    return records


def _repair_tail(path: Path) -> None:
    """Cut a torn last line (bytes after the last newline) so that the next record starts on its own line."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as fh:
        fh.seek(-1, os.SEEK_END)
        if fh.read(1) == b"\n":  # the usual case: only the last byte is read
            return
        fh.seek(0)
        fh.truncate(fh.read().rfind(b"\n") + 1)


def append_record(path: Path, record: Mapping[str, Any]) -> None:
    """Append one JSON line durably (write + flush + fsync), after repairing a torn last line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _repair_tail(path)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(dict(record), allow_nan=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def write_records(path: Path, records: list[Mapping[str, Any]]) -> None:
    """Replace a JSON-lines file with ``records``, atomically."""
    write_text(path, "".join(json.dumps(dict(r)) + "\n" for r in records))


# --------------------------------------------------------------------------------------------- the folder
class RunFolder:
    """A locked run folder whose results all come from one fingerprint.

    Use as a context manager: entering takes the lock (or raises :class:`RunFolderError` at once when another
    process holds it); :meth:`claim` then checks the fingerprint against the stored one and records it.

    Args:
        path: the folder (created).
        results: names of the entries (files, folders) that hold this app's numbers: what makes a folder
            "used" and what an overwrite deletes. Other entries (Hydra's, a logger's) are left alone.
        app: the command that writes it, for messages (e.g. ``alignscope-probe``).
        overwrite_hint: how the user asks for an overwrite in that app (e.g. ``overwrite=true``).
    """

    def __init__(
        self,
        path: str | Path,
        results: tuple[str, ...],
        app: str = "alignscope",
        overwrite_hint: str = "overwrite=true",
    ):
        self.path = Path(path)
        self.results = results
        self.app = app
        self.overwrite_hint = overwrite_hint
        self._lock: Any = None

    def __enter__(self) -> RunFolder:
        from filelock import FileLock, Timeout

        self.path.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.path / LOCK), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise RunFolderError(
                f"another process is writing to the run folder {self.path} (it holds {self.path / LOCK}). "
                "Wait for it to finish, or give this run its own folder (a new hydra.run.dir / paths.run_dir)."
            ) from None
        self._lock = lock
        self._remove_stale_temps()
        return self

    def _remove_stale_temps(self) -> None:
        """Delete temp files and folders of writers that were killed (only this process writes now)."""
        for pattern in ("**/.*.tmp", "**/.*.tmp-*", "**/.*.old-*"):
            for entry in self.path.glob(pattern):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    @property
    def stored_fingerprint(self) -> dict[str, Any] | None:
        path = self.path / FINGERPRINT
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise RunFolderError(f"{path} is damaged ({err.msg}); start a new run folder") from err

    def holds_results(self) -> bool:
        """Whether any of the app's result entries exists."""
        return any((self.path / name).exists() for name in self.results)

    def check(self, fingerprint: Mapping[str, Any], overwrite: bool = False) -> None:
        """Refuse (``RunFolderError``) when the stored fingerprint differs from ``fingerprint`` on any of its
        keys, or when the folder holds results but no fingerprint; ``overwrite`` clears the folder instead."""
        stored = self.stored_fingerprint
        if stored is None:
            if not self.holds_results():
                return
            problems = ["the folder holds results but no fingerprint.json (written by an older version?)"]
        else:
            problems = differences(stored, fingerprint)
        if not problems:
            return
        if overwrite:
            self.clear()
            return
        listing = "\n  ".join(problems)
        raise RunFolderError(
            f"the run folder {self.path} holds results of other settings than this {self.app} run:\n  "
            f"{listing}\nIts numbers cannot be mixed with this run's. Use a new folder (e.g. another "
            f"hydra.run.dir), or pass {self.overwrite_hint} to delete its results and start over."
        )

    def claim(self, fingerprint: Mapping[str, Any], overwrite: bool = False) -> None:
        """:meth:`check`, then record ``fingerprint`` as the folder's."""
        self.check(fingerprint, overwrite)
        write_json(self.path / FINGERPRINT, dict(fingerprint))

    def clear(self) -> None:
        """Delete the app's results (the entries named by ``results``) and the fingerprint."""
        print(f"alignscope: overwrite: deleting the earlier results in {self.path}", file=sys.stderr)
        for name in (*self.results, FINGERPRINT):
            entry = self.path / name
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            elif entry.exists() or entry.is_symlink():
                entry.unlink()
