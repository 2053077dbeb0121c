"""Every architecture of the installed transformers, probed on a tiny model or refused with a reason.

:func:`survey_type` builds a tiny random-init model of one model type (its config from
``AutoConfig.for_model``, shrunk by :func:`alignscope.models.tiny.shrink_config`), probes the last token
(a vision model: token 0) of every block with ``engine="auto"``, compares each block's residual Jacobian with
the independent whole-model reference (:func:`alignscope.models.reference.reference_jacobian`), and the
probed trajectory with transformers' own ``output_hidden_states``.
``scripts/survey_models.py`` writes the table in ``docs/models.md``; the test suite checks every row.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import torch

from alignscope.models.discovery import DiscoveryError, image_shape, structural_refusal
from alignscope.models.reference import reference_jacobian
from alignscope.models.tiny import TinyModelError, tiny_model_of_type

MAPPINGS = {
    "causal_lm": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "masked_lm": "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
    "image_classification": "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
}
"""The transformers auto-model mappings surveyed, by task."""
TOLERANCE = 1e-4
"""Largest error of a block Jacobian against the reference, relative to the reference's largest entry."""
STATUSES = ("works", "refused", "no tiny model", "wrong", "error")
"""``works``: Jacobians equal the reference; ``refused``: alignscope says why it cannot probe the type;
``no tiny model``: the shrunk config does not build (nothing of alignscope ran); ``wrong``: Jacobians differ
from the reference; ``error``: the probe raised something other than a refusal (a defect)."""


@dataclass
class SurveyRow:
    """One model type's result."""

    task: str
    model_type: str
    class_name: str
    status: str
    engine: str = ""
    adapter: str = ""
    blocks: int = 0
    max_error: float = float("nan")
    reason: str = ""
    seconds: float = 0.0


def survey_types(task: str) -> dict[str, str]:
    """``{model_type: model class name}`` of one mapping of the installed transformers."""
    from transformers.models.auto import modeling_auto

    names = getattr(modeling_auto, MAPPINGS[task])
    return {t: c if isinstance(c, str) else c[0] for t, c in names.items()}


def survey_type(task: str, model_type: str, class_name: str | None = None) -> SurveyRow:
    """Build, probe and check one model type (see the module docstring)."""
    class_name = class_name or survey_types(task)[model_type]
    row = SurveyRow(task, model_type, class_name, "error")
    started = time.perf_counter()
    row.status, row.reason = _survey(row)
    row.seconds = time.perf_counter() - started
    return row


def _survey(row: SurveyRow) -> tuple[str, str]:
    """``(status, reason)`` of one model type; fills the probe's facts into ``row``."""
    from alignscope.probing.probe import probe

    try:
        model = tiny_model_of_type(row.model_type, row.class_name)
        inputs = _inputs(model)
        with torch.no_grad():
            model(**{model.main_input_name: inputs})
    except TinyModelError as err:  # still too large: refused anyway when it has no block stack at all
        why = structural_refusal(err.meta_model)
        return ("refused", why) if why else ("no tiny model", _short(err))
    except Exception as err:  # the tiny config does not build or run: nothing of alignscope ran
        return "no tiny model", _short(err)
    kw = {"pixel_values": inputs} if model.main_input_name == "pixel_values" else {"input_ids": inputs}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = probe(model, **kw, ks=(2,), keep_jacobians=True)
    except DiscoveryError as err:
        return "refused", err.reason
    except Exception as err:
        return "error", _short(err)
    row.engine, row.adapter, row.blocks = res.meta["engine"], res.meta["adapter"], res.meta["num_blocks"]
    t = int(res.tokens[0, 1])
    eye = torch.eye(res.jacobians.shape[-1])
    try:
        refs = [reference_jacobian(model, inputs, layer, t, t) - eye for layer in res.layers]
    except Exception as err:
        return "error", f"the reference Jacobian (autograd through the model's forward) fails: {_short(err)}"
    errors = [
        (res.jacobians[0, i] - ref).abs().max().item() / max(ref.abs().max().item(), 1e-12)
        for i, ref in enumerate(refs)
    ]
    row.max_error = max(errors)
    if row.max_error > TOLERANCE:
        return "wrong", f"block Jacobians differ from the reference by {row.max_error:.1e}"
    mismatch = _hidden_states_mismatch(model, kw, res, t)
    if mismatch:
        return "wrong", mismatch
    notes = [n for n in res.meta["notes"] if "single-token engine is off" in n]
    return "works", (notes[0] if notes else "")


def _hidden_states_mismatch(model: torch.nn.Module, kw: dict, res, t: int) -> str:
    """Where the probed stack disagrees with transformers' own ``output_hidden_states`` (an independent
    account of the residual stream): entry ``l`` must be block ``l``'s input, and the last entry the last
    block's output, after the final norm the adapter found (or without one where it found none). Empty when
    they agree, or when the model returns no such tuple of ``L + 1`` entries."""
    from alignscope.models import get_adapter

    try:
        with torch.no_grad():
            hidden = getattr(model(**kw, output_hidden_states=True), "hidden_states", None)
    except Exception:
        return ""
    blocks = res.meta["num_blocks"]
    if not isinstance(hidden, (tuple, list)) or len(hidden) != blocks + 1:
        return ""
    traj = res.hidden_states[0]  # [L + 1, d]: x^0..x^L at the probed token
    norm = get_adapter(model).final_norm(model)
    with torch.no_grad():
        normed = norm(traj[-1][None, None])[0, 0] if norm is not None else traj[-1]
    theirs = [h[0, t].float() for h in hidden]

    def same(a: torch.Tensor, b: torch.Tensor) -> bool:
        scale = max(b.abs().max().item(), 1e-12)
        return a.shape == b.shape and (a - b).abs().max().item() <= TOLERANCE * scale

    # the last entry: x^L after the final norm, or x^L itself (vision models keep the norm out of the tuple);
    # a norm the adapter missed shows as an entry equal to neither
    if not any(same(x, theirs[-1]) for x in (normed, traj[-1])):
        return "the last entry of output_hidden_states is neither the last block's output nor its final norm"
    # the others: the block inputs x^0..x^{L-1}, or (Mamba, RWKV) the block outputs x^1..x^{L-1}
    if not (all(map(same, traj[:-1], theirs[:-1])) or all(map(same, traj[1:-1], theirs[:-2]))):
        first = next(i for i, (a, b) in enumerate(zip(traj, theirs)) if not same(a, b))
        return f"entry {first} of output_hidden_states is not block {first}'s input as the adapter finds it"
    return ""


def _inputs(model: torch.nn.Module) -> torch.Tensor:
    """One random image of the config's shape, or 5 random token ids."""
    g = torch.Generator().manual_seed(1)
    if model.main_input_name == "pixel_values":
        return torch.randn(1, *image_shape(model.config), generator=g)
    return torch.randint(3, 100, (1, 5), generator=g)


def _short(err: BaseException, limit: int = 200) -> str:
    text = f"{type(err).__name__}: {err}".replace("\n", " ").replace("|", "/")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_table(path: str) -> dict[tuple[str, str], str]:
    """``{(task, model_type): status}`` from the tables of ``docs/models.md`` (``scripts/survey_models.py``)."""
    table, task = {}, None
    with open(path) as f:
        for line in f:
            if line.startswith("## "):
                task = line[3:].strip()
            elif task in MAPPINGS and line.startswith("| `"):
                cells = [c.strip() for c in line.strip().strip("|").split("|")]
                table[(task, cells[0].strip("`"))] = cells[2]
    return table
