"""`wb train --config` (own keys and LLaMA-Factory YAML) and datasets by name (dataset_info.json)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from clicheck import assert_one_error
from click.testing import CliRunner
from conftest import shared_path
from tiny import save_scaled_model

from workbench.cli import wb
from workbench.errors import WorkbenchError
from workbench.train.config import merge, read_config
from workbench.train.data import load_conversations
from workbench.train.datasets import resolve_sources

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, tiny_tokenizer) -> Path:
    """The tiny Llama as initialised (no logit scaling: these runs check options, not learning)."""
    return save_scaled_model(tmp_path_factory.mktemp("base") / "model", tiny_tokenizer, logit_scale=1)


def lf_example(name: str, tmp_path: Path, base: Path) -> Path:
    """LLaMA-Factory's example YAML with model/dataset_dir/output_dir pointed at local paths, else unchanged."""
    data = yaml.safe_load(shared_path("data", "llamafactory", "examples", name).read_text())
    data.update(model_name_or_path=str(base), dataset_dir=str(shared_path("data", "llamafactory")),
                output_dir=str(tmp_path / "out"))
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def resolved(path: Path, *args: str) -> dict:
    command = wb.commands["train"]
    ctx = command.make_context("train", ["--config", str(path), *args])
    return merge(ctx, read_config(path, command, ctx))


def test_llamafactory_sft_example_maps_to_wb_options(tmp_path, tiny_base):
    path = lf_example("qwen3_lora_sft.yaml", tmp_path, tiny_base)
    config = read_config(path, wb.commands["train"])
    assert config.values == {
        "base": str(tiny_base), "trust_remote_code": True, "stage": "sft", "lora_r": 8, "lora_target": "all-linear",
        "data": ("identity,alpaca_en_demo",), "template": "qwen3_nothink", "cutoff_len": 2048, "max_samples": 1000,
        "out": tmp_path / "out", "logging_steps": 10, "save_steps": 500, "force": True, "batch_size": 1,
        "grad_accum": 8, "lr": 1e-4, "epochs": 3.0, "scheduler": "cosine", "warmup_ratio": 0.1, "dtype": "bf16",
        "dataset_dir": shared_path("data", "llamafactory"),
    }
    assert config.ignored == ["dataloader_num_workers", "ddp_timeout", "plot_loss", "preprocessing_num_workers",
                              "report_to", "save_only_model"]
    params = resolved(path, "--cutoff-len", "64", "--lora-r", "4")
    assert (params["cutoff_len"], params["lora_r"], params["max_samples"]) == (64, 4, 1000)  # command line wins


def test_llamafactory_dpo_example_maps_to_wb_options(tmp_path, tiny_base):
    params = resolved(lf_example("qwen3_lora_dpo.yaml", tmp_path, tiny_base))
    assert (params["stage"], params["pref_loss"], params["pref_beta"], params["lr"]) == ("dpo", "sigmoid", 0.1, 5e-6)
    assert params["data"] == ("dpo_en_demo",) and params["template"] == "qwen3_nothink"


@pytest.mark.slow
def test_llamafactory_sft_example_trains_end_to_end(tmp_path, tiny_base):
    path = lf_example("qwen3_lora_sft.yaml", tmp_path, tiny_base)
    result = CliRunner().invoke(wb, ["train", "--config", str(path), "--max-samples", "4", "--cutoff-len", "48",
                                     "--epochs", "1", "--dtype", "fp32", "--json"])
    assert result.exit_code == 0, result.output
    assert "warning: " in result.stderr and "report_to" in result.stderr
    assert "identity: " in result.stderr and "template: qwen3_nothink (end of turn <|im_end|>)" in result.stderr
    out = tmp_path / "out"
    args = json.loads((out / "train_args.json").read_text())
    options = args["options"]
    assert (options["cutoff_len"], options["max_samples"], options["template"]) == (48, 4, "qwen3_nothink")
    assert options["config"]["path"] == str(path) and len(options["config"]["sha256"]) == 64
    assert options["data"] == ["identity", "alpaca_en_demo"] and args["data"]["kept"] == 8
    assert json.loads(result.stdout)["steps"] == 1
    assert (out / "train_config.yaml").read_bytes() == path.read_bytes()  # the file itself, beside the adapter


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text,fragment", [
    ("- a\n- b\n", "must be a mapping"),
    ("base: !!python/object:os.system {}\n", "cannot read the config as YAML"),
    ("template: 5\n", "config key template: expects text"),
    ("learning_rate: .nan\n", "config key learning_rate: expects a finite number"),
    ("lora_rank: -3\n", "config key lora_rank"),
    ("lora_rnak: 8\n", "unknown config key 'lora_rnak'"),
    ("do_train: false\n", "do_train must be true"),
    ("finetuning_type: full\n", "finetuning_type"),
    ("quantization_method: gptq\n", "quantization_method"),
    ("pref_loss: kto_pair\n", "config key pref_loss"),
    ("mask_history: true\n", "config key mask_history"),
    ("resume_from_checkpoint: saves/x/checkpoint-5\n", "pass --resume"),
    ("lora_rank: 8\nlora_r: 4\n", "both set lora_r"),
    ("bf16: true\nfp16: true\n", "both true"),
])
def test_hostile_configs_are_one_error(tmp_path, text, fragment):
    path = write(tmp_path, text)
    result = CliRunner().invoke(wb, ["train", "--config", str(path), "--base", "b", "--data", "d", "--out",
                                     str(tmp_path / "o")])
    assert_one_error(result, fragment, str(path))


def test_missing_required_names_the_option_and_file(tmp_path):
    path = write(tmp_path, "lora_r: 4\nlearning_rate: 5e-5\n")
    assert resolved(path)["lr"] == 5e-5  # PyYAML reads 5e-5 as text; converted like LLaMA-Factory does
    result = CliRunner().invoke(wb, ["train", "--config", str(path), "--base", "b", "--data", "d"])
    assert_one_error(result, "--out is required", str(path))


# ---- datasets by name ---------------------------------------------------------------------------------------


def test_real_registry_names(tmp_path):
    folder = shared_path("data", "llamafactory")
    sources = resolve_sources(["alpaca_zh_demo", "identity", "glaive_toolcall_zh_demo"], folder)
    assert [(s.name, s.formatting) for s in sources] == [
        ("alpaca_zh_demo", "alpaca"), ("identity", "alpaca"), ("glaive_toolcall_zh_demo", "sharegpt")]
    assert sources[2].columns == {"messages": "conversations", "tools": "tools"}
    loaded = load_conversations(sources, max_samples=5)
    assert [f.kept for f in loaded.files] == [5, 5, 5]
    identity = loaded.conversations[5].messages
    assert "{{name}}" in identity[-1]["content"] and "{{author}}" in identity[-1]["content"]  # left as is
    tool_conv = loaded.conversations[10]
    assert tool_conv.tools and any(m.get("function_call") for m in tool_conv.messages)
    assert any(m["role"] == "tool" for m in tool_conv.messages)
    file = tmp_path / "plain.json"
    file.write_text(json.dumps([{"instruction": "a", "output": "b"}]))
    (plain,) = resolve_sources([str(file)], folder)
    assert plain.name is None and plain.formatting == "auto" and plain.path == file
    with pytest.raises(WorkbenchError, match="preference dataset"):
        load_conversations(resolve_sources(["dpo_zh_demo"], folder))
    with pytest.raises(WorkbenchError, match="hub dataset"):
        resolve_sources(["alpaca_en"], folder)
    with pytest.raises(WorkbenchError, match="close names: alpaca_zh_demo"):
        resolve_sources(["alpaca_zh_dem"], folder)


@pytest.mark.parametrize("registry,fragment", [
    ("{not json", "dataset_info.json is not valid JSON"),
    (json.dumps({"x": {"file_name": "../outside.json"}}), "leaves its folder"),
    (json.dumps({"x": {"file_name": "/etc/passwd"}}), "file_name"),
    (json.dumps({"x": {"file_name": "d.json", "formatting": "openai"}}), "formatting 'openai'"),
    (json.dumps({"x": {"file_name": "d.json", "colums": {}}}), "unknown key(s) colums"),
])
def test_crafted_registries(tmp_path, registry, fragment):
    (tmp_path / "dataset_info.json").write_text(registry)
    (tmp_path / "d.json").write_text("[]")
    with pytest.raises(WorkbenchError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        resolve_sources(["x"], tmp_path)


def test_registry_columns_tags_and_folders(tmp_path):
    rows = [{"q": "Say hi", "a": "hi"}]
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "1.json").write_text(json.dumps(rows))
    (tmp_path / "sub" / "2.jsonl").write_text(json.dumps({"q": "Say yo", "a": "yo"}) + "\n")
    chat = [{"msgs": [{"r": "u", "c": "Hi"}, {"r": "bot", "c": "Hello"}]}]
    (tmp_path / "chat.json").write_text(json.dumps(chat))
    (tmp_path / "dataset_info.json").write_text(json.dumps({
        "qa": {"file_name": "sub", "columns": {"prompt": "q", "response": "a"}},
        "chat": {"file_name": "chat.json", "formatting": "sharegpt", "columns": {"messages": "msgs"},
                 "tags": {"role_tag": "r", "content_tag": "c", "user_tag": "u", "assistant_tag": "bot"}},
        "bad": {"file_name": "chat.json", "columns": {"prompt": "nope", "response": "a"}},
    }))
    loaded = load_conversations(resolve_sources(["qa", "chat"], tmp_path))
    assert [c.messages for c in loaded.conversations] == [
        [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}],
        [{"role": "user", "content": "Say yo"}, {"role": "assistant", "content": "yo"}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]]
    with pytest.raises(WorkbenchError, match="columns map prompt='nope'"):
        load_conversations(resolve_sources(["bad"], tmp_path))
