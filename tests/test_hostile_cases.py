"""The hostile inputs seen in the wild, one case each: crafted diffs, adapters, headers and options
end in one `error:` line and exit 1 (usage errors: exit 2), write nothing outside OUT, and never
print a traceback. (tests/test_hostile.py mutates valid files at random for the same contract.)"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from tiny import perturbed, save_layout

from workbench.cli import wb


def run(*args: object):
    result = CliRunner().invoke(wb, [str(a) for a in args])
    return result.exit_code, result.output


def one_error(code: int, output: str, *fragments: str) -> None:
    lines = output.strip().splitlines()
    assert code == 1, output
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    assert "Traceback" not in output
    for fragment in fragments:
        assert fragment in lines[0], output


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny_model):
    """RAW, TUNED (a perturbed copy) and a valid `wb diff` between them."""
    root = tmp_path_factory.mktemp("pair")
    tuned = save_layout(perturbed(load_file(tiny_model / "model.safetensors")), root / "tuned")
    shutil.copy(tiny_model / "config.json", tuned / "config.json")
    assert run("diff", "--base", tiny_model, "--tuned", tuned, "--out", root / "diff")[0] == 0
    return tiny_model, tuned, root / "diff"


def crafted_diff(pair, tmp_path: Path, edit) -> Path:
    diff = tmp_path / "diff"
    shutil.copytree(pair[2], diff)
    meta = json.loads((diff / "weight_diff.json").read_text())
    edit(meta)
    (diff / "weight_diff.json").write_text(json.dumps(meta))
    return diff


def layout_file(meta: dict) -> dict:
    return next(iter(meta["tuned"]["layout"]["files"].values()))


def rename_layout(meta: dict, name: str) -> None:
    files = meta["tuned"]["layout"]["files"]
    files[name] = files.pop(next(iter(files)))


# -- weight_diff.json -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../escape.safetensors", "../../escape.safetensors", "/tmp/wb-escape.safetensors",
                                  "sub/../../escape.safetensors"])
def test_layout_names_cannot_write_outside_out(pair, tmp_path, name):
    diff = crafted_diff(pair, tmp_path, lambda meta: rename_layout(meta, name))
    work = tmp_path / "work"
    work.mkdir()
    before = tree(tmp_path)
    code, output = run("recover", "--base", pair[0], "--diff", diff, "--out", work / "out")
    one_error(code, output, "refusing it")
    assert tree(tmp_path) == before and not Path("/tmp/wb-escape.safetensors").exists()


@pytest.mark.parametrize("case", ["bad-json", "not-object", "missing-key", "bad-base64", "header-not-json",
                                  "shape-string", "negative-dim", "unknown-dtype", "sha-not-hex", "resize-lies",
                                  "fixup-count-string", "index-wrong", "names-differ"])
def test_damaged_weight_diff_json_is_one_error_line(pair, tmp_path, case):
    edits = {
        "not-object": None,
        "missing-key": lambda m: m.pop("tuned"),
        "bad-base64": lambda m: layout_file(m).update(header="not base64!"),
        "header-not-json": lambda m: layout_file(m).update(header="bm90IGpzb24="),
        "shape-string": lambda m: next(iter(m["tuned"]["tensors"].values())).update(shape="64"),
        "negative-dim": lambda m: next(iter(m["tuned"]["tensors"].values())).update(shape=[-1, 64]),
        "unknown-dtype": lambda m: next(iter(m["tuned"]["tensors"].values())).update(dtype="__class__"),
        "sha-not-hex": lambda m: next(iter(m["base"]["tensors"].values())).update(sha256="zz"),
        "resize-lies": lambda m: m["resized"].update({next(iter(m["tuned"]["tensors"])): {
            "old_rows": 1, "new_rows": 9, "mean_dtype": "float32"}}),
        "fixup-count-string": lambda m: m["fixups"].update(count="3"),
        "index-wrong": lambda m: m["tuned"]["layout"].update(index={"name": "model.safetensors.index.json",
                                                                   "text": "{\"weight_map\": {}}"}),
        "names-differ": lambda m: m["base"]["tensors"].pop(next(iter(m["base"]["tensors"]))),
    }
    if case == "bad-json":
        diff = tmp_path / "diff"
        shutil.copytree(pair[2], diff)
        (diff / "weight_diff.json").write_text("{not json")
    elif case == "not-object":
        diff = tmp_path / "diff"
        shutil.copytree(pair[2], diff)
        (diff / "weight_diff.json").write_text("[1, 2]")
    else:
        diff = crafted_diff(pair, tmp_path, edits[case])
    code, output = run("recover", "--base", pair[0], "--diff", diff, "--out", tmp_path / "out")
    one_error(code, output, "weight_diff.json")
    assert not (tmp_path / "out").exists()


def other_tool_diff(pair, tmp_path: Path, edit) -> Path:
    """A plain folder of tuned - raw (as Alpaca publishes), with one tensor edited."""
    state = load_file(pair[0] / "model.safetensors")
    diff_state = {k: torch.zeros_like(v) for k, v in state.items()}
    edit(diff_state)
    return save_layout(diff_state, tmp_path / "plain-diff")


def test_recover_refuses_nan_output(pair, tmp_path):
    diff = other_tool_diff(pair, tmp_path, lambda s: s["model.norm.weight"].__setitem__(0, float("nan")))
    code, output = run("recover", "--base", pair[0], "--diff", diff, "--out", tmp_path / "out")
    one_error(code, output, "NaN or infinite", "model.norm.weight")
    assert not (tmp_path / "out").exists()


def test_recover_refuses_an_integer_diff_on_a_float_base(pair, tmp_path):
    diff = other_tool_diff(pair, tmp_path, lambda s: s.__setitem__("model.norm.weight", torch.ones(64, dtype=torch.int32)))
    code, output = run("recover", "--base", pair[0], "--diff", diff, "--out", tmp_path / "out")
    one_error(code, output, "int32", "like to like")


def test_recover_refuses_a_diff_stored_in_another_dtype_than_recorded(pair, tmp_path):
    diff = tmp_path / "diff"
    shutil.copytree(pair[2], diff)
    state = load_file(diff / "model.safetensors")
    state["model.norm.weight"] = state["model.norm.weight"].to(torch.int32)
    save_file(state, diff / "model.safetensors", metadata={"format": "pt"})
    code, output = run("recover", "--base", pair[0], "--diff", diff, "--out", tmp_path / "out")
    one_error(code, output, "stored as int32")


# -- adapter_config.json ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_model):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize("change, fragment", [
    ({"r": 0}, "r must be a whole number"),
    ({"r": "8"}, "r must be a whole number"),
    ({"r": 4.5}, "r must be a whole number"),
    ({"lora_alpha": float("nan")}, "lora_alpha must be a finite number"),
    ({"lora_alpha": float("inf")}, "lora_alpha must be a finite number"),
    ({"lora_alpha": "16"}, "lora_alpha must be a finite number"),
    ({"rank_pattern": {"q_proj(": 4}}, "invalid regular expression"),
    ({"rank_pattern": {"q_proj": 0}}, "rank_pattern"),
    ({"alpha_pattern": {"q_proj": None}}, "alpha_pattern"),
    ({"rank_pattern": [1, 2]}, "rank_pattern must be an object"),
    ({"use_rslora": "yes"}, "use_rslora must be true or false"),
])
def test_adapter_config_numbers_are_checked(tiny_model, adapter, tmp_path, change, fragment):
    crafted = tmp_path / "adapter"
    shutil.copytree(adapter, crafted)
    config = json.loads((crafted / "adapter_config.json").read_text())
    config.update(change)
    (crafted / "adapter_config.json").write_text(json.dumps(config))  # NaN/Infinity as Python's json writes them
    code, output = run("merge", "--base", tiny_model, "--adapter", crafted, "--out", tmp_path / "out")
    one_error(code, output, fragment, "adapter_config.json")
    assert not (tmp_path / "out").exists()


# -- safetensors headers and indexes ------------------------------------------------------------------
def write_raw_safetensors(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize("header, fragment", [
    ({"w": {"dtype": "F32", "shape": [-1, -4], "data_offsets": [0, 16]}}, "bad shape"),
    ({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}, "__metadata__": [1]}, "__metadata__"),
    ({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}, "__metadata__": {"a": 1}}, "__metadata__"),
    ({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [16, 0]}}, "bad data_offsets"),
    ({"w": {"dtype": "F32", "shape": [2.0, 2], "data_offsets": [0, 16]}}, "bad shape"),
    ({"w": {"dtype": ["F32"], "shape": [2, 2], "data_offsets": [0, 16]}}, "unknown dtype"),
    ({"w": [1, 2]}, "not an object"),
])
def test_malformed_headers_are_refused(tmp_path, header, fragment):
    file = write_raw_safetensors(tmp_path / "model.safetensors", header, bytes(16))
    one_error(*run("verify", file), fragment)
    one_error(*run("checksum", tmp_path, "--weight-sum"), fragment)


def test_index_with_a_non_string_shard_is_refused(tmp_path, tiny_model):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": 3}}))
    one_error(*run("verify", model), "not a file name")


# -- options -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", ["5B", "0", "0GB", "1.5", "5 billion", "-1GB"])
def test_shard_sizes_that_are_not_byte_sizes_are_refused(pair, tmp_path, size):
    code, output = run("diff", "--base", pair[0], "--tuned", pair[1], "--out", tmp_path / "d", "--shard-size", size)
    one_error(code, output)
    assert not (tmp_path / "d").exists()


def test_byte_units_are_accepted(pair, tmp_path):
    from workbench.io.writer import parse_size

    assert [parse_size(s) for s in ("5GB", "500MB", "2GiB", "1024", "0.5GB")] == [5 * 10**9, 5 * 10**8, 2 * 2**30,
                                                                                  1024, 5 * 10**8]


@pytest.mark.parametrize("args", [["--atol", "-1"], ["--weight-sum", "nan"], ["--weight-sum", "inf"]])
def test_tolerances_and_sums_must_be_real_numbers(tiny_model, args):
    code, output = run("verify", tiny_model, *args)
    assert code == 2 and "Traceback" not in output, output



class _RunsCode:
    def __reduce__(self):
        return (print, ("this pickle ran code",))


@pytest.mark.parametrize("legacy", [False, True])
def test_a_pickle_that_runs_code_is_refused_in_one_line(tmp_path, legacy):
    torch.save({"w": torch.zeros(2), "x": _RunsCode()}, tmp_path / "pytorch_model.bin",
               _use_new_zipfile_serialization=not legacy)
    code, output = run("verify", tmp_path)
    one_error(code, output, "refusing to unpickle", "GLOBAL")
    assert "this pickle ran code" not in output


def test_a_truncated_bin_is_one_error_line(tmp_path):
    torch.save({"w": torch.zeros(64)}, tmp_path / "full.bin")
    (tmp_path / "pytorch_model.bin").write_bytes((tmp_path / "full.bin").read_bytes()[:200])
    (tmp_path / "full.bin").unlink()
    one_error(*run("verify", tmp_path), "truncated or damaged")


# -- outputs never replace or sit inside an input ------------------------------------------------------
def test_merge_out_equal_to_the_base_is_refused_even_with_force(tmp_path, tiny_model, adapter):
    base = tmp_path / "base"
    shutil.copytree(tiny_model, base)
    before = tree(base)
    one_error(*run("merge", "--base", base, "--adapter", adapter, "--out", base, "--force"), "input")
    one_error(*run("merge", "--base", base, "--adapter", adapter, "--out", base / "merged"), "input")
    assert tree(base) == before


def test_recover_out_inside_the_diff_is_refused(pair, tmp_path):
    diff = tmp_path / "diff"
    shutil.copytree(pair[2], diff)
    before = tree(diff)
    one_error(*run("recover", "--base", pair[0], "--diff", diff, "--out", diff / "out"), "input")
    link = tmp_path / "link"
    link.symlink_to(diff, target_is_directory=True)
    one_error(*run("recover", "--base", pair[0], "--diff", diff, "--out", link, "--force"), "input")
    assert tree(diff) == before


def test_checksum_list_may_sit_in_the_folder_but_never_over_a_weight_file(tmp_path, tiny_model):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    assert run("checksum", model, "-o", model / "checksums.md5")[0] == 0
    weights = (model / "model.safetensors").read_bytes()
    one_error(*run("checksum", model, "-o", model / "model.safetensors", "--force"), "input")
    assert (model / "model.safetensors").read_bytes() == weights


def test_output_options_naming_a_folder_where_a_file_is_meant(tmp_path, tiny_model):
    (tmp_path / "folder").mkdir()
    one_error(*run("checksum", tiny_model, "-o", tmp_path / "folder"))
    one_error(*run("checksum", tiny_model, "-o", tmp_path / "folder", "--force"))
    assert (tmp_path / "folder").is_dir() and not any((tmp_path / "folder").iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]


# -- config.json numbers, before transformers builds a model from them ----------------------------------
@pytest.mark.parametrize("change, fragment", [
    ({"hidden_size": -64}, "hidden_size must be a whole number"),
    ({"num_hidden_layers": 2**40}, "num_hidden_layers must be a whole number"),
    ({"vocab_size": "320"}, "vocab_size must be a whole number"),
    ({"rms_norm_eps": float("nan")}, "rms_norm_eps must be a finite number"),
])
@pytest.mark.parametrize("command", ["merge", "chat", "eval", "export-gguf"])
def test_crafted_config_numbers_are_one_error_line(tiny_model, adapter, tmp_path, change, fragment, command):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "config.json").read_text())
    config.update(change)
    (model / "config.json").write_text(json.dumps(config))
    (tmp_path / "gen.jsonl").write_text('{"instruction": "hi", "output": "hello"}\n')
    args = {
        "merge": ["merge", "--base", model, "--adapter", adapter, "--out", tmp_path / "out"],
        "chat": ["chat", "--model", model, "--prompt", "hi"],
        "eval": ["eval", "--model", model, "--gen-data", tmp_path / "gen.jsonl", "--out", tmp_path / "out" / "r.json"],
        "export-gguf": ["export-gguf", model, "--out", tmp_path / "out" / "m.gguf"],
    }[command]
    one_error(*run(*args), fragment)
    assert not (tmp_path / "out").exists()
