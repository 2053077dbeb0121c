"""Corpora, tokenizer cache, packing and the unigram baseline."""

from __future__ import annotations

import math

import numpy as np
import pytest

from alignscope.apps.data import (
    BPETokenizer,
    CausalLMDataModule,
    DataConfigError,
    StdlibCorpus,
    TextFilesCorpus,
    pack,
    unigram_loss,
)


def test_stdlib_corpus_splits_by_file():
    corpus = StdlibCorpus(max_files=30, val_fraction=0.2, seed=3)
    files = corpus.files()
    assert len(files) == 30 and all(f.endswith(".py") for f in files)
    assert not any("/test/" in f or "site-packages" in f for f in files)
    train, val = corpus.load()
    assert len(train) + len(val) <= 30 and len(val) == 6
    assert not set(train["text"]) & set(val["text"])


def test_text_files_corpus_globs_and_empty(tmp_path):
    for i in range(5):
        (tmp_path / f"doc{i}.txt").write_text(f"document number {i} " * 50)
    train, val = TextFilesCorpus(paths=[str(tmp_path / "*.txt")], val_fraction=0.2).load()
    assert (len(train), len(val)) == (4, 1)
    with pytest.raises(DataConfigError, match="empty corpus: no files match"):
        TextFilesCorpus(paths=[str(tmp_path / "*.md")]).load()
    (tmp_path / "blank").mkdir()
    for i in range(2):
        (tmp_path / "blank" / f"{i}.txt").write_text("   \n")
    with pytest.raises(DataConfigError, match="hold no text"):
        TextFilesCorpus(paths=[str(tmp_path / "blank" / "*.txt")]).load()


def test_pack_joins_documents_with_eos():
    rows = pack([[1, 2, 3], [4, 5]], eos_id=0, seq_len=3)
    assert rows.tolist() == [[1, 2, 3], [0, 4, 5]]  # the trailing EOS does not fill a row and is dropped


def test_unigram_loss_matches_hand_computation():
    train = np.array([[0, 0, 1]])
    val = np.array([[0, 1]])
    # add-one counts over vocab 3: [3, 2, 1] / 6
    expect = -(math.log(3 / 6) + math.log(2 / 6)) / 2
    assert unigram_loss(train, val, 3) == pytest.approx(expect)


def test_datamodule_caches_tokenizer_and_arrays(tmp_path):
    kwargs = dict(
        corpus=StdlibCorpus(max_files=20),
        tokenizer=BPETokenizer(vocab_size=400),
        seq_len=16,
        batch_size=4,
        cache_dir=str(tmp_path),
    )
    dm = CausalLMDataModule(**kwargs)
    dm.setup("fit")
    assert dm.vocab_size == 400 and dm.tokenizer.eos_token == "<|endoftext|>"
    batch = next(iter(dm.train_dataloader()))[0]
    assert batch.shape == (4, 16) and int(batch.max()) < 400
    folder = dm.cache_dir()
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    again = CausalLMDataModule(**kwargs)
    again.setup("fit")  # loaded from the cache, nothing rebuilt
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps
    assert np.array_equal(again.train_tokens, dm.train_tokens)
    assert dm.unigram_loss > 0
    other = CausalLMDataModule(**{**kwargs, "tokenizer": BPETokenizer(vocab_size=300)})
    assert other.cache_dir() != folder


def test_datamodule_rejects_bad_settings(tmp_path):
    with pytest.raises(DataConfigError, match="seq_len"):
        CausalLMDataModule(seq_len=1)
    with pytest.raises(DataConfigError, match="batch_size"):
        CausalLMDataModule(batch_size=0)
    with pytest.raises(DataConfigError, match="at least 257"):
        CausalLMDataModule(
            corpus=StdlibCorpus(max_files=5), tokenizer=BPETokenizer(vocab_size=100), cache_dir=str(tmp_path)
        ).prepare()
