"""Logs and console of the apps: result lines through ``logging``, Lightning's lines once, warnings our code
caused gone, third-party ones silenced narrowly, ``--help`` per app, an early refusal of a folder without a
tokenizer."""

from __future__ import annotations

import logging
import warnings

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig

from alignscope.apps.config import config_dir
from alignscope.apps.logs import ConsoleHandler, route_lightning_logs, silence_third_party_warnings


class Records(logging.Handler):
    """Collects the records of a logger that does not propagate (e.g. ``transformers``)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def transformers_records():
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()  # conftest sets it to error
    logger = logging.getLogger("transformers")
    handler = Records()
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)
    hf_logging.set_verbosity(verbosity)


def test_small_vocabulary_clears_default_token_ids_before_the_config_is_built(transformers_records):
    from alignscope.models import load_model

    # a vocabulary size no other test uses: transformers warns once per message
    model = load_model(
        name="t", source="config", init="random", model_type="gpt2", vocab_size=509,
        config={"n_layer": 1, "n_embd": 16, "n_head": 2},
    )  # fmt: skip
    assert model.config.bos_token_id is None and model.config.eos_token_id is None
    assert not [m for m in transformers_records if "_token_id must be" in m], transformers_records
    kept = load_model(
        name="t", source="config", init="random", model_type="llama", vocab_size=509,
        config={"num_hidden_layers": 1, "hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32},
    )  # fmt: skip
    assert (kept.config.bos_token_id, kept.config.eos_token_id) == (1, 2)  # ids within the vocabulary stay


def test_training_module_states_the_causal_lm_loss():
    from alignscope.apps.lm import CausalLMModule
    from alignscope.models.tiny import tiny_model

    module = CausalLMModule(tiny_model("gpt2"))
    assert module.model.loss_type == "ForCausalLM"  # GPT2LMHeadModel's name names no loss: None by default


def test_lightning_pytree_warning_is_silenced_by_message_and_module():
    import torch
    from lightning.pytorch.utilities._pytree import _tree_flatten

    def future_warnings(silence: bool) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if silence:
                silence_third_party_warnings()
            _tree_flatten(torch.zeros(1))
            warnings.warn(
                "`isinstance(treespec, LeafSpec)` is deprecated (ours)", FutureWarning, stacklevel=1
            )
        return [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]

    assert any("LeafSpec" in m for m in future_warnings(silence=False)[:-1])
    assert future_warnings(silence=True) == ["`isinstance(treespec, LeafSpec)` is deprecated (ours)"]


@pytest.fixture
def root_with_a_handler():
    root, saved = logging.getLogger(), {}
    handler = logging.NullHandler()
    root.addHandler(handler)
    import lightning  # noqa: F401

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        saved[name] = (list(logger.handlers), logger.propagate)
    lightning_logger = logging.getLogger("lightning")
    if not any(
        type(h) is logging.StreamHandler for h in lightning_logger.handlers
    ):  # routed by an earlier test
        lightning_logger.addHandler(logging.StreamHandler())  # what Lightning's import adds
    yield
    root.removeHandler(handler)
    for name, (handlers, propagate) in saved.items():
        logger = logging.getLogger(name)
        logger.handlers[:] = handlers
        logger.propagate = propagate


def test_lightning_lines_go_to_the_root_logger_only(root_with_a_handler, caplog):
    route_lightning_logs()
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        assert not [h for h in logger.handlers if type(h) is logging.StreamHandler] and logger.propagate
    with caplog.at_level(logging.INFO):
        logging.getLogger("lightning.pytorch.utilities.rank_zero").info("one line")
    assert [r.getMessage() for r in caplog.records].count("one line") == 1


def test_console_handler_writes_lines_between_progress_bars():
    import io

    from tqdm.auto import tqdm

    def console(handler_class: type) -> str:
        stream = io.StringIO()
        handler = handler_class(stream)
        handler.setFormatter(logging.Formatter("%(message)s"))
        with tqdm(total=2, file=stream, desc="bar", ascii=True, mininterval=0) as bar:
            bar.update(1)
            handler.emit(logging.LogRecord("x", logging.INFO, "", 0, "a line", None, None))
        return stream.getvalue()

    assert "\ra line\n" in console(ConsoleHandler)  # the bar cleared, the line on its own, the bar again
    assert "it/s]a line" in console(logging.StreamHandler)  # a plain handler glues the line to the bar


def _help_text(app: str) -> str:
    import alignscope.apps.probe_app  # noqa: F401  (registers the help resolver)

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(app, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    try:
        return str(cfg.hydra.help.template)
    finally:
        HydraConfig.instance().cfg = None  # run_group() and others read it


def _groups(text: str) -> dict[str, list[str]]:
    section = text.split("== Configuration groups")[1].split("== Config ==")[0]
    lines = [x for x in section.splitlines()[1:] if ": " in x]
    return {g: o.split(", ") for g, o in (x.split(": ", 1) for x in lines)}


def test_help_lists_the_apps_own_groups():
    train, probe, demo = (
        _groups(_help_text("train")),
        _groups(_help_text("probe_app")),
        _groups(_help_text("demo")),
    )
    assert set(train) == {
        "callbacks",
        "data",
        "experiment",
        "logger",
        "model",
        "optim",
        "paths",
        "probe",
        "trainer",
    }
    assert set(probe) == {"experiment", "logger", "model", "paths", "probe", "prompts"}
    assert set(demo) == {"model", "paths", "probe"}
    assert "tiny_gpt2*" in train["model"] and "smollm2_135m*" in probe["model"]
    for groups in (train, probe, demo):
        assert not [o for options in groups.values() for o in options if o.startswith("_")]
    assert _help_text("train").startswith("alignscope-")


def test_local_model_without_tokenizer_is_refused_before_weights_and_loggers(tmp_path, monkeypatch):
    from alignscope.apps import probe_app
    from alignscope.models.tiny import tiny_model

    folder = tmp_path / "model"
    tiny_model("llama").save_pretrained(folder)
    monkeypatch.setattr(probe_app, "build", lambda *a, **k: pytest.fail("weights loaded"))
    run_dir = tmp_path / "run"
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(
            "probe_app",
            overrides=[f"paths.run_dir={run_dir}", "logger=wandb", "model=local", f"model.path={folder}"],
        )
    with pytest.raises(probe_app.ProbeAppConfigError, match="has no tokenizer files"):
        probe_app.run(cfg)
    assert not (run_dir / "wandb").exists() and not (run_dir / "run.json").exists()


def _recording_probe(monkeypatch) -> list[bool]:
    """Patch ``probe()`` to record each call's ``settings.progress``."""
    from alignscope.probing import probe as probe_module

    seen, real = [], probe_module.probe

    def recording(*args, settings, **kwargs):
        seen.append(settings.progress)
        return real(*args, settings=settings, **kwargs)

    monkeypatch.setattr(probe_module, "probe", recording)
    return seen


@pytest.mark.parametrize("bar", [True, False])
def test_monitor_shows_a_bar_within_a_probe_while_lightning_shows_its_own(tmp_path, monkeypatch, caplog, bar):
    from types import SimpleNamespace

    import torch

    from alignscope.apps.callback import AlignmentMonitor
    from alignscope.models.tiny import tiny_model

    seen = _recording_probe(monkeypatch)
    monitor = AlignmentMonitor(
        prompts=torch.randint(0, 128, (1, 6)), ks=(4,), dirpath=str(tmp_path), layers=[0, 1]
    )
    trainer = SimpleNamespace(
        progress_bar_callback=object() if bar else None,
        loggers=[],
        callback_metrics={},
        is_global_zero=True,
        global_rank=0,
        world_size=1,
        model=None,
    )
    module = torch.nn.Module()
    module.model = tiny_model("gpt2")
    with caplog.at_level(logging.INFO, logger="alignscope"):
        monitor._probe(trainer, module, step=7)
    assert seen == [bar]
    (line,) = [r.getMessage() for r in caplog.records if r.name == "alignscope.apps.callback"]
    assert line.startswith("alignment probe at step 7: ") and "coupling/k4" not in line and " s" in line


def test_probe_app_shows_a_bar_within_each_prompt_for_large_models(tmp_path, monkeypatch, caplog):
    from alignscope.apps import probe_app
    from conftest import save_tiny_local_model

    folder = save_tiny_local_model(tmp_path / "model")
    seen = _recording_probe(monkeypatch)
    monkeypatch.setattr(probe_app, "LARGE_MODEL_PARAMS", 1)  # the tiny model counts as large
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(
            "probe_app",
            overrides=[f"paths.run_dir={tmp_path / 'run'}", "logger=none", "model=local", f"model.path={folder}",
                       "prompts.num=1", "probe.ks=[4]", "probe.layers=[0,1]"],
        )  # fmt: skip
    with caplog.at_level(logging.INFO, logger="alignscope"):
        probe_app.run(cfg)
    assert seen == [True]
    (table,) = [r.getMessage() for r in caplog.records if r.name == "alignscope.apps.probe_app"]
    assert table.startswith("local (pretrained): 1 prompts") and "\n  lss/mean " in table
