"""Prompt sets for probing: the shipped default set, a text file (one prompt per line), or a hub data set."""

from __future__ import annotations

import codecs
import random
from importlib import resources
from pathlib import Path


class PromptConfigError(ValueError):
    """A prompt setting that cannot work; the message says what to change."""


def default_prompts() -> list[str]:
    """The shipped set: a few dozen short, varied English prompts (``default_prompts.txt``)."""
    text = resources.files("alignscope.apps").joinpath("default_prompts.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_prompt_file(path: Path) -> str:
    """The text of a UTF-8 prompt file (a leading byte-order mark is dropped)."""
    data = path.read_bytes()
    skip = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[skip:].decode("utf-8")
    except UnicodeDecodeError as err:
        offset = skip + err.start
        line = data[:offset].count(b"\n") + 1
        raise PromptConfigError(
            f"prompts.path={str(path)!r} is not UTF-8 text: byte 0x{data[offset]:02x} at offset {offset} "
            f"(line {line}) cannot be decoded ({err.reason}). Save the file as UTF-8, e.g. "
            f"iconv -f latin1 -t utf-8 {path} > prompts-utf8.txt, then set prompts.path to the new file"
        ) from None


def load_prompts(
    source: str = "default",
    num: int | None = 8,
    seed: int = 0,
    path: str | None = None,
    dataset: str | None = None,
    dataset_config: str | None = None,
    split: str = "validation",
    text_field: str = "text",
    min_chars: int = 20,
) -> list[str]:
    """``num`` prompts chosen with ``seed`` (in their original order) from ``source``:

    ``default`` (the shipped set), ``file`` (``path``, one prompt per line), or ``hf`` (``dataset`` with its
    ``dataset_config``, ``split`` and ``text_field``; texts shorter than ``min_chars`` are skipped).
    ``num=None`` takes them all.
    """
    if source == "default":
        pool = default_prompts()
    elif source == "file":
        if not path or not Path(path).expanduser().is_file():
            raise PromptConfigError(f"prompts.source=file needs prompts.path=<text file>, got {path!r}")
        pool = [x.strip() for x in read_prompt_file(Path(path).expanduser()).splitlines() if x.strip()]
    elif source == "hf":
        import datasets

        if not dataset:
            raise PromptConfigError("prompts.source=hf needs prompts.dataset=<hub data set name>")
        try:
            ds = datasets.load_dataset(dataset, dataset_config, split=split)
        except Exception as err:
            raise PromptConfigError(f"could not load data set {dataset!r}: {err}") from err
        if text_field not in ds.column_names:
            raise PromptConfigError(f"{dataset!r} has no field {text_field!r}; fields: {ds.column_names}")
        pool = [t.strip() for t in ds[text_field] if isinstance(t, str) and len(t.strip()) >= min_chars]
    else:
        raise PromptConfigError(f"prompts.source must be default, file or hf, got {source!r}")
    if not pool:
        raise PromptConfigError(f"no prompts found (source={source})")
    if num is None:
        return pool
    if not isinstance(num, int) or num < 1:
        raise PromptConfigError(f"prompts.num must be a positive integer or null, got {num!r}")
    if num > len(pool):
        raise PromptConfigError(f"prompts.num={num} but the {source} set has only {len(pool)} prompts")
    keep = sorted(random.Random(seed).sample(range(len(pool)), num))
    return [pool[i] for i in keep]
