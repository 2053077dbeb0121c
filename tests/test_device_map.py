"""``probe()`` on a model loaded with an accelerate device map: every metric as on the plain model."""

from __future__ import annotations

import math

import pytest
import torch

from alignscope import probe
from alignscope.models import get_adapter
from alignscope.models.capture import execution_device
from alignscope.models.tiny import tiny_model
from conftest import assert_results_close, prompt_ids

accelerate = pytest.importorskip("accelerate")


def _mapped(tmp_path, family: str):
    """The tiny model saved and reloaded twice: plain, and dispatched block by block with a dict of "cpu"."""
    from transformers import AutoModelForCausalLM

    tiny_model(family).save_pretrained(tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    base = model.base_model_prefix
    device_map = {f"{base}.{name}": "cpu" for name, _ in getattr(model, base).named_children()}
    device_map.update({name: "cpu" for name, _ in model.named_children() if name != base})
    blocks = get_adapter(model).blocks(model)
    prefix = next(n for n, m in model.named_modules() if m is blocks)
    device_map.pop(prefix)
    device_map.update({f"{prefix}.{i}": "cpu" for i in range(len(blocks))})
    mapped = accelerate.dispatch_model(model, device_map=device_map, main_device="cpu", force_hooks=True)
    return plain, mapped


@pytest.mark.parametrize(("family", "engine"), [("llama", "single_token"), ("gpt2", "randomized")])
def test_device_map_probe_matches_plain_model(tmp_path, family, engine):
    plain, mapped = _mapped(tmp_path, family)
    blocks = get_adapter(mapped).blocks(mapped)
    assert all(execution_device(b) == torch.device("cpu") for b in blocks)  # accelerate's hooks are on
    assert not any(p.device.type == "meta" for p in mapped.parameters())
    ids = prompt_ids(batch=1, length=5)
    a = probe(plain, ids, tokens="all", engine=engine)
    b = probe(mapped, ids, tokens="all", engine=engine)
    sa, sb = a.scalars(), b.scalars()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert math.isnan(sa[name]) == math.isnan(sb[name]), name
        if not math.isnan(sa[name]):
            assert sb[name] == pytest.approx(sa[name], abs=1e-6), name
    assert_results_close(b, a, atol=1e-6)


def test_execution_device_reads_accelerate_hook():
    model = tiny_model("gpt2")
    assert execution_device(get_adapter(model).blocks(model)[0]) is None
    mapped = accelerate.dispatch_model(model, device_map={"": "cpu"}, main_device="cpu", force_hooks=True)
    assert execution_device(get_adapter(mapped).blocks(mapped)[0]) == torch.device("cpu")


@pytest.mark.parametrize(
    ("family", "engine"), [("llama", "single_token"), ("llama", "exact"), ("gpt2", "randomized")]
)
def test_offloaded_blocks_probe_like_the_plain_model(family, engine):
    """Blocks offloaded by accelerate (weights on "meta" between calls, loaded by the hook for each call, as
    a device map's "cpu" or "disk" entries do beside a GPU) give the plain model's numbers."""
    import copy

    model = tiny_model(family)
    plain = copy.deepcopy(model)
    blocks = get_adapter(model).blocks(model)
    for i in (0, len(blocks) - 1):
        accelerate.cpu_offload(blocks[i], execution_device="cpu")
    assert all(p.device.type == "meta" for p in blocks[0].parameters())
    ids = prompt_ids(batch=1, length=6)
    a = probe(plain, ids, tokens="all", engine=engine)
    b = probe(model, ids, tokens="all", engine=engine)
    torch.testing.assert_close(b.coupling[10], a.coupling[10], atol=1e-6, rtol=0, equal_nan=True)
    torch.testing.assert_close(b.singular_values, a.singular_values, atol=1e-6, rtol=0, equal_nan=True)
    assert all(p.device.type == "meta" for p in blocks[0].parameters())  # still offloaded afterwards
