"""`wb train`: data formats, label masks with real tokenizers, guard rails, outputs, resume, launch."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from conftest import run_train, shared_path, train_args
from tiny import make_model, read_log, save_layout, state_dict_for_files

from workbench.cli import wb
from workbench.errors import WorkbenchError
from workbench.train.data import load_conversations
from workbench.train.encode import IGNORE, encode_all
from workbench.train.templates import resolve_template

LOG_FIELDS = {"step", "total_steps", "loss", "lr", "epoch", "tokens_per_s", "elapsed_s"}
pytestmark = pytest.mark.usefixtures("one_thread")


def base_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return train_args(model, data, out, "--lr", "1e-2", "--logging-steps", "4", *extra)


@pytest.fixture(scope="module")
def trained(learn_model, learn_data, tmp_path_factory):
    """One CLI run: 36 train examples / batch 4 = 9 steps per epoch x 4 epochs; 4 validation examples."""
    out = tmp_path_factory.mktemp("run") / "out"
    result = run_train(*base_args(learn_model, learn_data, out, "--epochs", "4", "--val-size", "4",
                                  "--eval-steps", "12", "--save-steps", "12", "--json"))
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout), result.stderr


# ---- training runs -------------------------------------------------------------------------------------------


def test_loss_falls_on_a_learnable_task(trained):
    out, metrics, _ = trained
    losses = [row["loss"] for row in read_log(out) if row["loss"] is not None]
    assert metrics["steps"] == 36 and len(losses) == 9
    assert losses[-1] < 0.3 * losses[0], losses
    assert metrics["eval_loss"] is not None and metrics["eval_loss"] < losses[0]


def test_output_files_are_exactly_these(trained, tiny_tokenizer, tmp_path):
    out, _, _ = trained
    tiny_tokenizer.save_pretrained(tmp_path)
    tokenizer_files = {p.name for p in tmp_path.iterdir()}
    expected = {"adapter_config.json", "adapter_model.safetensors", "train_args.json", "trainer_log.jsonl",
                "loss.svg", "metrics.json", "checkpoints"} | tokenizer_files
    assert {p.name for p in out.iterdir()} == expected
    assert {p.name for p in (out / "checkpoints").iterdir()} == {"checkpoint-12", "checkpoint-24", "checkpoint-36"}
    assert not list(out.parent.glob(".wb-tmp-*"))


def test_stdout_json_is_metrics_json_and_stderr_reports_the_run(trained):
    out, metrics, stderr = trained
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert metrics["world_size"] == 1 and metrics["global_batch"] == 4
    assert metrics["train_samples"] == 36 and metrics["val_samples"] == 4
    assert metrics["tokens_per_s"] > 0 and metrics["train_tokens"] > 0
    assert "world size 1, global batch 4 (batch 4 x grad-accum 1 x 1 process)" in stderr
    assert "step 36/36" in stderr


def test_adapter_loads_with_peft_and_changes_the_model(trained, learn_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, _, _ = trained
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16 and config["peft_type"] == "LORA"
    base = AutoModelForCausalLM.from_pretrained(learn_model)
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    with torch.no_grad():
        before = base(ids).logits
        tuned = PeftModel.from_pretrained(base, out)
        after = tuned(ids).logits
    assert not torch.allclose(before, after)


def test_train_args_record_options_versions_and_hashes(trained, learn_model, learn_data):
    out, _, _ = trained
    args = json.loads((out / "train_args.json").read_text())
    options = args["options"]
    assert options["lora_alpha"] == 16 and options["dtype"] == "fp32" and options["device"] == "cpu"
    assert options["val_size"] == 4 and options["eval_steps"] == 12 and options["data"] == [str(learn_data)]
    assert set(args["versions"]) >= {"wb", "python", "torch", "transformers", "peft", "accelerate"}
    assert args["data"]["files"][0]["sha256"] == hashlib.sha256(learn_data.read_bytes()).hexdigest()
    assert args["data"]["files"][0]["format"] == "alpaca"
    weights = hashlib.sha256((learn_model / "model.safetensors").read_bytes()).hexdigest()
    assert args["base"]["fingerprint"] == {"algo": "sha256", "files": {"model.safetensors": weights}}
    assert args["template"]["end_of_turn"] == "<|im_end|>"
    assert args["command"].startswith("wb train --base")


def test_trainer_log_rows_and_loss_svg(trained):
    out, _, _ = trained
    rows = read_log(out)
    assert [r["step"] for r in rows] == [4, 8, 12, 16, 20, 24, 28, 32, 36]
    for row in rows:
        assert LOG_FIELDS <= set(row) and row["total_steps"] == 36 and row["tokens_per_s"] > 0
    assert [r["step"] for r in rows if "eval_loss" in r] == [12, 24, 36]
    assert [r["elapsed_s"] for r in rows] == sorted(r["elapsed_s"] for r in rows)
    svg = ET.fromstring((out / "loss.svg").read_text())
    tags = [element.tag.split("}")[-1] for element in svg.iter()]
    assert "polyline" in tags and tags.count("circle") == 3


def test_train_result_reports_one_line_on_rank_0_only(tmp_path, monkeypatch):
    from workbench.train.run import TrainResult

    metrics = {"train_loss": 0.75, "final_loss": None, "eval_loss": 0.5, "steps": 9, "tokens_per_s": 1234.4}
    monkeypatch.delenv("RANK", raising=False)
    result = TrainResult(metrics, tmp_path / "out")
    assert result.lines() == [f"final loss 0.7500, eval_loss 0.5000 after 9 steps, 1,234 tokens/s; "
                              f"adapter in {tmp_path / 'out'}"]
    assert result.to_json() is metrics
    monkeypatch.setenv("RANK", "1")  # another process under a launcher prints nothing, --json or not
    assert TrainResult(metrics, tmp_path / "out").lines() == [] and TrainResult(metrics, tmp_path).to_json() is None


def test_resume_continues_the_step_count(learn_model, learn_data, tmp_path):
    out = tmp_path / "out"
    first = run_train(*base_args(learn_model, learn_data, out, "--epochs", "1", "--save-steps", "5"))
    assert first.exit_code == 0, first.output
    assert run_train(*base_args(learn_model, learn_data, out, "--epochs", "1")).exit_code == 1  # exists
    again = run_train(*base_args(learn_model, learn_data, out, "--epochs", "2", "--resume", "--json"))
    assert again.exit_code == 0, again.output
    metrics = json.loads(again.stdout)
    assert metrics["resumed_from"] == "checkpoint-10" and metrics["steps"] == 20
    rows = read_log(out)
    assert [r["step"] for r in rows] == [4, 8, 12, 16, 20]  # the first run's rows come back from the checkpoint
    assert rows[2]["elapsed_s"] > rows[1]["elapsed_s"]
    assert "resuming after step 10" in again.stderr


def test_resume_without_a_checkpoint_is_an_error(learn_model, learn_data, tmp_path):
    result = run_train(*base_args(learn_model, learn_data, tmp_path / "none", "--resume"))
    assert result.exit_code == 1 and "no checkpoint to continue from" in result.stderr


def test_builtin_template_is_saved_with_the_tokenizer(learn_model, learn_data, tmp_path):
    from transformers import AutoTokenizer

    from workbench.train.templates import BUILTINS

    out = tmp_path / "out"
    result = run_train(*base_args(learn_model, learn_data, out, "--template", "default", "--max-samples", "8",
                                  "--epochs", "1", "--train-on-prompt"))
    assert result.exit_code == 0, result.output
    assert AutoTokenizer.from_pretrained(out).chat_template == BUILTINS["default"]
    assert json.loads((out / "train_args.json").read_text())["data"]["kept"] == 8


# ---- guard rails ------------------------------------------------------------------------------------------


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(learn_model, learn_data, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from workbench.train.trainer import WbTrainer

    original = WbTrainer.compute_loss

    def poisoned(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = original(self, model, inputs, return_outputs, num_items_in_batch)
        return loss * float("nan") if self.state.global_step >= 3 else loss

    monkeypatch.setattr(WbTrainer, "compute_loss", poisoned)
    out = tmp_path / "out"
    result = run_train(*base_args(learn_model, learn_data, out, "--epochs", "1", "--save-steps", "1"))
    assert result.exit_code == 1
    assert "the loss became nan at step 4" in result.stderr
    assert "checkpoint-3 (the weights that gave it) was renamed nan-checkpoint-3" in result.stderr
    assert f"the last good checkpoint is {out / 'checkpoints' / 'checkpoint-2'}" in result.stderr
    assert {p.name for p in out.iterdir()} == {"checkpoints"}  # no final files
    assert {p.name for p in (out / "checkpoints").iterdir()} == {"checkpoint-1", "checkpoint-2", "nan-checkpoint-3"}
    weights = load_file(out / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors")
    assert weights and all(torch.isfinite(t).all() for t in weights.values())


def test_a_diverging_learning_rate_stops_at_the_first_nan(learn_model, learn_data, tmp_path):
    out = tmp_path / "out"
    result = run_train(*base_args(learn_model, learn_data, out, "--epochs", "1", "--save-steps", "1", "--lr", "1e30",
                                  "--warmup-ratio", "0"))
    assert result.exit_code == 1
    assert "the loss became nan at step 2" in result.stderr and "nothing was kept" in result.stderr
    assert not out.exists()  # the only checkpoint gave the NaN; a failed run without one leaves no DIR


def test_fewer_batches_per_epoch_than_grad_accum_is_refused(learn_model, learn_data, tmp_path):
    result = run_train(*base_args(learn_model, learn_data, tmp_path / "out", "--grad-accum", "16"))
    assert result.exit_code == 1
    assert "an epoch has only 10 batch(es)" in result.stderr and "unscale_() has already been called" in result.stderr
    assert not (tmp_path / "out").exists()


def test_fp16_is_refused_with_the_reason(learn_model, learn_data, tmp_path):
    result = run_train(*base_args(learn_model, learn_data, tmp_path / "out", "--dtype", "float16"))
    assert result.exit_code == 1
    assert "fp16 training is refused" in result.stderr and "NaN" in result.stderr and "--allow-fp16" in result.stderr


def test_strategy_needs_several_processes(learn_model, learn_data, tmp_path):
    result = run_train(*base_args(learn_model, learn_data, tmp_path / "out", "--strategy", "zero3"))
    assert result.exit_code == 1 and "add --nproc N" in result.stderr


def test_untrained_special_tokens_warn(tiny_tokenizer):
    from workbench.train.checks import untrained_special_tokens

    template = resolve_template("auto", tiny_tokenizer, "tiny")
    model = make_model(len(tiny_tokenizer), seed=0)
    assert untrained_special_tokens(model, template.special_ids, tiny_tokenizer) == []
    start, end = tiny_tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    with torch.no_grad():
        model.model.embed_tokens.weight[[start, end]] = 0.0  # never trained: zero rows
    (warning,) = untrained_special_tokens(model, template.special_ids, tiny_tokenizer)
    assert "<|im_start|>, <|im_end|>" in warning and "input embeddings" in warning
    model = make_model(len(tiny_tokenizer), seed=0)
    with torch.no_grad():
        model.lm_head.weight[[start, end]] = model.lm_head.weight.mean(dim=0)  # initialised to the mean
    (warning,) = untrained_special_tokens(model, template.special_ids, tiny_tokenizer)
    assert "output embeddings" in warning


def test_untrained_template_tokens_warn_during_training(tiny_tokenizer, learn_data, tmp_path):
    model = make_model(len(tiny_tokenizer), seed=0)
    end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        model.model.embed_tokens.weight[end] = 0.0
    base = save_layout(state_dict_for_files(model), tmp_path / "base", config=model.config, tokenizer=tiny_tokenizer)
    result = run_train(*base_args(base, learn_data, tmp_path / "out", "--max-samples", "8", "--epochs", "1", "--json"))
    assert result.exit_code == 0, result.output
    assert "warning: the chat template's special tokens <|im_end|> look untrained" in result.stderr
    assert json.loads(result.stdout)["warnings"][0].startswith("the chat template's special tokens <|im_end|>")


def test_bad_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "c", "response": \n')
    with pytest.raises(WorkbenchError) as error:
        load_conversations([path])
    assert error.value.path == f"{path}:3" and "bad JSON line" in error.value.message
    array = tmp_path / "bad.json"
    array.write_text('[\n{"instruction": "a", "output": "b"},\n{"instruction": "c" "output": "d"}\n]')
    with pytest.raises(WorkbenchError) as error:
        load_conversations([array])
    assert error.value.path == f"{array}:3"


def test_empty_dataset_after_filtering_is_an_error(tmp_path):
    path = tmp_path / "empty.json"
    path.write_text(json.dumps([{"instruction": "a", "input": "", "output": ""}] * 3))
    with pytest.raises(WorkbenchError, match=r"empty after filtering: empty response \(3\)"):
        load_conversations([path])


def test_unknown_format_is_an_error_that_names_the_fix():
    with pytest.raises(WorkbenchError, match="unknown data format: records have keys content, summary.*--columns"):
        load_conversations([shared_path("data", "advertisegen", "dev.json")])


def test_unresolvable_templates_are_errors(tiny_tokenizer):
    from transformers import AutoTokenizer

    llama3 = AutoTokenizer.from_pretrained(shared_path("tokenizers", "llama3"))
    with pytest.raises(WorkbenchError, match="--template chatml needs the special token"):
        resolve_template("chatml", llama3, "llama3")
    bare = tiny_tokenizer.__class__.from_pretrained(_saved(tiny_tokenizer))
    bare.chat_template = None
    with pytest.raises(WorkbenchError, match="the tokenizer has no chat template"):
        resolve_template("auto", bare, "bare")


def _saved(tokenizer) -> str:
    import tempfile

    folder = tempfile.mkdtemp(prefix="wb-tok-")
    tokenizer.save_pretrained(folder)
    return folder


# ---- data formats on the real LLaMA-Factory / AdvertiseGen files ----------------------------------------------


@pytest.mark.parametrize("name, fmt, records", [
    ("alpaca_zh_demo.json", "alpaca", 1000),
    ("alpaca_en_demo.json", "alpaca", 999),
    ("identity.json", "alpaca", 91),
    ("glaive_toolcall_zh_demo.json", "sharegpt", 300),
])
def test_llamafactory_formats_are_detected(name, fmt, records):
    loaded = load_conversations([shared_path("data", "llamafactory", name)])
    assert loaded.files[0].format == fmt and loaded.files[0].kept == records == len(loaded.conversations)


def test_alpaca_system_and_history_become_turns_and_bad_records_are_counted(tmp_path):
    path = tmp_path / "mixed.jsonl"
    rows = [
        {"instruction": "q2", "input": "ctx", "output": "a2", "system": "be brief", "history": [["q1", "a1"]]},
        {"instruction": "q", "input": "", "output": ""},
        {"instruction": "q", "input": "", "output": "a", "history": "not a list"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    loaded = load_conversations([path], fmt="alpaca")
    assert [(m["role"], m["content"]) for m in loaded.conversations[0].messages] == [
        ("system", "be brief"), ("user", "q1"), ("assistant", "a1"), ("user", "q2\nctx"), ("assistant", "a2")]
    assert loaded.files[0].dropped == {"empty response": 1, "history is not a list of [prompt, response] pairs": 1}


def test_openai_messages_and_columns_are_detected(tmp_path):
    glaive = json.loads(shared_path("data", "llamafactory", "glaive_toolcall_zh_demo.json").read_text())
    roles = {"human": "user", "gpt": "assistant", "observation": "tool", "function_call": "assistant"}
    lines = [json.dumps({"messages": [{"role": roles[t["from"]], "content": t["value"]} for t in r["conversations"]]},
                        ensure_ascii=False) for r in glaive[:20]]
    path = tmp_path / "messages.jsonl"
    path.write_text("\n".join(lines) + "\n")
    loaded = load_conversations([path])
    assert loaded.files[0].format == "sharegpt" and loaded.files[0].kept == 20
    assert [m["role"] for m in loaded.conversations[0].messages][:2] == ["user", "assistant"]
    ads = load_conversations([shared_path("data", "advertisegen", "dev.json")], columns="prompt=content,response=summary",
                             max_samples=50)
    assert ads.files[0].format == "columns" and ads.files[0].kept == 50
    first = ads.conversations[0].messages
    assert first[0]["content"].startswith("类型#上衣") and first[1]["role"] == "assistant"


# ---- label masks, token by token, with the real Llama-3 and Qwen2 tokenizers ---------------------------------


@pytest.fixture(scope="module", params=["llama3", "qwen2"])
def real(request):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(shared_path("tokenizers", request.param))
    return tokenizer, resolve_template("auto", tokenizer, request.param)


def test_alpaca_labels_mask_the_prompt_and_learn_answer_and_end_of_turn(real):
    tokenizer, template = real
    conversations = load_conversations([shared_path("data", "llamafactory", "alpaca_zh_demo.json")],
                                       max_samples=5).conversations
    encoded = encode_all(conversations, template, tokenizer, cutoff_len=4096)
    for conversation, example in zip(conversations, encoded.examples):
        messages = conversation.messages
        reference = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True,
                                               return_dict=False)
        ids, labels = example["input_ids"], example["labels"]
        assert ids == reference[: len(ids)] and ids[: len(prompt)] == prompt
        assert ids[-1] == template.eot_id  # ChatML's trailing "\n" glue is not part of the example
        for position, (token, label) in enumerate(zip(ids, labels)):
            assert label == (IGNORE if position < len(prompt) else token), position
        answer = tokenizer.decode(ids[len(prompt):-1])
        assert answer == messages[-1]["content"].strip()
    on_prompt = encode_all(conversations, template, tokenizer, cutoff_len=4096, train_on_prompt=True)
    assert all(e["labels"] == e["input_ids"] for e in on_prompt.examples)


def test_every_assistant_turn_is_learned_in_multi_turn_tool_conversations(real):
    tokenizer, template = real
    conversation = load_conversations([shared_path("data", "llamafactory", "glaive_toolcall_zh_demo.json")],
                                      max_samples=1).conversations[0]  # human, function_call, observation, gpt
    (example,) = encode_all([conversation], template, tokenizer, cutoff_len=4096).examples
    ids, labels = example["input_ids"], example["labels"]
    spans, current = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE:
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    spans.append(current)
    assistants = [m for m in conversation.messages if m["role"] == "assistant"]
    assert len(spans) == len(assistants) == 2
    assert all(span[-1] == template.eot_id for span in spans)
    assert "generate_invoice" in tokenizer.decode(spans[0])  # the function call is learned
    assert tokenizer.decode(spans[1][:-1]).strip() == assistants[1]["content"].strip()
    learned = tokenizer.decode([t for t, label in zip(ids, labels) if label != IGNORE])
    assert "INV12345" not in learned.split("发票已成功生成")[0]  # the tool's answer is prompt, not learned


def test_truncation_keeps_the_end_of_turn_token(real):
    tokenizer, template = real
    conversations = load_conversations([shared_path("data", "llamafactory", "alpaca_en_demo.json")],
                                       max_samples=20).conversations
    encoded = encode_all(conversations, template, tokenizer, cutoff_len=48)
    assert encoded.truncated > 0
    for example in encoded.examples:
        assert len(example["input_ids"]) <= 48
        assert example["input_ids"][-1] == example["labels"][-1] == template.eot_id
        assert sum(label != IGNORE for label in example["labels"]) >= 2


def test_default_template_ends_answers_with_eos(real):
    tokenizer, _ = real
    template = resolve_template("default", tokenizer, "base")
    assert template.eot_id == tokenizer.eos_token_id
    conversation = load_conversations([shared_path("data", "llamafactory", "identity.json")],
                                      max_samples=1).conversations[0]
    (example,) = encode_all([conversation], template, tokenizer, cutoff_len=256).examples
    learned = [t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE]
    assert tokenizer.decode(learned) == conversation.messages[-1]["content"] + tokenizer.eos_token + "\n"


# ---- several processes --------------------------------------------------------------------------------------


def test_launch_commands_use_the_shipped_configs():
    from workbench.train.launch import config_file, launch_command

    for strategy in ("ddp", "fsdp", "zero2", "zero3"):
        command = launch_command(["train", "--base", "m"], 4, strategy)
        assert command[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
        assert command[command.index("--num_processes") + 1] == "4"
        assert str(config_file(strategy)) in command and config_file(strategy).is_file()
        assert command[command.index("-m", 3):] == ["-m", "workbench", "train", "--base", "m"]
    assert "--use_deepspeed" in launch_command(["train"], 2, "zero3")
    zero3 = json.loads(config_file("zero3").read_text())["zero_optimization"]
    assert zero3["stage"] == 3 and zero3["stage3_gather_16bit_weights_on_model_save"] is True
    assert "fsdp_state_dict_type: FULL_STATE_DICT" in config_file("fsdp").read_text()


def test_child_arguments_reproduce_the_command_without_nproc():
    from workbench.train.launch import child_args

    command = wb.commands["train"]
    given = ["--base", "m", "--data", "a.json,b.json", "--out", "o", "--nproc", "2", "--strategy", "zero2",
             "--lora-r", "4", "--train-on-prompt", "--max-samples", "7"]
    params = command.make_context("train", list(given)).params
    child = child_args(command, params, debug=True)
    assert child[:2] == ["--debug", "train"] and "--nproc" not in child
    again = command.make_context("train", child[2:]).params
    assert again == {**params, "nproc": None}


def test_an_empty_adapter_is_refused(tmp_path):
    from safetensors.torch import save_file

    from workbench.train.run import _check_adapter

    save_file({"base_model.model.layers.0.q_proj.lora_A.weight": torch.zeros(0)}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(WorkbenchError, match="the saved adapter is empty"):
        _check_adapter(tmp_path)


@pytest.mark.slow
def test_two_processes_on_cpu_train_together_and_rank_0_writes(learn_model, learn_data, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = base_args(learn_model, learn_data, out, "--epochs", "1", "--batch-size", "2", "--grad-accum", "2",
                     "--save-steps", "100", "--device", "cpu", "--nproc", "2", "--strategy", "ddp")
    result = subprocess.run([sys.executable, "-m", "workbench", "train", *args], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "launching 2 processes (ddp)" in result.stderr
    assert result.stderr.count("world size 2, global batch 8 (batch 2 x grad-accum 2 x 2 processes)") == 1
    assert result.stdout.count("final loss") == 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 5  # 40 examples / global batch 8
    assert {p.name for p in (out / "checkpoints").iterdir()} == {"checkpoint-5"}
    assert len(read_log(out)) == 1 and read_log(out)[0]["step"] == 4
