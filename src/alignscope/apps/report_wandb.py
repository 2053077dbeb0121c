"""``alignscope-report --wandb``: the report as a W&B run of job type ``report``.

The run (named ``report-<report folder>``, grouped with the sweep it reads when there is one) holds the report
folder as an artifact of type ``report``, each CSV table as a ``wandb.Table`` (``report/<table>``) and each
figure as an image (``report/figures/<name>``). The mode follows ``WANDB_MODE`` (offline when unset, as the
apps' default), and ``WANDB_PROJECT`` / ``WANDB_ENTITY`` / ``WANDB_DIR`` as W&B users expect.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from alignscope.apps.loggers import wandb_mode


def log_report(out: Path, runs: Sequence[str], project: str | None = None) -> str | None:
    """Log the report folder ``out`` (written from the run folders ``runs``) as one W&B run; return its
    folder on disk, or None when ``WANDB_MODE=disabled``."""
    mode = wandb_mode(configured_offline=True)
    if mode == "disabled":
        return None
    import wandb

    group = Path(runs[0]).resolve().name if len(runs) == 1 else None
    run = wandb.init(
        project=project or os.environ.get("WANDB_PROJECT") or "alignscope",
        entity=os.environ.get("WANDB_ENTITY") or None,
        dir=os.environ.get("WANDB_DIR") or str(out),
        name=f"report-{out.resolve().name}",
        group=group,
        job_type="report",
        mode=mode,
        config={"runs": [str(Path(r).resolve()) for r in runs], "report": str(out.resolve())},
    )
    try:
        _log_contents(run, out)
    finally:
        run.finish()
    return run.dir


def _log_contents(run: Any, out: Path) -> None:
    import wandb

    data: dict[str, Any] = {}
    for table in sorted(out.glob("*.csv")):
        with open(table, newline="") as fh:
            rows = list(csv.reader(fh))
        if rows:
            data[f"report/{table.stem}"] = wandb.Table(columns=rows[0], data=rows[1:])
    for figure in sorted(out.rglob("*.png")):
        data[f"report/figures/{figure.stem}"] = wandb.Image(str(figure))
    if data:
        run.log(data)
    artifact = wandb.Artifact(f"report-{out.resolve().name}", type="report")
    for path in sorted(out.iterdir()):
        if path.name == "wandb":
            continue
        if path.is_dir():
            artifact.add_dir(str(path), name=path.name)
        else:
            artifact.add_file(str(path), name=path.name)
    run.log_artifact(artifact)
