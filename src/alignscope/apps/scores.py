"""Benchmark score tables for ``alignscope-report --scores``: a CSV with columns ``model`` and/or ``hub_id``
and numeric columns, checked before anything is computed.

Rows with a blank or non-numeric cell in a needed column are skipped and listed, never silently dropped.
"""

from __future__ import annotations

import csv
import difflib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

ID_COLUMNS = ("model", "hub_id")
"""Columns that name a model; a row matches a probe run by its model name or hub id."""


PAPER_COUPLING_COLUMN = "coupling_in_paper"
"""The column of ``examples/paper_fig1a_scores.csv`` with the paper's own coupling of each model."""
PAPER_FIG1A_R2 = 0.80
PAPER_FIG1A_MODELS = 28
"""The R^2 of Open LLM Leaderboard score on coupling that the paper reports (Figure 1a), and over how many models."""


class ScoreTableError(ValueError):
    """A scores CSV that cannot be used; the message says what is wrong and how to fix it."""


@dataclass
class ScoreRow:
    """One usable row: its line in the file, its names, and its numeric cells by column."""

    line: int
    model: str
    hub_id: str
    values: dict[str, float]

    @property
    def label(self) -> str:
        return self.model or self.hub_id or f"line {self.line}"


@dataclass
class ScoreTable:
    """The usable rows of a scores CSV and the reasons for each skipped one (``"line 4 (gpt2): ..."``)."""

    path: Path
    columns: list[str]
    rows: list[ScoreRow]
    skipped: list[str] = field(default_factory=list)


def read_scores(path: str | Path, numeric: Sequence[str], need_ids: bool = False) -> ScoreTable:
    """Read ``path``; every column in ``numeric`` must exist (and ``model`` or ``hub_id`` with ``need_ids``).

    Rows whose ``numeric`` cells are blank or not finite numbers go to ``skipped``. Raises
    :class:`ScoreTableError` when a column is missing or no row is usable.
    """
    path = Path(path)
    if not path.is_file():
        raise ScoreTableError(f"no such scores file: {path}")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = [c.strip() for c in reader.fieldnames or []]
            cells = [({(k or "").strip(): v for k, v in row.items()}, reader.line_num) for row in reader]
    except UnicodeDecodeError as err:
        raise ScoreTableError(
            f"{path} is not UTF-8 text (byte offset {err.start}: {err.reason}); save it as UTF-8 CSV"
        ) from None
    missing = [c for c in numeric if c not in columns]
    if missing:
        hints = "; ".join(_close(c, columns) for c in missing)
        raise ScoreTableError(
            f"{path} has no column {', '.join(map(repr, missing))} ({hints}); its columns are "
            f"{', '.join(columns) or 'none'}: pass the right name (--score-column, --x-column)"
        )
    if need_ids and not set(ID_COLUMNS) & set(columns):
        raise ScoreTableError(
            f"{path} needs a column model or hub_id to match probe runs; its columns are {', '.join(columns)}"
        )
    if not cells:
        raise ScoreTableError(f"{path} has a header but no rows")
    rows, skipped = [], []
    for row, line in cells:
        model, hub_id = (row.get("model") or "").strip(), (row.get("hub_id") or "").strip()
        name = model or hub_id or "no name"
        values, problems = {}, []
        for col in numeric:
            text = (row.get(col) or "").strip()
            value = _number(text)
            if value is None:
                problems.append(f"{col} is blank" if not text else f"{col}={text!r} is not a finite number")
            else:
                values[col] = value
        if need_ids and not (model or hub_id):
            problems.append("model and hub_id are blank")
        if problems:
            skipped.append(f"line {line} ({name}): {'; '.join(problems)}")
        else:
            rows.append(ScoreRow(line, model, hub_id, values))
    if not rows:
        raise ScoreTableError(
            f"no usable row in {path}: every row has a blank or non-numeric cell in "
            f"{', '.join(numeric)}:\n  " + "\n  ".join(skipped)
        )
    return ScoreTable(path, columns, rows, skipped)


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _close(name: str, choices: Sequence[str]) -> str:
    """``did you mean 'x'?`` for the closest of ``choices`` (difflib), else ``no close match``."""
    near = difflib.get_close_matches(name, choices, n=2, cutoff=0.6)
    return f"did you mean {' or '.join(map(repr, near))}?" if near else f"no column close to {name!r}"
