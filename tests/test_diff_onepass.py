"""`wb diff` hashes RAW's and TUNED's files as it reads them for the diff (one pass over each input):
the recorded md5/sha256 are the files' own, whatever the layouts and the order the diff visits them
in, and `wb recover` still rebuilds TUNED byte for byte. Also the hashers themselves."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import threading
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from tiny import as_hub_cache, perturbed, save_layout

import workbench.io.hashing
import workbench.weights.diff
from workbench.cli import wb
from workbench.errors import WorkbenchError
from workbench.io.hashing import FileHasher, StreamHasher, hash_file, hash_files
from workbench.io.reader import open_checkpoint
from workbench.weights.weight_diff import META_FILE, bits

SIDE_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")


def run(*args):
    return CliRunner().invoke(wb, [str(a) for a in args], catch_exceptions=False)


def hashlib_of(path: Path, algo: str) -> str:
    return hashlib.new(algo, path.read_bytes()).hexdigest()


def load(folder: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(folder) as checkpoint:
        return {name: tensor.clone() for name, tensor in checkpoint.iter_tensors()}


def weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))


def make_tuned(base: Path, out: Path, layout: str, shards: int = 3) -> Path:
    """A fine-tune of `base` in `layout` (sharded `shards` ways: another split than base's 3)."""
    save_layout(perturbed(load(base), 0.05), out, layout, shards=shards)
    for name in SIDE_FILES:
        shutil.copy(base / name, out / name)
    return out


def assert_recorded_hashes_are_the_files_own(meta: dict, raw: Path, tuned: Path) -> None:
    """weight_diff.json's file hashes equal hashlib's over the files, and the old two-pass
    functions' (`hash_files` for RAW's md5, `hash_file` for TUNED's md5 and sha256)."""
    raw_files = weight_files(raw)
    old_raw = hash_files(raw_files, "md5", 2)
    assert meta["base"]["files"] == {
        p.name: {"size": p.stat().st_size, "md5": hashlib_of(p, "md5")} for p in raw_files
    }
    assert [meta["base"]["files"][p.name]["md5"] for p in raw_files] == old_raw
    tuned_files = weight_files(tuned)
    if tuned_files[0].suffix == ".bin":
        assert meta["tuned"]["layout"] is None
        return
    recorded = meta["tuned"]["layout"]["files"]
    assert sorted(recorded) == [p.name for p in tuned_files]
    for path in tuned_files:
        entry = recorded[path.name]
        assert list(entry) == ["header", "size", "md5", "sha256"]
        assert entry["size"] == path.stat().st_size
        assert entry["md5"] == hashlib_of(path, "md5") and entry["sha256"] == hashlib_of(path, "sha256")
        assert {"md5": entry["md5"], "sha256": entry["sha256"]} == hash_file(path, ("md5", "sha256"))


def assert_recovers_tuned(raw: Path, diff: Path, tuned: Path, out: Path) -> None:
    result = run("recover", "--base", raw, "--diff", diff, "--out", out, "--json")
    assert result.exit_code == 0, result.output
    found, expected = load(out), load(tuned)
    assert sorted(found) == sorted(expected)
    assert all(torch.equal(bits(found[n]), bits(t)) for n, t in expected.items())
    if weight_files(tuned)[0].suffix == ".safetensors":
        assert json.loads(result.stdout)["byte_identical"] is True
        assert {p.name: p.read_bytes() for p in weight_files(out)} == {p.name: p.read_bytes() for p in weight_files(tuned)}


# -- through the CLI -------------------------------------------------------------------------------
LAYOUT_PAIRS = [
    ("safetensors", "safetensors", None),
    # RAW in 3 shards, TUNED in 2, the diff in several 100 kB shards: every input file is visited
    # out of its own order (names interleave across shards), and several at once
    ("safetensors-sharded", "safetensors-sharded", "100kB"),
    ("bin", "bin", None),
    ("bin-sharded", "safetensors", None),
]


@pytest.mark.parametrize(("raw_layout", "tuned_layout", "shard_size"), LAYOUT_PAIRS)
def test_recorded_hashes_are_the_files_own(tiny_models, tmp_path, raw_layout, tuned_layout, shard_size):
    raw = tiny_models(raw_layout)
    tuned = make_tuned(raw, tmp_path / "tuned", tuned_layout, shards=2)
    diff = tmp_path / "diff"
    result = run("diff", "--base", raw, "--tuned", tuned, "--out", diff,
                 *(("--shard-size", shard_size) if shard_size else ()))
    assert result.exit_code == 0, result.output
    if shard_size:
        assert len(list(diff.glob("model-*.safetensors"))) > 2
    assert_recorded_hashes_are_the_files_own(json.loads((diff / META_FILE).read_text()), raw, tuned)
    assert_recovers_tuned(raw, diff, tuned, tmp_path / "out")


def test_hub_cache_inputs_by_relative_paths(tiny_models, tmp_path, monkeypatch):
    """Snapshot files are symlinks into blobs/: what is hashed is the blob's bytes."""
    raw_folder = tiny_models("safetensors-sharded")
    tuned_folder = make_tuned(raw_folder, tmp_path / "tuned", "safetensors-sharded", shards=2)
    cache = tmp_path / "hub"
    raw, tuned = as_hub_cache(raw_folder, cache, "org/base"), as_hub_cache(tuned_folder, cache, "org/tuned")
    assert all(p.is_symlink() for p in weight_files(raw) + weight_files(tuned))
    monkeypatch.chdir(cache)
    relative_raw, relative_tuned = os.path.relpath(raw, cache), os.path.relpath(tuned, cache)
    result = run("diff", "--base", relative_raw, "--tuned", relative_tuned, "--out", "diff")
    assert result.exit_code == 0, result.output
    assert_recorded_hashes_are_the_files_own(json.loads(Path("diff", META_FILE).read_text()), raw, tuned)
    assert_recovers_tuned(Path(relative_raw), Path("diff"), Path(relative_tuned), Path("out"))


def test_a_failing_diff_stops_its_hashing_threads(tiny_models, tmp_path, monkeypatch):
    raw = tiny_models("safetensors-sharded")
    tuned = make_tuned(raw, tmp_path / "tuned", "safetensors")
    calls = []

    def failing_subtract(*args):
        calls.append(1)
        if len(calls) == 3:
            raise WorkbenchError("injected")
        return workbench.weights.weight_diff.subtract(*args)

    monkeypatch.setattr(workbench.weights.diff, "subtract", failing_subtract)
    result = run("diff", "--base", raw, "--tuned", tuned, "--out", tmp_path / "diff")
    assert result.exit_code == 1 and "injected" in result.output
    assert not (tmp_path / "diff").exists()
    assert [t.name for t in threading.enumerate() if t.name.startswith("wb-hash ")] == []


# -- the hashers -----------------------------------------------------------------------------------
@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(workbench.io.hashing, "READ_CHUNK", 1000)


@pytest.mark.parametrize("seed", range(3))
def test_file_hasher_in_any_order_gives_hashlibs_digests(tmp_path, small_chunks, seed):
    """Advanced to offsets in any order (back, forth, past the end, never to the end): the file's own
    digests, in the order asked for."""
    path = tmp_path / "file"
    path.write_bytes(random.Random(seed).randbytes(12_345))
    offsets = [random.Random(seed).randrange(0, 14_000) for _ in range(20)]
    with FileHasher(path, ("sha256", "md5")) as hasher:
        for offset in offsets:
            hasher.advance(offset)
        digests = hasher.hexdigests()
    assert list(digests) == ["sha256", "md5"]
    assert digests == {"sha256": hashlib_of(path, "sha256"), "md5": hashlib_of(path, "md5")}


def test_file_hasher_of_an_empty_file(tmp_path):
    path = tmp_path / "empty"
    path.write_bytes(b"")
    with FileHasher(path, ("md5",)) as hasher:
        assert hasher.hexdigests() == {"md5": hashlib.md5(b"").hexdigest()}


def test_file_hasher_close_midway_stops_its_threads(tmp_path, small_chunks):
    path = tmp_path / "file"
    path.write_bytes(bytes(50_000))
    hasher = FileHasher(path, ("md5", "sha256"))
    hasher.advance(20_000)
    hasher.close()
    assert not any(t.name.startswith("wb-hash ") and t.is_alive() for t in threading.enumerate())


def test_stream_hasher_gives_hashlibs_digests():
    parts = [random.Random(k).randbytes(3000 + k) for k in range(20)]
    hasher = StreamHasher(("md5", "sha256"))
    for part in parts:
        hasher.update(memoryview(part))
    joined = b"".join(parts)
    assert hasher.hexdigests() == {"md5": hashlib.md5(joined).hexdigest(), "sha256": hashlib.sha256(joined).hexdigest()}


def test_stream_hasher_reports_a_buffer_free_once_every_algorithm_has_hashed_it():
    """A caller that refills one buffer after `hashed()` gets the digests of what it wrote."""
    hasher = StreamHasher(("md5", "sha256"))
    buffer, free, parts = bytearray(4096), threading.Semaphore(0), []
    for k in range(30):
        part = random.Random(k).randbytes(len(buffer))
        buffer[:] = part
        parts.append(part)
        hasher.update(memoryview(buffer), free.release)
        assert free.acquire(timeout=10)  # both algorithms are done with it: it may be refilled
    assert not free.acquire(blocking=False)  # one call per update, not one per algorithm
    joined = b"".join(parts)
    assert hasher.hexdigests() == {"md5": hashlib.md5(joined).hexdigest(), "sha256": hashlib.sha256(joined).hexdigest()}


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux's /proc/self/io")
def test_the_inputs_are_not_read_again_to_hash_them(tmp_path):
    """The bytes `wb diff` reads with read() calls (rchar) are far fewer than its inputs hold: the
    tensors come through memory maps, and so do the hashes (a second pass would read them all)."""
    generator = torch.Generator().manual_seed(0)
    state = {f"layer.{k}.weight": torch.randn(512, 1024, generator=generator) for k in range(2)}
    raw = save_layout(state, tmp_path / "raw", "safetensors-sharded", shards=2)
    tuned = save_layout(perturbed(state), tmp_path / "tuned", "safetensors")
    inputs = sum(p.stat().st_size for p in weight_files(raw) + weight_files(tuned))

    def read_by_one_diff(out: Path) -> int:
        before = int(dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())["rchar"])
        result = run("diff", "--base", raw, "--tuned", tuned, "--out", out)
        assert result.exit_code == 0, result.output
        return int(dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())["rchar"]) - before

    read_by_one_diff(tmp_path / "warm-up")  # lazy imports read their files once
    assert read_by_one_diff(tmp_path / "diff") < inputs / 4
    assert_recorded_hashes_are_the_files_own(json.loads((tmp_path / "diff" / META_FILE).read_text()), raw, tuned)
