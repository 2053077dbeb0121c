"""The result of a probe: per-token tensors, run metadata, and a flat dict of named scalars.

Shapes: ``P`` probed tokens, ``L'`` probed blocks (``layers``), ``L`` blocks of the model, width ``d``.
Saved as a folder with ``tensors.safetensors`` (all tensors, named after their fields: ``{field}.k{K}`` for a
``{K: tensor}`` field, ``extra.{name}`` for ``extras``), ``meta.json`` (``meta`` with ``layers`` and ``ks``) and
``scalars.json``; no pickle. :func:`tensor_fields` is the schema of the tensor fields.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor

from alignscope.core import metrics
from alignscope.core.token_coupling import token_coupling_summary
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


PLAIN: Mapping[str, str] = MappingProxyType({"kind": "plain"})
"""Field metadata of a tensor with the token axis ``P`` first; saved under the field's name."""
OPTIONAL: Mapping[str, str] = MappingProxyType({"kind": "optional"})
"""Field metadata of a tensor like ``PLAIN`` that may be None (then not saved; joined only if all have it)."""
KEYED: Mapping[str, str] = MappingProxyType({"kind": "keyed"})
"""Field metadata of a ``{K: tensor}`` dict over the ks, each tensor ``P`` first; saved as ``{name}.k{K}``."""


def tensor_fields(cls: type) -> list[tuple[str, str]]:
    """``(name, kind)`` of every per-token tensor field of dataclass ``cls``, in declaration order: the schema
    that :meth:`ProbeResult.save`, :meth:`~ProbeResult.load`, :meth:`~ProbeResult.concat` and
    :meth:`~ProbeResult.stack` follow. Declare a new field once with ``PLAIN``, ``OPTIONAL`` or ``KEYED``
    metadata (in a subclass too) and it is saved, loaded, joined and stacked."""
    return [(f.name, f.metadata["kind"]) for f in fields(cls) if "kind" in f.metadata]


def _required_tensor_names(cls: type, ks: list[int]) -> list[str]:
    """The names in ``tensors.safetensors`` of every non-optional tensor field of ``cls``, for these ks."""
    names: list[str] = []
    for name, kind in tensor_fields(cls):
        if kind == "keyed":
            names += [f"{name}.k{k}" for k in ks]
        elif kind == "plain":
            names.append(name)
    return names


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
        alignment_uu, alignment_vv: ``{K: [P, L', L']}``, ``|| |U_{j,K}^T U_{i,K}| - I ||_F / sqrt(K)`` and
            ``|| |V_{j,K}^T V_{i,K}| - I ||_F / sqrt(K)`` (left/left, right/right; zero diagonal).
        lss: ``[P]`` line-shape score of each trajectory.
        step_slope, step_r2, norm_slope, norm_r2: ``[P]`` expodistance fits.
        stable_rank: ``[P, L']``; inv_s1_slope, inv_s1_r2: ``[P]`` fit of ``1/s_1`` against block number.
        linearization_cosine: ``[P]``, only when every block was probed, else None.
        jacobians: ``[P, L', d, d]`` residual Jacobians when ``keep_jacobians=True``, else None.
        meta: JSON-safe run facts (model, ks requested and effective, engine, dtype, ...); ``warnings``: why
            metrics are NaN, one message per cause (:func:`alignscope.probing.degenerate.explain`).
        extras: further tensors, e.g. ``block_jacobians`` ``[P, n, d, d]`` for ``meta["kept_blocks"]``.
    """

    tokens: Tensor = field(metadata=PLAIN)
    layers: list[int]
    hidden_states: Tensor = field(metadata=PLAIN)
    singular_values: Tensor = field(metadata=PLAIN)
    nonfinite: Tensor = field(metadata=PLAIN)
    coupling: dict[int, Tensor] = field(metadata=KEYED)
    coupling_vju: dict[int, Tensor] = field(metadata=KEYED)
    alignment: dict[int, Tensor] = field(metadata=KEYED)
    alignment_uu: dict[int, Tensor] = field(metadata=KEYED)
    alignment_vv: dict[int, Tensor] = field(metadata=KEYED)
    lss: Tensor = field(metadata=PLAIN)
    step_slope: Tensor = field(metadata=PLAIN)
    step_r2: Tensor = field(metadata=PLAIN)
    norm_slope: Tensor = field(metadata=PLAIN)
    norm_r2: Tensor = field(metadata=PLAIN)
    stable_rank: Tensor = field(metadata=PLAIN)
    inv_s1_slope: Tensor = field(metadata=PLAIN)
    inv_s1_r2: Tensor = field(metadata=PLAIN)
    linearization_cosine: Tensor | None = field(default=None, metadata=OPTIONAL)
    jacobians: Tensor | None = field(default=None, metadata=OPTIONAL)
    meta: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Tensor] = field(default_factory=dict)

    @property
    def ks(self) -> list[int]:
        """The requested K values (keys of ``coupling``)."""
        return sorted(self.coupling)

    @property
    def token_coupling(self) -> dict[int, Tensor] | None:
        """``{K: [prompts, L', T, T]}``, ``[b, l, t, t'] = m_K(J^l_t, J^l_{t'})`` across prompt ``b``'s probed
        tokens (positions in ``extras["token_coupling_positions"]`` ``[prompts, T]``, -1 and NaN where a
        prompt has fewer), when probed with ``token_coupling=True``; else None."""
        if "token_coupling_positions" not in self.extras:
            return None
        return {k: self.extras[f"token_coupling_k{k}"] for k in self.ks}

    @property
    def zero_jacobians(self) -> Tensor:
        """``[P, L']`` bool: the residual Jacobian is exactly zero (``s_1 = 0``; its coupling is 0/0)."""
        return self.singular_values[..., 0] == 0

    def __repr__(self) -> str:
        """Model, settings (engine, dtype, ks, tokens), tensor shapes (no values) and the headline scalars."""
        from alignscope.probing.result_views import describe

        return describe(self)

    def to_frame(self, level: str = "block") -> Any:
        """A tidy ``pandas.DataFrame`` (needs pandas) of the per-token values, unaggregated.

        ``level="block"``: one row per probed token and probed block (``P * L'`` rows, tokens outer):
            ``prompt``, ``position`` (the token, as in :attr:`tokens`), ``block`` (0-based index), ``s1``
            (largest singular value), ``stable_rank``, ``nonfinite`` (bool), and per K: ``coupling_k{K}`` and
            ``coupling_vju_k{K}`` (block ``i``'s row mean over ``j != i`` of ``1 - m_K(J_i, J_j)^2``, see
            :func:`alignscope.core.metrics.coupling_per_block`), ``alignment_k{K}`` (within-block ``a_K``).
        ``level="token"``: one row per probed token (``P`` rows): ``prompt``, ``position``, ``lss``,
            ``step_slope``, ``step_r2``, ``norm_slope``, ``norm_r2``, ``inv_s1_slope``, ``inv_s1_r2``,
            ``linearization_cosine`` (when computed), and per K: ``coupling_k{K}``, ``coupling_vju_k{K}``
            (mean over ordered block pairs ``i != j`` of ``1 - m_K^2``), ``alignment_k{K}`` (within-block, mean
            over blocks), ``alignment_across_k{K}`` (mean over ``i != j``).

        The means of the token frame's columns are the scalars of :meth:`scalars` (e.g. ``coupling_k10`` and
        ``coupling/k10``); join the two frames on ``["prompt", "position"]``. Values keep the tensors' dtype.
        """
        from alignscope.probing.result_views import frame

        return frame(self, level)

    def scalars(self) -> dict[str, float]:
        """Flat dict of named floats. Every aggregate is a plain mean over the probed tokens (NaN propagates):

        - ``coupling/k{K}``, ``coupling_vju/k{K}``: mean over tokens of the mean over ordered block pairs
          ``i != j`` of ``1 - m_K(J_i, J_j)^2``; ``coupling/k{K}/block_{l}``: the same over ``j != i`` for
          block ``l``'s row.
        - ``alignment/k{K}``: within-block ``a_K``, mean over tokens and blocks; ``/block_{l}`` per block;
          ``alignment_across/k{K}``: mean over tokens and ordered pairs ``i != j``; ``alignment_uu/k{K}``,
          ``alignment_vv/k{K}``: the left/left and right/right alignments, the same mean.
        - ``token_coupling/k{K}`` (with ``token_coupling=True``): mean over prompts, blocks and ordered token
          pairs ``t != t'`` of ``1 - m_K(J^l_t, J^l_{t'})^2``.
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
            out[f"alignment_uu/k{k}"] = _f(metrics.off_diagonal_mean(self.alignment_uu[k]).mean())
            out[f"alignment_vv/k{k}"] = _f(metrics.off_diagonal_mean(self.alignment_vv[k]).mean())
            out[f"k_effective/k{k}"] = float(self.meta.get("k_effective", {}).get(str(k), k))
        for k, m in (self.token_coupling or {}).items():
            out[f"token_coupling/k{k}"] = _f(token_coupling_summary(m).nanmean())
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
        for name, kind in tensor_fields(type(self)):
            value = getattr(self, name)
            named = {f"{name}.k{k}": v for k, v in value.items()} if kind == "keyed" else {name: value}
            tensors.update({key: v.detach().cpu().contiguous() for key, v in named.items() if v is not None})
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
        missing = [n for n in _required_tensor_names(cls, ks) if n not in tensors]
        if missing:
            raise ValueError(
                f"{folder / 'tensors.safetensors'} lacks {missing}, which {cls.__name__} needs (ks {ks} from "
                "meta.json); it was not written by this version's save(): probe again, or load it with the "
                "version that wrote it"
            )
        values = {
            name: {k: tensors[f"{name}.k{k}"] for k in ks} if kind == "keyed" else tensors.get(name)
            for name, kind in tensor_fields(cls)
        }
        extras = {k.removeprefix("extra."): v for k, v in tensors.items() if k.startswith("extra.")}
        return cls(layers=layers, meta=meta, extras=extras, **values)

    @classmethod
    def stack(cls, per_token: list[dict[str, Any]], ks: list[int], **given: Any) -> ProbeResult:
        """Stack per-token values into a result: each tensor field ``name`` not in ``given`` is
        ``torch.stack([t[name] for t in per_token])`` (``{K: ...}`` for keyed fields, over ``ks``; an optional
        field absent from the first token is None). ``given`` holds the other fields (``tokens``, ``layers``,
        ``meta``, ...) as they are; keys of ``per_token`` that are no field are ignored."""
        values: dict[str, Any] = {}
        for name, kind in tensor_fields(cls):
            if name in given or (kind == "optional" and name not in per_token[0]):
                continue
            if kind == "keyed":
                values[name] = {k: torch.stack([t[name][k] for t in per_token]) for k in ks}
            else:
                values[name] = torch.stack([t[name] for t in per_token])
        return cls(**values, **given)

    @classmethod
    def concat(cls, results: list[ProbeResult]) -> ProbeResult:
        """Join results of the same model, layers and ks along the token axis ``P`` (prompt indices are
        renumbered in order; ``meta`` is the first result's, with prompt lengths joined, seconds summed and
        the warnings restated for the joined tokens; an optional tensor or an extra is kept only if every
        result has it)."""
        if not results:
            raise ValueError("nothing to concatenate")
        first = results[0]
        for r in results[1:]:
            if r.layers != first.layers or r.ks != first.ks:
                raise ValueError("results differ in layers or ks and cannot be joined")
        values = {name: _join([getattr(r, name) for r in results], kind) for name, kind in tensor_fields(cls)}
        tokens, offset = [], 0
        for r in results:
            t = r.tokens.clone()
            t[:, 0] += offset
            offset += len(r.meta.get("prompt_lengths", [])) or int(t[:, 0].max()) + 1
            tokens.append(t)
        values["tokens"] = torch.cat(tokens)
        meta = dict(first.meta)
        meta["prompt_lengths"] = [n for r in results for n in r.meta.get("prompt_lengths", [])]
        meta["seconds"] = sum(r.meta.get("seconds", 0.0) for r in results)
        meta["analysis_seconds"] = sum(r.meta.get("analysis_seconds", 0.0) for r in results)
        extras = {
            k: _cat_padded([r.extras[k] for r in results])
            for k in first.extras
            if all(k in r.extras for r in results)
        }
        joined = cls(layers=list(first.layers), meta=meta, extras=extras, **values)
        if any("warnings" in r.meta for r in results):
            joined.meta["warnings"] = explain(joined)
        return joined


def _cat_padded(values: list[Tensor]) -> Tensor:
    """``torch.cat`` along the first axis, the other axes padded to the largest size first (NaN for floats,
    -1 for integers): per-prompt extras such as ``token_coupling_k{K}`` differ in their token axes."""
    shape = [max(v.shape[i] for v in values) for i in range(1, values[0].ndim)]
    fill = float("nan") if values[0].is_floating_point() else -1
    padded = []
    for v in values:
        if list(v.shape[1:]) != shape:
            out = torch.full((v.shape[0], *shape), fill, dtype=v.dtype)
            out[tuple(slice(0, n) for n in v.shape)] = v
            v = out
        padded.append(v)
    return torch.cat(padded)


def _join(values: list[Any], kind: str) -> Any:
    """One field of several results joined along ``P``: ``{K: cat}`` for keyed fields (over the first's ks),
    None for an optional field that some result lacks, else ``torch.cat``."""
    if kind == "keyed":
        return {k: torch.cat([v[k] for v in values]) for k in values[0]}
    if any(v is None for v in values):
        return None
    return torch.cat(values)


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
