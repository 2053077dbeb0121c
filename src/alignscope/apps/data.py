"""Text corpora, tokenizers and the LightningDataModule for causal-LM training.

Corpora (each returns train and validation texts as Hugging Face ``datasets.Dataset`` with a ``text`` column):
- :class:`StdlibCorpus`: the running Python's standard-library sources, real text present on every machine,
  split into train/validation *by file*.
- :class:`TextFilesCorpus`: local text files (paths or globs), split by file.
- :class:`HubCorpus`: any Hugging Face hub data set (name, config, text column), for users online.

Tokenizers: :class:`BPETokenizer` trains a byte-level BPE on the training split (``tokenizers`` library) and
caches it; :class:`HubTokenizer` loads a hub tokenizer (e.g. GPT-2's). Sequences are packed to a fixed length
(documents joined with the end-of-text token) and cached as ``.npy``. Caches are built once under a file lock
and checked on load; a damaged one is rebuilt (:mod:`alignscope.models.cache_build`).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import random
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from alignscope.apps.resumable import ResumableDataLoader, ResumableSampler
from alignscope.models.cache_build import build_once, cache_root

EOS = "<|endoftext|>"
PACKED_SPLITS = ("train", "val")


class DataConfigError(ValueError):
    """A data setting that cannot work; the message says what to change."""


def _split_by_file(paths: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    if not 0 < val_fraction < 1:
        raise DataConfigError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if len(paths) < 2:
        raise DataConfigError(f"need at least 2 files to split into train and validation, found {len(paths)}")
    order = sorted(paths)
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(order) * val_fraction))
    return sorted(order[n_val:]), sorted(order[:n_val])


def _read(paths: list[str]) -> list[str]:
    texts = []
    for p in paths:
        text = Path(p).read_text(encoding="utf-8", errors="replace")
        if text.strip():
            texts.append(text)
    return texts


def _dataset(texts: list[str]):
    import datasets

    return datasets.Dataset.from_dict({"text": texts})


@dataclass
class TextFilesCorpus:
    """Local text files: ``paths`` are files or glob patterns (``**`` recursive); split by file, seeded."""

    paths: list[str] = field(default_factory=list)
    val_fraction: float = 0.05
    seed: int = 0
    max_files: int | None = None

    def files(self) -> list[str]:
        found: set[str] = set()
        for pattern in self.paths:
            pattern = os.path.expanduser(str(pattern))
            matches = glob.glob(pattern, recursive=True) if glob.has_magic(pattern) else [pattern]
            found.update(m for m in matches if os.path.isfile(m))
        files = sorted(found)
        if self.max_files is not None:
            files = sorted(random.Random(self.seed).sample(files, min(self.max_files, len(files))))
        return files

    def fingerprint(self) -> str:
        files = self.files()
        stats = [(f, os.path.getsize(f)) for f in files]
        return _hash([stats, self.val_fraction, self.seed])

    def load(self):
        """``(train, validation)`` datasets with a ``text`` column."""
        files = self.files()
        if not files:
            raise DataConfigError(
                f"empty corpus: no files match {self.paths!r}; give existing files or globs (e.g. 'docs/**/*.txt')"
            )
        train, val = _split_by_file(files, self.val_fraction, self.seed)
        train_texts, val_texts = _read(train), _read(val)
        if not train_texts or not val_texts:
            raise DataConfigError(f"empty corpus: the files matching {self.paths!r} hold no text")
        return _dataset(train_texts), _dataset(val_texts)


@dataclass
class StdlibCorpus(TextFilesCorpus):
    """The running Python's standard-library ``.py`` sources (tests and site-packages excluded)."""

    def files(self) -> list[str]:
        root = Path(sysconfig.get_paths()["stdlib"])
        skip = {"site-packages", "dist-packages", "test", "tests", "idle_test"}
        files = sorted(str(f) for f in root.rglob("*.py") if not skip & set(f.relative_to(root).parts))
        if self.max_files is not None:
            files = sorted(random.Random(self.seed).sample(files, min(self.max_files, len(files))))
        return files


@dataclass
class HubCorpus:
    """A Hugging Face hub data set: ``name``, optional ``config``, its ``text_column`` and split names."""

    name: str = "wikitext"
    config: str | None = "wikitext-2-raw-v1"
    text_column: str = "text"
    train_split: str = "train"
    val_split: str = "validation"
    max_train_texts: int | None = None

    def fingerprint(self) -> str:
        return _hash(
            [self.name, self.config, self.text_column, self.train_split, self.val_split, self.max_train_texts]
        )

    def load(self):
        import datasets

        try:
            train = datasets.load_dataset(self.name, self.config, split=self.train_split)
            val = datasets.load_dataset(self.name, self.config, split=self.val_split)
        except Exception as err:  # offline, unknown name, ...
            raise DataConfigError(
                f"could not load hub data set {self.name!r} ({self.config}): {err}"
            ) from err
        if self.text_column not in train.column_names:
            raise DataConfigError(
                f"data set {self.name!r} has no column {self.text_column!r}; columns: {train.column_names}"
            )
        if self.max_train_texts is not None:
            train = train.select(range(min(self.max_train_texts, len(train))))
        keep = lambda ds: ds.select_columns([self.text_column]).rename_column(self.text_column, "text")  # noqa: E731
        return keep(train), keep(val)


@dataclass
class BPETokenizer:
    """Byte-level BPE trained on the training split, cached by corpus fingerprint and vocabulary size."""

    vocab_size: int = 4096
    min_frequency: int = 2

    def fingerprint(self) -> str:
        return _hash(["bpe", self.vocab_size, self.min_frequency])

    def build(self, train_texts, cache_dir: Path):
        """The tokenizer cached as ``cache_dir/tokenizer.json``, trained (once, under a lock) if it is missing or
        unreadable. ``train_texts``: the training split, or a function returning it (called only to train)."""
        from transformers import PreTrainedTokenizerFast

        if self.vocab_size < 257:
            raise DataConfigError(
                f"vocab_size must be at least 257 for byte-level BPE, got {self.vocab_size}"
            )

        def train(tmp: Path) -> None:
            from tokenizers import ByteLevelBPETokenizer

            texts = train_texts() if callable(train_texts) else train_texts
            tok = ByteLevelBPETokenizer()
            tok.train_from_iterator(
                (t for t in texts["text"]),
                vocab_size=self.vocab_size,
                min_frequency=self.min_frequency,
                special_tokens=[EOS],
                show_progress=False,
            )
            tok.save(str(tmp))

        path = build_once(cache_dir / "tokenizer.json", train, tokenizer_file_problem, what="tokenizer")
        return PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token=EOS, bos_token=EOS, unk_token=EOS)


def tokenizer_file_problem(path: Path) -> str | None:
    """``None`` when ``path`` is a readable ``tokenizers`` JSON file, else what is wrong with it."""
    from tokenizers import Tokenizer

    try:
        Tokenizer.from_file(str(path))
    except Exception as err:  # the tokenizers library raises a bare Exception for bad JSON
        return f"unreadable ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
    return None


def packed_arrays_problem(folder: Path, seq_len: int) -> str | None:
    """``None`` when ``folder`` holds ``train.npy`` and ``val.npy``, int32 ``[N, seq_len]`` arrays whose data is
    all there, else what is wrong (naming the file)."""
    for split in PACKED_SPLITS:
        path = folder / f"{split}.npy"
        try:
            arr = np.load(path, mmap_mode="r")
        except (OSError, ValueError, EOFError) as err:
            return f"damaged ({path.name}: {err})"
        if arr.dtype != np.int32 or arr.ndim != 2 or arr.shape[1] != seq_len:
            return f"damaged ({path.name} holds {arr.dtype} {arr.shape}, not int32 [N, {seq_len}])"
    return None


@dataclass
class HubTokenizer:
    """A pretrained tokenizer by hub name or local path (e.g. ``gpt2``)."""

    name: str = "gpt2"

    def fingerprint(self) -> str:
        return _hash(["hub", self.name])

    def build(self, train_texts, cache_dir: Path):
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(self.name)
        except Exception as err:
            raise DataConfigError(f"could not load tokenizer {self.name!r}: {err}") from err
        if tok.eos_token is None:
            raise DataConfigError(f"tokenizer {self.name!r} has no end-of-text token to join documents")
        return tok


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def pack(token_lists: list[list[int]], eos_id: int, seq_len: int) -> np.ndarray:
    """Join documents with ``eos_id`` and cut into full rows of ``seq_len`` tokens: ``[N, seq_len]`` int32."""
    flat = np.fromiter((t for ids in token_lists for t in (*ids, eos_id)), dtype=np.int32)
    n = len(flat) // seq_len
    return flat[: n * seq_len].reshape(n, seq_len)


def unigram_loss(train: np.ndarray, val: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of the validation tokens under the training split's add-one unigram model:
    the loss a model that ignores context would reach."""
    counts = np.bincount(train.reshape(-1), minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[val.reshape(-1)].mean())


class CausalLMDataModule(pl.LightningDataModule):
    """Packed fixed-length token sequences for causal-LM training.

    Args:
        corpus: a corpus object (``StdlibCorpus``, ``TextFilesCorpus``, ``HubCorpus``).
        tokenizer: ``BPETokenizer`` (trained on the training split, cached) or ``HubTokenizer``.
        seq_len: tokens per training sequence.
        batch_size / val_batch_size: loader batch sizes; ``max_val_sequences`` caps the validation set.
        max_train_sequences: train on a seeded subset of this many training sequences (None: all); the
            tokenizer, validation set and unigram baseline stay those of the whole corpus.
        cache_dir: where tokenizers and packed arrays are cached (``$ALIGNSCOPE_CACHE`` or ~/.cache/alignscope).
        name: a label for run names and tags.
    """

    def __init__(
        self,
        corpus: Any = None,
        tokenizer: Any = None,
        seq_len: int = 128,
        batch_size: int = 16,
        val_batch_size: int | None = None,
        max_val_sequences: int | None = 256,
        max_train_sequences: int | None = None,
        num_workers: int = 0,
        cache_dir: str | None = None,
        seed: int = 0,
        name: str = "data",
    ) -> None:
        super().__init__()
        self.name = name
        if not isinstance(seq_len, int) or seq_len < 2:
            raise DataConfigError(f"seq_len must be an integer >= 2, got {seq_len!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise DataConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        if max_train_sequences is not None and (
            not isinstance(max_train_sequences, int) or max_train_sequences < 1
        ):
            raise DataConfigError(
                f"max_train_sequences must be a positive integer or null, got {max_train_sequences!r}"
            )
        self.corpus = corpus if corpus is not None else StdlibCorpus()
        self.tokenizer_spec = tokenizer if tokenizer is not None else BPETokenizer()
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.max_val_sequences = max_val_sequences
        self.max_train_sequences = max_train_sequences
        self.num_workers = num_workers
        self.cache_root = Path(cache_dir).expanduser() if cache_dir else cache_root()
        self.seed = seed
        self.tokenizer = None
        self.train_tokens: np.ndarray | None = None
        self.val_tokens: np.ndarray | None = None
        self.unigram_loss: float | None = None

    @property
    def vocab_size(self) -> int:
        """Vocabulary size of the tokenizer (prepare the data first)."""
        if self.tokenizer is None:
            self.prepare()
        return len(self.tokenizer)

    def cache_dir(self) -> Path:
        key = _hash(
            [type(self.corpus).__name__, self.corpus.fingerprint(), self.tokenizer_spec.fingerprint()]
        )
        return self.cache_root / "data" / key

    def prepare(self) -> None:
        """Load (or build and cache) tokenizer and packed arrays. Idempotent."""
        if self.train_tokens is not None:
            return
        folder = self.cache_dir()
        texts = None

        def corpus_texts():
            nonlocal texts
            if texts is None:
                texts = self.corpus.load()
            return texts

        self.tokenizer = self.tokenizer_spec.build(lambda: corpus_texts()[0], folder)

        def pack_splits(tmp: Path) -> None:
            eos = self.tokenizer.eos_token_id
            encode = lambda ds: self.tokenizer(list(ds["text"]), add_special_tokens=False)["input_ids"]  # noqa: E731
            tmp.mkdir()
            for split, ds in zip(PACKED_SPLITS, corpus_texts(), strict=True):
                np.save(tmp / f"{split}.npy", pack(encode(ds), eos, self.seq_len))

        packed = build_once(
            folder / f"packed_{self.seq_len}",
            pack_splits,
            lambda f: packed_arrays_problem(f, self.seq_len),
            what="packed token arrays",
        )
        self.train_tokens, self.val_tokens = (np.load(packed / f"{split}.npy") for split in PACKED_SPLITS)
        if len(self.train_tokens) == 0 or len(self.val_tokens) == 0:
            raise DataConfigError(
                f"the corpus is too small for seq_len={self.seq_len}: {len(self.train_tokens)} training and "
                f"{len(self.val_tokens)} validation sequences; add text or lower data.seq_len"
            )
        if self.max_val_sequences is not None and len(self.val_tokens) > self.max_val_sequences:
            idx = np.random.default_rng(self.seed).choice(
                len(self.val_tokens), self.max_val_sequences, replace=False
            )
            self.val_tokens = self.val_tokens[np.sort(idx)]
        self.unigram_loss = unigram_loss(self.train_tokens, self.val_tokens, len(self.tokenizer))
        if self.max_train_sequences is not None and len(self.train_tokens) > self.max_train_sequences:
            idx = np.random.default_rng(self.seed).choice(
                len(self.train_tokens), self.max_train_sequences, replace=False
            )
            self.train_tokens = self.train_tokens[np.sort(idx)]

    def prepare_data(self) -> None:
        self.prepare()

    def setup(self, stage: str | None = None) -> None:
        self.prepare()
        self.train_dataset = TensorDataset(torch.from_numpy(self.train_tokens.astype(np.int64)))
        self.val_dataset = TensorDataset(torch.from_numpy(self.val_tokens.astype(np.int64)))

    def train_dataloader(self) -> ResumableDataLoader:
        """Training batches ``[batch_size, seq_len]`` in a seeded permutation per epoch, sharded across the
        trainer's ranks; the loader's state (epoch, position) goes into Lightning checkpoints, so a resume
        continues mid-epoch where the checkpoint was taken (see :mod:`alignscope.apps.resumable`)."""
        trainer = self.trainer
        ranks, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        return ResumableDataLoader(
            self.train_dataset,
            batch_size=self.batch_size,
            sampler=ResumableSampler(self.train_dataset, seed=self.seed, num_replicas=ranks, rank=rank),
            num_workers=self.num_workers,
            drop_last=True,
            generator=torch.Generator().manual_seed(self.seed),  # worker seeds; the global RNG is left alone
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.val_dataset,
            batch_size=self.val_batch_size,
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed),  # worker seeds; the global RNG is left alone
        )

    def state_dict(self) -> dict[str, Any]:
        return {"seq_len": self.seq_len, "seed": self.seed}
