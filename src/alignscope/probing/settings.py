"""``ProbeSettings``: every setting of a probe, validated once, in one value.

:func:`alignscope.probe` builds one from its keyword arguments; the AlignmentMonitor and both apps take one
whole (``conf/probe/`` instantiates it), so no setting can be dropped between a config and the probe.
"""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from alignscope.autodiff.jacobian import JacobianEngine
from alignscope.core.randomized import RandomizedSVD
from alignscope.probing.engines import engine_names

ATTENTION = ("eager", "sdpa")
NORMALIZATIONS = ("norm", "trace")
LINEARIZATIONS = ("all", "drop_last")
AUTO_KS = (10, 30, 50)
"""The K of ``ks="auto"`` (the paper's), each kept only where ``K <= d / 4``
(:meth:`ProbeSettings.ks_for`)."""
DTYPES = {"float32": torch.float32, "float64": torch.float64}


class ProbeSettingsError(ValueError):
    """A probe setting that cannot work; the message names it and what to change."""


@dataclass(frozen=True)
class ProbeSettings:
    """What a probe computes and how (see :func:`alignscope.probe` for each argument).

    Attributes:
        layers: block indices to probe (0-based, negative from the end), or None for all.
        tokens: ``"last"``, ``"all"``, or positions within each prompt's real tokens.
        ks: K values for coupling and alignment (sorted, unique; each clipped to ``d`` at probe time), a
            float ``q`` in ``(0, 1)`` standing for ``K = max(1, int(q * d))``, or ``"auto"`` (default): 10, 30
            and 50 where ``K <= d / 4`` (:meth:`ks_for`).
        keep_jacobians: keep the ``[P, L', d, d]`` residual Jacobians in the result.
        engine: ``"auto"``, ``"exact"``, ``"reverse"``, ``"single_token"``, ``"randomized"``, a
            ``RandomizedSVD`` or a ``JacobianEngine``.
        chunk_size: identity rows per vector-Jacobian product, or None for the default.
        dtype: compute dtype of the Jacobians, ``torch.float32`` or ``torch.float64`` (names accepted).
        attention: ``"eager"`` or ``"sdpa"`` (math kernel) during the probe.
        progress: show a progress bar over (prompt, block).
        include_final_norm: the last block's output is taken after the model's final norm (Hugging Face's
            last ``output_hidden_states`` entry), so its ``J`` and ``x^L`` include the norm.
        normalization: denominator of ``m_K``: ``"norm"`` (``||s_{i,1..K}||_p``) or ``"trace"``
            (``sum_k s_{i,k}``).
        p: the order of the norm of the top-K singular values under ``normalization="norm"`` (default 2).
        linearization: ``"all"``: cosine between ``x^L`` and ``(I + J_L) ... (I + J_1) x^0``; ``"drop_last"``:
            between ``x^L`` and ``(I + J_{L-1}) ... (I + J_1) x^0`` (the first ``L - 1`` blocks).
        inv_s1_from: first block number (1-based) of the fit of ``1 / s_1`` against block number.
        token_coupling: also compute the coupling across each prompt's probed tokens, per block
            (``ProbeResult.token_coupling``); needs an engine that forms Jacobians, and holds one prompt's
            ``T x L' x d x d`` Jacobians at a time.
    """

    layers: tuple[int, ...] | None = None
    tokens: str | tuple[int, ...] = "last"
    ks: tuple[int | float, ...] | str = "auto"
    keep_jacobians: bool = False
    engine: Any = "auto"
    chunk_size: int | None = None
    dtype: Any = torch.float32
    attention: str = "eager"
    progress: bool = False
    include_final_norm: bool = False
    normalization: str = "norm"
    p: float = 2.0
    linearization: str = "all"
    inv_s1_from: int = 1
    token_coupling: bool = False

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "layers", _layers(self.layers))
        set_(self, "tokens", _tokens(self.tokens))
        set_(self, "ks", _ks(self.ks))
        set_(self, "engine", _engine(self.engine))
        set_(self, "chunk_size", _chunk_size(self.chunk_size))
        set_(self, "dtype", _dtype(self.dtype))
        set_(self, "p", _p(self.p))
        set_(self, "inv_s1_from", _inv_s1_from(self.inv_s1_from))
        for name in ("keep_jacobians", "progress", "include_final_norm", "token_coupling"):
            if not isinstance(getattr(self, name), bool):
                raise ProbeSettingsError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.attention not in ATTENTION:
            raise ProbeSettingsError(
                f"attention must be 'eager' or 'sdpa' (math kernel), got {self.attention!r}"
            )
        if self.normalization not in NORMALIZATIONS:
            raise ProbeSettingsError(f"normalization must be 'norm' or 'trace', got {self.normalization!r}")
        if self.linearization not in LINEARIZATIONS:
            raise ProbeSettingsError(
                f"linearization must be 'all' or 'drop_last', got {self.linearization!r}"
            )

    @property
    def default_coupling_norm(self) -> bool:
        """True when ``m_K`` is divided by the 2-norm of the top-K singular values (the default)."""
        return self.normalization == "norm" and self.p == 2

    def ks_for(self, d: int | None) -> tuple[list[int], list[int], str | None]:
        """``(ks, dropped, notice)`` for width ``d``: ``ks="auto"`` is :data:`AUTO_KS` without the K above
        ``d / 4`` (the smallest kept if none fits); explicit ks are kept as given. ``notice`` says what was
        dropped, or which explicit K exceed ``d / 4``, and why that matters (None: nothing to say). A fraction
        ``q`` becomes ``K = max(1, int(q * d))`` (then sorted, unique)."""
        if self.ks != "auto":
            ks = resolve_fractions(self.ks, d)
            large = [k for k in ks if d and k > d / 4]
            if not large:
                return ks, [], None
            return (
                ks,
                [],
                (
                    f"K = {large} exceed d/4 = {d / 4:g}: with K a large share of d, m_K compares nearly whole "
                    "bases, coupling (1 - m_K^2) can be negative by definition and says little"
                ),
            )
        if not d:
            return list(AUTO_KS), [], None
        kept = [k for k in AUTO_KS if k <= d / 4] or [min(AUTO_KS[0], d)]
        dropped = [k for k in AUTO_KS if k not in kept]
        if not dropped:
            return kept, [], None
        return (
            kept,
            dropped,
            (
                f"ks=auto: K = {dropped} left out at d = {d} (above d/4 = {d / 4:g}, where coupling can be "
                f"negative by definition); probing K = {kept}. Pass ks=[...] to choose K yourself"
            ),
        )

    def as_kwargs(self) -> dict[str, Any]:
        """The settings as keyword arguments of :func:`alignscope.probe`."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def fingerprint(self) -> dict[str, Any]:
        """:meth:`record` less ``progress``: the settings that change the numbers (for run folders)."""
        return {k: v for k, v in self.record().items() if k != "progress"}

    def record(self) -> dict[str, Any]:
        """JSON-safe form (for run folders and logs)."""
        out = asdict(self)
        out["layers"] = None if self.layers is None else list(self.layers)
        out["tokens"] = self.tokens if isinstance(self.tokens, str) else list(self.tokens)
        out["ks"] = self.ks if isinstance(self.ks, str) else list(self.ks)
        out["p"] = float(self.p)
        out["engine"] = self.engine if isinstance(self.engine, str) else repr(self.engine)
        out["dtype"] = str(self.dtype).removeprefix("torch.")
        return out


def _int_list(name: str, values: Any, what: str) -> tuple[int, ...]:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise ProbeSettingsError(f"{name} must be {what}, got {values!r}")
    items = tuple(values)
    for v in items:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise ProbeSettingsError(f"{name} must be {what}, got {values!r} ({v!r} is not an integer)")
    return tuple(int(v) for v in items)


def _layers(layers: Any) -> tuple[int, ...] | None:
    if layers is None:
        return None
    if isinstance(layers, numbers.Integral) and not isinstance(layers, bool):
        return (int(layers),)
    out = _int_list("layers", layers, "block indices or null (all blocks)")
    if not out:
        raise ProbeSettingsError("layers is empty; pass null (None) for all blocks")
    return out


def _tokens(tokens: Any) -> str | tuple[int, ...]:
    if isinstance(tokens, str):
        if tokens not in ("last", "all"):
            raise ProbeSettingsError(f"tokens must be 'last', 'all' or a list of positions, got {tokens!r}")
        return tokens
    if isinstance(tokens, numbers.Integral) and not isinstance(tokens, bool):
        return (int(tokens),)
    out = _int_list("tokens", tokens, "'last', 'all' or a list of integer positions")
    if not out:
        raise ProbeSettingsError("tokens is an empty list; give positions, 'last' or 'all'")
    return out


def resolve_fractions(ks: tuple[int | float, ...], d: int | None) -> list[int]:
    """``ks`` with every fraction ``q`` replaced by ``K = max(1, int(q * d))``: sorted, unique integers."""
    fractions = [k for k in ks if isinstance(k, float)]
    if fractions and not d:
        raise ProbeSettingsError(
            f"ks {fractions} are fractions of the width d, which this model's config does not give; pass integer ks"
        )
    return sorted({max(1, int(k * d)) if isinstance(k, float) else k for k in ks})


def _ks(ks: Any) -> tuple[int | float, ...] | str:
    if ks == "auto":
        return "auto"
    what = "a list of positive integers (K) or fractions of d in (0, 1), e.g. [10, 30, 50] or [0.01, 0.05], or 'auto'"
    if isinstance(ks, numbers.Real) and not isinstance(ks, bool):
        ks = (ks,)
    if isinstance(ks, (str, bytes)) or not hasattr(ks, "__iter__"):
        raise ProbeSettingsError(f"ks must be {what}, got {ks!r}")
    out: list[int | float] = []
    for k in ks:
        if isinstance(k, numbers.Integral) and not isinstance(k, bool) and k >= 1:
            out.append(int(k))
        elif isinstance(k, numbers.Real) and not isinstance(k, (bool, numbers.Integral)) and 0 < k < 1:
            out.append(float(k))
        else:
            raise ProbeSettingsError(f"ks must be {what}, got {list(ks)} ({k!r} is neither)")
    if not out:
        raise ProbeSettingsError("ks is empty; give at least one K, e.g. ks=(10, 30, 50)")
    return tuple(sorted(set(out)))


def _p(p: Any) -> float:
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not p > 0:
        raise ProbeSettingsError(
            f"p (the order of the norm of the top-K singular values) must be > 0, got {p!r}"
        )
    return float(p)


def _inv_s1_from(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ProbeSettingsError(
            f"inv_s1_from (first block number, 1-based, of the 1/s_1 fit) must be a positive integer, got {value!r}"
        )
    return int(value)


def _engine(engine: Any) -> Any:
    if engine is None:
        return "auto"
    if isinstance(engine, (RandomizedSVD, JacobianEngine)):
        return engine
    if not isinstance(engine, str) or engine not in engine_names():
        raise ProbeSettingsError(
            f"unknown engine {engine!r}; choose one of {engine_names()}, or pass a JacobianEngine or a "
            "RandomizedSVD"
        )
    return engine


def _chunk_size(chunk_size: Any) -> int | None:
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise ProbeSettingsError(
            f"chunk_size must be a positive integer (rows per product) or None for the default, "
            f"got {chunk_size!r}"
        )
    return int(chunk_size)


def _dtype(dtype: Any) -> torch.dtype:
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    if dtype not in DTYPES.values():
        raise ProbeSettingsError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    return dtype
