"""`--system-prompt` and `--fewshot-as-multiturn`: the prompts lm-eval builds, RESULTS.json, `wb compare` and
`wb report`.

Real evaluations of the tiny 2-layer model on a tiny local MMLU-layout folder (one subject, two questions,
two dev examples); the prompts lm-eval builds are read where lm-eval hands them to the model
(HFLM.loglikelihood), and checked against lm-eval's own prompt_hash in the samples file.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
from clicheck import assert_one_error
from click.testing import CliRunner
from tiny import write_mmlu

from workbench.cli import wb
from workbench.evals.compare import Candidate, reuse_mismatches
from workbench.evals.results import recorded_setting
from workbench.evals.run import evaluate
from workbench.report.load import load_results

SYSTEM = "You are a careful grader. Answer with one letter."
OTHER = "Answer quickly."
SUBJECT = "wb_colours"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> str:
    """custom=DIR: one subject in MMLU's layout (dev: the shots, test: the questions), two of each."""
    root = write_mmlu(tmp_path_factory.mktemp("mc"), {SUBJECT: 2}, dev=2, question="{split} question {i}?",
                      choices=("red", "blue", "green", "none"))
    return f"custom={root}"


@pytest.fixture
def contexts(monkeypatch) -> list[str]:
    """Every context lm-eval asks the model to score, in order."""
    from lm_eval.models.huggingface import HFLM

    seen: list[str] = []
    original = HFLM.loglikelihood

    def spy(self, requests, *args, **kwargs):
        seen.extend(request.args[0] for request in requests)
        return original(self, requests, *args, **kwargs)

    monkeypatch.setattr(HFLM, "loglikelihood", spy)
    return seen


def run(tiny_model, bench, out: Path, **options) -> dict:
    return evaluate(tiny_model, data_dir=[bench], num_fewshot=1, limit=2, out=out, **options)


def samples(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.with_name(f"{out.stem}.samples.jsonl").read_text().splitlines()]


def test_system_prompt_leads_every_prompt(tmp_path, tiny_model, bench, contexts, tiny_tokenizer):
    """Without a chat template lm-eval puts the system instruction before the task description, a blank line
    between; the prompt_hash lm-eval records is that prompt's; RESULTS.json records the setting."""
    from lm_eval.utils import hash_string

    from workbench.evals.layouts import open_local
    from workbench.evals.tasks import load_tasks

    plain = run(tiny_model, bench, tmp_path / "plain.json")
    plain_contexts = list(contexts)
    contexts.clear()
    with_system = run(tiny_model, bench, tmp_path / "system.json", system_prompt=SYSTEM)
    (task,) = load_tasks(["custom"], {"custom": open_local(bench)}, 1)[0].get_all_tasks()
    description = task.config.description
    assert len(contexts) == len(plain_contexts) == 2 * 4  # two questions, four choices each
    for mine, theirs in zip(contexts, plain_contexts):
        assert theirs.startswith(description) and mine == f"{SYSTEM}\n\n{theirs}"
    rows, plain_rows = samples(tmp_path / "system.json"), samples(tmp_path / "plain.json")
    assert [r["doc_hash"] for r in rows] == [r["doc_hash"] for r in plain_rows]
    assert [r["prompt_hash"] for r in rows] == [hash_string(contexts[4 * i]) for i in range(2)]
    assert all(a["prompt_hash"] != b["prompt_hash"] for a, b in zip(rows, plain_rows))

    settings = with_system["provenance"]["settings"]
    assert (settings["system_prompt"], settings["fewshot_as_multiturn"], settings["backend"]) == (SYSTEM, False, "hf")
    assert plain["provenance"]["settings"]["system_prompt"] is None
    assert with_system["provenance"]["placement"] == {"backend": "hf", "parallelize": False,
                                                      "max_memory_per_gpu": None, "offload_folder": None}
    assert f"--system-prompt {shlex.quote(SYSTEM)}" in with_system["provenance"]["command"]
    assert "--system-prompt" not in plain["provenance"]["command"]


def test_fewshot_as_multiturn_with_chat_template(tmp_path, tiny_model, bench, contexts, tiny_tokenizer):
    """With the chat template: the system prompt is its system turn; one user turn holds the shot and the
    question, or (--fewshot-as-multiturn) the shot is its own user/assistant exchange. The rebuilt `wb eval`
    command reproduces the run's settings."""
    single = run(tiny_model, bench, tmp_path / "single.json", chat_template=True, system_prompt=SYSTEM)
    single_contexts = list(contexts)
    contexts.clear()
    multi = run(tiny_model, bench, tmp_path / "multi.json", chat_template=True, system_prompt=SYSTEM,
                fewshot_as_multiturn=True)
    for context in single_contexts:
        assert context.startswith(f"<|im_start|>system\n{SYSTEM}\n\n")
        assert context.count("<|im_start|>user") == 1 and context.count("<|im_start|>assistant") == 1
    for context in contexts:
        assert context.startswith(f"<|im_start|>system\n{SYSTEM}\n\n")
        assert context.count("<|im_start|>user") == 2 and context.count("<|im_start|>assistant") == 2
    assert multi["provenance"]["settings"]["fewshot_as_multiturn"] is True
    assert single["provenance"]["settings"]["fewshot_as_multiturn"] is False

    argv = shlex.split(multi["provenance"]["command"])
    assert argv[0] == "wb" and "--fewshot-as-multiturn" in argv and "--chat-template" in argv
    argv[argv.index("--out") + 1] = str(tmp_path / "again.json")
    result = CliRunner().invoke(wb, argv[1:])
    assert result.exit_code == 0, result.output
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["provenance"]["settings"] == multi["provenance"]["settings"]
    assert again["results"] == multi["results"]


def test_fewshot_as_multiturn_needs_the_chat_template(tmp_path, tiny_model, bench):
    base = ["eval", "--model", str(tiny_model), "--data-dir", bench, "--out", str(tmp_path / "R.json")]
    for extra in ([], ["--no-chat-template"]):
        result = CliRunner().invoke(wb, [*base, "--fewshot-as-multiturn", *extra])
        assert_one_error(result, "--fewshot-as-multiturn needs --chat-template")
    assert_one_error(CliRunner().invoke(wb, [*base, "--system-prompt", "  "]), "--system-prompt is empty")
    assert not (tmp_path / "R.json").exists()


def test_gen_data_system_prompt_is_the_system_turn(tmp_path, tiny_model, tiny_tokenizer, monkeypatch):
    """--gen-data: the system prompt is the chat template's system message (before a record's own system
    text); without the template it is the first line of the plain prompt."""
    from workbench.evals import generate

    seen: list[list[str]] = []
    original = generate.generate

    def spy(model, tokenizer, prompts, **kwargs):
        seen.append(list(prompts))
        return original(model, tokenizer, prompts, **kwargs)

    monkeypatch.setattr(generate, "generate", spy)
    data = tmp_path / "gen.json"
    data.write_text(json.dumps([{"instruction": "Name a colour.", "input": "", "output": "red"},
                                {"instruction": "Name a fruit.", "input": "", "output": "fig", "system": "Be brief."}]),
                    encoding="utf-8")
    chat = evaluate(tiny_model, gen_data=data, max_new_tokens=2, system_prompt=SYSTEM, out=tmp_path / "chat.json")
    evaluate(tiny_model, gen_data=data, max_new_tokens=2, system_prompt=SYSTEM, chat_template=False,
             out=tmp_path / "plain.json")
    expected = [tiny_tokenizer.apply_chat_template([{"role": "system", "content": system},
                                                    {"role": "user", "content": prompt}],
                                                   tokenize=False, add_generation_prompt=True)
                for system, prompt in ((SYSTEM, "Name a colour."), (f"{SYSTEM}\n\nBe brief.", "Name a fruit."))]
    assert seen == [expected, [f"{SYSTEM}\nName a colour.", f"{SYSTEM}\n\nBe brief.\nName a fruit."]]
    assert chat["provenance"]["settings"]["system_prompt"] == SYSTEM


def test_older_results_read_as_the_defaults_and_mismatches(tmp_path, tiny_model, bench):
    """A results file without the new settings reads as what wb did then; a different system prompt or
    fewshot_as_multiturn is a reason not to re-use it."""
    old = {"chat_template": None, "tasks": ["custom"]}
    assert [recorded_setting(old, k) for k in ("system_prompt", "fewshot_as_multiturn", "backend")] == [None, False, "hf"]
    assert recorded_setting({"chat_template": True}, "fewshot_as_multiturn") is True

    out = tmp_path / "R.json"
    run(tiny_model, bench, out)
    data = json.loads(out.read_text())
    for key in ("system_prompt", "fewshot_as_multiturn", "backend", "max_model_len"):
        del data["provenance"]["settings"][key]
    out.write_text(json.dumps(data))
    from workbench.provenance import weight_fingerprints

    wanted = {"tasks": [], "num_fewshot": 1, "limit": 2, "data_dir": [bench], "gen_data": None, "batch_size": "auto",
              "chat_template": None, "max_new_tokens": 128, "dtype": "auto", "system_prompt": None,
              "fewshot_as_multiturn": False, "backend": "hf", "max_model_len": None}
    candidate = Candidate("m", tiny_model, None)
    assert reuse_mismatches(load_results(out), candidate, wanted, weight_fingerprints) == []
    assert reuse_mismatches(load_results(out), candidate, {**wanted, "system_prompt": OTHER},
                            weight_fingerprints) == ["system_prompt"]
    assert reuse_mismatches(load_results(out), candidate, {**wanted, "backend": "vllm", "max_model_len": 2048},
                            weight_fingerprints) == ["backend", "max_model_len"]


def test_compare_reevaluates_and_report_flags_another_system_prompt(tmp_path, tiny_models, bench):
    """`wb compare` never re-uses a results file made with another system prompt (it says so; --force
    re-evaluates); `wb report` on files with different system prompts flags every row, compares none."""
    base, tuned = tiny_models(), tiny_models(seed=1)
    cmp_dir = tmp_path / "cmp"
    args = ["compare", "--base", str(base), "--tuned", str(tuned), "--data-dir", bench, "--num-fewshot", "0",
            "--limit", "1", "--out", str(cmp_dir), "--json"]
    first = CliRunner().invoke(wb, args)
    assert first.exit_code == 0, first.output
    assert len(json.loads(first.stdout)["evaluated"]) == 2
    again = CliRunner().invoke(wb, [*args, "--system-prompt", OTHER])
    assert_one_error(again, "differs from this comparison in: system_prompt; pass --force")
    forced = CliRunner().invoke(wb, [*args, "--system-prompt", OTHER, "--force"])
    assert forced.exit_code == 0, forced.output
    assert sorted(json.loads(forced.stdout)["evaluated"]) == sorted([base.name, tuned.name])
    same = CliRunner().invoke(wb, [*args, "--system-prompt", OTHER])
    assert same.exit_code == 0 and json.loads(same.stdout)["reused"] == [base.name, tuned.name]
    files = [cmp_dir / f"{name}.json" for name in (base.name, tuned.name)]
    assert [json.loads(f.read_text())["provenance"]["settings"]["system_prompt"] for f in files] == [OTHER, OTHER]

    plain = tmp_path / "plain.json"
    evaluate(base, data_dir=[bench], num_fewshot=0, limit=1, out=plain)
    from workbench.report import sections
    from workbench.report.render import render_report

    models = [load_results(plain), load_results(files[1])]
    rows = sections.summary_rows(models, 0)
    assert rows and all(row.changes[1] is None for row in rows)
    assert all(any(f"system prompt none vs {OTHER!r}" in flag for flag in row.flags) for row in rows)
    assert ("system_prompt", [None, OTHER]) in sections.settings_differences(models)
    page = tmp_path / "report.html"
    render_report([plain, files[1]], page)
    assert f"system prompt none vs {OTHER!r}".replace("'", "&#39;") in page.read_text(encoding="utf-8")


@pytest.mark.parametrize(("settings", "message"), [
    ({"system_prompt": 5}, "provenance['settings']['system_prompt'] must be a string or null, not 5"),
    ({"fewshot_as_multiturn": "yes"}, "provenance['settings']['fewshot_as_multiturn'] must be true or false"),
    ({"fewshot_as_multiturn": None}, "provenance['settings']['fewshot_as_multiturn'] must be true or false"),
    ({"backend": "tgi"}, "provenance['settings']['backend'] must be one of hf, vllm, not 'tgi'"),
    ({"max_model_len": -1}, "provenance['settings']['max_model_len'] must be a whole number from 0 to 1e12, not -1"),
])
def test_crafted_settings_are_refused(tmp_path, settings, message):
    from workbench.errors import WorkbenchError
    from workbench.evals.results import check_results

    data = {"wb_results_version": 1, "name": "m", "results": {}, "provenance": {"settings": {}}}
    check_results(data, tmp_path / "R.json")
    data["provenance"]["settings"] = settings
    with pytest.raises(WorkbenchError) as err:
        check_results(data, tmp_path / "R.json")
    assert err.value.line() == f"results file: {message} ({tmp_path / 'R.json'})"
