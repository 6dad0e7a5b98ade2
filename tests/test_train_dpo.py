"""`wb train --stage dpo`: preference data, encoding, the five losses against trl's formulas, resume,
SFT -> DPO -> merge, the reference model, the report's margin chart and real data/tokenizers."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from clicheck import assert_one_error
from click.testing import CliRunner
from conftest import run_train, shared_path, train_args
from tiny import make_model, read_log

from workbench.cli import wb
from workbench.errors import WorkbenchError
from workbench.train.datasets import DataSource
from workbench.train.pref_data import encode_pairs, infer_seqlen, load_pairs
from workbench.train.templates import resolve_template

WORDS = ["Paris", "Rome", "four", "dress", "answer", "simple"]
pytestmark = pytest.mark.usefixtures("one_thread")


def alpaca_pairs() -> list[dict]:
    """LLaMA-Factory's alpaca preference format, learnable: chosen repeats the word, rejected is wrong."""
    return [{"instruction": f"Say {w}", "input": "", "chosen": f"{w} {w}", "rejected": "wrong wrong"} for w in WORDS] * 4


@pytest.fixture(scope="module")
def pref_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dpo-data") / "pref.json"
    path.write_text(json.dumps(alpaca_pairs()))
    return path


def dpo_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["--stage", "dpo", *train_args(model, data, out, "--lr", "1e-2", "--logging-steps", "1", *extra)]


@pytest.fixture(scope="module")
def trained(learn_model, pref_data, tmp_path_factory):
    """24 pairs: 20 train / 4 validation, batch 4 -> 5 steps an epoch x 2 epochs, sigmoid DPO."""
    out = tmp_path_factory.mktemp("dpo-run") / "out"
    result = run_train(*dpo_args(learn_model, pref_data, out, "--epochs", "2", "--val-size", "4", "--eval-steps", "5",
                                 "--save-steps", "5", "--json"))
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout), result.stderr


# ---- training ------------------------------------------------------------------------------------


def test_margin_and_accuracy_grow_on_a_learnable_set(trained):
    out, metrics, stderr = trained
    rows = read_log(out)
    assert [r["step"] for r in rows] == list(range(1, 11))
    first, last = rows[0], rows[-1]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)  # fresh LoRA: policy == reference
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert last["rewards/margins"] > first["rewards/margins"] + 1.0
    assert last["rewards/accuracies"] > first["rewards/accuracies"] and last["rewards/accuracies"] == 1.0
    for row in rows:
        assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "tokens_per_s",
                "elapsed_s"} <= set(row)
        assert row["rewards/margins"] == pytest.approx(row["rewards/chosen"] - row["rewards/rejected"], abs=1e-4)
    assert [r["step"] for r in rows if "eval_rewards/margins" in r] == [5, 10]
    assert metrics["rewards/margins"] == last["rewards/margins"]
    assert metrics["eval_rewards/margins"] == rows[-1]["eval_rewards/margins"]
    assert "preference loss sigmoid (trl DPOTrainer), beta 0.1; reference: the base with the adapter disabled" in stderr
    assert f"step 10/10  loss {last['loss']:.4f}  margin {last['rewards/margins']:.4f}  accuracy 1.00" in stderr
    assert "20 train, 4 validation" in stderr and "Warning" not in stderr


def test_outputs_are_one_adapter_and_no_model_card(trained):
    out, _, _ = trained
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "metrics.json", "loss.svg"} <= names
    assert "ref" not in names and "README.md" not in names  # no second adapter, no trl card
    assert {p.name for p in (out / "checkpoints").iterdir()} == {"checkpoint-5", "checkpoint-10"}
    from safetensors import safe_open

    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        assert all(".ref." not in k for k in f.keys())


def test_report_plots_the_margin_beside_the_loss(trained):
    from workbench.report.load import load_train_run
    from workbench.report.sections import training_section

    out, _, _ = trained
    section = training_section(load_train_run(out))
    assert section.chart is not None and section.margins is not None
    svg = ET.fromstring(str(section.margins))
    lines = [e for e in svg.iter() if e.tag.split("}")[-1] == "polyline"]
    circles = [e for e in svg.iter() if e.tag.split("}")[-1] == "circle"]
    rows = read_log(out)
    evals = [r for r in rows if "eval_rewards/margins" in r]
    assert [len(line.get("points").split()) for line in lines] == [len(rows), len(evals)]
    titles = [c.find("title").text for c in circles]
    assert titles == [f"eval margin at {r['step']}: {r['eval_rewards/margins']:g}" for r in rows
                      if "eval_rewards/margins" in r]
    texts = "".join(svg.itertext())
    assert "train margin" in texts and "reward margin" in texts


def test_no_second_model_copy_and_the_reference_is_the_disabled_adapter(learn_model, pref_data, tmp_path):
    from workbench.train import run as runmod

    run = runmod._resolve(dict(base=str(learn_model), data=[str(pref_data)], out=tmp_path / "o", **_options()))
    data = runmod.load_data(run)
    model = runmod.build_model(run, data)
    trainer = model.trainer
    assert trainer.ref_model is None and list(trainer.model.peft_config) == ["default"]
    base_params = sum(p.numel() for p in make_model(trainer.model.config.vocab_size).parameters())
    in_memory = sum(p.numel() for p in trainer.model.parameters())
    assert in_memory == base_params + model.trainable  # the base once, the LoRA weights once
    assert model.trainable == trainer.model.get_nb_trainable_parameters()[0]
    batch = trainer.data_collator(data.train[:2])
    # the ids trl feeds the model are wb's: prompt + answer, completion mask on the answer only
    for row, example in enumerate(data.train[:2]):
        for half, key in ((0, "chosen_ids"), (2, "rejected_ids")):
            ids = example["prompt_ids"] + example[key]
            got = batch["input_ids"][row + half // 2 * 2][: len(ids)].tolist()
            assert got == ids
            mask = batch["completion_mask"][row + half // 2 * 2][: len(ids)].tolist()
            assert mask == [0] * len(example["prompt_ids"]) + [1] * len(example[key])


def _options(**changes) -> dict:
    import inspect

    from workbench.train.run import train

    defaults = {name: p.default for name, p in inspect.signature(train).parameters.items()
                if p.default is not inspect.Parameter.empty}
    defaults.update(stage="dpo", cutoff_len=64, batch_size=4, grad_accum=1, epochs=1, command=None, **changes)
    return defaults


# ---- the five losses: first-step loss = trl's formula on the base's log-probs ------------------


def _answer_logps(model_dir: Path, examples: list[dict], mean: bool) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Per-example log-prob of each answer under the base (sum or mean over its tokens), and the NLL of
    the whole chosen sequences (trl ORPO's NLL term: prompt included)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    out = {"chosen_ids": [], "rejected_ids": []}
    nll_sum, nll_count = 0.0, 0
    with torch.no_grad():
        for e in examples:
            for key in out:
                ids = torch.tensor([e["prompt_ids"] + e[key]])
                logp = F.log_softmax(model(ids).logits[0, :-1].float(), -1).gather(1, ids[0, 1:, None])[:, 0]
                answer = logp[len(e["prompt_ids"]) - 1:]
                out[key].append(answer.mean() if mean else answer.sum())
                if key == "chosen_ids":
                    nll_sum, nll_count = nll_sum - logp.sum().item(), nll_count + logp.numel()
    return torch.stack(out["chosen_ids"]), torch.stack(out["rejected_ids"]), nll_sum / nll_count


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "hinge", "orpo", "simpo"])
def test_each_loss_trains_and_its_first_step_is_trls_formula(loss, learn_model, tmp_path, tiny_tokenizer):
    data = tmp_path / "pref.json"
    data.write_text(json.dumps(alpaca_pairs()[:4]))  # one batch of 4: the first step sees every pair
    out = tmp_path / "out"
    result = run_train(*dpo_args(learn_model, data, out, "--pref-loss", loss, "--epochs", "2", "--pref-beta", "0.2",
                                 "--simpo-gamma", "0.3", "--warmup-ratio", "0", "--lr", "2e-3", "--json"))
    assert result.exit_code == 0, result.output
    rows = read_log(out)
    assert [r["step"] for r in rows] == [1, 2]
    from workbench.train.pref_data import encode_pairs as encode

    chat = resolve_template("auto", tiny_tokenizer, "tiny")
    examples = encode(load_pairs([DataSource(data)]).pairs, chat, tiny_tokenizer, 64).examples
    beta, gamma = 0.2, 0.3
    if loss in ("sigmoid", "hinge"):  # fresh LoRA: policy == reference, every log ratio is 0
        expected = math.log(2) if loss == "sigmoid" else 1.0
    elif loss == "ipo":
        expected = (1 / (2 * beta)) ** 2
    else:
        chosen, rejected, nll = _answer_logps(learn_model, examples, mean=True)
        if loss == "orpo":
            log_odds = (chosen - rejected) - (torch.log1p(-chosen.exp()) - torch.log1p(-rejected.exp()))
            expected = nll - beta * F.logsigmoid(log_odds).mean().item()
        else:
            expected = (-F.logsigmoid(beta * (chosen - rejected) - gamma)).mean().item()
        assert rows[0]["rewards/margins"] == pytest.approx(beta * (chosen - rejected).mean().item(), rel=1e-3)
    assert rows[0]["loss"] == pytest.approx(expected, rel=1e-3, abs=1e-4)
    assert rows[1]["loss"] < rows[0]["loss"]


# ---- resume, SFT -> DPO -> merge ----------------------------------------------------------------


def test_a_dpo_run_resumes_and_continues_the_step_count(learn_model, pref_data, tmp_path):
    out = tmp_path / "out"
    first = run_train(*dpo_args(learn_model, pref_data, out, "--epochs", "1", "--save-steps", "3",
                                "--logging-steps", "2"))
    assert first.exit_code == 0, first.output
    again = run_train(*dpo_args(learn_model, pref_data, out, "--epochs", "2", "--resume", "--logging-steps", "2",
                                "--json"))
    assert again.exit_code == 0, again.output
    metrics = json.loads(again.stdout)
    assert metrics["resumed_from"] == "checkpoint-6" and metrics["steps"] == 12
    rows = read_log(out)
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 10, 12]
    assert all("rewards/margins" in r for r in rows) and rows[3]["elapsed_s"] > rows[2]["elapsed_s"]
    assert "resuming after step 6" in again.stderr


def test_sft_then_dpo_from_the_adapter_is_one_adapter_that_merges(learn_model, pref_data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    sft_data = tmp_path / "sft.json"
    sft_data.write_text(json.dumps([{"instruction": f"Say {w}", "input": "", "output": f"{w} {w}"} for w in WORDS] * 2))
    sft = tmp_path / "sft"
    result = run_train(*train_args(learn_model, sft_data, sft, "--lr", "1e-2", "--epochs", "1"))
    assert result.exit_code == 0, result.output
    dpo = tmp_path / "dpo"
    data = tmp_path / "pref.json"
    data.write_text(json.dumps(alpaca_pairs()[:4]))
    result = run_train(*dpo_args(learn_model, data, dpo, "--adapter", str(sft), "--epochs", "1"))
    assert result.exit_code == 0, result.output
    # the first loss is trl's sigmoid on the SFT adapter (policy) against the base (reference)
    from workbench.train.pref_data import encode_pairs as encode
    from workbench.train.templates import resolve_template as resolve

    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(learn_model)
    examples = encode(load_pairs([DataSource(data)]).pairs, resolve("auto", tokenizer, "t"), tokenizer, 64).examples
    base_c, base_r, _ = _answer_logps(learn_model, examples, mean=False)
    merged_sft = tmp_path / "sft-merged"
    assert CliRunner().invoke(wb, ["merge", "--base", str(learn_model), "--adapter", str(sft), "--out",
                                   str(merged_sft)]).exit_code == 0
    pol_c, pol_r, _ = _answer_logps(merged_sft, examples, mean=False)
    expected = (-F.logsigmoid(0.1 * ((pol_c - base_c) - (pol_r - base_r)))).mean().item()
    assert read_log(dpo)[0]["loss"] == pytest.approx(expected, rel=1e-3)
    assert read_log(dpo)[0]["rewards/margins"] != pytest.approx(0.0, abs=1e-3)
    # one adapter, which wb merge merges into the model PeftModel(base, adapter) computes
    merged = tmp_path / "merged"
    result = CliRunner().invoke(wb, ["merge", "--base", str(learn_model), "--adapter", str(dpo), "--out", str(merged)])
    assert result.exit_code == 0, result.output
    ids = torch.tensor([examples[0]["prompt_ids"] + examples[0]["chosen_ids"]])
    with torch.no_grad():
        expected_logits = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(learn_model), dpo)(ids).logits
        got = AutoModelForCausalLM.from_pretrained(merged)(ids).logits
    torch.testing.assert_close(got, expected_logits, atol=1e-4, rtol=1e-4)


# ---- data formats, bad records, encoding ---------------------------------------------------------


def test_the_formats_give_the_same_pairs(tmp_path):
    alpaca = tmp_path / "a.json"
    alpaca.write_text(json.dumps([{"instruction": "Say A", "input": "now", "system": "Be brief",
                                   "history": [["Hi", "Hello"]], "chosen": "A", "rejected": "B"}]))
    sharegpt = tmp_path / "s.json"
    sharegpt.write_text(json.dumps([{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
                                                       {"from": "human", "value": "Say A\nnow"}],
                                     "system": "Be brief", "chosen": {"from": "gpt", "value": "A"},
                                     "rejected": {"from": "gpt", "value": "B"}}]))
    pairs = tmp_path / "p.jsonl"
    prompt = [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Say A\nnow"}]
    pairs.write_text(json.dumps({"prompt": prompt, "chosen": [{"role": "assistant", "content": "A"}],
                                 "rejected": "B"}) + "\n")
    loaded = load_pairs([DataSource(alpaca), DataSource(sharegpt), DataSource(pairs)])
    assert [f.format for f in loaded.files] == ["alpaca", "sharegpt", "pairs"]
    first = loaded.pairs[0]
    assert first.prompt == prompt and first.chosen == {"role": "assistant", "content": "A"}
    assert all(p == first for p in loaded.pairs)


def test_bad_records_are_dropped_and_named_by_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = [{"prompt": "Q", "chosen": "A", "rejected": "B"}, {"prompt": "Q", "chosen": "A"},
             {"prompt": "Q", "chosen": "same", "rejected": "same"}, {"prompt": "Q", "chosen": 3, "rejected": "B"}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n" + json.dumps(lines[1]) + "\n")
    loaded = load_pairs([DataSource(path)])
    assert len(loaded.pairs) == 1
    assert loaded.files[0].dropped == {f"missing chosen/rejected (first: {path}:2)": 2,
                                       f"chosen equals rejected (first: {path}:3)": 1,
                                       f"chosen/rejected is neither text nor a list of messages (first: {path}:4)": 1}
    bad = tmp_path / "broken.jsonl"
    bad.write_text(json.dumps(lines[0]) + "\n[1, 2]\n")
    with pytest.raises(WorkbenchError, match="must be an object") as info:
        load_pairs([DataSource(bad)])
    assert info.value.path == f"{bad}:2"


def test_cli_errors_are_one_line(learn_model, tmp_path):
    empty = tmp_path / "same.json"
    empty.write_text(json.dumps([{"instruction": "Q", "input": "", "chosen": "x", "rejected": "x"}]))
    assert_one_error(run_train(*dpo_args(learn_model, empty, tmp_path / "o")), "chosen equals rejected")
    good = tmp_path / "good.json"
    good.write_text(json.dumps(alpaca_pairs()[:4]))
    assert_one_error(run_train(*dpo_args(learn_model, good, tmp_path / "o", "--init", "pissa")), "--init pissa")
    assert_one_error(run_train(*dpo_args(learn_model, good, tmp_path / "o", "--train-on-prompt")), "--stage sft")


def test_truncation_cuts_the_prompt_first_and_keeps_both_end_of_turn_tokens(tiny_tokenizer):
    from workbench.train.pref_data import Pair

    chat = resolve_template("auto", tiny_tokenizer, "tiny")
    long_prompt = " ".join(["Paris"] * 40)
    pair = Pair([{"role": "user", "content": long_prompt}], {"role": "assistant", "content": "Rome Rome"},
                {"role": "assistant", "content": " ".join(["wrong"] * 30)})
    full = encode_pairs([pair], chat, tiny_tokenizer, 1000).examples[0]
    cut = encode_pairs([pair], chat, tiny_tokenizer, 32)
    example = cut.examples[0]
    assert cut.truncated == 1
    assert len(example["prompt_ids"]) + max(len(example["chosen_ids"]), len(example["rejected_ids"])) <= 32
    for key in ("chosen_ids", "rejected_ids"):
        assert example[key][-1] == chat.eot_id
    header = tiny_tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert example["prompt_ids"][-len(header):] == header
    assert example["chosen_ids"] == full["chosen_ids"]  # short enough: kept whole
    source, target = infer_seqlen(len(full["prompt_ids"]) - len(header), len(full["rejected_ids"]), 32 - len(header))
    assert len(example["prompt_ids"]) == source + len(header) and len(example["rejected_ids"]) == target


@pytest.mark.parametrize("name", ["llama3", "qwen2"])
def test_real_tokenizers_prompt_ids_are_the_generation_prompt(name):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(shared_path("tokenizers", name))
    chat = resolve_template("auto", tokenizer, name)
    data = shared_path("data", "llamafactory", "dpo_zh_demo.json")
    records = json.loads(data.read_text())[:6]
    loaded = load_pairs([DataSource(data, formatting="sharegpt", columns={"messages": "conversations",
                                                                            "chosen": "chosen", "rejected": "rejected"})], max_samples=6)
    encoded = encode_pairs(loaded.pairs, chat, tokenizer, 128)
    assert len(encoded.examples) == len(records) and encoded.truncated >= 1
    for pair, example in zip(loaded.pairs, encoded.examples):
        rendered = tokenizer.apply_chat_template(pair.prompt, tokenize=False, add_generation_prompt=True)
        before = tokenizer.apply_chat_template(pair.prompt, tokenize=False, add_generation_prompt=False)
        header = tokenizer(rendered[len(before):], add_special_tokens=False)["input_ids"]
        assert len(header) >= 3 and example["prompt_ids"][-len(header):] == header  # the header survives the cut
        assert len(example["prompt_ids"]) + max(len(example["chosen_ids"]), len(example["rejected_ids"])) <= 128
        assert example["chosen_ids"][-1] == chat.eot_id and example["rejected_ids"][-1] == chat.eot_id
    untruncated = encode_pairs(loaded.pairs, chat, tokenizer, 100000).examples[0]
    rendered = tokenizer.apply_chat_template(loaded.pairs[0].prompt, tokenize=False, add_generation_prompt=True)
    assert untruncated["prompt_ids"] == tokenizer(rendered, add_special_tokens=False)["input_ids"]


def test_dpo_zh_demo_by_name_through_the_dataset_dir(learn_model, tmp_path):
    folder = shared_path("data", "llamafactory")
    out = tmp_path / "out"
    result = run_train(*dpo_args(learn_model, Path("dpo_zh_demo"), out, "--dataset-dir", str(folder), "--max-samples",
                                 "8", "--epochs", "1", "--json"))
    assert result.exit_code == 0, result.output
    args = json.loads((out / "train_args.json").read_text())
    assert args["data"]["files"][0]["format"] == "sharegpt" and args["data"]["kept"] == 8
    assert json.loads(result.stdout)["steps"] == 2
    assert_one_error(run_train(*dpo_args(learn_model, Path("alpaca_zh_demo"), tmp_path / "o2", "--dataset-dir",
                                         str(folder))), "not a preference dataset")


def test_llamafactory_dpo_yaml_runs_through_config(learn_model, tmp_path):
    import yaml

    folder = shared_path("data", "llamafactory")
    config = yaml.safe_load((folder / "examples" / "qwen3_lora_dpo.yaml").read_text())
    config.update(model_name_or_path=str(learn_model), dataset="dpo_zh_demo", dataset_dir=str(folder),
                  output_dir=str(tmp_path / "out"))  # paths (and the demo set that is here) only
    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    result = run_train("--config", str(path), "--max-samples", "8", "--epochs", "1", "--batch-size", "4",
                       "--grad-accum", "1", "--cutoff-len", "64", "--dtype", "fp32", "--logging-steps", "1",
                       "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["steps"] == 2
    options = json.loads((tmp_path / "out" / "train_args.json").read_text())["options"]
    assert (options["stage"], options["pref_loss"], options["pref_beta"]) == ("dpo", "sigmoid", 0.1)
    assert "rewards/margins" in read_log(tmp_path / "out")[0]
