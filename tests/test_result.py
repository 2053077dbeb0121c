"""ProbeResult's schema: the on-disk format, and one declaration per field for save, load, concat and stack."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from alignscope.probing.result import KEYED, OPTIONAL, ProbeResult, tensor_fields

P, LAYERS, D, KS = 3, [0, 1], 4, [1, 2]

SAVED_TENSOR_NAMES = {
    "tokens",
    "hidden_states",
    "singular_values",
    "nonfinite",
    "coupling.k1",
    "coupling.k2",
    "coupling_vju.k1",
    "coupling_vju.k2",
    "alignment.k1",
    "alignment.k2",
    "alignment_uu.k1",
    "alignment_uu.k2",
    "alignment_vv.k1",
    "alignment_vv.k2",
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
    "extra.block_jacobians",
}
"""The tensor names of a saved folder with ks (1, 2), both optional tensors and one extra."""


def fixed_tensors() -> dict[str, Tensor]:
    """A saved folder's tensors for 3 tokens of 2 prompts, 2 blocks, width 4, ks (1, 2), mixed dtypes."""
    g = torch.Generator().manual_seed(0)
    L = len(LAYERS)

    def rand(*shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    tensors = {
        "tokens": torch.tensor([[0, 0], [0, 1], [1, 0]]),
        "hidden_states": rand(P, L + 1, D),
        "singular_values": rand(P, L, D).abs().sort(-1, descending=True).values,
        "nonfinite": torch.tensor([[False, True], [False, False], [False, False]]),
        "stable_rank": rand(P, L),
        "jacobians": rand(P, L, D, D, dtype=torch.float64),
        "extra.block_jacobians": rand(P, 1, D, D, dtype=torch.bfloat16),
    }
    for name in ("coupling", "coupling_vju", "alignment", "alignment_uu", "alignment_vv"):
        tensors.update({f"{name}.k{k}": rand(P, L, L) for k in KS})
    for name in ("lss", "step_slope", "step_r2", "norm_slope", "norm_r2", "inv_s1_slope", "inv_s1_r2"):
        tensors[name] = rand(P)
    tensors["linearization_cosine"] = rand(P)
    return tensors


FIXED_META = {"model": "fixed", "prompt_lengths": [2, 1], "seconds": 1.5, "k_effective": {"1": 1, "2": 2}}


def write_folder(folder, tensors: dict[str, Tensor], meta: dict) -> None:
    """A saved ProbeResult folder written by hand, independently of ProbeResult.save."""
    folder.mkdir()
    save_file(tensors, str(folder / "tensors.safetensors"))
    (folder / "meta.json").write_text(json.dumps({"layers": LAYERS, "ks": KS, **meta}))


def fixed_result() -> ProbeResult:
    tensors = fixed_tensors()
    keyed = {
        n: {k: tensors[f"{n}.k{k}"] for k in KS}
        for n in ("coupling", "coupling_vju", "alignment", "alignment_uu", "alignment_vv")
    }
    plain = {n: v for n, v in tensors.items() if "." not in n}
    extras = {"block_jacobians": tensors["extra.block_jacobians"]}
    return ProbeResult(layers=LAYERS, meta=dict(FIXED_META), extras=extras, **keyed, **plain)


def assert_identical(a: ProbeResult, b: ProbeResult) -> None:
    """Same type, layers, meta, extras and every tensor field bit for bit (dtype included)."""
    assert type(a) is type(b) and a.layers == b.layers and a.meta == b.meta
    for name, kind in tensor_fields(type(a)):
        x, y = getattr(a, name), getattr(b, name)
        if kind == "keyed":
            assert x.keys() == y.keys(), name
            assert all(x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]) for k in x), name
        elif x is None or y is None:
            assert x is None and y is None, name
        else:
            assert x.dtype == y.dtype and torch.equal(x, y), name
    assert a.extras.keys() == b.extras.keys()
    assert all(torch.equal(a.extras[k], b.extras[k]) for k in a.extras)


def test_saved_folder_format_loads_and_saves_bit_identically(tmp_path):
    tensors = fixed_tensors()
    assert tensors.keys() == SAVED_TENSOR_NAMES
    write_folder(tmp_path / "saved", tensors, FIXED_META)
    loaded = ProbeResult.load(tmp_path / "saved")
    assert_identical(loaded, fixed_result())
    assert loaded.ks == KS and loaded.jacobians.dtype == torch.float64
    again = loaded.save(tmp_path / "again")
    assert (again / "tensors.safetensors").read_bytes() == (
        tmp_path / "saved" / "tensors.safetensors"
    ).read_bytes()
    assert load_file(str(again / "tensors.safetensors")).keys() == SAVED_TENSOR_NAMES
    assert json.loads((again / "meta.json").read_text()) == {"layers": LAYERS, "ks": KS, **FIXED_META}
    assert json.loads((again / "scalars.json").read_text()).keys() == loaded.scalars().keys()
    assert_identical(ProbeResult.load(again), loaded)


def test_optional_tensors_absent_on_disk_load_as_none(tmp_path):
    tensors = {k: v for k, v in fixed_tensors().items() if k not in ("jacobians", "linearization_cosine")}
    write_folder(tmp_path / "saved", tensors, FIXED_META)
    loaded = ProbeResult.load(tmp_path / "saved")
    assert loaded.jacobians is None and loaded.linearization_cosine is None
    assert "linearization/cosine" not in loaded.scalars()
    assert load_file(str(loaded.save(tmp_path / "again") / "tensors.safetensors")).keys() == tensors.keys()


def test_load_names_every_missing_tensor(tmp_path):
    tensors = {k: v for k, v in fixed_tensors().items() if k not in ("lss", "alignment.k2")}
    write_folder(tmp_path / "saved", tensors, FIXED_META)
    with pytest.raises(ValueError, match=r"lacks \['alignment.k2', 'lss'\].*probe again") as caught:
        ProbeResult.load(tmp_path / "saved")
    assert "ks [1, 2]" in str(caught.value)


def split(result: ProbeResult) -> list[ProbeResult]:
    """The fixed result as one result per prompt (prompt indices from 0 in each)."""
    parts = []
    for rows, prompt, length in ((slice(0, 2), 0, 2), (slice(2, 3), 1, 1)):
        values = {}
        for name, kind in tensor_fields(type(result)):
            value = getattr(result, name)
            values[name] = {k: v[rows] for k, v in value.items()} if kind == "keyed" else value[rows]
        values["tokens"] = values["tokens"] - torch.tensor([prompt, 0])
        extras = {k: v[rows] for k, v in result.extras.items()}
        meta = {**result.meta, "prompt_lengths": [length], "seconds": 0.75, "analysis_seconds": 0.0}
        parts.append(replace(result, **values, extras=extras, meta=meta))
    return parts


def test_concat_of_the_parts_is_the_whole():
    whole = fixed_result()
    joined = ProbeResult.concat(split(whole))
    assert_identical(joined, replace(whole, meta={**whole.meta, "analysis_seconds": 0.0}))


def test_concat_drops_an_optional_tensor_that_a_part_lacks():
    first, second = split(fixed_result())
    joined = ProbeResult.concat([first, replace(second, jacobians=None)])
    assert joined.jacobians is None and torch.equal(
        joined.linearization_cosine, fixed_result().linearization_cosine
    )


def per_token_dicts(result: ProbeResult) -> list[dict]:
    """What a probe computes per token: every tensor field's row ``p`` (no tokens), plus a key that is no field."""
    rows = []
    for p in range(len(result.tokens)):
        row: dict = {"not_a_field": torch.zeros(1)}
        for name, kind in tensor_fields(type(result)):
            value = getattr(result, name)
            if name != "tokens" and value is not None:
                row[name] = {k: v[p] for k, v in value.items()} if kind == "keyed" else value[p]
        rows.append(row)
    return rows


def test_stack_of_the_rows_is_the_whole():
    whole = replace(fixed_result(), extras={})
    rows = per_token_dicts(whole)
    stacked = ProbeResult.stack(rows, KS, tokens=whole.tokens, layers=LAYERS, meta=dict(FIXED_META))
    assert_identical(stacked, whole)
    for row in rows:
        del row["jacobians"]
    assert ProbeResult.stack(rows, KS, tokens=whole.tokens, layers=LAYERS).jacobians is None


@dataclass
class WithHeads(ProbeResult):
    """A result with two more fields, each declared once."""

    head_entropy: Tensor | None = field(default=None, metadata=OPTIONAL)
    head_coupling: dict[int, Tensor] = field(default_factory=dict, metadata=KEYED)


def with_heads() -> WithHeads:
    base = fixed_result()
    g = torch.Generator().manual_seed(1)
    values = {name: getattr(base, name) for name, _ in tensor_fields(ProbeResult)}
    return WithHeads(
        layers=LAYERS,
        meta=dict(FIXED_META),
        extras=dict(base.extras),
        head_entropy=torch.randn(P, 2, generator=g),
        head_coupling={k: torch.randn(P, 2, 2, generator=g) for k in KS},
        **values,
    )


def test_a_field_declared_once_is_saved_loaded_joined_and_stacked(tmp_path):
    result = with_heads()
    folder = result.save(tmp_path / "r")
    names = load_file(str(folder / "tensors.safetensors")).keys()
    assert names == SAVED_TENSOR_NAMES | {"head_entropy", "head_coupling.k1", "head_coupling.k2"}
    loaded = WithHeads.load(folder)
    assert_identical(loaded, result)
    joined = WithHeads.concat(split(result))
    assert_identical(joined, replace(result, meta={**result.meta, "analysis_seconds": 0.0}))
    plain = replace(result, extras={})
    stacked = WithHeads.stack(
        per_token_dicts(plain), KS, tokens=plain.tokens, layers=LAYERS, meta=dict(FIXED_META)
    )
    assert_identical(stacked, plain)
