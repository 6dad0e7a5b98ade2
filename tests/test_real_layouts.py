"""The layouts users really have: the Hugging Face hub cache (snapshots of symlinks into blobs/),
relative paths run from other folders, symlinked folders, and `.bin` shards, through the CLI."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from tiny import as_hub_cache, perturbed, save_layout

from workbench.cli import wb

needs_coreutils = pytest.mark.skipif(shutil.which("md5sum") is None, reason="coreutils md5sum is not installed")


def run(*args: object):
    result = CliRunner().invoke(wb, [str(a) for a in args])
    return result.exit_code, result.output  # stdout and stderr, interleaved


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def hub(tmp_path_factory, tiny_models):
    """A sharded safetensors base and a fine-tune of it, both as hub-cache snapshots."""
    cache = tmp_path_factory.mktemp("hub") / "hub"
    base = tiny_models("safetensors-sharded")
    tuned_dir = tmp_path_factory.mktemp("tuned") / "tuned"
    state = {k: v for f in sorted(base.glob("*.safetensors")) for k, v in load_file(f).items()}
    save_layout(perturbed(state), tuned_dir, "safetensors-sharded")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(base / name, tuned_dir / name)
    return {
        "base": as_hub_cache(base, cache, "org/base"),
        "tuned": as_hub_cache(tuned_dir, cache, "org/tuned"),
        "root": cache,
    }


def test_hub_snapshot_files_are_symlinks_into_blobs(hub):
    shard = next(hub["base"].glob("model-*.safetensors"))
    assert shard.is_symlink() and "blobs" in str(shard.resolve())


@needs_coreutils
def test_checksum_and_verify_a_hub_snapshot(hub, tmp_path):
    listing = tmp_path / "base.md5"
    code, output = run("checksum", hub["base"], "-o", listing, "--weight-sum")
    assert code == 0, output
    names = [line.split("  ", 1)[1] for line in listing.read_text().splitlines()]
    assert names == sorted(p.name for p in hub["base"].glob("model-*.safetensors"))
    checked = subprocess.run(["md5sum", "-c", str(listing)], cwd=hub["base"], capture_output=True, text=True)
    assert checked.returncode == 0 and checked.stdout.count(": OK") == len(names)
    code, output = run("verify", hub["base"], "--checksums", listing)
    assert code == 0, output
    assert output.count(": OK") == len(names)


def test_diff_and_recover_between_hub_snapshots(hub, tmp_path):
    diff, out = tmp_path / "diff", tmp_path / "recovered"
    assert run("diff", "--base", hub["base"], "--tuned", hub["tuned"], "--out", diff)[0] == 0
    code, output = run("recover", "--base", hub["base"], "--diff", diff, "--out", out)
    assert code == 0, output
    for shard in hub["tuned"].glob("model-*.safetensors"):
        assert md5(out / shard.name) == md5(shard)


def test_merge_a_fine_tune_from_the_hub_cache(hub, tmp_path):
    out = tmp_path / "merged"
    code, output = run("merge", "--base", hub["base"], "--adapter", hub["tuned"], "--out", out)
    assert code == 0, output
    merged = {k: v for f in out.glob("*.safetensors") for k, v in load_file(f).items()}
    tuned = {k: v for f in hub["tuned"].glob("*.safetensors") for k, v in load_file(f).items()}
    assert merged.keys() == tuned.keys()
    assert all(float((merged[k] - tuned[k]).abs().max()) < 1e-6 for k in tuned)


@pytest.mark.parametrize("layout", ["safetensors-sharded", "bin-sharded", "safetensors"])
def test_checksum_of_a_relative_path_from_the_folder_above(tiny_models, tmp_path, monkeypatch, layout):
    model = tmp_path / "models" / "base"
    shutil.copytree(tiny_models(layout), model)
    monkeypatch.chdir(tmp_path / "models")
    code, output = run("checksum", "base")
    assert code == 0, output
    files = sorted(p for p in model.iterdir() if p.suffix in (".safetensors", ".bin"))
    assert output.splitlines() == [f"{md5(p)}  {p.name}" for p in files]
    monkeypatch.chdir(model)
    code, dot_output = run("checksum", ".")
    assert code == 0 and dot_output == output


def test_checksum_through_a_symlinked_folder(tiny_models, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(tiny_models("safetensors-sharded"), target_is_directory=True)
    code, output = run("checksum", link.absolute(), "--weight-sum")
    assert code == 0, output
    assert "weight-sum:" in output and output.count(".safetensors") == 3


def test_readme_checksum_example_as_a_subprocess(tiny_models, tmp_path):
    """`wb checksum base` run from the folder above a sharded model, as the README shows it."""
    shutil.copytree(tiny_models("safetensors-sharded"), tmp_path / "base")
    wb_script = Path(sys.executable).with_name("wb")
    command = [str(wb_script)] if wb_script.exists() else [sys.executable, "-m", "workbench"]
    done = subprocess.run([*command, "checksum", "base"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and done.stdout.count(".safetensors") == 3


# -- names read from files stay inside their folder ------------------------------------------------
@pytest.mark.parametrize("shard", ["../evil.safetensors", "/tmp/evil.safetensors", "a\x00b.safetensors",
                                   "..\\evil.safetensors", "C:evil.safetensors"])
def test_index_shard_names_that_leave_the_folder_are_refused(tmp_path, shard):
    import json

    import torch

    model = tmp_path / "model"
    model.mkdir()
    save_file({"w": torch.zeros(2)}, tmp_path / "evil.safetensors")
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": shard}}))
    for command in (["verify", model], ["checksum", model]):
        code, output = run(*command)
        assert code == 1 and output.startswith("error: index names a shard") and output.count("\n") == 1, output


def test_checksum_list_names_outside_the_folder_are_refused(tiny_model, tmp_path):
    sentinel = tmp_path / "sentinel"
    sentinel.write_text("secret")
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    for name in ("../sentinel", str(sentinel), "/etc/passwd"):
        listing = tmp_path / "list.md5"
        digest = md5(sentinel) if "sentinel" in name else "0" * 32
        listing.write_text(f"{digest}  {name}\n")
        code, output = run("verify", model, "--checksums", listing)
        assert code == 1 and ": OK" not in output and "refusing it" in output, output
