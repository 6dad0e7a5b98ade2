"""Benchmark folders in the shapes their official releases unpack to, and damaged benchmark files.

Built in tmp_path from a couple of subjects of the real mini subsets in ../shared/data:

- C-Eval's ceval-exam.zip: `dev/` (header with `explanation`), `val/`, and `test/` whose files have
  no answer column (header `id,question,A,B,C,D`);
- MMLU's data.tar: `data/{auxiliary_train,dev,val,test}/`, headerless, and the same without the
  `data/` level (as LLaMA-Factory unpacks it);
- CMMLU's release: `{dev,test}/<subject>.csv` with the header `,Question,A,B,C,D,Answer`.

Rules: `NAME=DIR` or the task asked for (`--tasks ceval`) decides what a folder holds; only a bare
`--data-dir DIR` without such tasks is told by its layout.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from clicheck import assert_one_error
from click.testing import CliRunner
from conftest import shared_path

from workbench.cli import wb
from workbench.errors import WorkbenchError
from workbench.evals.layouts import BENCHMARKS, detect, layout_matches, open_local, resolve_data_dirs

MMLU_SUBJECTS = ("abstract_algebra", "nutrition")
CEVAL_SUBJECTS = ("law", "computer_network")
CMMLU_SUBJECTS = ("agronomy", "anatomy")


def read_rows(path: Path) -> list[list[str]]:
    with path.open(encoding="utf-8-sig", newline="") as handle:
        return [row for row in csv.reader(handle) if row]


def write_rows(path: Path, rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as handle:
        csv.writer(handle).writerows(rows)
    return path


def copy(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copyfile(src, dst))


def official_ceval(root: Path) -> Path:
    mini = shared_path("data", "ceval-mini")
    for subject in CEVAL_SUBJECTS:
        for split in ("dev", "val"):
            copy(mini / split / f"{subject}_{split}.csv", root / split / f"{subject}_{split}.csv")
        val = read_rows(mini / "val" / f"{subject}_val.csv")
        assert val[0][:7] == ["id", "question", "A", "B", "C", "D", "answer"]
        write_rows(root / "test" / f"{subject}_test.csv", [row[:6] for row in val])  # no answer column
    return root


def official_mmlu(root: Path, data_level: bool = True) -> Path:
    mini = shared_path("data", "mmlu-mini", "data")
    base = root / "data" if data_level else root
    for subject in MMLU_SUBJECTS:
        for split in ("dev", "val", "test"):
            copy(mini / split / f"{subject}_{split}.csv", base / split / f"{subject}_{split}.csv")
    rows = read_rows(mini / "test" / f"{MMLU_SUBJECTS[0]}_test.csv")[:3]
    for name in ("arc_easy.csv", "mc_test.csv", "race.csv"):  # as in the real auxiliary_train/
        write_rows(base / "auxiliary_train" / name, rows)
    return root


def official_cmmlu(root: Path) -> Path:
    mini = shared_path("data", "cmmlu-mini")
    for subject in CMMLU_SUBJECTS:
        for split in ("dev", "test"):
            copy(mini / split / f"{subject}.csv", root / split / f"{subject}.csv")
    return root


@pytest.fixture
def releases(tmp_path) -> dict[str, Path]:
    return {
        "ceval": official_ceval(tmp_path / "ceval-exam"),
        "mmlu": official_mmlu(tmp_path / "mmlu"),
        "mmlu-flat": official_mmlu(tmp_path / "mmlu-flat", data_level=False),
        "cmmlu": official_cmmlu(tmp_path / "cmmlu"),
    }




def eval_cli(*args: str, model: Path, out: Path):
    return CliRunner().invoke(wb, ["eval", "--model", str(model), *args, "--num-fewshot", "0", "--limit", "1",
                                   "--out", str(out)])


# -- layout detection (a bare --data-dir, no tasks) ---------------------------------------------------
@pytest.mark.parametrize(("release", "benchmark", "root"), [
    ("ceval", "ceval", ""), ("mmlu", "mmlu", "data"), ("mmlu-flat", "mmlu", ""), ("cmmlu", "cmmlu", ""),
])
def test_official_layouts_are_detected(releases, release, benchmark, root):
    folder = releases[release]
    assert detect(folder.resolve()) == benchmark
    local = open_local(str(folder))
    assert local.benchmark.name == benchmark and local.root == (folder / root).resolve()
    expected = {"ceval": CEVAL_SUBJECTS, "mmlu": MMLU_SUBJECTS, "cmmlu": CMMLU_SUBJECTS}[benchmark]
    assert sorted(local.subjects) == sorted(expected)
    for subject in local.subjects:
        for split, docs in local.read(subject).items():
            assert docs, (subject, split)


def test_ceval_test_split_looks_like_mmlu_but_dev_does_not(releases):
    """C-Eval's test/ files have MMLU's names and 6 columns ending in "D"; that alone made the
    official C-Eval folder ambiguous. Its dev/ header rules MMLU out."""
    folder = releases["ceval"].resolve()
    assert read_rows(folder / "test" / "law_test.csv")[0] == ["id", "question", "A", "B", "C", "D"]
    assert layout_matches(folder, BENCHMARKS["ceval"]) and not layout_matches(folder, BENCHMARKS["mmlu"])
    assert not layout_matches(folder, BENCHMARKS["cmmlu"])
    docs = open_local(str(folder)).read("law")
    assert set(docs) == {"val", "dev"} and all(doc["answer"] in "ABCD" for doc in docs["val"])  # test/ is not read


def test_a_folder_holding_two_benchmarks_needs_a_name_or_a_task(releases, tmp_path):
    both = tmp_path / "both"
    shutil.copytree(releases["ceval"], both)
    shutil.copytree(releases["mmlu"] / "data", both / "data")
    with pytest.raises(WorkbenchError, match="it fits mmlu and ceval"):
        detect(both)
    assert [f.benchmark.name for f in resolve_data_dirs([str(both)], {"ceval"})] == ["ceval"]
    assert [f.benchmark.name for f in resolve_data_dirs([str(both)], {"mmlu"})] == ["mmlu"]
    assert [f.benchmark.name for f in resolve_data_dirs([f"mmlu={both}"])] == ["mmlu"]


# -- the task decides -------------------------------------------------------------------------------
def test_the_task_asked_for_decides(releases):
    (local,) = resolve_data_dirs([str(releases["ceval"])], {"ceval"})
    assert local.benchmark.name == "ceval" and sorted(local.subjects) == sorted(CEVAL_SUBJECTS)
    # two bare folders, two benchmarks asked for: each folder's layout tells which is which
    found = resolve_data_dirs([str(releases["cmmlu"]), str(releases["ceval"])], {"ceval", "cmmlu"})
    assert [f.benchmark.name for f in found] == ["cmmlu", "ceval"]
    # NAME= takes its benchmark; the bare folder gets the other one asked for
    found = resolve_data_dirs([f"cmmlu={releases['cmmlu']}", str(releases["ceval"])], {"ceval", "cmmlu"})
    assert [f.benchmark.name for f in found] == ["cmmlu", "ceval"]


def test_a_folder_not_in_the_asked_benchmark_layout_says_what_it_is(releases):
    with pytest.raises(WorkbenchError) as err:
        resolve_data_dirs([str(releases["mmlu"])], {"ceval"})
    message = err.value.message
    assert message.startswith("--data-dir is read as ceval (the benchmark --tasks asks for), but ceval: missing split 'val'")
    assert "it is in mmlu's layout: to read it as mmlu, give --data-dir mmlu=PATH" in message


def test_cli_tasks_ceval_on_the_official_release(releases, tiny_model, tmp_path):
    out = tmp_path / "R.json"
    result = eval_cli("--tasks", "ceval", "--data-dir", str(releases["ceval"]), "--json", model=tiny_model, out=out)
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)["scores"]
    assert set(scores) == {"ceval-valid", *(f"ceval-valid_{s}" for s in CEVAL_SUBJECTS)}
    settings = json.loads(out.read_text())["provenance"]["settings"]
    assert settings["data_dir"] == {"ceval": str(releases["ceval"].resolve())}


def test_cli_bare_official_folders_without_tasks(releases, tiny_model, tmp_path):
    result = eval_cli(*(a for name in ("mmlu-flat", "ceval", "cmmlu") for a in ("--data-dir", str(releases[name]))),
                      "--json", model=tiny_model, out=tmp_path / "R.json")
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)["scores"]
    assert {"mmlu", "ceval-valid", "cmmlu", "mmlu_nutrition", "ceval-valid_law", "cmmlu_anatomy"} <= set(scores)


# -- damaged files: one line naming the file (and line) -----------------------------------------------
@pytest.fixture
def model_dir(tmp_path) -> Path:
    """Data errors stop the run before the model is looked at: any folder does."""
    folder = tmp_path / "model"
    folder.mkdir()
    return folder


def damage_bytes(path: Path, line: int, data: bytes) -> None:
    lines = path.read_bytes().splitlines(keepends=True)
    lines[line - 1] = data
    path.write_bytes(b"".join(lines))


def test_not_utf8(releases, model_dir, tmp_path):
    val = releases["ceval"] / "val" / "law_val.csv"
    damage_bytes(val, 3, "2,caf\u00e9?,a,b,c,d,A\n".encode("latin-1"))
    line = assert_one_error(eval_cli("--tasks", "ceval", "--data-dir", str(releases["ceval"]), model=model_dir,
                                     out=tmp_path / "R.json"), "not UTF-8 text", f"{val.resolve()}:3")
    assert "invalid continuation byte" in line
    # found while telling the layout (a bare folder, no tasks): the same line
    first = releases["cmmlu"] / "test" / "agronomy.csv"
    first.write_bytes(b"\xff\xfe" + first.read_bytes())
    assert_one_error(eval_cli("--data-dir", str(releases["cmmlu"]), model=model_dir, out=tmp_path / "R.json"),
                     "not UTF-8 text", f"{first.resolve()}:1")


def test_wrong_column_count(releases, model_dir, tmp_path):
    test = releases["cmmlu"] / "test" / "anatomy.csv"
    damage_bytes(test, 4, b"3,q,a,b,c\n")
    assert_one_error(eval_cli("--data-dir", f"cmmlu={releases['cmmlu']}", model=model_dir, out=tmp_path / "R.json"),
                     "expected 7 columns, found 5", f"{test.resolve()}:4")


def test_scored_split_without_answers(releases, model_dir, tmp_path):
    """C-Eval's val/ replaced by its answerless test/ files: refused, saying the answers are missing."""
    folder = releases["ceval"]
    for subject in CEVAL_SUBJECTS:
        shutil.copyfile(folder / "test" / f"{subject}_test.csv", folder / "val" / f"{subject}_val.csv")
    path = (folder / "val" / f"{sorted(CEVAL_SUBJECTS)[0]}_val.csv").resolve()
    assert_one_error(eval_cli("--tasks", "ceval", "--data-dir", str(folder), model=model_dir, out=tmp_path / "R.json"),
                     "no 'answer' column", "needs answers", f"{path}:1")


def test_missing_and_bad_answers(releases, model_dir, tmp_path):
    test = releases["mmlu"] / "data" / "test" / "nutrition_test.csv"
    rows = read_rows(test)
    write_rows(test, [["Which?", "a", "b", "c", "d", "B"], [*rows[1][:5], ""], *rows[2:]])
    assert_one_error(eval_cli("--data-dir", str(releases["mmlu"]), model=model_dir, out=tmp_path / "R.json"),
                     "no answer", f"{test.resolve()}:2")
    test = releases["cmmlu"] / "test" / "agronomy.csv"
    rows = read_rows(test)
    write_rows(test, [rows[0], rows[1], [*rows[2][:6], "E"]])
    assert_one_error(eval_cli("--tasks", "cmmlu_agronomy", "--data-dir", str(releases["cmmlu"]), model=model_dir,
                              out=tmp_path / "R.json"), "answer 'E' is not one of A, B, C, D", f"{test.resolve()}:3")


def test_bad_id_and_unreadable_file(releases, model_dir, tmp_path):
    dev = releases["ceval"] / "dev" / "law_dev.csv"
    rows = read_rows(dev)
    write_rows(dev, [rows[0], ["one", *rows[1][1:]], *rows[2:]])
    assert_one_error(eval_cli("--tasks", "ceval-valid_law", "--data-dir", str(releases["ceval"]), model=model_dir,
                              out=tmp_path / "R.json"), "bad value", f"{dev.resolve()}:2")
    test = releases["mmlu"] / "data" / "test" / "abstract_algebra_test.csv"
    test.unlink()
    test.mkdir()  # a folder where the file should be
    assert_one_error(eval_cli("--data-dir", f"mmlu={releases['mmlu']}", model=model_dir, out=tmp_path / "R.json"),
                     str(test.resolve()))
