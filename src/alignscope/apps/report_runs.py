"""The run folders a report reads: finding finished probe runs, picking one per model, checking settings."""

from __future__ import annotations

import difflib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignscope.probing.result import ProbeResult


class ReportInputError(ValueError):
    """A report setting that does not fit the run folders or scores; the message says what to change."""


@dataclass
class Run:
    """One probe run folder."""

    folder: Path
    info: dict[str, Any]
    scalars: dict[str, float]
    _result: ProbeResult | None = field(default=None, repr=False)

    @property
    def model(self) -> str:
        return str(self.info["model"])

    @property
    def init(self) -> str:
        return str(self.info["init"])

    @property
    def revision(self) -> str:
        return str(self.info.get("revision") or "")

    @property
    def ks(self) -> list[int]:
        """The probed K values (``result/meta.json``)."""
        return list(json.loads((self.folder / "result" / "meta.json").read_text())["ks"])

    @property
    def result(self) -> ProbeResult:
        if self._result is None:
            self._result = ProbeResult.load(self.folder / "result")
        return self._result


def find_runs(paths: Sequence[str | Path]) -> list[Run]:
    """Every finished probe run (``run.json`` + ``scalars.json`` + ``result/``) below ``paths``."""
    runs = []
    for root in paths:
        root = Path(root)
        if not root.exists():
            raise FileNotFoundError(f"no such run folder: {root}")
        for info_path in sorted(root.rglob("run.json")):
            folder = info_path.parent
            if (folder / "scalars.json").is_file() and (folder / "result" / "meta.json").is_file():
                runs.append(
                    Run(
                        folder,
                        json.loads(info_path.read_text()),
                        json.loads((folder / "scalars.json").read_text()),
                    )
                )
    return runs


def step_of(revision: str) -> int:
    """The training step a checkpoint revision names (see :func:`alignscope.apps.probe_app.revision_step`)."""
    from alignscope.apps.probe_app import revision_step

    return revision_step(revision)


def latest_pretrained(runs: list[Run]) -> dict[str, Run]:
    """The pretrained run of each model at its latest checkpoint revision."""
    latest: dict[str, Run] = {}
    for r in runs:
        if r.init == "pretrained" and (
            r.model not in latest or step_of(r.revision) >= step_of(latest[r.model].revision)
        ):
            latest[r.model] = r
    return latest


def latest_by_init(runs: list[Run], model: str) -> dict[str, Run]:
    """The runs of ``model`` by init (``"pretrained"``, ``"random"``), each at its latest checkpoint revision."""
    by_init: dict[str, Run] = {}
    for r in runs:
        if r.model == model and (
            r.init not in by_init or step_of(r.revision) >= step_of(by_init[r.init].revision)
        ):
            by_init[r.init] = r
    return by_init


def check_k(runs: list[Run], k: int) -> None:
    """``k`` must be among the probed K of every run (the coupling figures show ``m_K`` at that K)."""
    lacking = [r for r in runs if k not in r.ks]
    if lacking:
        common = sorted(set.intersection(*(set(r.ks) for r in runs)))
        choice = f"choose one of {common}" if common else "the runs share no K: report them separately"
        raise ReportInputError(
            f"--k {k} is not among the probed K of {len(lacking)} run(s), e.g. {lacking[0].folder} "
            f"(K = {lacking[0].ks}): {choice}"
        )


def check_metric(runs: list[Run], metric: str) -> None:
    """``metric`` must be a scalar of at least one of ``runs``."""
    names = sorted({name for r in runs for name in r.scalars})
    if metric not in names:
        near = difflib.get_close_matches(metric, names, n=3, cutoff=0.5)
        hint = f"did you mean {' or '.join(map(repr, near))}?" if near else f"scalars: {', '.join(names)}"
        raise ReportInputError(f"--metric {metric!r} is not a scalar of the pretrained runs ({hint})")
