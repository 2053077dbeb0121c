"""AlignmentMonitor(prompts=texts): tokenized with the given tokenizer or the datamodule's, probing the same
tokens as the equivalent ids; a clear error without a tokenizer."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch

from alignscope import ProbeResult
from alignscope.apps.callback import AlignmentMonitor, MonitorConfigError
from test_callback import PlainLM, loaders, quiet_trainer

TEXTS = ["the cat sat", "on the mat today"]


class CharTokenizer:
    """Token id = character code mod 128 (the tiny model's vocabulary)."""

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) % 128 for c in text]}


class TokenizedData(pl.LightningDataModule):
    """A datamodule whose ``tokenizer`` is set in ``setup`` (as alignscope's LMDataModule prepares it)."""

    def __init__(self):
        super().__init__()
        self.tokenizer = None

    def setup(self, stage: str) -> None:
        self.tokenizer = CharTokenizer()

    def train_dataloader(self):
        return loaders()[0]

    def val_dataloader(self):
        return loaders()[1]


def probe_once(monitor: AlignmentMonitor, datamodule: pl.LightningDataModule | None, tmp_path) -> ProbeResult:
    trainer = quiet_trainer(max_steps=0, callbacks=[monitor])
    torch.manual_seed(0)
    module = PlainLM()
    if datamodule is None:
        trainer.fit(module, *loaders())
    else:
        trainer.fit(module, datamodule=datamodule)
    return ProbeResult.load(next((tmp_path / "probes").iterdir()))


def monitor(tmp_path, **kwargs) -> AlignmentMonitor:
    kw = dict(
        every_n_steps=None, log_spaced=False, ks=(4,), dirpath=str(tmp_path), figures=False, verbose=False
    )
    return AlignmentMonitor(**kw, **kwargs)


def test_text_prompts_probe_the_same_tokens_as_their_ids(tmp_path):
    ids = [CharTokenizer()(t)["input_ids"] for t in TEXTS]
    by_text = monitor(tmp_path / "text", prompts=TEXTS)
    assert by_text.prompts is None  # tokenized at fit start, with the datamodule's tokenizer
    a = probe_once(by_text, TokenizedData(), tmp_path / "text")
    b = probe_once(monitor(tmp_path / "ids", prompts=ids), None, tmp_path / "ids")
    assert [p.tolist() for p in by_text.prompts] == ids
    assert a.meta["prompt_lengths"] == [len(i) for i in ids] == b.meta["prompt_lengths"]
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.hidden_states, b.hidden_states)
    fingerprints = [json.loads((tmp_path / d / "fingerprint.json").read_text()) for d in ("text", "ids")]
    assert fingerprints[0]["prompts_sha256"] == fingerprints[1]["prompts_sha256"]


def test_text_prompts_with_a_given_tokenizer_and_the_state_round_trip():
    m = AlignmentMonitor(prompts=TEXTS, tokenizer=CharTokenizer())
    assert [p.tolist() for p in m.prompts] == [CharTokenizer()(t)["input_ids"] for t in TEXTS]
    n = AlignmentMonitor()
    n.load_state_dict(m.state_dict())
    assert [p.tolist() for p in n.prompts] == [p.tolist() for p in m.prompts]


def test_text_prompts_without_a_tokenizer_fail_with_the_fix(tmp_path):
    with pytest.raises(MonitorConfigError, match="text prompts need a tokenizer"):
        probe_once(monitor(tmp_path, prompts=TEXTS), None, tmp_path)
    with pytest.raises(MonitorConfigError, match="list of non-empty strings"):
        AlignmentMonitor(prompts=["a", ""])
