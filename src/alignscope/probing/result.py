"""The result of a probe: per-token tensors, run metadata, and a flat dict of named scalars.

Shapes: ``P`` probed tokens, ``L'`` probed blocks (``layers``), ``L`` blocks of the model, width ``d``.
Saved as a folder with ``tensors.safetensors`` (all tensors), ``meta.json`` and ``scalars.json``; no pickle.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from alignscope.core import metrics
from alignscope.probing.degenerate import explain

HEADLINE = (
    "coupling/k10",
    "coupling/k30",
    "coupling/k50",
    "coupling_vju/k10",
    "alignment/k10",
    "lss/mean",
    "expodistance/step_slope",
    "expodistance/norm_slope",
    "spectra/s1_mean",
    "spectra/stable_rank_mean",
    "linearization/cosine",
)
"""The headline scalars: printed by the apps, summarised by the monitor, tabled by the report."""


def format_scalars(scalars: dict[str, float], names: tuple[str, ...] = HEADLINE, indent: str = "") -> str:
    """A two-column text table of the named scalars that are present."""
    rows = [(n, scalars[n]) for n in names if n in scalars]
    width = max(len(n) for n, _ in rows)
    return "\n".join(f"{indent}{n:<{width}}  {v: .4f}" for n, v in rows)


_KEYED = ("coupling", "coupling_vju", "alignment")
_PLAIN = (
    "tokens",
    "hidden_states",
    "singular_values",
    "nonfinite",
    "lss",
    "step_slope",
    "step_r2",
    "norm_slope",
    "norm_r2",
    "stable_rank",
    "inv_s1_slope",
    "inv_s1_r2",
    "linearization_cosine",
    "jacobians",
)


@dataclass
class ProbeResult:
    """Everything one probe computed.

    Attributes (tensors on the CPU):
        tokens: ``[P, 2]`` long, (prompt index, position within that prompt's real tokens).
        layers: the probed block indices (0-based), length ``L'``.
        hidden_states: ``[P, L + 1, d]`` trajectories ``x^0..x^L`` (``x^0`` is the first block's input).
        singular_values: ``[P, L', d]`` of each residual Jacobian, descending.
        nonfinite: ``[P, L']`` bool, True where a Jacobian had a NaN/Inf entry (its metrics are NaN).
        coupling, coupling_vju: ``{K: [P, L', L']}``, ``[p, i, j] = m_K(J_i, J_j)`` (ujv / vju form).
        alignment: ``{K: [P, L', L']}``, ``[p, i, j] = || |U_{j,K}^T V_{i,K}| - I ||_F / sqrt(K)``; diagonal =
            within-block alignment.
        lss: ``[P]`` line-shape score of each trajectory.
        step_slope, step_r2, norm_slope, norm_r2: ``[P]`` expodistance fits.
        stable_rank: ``[P, L']``; inv_s1_slope, inv_s1_r2: ``[P]`` fit of ``1/s_1`` against block number.
        linearization_cosine: ``[P]``, only when every block was probed, else None.
        jacobians: ``[P, L', d, d]`` residual Jacobians when ``keep_jacobians=True``, else None.
        meta: JSON-safe run facts (model, ks requested and effective, engine, dtype, ...); ``warnings``: why
            metrics are NaN, one message per cause (:func:`alignscope.probing.degenerate.explain`).
        extras: further tensors, e.g. ``block_jacobians`` ``[P, n, d, d]`` for ``meta["kept_blocks"]``.
    """

    tokens: Tensor
    layers: list[int]
    hidden_states: Tensor
    singular_values: Tensor
    nonfinite: Tensor
    coupling: dict[int, Tensor]
    coupling_vju: dict[int, Tensor]
    alignment: dict[int, Tensor]
    lss: Tensor
    step_slope: Tensor
    step_r2: Tensor
    norm_slope: Tensor
    norm_r2: Tensor
    stable_rank: Tensor
    inv_s1_slope: Tensor
    inv_s1_r2: Tensor
    linearization_cosine: Tensor | None = None
    jacobians: Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Tensor] = field(default_factory=dict)

    @property
    def ks(self) -> list[int]:
        """The requested K values (keys of ``coupling``)."""
        return sorted(self.coupling)

    @property
    def zero_jacobians(self) -> Tensor:
        """``[P, L']`` bool: the residual Jacobian is exactly zero (``s_1 = 0``; its coupling is 0/0)."""
        return self.singular_values[..., 0] == 0

    def scalars(self) -> dict[str, float]:
        """Flat dict of named floats. Every aggregate is a plain mean over the probed tokens (NaN propagates):

        - ``coupling/k{K}``, ``coupling_vju/k{K}``: mean over tokens of the mean over ordered block pairs
          ``i != j`` of ``1 - m_K(J_i, J_j)^2``; ``coupling/k{K}/block_{l}``: the same over ``j != i`` for
          block ``l``'s row.
        - ``alignment/k{K}``: within-block ``a_K``, mean over tokens and blocks; ``/block_{l}`` per block;
          ``alignment_across/k{K}``: mean over tokens and ordered pairs ``i != j``.
        - ``lss/mean``; ``expodistance/{step,norm}_{slope,r2}``; ``spectra/inv_s1_{slope,r2}``;
          ``linearization/cosine``: means over tokens.
        - ``spectra/s1/block_{l}``, ``spectra/stable_rank/block_{l}`` and their means over blocks
          ``spectra/s1_mean``, ``spectra/stable_rank_mean``.
        - ``k_effective/k{K}``: K after clipping to d; ``nonfinite/jacobians``: count of non-finite Jacobians;
          ``degenerate/zero_jacobians``: count of exactly zero ones (:attr:`zero_jacobians`).

        ``meta["warnings"]`` says why any of these is NaN (:mod:`alignscope.probing.degenerate`).
        """
        out: dict[str, float] = {}
        names = [f"block_{layer:02d}" for layer in self.layers]
        for k in self.ks:
            for key, mats in (("coupling", self.coupling[k]), ("coupling_vju", self.coupling_vju[k])):
                out[f"{key}/k{k}"] = _f(metrics.coupling_summary(mats).mean())
            per_block = metrics.coupling_per_block(self.coupling[k]).mean(0)
            for name, value in zip(names, per_block):
                out[f"coupling/k{k}/{name}"] = _f(value)
            within = torch.diagonal(self.alignment[k], dim1=-2, dim2=-1)  # [P, L']
            out[f"alignment/k{k}"] = _f(within.mean())
            for name, value in zip(names, within.mean(0)):
                out[f"alignment/k{k}/{name}"] = _f(value)
            out[f"alignment_across/k{k}"] = _f(metrics.off_diagonal_mean(self.alignment[k]).mean())
            out[f"k_effective/k{k}"] = float(self.meta.get("k_effective", {}).get(str(k), k))
        out["lss/mean"] = _f(self.lss.mean())
        for key in ("step_slope", "step_r2", "norm_slope", "norm_r2"):
            out[f"expodistance/{key}"] = _f(getattr(self, key).mean())
        s1 = self.singular_values[..., 0].mean(0)
        srank = self.stable_rank.mean(0)
        for name, a, b in zip(names, s1, srank):
            out[f"spectra/s1/{name}"] = _f(a)
            out[f"spectra/stable_rank/{name}"] = _f(b)
        out["spectra/s1_mean"] = _f(s1.mean())
        out["spectra/stable_rank_mean"] = _f(srank.mean())
        out["spectra/inv_s1_slope"] = _f(self.inv_s1_slope.mean())
        out["spectra/inv_s1_r2"] = _f(self.inv_s1_r2.mean())
        if self.linearization_cosine is not None:
            out["linearization/cosine"] = _f(self.linearization_cosine.mean())
        out["nonfinite/jacobians"] = float(self.nonfinite.sum())
        out["degenerate/zero_jacobians"] = float(self.zero_jacobians.sum())
        return out

    def save(self, path: str | Path) -> Path:
        """Write the result to folder ``path``: safetensors + JSON. Returns the folder.

        Atomic: the files are written to a temp folder beside ``path`` that then replaces it, so a reader (or a
        rerun after a kill) sees either the complete earlier folder, none, or the complete new one."""
        from safetensors.torch import save_file

        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        folder = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        folder.mkdir()
        try:
            self._write(folder, save_file)
            _replace_folder(folder, target)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return target

    def _write(self, folder: Path, save_file: Any) -> None:
        tensors: dict[str, Tensor] = {}
        for name in _PLAIN:
            value = getattr(self, name)
            if value is not None:
                tensors[name] = value.detach().cpu().contiguous()
        for name in _KEYED:
            for k, value in getattr(self, name).items():
                tensors[f"{name}.k{k}"] = value.detach().cpu().contiguous()
        for name, value in self.extras.items():
            tensors[f"extra.{name}"] = value.detach().cpu().contiguous()
        save_file(tensors, str(folder / "tensors.safetensors"))
        meta = {"layers": self.layers, "ks": self.ks, **self.meta}
        (folder / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        (folder / "scalars.json").write_text(json.dumps(self.scalars(), indent=2, sort_keys=True))

    @classmethod
    def load(cls, path: str | Path) -> ProbeResult:
        """Read a folder written by :meth:`save`."""
        from safetensors.torch import load_file

        folder = Path(path)
        if not (folder / "tensors.safetensors").is_file() or not (folder / "meta.json").is_file():
            raise FileNotFoundError(
                f"{folder} is not a saved ProbeResult (needs tensors.safetensors, meta.json)"
            )
        tensors = load_file(str(folder / "tensors.safetensors"))
        meta = json.loads((folder / "meta.json").read_text())
        layers, ks = meta.pop("layers"), meta.pop("ks")
        keyed = {name: {k: tensors[f"{name}.k{k}"] for k in ks} for name in _KEYED}
        plain = {name: tensors.get(name) for name in _PLAIN}
        extras = {k.removeprefix("extra."): v for k, v in tensors.items() if k.startswith("extra.")}
        return cls(layers=layers, meta=meta, extras=extras, **keyed, **plain)

    @classmethod
    def concat(cls, results: list[ProbeResult]) -> ProbeResult:
        """Join results of the same model, layers and ks along the token axis ``P`` (prompt indices are
        renumbered in order; ``meta`` is the first result's, with prompt lengths joined, seconds summed and
        the warnings restated for the joined tokens)."""
        if not results:
            raise ValueError("nothing to concatenate")
        first = results[0]
        for r in results[1:]:
            if r.layers != first.layers or r.ks != first.ks:
                raise ValueError("results differ in layers or ks and cannot be joined")
        tokens, offset = [], 0
        for r in results:
            t = r.tokens.clone()
            t[:, 0] += offset
            offset += len(r.meta.get("prompt_lengths", [])) or int(t[:, 0].max()) + 1
            tokens.append(t)

        def cat(name: str) -> Tensor | None:
            values = [getattr(r, name) for r in results]
            return None if any(v is None for v in values) else torch.cat(values)

        meta = dict(first.meta)
        meta["prompt_lengths"] = [n for r in results for n in r.meta.get("prompt_lengths", [])]
        meta["seconds"] = sum(r.meta.get("seconds", 0.0) for r in results)
        meta["analysis_seconds"] = sum(r.meta.get("analysis_seconds", 0.0) for r in results)
        plain = {name: cat(name) for name in _PLAIN if name != "tokens"}
        keyed = {
            name: {k: torch.cat([getattr(r, name)[k] for r in results]) for k in first.ks} for name in _KEYED
        }
        extras = {
            k: torch.cat([r.extras[k] for r in results])
            for k in first.extras
            if all(k in r.extras for r in results)
        }
        joined = cls(
            layers=list(first.layers), meta=meta, extras=extras, tokens=torch.cat(tokens), **plain, **keyed
        )
        if any("warnings" in r.meta for r in results):
            joined.meta["warnings"] = explain(joined)
        return joined


def _replace_folder(new: Path, target: Path) -> None:
    """Move folder ``new`` to ``target``, replacing an existing ``target`` (moved aside, then deleted)."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _f(value: Tensor) -> float:
    return float(value)
