"""`wb report` and `wb compare`: rendering from contract-shaped results files, escaping, the z-test,
flags for mismatched settings, refusal of bad inputs, weights and training sections, a real browser."""

from __future__ import annotations

import base64
import json
import math
import os
import re
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import pytest
from click.testing import CliRunner
from tiny import perturbed, save_layout

from workbench.cli import wb
from workbench.errors import WorkbenchError
from workbench.report import render_report
from workbench.report.stats import significance_mark, z_test
from workbench.report.weights import layer_and_module

XSS = '<script>alert(1)</script> "onerror=alert(2) <img src=x onerror=alert(3)>'
SUBJECTS = {"abstract_algebra": "stem", "world_religions": "humanities", "nutrition": "other"}
# Hand-checked z-test for the mmlu aggregate: tuned 0.55 ± 0.04 against base 0.40 ± 0.05.
MMLU_BASE, MMLU_TUNED = (0.40, 0.05), (0.55, 0.04)


# -- fixtures in the exact shape of the contract (lm-eval's simple_evaluate keys + wb's blocks) ------
def lm_eval_block(mmlu: tuple[float, float], subjects: dict[str, tuple[float, float]], n_shot: int = 0,
                  limit: int = 10) -> dict:
    results, n_samples, configs = {}, {}, {}
    group_subtasks: dict[str, list[str]] = {"mmlu": []}
    for subject, (acc, se) in subjects.items():
        task, category = f"mmlu_{subject}", f"mmlu_{SUBJECTS[subject]}"
        results[task] = {"name": task, "alias": f"  - {subject}", "sample_len": limit,
                         "acc,none": acc, "acc_stderr,none": se}
        n_samples[task] = {"original": 100, "effective": limit}
        configs[task] = {"task": task, "dataset_path": "hails/mmlu_no_train", "dataset_name": subject,
                         "test_split": "test", "num_fewshot": n_shot}
        group_subtasks.setdefault(category, []).append(task)
        if category not in group_subtasks["mmlu"]:
            group_subtasks["mmlu"].append(category)
    for category in group_subtasks["mmlu"]:
        members = group_subtasks[category]
        acc = sum(results[t]["acc,none"] for t in members) / len(members)
        results[category] = {"name": category, "alias": f" - {category[5:]}", "sample_len": limit * len(members),
                             "acc,none": acc, "acc_stderr,none": 0.05}
    results["mmlu"] = {"name": "mmlu", "alias": "mmlu", "sample_len": limit * len(subjects),
                       "acc,none": mmlu[0], "acc_stderr,none": mmlu[1]}
    results["arc_easy"] = {"name": "arc_easy", "alias": "arc_easy", "sample_len": limit, "acc,none": 0.5,
                           "acc_stderr,none": "N/A", "acc_norm,none": 0.6, "acc_norm_stderr,none": 0.1}
    n_samples["arc_easy"] = {"original": 2376, "effective": limit}
    all_tasks = list(results)
    return {
        "results": results,
        "groups": {k: results[k] for k in group_subtasks},
        "group_subtasks": {**group_subtasks, "arc_easy": []},
        "n-shot": dict.fromkeys(all_tasks, n_shot),
        "n-samples": n_samples,
        "versions": {t: (2 if t in group_subtasks else 1.0) for t in all_tasks},
        "configs": configs,
        "higher_is_better": {t: {"acc": True, "acc_norm": True} for t in all_tasks},
    }


def write_results(folder: Path, name: str, *, mmlu=MMLU_BASE, subjects=None, n_shot=0, limit=10,
                  predictions: list[dict] | None = None, gen_metrics: dict | None = None) -> Path:
    """A `wb eval` results file (and its predictions file) as the contract describes it."""
    folder.mkdir(parents=True, exist_ok=True)
    subjects = subjects or {"abstract_algebra": (0.3, 0.15), "world_religions": (0.6, 0.16), "nutrition": (0.5, 0.17)}
    data = {"wb_results_version": 1, "name": name, **lm_eval_block(mmlu, subjects, n_shot, limit),
            "generation": None, "samples_file": None,
            "provenance": {
                "model": f"/models/{name}", "adapter": None, "model_files": {"model.safetensors": "ab" * 32},
                "adapter_files": {}, "dtype": "float32", "device": "cpu",
                "versions": {"wb": "0.1.0", "torch": "2.13.0", "transformers": "5.23.0", "peft": "0.21.2",
                             "lm_eval": "0.4.13"},
                "command": f"wb eval --model /models/{name} --tasks mmlu,arc_easy --limit {limit}",
                "started": "2025-01-02T03:04:05+00:00", "duration_s": 12.5,
                "settings": {"tasks": ["mmlu", "arc_easy"], "num_fewshot": n_shot, "limit": limit, "data_dir": None,
                             "gen_data": "data/ads.jsonl" if predictions else None, "batch_size": "auto",
                             "chat_template": None, "max_new_tokens": 64}}}
    if predictions is not None:
        data["generation"] = {"data": "data/ads.jsonl", "data_sha256": "cd" * 32, "n": len(predictions),
                              "max_new_tokens": 64, "metrics": gen_metrics,
                              "stderr": {k: 1.5 for k in gen_metrics},
                              "predictions_file": f"{name}.predictions.jsonl"}
        with open(folder / f"{name}.predictions.jsonl", "w", encoding="utf-8") as handle:
            for row in predictions:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    path = folder / f"{name}.json"
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")
    return path


def prediction(i: int, text: str, rouge_l: float) -> dict:
    return {"id": f"ad-{i}", "prompt": f"类型#裙*颜色#黑色 {i}", "reference": f"这条黑色条纹裙简约大方 {i}",
            "prediction": text, "rouge-1": rouge_l + 5, "rouge-2": rouge_l - 5, "rouge-l": rouge_l, "bleu-4": rouge_l / 2}


@pytest.fixture
def pair(tmp_path) -> tuple[Path, Path]:
    return write_pair(tmp_path)


def write_pair(tmp_path: Path) -> tuple[Path, Path]:
    """A base and a tuned results file: mmlu with three subjects, arc_easy, and generation samples."""
    base = write_results(tmp_path, "base", predictions=[prediction(i, f"base says {i}", 20.0) for i in range(4)],
                         gen_metrics={"rouge-1": 25.0, "rouge-2": 15.0, "rouge-l": 20.0, "bleu-4": 10.0})
    tuned_rows = [prediction(0, XSS, 80.0), prediction(1, "tuned 1", 5.0)]
    tuned_rows += [prediction(i, f"tuned {i}", 30.0) for i in (2, 3)]
    tuned = write_results(tmp_path, "tuned", mmlu=MMLU_TUNED,
                          subjects={"abstract_algebra": (0.5, 0.16), "world_religions": (0.55, 0.16),
                                    "nutrition": (0.7, 0.15)},
                          predictions=tuned_rows,
                          gen_metrics={"rouge-1": 40.0, "rouge-2": 30.0, "rouge-l": 36.25, "bleu-4": 18.0})
    return base, tuned


# -- statistics ---------------------------------------------------------------------------------------
def test_z_test_matches_hand_computation():
    change = z_test(MMLU_TUNED[0], MMLU_TUNED[1], MMLU_BASE[0], MMLU_BASE[1])
    se = math.sqrt(0.04**2 + 0.05**2)  # 0.0640312...
    assert change.diff == pytest.approx(0.15)
    assert change.se == pytest.approx(se)
    assert change.z == pytest.approx(0.15 / se)  # 2.34261...
    assert change.z == pytest.approx(2.342606, abs=1e-6)
    # two-sided p = 2 (1 - Φ(2.342606)) = 0.019149 (normal table)
    assert change.p == pytest.approx(0.019149, abs=1e-5)
    assert change.mark == "*"
    assert z_test(0.5, None, 0.4, 0.05).z is None  # no stderr: no test, no mark
    assert significance_mark(0.0005) == "***" and significance_mark(0.2) == ""


def test_layer_and_module_names():
    assert layer_and_module("model.layers.3.self_attn.q_proj.weight") == (3, "q_proj")
    assert layer_and_module("model.layers.12.mlp.down_proj.bias") == (12, "down_proj")
    assert layer_and_module("transformer.h.0.attn.c_attn.weight") == (0, "c_attn")
    assert layer_and_module("lm_head.weight") == (None, "lm_head")


# -- rendering -----------------------------------------------------------------------------------------
def test_report_shows_every_task_model_and_change(pair, tmp_path):
    out = tmp_path / "report.html"
    info = render_report(list(pair), out, command="wb report base.json tuned.json")
    html = out.read_text(encoding="utf-8")
    assert info.models == ["base", "tuned"] and info.baseline == "base"
    assert info.sections == ["Summary", "Per-subject breakdown", "Generation", "Provenance"]
    for task in ("mmlu", "stem", "humanities", "other", "arc_easy", "abstract_algebra", "world_religions",
                 "nutrition"):
        assert f">{task}<" in html, task
    for model in ("base", "tuned"):
        assert model in html
    # mmlu: 0.5500 vs 0.4000, Δ +0.1500 ± 0.0640, p = 0.019 -> "*"
    assert re.search(r"\+0\.1500<span class=\"se\"> ± 0\.0640</span><span class=\"sig\">\*</span>"
                     r"<span class=\"p\">p=0\.019</span>", html)
    assert "acc_norm" in html and "± —" in html  # arc_easy's "N/A" stderr is shown as a dash
    assert "ROUGE-L" in html and "36.25" in html
    assert "<svg" in html and "xmlns" not in html


def test_untrusted_generation_is_escaped(pair, tmp_path):
    out = tmp_path / "report.html"
    render_report(list(pair), out)
    html = out.read_text(encoding="utf-8")
    assert "<script>alert(1)" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert '"onerror=' not in html and "&#34;onerror=alert(2)" in html
    assert "<img" not in html
    assert html.count("<script>") == 1  # only the report's own sorter


def test_no_external_urls(pair, tmp_path):
    out = tmp_path / "report.html"
    render_report(list(pair), out)
    html = out.read_text(encoding="utf-8")
    assert "http://" not in html and "https://" not in html
    assert not re.search(r"""(src|href)\s*=\s*["'](?!#)""", html)  # only in-page anchors


def test_wins_and_losses_come_first(pair, tmp_path):
    out = tmp_path / "report.html"
    render_report(list(pair), out)
    html = out.read_text(encoding="utf-8")
    wins, losses = html.index("Biggest wins"), html.index("Biggest losses")
    assert wins < html.index("#ad-0") < losses  # +60 ROUGE-L: the biggest win
    assert losses < html.index("#ad-1")  # -15: the only loss
    assert html.index("#ad-0") < html.index("#ad-2") < losses


def test_mismatched_n_shot_is_flagged_not_compared(tmp_path):
    base = write_results(tmp_path, "base", n_shot=0)
    tuned = write_results(tmp_path, "tuned", n_shot=5, mmlu=MMLU_TUNED)
    out = tmp_path / "report.html"
    render_report([base, tuned], out)
    html = out.read_text(encoding="utf-8")
    assert "Evaluation settings differ" in html
    assert "n-shot 0 vs 5" in html
    assert "+0.1500" not in html  # the mmlu change is not computed across different settings


def test_different_limit_is_flagged(tmp_path):
    base = write_results(tmp_path, "base", limit=10)
    tuned = write_results(tmp_path, "tuned", limit=20)
    out = tmp_path / "report.html"
    render_report([base, tuned], out)
    assert "samples 10 vs 20" in out.read_text(encoding="utf-8")


def test_generation_on_other_data_is_flagged(pair, tmp_path):
    data = json.loads(pair[1].read_text())
    data["generation"]["data_sha256"] = "00" * 32
    pair[1].write_text(json.dumps(data))
    out = tmp_path / "report.html"
    render_report(list(pair), out)
    html = out.read_text(encoding="utf-8")
    assert "different data (sha256)" in html
    assert "+16.25" not in html and "Δ vs base" not in html  # no change computed across data sets


def test_baseline_option_reorders_columns(pair, tmp_path):
    out = tmp_path / "report.html"
    info = render_report(list(pair), out, baseline="tuned")
    assert info.models == ["tuned", "base"]
    assert "-0.1500" in out.read_text(encoding="utf-8")
    with pytest.raises(WorkbenchError, match="none of the models"):
        render_report(list(pair), tmp_path / "other.html", baseline="nobody")


def test_same_name_twice_is_disambiguated(tmp_path):
    first = write_results(tmp_path / "a", "model")
    second = write_results(tmp_path / "b", "model", mmlu=MMLU_TUNED).rename(tmp_path / "b" / "model-5shot.json")
    info = render_report([first, second], tmp_path / "r.html")
    assert info.models == ["model [model]", "model [model-5shot]"]
    assert "+0.1500" in (tmp_path / "r.html").read_text(encoding="utf-8")  # the second file is compared to the first


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "top level is not a JSON object"),
        ('{"results": {}}', "no 'wb_results_version'"),
        ('{"wb_results_version": 2, "name": "x", "results": {}, "provenance": {}}', "unsupported wb_results_version 2"),
        ('{"wb_results_version": 1, "name": "x", "results": {}}', "lacks 'provenance'"),
        ('{"wb_results_version": 1, "name": "x", "results": [], "provenance": {}}', "'results' must be an object"),
        ('{"wb_results_version": 1, "name": "x", "results": {}, "provenance": {}, "generation": {"n": 1}}',
         "generation lacks 'data'"),
    ],
)
def test_bad_results_file_is_refused_with_its_name(pair, tmp_path, content, message):
    bad = tmp_path / "bad.json"
    bad.write_text(content, encoding="utf-8")
    result = CliRunner().invoke(wb, ["report", str(pair[0]), str(bad), "--out", str(tmp_path / "r.html")])
    assert result.exit_code == 1
    line = result.output.strip()
    assert line.startswith("error: ") and message in line and line.endswith(f"({bad})"), line
    assert "\n" not in line and not (tmp_path / "r.html").exists()


def test_bad_predictions_file_is_refused(pair, tmp_path):
    (tmp_path / "tuned.predictions.jsonl").write_text('{"id": 1}\nnot json\n', encoding="utf-8")
    with pytest.raises(WorkbenchError, match="line 2 is not valid JSON") as caught:
        render_report(list(pair), tmp_path / "r.html")
    assert caught.value.path.endswith("tuned.predictions.jsonl")


def test_crafted_results_fields_are_refused_naming_the_key(pair, tmp_path):
    """A well-formed file with a field the report cannot use: one error line naming the key, no report."""
    data = json.loads(pair[1].read_text(encoding="utf-8"))
    big = {**data, "results": {**data["results"], "mmlu": {**data["results"]["mmlu"], "acc,none": "BIG"}}}
    cases = [
        # a score too large for a float: json reads 1e400 as inf, which the z-test cannot square
        (json.dumps(big).replace('"BIG"', "1e400"), "results['mmlu']['acc,none'] must be a finite number"),
        # a list where an object of file hashes belongs
        (json.dumps({**data, "provenance": {**data["provenance"], "model_files": ["ab" * 32]}}),
         "provenance['model_files'] must be an object"),
        # a group that is its own subtask: the task tree would never end
        (json.dumps({**data, "group_subtasks": {**data["group_subtasks"], "mmlu_stem": ["mmlu"]}}),
         "'group_subtasks' makes 'mmlu' a subtask of itself"),
    ]
    for content, message in cases:
        pair[1].write_text(content, encoding="utf-8")
        result = CliRunner().invoke(wb, ["report", *map(str, pair), "--out", str(tmp_path / "r.html")])
        assert result.exit_code == 1, result.output
        line = result.output.strip()
        assert line == f"error: results file: {line.split('results file: ', 1)[1]}", line
        assert message in line and line.endswith(f"({pair[1]})") and "\n" not in line, line
        assert not (tmp_path / "r.html").exists()


def test_existing_output_needs_force(pair, tmp_path):
    out = tmp_path / "r.html"
    out.write_text("keep me")
    runner = CliRunner()
    result = runner.invoke(wb, ["report", *map(str, pair), "--out", str(out)])
    assert result.exit_code == 1 and "pass --force" in result.output and out.read_text() == "keep me"
    result = runner.invoke(wb, ["report", *map(str, pair), "--out", str(out), "--force"])
    assert result.exit_code == 0 and result.output.strip() == str(out)


@pytest.mark.parametrize("force", [False, True])
def test_out_naming_a_folder_is_one_error_line(pair, tmp_path, force):
    folder = tmp_path / "reports"
    folder.mkdir()
    result = CliRunner().invoke(wb, ["report", *map(str, pair), "-o", str(folder), *(["--force"] if force else [])])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert folder.is_dir() and not any(folder.iterdir()) and "Traceback" not in result.output


# -- training and weights -------------------------------------------------------------------------------
def write_train_dir(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "train_args.json").write_text(json.dumps({
        "base": "/models/base", "data": ["data/ads.jsonl"], "lora": {"r": 8, "alpha": 16, "target": ["q_proj", "v_proj"]},
        "learning_rate": 2e-4, "versions": {"torch": "2.13.0", "peft": "0.21.2"},
        "data_sha256": {"data/ads.jsonl": "ef" * 32}, "note": XSS}))
    with open(folder / "trainer_log.jsonl", "w") as handle:
        for step in range(1, 21):
            row = {"step": step, "total_steps": 20, "loss": 3.0 / step**0.5, "lr": 2e-4, "epoch": step / 10,
                   "tokens_per_s": 1500.0 + step, "elapsed_s": step * 0.5}
            if step % 10 == 0:
                row["eval_loss"] = 2.0 / step**0.3
            handle.write(json.dumps(row) + "\n")
    (folder / "metrics.json").write_text(json.dumps({"train_loss": 1.234, "eval_loss": 0.987, "train_runtime_s": 10.0,
                                                     "tokens_per_s": 1510.5, "steps": 20}))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16}))
    (folder / "adapter_model.safetensors").write_bytes(b"stand-in bytes")
    return folder


def test_training_section(pair, tmp_path):
    run = write_train_dir(tmp_path / "run")
    out = tmp_path / "r.html"
    info = render_report(list(pair), out, train=[run])
    html = out.read_text(encoding="utf-8")
    assert "Training" in info.sections
    assert ">1510.5<" in html and "eval loss" in html and "lora.r" in html
    assert "&lt;script&gt;" in html and "<script>alert" not in html


def test_train_folder_without_log_is_refused(pair, tmp_path):
    run = write_train_dir(tmp_path / "run")
    (run / "trainer_log.jsonl").unlink()
    with pytest.raises(WorkbenchError, match="trainer_log.jsonl is missing"):
        render_report(list(pair), tmp_path / "r.html", train=[run])


def test_weights_section(pair, tiny_model, tmp_path):
    from safetensors.torch import load_file

    state = load_file(str(tiny_model / "model.safetensors"))
    tuned_state = perturbed(state, scale=0.05)
    tuned_state["model.layers.1.self_attn.q_proj.weight"] = state["model.layers.1.self_attn.q_proj.weight"].clone()
    tuned = save_layout(tuned_state, tmp_path / "tuned-model", "safetensors-sharded")
    (tuned / "merge.json").write_text(json.dumps({"base": str(tiny_model), "adapter": "run", "scale": 1.0}))
    out = tmp_path / "r.html"
    info = render_report(list(pair), out, weights=[(f"base={tiny_model}", f"tuned={tuned}")])
    html = out.read_text(encoding="utf-8")
    assert "Weights" in info.sections
    assert "layer 0" in html and "layer 1" in html and "q_proj" in html and "down_proj" in html
    assert "lm_head" in html and "embed_tokens" in html
    assert "0.00e+00" in html  # the untouched q_proj of layer 1
    assert "merge.json" in html and "weight-sum (float64)" in html
    from workbench.weights.checksum import checksum

    expected = checksum(tuned, algo="sha256", weight_sum=True)
    for digest in expected.files.values():
        assert digest in html
    assert f"{expected.weight_sum:.6f}" in html


def test_weights_relative_change_value(tiny_model, tmp_path):
    import torch
    from safetensors.torch import load_file

    from workbench.report.weights import compare_weights, fingerprint

    state = load_file(str(tiny_model / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj.weight"
    tuned_state = dict(state)
    tuned_state[name] = state[name] * 1.1  # ‖ΔW‖/‖W‖ = 0.1 exactly (up to float32 rounding)
    tuned = save_layout(tuned_state, tmp_path / "t", "bin")
    comparison = compare_weights(fingerprint("base", tiny_model), fingerprint("tuned", tuned))
    assert comparison.cells[(0, "up_proj")].relative == pytest.approx(0.1, rel=1e-5)
    assert comparison.cells[(0, "q_proj")].relative == 0.0
    expected = float(torch.linalg.vector_norm((tuned_state[name] - state[name]).double()))
    assert comparison.total.delta_sq ** 0.5 == pytest.approx(expected, rel=1e-9)


# -- CLI ------------------------------------------------------------------------------------------------------
def test_report_does_not_import_model_libraries(pair, tmp_path):
    """Rendering is quick: neither transformers, peft nor lm-eval is loaded."""
    code = ("import sys; from workbench.cli import wb\n"
            f"wb({['report', *map(str, pair), '--out', str(tmp_path / 'r.html')]!r}, standalone_mode=False)\n"
            "print(sorted(m for m in ('transformers', 'peft', 'lm_eval') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]"


# -- compare ---------------------------------------------------------------------------------------------------
class FakeEvaluate:
    """Stands in for `workbench.evals.run.evaluate`: writes a contract-shaped file and counts calls."""

    def __init__(self):
        self.calls: list[dict] = []

    def __call__(self, model, *, adapter=None, tasks=(), data_dir=None, gen_data=None, num_fewshot=None, limit=None,
                 batch_size="auto", device="auto", dtype="auto", chat_template=None, max_new_tokens=128,
                 trust_remote_code=False, out, force=False, command=None, **options):
        from workbench.weights.checksum import checksum

        self.calls.append({"model": str(model), "adapter": adapter and str(adapter), "out": Path(out)})
        if Path(out).exists() and not force:
            raise WorkbenchError("output exists; pass --force to overwrite it", out)
        name = Path(model).name + (f"+{Path(adapter).name}" if adapter else "")
        path = write_results(Path(out).parent, "_tmp", limit=limit or 10)
        data = json.loads(path.read_text())
        path.unlink()
        data["name"] = name
        from importlib import metadata

        import workbench

        versions = {"wb": workbench.__version__, **{n: metadata.version(n) for n in ("torch", "transformers", "peft",
                                                                                      "lm_eval")}}
        data["provenance"].update(
            model=str(model), adapter=adapter and str(adapter), command=command, versions=versions,
            model_files=checksum(Path(model), algo="sha256").files,
            adapter_files=checksum(Path(adapter), algo="sha256").files if adapter else {},
            settings={"tasks": list(tasks), "num_fewshot": num_fewshot, "limit": limit,
                      "data_dir": data_dir and str(data_dir), "gen_data": gen_data and str(gen_data),
                      "batch_size": batch_size, "chat_template": chat_template, "max_new_tokens": max_new_tokens})
        Path(out).write_text(json.dumps(data))
        return data


@pytest.fixture
def fake_evaluate(monkeypatch):
    """The real `workbench.evals.run` with only `evaluate` replaced: its file checks still run."""
    from workbench.evals import run

    fake = FakeEvaluate()
    monkeypatch.setattr(run, "evaluate", fake)
    return fake


def test_compare_reuses_matching_results(fake_evaluate, tiny_models, tmp_path):
    base, tuned, other = tiny_models(seed=0), tiny_models(seed=1), tiny_models(seed=2)
    out = tmp_path / "reports" / "ads"
    runner = CliRunner()
    args = ["compare", "--base", str(base), "--tuned", str(tuned), "--tasks", "mmlu", "--limit", "10", "--out", str(out)]
    result = runner.invoke(wb, args)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out / "index.html")
    assert len(fake_evaluate.calls) == 2
    names = sorted(p.name for p in out.glob("*.json"))
    assert names == sorted([f"{base.name}.json", f"{tuned.name}.json"])

    result = runner.invoke(wb, args + ["--tuned", str(other)])  # one more model: only that one is evaluated
    assert result.exit_code == 0, result.output
    assert [c["model"] for c in fake_evaluate.calls[2:]] == [str(other)]
    assert "re-using" in result.stderr
    html = (out / "index.html").read_text(encoding="utf-8")
    assert all(m.name in html for m in (base, tuned, other))

    other_limit = [a if a != "10" else "20" for a in args]
    result = runner.invoke(wb, other_limit)  # other settings: refused without --force
    assert result.exit_code == 1 and "pass --force" in result.output and "limit" in result.output
    result = runner.invoke(wb, other_limit + ["--force"])
    assert result.exit_code == 0, result.output
    assert len(fake_evaluate.calls) == 5

    made = out / f"{base.name}.json"  # results from another lm-eval are not silently mixed in
    data = json.loads(made.read_text())
    data["provenance"]["versions"]["lm_eval"] = "0.4.0"
    made.write_text(json.dumps(data))
    result = runner.invoke(wb, other_limit)
    assert result.exit_code == 1 and "lm_eval (0.4.0; installed: " in result.output


def test_compare_adapter_is_applied_to_the_base(fake_evaluate, tiny_models, tmp_path):
    base = tiny_models(seed=0)
    adapter = write_train_dir(tmp_path / "run")  # a `wb train` folder: its run joins the report
    (adapter / "adapter_model.safetensors").write_bytes((tiny_models(seed=3) / "model.safetensors").read_bytes())
    out = tmp_path / "cmp"
    result = CliRunner().invoke(wb, ["compare", "--base", str(base), "--adapter", str(adapter), "--tasks", "mmlu",
                                     "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert fake_evaluate.calls[1]["model"] == str(base) and fake_evaluate.calls[1]["adapter"] == str(adapter)
    assert (out / f"{base.name}+run.json").is_file()
    html = (out / "index.html").read_text(encoding="utf-8")
    assert f"{base.name}+run" in html and 'id="training"' in html


@pytest.mark.slow
def test_compare_end_to_end_with_real_eval(tiny_models, tmp_path):
    """The real `wb eval` on two tiny models; the second run re-uses both results files."""
    from conftest import shared_path

    mmlu = shared_path("data", "mmlu-mini")
    ads = tmp_path / "ads.jsonl"
    ads.write_text("".join(shared_path("data", "advertisegen", "dev.json").read_text(encoding="utf-8")
                           .splitlines(True)[:2]), encoding="utf-8")
    base, tuned = tiny_models(seed=0), tiny_models(seed=1)
    out = tmp_path / "reports" / "tiny"
    args = ["compare", "--base", str(base), "--tuned", str(tuned), "--data-dir", f"mmlu={mmlu}",
            "--tasks", "mmlu_abstract_algebra", "--num-fewshot", "0", "--limit", "2", "--gen-data", str(ads),
            "--max-new-tokens", "4", "--out", str(out)]
    runner = CliRunner()
    result = runner.invoke(wb, args)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out / "index.html")
    written = {p.name: p.read_bytes() for p in out.glob("*.json*")}
    assert {f"{base.name}.json", f"{tuned.name}.json", f"{base.name}.predictions.jsonl"} <= set(written)
    html = (out / "index.html").read_text(encoding="utf-8")
    assert "abstract_algebra" in html and "ROUGE-L" in html and base.name in html and tuned.name in html
    again = runner.invoke(wb, args)
    assert again.exit_code == 0 and again.stderr.count("re-using") == 2, again.output
    assert {p.name: p.read_bytes() for p in out.glob("*.json*")} == written


def test_compare_needs_a_model_to_compare(tiny_model, tmp_path):
    result = CliRunner().invoke(wb, ["compare", "--base", str(tiny_model), "--tasks", "mmlu", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--tuned or --adapter" in result.output


# -- a real browser --------------------------------------------------------------------------------------------
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


class Browser:
    """A minimal Chrome DevTools Protocol client over --remote-debugging-pipe (fd 3 in, fd 4 out)."""

    def __init__(self, user_data_dir: Path):
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        def wire_fds():
            read_end, write_end = os.dup(to_chrome_r), os.dup(from_chrome_w)  # above 4 before moving
            os.dup2(read_end, 3)
            os.dup2(write_end, 4)

        self.process = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={user_data_dir}", "--remote-debugging-pipe", "--window-size=1280,2000", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=wire_fds, pass_fds=(3, 4), close_fds=True)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buffer = b""
        self._id = 0
        self.events: list[dict] = []

    def call(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._next(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == method for e in self.events):
            self.events.append(self._next(deadline))

    def _next(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            ready, _, _ = select.select([self._from_chrome], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError("no answer from Chromium")
            chunk = os.read(self._from_chrome, 1 << 20)
            if not chunk:
                raise EOFError("Chromium closed the pipe")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except (RuntimeError, TimeoutError, EOFError, OSError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._to_chrome)
        os.close(self._from_chrome)


def png_colours(data: bytes, limit: int = 3) -> set[tuple[int, ...]]:
    """Distinct pixel colours of an 8-bit RGB/RGBA PNG (stops counting at `limit`)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    width, height, depth, colour_type = header[:4]
    assert depth == 8 and colour_type in (2, 6)
    channels = 3 if colour_type == 2 else 4
    raw, stride = zlib.decompress(idat), width * channels
    previous, colours, offset = bytearray(stride), set(), 0
    for _ in range(height):
        kind, line = raw[offset], bytearray(raw[offset + 1:offset + 1 + stride])
        offset += 1 + stride
        for i in range(stride):
            left = line[i - channels] if i >= channels else 0
            up, corner = previous[i], previous[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + left) & 255
            elif kind == 2:
                line[i] = (line[i] + up) & 255
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 255
            elif kind == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                line[i] = (line[i] + (left if pa <= pb and pa <= pc else up if pb <= pc else corner)) & 255
        colours.update(bytes(line[i:i + channels]) for i in range(0, stride, channels * 7))
        if len(colours) >= limit:
            return colours
        previous = line
    return colours


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium); .ci/run installs it")
def test_report_in_headless_chromium(pair, tiny_model, tmp_path):
    out = tmp_path / "report.html"
    render_report(list(pair), out, train=[write_train_dir(tmp_path / "run")])
    browser = Browser(Path(tempfile.mkdtemp(prefix="wb-chromium-", dir=tmp_path)))
    try:
        target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime.enable", "Log.enable", "Page.enable"):
            browser.call(domain, session=session)
        browser.call("Page.navigate", {"url": out.as_uri()}, session)
        browser.wait_for("Page.loadEventFired")
        # the sorter works: sort the breakdown by subject name, A→Z
        order = browser.call("Runtime.evaluate", {"returnByValue": True, "expression": """
            (() => { const table = document.querySelector('table.sortable');
                     table.querySelector('th button.sort').click();
                     return Array.from(table.tBodies[0].rows, r => r.cells[0].textContent.trim()); })()"""},
                             session)["result"]["value"]
        assert order == sorted(order) and len(order) == 3
        shot = browser.call("Page.captureScreenshot", {"format": "png"}, session)
    finally:
        browser.close()
    errors = [e for e in browser.events
              if e.get("method") == "Runtime.exceptionThrown"
              or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert"))
              or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]
    assert errors == []
    png = base64.b64decode(shot["data"])
    (tmp_path / "report.png").write_bytes(png)
    assert len(png_colours(png)) >= 3, "the screenshot is blank"


def test_axis_ticks_end_for_a_range_one_rounding_step_wide():
    from workbench.report.svg import nice_ticks

    ticks = nice_ticks(1.0, 1.0000000000000002)  # two losses a crafted log may hold: used to loop forever
    assert ticks[0] <= 1.0 <= ticks[-1] and 2 <= len(ticks) <= 21
    assert nice_ticks(0.0, 2.37) == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
