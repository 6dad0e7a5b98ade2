"""MMLU, C-Eval and CMMLU in the CSV layouts they are published in, read with the `csv` module.

`custom` is a folder of any subjects in MMLU's layout, scored with MMLU's prompt (see tasks.py).

Each benchmark is described once (`BENCHMARKS`): where its eval and few-shot splits live, the CSV
header it must have, and how a row becomes a document in the schema of the Hugging Face dataset
that lm-eval's own task reads (`cais/mmlu`, `ceval/ceval-exam`, `haonan-li/cmmlu`). Documents
built here are therefore fed unchanged to lm-eval's own prompts, and their `doc_hash` equals the
one an online run computes for the same row.

pandas is deliberately not used: it turns MMLU cells such as "None" into NaN and "0.80" into 0.8.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from workbench.errors import WorkbenchError

LETTERS = ("A", "B", "C", "D")


@dataclass(frozen=True)
class Split:
    folder: str  # folder of the CSV files inside the benchmark folder
    key: str  # split name in lm-eval's task config (test_split / validation_split / fewshot_split)


@dataclass(frozen=True)
class Benchmark:
    name: str  # what --data-dir NAME=PATH calls it
    group: str  # lm-eval's group of all its subjects
    eval_split: Split
    fewshot_split: Split
    file_pattern: str  # file name of a subject's split, with {subject} and {split}
    headers: tuple[tuple[str, ...], ...]  # accepted headers; () for headerless files
    answer_column: str
    to_doc: Callable[[dict[str, str], str], dict]  # (row by column name, subject) -> document
    columns: tuple[str, ...] = ()  # column names of a headerless file
    subdir: str | None = None  # optional folder the splits may sit in (MMLU's original "data/")

    @property
    def splits(self) -> tuple[Split, Split]:
        return (self.eval_split, self.fewshot_split)

    def filename(self, subject: str, split: Split) -> str:
        return self.file_pattern.format(subject=subject, split=split.folder)


def _mmlu_doc(row: dict[str, str], subject: str) -> dict:
    # cais/mmlu: question, subject, choices, answer (ClassLabel index)
    return {
        "question": row["question"],
        "subject": subject,
        "choices": [row[letter] for letter in LETTERS],
        "answer": LETTERS.index(row["answer"]),
    }


def _ceval_doc(row: dict[str, str], subject: str) -> dict:
    # ceval/ceval-exam: id (int), question, A-D, answer (letter), explanation ("" on val/test)
    return {
        "id": int(row["id"]),
        "question": row["question"],
        **{letter: row[letter] for letter in LETTERS},
        "answer": row["answer"],
        "explanation": row.get("explanation", ""),
    }


def _cmmlu_doc(row: dict[str, str], subject: str) -> dict:
    # haonan-li/cmmlu: the unnamed index column is dropped
    return {"Question": row["Question"], **{letter: row[letter] for letter in LETTERS}, "Answer": row["Answer"]}


MMLU_COLUMNS = ("question", "A", "B", "C", "D", "answer")
BENCHMARKS: dict[str, Benchmark] = {
    "mmlu": Benchmark(
        name="mmlu",
        group="mmlu",
        eval_split=Split("test", "test"),
        fewshot_split=Split("dev", "dev"),
        file_pattern="{subject}_{split}.csv",
        headers=(),
        answer_column="answer",
        to_doc=_mmlu_doc,
        columns=MMLU_COLUMNS,
        subdir="data",
    ),
    "ceval": Benchmark(
        name="ceval",
        group="ceval-valid",
        eval_split=Split("val", "val"),
        fewshot_split=Split("dev", "dev"),
        file_pattern="{subject}_{split}.csv",
        headers=(
            ("id", "question", "A", "B", "C", "D", "answer"),
            ("id", "question", "A", "B", "C", "D", "answer", "explanation"),
        ),
        answer_column="answer",
        to_doc=_ceval_doc,
    ),
    "cmmlu": Benchmark(
        name="cmmlu",
        group="cmmlu",
        eval_split=Split("test", "test"),
        fewshot_split=Split("dev", "dev"),
        file_pattern="{subject}.csv",
        headers=(("", "Question", "A", "B", "C", "D", "Answer"),),
        answer_column="Answer",
        to_doc=_cmmlu_doc,
    ),
}
CUSTOM = replace(BENCHMARKS["mmlu"], name="custom", group="custom")  # any subjects, MMLU's layout and prompt
NAMED = {**BENCHMARKS, CUSTOM.name: CUSTOM}  # what --data-dir NAME= accepts; layout detection knows BENCHMARKS only
ALIASES = {"ceval-valid": "ceval"}


@dataclass(frozen=True)
class LocalBenchmark:
    """One benchmark folder: which benchmark, where its splits are, which subjects it holds."""

    benchmark: Benchmark
    root: Path  # the folder holding the split folders (DIR or DIR/data)
    given: Path  # the folder named by --data-dir (resolved)
    subjects: tuple[str, ...]

    def path(self, subject: str, split: Split) -> Path:
        return self.root / split.folder / self.benchmark.filename(subject, split)

    def read(self, subject: str) -> dict[str, list[dict]]:
        """{lm-eval split name: documents} of one subject."""
        return {split.key: read_csv(self.path(subject, split), self.benchmark, subject) for split in self.benchmark.splits}


def parse_data_dir(spec: str) -> tuple[str | None, Path]:
    """"NAME=PATH" gives (benchmark name, PATH); a bare PATH gives (None, PATH)."""
    name, sep, rest = spec.partition("=")
    if sep and name.strip().lower() in {*NAMED, *ALIASES}:
        key = name.strip().lower()
        return ALIASES.get(key, key), Path(rest)
    if sep and not Path(spec).exists():
        known = ", ".join(NAMED)
        raise WorkbenchError(f"--data-dir {spec!r}: unknown benchmark {name!r}; use one of {known}, or a bare folder")
    return None, Path(spec)


def open_local(spec: str) -> LocalBenchmark:
    """A --data-dir value, checked: the benchmark (named or told by its layout) and its subjects."""
    name, given = parse_data_dir(spec)
    given = given.resolve()
    if not given.is_dir():
        raise WorkbenchError("--data-dir is not a folder", given)
    name = name or detect(given)
    benchmark = NAMED[name]
    root = _split_root(given, benchmark)
    subjects = _subjects(root, benchmark)
    for subject in subjects:
        for split in benchmark.splits:
            path = root / split.folder / benchmark.filename(subject, split)
            if not path.is_file():
                raise WorkbenchError(f"{benchmark.name}: subject {subject!r} has no {split.folder} split", path)
    return LocalBenchmark(benchmark, root, given, subjects)


def detect(folder: Path) -> str:
    """Which benchmark a folder holds, told by its file names and headers."""
    found = []
    for name, benchmark in BENCHMARKS.items():
        try:
            root = _split_root(folder, benchmark)
            _subjects(root, benchmark)
            if _header_matches(root, benchmark):
                found.append(name)
        except WorkbenchError:
            continue
    if len(found) != 1:
        what = "several benchmarks" if found else "no MMLU, C-Eval or CMMLU layout"
        raise WorkbenchError(
            f"cannot tell which benchmark --data-dir holds ({what}); name it, e.g. --data-dir mmlu=PATH", folder
        )
    return found[0]


def _split_root(folder: Path, benchmark: Benchmark) -> Path:
    """DIR or DIR/<subdir> (MMLU's original `data/`), whichever holds the eval split folder."""
    candidates = [folder / benchmark.subdir, folder] if benchmark.subdir else [folder]
    for root in candidates:
        if (root / benchmark.eval_split.folder).is_dir():
            return root
    where = " or ".join(str(c / benchmark.eval_split.folder) for c in candidates)
    raise WorkbenchError(f"{benchmark.name}: missing split {benchmark.eval_split.folder!r} (no {where})", folder)


def _subjects(root: Path, benchmark: Benchmark) -> tuple[str, ...]:
    folder = root / benchmark.eval_split.folder
    pattern = re.escape(benchmark.file_pattern).replace(r"\{subject\}", "(?P<subject>[^/]+?)")
    pattern = pattern.replace(r"\{split\}", re.escape(benchmark.eval_split.folder))
    matcher = re.compile(f"^{pattern}$")
    subjects = [m["subject"] for p in sorted(folder.glob("*.csv")) if (m := matcher.match(p.name))]
    if not subjects:
        example = benchmark.filename("<subject>", benchmark.eval_split)
        raise WorkbenchError(f"{benchmark.name}: no subjects found (expected {folder / example})", folder)
    return tuple(subjects)


def _header_matches(root: Path, benchmark: Benchmark) -> bool:
    first = sorted((root / benchmark.eval_split.folder).glob("*.csv"))[0]
    with first.open(encoding="utf-8-sig", newline="") as handle:
        row = next(csv.reader(handle), [])
    if benchmark.headers:
        return tuple(row) in benchmark.headers
    return len(row) == len(benchmark.columns) and row[-1] in LETTERS  # a data row, not a header


def read_csv(path: Path, benchmark: Benchmark, subject: str) -> list[dict]:
    """Every row of one split file as a document; a malformed row fails with `file:line`."""
    docs = []
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle)
        columns = benchmark.columns
        start = 1  # physical line a record starts on (records may span lines)
        try:
            if benchmark.headers:
                header = tuple(next(reader, ()))
                if header not in benchmark.headers:
                    expected = " or ".join(",".join(h) for h in benchmark.headers)
                    raise WorkbenchError(f"header is {','.join(header)!r}, expected {expected!r}", f"{path}:1")
                columns = header
                start = reader.line_num + 1
            for row in reader:
                line, start = start, reader.line_num + 1
                if not row:
                    continue
                if len(row) != len(columns):
                    raise WorkbenchError(f"expected {len(columns)} columns, found {len(row)}", f"{path}:{line}")
                docs.append(_to_doc(dict(zip(columns, row)), benchmark, subject, f"{path}:{line}"))
        except csv.Error as exc:
            raise WorkbenchError(f"not valid CSV ({exc})", f"{path}:{reader.line_num}") from None
        except UnicodeDecodeError as exc:
            raise WorkbenchError(f"not UTF-8 text ({exc.reason} at byte {exc.start})", path) from None
    if not docs:
        raise WorkbenchError(f"{benchmark.name}: no rows", path)
    return docs


def _to_doc(row: dict[str, str], benchmark: Benchmark, subject: str, where: str) -> dict:
    answer = row[benchmark.answer_column]
    if answer not in LETTERS:
        raise WorkbenchError(f"answer {answer!r} is not one of {', '.join(LETTERS)}", where)
    try:
        return benchmark.to_doc(row, subject)
    except ValueError as exc:  # C-Eval's id column must be an integer
        raise WorkbenchError(f"bad value: {exc}", where) from None
