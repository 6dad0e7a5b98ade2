"""`wb checksum` and `wb verify`, checked against hashlib and coreutils' md5sum/sha256sum."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file

from workbench.cli import wb

needs_coreutils = pytest.mark.skipif(shutil.which("md5sum") is None, reason="coreutils md5sum is not installed")


def run(*args: str):
    return CliRunner().invoke(wb, [str(a) for a in args], catch_exceptions=False)


def float64_sum(folder) -> float:
    return sum(float(t.double().sum()) for f in sorted(folder.glob("*.safetensors")) for t in load_file(f).values())


@needs_coreutils
@pytest.mark.parametrize("algo", ["md5", "sha256"])
def test_checksum_lines_equal_coreutils(tiny_models, algo):
    folder = tiny_models("safetensors-sharded")
    result = run("checksum", folder, "--algo", algo, "--jobs", "2")
    assert result.exit_code == 0, result.output
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    expected = subprocess.run([f"{algo}sum", *files], cwd=folder, capture_output=True, text=True, check=True).stdout
    assert sorted(result.stdout.splitlines()) == sorted(expected.splitlines())


@needs_coreutils
def test_checksum_file_is_accepted_by_md5sum_c(tiny_models, tmp_path):
    folder = tiny_models("bin-sharded")
    listing = tmp_path / "model.md5"
    assert run("checksum", folder, "-o", listing).exit_code == 0
    check = subprocess.run(["md5sum", "-c", str(listing)], cwd=folder, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.count(": OK") == 3


def test_all_files_hashes_everything_and_equals_hashlib(tiny_model):
    result = run("checksum", tiny_model, "--all-files", "--json")
    report = json.loads(result.stdout)
    names = sorted(p.name for p in tiny_model.iterdir())
    assert sorted(report["files"]) == names and "config.json" in names
    for name, digest in report["files"].items():
        assert digest == hashlib.md5((tiny_model / name).read_bytes()).hexdigest()
    assert report["algo"] == "md5" and report["weight_sum"] is None


@pytest.mark.parametrize("layout", ["safetensors-sharded", "bin"])
def test_weight_sum_is_float64_sum_of_every_element(tiny_models, layout):
    folder = tiny_models(layout)
    report = json.loads(run("checksum", folder, "--weight-sum", "--json").stdout)
    reference = tiny_models("safetensors-sharded")  # same weights, readable without pickle
    assert report["weight_sum"] == pytest.approx(float64_sum(reference), rel=1e-12)


def test_checksum_refuses_existing_output_and_bad_input(tiny_model, tmp_path):
    existing = tmp_path / "list.md5"
    existing.write_text("keep me")
    result = run("checksum", tiny_model, "-o", existing)
    assert result.exit_code == 1 and "--force" in result.stderr
    assert existing.read_text() == "keep me"
    missing = tmp_path / "missing"
    shutil.copytree(tiny_model, missing)
    (missing / "model.safetensors.index.json").write_text('{"weight_map": {"w": "model-00001-of-00002.safetensors"}}')
    result = run("checksum", missing, "-o", tmp_path / "new.md5")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: index names a missing shard") and "index.json" in result.stderr
    assert not (tmp_path / "new.md5").exists()


def test_damaged_file_is_hashed_but_refused_for_weight_sum(tmp_path):
    """A damaged download still gets its hash (to compare with the published one); summing it does not."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{bad}")
    assert run("checksum", broken).exit_code == 0
    result = run("checksum", broken, "--weight-sum", "-o", tmp_path / "new.md5")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: safetensors header does not parse") and "model.safetensors" in result.stderr
    assert not (tmp_path / "new.md5").exists()


def knowlm_style_list(folder, tmp_path, algo="md5"):
    """A published list as KnowLM writes it: `<hex>  <file>` per weight file."""
    lines = [f"{hashlib.new(algo, p.read_bytes()).hexdigest()}  {p.name}\n" for p in sorted(folder.glob("*.bin"))]
    listing = tmp_path / f"{algo}.txt"
    listing.write_text("".join(lines))
    return listing


@pytest.mark.parametrize("algo", ["md5", "sha256"])
def test_verify_passes_with_matching_checksums_and_sum(tiny_models, tmp_path, algo):
    folder = tiny_models("bin-sharded")
    expected_sum = float64_sum(tiny_models("safetensors-sharded"))
    listing = knowlm_style_list(folder, tmp_path, algo)
    result = run("verify", folder, "--checksums", listing, "--weight-sum", f"{expected_sum + 0.005:.6f}", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] and report["checksum_algo"] == algo
    assert set(report["checksums"].values()) == {"ok"} and len(report["checksums"]) == 3
    assert report["weight_sum"]["ok"]


def test_verify_reports_each_failure_naming_the_file(tiny_models, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_models("bin-sharded"), folder)
    listing = knowlm_style_list(folder, tmp_path)
    lines = listing.read_text().splitlines()
    lines[0] = "0" * 32 + lines[0][32:]
    lines.append("83cc5089df3eb400c99d9947b8c4f97b  pytorch_model-00009-of-00009.bin")
    listing.write_text("\n".join(lines) + "\n")
    result = run("verify", folder, "--checksums", listing, "--weight-sum", "1234.5")
    assert result.exit_code == 1
    failures = [line for line in result.stderr.splitlines() if line.startswith("FAILED: ")]
    assert len(failures) == 3
    assert "pytorch_model-00001-of-00003.bin: md5 mismatch" in failures[0]
    assert "pytorch_model-00009-of-00009.bin: missing" in failures[1]
    assert "weight-sum" in failures[2] and "1234.5" in failures[2]


def test_verify_structure_failure_is_one_error_line(tiny_models, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_models("safetensors-sharded"), folder)
    (folder / "model-00002-of-00003.safetensors").unlink()
    result = run("verify", folder)
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        f"error: index names a missing shard 'model-00002-of-00003.safetensors' ({folder / 'model.safetensors.index.json'})"
    ]


def test_verify_rejects_malformed_checksum_list(tiny_model, tmp_path):
    listing = tmp_path / "bad.md5"
    listing.write_text("this is not a checksum line\n")
    result = run("verify", tiny_model, "--checksums", listing)
    assert result.exit_code == 1 and "line 1 is not '<hex>  <file>'" in result.stderr
