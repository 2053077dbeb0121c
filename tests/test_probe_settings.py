"""ProbeSettings: validated once, and every key of ``conf/probe`` reaches ``probe()`` in both apps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from alignscope import ProbeSettings, probe
from alignscope.apps.config import config_dir
from alignscope.probing.settings import ProbeSettingsError
from conftest import prompt_ids, save_tiny_local_model, tiny_model

CONF_KEYS = [
    k for k in yaml.safe_load((Path(config_dir()) / "probe" / "default.yaml").read_text()) if k[0] != "_"
]
OVERRIDES = {
    "layers": ("[0,1]", (0, 1)),
    "tokens": ("[-1]", (-1,)),
    "ks": ("[5,3]", (3, 5)),
    "keep_jacobians": ("true", True),
    "engine": ("exact", "exact"),
    "chunk_size": ("16", 16),
    "dtype": ("float64", torch.float64),
    "attention": ("sdpa", "sdpa"),
    "progress": ("true", True),
    "include_final_norm": ("true", True),
    "normalization": ("trace", "trace"),
    "p": ("1", 1.0),
    "linearization": ("drop_last", "drop_last"),
    "inv_s1_from": ("2", 2),
    "token_coupling": ("true", True),
}
"""A value other than the default for every key of conf/probe, and what ProbeSettings makes of it."""


def test_every_conf_probe_key_is_a_probe_setting_with_a_test_value():
    assert set(CONF_KEYS) == set(OVERRIDES) == {f for f in ProbeSettings.__dataclass_fields__}
    defaults = ProbeSettings()
    assert all(getattr(defaults, key) != value for key, (_, value) in OVERRIDES.items())


def test_settings_are_validated_and_normalized():
    s = ProbeSettings(layers=[2, 0], tokens=[1], ks=[30, 10, 10], dtype="float64")
    assert s.layers == (2, 0) and s.tokens == (1,) and s.ks == (10, 30) and s.dtype is torch.float64
    assert s.record()["dtype"] == "float64" and s.record()["ks"] == [10, 30]
    with pytest.raises(ProbeSettingsError, match="chunk_size"):
        ProbeSettings(chunk_size=0)
    with pytest.raises(ValueError, match="either settings"):
        probe(tiny_model("llama"), prompt_ids(1, 5), ks=(4,), settings=ProbeSettings(ks=(4,)))


def test_probe_with_settings_equals_probe_with_arguments():
    model, ids = tiny_model("llama"), prompt_ids(1, 6)
    a = probe(model, ids, layers=[0, 2], ks=(4,), tokens="all")
    b = probe(model, ids, settings=ProbeSettings(layers=(0, 2), ks=(4,), tokens="all"))
    assert torch.equal(a.coupling[4], b.coupling[4]) and a.layers == b.layers == [0, 2]


@pytest.fixture
def seen(monkeypatch):
    """The ProbeSettings each call of ``probe()`` received (the real probe still runs)."""
    import alignscope.probing.probe as module

    calls: list[ProbeSettings] = []
    real = module.probe

    def spy(*args, settings=None, **kwargs):
        calls.append(settings)
        return real(*args, settings=settings, **kwargs)

    monkeypatch.setattr(module, "probe", spy)
    return calls


def assert_all_reached(calls: list[ProbeSettings]) -> None:
    assert calls, "probe() was not called"
    for settings in calls:
        for key, (_, value) in OVERRIDES.items():
            assert getattr(settings, key) == value, key


def test_every_probe_setting_reaches_probe_in_the_probe_app(seen, tmp_path):
    from alignscope.apps.probe_app import run
    from test_probe_app import compose_probe

    model = save_tiny_local_model(tmp_path / "model", seed=1)
    overrides = [f"probe.{key}={text}" for key, (text, _) in OVERRIDES.items()]
    run(compose_probe(tmp_path / "run", "model=local", f"model.path={model}", "prompts.num=1", *overrides))
    assert_all_reached(seen)


def test_every_probe_setting_reaches_probe_in_the_train_app(seen, tmp_path):
    from alignscope.apps.train import train
    from test_train import compose_train

    overrides = [f"probe.{key}={text}" for key, (text, _) in OVERRIDES.items()]
    cfg = compose_train(
        tmp_path / "run",
        str(tmp_path / "cache"),
        "logger=none",
        "trainer.max_steps=1",
        "callbacks.alignment_monitor.figures=false",
        *overrides,
    )
    train(cfg)
    assert_all_reached(seen)


def test_auto_ks_leave_out_k_above_a_quarter_of_d(caplog):
    """ks="auto" keeps 10, 30, 50 where K <= d / 4, says what it left out, and explicit ks stay as given
    with a notice when they exceed d / 4 (coupling can be negative there by definition)."""
    import logging

    from alignscope import probe
    from conftest import prompt_ids, tiny_model

    auto = ProbeSettings()
    assert auto.ks == "auto" and auto.ks_for(4096) == ([10, 30, 50], [], None)
    ks, dropped, notice = auto.ks_for(128)
    assert (ks, dropped) == ([10, 30], [50]) and "d/4 = 32" in notice
    assert auto.ks_for(32)[:2] == ([10], [30, 50])  # none fits: the smallest is kept
    assert ProbeSettings(ks=[4, 30]).ks_for(32)[:2] == ([4, 30], [])
    assert "[30]" in ProbeSettings(ks=[4, 30]).ks_for(32)[2]
    with caplog.at_level(logging.INFO, logger="alignscope.probing.probe"):
        res = probe(tiny_model("llama"), prompt_ids(1, 6))  # d = 32
    assert res.ks == [10] and res.meta["ks_requested"] == "auto" and res.meta["ks_dropped"] == [30, 50]
    assert res.meta["notes"] and "left out" in caplog.text
    assert "coupling/k10" in res.scalars() and "coupling/k30" not in res.scalars()
    explicit = probe(tiny_model("llama"), prompt_ids(1, 6), ks=(4, 16))
    assert explicit.ks == [4, 16] and "exceed d/4" in explicit.meta["notes"][0]
