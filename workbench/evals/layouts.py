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
import io
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


def resolve_data_dirs(specs: list[str], wanted: set[str] | frozenset[str] = frozenset()) -> list[LocalBenchmark]:
    """Every --data-dir value opened, with the benchmark each holds decided in this order:

    1. `NAME=PATH` names it;
    2. the tasks asked for: when they belong to exactly one benchmark (`wanted`, e.g. {"ceval"} for
       `--tasks ceval`) that no `NAME=` folder takes, and one folder is bare, that folder holds it;
    3. otherwise the folder's layout tells (`detect`), preferring the wanted benchmarks when several fit.
    The folder is then checked in the chosen benchmark's layout, whatever decided it.
    """
    parsed = [parse_data_dir(str(spec)) for spec in specs]
    named = {name for name, _ in parsed if name is not None}
    remaining = sorted(set(wanted) - named)
    bare = [path for name, path in parsed if name is None]
    opened = []
    for name, path in parsed:
        if name is None and len(bare) == 1 and len(remaining) == 1:
            opened.append(open_folder(path, remaining[0], by_task=True))
        else:
            opened.append(open_folder(path, name, prefer=remaining))
    return opened


def open_local(spec: str) -> LocalBenchmark:
    """A --data-dir value, checked: the benchmark (named or told by its layout) and its subjects."""
    name, given = parse_data_dir(spec)
    return open_folder(given, name)


def open_folder(given: Path, name: str | None = None, prefer: list[str] = (), by_task: bool = False) -> LocalBenchmark:
    """`given` read as benchmark `name` (None: told by its layout), checked. `by_task`: the name
    comes from --tasks, which the errors then say."""
    given = Path(given).resolve()
    if not given.is_dir():
        raise WorkbenchError("--data-dir is not a folder", given)
    name = name or detect(given, prefer)
    benchmark = NAMED[name]
    try:
        root = _split_root(given, benchmark)
        subjects = _subjects(root, benchmark)
        for subject in subjects:
            for split in benchmark.splits:
                path = root / split.folder / benchmark.filename(subject, split)
                if not path.is_file():
                    raise WorkbenchError(f"{benchmark.name}: subject {subject!r} has no {split.folder} split", path)
    except WorkbenchError as exc:
        if not by_task:
            raise
        try:
            looks = detect(given)
            hint = f"; it is in {looks}'s layout: to read it as {looks}, give --data-dir {looks}=PATH"
        except WorkbenchError:
            hint = ""
        raise WorkbenchError(f"--data-dir is read as {name} (the benchmark --tasks asks for), but {exc.message}{hint}",
                             exc.path) from None
    return LocalBenchmark(benchmark, root, given, subjects)


def detect(folder: Path, prefer: list[str] = ()) -> str:
    """Which benchmark a folder holds, told by its file names and first rows (`layout_matches`).

    Only the eval and few-shot splits are looked at, so the official releases' other folders (MMLU's
    `val/` and `auxiliary_train/`, C-Eval's `test/`, whose files have no answer column) neither help
    nor hurt: C-Eval's `test/<subject>_test.csv` has MMLU's file names and 6 columns ending in "D",
    but its `dev/` files have C-Eval's header, not MMLU's rows. When several layouts fit (a folder
    holding two benchmarks), the `prefer`red ones (the benchmarks of the tasks asked for) are taken.
    """
    found = [name for name, benchmark in BENCHMARKS.items() if layout_matches(folder, benchmark)]
    preferred = [name for name in found if name in prefer]
    if len(found) > 1 and preferred:
        found = preferred
    if len(found) != 1:
        what = f"it fits {' and '.join(found)}" if found else "no MMLU, C-Eval or CMMLU layout"
        raise WorkbenchError(
            f"cannot tell which benchmark --data-dir holds ({what}); name it, e.g. --data-dir mmlu=PATH", folder
        )
    return found[0]


def layout_matches(folder: Path, benchmark: Benchmark) -> bool:
    """Whether `folder` has `benchmark`'s eval and few-shot split folders, a subject file in the eval
    split, and that subject's first row in both splits as the benchmark writes it (its header, or for
    headerless MMLU a data row of 6 cells ending in A-D)."""
    try:
        root = _split_root(folder, benchmark)
        subjects = _subjects(root, benchmark)
    except WorkbenchError:
        return False
    for split in benchmark.splits:
        path = root / split.folder / benchmark.filename(subjects[0], split)
        if not path.is_file() or not _row_fits(_first_row(path), benchmark):
            return False
    return True


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


def _row_fits(row: list[str], benchmark: Benchmark) -> bool:
    if benchmark.headers:
        return tuple(row) in benchmark.headers
    return len(row) == len(benchmark.columns) and row[-1] in LETTERS  # a data row, not a header


def _first_row(path: Path) -> list[str]:
    """The first CSV row of a file (a damaged file fails here, naming it, rather than fitting no layout)."""
    reader = csv.reader(_text_lines(path))
    try:
        return next(reader, [])
    except csv.Error as exc:
        raise WorkbenchError(f"not valid CSV ({exc})", f"{path}:{reader.line_num}") from None


def _text_lines(path: Path) -> io.StringIO:
    """The file's lines as text: UTF-8, a BOM allowed; not UTF-8 fails with the line of the first bad byte."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise WorkbenchError(f"cannot read the file: {exc.strerror or exc}", path) from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise WorkbenchError(f"not UTF-8 text ({exc.reason} at byte {exc.start}; save the file as UTF-8)",
                             f"{path}:{line}") from None
    return io.StringIO(text, newline="")  # lines split as a file opened with newline="" splits them


def read_csv(path: Path, benchmark: Benchmark, subject: str) -> list[dict]:
    """Every row of one split file as a document; a malformed row fails with `file:line`."""
    docs = []
    reader = csv.reader(_text_lines(path))
    columns = benchmark.columns
    start = 1  # physical line a record starts on (records may span lines)
    try:
        if benchmark.headers:
            header = tuple(next(reader, ()))
            if header not in benchmark.headers:
                raise WorkbenchError(_header_problem(header, benchmark), f"{path}:1")
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
    if not docs:
        raise WorkbenchError(f"{benchmark.name}: no rows", path)
    return docs


def _header_problem(header: tuple[str, ...], benchmark: Benchmark) -> str:
    expected = " or ".join(",".join(h) for h in benchmark.headers)
    found = ",".join(header)
    if benchmark.answer_column not in header and any(header == h[: len(header)] for h in benchmark.headers):
        return (f"header is {found!r}: no {benchmark.answer_column!r} column, and this split is scored or used "
                f"as few-shot examples, so it needs answers (expected {expected!r})")
    return f"header is {found!r}, expected {expected!r}"


def _to_doc(row: dict[str, str], benchmark: Benchmark, subject: str, where: str) -> dict:
    answer = row[benchmark.answer_column]
    if not answer.strip():
        raise WorkbenchError(f"no answer (the {benchmark.answer_column!r} cell is empty; it must be one of "
                             f"{', '.join(LETTERS)})", where)
    if answer not in LETTERS:
        raise WorkbenchError(f"answer {answer!r} is not one of {', '.join(LETTERS)}", where)
    try:
        return benchmark.to_doc(row, subject)
    except ValueError as exc:  # C-Eval's id column must be an integer
        raise WorkbenchError(f"bad value: {exc}", where) from None
