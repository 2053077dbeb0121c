"""Why a probe result holds NaN: the degenerate cases a probe can meet, each stated with its blocks, tokens
and the scalars it makes NaN.

:func:`alignscope.probe` records :func:`explain`'s messages in ``result.meta["warnings"]`` and issues each
as a :class:`DegenerateResultWarning`. Every NaN scalar of :meth:`ProbeResult.scalars` is covered by one
of them (a last message names any NaN scalar whose cause is none of those below).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from alignscope.probing.result import ProbeResult


class DegenerateResultWarning(UserWarning):
    """Some metrics of a probe are NaN (meaningless) for the cause the message states."""


@dataclass(frozen=True)
class Degeneracy:
    """One cause of NaN metrics: its message and the prefixes of the scalar names it can make NaN."""

    message: str
    scalars: tuple[str, ...]


PLACES_LISTED = 4
"""Tokens named in a message before the rest are counted."""


def explain(result: ProbeResult) -> list[str]:
    """The messages of :func:`degeneracies`, plus one naming NaN scalars that none of them covers."""
    found = degeneracies(result)
    unexplained = [
        name
        for name, value in result.scalars().items()
        if value != value and not any(name.startswith(p) for d in found for p in d.scalars)
    ]
    messages = [d.message for d in found]
    if unexplained:
        messages.append(
            f"{', '.join(unexplained)} {'is' if len(unexplained) == 1 else 'are'} NaN for a cause not "
            "identified here (a fit of a constant series, whose R^2 is 0/0, is one)"
        )
    return messages


def degeneracies(result: ProbeResult) -> list[Degeneracy]:
    """Every degenerate case in ``result``, in the order: too few blocks, non-finite and zero Jacobians
    (per block), non-finite hidden states, zero steps and zero hidden states (per block)."""
    found = []
    layers = list(result.layers)
    if len(layers) < 2:
        found.append(
            Degeneracy(
                f"coupling needs at least 2 probed blocks; layers={layers} probes one, so coupling/*, "
                "coupling_vju/* and alignment_across/* are NaN, and so is the fit of 1/s_1 over blocks "
                "(spectra/inv_s1_*)",
                ("coupling", "alignment_across/", "alignment_uu/", "alignment_vv/", "spectra/inv_s1_"),
            )
        )
    first = int(result.meta.get("inv_s1_from", 1))
    if len(layers) >= 2 and sum(layer + 1 >= first for layer in layers) < 2:
        found.append(
            Degeneracy(
                f"the 1/s_1 fit starts at block {first} (inv_s1_from, 1-based), which leaves fewer than 2 of "
                f"the probed blocks, so spectra/inv_s1_* are NaN",
                ("spectra/inv_s1_",),
            )
        )
    tokens = result.tokens
    for li, layer in enumerate(layers):
        flagged = result.nonfinite[:, li]
        if bool(flagged.any()):
            found.append(
                Degeneracy(
                    f"block {layer}'s residual Jacobian has non-finite entries at "
                    f"{_places(tokens, flagged)}, from overflow or NaN weights in it or a non-finite input "
                    "from an earlier block: its singular values, stable rank, coupling and alignment "
                    "entries (row and column) and the fits over blocks are NaN there (counted in "
                    "nonfinite/jacobians)",
                    ("coupling", "alignment", "spectra/", "linearization/"),
                )
            )
        zero = result.zero_jacobians[:, li]
        if bool(zero.any()):
            found.append(
                Degeneracy(
                    f"block {layer}'s residual Jacobian is exactly zero at {_places(tokens, zero)}: its "
                    "output does not depend on its input there (e.g. zeroed output projections), so m_K is "
                    "0/0 and a zero matrix has no singular vectors; its coupling and alignment entries "
                    "(row and column) are NaN, and so are its stable rank (0/0) and the fit of 1/s_1 over "
                    "blocks (counted in degenerate/zero_jacobians)",
                    ("coupling", "alignment", "spectra/stable_rank", "spectra/inv_s1_"),
                )
            )
    found += _trajectory_degeneracies(result.hidden_states, tokens)
    return found


def _trajectory_degeneracies(hidden: Tensor, tokens: Tensor) -> list[Degeneracy]:
    """Non-finite hidden states, zero steps and zero hidden states of trajectories ``[P, L + 1, d]``."""
    found = []
    finite = torch.isfinite(hidden).all(-1)  # [P, L + 1]
    first_bad = torch.where(finite.all(-1), -1, (~finite).int().argmax(-1))  # [P]
    for level in sorted(set(first_bad.tolist()) - {-1}):
        where = _places(tokens, first_bad == level)
        source = "the first block's input" if level == 0 else f"block {level - 1}'s output"
        found.append(
            Degeneracy(
                f"the hidden states are non-finite from x^{level} ({source}) on at {where}, from "
                "overflow or NaN weights: lss, expodistance and linearization/cosine are NaN there",
                ("lss/", "expodistance/", "linearization/"),
            )
        )
    steps = torch.linalg.vector_norm(hidden[:, 1:] - hidden[:, :-1], dim=-1)  # [P, L]
    for block in range(steps.shape[1]):
        still = steps[:, block] == 0
        if bool(still.any()):
            found.append(
                Degeneracy(
                    f"block {block} leaves the hidden state unchanged (x^{block + 1} = x^{block}) at "
                    f"{_places(tokens, still)}: a zero step has no direction and log 0 = -inf, so lss and "
                    "expodistance/step_* are NaN there",
                    ("lss/", "expodistance/step_"),
                )
            )
    if steps.shape[1] < 2:
        found.append(
            Degeneracy(
                "the model has one block, so the fit of the step norms over blocks has one point: "
                "expodistance/step_* are NaN",
                ("expodistance/step_",),
            )
        )
    norms = torch.linalg.vector_norm(hidden, dim=-1)  # [P, L + 1]
    for level in range(norms.shape[1]):
        zero = norms[:, level] == 0
        if bool(zero.any()):
            found.append(
                Degeneracy(
                    f"x^{level} is the zero vector at {_places(tokens, zero)}: log ||x^{level}|| = -inf, so "
                    "expodistance/norm_* (and linearization/cosine if x^0 or x^L) are NaN there",
                    ("expodistance/norm_", "linearization/"),
                )
            )
    return found


def _places(tokens: Tensor, where: Tensor) -> str:
    """``"2 of 6 probed tokens (prompt 0 token 4, prompt 1 token 4)"`` for the rows of ``tokens``
    (``[P, 2]``: prompt, position) where ``where`` (``[P]`` bool) holds."""
    rows = tokens[where].tolist()
    named = ", ".join(f"prompt {p} token {t}" for p, t in rows[:PLACES_LISTED])
    more = f" and {len(rows) - PLACES_LISTED} more" if len(rows) > PLACES_LISTED else ""
    return f"{len(rows)} of {len(tokens)} probed tokens ({named}{more})"
