"""After a resume from a checkpoint of another run folder: bring that folder's probes into the new one."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Sequence
from pathlib import Path


def probe_folder(run_dir: Path, step: int) -> Path:
    """Where the probe of ``step`` lies in a monitor's run folder."""
    return run_dir / "probes" / f"step_{step:07d}"


def bring_probes_along(history: Sequence[dict[str, float]], source_dir: str | None, run_dir: Path) -> None:
    """Copy the probes of the restored ``history`` steps from ``source_dir`` (the folder the checkpoint was
    written in) to ``run_dir`` when they differ, and say on stderr what was copied and what is gone."""
    if not history or source_dir is None or Path(source_dir) == run_dir.resolve():
        return
    steps = [int(h["step"]) for h in history if len(h) > 1]
    missing = [s for s in steps if not probe_folder(run_dir, s).is_dir()]
    copied = []
    for step in missing:
        folder = probe_folder(Path(source_dir), step)
        if folder.is_dir():
            shutil.copytree(folder, probe_folder(run_dir, step))
            copied.append(step)
    lost = sorted(set(missing) - set(copied))
    note = f"resumed from a checkpoint of {source_dir}: copied {len(copied)} earlier probe(s)"
    if lost:
        note += (
            f"; the tensors of step(s) {lost} are not there any more, so probes.jsonl keeps their scalars "
            "but figures that need tensors start at the resume step"
        )
    print(f"alignscope: {note}", file=sys.stderr, flush=True)
