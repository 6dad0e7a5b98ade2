"""`wb eval`: local MMLU/C-Eval/CMMLU tasks against lm-eval's own, ROUGE/BLEU, generation, RESULTS.json.

The benchmark runs use the real mini subsets in ../shared/data and the tiny 2-layer model, with few
questions per subject (`limit`) except one full C-Eval run; the scores are meaningless, the
bookkeeping (subjects, counts, groups, files) is what is checked.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import pytest
from clicheck import assert_one_error
from click.testing import CliRunner
from conftest import shared_path

from workbench.cli import wb
from workbench.errors import WorkbenchError
from workbench.evals.gendata import load_gen_data
from workbench.evals.genmetrics import bleu_tokens, score, summarize
from workbench.evals.layouts import BENCHMARKS, open_local
from workbench.evals.run import LM_EVAL_KEYS, evaluate

MINI = {"mmlu": "mmlu-mini", "ceval": "ceval-mini", "cmmlu": "cmmlu-mini"}
CONTRACT_KEYS = ["wb_results_version", "name", *LM_EVAL_KEYS, "generation", "samples_file", "provenance"]


def mini(name: str) -> Path:
    return shared_path("data", MINI[name])


def csv_rows(path: Path, header: bool) -> int:
    with path.open(encoding="utf-8-sig", newline="") as handle:
        return sum(1 for row in csv.reader(handle) if row) - int(header)


def expected_rows(name: str) -> dict[str, int]:
    """{lm-eval task name: questions in its eval split}, counted straight from the CSV files."""
    folder = open_local(str(mini(name)))
    benchmark = folder.benchmark
    prefix = "ceval-valid" if name == "ceval" else name
    return {
        f"{prefix}_{subject}": csv_rows(folder.path(subject, benchmark.eval_split), bool(benchmark.headers))
        for subject in folder.subjects
    }


def leaf_tasks(results: dict, name: str) -> list[str]:
    children = results["group_subtasks"].get(name)
    if children is None:
        return [name]
    return [leaf for child in children for leaf in leaf_tasks(results, child)]


def check_groups(results: dict, group: str, metrics: tuple[str, ...]) -> None:
    """`group` and its subgroups score the size-weighted mean of their subjects (lm-eval's weight_by_size)."""
    leaves = leaf_tasks(results, group)
    sizes = [results["n-samples"][leaf]["effective"] for leaf in leaves]
    for metric in metrics:
        values = [results["results"][leaf][f"{metric},none"] for leaf in leaves]
        expected = sum(v * n for v, n in zip(values, sizes)) / sum(sizes)
        assert results["groups"][group][f"{metric},none"] == pytest.approx(expected, abs=1e-12), group
        assert 0.0 <= results["groups"][group][f"{metric},none"] <= 1.0
    for child in results["group_subtasks"][group]:
        if child in results["group_subtasks"]:
            check_groups(results, child, metrics)


def write_csv(path: Path, rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as handle:
        csv.writer(handle).writerows(rows)
    return path


# -- ROUGE / BLEU ----------------------------------------------------------------------------------
def test_rouge_bleu_check_values():
    assert score("今天天气很好", "今天天气不错") == {"rouge-1": 40.0, "rouge-2": 0.0, "rouge-l": 40.0, "bleu-4": 50.8133}


@pytest.mark.parametrize("text", ["这条黑色条纹裙简约大方，穿上显瘦。", "The capital of France is Paris, and Rome is in Italy."])
def test_identical_texts_score_100(text):
    assert score(text, text) == {"rouge-1": 100.0, "rouge-2": 100.0, "rouge-l": 100.0, "bleu-4": 100.0}


@pytest.mark.parametrize(("prediction", "reference"), [("今天天气很好", "我们去公园散步吧"), ("red green blue", "one two three"), ("", "今天天气不错")])
def test_disjoint_or_empty_prediction_scores_0(prediction, reference):
    assert score(prediction, reference) == {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0, "bleu-4": 0.0}


def test_english_is_scored_by_words():
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    prediction, reference = "the cat sat on my mat today", "the cat sat on a mat today"
    assert bleu_tokens(prediction, cjk=False) == prediction.split()
    expected = sentence_bleu([reference.split()], prediction.split(), smoothing_function=SmoothingFunction().method3)
    scores = score(prediction, reference)
    assert scores["bleu-4"] == round(expected * 100, 4)
    assert scores["rouge-1"] == pytest.approx(100 * 6 / 7, abs=1e-4)  # 6 of 7 words shared


def test_summary_is_mean_and_standard_error():
    means, errors = summarize([score("今天天气很好", "今天天气不错"), score("今天天气很好", "今天天气很好")])
    assert means == {"rouge-1": 70.0, "rouge-2": 50.0, "rouge-l": 70.0, "bleu-4": 75.4066}
    assert errors["rouge-1"] == pytest.approx(30.0) and errors["bleu-4"] == pytest.approx(24.5934, abs=1e-4)


# -- generation data -------------------------------------------------------------------------------
def test_gen_data_alpaca_and_advertisegen(tmp_path):
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([
        {"instruction": "Translate", "input": "hello", "output": "你好", "system": "Be brief.", "history": [["hi", "hey"]]},
        {"instruction": "Say four", "input": "", "output": "four"},
    ]), encoding="utf-8")
    first, second = load_gen_data(alpaca)
    assert (first.prompt, first.reference, second.prompt) == ("Translate\nhello", "你好", "Say four")
    assert [m["role"] for m in first.messages()] == ["system", "user", "assistant", "user"]
    ads = load_gen_data(shared_path("data", "advertisegen", "dev.json"))
    assert len(ads) == 800 and ads[0].prompt.startswith("类型#上衣") and ads[0].reference.startswith("简约而不简单")


def test_gen_data_errors_name_the_record(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"content": "a", "summary": "b"}\n{"question": "x"}\n', encoding="utf-8")
    with pytest.raises(WorkbenchError, match="alpaca record") as err:
        load_gen_data(bad)
    assert err.value.path.endswith("bad.jsonl:2")
    bad.write_text('{"content": "a", "summary": "b"}\nnot json\n', encoding="utf-8")
    with pytest.raises(WorkbenchError, match="not a JSON line"):
        load_gen_data(bad)


def test_batched_generation_equals_one_prompt_at_a_time(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workbench.evals.generate import generate

    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_model), AutoTokenizer.from_pretrained(tiny_model)
    items = load_gen_data(shared_path("data", "advertisegen", "dev.json"))[:6]
    prompts = [tokenizer.apply_chat_template(i.messages(), tokenize=False, add_generation_prompt=True) for i in items]
    batched = generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=4, add_special_tokens=False)
    single = generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=1, add_special_tokens=False)
    assert batched.texts == single.texts and batched.new_tokens == single.new_tokens > 0


# -- local layouts ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MINI))
def test_layout_is_detected_and_read_with_csv(name):
    folder = open_local(str(mini(name)))
    assert folder.benchmark.name == name and folder.given == mini(name).resolve()
    for subject in folder.subjects:
        splits = folder.read(subject)
        for split in folder.benchmark.splits:
            rows = csv_rows(folder.path(subject, split), bool(folder.benchmark.headers))
            assert len(splits[split.key]) == rows


def test_documents_have_the_hub_datasets_schema():
    mmlu = open_local(str(mini("mmlu"))).read("abstract_algebra")["dev"][0]
    assert mmlu == {"question": "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.", "subject": "abstract_algebra",
                    "choices": ["0", "1", "2", "3"], "answer": 1}
    ceval = open_local(str(mini("ceval"))).read("law")["val"][0]
    assert list(ceval) == ["id", "question", "A", "B", "C", "D", "answer", "explanation"]
    assert (ceval["id"], ceval["answer"], ceval["explanation"], ceval["C"]) == (0, "C", "", "类比推理是判例法国家运用的一种基本的法律推理方法")
    cmmlu = open_local(str(mini("cmmlu"))).read("agronomy")["test"][0]
    assert cmmlu == {"Question": "在农业生产中被当作极其重要的劳动对象发挥作用，最主要的不可替代的基本生产资料是",
                     "A": "农业生产工具", "B": "土地", "C": "劳动力", "D": "资金", "Answer": "B"}


def test_mmlu_without_data_folder(tmp_path):
    """LLaMA-Factory unpacks MMLU without the `data/` level."""
    for split in ("dev", "test"):
        (tmp_path / split).symlink_to(mini("mmlu") / "data" / split)
    folder = open_local(str(tmp_path))
    assert folder.benchmark.name == "mmlu" and folder.root == tmp_path.resolve() and len(folder.subjects) == 4


def test_bad_layouts_fail_clearly(tmp_path):
    good = ["What?", "a", "b", "c", "d", "A"]
    write_csv(tmp_path / "m" / "data" / "test" / "anatomy_test.csv", [good, good, ["What?", "a", "b", "c", "A"]])
    write_csv(tmp_path / "m" / "data" / "dev" / "anatomy_dev.csv", [good])
    with pytest.raises(WorkbenchError, match="expected 6 columns, found 5") as err:
        open_local(f"mmlu={tmp_path / 'm'}").read("anatomy")
    assert err.value.path.endswith("anatomy_test.csv:3")

    write_csv(tmp_path / "m" / "data" / "test" / "anatomy_test.csv", [good, ["Why?", "a", "b", "c", "d", "E"]])
    with pytest.raises(WorkbenchError, match="answer 'E' is not one of A, B, C, D") as err:
        open_local(f"mmlu={tmp_path / 'm'}").read("anatomy")
    assert err.value.path.endswith("anatomy_test.csv:2")

    write_csv(tmp_path / "m" / "data" / "test" / "virology_test.csv", [good])
    with pytest.raises(WorkbenchError, match="subject 'virology' has no dev split"):
        open_local(f"mmlu={tmp_path / 'm'}")

    write_csv(tmp_path / "c" / "val" / "law_val.csv", [["id", "question", "A", "B", "C", "D"], ["0", "q", "a", "b", "c", "d"]])
    write_csv(tmp_path / "c" / "dev" / "law_dev.csv", [["id", "question", "A", "B", "C", "D", "answer"]])
    with pytest.raises(WorkbenchError, match="header is") as err:
        open_local(f"ceval={tmp_path / 'c'}").read("law")
    assert err.value.path.endswith("law_val.csv:1")

    (tmp_path / "empty" / "test").mkdir(parents=True)
    with pytest.raises(WorkbenchError, match="no subjects found"):
        open_local(f"cmmlu={tmp_path / 'empty'}")
    with pytest.raises(WorkbenchError, match="missing split 'val'"):
        open_local(f"ceval={tmp_path / 'empty'}")
    with pytest.raises(WorkbenchError, match="cannot tell which benchmark"):
        open_local(str(tmp_path / "empty"))
    with pytest.raises(WorkbenchError, match="unknown benchmark 'gsm8k'"):
        open_local(f"gsm8k={tmp_path / 'empty'}")


# -- tasks against lm-eval's own -------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MINI))
def test_prompts_identical_to_lm_eval_builtin_tasks(name):
    """Every local question renders exactly as lm-eval's built-in task config (YAML, no data) renders it."""
    from lm_eval.utils import apply_template

    from workbench.evals.tasks import load_tasks, task_manager

    folder = open_local(str(mini(name)))
    (group,) = load_tasks([BENCHMARKS[name].group], {name: folder}, None)
    index = task_manager(False).task_index
    tasks = group.get_all_tasks()
    assert sorted(t.task_name for t in tasks) == sorted(expected_rows(name))
    for task in tasks:
        builtin = index[task.task_name].cfg  # lm-eval's YAML with its includes, nothing downloaded
        assert task.config.description == builtin["description"] and task.config.fewshot_split == builtin["fewshot_split"]
        assert task.config.fewshot_config.sampler == builtin["fewshot_config"]["sampler"] == "first_n"
        assert [m["metric"] for m in task.config.metric_list] == [m["metric"] for m in builtin["metric_list"]]
        assert task.get_config("num_fewshot") == 5
        for doc in task.eval_docs:
            assert task.doc_to_text(doc) == apply_template(builtin["doc_to_text"], doc)
            assert task.doc_to_choice(doc) == builtin["doc_to_choice"] == ["A", "B", "C", "D"]
            target = builtin["doc_to_target"]
            expected = doc[target] if target in doc else int(apply_template(target, doc))
            assert task.doc_to_target(doc) == expected


def test_fewshot_context_is_lm_eval_mmlu_prompt():
    from workbench.evals.tasks import load_tasks

    (task,) = load_tasks(["mmlu_abstract_algebra"], {"mmlu": open_local(str(mini("mmlu")))}, None)
    doc = task.eval_docs[0]
    assert task.fewshot_context(doc, 1) == (
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
        "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\nA. 0\nB. 1\nC. 2\nD. 3\nAnswer: B\n\n"
        "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.\n"
        "A. 0\nB. 4\nC. 2\nD. 6\nAnswer:"
    )


def test_unknown_task_and_missing_subject(tmp_path, tiny_model):
    with pytest.raises(WorkbenchError, match="unknown task 'mmlu_astrology'; did you mean"):
        evaluate(tiny_model, tasks=["mmlu_astrology"], out=tmp_path / "R.json")
    with pytest.raises(WorkbenchError, match="mmlu_anatomy: none of its subjects is in the folder"):
        evaluate(tiny_model, tasks=["mmlu_anatomy"], data_dir=[str(mini("mmlu"))], out=tmp_path / "R.json")
    with pytest.raises(WorkbenchError, match="6 few-shot examples asked for, the dev split has 5") as err:
        evaluate(tiny_model, tasks=["mmlu_nutrition"], data_dir=[str(mini("mmlu"))], num_fewshot=6, out=tmp_path / "R.json")
    assert err.value.path.endswith("nutrition_dev.csv")
    with pytest.raises(WorkbenchError, match="--data-dir ceval is given but no ceval task"):
        evaluate(tiny_model, tasks=["mmlu"], data_dir=[str(mini("mmlu")), str(mini("ceval"))], out=tmp_path / "R.json")
    assert not list(tmp_path.iterdir())


# -- end to end on the tiny model ------------------------------------------------------------------
def test_three_benchmarks_from_local_files(tmp_path, tiny_model):
    out = tmp_path / "R.json"
    results = evaluate(tiny_model, data_dir=[str(mini("mmlu")), f"ceval={mini('ceval')}", str(mini("cmmlu"))],
                       limit=3, out=out)
    assert list(results) == CONTRACT_KEYS and json.loads(out.read_text()) == results
    assert results["provenance"]["settings"]["tasks"] == ["mmlu", "ceval-valid", "cmmlu"]
    expected = {task: rows for name in MINI for task, rows in expected_rows(name).items()}
    assert {t for t in results["n-samples"]} == set(expected)
    for task, rows in expected.items():
        assert results["n-samples"][task] == {"original": rows, "effective": 3}
        assert results["n-shot"][task] == 5
        assert 0.0 <= results["results"][task]["acc,none"] <= 1.0
    assert results["group_subtasks"]["mmlu"] == ["mmlu_stem", "mmlu_other", "mmlu_social_sciences", "mmlu_humanities"]
    assert results["n-shot"]["mmlu"] == 5 and results["higher_is_better"]["mmlu"] == {"acc": True}
    check_groups(results, "mmlu", ("acc",))
    check_groups(results, "ceval-valid", ("acc", "acc_norm"))
    check_groups(results, "cmmlu", ("acc", "acc_norm"))
    samples = [json.loads(line) for line in (tmp_path / "R.samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 * len(expected) and results["samples_file"] == "R.samples.jsonl"
    assert all(len(s["doc_hash"]) == 64 and s["choice"] in range(4) and s["acc"] in (0.0, 1.0) for s in samples)
    assert results["generation"] is None and results["provenance"]["device"] == "cpu"
    assert results["provenance"]["model_files"].keys() == {"model.safetensors"}


def test_custom_subjects_scored_as_mmlu(tmp_path, tiny_model):
    """`custom=DIR`: any subjects in MMLU's layout, each scored as lm-eval's MMLU subject tasks are."""
    from workbench.evals.tasks import load_tasks

    rows = {"wb_colours": 3, "space_facts": 4}
    for subject, count in rows.items():
        for split, n in (("dev", 5), ("test", count)):
            write_csv(tmp_path / "mc" / "data" / split / f"{subject}_{split}.csv",
                      [[f" {subject} {split} question {i}? ", "red", "blue", "green", "None", "ABCD"[i % 4]]
                       for i in range(n)])
    spec = f"custom={tmp_path / 'mc'}"
    results = evaluate(tiny_model, data_dir=[spec, str(mini("mmlu"))], limit=2, num_fewshot=1, out=tmp_path / "R.json")
    assert results["provenance"]["settings"]["tasks"] == ["custom", "mmlu"]
    assert results["group_subtasks"]["custom"] == ["custom_space_facts", "custom_wb_colours"]
    for subject, count in rows.items():
        assert results["n-samples"][f"custom_{subject}"] == {"original": count, "effective": 2}
        assert results["n-shot"][f"custom_{subject}"] == 1
    check_groups(results, "custom", ("acc",))
    assert results["groups"]["custom"]["alias"] == "custom" and "mmlu" in results["groups"]

    (group,) = load_tasks(["custom"], {"custom": open_local(spec)}, None)
    (mmlu,) = load_tasks(["mmlu_nutrition"], {"mmlu": open_local(str(mini("mmlu")))}, None)
    for task in group.get_all_tasks():
        assert task.get_config("num_fewshot") == 5 and task.config.fewshot_config.sampler == "first_n"
        assert task.config.description == mmlu.config.description.replace("nutrition", task.config.dataset_name.replace("_", " "))
        doc = task.eval_docs[1]
        assert task.doc_to_text(doc) == mmlu.doc_to_text(doc) and task.doc_to_choice(doc) == ["A", "B", "C", "D"]
        assert task.doc_to_target(doc) == mmlu.doc_to_target(doc) == 1
        assert task.fewshot_context(doc, 1).endswith(mmlu.doc_to_text(task.fewshot_docs()[0]) + " A\n\n" + mmlu.doc_to_text(doc))

    bad = write_csv(tmp_path / "mc" / "data" / "test" / "wb_colours_test.csv", [["q", "a", "b", "c", "d", "A"], ["q", "a", "b", "E"]])
    with pytest.raises(WorkbenchError, match="expected 6 columns, found 4") as err:
        evaluate(tiny_model, data_dir=[spec], out=tmp_path / "R2.json")
    assert err.value.path == f"{bad.resolve()}:2"
    with pytest.raises(WorkbenchError, match="unknown task 'custom_nope'"):
        evaluate(tiny_model, tasks=["custom_nope"], out=tmp_path / "R2.json")


def test_full_ceval_run_counts_every_question(tmp_path, tiny_model):
    results = evaluate(tiny_model, tasks=["ceval"], data_dir=[str(mini("ceval"))], num_fewshot=0, out=tmp_path / "R.json")
    for task, rows in expected_rows("ceval").items():
        assert results["n-samples"][task] == {"original": rows, "effective": rows}
        assert results["n-shot"][task] == 0
    assert results["groups"]["ceval-valid"]["sample_len"] == sum(expected_rows("ceval").values())
    check_groups(results, "ceval-valid", ("acc", "acc_norm"))


def test_adapter_is_applied_unmerged(tmp_path, tiny_model):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "lora"
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), lora).save_pretrained(adapter)
    settings = {"tasks": ["ceval-valid_law"], "data_dir": [str(mini("ceval"))], "num_fewshot": 0, "limit": 2}
    base = evaluate(tiny_model, out=tmp_path / "base.json", **settings)
    tuned = evaluate(tiny_model, adapter=adapter, out=tmp_path / "tuned.json", **settings)
    assert tuned["name"] == f"{tiny_model.name}+lora" and tuned["provenance"]["adapter"] == str(adapter.resolve())
    assert tuned["provenance"]["adapter_files"].keys() == {"adapter_model.safetensors"}
    assert tuned["provenance"]["model_files"] == base["provenance"]["model_files"]
    rows = {name: (tmp_path / f"{name}.samples.jsonl").read_text().splitlines() for name in ("base", "tuned")}
    base_rows, tuned_rows = ([json.loads(line) for line in rows[name]] for name in ("base", "tuned"))
    assert [r["doc_hash"] for r in base_rows] == [r["doc_hash"] for r in tuned_rows]
    assert [r["loglikelihoods"] for r in base_rows] != [r["loglikelihoods"] for r in tuned_rows]


def test_generation_metrics_end_to_end(tmp_path, tiny_model):
    data = tmp_path / "ads.jsonl"
    data.write_text("".join(shared_path("data", "advertisegen", "dev.json").read_text(encoding="utf-8").splitlines(True)[:5]),
                    encoding="utf-8")
    results = evaluate(tiny_model, gen_data=data, max_new_tokens=6, out=tmp_path / "G.json")
    generation = results["generation"]
    assert generation["n"] == 5 and generation["chat_template"] is True and generation["max_new_tokens"] == 6
    assert set(generation["metrics"]) == set(generation["stderr"]) == {"rouge-1", "rouge-2", "rouge-l", "bleu-4"}
    assert generation["predictions_file"] == "G.predictions.jsonl" and results["samples_file"] is None
    assert generation["data_sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    rows = [json.loads(line) for line in (tmp_path / "G.predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in rows] == list(range(5))
    for row in rows:
        assert row.keys() == {"id", "prompt", "reference", "prediction", "rouge-1", "rouge-2", "rouge-l", "bleu-4"}
        assert {k: row[k] for k in generation["metrics"]} == score(row["prediction"], row["reference"])
    for metric, value in generation["metrics"].items():
        assert value == pytest.approx(sum(r[metric] for r in rows) / 5, abs=1e-4) and 0 <= value <= 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["G.json", "G.predictions.jsonl", "ads.jsonl"]
    assert results["n-samples"] == {} and results["provenance"]["settings"]["gen_data"] == str(data.resolve())


def test_cli_writes_exactly_its_files_and_refuses_to_overwrite(tmp_path, tiny_model):
    data = tmp_path / "in" / "ads.jsonl"
    data.parent.mkdir()
    data.write_text("".join(shared_path("data", "advertisegen", "dev.json").read_text(encoding="utf-8").splitlines(True)[:3]),
                    encoding="utf-8")
    out = tmp_path / "out" / "R.json"
    args = ["eval", "--model", str(tiny_model), "--data-dir", f"ceval={mini('ceval')}", "--tasks", "ceval-valid_law",
            "--limit", "2", "--gen-data", str(data), "--max-new-tokens", "3", "--out", str(out)]
    result = CliRunner().invoke(wb, [*args, "--json"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert sorted(p.name for p in out.parent.iterdir()) == ["R.json", "R.predictions.jsonl", "R.samples.jsonl"]
    written = json.loads(out.read_text())
    # --json prints the file's own scores: each task's acc/acc_norm and the generation means of its rows
    law = written["results"]["ceval-valid_law"]
    assert printed["scores"]["ceval-valid_law"] == {"acc": law["acc,none"], "acc_norm": law["acc_norm,none"]}
    rows = [json.loads(line) for line in (out.parent / "R.predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 3 and printed["generation"] == written["generation"]["metrics"]
    for metric in ("rouge-1", "rouge-2", "rouge-l", "bleu-4"):
        assert printed["generation"][metric] == pytest.approx(sum(r[metric] for r in rows) / 3, abs=1e-4), metric
    assert written["provenance"]["command"].startswith("wb ") and written["n-samples"]["ceval-valid_law"]["effective"] == 2
    before = {p.name: p.read_bytes() for p in out.parent.iterdir()}
    again = CliRunner().invoke(wb, args)
    assert again.exit_code == 1 and "output exists; pass --force" in again.stderr
    assert {p.name: p.read_bytes() for p in out.parent.iterdir()} == before


# -- model, adapter and tokenizer files that transformers/peft would choke on: one line each ------------------
class NotATensor:
    """Pickled into a weights file: `torch.load(weights_only=True)` refuses it (and nothing here unpickles it)."""




def eval_gen(tmp_path: Path, model: Path, *extra: str):
    """`wb eval` on one generation record: the cheapest run that loads the model."""
    data = tmp_path / "one.jsonl"
    data.write_text('{"content": "a", "summary": "b"}\n', encoding="utf-8")
    return CliRunner().invoke(wb, ["eval", "--model", str(model), *extra, "--gen-data", str(data), "--max-new-tokens", "1",
                                   "--out", str(tmp_path / "R.json")])


def lora_for(model, path: Path, **config) -> Path:
    from peft import LoraConfig, get_peft_model

    config = {"r": 4, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False, **config}
    safe = config.pop("safe_serialization", True)
    get_peft_model(model, LoraConfig(**config)).save_pretrained(path, safe_serialization=safe)
    return path


def other_llama(**sizes):
    from tiny import make_model

    return make_model(320, **sizes)


def test_adapter_made_for_another_base(tmp_path, tiny_model):
    narrow = lora_for(other_llama(hidden=32, intermediate=64), tmp_path / "narrow")
    assert_one_error(eval_gen(tmp_path, tiny_model, "--adapter", str(narrow)), "adapter was made for another base: "
                     "'model.layers.0.self_attn.q_proj' is 64x64 in the model, but the adapter's LoRA update for it is 32x32",
                     f"({narrow})")
    deeper = lora_for(other_llama(layers=4), tmp_path / "deeper")
    assert_one_error(eval_gen(tmp_path, tiny_model, "--adapter", str(deeper)), "adapter was made for another base: "
                     "it has weights for 'model.layers.2.self_attn.q_proj', which the model does not have")
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = lora_for(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=320)), tmp_path / "gpt2",
                    target_modules=["c_attn"])
    assert_one_error(eval_gen(tmp_path, tiny_model, "--adapter", str(gpt2)),
                     "adapter was made for another base: it adapts modules named 'c_attn'")
    assert not (tmp_path / "R.json").exists()


def test_adapter_peft_rejects_is_translated(tmp_path, tiny_model):
    """A LoRA-bias adapter is not read by wb's own LoRA reader, so peft's size-mismatch error is translated."""
    biased = lora_for(other_llama(hidden=32, intermediate=64), tmp_path / "bias", lora_bias=True)
    assert_one_error(eval_gen(tmp_path, tiny_model, "--adapter", str(biased)),
                     "adapter was made for another base: size mismatch for", f"({biased})")


def test_adapter_check_has_no_false_alarms(tiny_models, tmp_path):
    """Tied embeddings (no lm_head.weight in the checkpoint) and a resized vocabulary pass the check."""
    from transformers import AutoModelForCausalLM

    from workbench.evals.run import check_model_files

    tied = tiny_models(tie=True)
    model = AutoModelForCausalLM.from_pretrained(tied)
    adapter = lora_for(model, tmp_path / "tied", target_modules=["q_proj", "embed_tokens"], modules_to_save=["lm_head"])
    assert check_model_files(tied, adapter) is not None
    model = AutoModelForCausalLM.from_pretrained(tiny_models())
    model.resize_token_embeddings(330)
    adapter = lora_for(model, tmp_path / "resized", target_modules=["q_proj", "lm_head"], modules_to_save=["embed_tokens"])
    assert check_model_files(tiny_models(), adapter) is not None


def test_pickles_weights_only_rejects(tmp_path, tiny_models):
    import torch

    model = Path(shutil.copytree(tiny_models("bin"), tmp_path / "bin-model"))
    state = torch.load(model / "pytorch_model.bin", weights_only=True)
    torch.save({**state, "extra": NotATensor()}, model / "pytorch_model.bin")
    assert_one_error(eval_gen(tmp_path, model), "refusing to unpickle", f"({model / 'pytorch_model.bin'})")

    from transformers import AutoModelForCausalLM

    adapter = lora_for(AutoModelForCausalLM.from_pretrained(tiny_models()), tmp_path / "lora", safe_serialization=False)
    state = torch.load(adapter / "adapter_model.bin", weights_only=True)
    torch.save({**state, "extra": NotATensor()}, adapter / "adapter_model.bin")
    assert_one_error(eval_gen(tmp_path, tiny_models(), "--adapter", str(adapter)), "refusing to unpickle",
                     f"({adapter / 'adapter_model.bin'})")


def test_missing_or_broken_tokenizer(tmp_path, tiny_model):
    model = Path(shutil.copytree(tiny_model, tmp_path / "no-tokenizer"))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (model / name).unlink(missing_ok=True)
    assert_one_error(eval_gen(tmp_path, model), "no tokenizer in the folder", f"({model})")
    (model / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}', encoding="utf-8")
    (model / "tokenizer.json").write_text("{not json", encoding="utf-8")
    assert_one_error(eval_gen(tmp_path, model), "could not load the tokenizer", f"({model})")


def test_compare_checks_every_adapter_before_evaluating(tmp_path, tiny_model):
    """`wb compare` refuses an adapter made for another base before it evaluates the base."""
    narrow = lora_for(other_llama(hidden=32, intermediate=64), tmp_path / "narrow")
    result = CliRunner().invoke(wb, ["compare", "--base", str(tiny_model), "--adapter", str(narrow), "--tasks",
                                     "ceval-valid_law", "--data-dir", f"ceval={mini('ceval')}", "--out", str(tmp_path / "cmp")])
    assert_one_error(result, "adapter was made for another base", f"({narrow})")
    assert not (tmp_path / "cmp").exists() or not list((tmp_path / "cmp").iterdir())


def test_eval_outside_a_git_checkout_prints_nothing_of_git(tmp_path, tiny_model, monkeypatch, capfd):
    """lm-eval runs `git describe` in the working folder; a user's folder is rarely a checkout."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # no checkout above tmp_path either
    result = CliRunner().invoke(wb, ["eval", "--model", str(tiny_model), "--data-dir", f"ceval={mini('ceval')}",
                                     "--tasks", "ceval-valid_law", "--limit", "1", "--out", "R.json"])
    assert result.exit_code == 0, result.output
    assert "not a git repository" not in capfd.readouterr().err
