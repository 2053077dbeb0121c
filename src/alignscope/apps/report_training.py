"""Training run folders for a report: finding them, naming their jobs, and grouping seeds as replicates.

A training run folder (``alignscope-train``) holds ``summary.json`` (init, final and change of each headline
metric), ``probes.jsonl`` (a line of scalars per probe, with ``val/loss`` where validation ran at the probe's
step), ``probes/step_<N>/meta.json`` (parameter count, blocks, width) and ``metrics.json`` (final ``val/loss``). Hydra's
``.hydra/overrides.yaml`` names the job; jobs whose overrides differ only in ``seed`` are replicates of one
setting.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignscope.apps.correlation import finite
from alignscope.apps.report_table import RunContext
from alignscope.apps.run_folder import read_records

VAL_LOSS = "val/loss"
"""The validation loss in ``metrics.json`` (final) and in the probe records (at the probe's step)."""


@dataclass
class TrainingRun:
    """One training run folder: its summary, probe records, final metrics and Hydra overrides."""

    folder: Path
    summary: dict[str, Any]
    records: list[dict[str, Any]]
    final: dict[str, Any]
    overrides: list[str] = field(default_factory=list)
    seed: int | None = None
    d: int | None = None

    @property
    def setting(self) -> str:
        """The overrides other than ``seed`` (the folder name without overrides): equal for replicates."""
        if not self.overrides:
            return self.folder.name
        rest = [o for o in self.overrides if o.split("=")[0].lstrip("+~") != "seed"]
        return " ".join(rest) or "(defaults)"

    @property
    def job(self) -> str:
        """The job's folder name and its seed, e.g. ``0 (seed 0)``."""
        return self.folder.name + ("" if self.seed is None else f" (seed {self.seed})")

    @property
    def val_loss(self) -> float | None:
        value = self.final.get(VAL_LOSS)
        return float(value) if isinstance(value, (int, float)) else None

    @property
    def size(self) -> dict[str, float]:
        """The baselines of the last probe's ``meta.json``: ``log10_params``, ``depth`` (blocks), ``width`` (d)."""
        meta = _last_probe_meta(self.folder, self.records)
        out: dict[str, float] = {}
        if isinstance(meta.get("num_params"), int) and meta["num_params"] > 0:
            out["log10_params"] = math.log10(meta["num_params"])
        for key, name in (("num_blocks", "depth"), ("d_model", "width")):
            if isinstance(meta.get(key), int):
                out[name] = meta[key]
        return out

    def over_steps(self, x_name: str) -> list[dict[str, float]]:
        """The probe records holding both ``x_name`` and ``val/loss`` (validation at the probe's step)."""
        return [
            {"step": r["step"], x_name: r[x_name], VAL_LOSS: r[VAL_LOSS]}
            for r in self.records
            if finite(r.get(x_name)) and finite(r.get(VAL_LOSS))
        ]

    @property
    def context(self) -> RunContext:
        """The last probe's scalars, the width and the number of probed blocks (for the table's notes)."""
        return RunContext.from_scalars(self.records[-1] if self.records else {}, self.d)


def _hydra(folder: Path) -> tuple[list[str], int | None]:
    """Hydra's overrides of the job and its seed (from the composed config), if Hydra wrote them."""
    import yaml

    overrides, seed = [], None
    path = folder / ".hydra" / "overrides.yaml"
    if path.is_file():
        overrides = [str(o) for o in yaml.safe_load(path.read_text()) or []]
    cfg_path = folder / ".hydra" / "config.yaml"
    if cfg_path.is_file():
        value = (yaml.safe_load(cfg_path.read_text()) or {}).get("seed")
        seed = value if isinstance(value, int) else None
    return overrides, seed


def _last_probe_meta(folder: Path, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``meta.json`` of the last recorded probe's saved result (``{}`` when it is not there)."""
    from alignscope.apps.resumed_probes import probe_folder

    if not records:
        return {}
    path = probe_folder(folder, int(records[-1]["step"])) / "meta.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _width(folder: Path) -> int | None:
    """The model width d from the run's ``fingerprint.json`` (GPT-2 ``n_embd``, else ``hidden_size``)."""
    path = folder / "fingerprint.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text()).get("model", {}).get("config", {})
    value = config.get("n_embd") or config.get("hidden_size") or config.get("d_model")
    return int(value) if isinstance(value, int) else None


def load_training_run(folder: Path) -> TrainingRun:
    """Read one training run folder (``summary.json`` and ``probes.jsonl`` must be there)."""
    metrics = folder / "metrics.json"
    overrides, seed = _hydra(folder)
    return TrainingRun(
        folder=folder,
        summary=json.loads((folder / "summary.json").read_text()),
        records=read_records(folder / "probes.jsonl"),
        final=json.loads(metrics.read_text()) if metrics.is_file() else {},
        overrides=overrides,
        seed=seed,
        d=_width(folder),
    )


def find_training_runs(paths: Sequence[str | Path]) -> list[TrainingRun]:
    """Every finished training run (``summary.json`` + ``probes.jsonl``) below ``paths``, in folder order."""
    runs = []
    for root in map(Path, paths):
        if not root.exists():
            raise FileNotFoundError(f"no such run folder: {root}")
        for path in sorted(root.rglob("summary.json"), key=_folder_order):
            if (path.parent / "probes.jsonl").is_file():
                runs.append(load_training_run(path.parent))
    return runs


def _folder_order(path: Path) -> tuple[Any, ...]:
    """Numeric job folders (Hydra's ``0``, ``1``, ..., ``10``) in numeric order."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in path.parent.parts)


def replicate_groups(runs: Sequence[TrainingRun]) -> dict[str, list[TrainingRun]]:
    """The runs by setting (jobs that differ only in seed together), in order of first appearance."""
    groups: dict[str, list[TrainingRun]] = {}
    for run in runs:
        groups.setdefault(run.setting, []).append(run)
    return groups
