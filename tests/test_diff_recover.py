"""`wb diff` and `wb recover`: exact round trips in every dtype and layout, diffs made the way
Alpaca and KnowLM make them (transformers' own resize, then subtraction), and every failure."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import DTYPES, LAYOUTS
from safetensors.torch import load_file, save_file
from tiny import make_model, perturbed, save_layout, state_dict_for_files

from workbench.cli import wb
from workbench.io.reader import open_checkpoint
from workbench.weights.weight_diff import FIXUPS_FILE, META_FILE, bits

REPO = Path(__file__).resolve().parents[1]
SIDE_FILES = {"config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
VOCAB = ("model.embed_tokens.weight", "lm_head.weight")


# -- helpers ---------------------------------------------------------------------------------------
def run(*args):
    return CliRunner().invoke(wb, [str(a) for a in args], catch_exceptions=False)


def load(folder: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(folder) as checkpoint:
        return {name: tensor.clone() for name, tensor in checkpoint.iter_tensors()}


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def weight_files(folder: Path) -> dict[str, str]:
    return {p.name: md5(p) for p in sorted(folder.iterdir()) if p.suffix in (".safetensors", ".bin") or p.name.endswith(".index.json")}


def assert_bit_equal(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(found) == sorted(expected)
    for name, tensor in expected.items():
        assert found[name].dtype == tensor.dtype and found[name].shape == tensor.shape, name
        assert torch.equal(bits(found[name]), bits(tensor)), f"{name} is not bit-identical"


def assert_no_out(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".wb-tmp-{out.name}-*")), "a temporary folder was left behind"


def make_tuned(base: Path, out: Path, layout: str, dtype: torch.dtype, added: int = 0, seed: int = 1,
               scale: float = 0.05) -> dict[str, torch.Tensor]:
    """A fine-tuned copy of `base` (perturbed; `added` new vocabulary rows), with base's side files."""
    state = perturbed({k: v.float() for k, v in load(base).items()}, scale, seed)
    for name in VOCAB:
        if added and name in state:
            rows = state[name]
            state[name] = torch.cat([rows, rows[:added] * 0.5 + 0.01])
    save_layout(state, out, layout, dtype)
    for name in SIDE_FILES:
        if (base / name).is_file():
            shutil.copy(base / name, out / name)
    config = json.loads((out / "config.json").read_text())
    config["vocab_size"] = state["model.embed_tokens.weight"].shape[0]
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return {k: v.to(dtype) for k, v in state.items()}


@pytest.fixture(scope="module")
def made(tiny_models, tmp_path_factory):
    """One wb diff (bf16, sharded safetensors, 2 added tokens) shared by the failure tests."""
    root = tmp_path_factory.mktemp("made")
    base = tiny_models("safetensors-sharded", "bf16")
    tuned = root / "tuned"
    make_tuned(base, tuned, "safetensors-sharded", torch.bfloat16, added=2)
    result = run("diff", "--base", base, "--tuned", tuned, "--out", root / "diff")
    assert result.exit_code == 0, result.output
    return {"base": base, "tuned": tuned, "diff": root / "diff"}


# -- round trips -----------------------------------------------------------------------------------
ROUND_TRIPS = [
    (layout, dtype, tie, added)
    for layout in LAYOUTS
    for dtype in DTYPES
    for tie, added in ((False, 0), (True, 2))
] + [("safetensors", "bf16", False, 3), ("bin-sharded", "fp16", True, 0)]


@pytest.mark.parametrize(("layout", "dtype", "tie", "added"), ROUND_TRIPS)
def test_round_trip_is_bit_exact(tiny_models, tmp_path, layout, dtype, tie, added):
    base = tiny_models(layout, dtype, tie)
    tuned_layout = LAYOUTS[(LAYOUTS.index(layout) + 1 + added) % len(LAYOUTS)]  # mix base/tuned formats
    tuned = make_tuned(base, tmp_path / "tuned", tuned_layout, DTYPES[dtype], added=added)
    result = run("diff", "--base", base, "--tuned", tmp_path / "tuned", "--out", tmp_path / "diff")
    assert result.exit_code == 0, result.output

    meta = json.loads((tmp_path / "diff" / META_FILE).read_text())
    assert meta["num_tensors"] == len(tuned) and meta["dtype"] == "float32"
    vocab = [n for n in VOCAB if n in tuned]
    assert vocab == (["model.embed_tokens.weight"] if tie else list(VOCAB))
    assert meta["resized"] == ({n: {"old_rows": 320, "new_rows": 320 + added, "mean_dtype": "float32"} for n in vocab}
                               if added else {})
    raw, delta = load(base), load(tmp_path / "diff")
    for name, tensor in tuned.items():  # the diff is plain tuned - base (RAW's own rows)
        rows = raw[name].shape[0] if raw[name].dim() else None
        assert delta[name].dtype == torch.float32
        assert torch.equal(delta[name][:rows], tensor[:rows].float() - raw[name].float()), name

    result = run("recover", "--base", base, "--diff", tmp_path / "diff", "--out", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    out = tmp_path / "out"
    assert_bit_equal(load(out), tuned)
    assert {p.name for p in out.iterdir()} == set(report["files"]) | SIDE_FILES | {"recover.json"} | (
        {"model.safetensors.index.json"} if tuned_layout == "safetensors-sharded" else set())
    if tuned_layout.startswith("safetensors"):  # the very same files, byte for byte
        assert weight_files(out) == weight_files(tmp_path / "tuned")
        assert report["byte_identical"] is True
    else:
        assert report["byte_identical"] is None and report["tensors_exact"] is True
        assert set(report["files"]) == {"model.safetensors"}
    assert report["weight_sum"] == pytest.approx(meta["tuned"]["weight_sum"], abs=1e-9)
    for name, entry in report["files"].items():
        assert entry["md5"] == md5(out / name)


def test_fixups_make_recovery_exact_where_float_addition_is_not(tiny_models, tmp_path):
    base = tiny_models("safetensors", "fp32")
    raw = load(base)
    generator = torch.Generator().manual_seed(3)
    # weights that shrink or flip sign: fl(base + fl(tuned - base)) then often misses tuned's low bits
    tuned = {k: v * -0.3 + 1e-4 * torch.randn(v.shape, generator=generator) for k, v in raw.items()}
    save_layout(tuned, tmp_path / "tuned", "safetensors-sharded", torch.float32)
    for dtype in ("float32", "float16"):
        diff, out = tmp_path / f"diff-{dtype}", tmp_path / f"out-{dtype}"
        assert run("diff", "--base", base, "--tuned", tmp_path / "tuned", "--out", diff, "--dtype", dtype).exit_code == 0
        meta = json.loads((diff / META_FILE).read_text())
        inexact = sum(int((v + (tuned[k] - v).to(DTYPES["fp16" if dtype == "float16" else "fp32"]).float() != tuned[k])
                          .sum()) for k, v in raw.items())
        assert meta["fixups"]["count"] == inexact > 0
        assert meta["fixups"]["file"] == FIXUPS_FILE and (diff / FIXUPS_FILE).is_file()
        assert sum(meta["fixups"]["tensors"].values()) == inexact
        report = json.loads(run("recover", "--base", base, "--diff", diff, "--out", out, "--json").stdout)
        assert report["fixups_applied"] == inexact and report["byte_identical"] is True
        assert weight_files(out) == weight_files(tmp_path / "tuned")


def test_raw_in_a_wider_dtype_still_recovers_exactly(made, tmp_path):
    """The fingerprint compares RAW cast to the recorded dtype: an fp32 copy of a bf16 base is fine."""
    save_layout({k: v.float() for k, v in load(made["base"]).items()}, tmp_path / "raw32", "bin", torch.float32)
    result = run("recover", "--base", tmp_path / "raw32", "--diff", made["diff"], "--out", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["byte_identical"] is True
    assert weight_files(tmp_path / "out") == weight_files(made["tuned"])


def test_recover_dtype_option_converts_the_exact_result(made, tmp_path):
    result = run("recover", "--base", made["base"], "--diff", made["diff"], "--out", tmp_path / "out",
                 "--dtype", "fp32", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["byte_identical"] is None and report["tensors_exact"] is None
    assert set(report["files"]) == {"model.safetensors"}
    tuned = load(made["tuned"])
    assert_bit_equal(load(tmp_path / "out"), {k: v.float() for k, v in tuned.items()})


def test_the_diff_folder_is_a_model_alpaca_scripts_can_load(made, tmp_path):
    from transformers import AutoModelForCausalLM

    delta = AutoModelForCausalLM.from_pretrained(made["diff"], dtype=torch.float32).state_dict()
    stored = load(made["diff"])
    assert all(torch.equal(delta[k], v) for k, v in stored.items())


# -- diffs made by other tools -----------------------------------------------------------------------
def alpaca_resize(model, new_tokens: int) -> None:
    """stanford_alpaca train.smart_tokenizer_and_embedding_resize, on the model side."""
    model.resize_token_embeddings(model.config.vocab_size + new_tokens)
    inputs = model.get_input_embeddings().weight.data
    outputs = model.get_output_embeddings().weight.data
    inputs[-new_tokens:] = inputs[:-new_tokens].mean(dim=0, keepdim=True)
    outputs[-new_tokens:] = outputs[:-new_tokens].mean(dim=0, keepdim=True)


def test_alpaca_style_diff_recovers_and_passes_expect_sum(tmp_path):
    raw_model = make_model(320, seed=11)
    raw_state = {k: v.half() for k, v in state_dict_for_files(raw_model).items()}  # HF LLaMA conversions: fp16 .bin
    save_layout(raw_state, tmp_path / "raw", "bin-sharded", config=raw_model.config)
    # Alpaca: load RAW in float32, add [PAD] with the mean rule, fine-tune; make_diff: tuned - resized raw
    model = make_model(320, seed=11)
    model.load_state_dict({k: v.float() for k, v in raw_state.items()}, strict=False)
    alpaca_resize(model, 1)
    resized_raw = state_dict_for_files(model)
    tuned = perturbed(resized_raw, 0.05, seed=12)
    delta = {k: tuned[k] - resized_raw[k] for k in tuned}
    delta["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(8)  # old transformers saved these
    save_layout(delta, tmp_path / "diff", "bin-sharded", torch.float32, config=model.config)
    recovered = {k: delta[k] + resized_raw[k] for k in tuned}
    weight_sum = sum(float(t.double().sum()) for t in recovered.values())

    out = tmp_path / "out"
    result = run("recover", "--base", tmp_path / "raw", "--diff", tmp_path / "diff", "--out", out,
                 "--expect-sum", f"{weight_sum:.4f}", "--atol", "1e-2", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["source"] == "other tool" and report["byte_identical"] is None
    assert report["skipped"] == ["model.layers.0.self_attn.rotary_emb.inv_freq"]
    assert abs(report["difference"]) <= 1e-2 and report["expected"] == float(f"{weight_sum:.4f}")
    assert report["resized"]["model.embed_tokens.weight"]["new_rows"] == 321
    found = load(out)
    assert sorted(found) == sorted(tuned)
    for name, tensor in tuned.items():
        assert found[name].dtype == torch.float32
        torch.testing.assert_close(found[name], tensor, atol=1e-6, rtol=0)
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json", "recover.json"}

    result = run("recover", "--base", tmp_path / "raw", "--diff", tmp_path / "diff", "--out", tmp_path / "bad",
                 "--expect-sum", f"{weight_sum + 1:.4f}")
    assert result.exit_code == 1
    assert f"differs from the expected {weight_sum + 1:.4f}" in result.stderr
    assert_no_out(tmp_path / "bad")


def test_knowlm_style_fp16_diff_is_added_in_float32_and_cast_back(tiny_models, tmp_path):
    base = tiny_models("bin", "fp16")
    raw = load(base)
    tuned = perturbed({k: v.float() for k, v in raw.items()}, 0.05, seed=4)
    delta = {k: (tuned[k] - raw[k].float()).half() for k in raw}
    save_layout(delta, tmp_path / "diff", "bin-sharded")
    result = run("recover", "--base", base, "--diff", tmp_path / "diff", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "from a diff made by another tool" in result.stdout and "weight-sum:" in result.stdout
    assert_bit_equal(load(tmp_path / "out"), {k: (raw[k].float() + delta[k].float()).half() for k in raw})
    result = run("recover", "--base", base, "--diff", tmp_path / "diff", "--out", tmp_path / "out32", "--dtype", "float32")
    assert result.exit_code == 0, result.output
    assert_bit_equal(load(tmp_path / "out32"), {k: raw[k].float() + delta[k].float() for k in raw})


# -- failures: one error line, exit 1, no OUT --------------------------------------------------------
def expect_failure(out: Path, *args, message: str) -> str:
    result = run("recover", *args, "--out", out)
    assert result.exit_code == 1, result.output
    assert message in result.stderr, result.stderr
    assert_no_out(out)
    return result.stderr


def test_wrong_base_is_refused_with_expected_and_found(made, tiny_models, tmp_path):
    other = tiny_models("safetensors-sharded", "bf16", seed=5)
    error = expect_failure(tmp_path / "out", "--base", other, "--diff", made["diff"],
                           message="RAW is not the base this diff was made from: tensor ")
    assert "sha256 expected" in error and ", found" in error and "weight-sum expected" in error
    assert error.count("error:") == 1


def test_shape_mismatch_names_the_tensor(made, tmp_path):
    state = load(made["base"])
    state["model.layers.1.mlp.up_proj.weight"] = state["model.layers.1.mlp.up_proj.weight"][:, :32].clone()
    save_layout(state, tmp_path / "raw", "safetensors")
    expect_failure(tmp_path / "out", "--base", tmp_path / "raw", "--diff", made["diff"],
                   message="tensor 'model.layers.1.mlp.up_proj.weight' has shape [128, 32] in RAW, [128, 64] in the base")


@pytest.mark.parametrize("change", ["missing", "extra"])
def test_missing_or_extra_tensor_is_named(made, tmp_path, change):
    state = load(made["base"])
    if change == "missing":
        del state["model.norm.weight"]
        message = "1 tensor(s) in the base this diff was made from are missing from RAW: model.norm.weight"
    else:
        state["model.extra.weight"] = torch.zeros(3)
        message = "1 tensor(s) in RAW are not in the base this diff was made from: model.extra.weight"
    save_layout(state, tmp_path / "raw", "safetensors")
    expect_failure(tmp_path / "out", "--base", tmp_path / "raw", "--diff", made["diff"], message=message)


def test_missing_tensor_in_a_foreign_diff_is_named(tiny_models, tmp_path):
    base = tiny_models("bin-sharded", "fp32")
    delta = {k: torch.zeros_like(v) for k, v in load(base).items() if k != "model.layers.0.input_layernorm.weight"}
    save_layout(delta, tmp_path / "diff", "bin")
    expect_failure(tmp_path / "out", "--base", base, "--diff", tmp_path / "diff",
                   message="1 tensor(s) in RAW are not in DIFF: model.layers.0.input_layernorm.weight")


def test_damaged_diff_fails_the_byte_check(made, tmp_path):
    damaged = tmp_path / "diff"
    shutil.copytree(made["diff"], damaged)
    state = load_file(damaged / "model.safetensors")
    state["model.layers.0.mlp.down_proj.weight"][3, 5] += 0.25
    save_file(state, damaged / "model.safetensors", metadata={"format": "pt"})
    error = expect_failure(tmp_path / "out", "--base", made["base"], "--diff", damaged,
                           message="not byte-identical to TUNED's (md5 expected")
    assert error.startswith("FAILED: ")


def test_damaged_diff_of_a_bin_tuned_fails_the_tensor_check(tiny_models, tmp_path):
    base = tiny_models("safetensors", "fp32")
    make_tuned(base, tmp_path / "tuned", "bin-sharded", torch.float32)
    assert run("diff", "--base", base, "--tuned", tmp_path / "tuned", "--out", tmp_path / "diff").exit_code == 0
    state = load_file(tmp_path / "diff" / "model.safetensors")
    state["model.norm.weight"][0] += 1.0
    save_file(state, tmp_path / "diff" / "model.safetensors", metadata={"format": "pt"})
    expect_failure(tmp_path / "out", "--base", base, "--diff", tmp_path / "diff",
                   message="recovered tensor 'model.norm.weight' is not bit-identical to TUNED (sha256 expected")


@pytest.mark.parametrize(("damage", "message"), [
    ("json", "weight_diff.json does not parse"),
    ("version", "weight_diff.json has version 99; this wb reads version 1"),
    ("fixups", "weight_diff.json records 5 fixups but weight_diff_fixups.safetensors is missing"),
])
def test_damaged_weight_diff_json_is_refused(made, tmp_path, damage, message):
    damaged = tmp_path / "diff"
    shutil.copytree(made["diff"], damaged)
    meta = json.loads((damaged / META_FILE).read_text())
    if damage == "version":
        meta["wb_weight_diff_version"] = 99
    elif damage == "fixups":
        meta["fixups"] = {"file": FIXUPS_FILE, "count": 5, "tensors": {"lm_head.weight": 5}}
    (damaged / META_FILE).write_text("{not json" if damage == "json" else json.dumps(meta))
    expect_failure(tmp_path / "out", "--base", made["base"], "--diff", damaged, message=message)


def test_sharded_diff_and_output_shard_size(made, tmp_path):
    result = run("diff", "--base", made["base"], "--tuned", made["tuned"], "--out", tmp_path / "diff",
                 "--shard-size", "200KB", "--json")
    assert result.exit_code == 0, result.output
    assert sorted(json.loads(result.stdout)["files"]) == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    assert (tmp_path / "diff" / "model.safetensors.index.json").is_file()
    result = run("recover", "--base", made["base"], "--diff", tmp_path / "diff", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert weight_files(tmp_path / "out") == weight_files(made["tuned"])
    result = run("recover", "--base", made["base"], "--diff", tmp_path / "diff", "--out", tmp_path / "out32",
                 "--dtype", "fp32", "--shard-size", "300KB", "--json")
    assert sorted(json.loads(result.stdout)["files"]) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]


def test_checksums_list_is_checked_before_out_appears(made, tmp_path):
    files = weight_files(made["tuned"]) | {"config.json": md5(made["tuned"] / "config.json")}
    good = tmp_path / "good.md5"
    good.write_text("".join(f"{digest}  {name}\n" for name, digest in files.items()))
    result = run("recover", "--base", made["base"], "--diff", made["diff"], "--out", tmp_path / "out", "--checksums", good)
    assert result.exit_code == 0, result.output
    assert f"checksums: {len(files)} file(s) OK (md5)" in result.stdout

    bad = tmp_path / "bad.md5"
    name = next(iter(files))
    bad.write_text(good.read_text().replace(files[name], "0" * 32) + f"{'1' * 32}  extra.bin\n")
    error = expect_failure(tmp_path / "out2", "--base", made["base"], "--diff", made["diff"], "--checksums", bad,
                           message=f"FAILED: {name}: md5 mismatch (expected {'0' * 32}, found {files[name]})")
    assert "FAILED: extra.bin: missing from OUT" in error and "error: 2 check(s) failed" in error


def test_expect_sum_mismatch_fails(made, tmp_path):
    expect_failure(tmp_path / "out", "--base", made["base"], "--diff", made["diff"], "--expect-sum", "12345.0",
                   message="differs from the expected 12345.000000")


def test_existing_out_needs_force(made, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run("recover", "--base", made["base"], "--diff", made["diff"], "--out", out)
    assert result.exit_code == 1 and "output exists; pass --force" in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    result = run("recover", "--base", made["base"], "--diff", made["diff"], "--out", out, "--force")
    assert result.exit_code == 0, result.output
    assert weight_files(out) == weight_files(made["tuned"]) and not (out / "keep.txt").exists()


def test_diff_refuses_a_tuned_model_with_fewer_rows(tiny_models, tmp_path):
    base = tiny_models("safetensors", "fp32")
    state = load(base)
    state["lm_head.weight"] = state["lm_head.weight"][:300].clone()
    save_layout(state, tmp_path / "tuned", "safetensors")
    result = run("diff", "--base", base, "--tuned", tmp_path / "tuned", "--out", tmp_path / "diff")
    assert result.exit_code == 1
    assert "tensor 'lm_head.weight' has shape [320, 64] in RAW but [300, 64] in TUNED" in result.stderr
    assert_no_out(tmp_path / "diff")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_device_cuda_without_a_gpu_is_an_error(made, tmp_path):
    expect_failure(tmp_path / "out", "--base", made["base"], "--diff", made["diff"], "--device", "cuda",
                   message="--device cuda was asked for but no CUDA device is available")


def test_exception_in_the_middle_leaves_no_out(made, tmp_path, monkeypatch):
    import workbench.weights.recover

    calls = []

    def failing_add(*args):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("injected")
        return workbench.weights.weight_diff.add(*args)

    monkeypatch.setattr(workbench.weights.recover, "add", failing_add)
    with pytest.raises(RuntimeError, match="injected"):
        run("recover", "--base", made["base"], "--diff", made["diff"], "--out", tmp_path / "out")
    assert_no_out(tmp_path / "out")


def test_recover_killed_midway_leaves_no_out(made, tmp_path):
    out, marker = tmp_path / "out", tmp_path / "writing"
    code = (
        "import sys, time; from pathlib import Path; import workbench.weights.recover as r; from workbench.cli import wb\n"
        "real, calls = r.add, []\n"
        "def slow(*a):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 4:\n"
        f"        Path({str(marker)!r}).touch(); time.sleep(120)\n"
        "    return real(*a)\n"
        "r.add = slow\n"
        f"wb(['recover', '--base', {str(made['base'])!r}, '--diff', {str(made['diff'])!r}, '--out', {str(out)!r}])\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], cwd=REPO)
    try:
        deadline = time.time() + 60
        while not marker.exists() and child.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert marker.exists(), "the child never started writing"
        assert list(tmp_path.glob(".wb-tmp-out-*/*.safetensors")), "nothing was being written"
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert not out.exists()


def test_diff_and_recover_do_not_import_transformers(made, tmp_path):
    code = (
        "import sys; from click.testing import CliRunner; from workbench.cli import wb\n"
        f"a = CliRunner().invoke(wb, ['diff', '--base', {str(made['base'])!r}, '--tuned', {str(made['tuned'])!r}, "
        f"'--out', {str(tmp_path / 'diff')!r}])\n"
        f"b = CliRunner().invoke(wb, ['recover', '--base', {str(made['base'])!r}, '--diff', {str(tmp_path / 'diff')!r}, "
        f"'--out', {str(tmp_path / 'out')!r}])\n"
        "assert a.exit_code == 0 and b.exit_code == 0, (a.output, b.output)\n"
        "print(','.join(m for m in ('transformers', 'peft', 'lm_eval') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""
    assert weight_files(tmp_path / "out") == weight_files(made["tuned"])
