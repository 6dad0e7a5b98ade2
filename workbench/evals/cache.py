"""`wb eval --cache DIR`: every scored request and generated answer kept in DIR, so a killed run resumes.

Benchmarks: lm-eval's request cache, laid out as lm-eval's `use_cache` lays it out (one SQLite file per
rank, `<prefix>_rank<R>.db`, keyed by lm-eval's own `hash_args(request type, arguments)`, written as each
answer is computed through the model's cache hook). Two things differ, both for safety: the prefix is a
digest of the model's and adapter's weight files (sha256), dtype, device type and backend, so a different
model never reads another's answers; and values are JSON, checked by type when read back, not pickles
(lm-eval's SqliteDict default), so a cache folder from elsewhere cannot run code.

Generation (`--gen-data`): `generations_rank<R>.jsonl`, one line appended per answer as it is produced,
keyed by (the same model digest, the generation settings, the prompt text). Every rank's file is read
back; a damaged line (a run killed mid-write) is skipped and counted, a line of another key never used.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

from workbench.errors import WorkbenchError

REQUEST_TYPES = ("loglikelihood", "loglikelihood_rolling", "generate_until")
COMMIT_EVERY_S = 1.0  # SQLite commits at most this often (and at the end of each request type)


def digest(value: object) -> str:
    """sha256 of a JSON value, keys sorted: a cache key."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()


def model_key(fingerprints: dict, dtype: str, device_type: str, backend: str) -> str:
    """What decides a model's answers besides the request: its weights, the adapter's, dtype, device, backend."""
    return digest({"model_files": fingerprints.get("model_files", {}),
                   "adapter_files": fingerprints.get("adapter_files", {}),
                   "dtype": dtype, "device": device_type, "backend": backend})


# -- lm-eval requests ------------------------------------------------------------------------------
def valid_response(attr: str, value: object) -> object | None:
    """A cached response in the form lm-eval returns it, or None when it is not one of `attr`'s."""
    if attr == "loglikelihood":
        if (isinstance(value, list) and len(value) == 2 and _finite(value[0]) and isinstance(value[1], bool)):
            return (float(value[0]), value[1])
        return None
    if attr == "loglikelihood_rolling":
        return float(value) if _finite(value) else None
    return value if isinstance(value, str) else None


def _finite(value: object) -> bool:
    """A number float() keeps finite (a crafted integer of hundreds of digits overflows it)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _no_links(*paths: Path) -> None:
    """A cache folder from elsewhere may be crafted: a symbolic link where wb reads or writes a cache file
    (or SQLite its journal) would take the read or the write outside the folder."""
    for path in paths:
        if path.is_symlink():
            raise WorkbenchError("a cache file is a symbolic link; a cache folder holds only the files wb writes "
                                 "(delete it to start again)", path)


class RequestStore:
    """One rank's SQLite file of lm-eval responses (lm-eval's CachingLM layout, JSON values)."""

    def __init__(self, folder: Path, key: str, rank: int):
        from sqlitedict import SqliteDict

        self.path = folder / "lm_eval" / f"{key[:32]}_rank{rank}.db"
        self.skipped = 0  # rows that were not a response of their request type
        self._last_commit = time.monotonic()
        _no_links(self.path.parent, self.path, *(Path(f"{self.path}{end}") for end in ("-journal", "-wal", "-shm")))
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _check_database(self.path)
            self.db = SqliteDict(str(self.path), autocommit=False, encode=json.dumps, decode=json.loads,
                                 outer_stack=False)
            len(self.db)  # reads the file: a damaged one fails here, not midway
        except Exception as exc:  # noqa: BLE001 - sqlite3.DatabaseError and friends, raised from its thread
            raise WorkbenchError(f"the request cache cannot be read ({exc}); delete it to start again",
                                 self.path) from None

    def get(self, attr: str, args) -> object | None:
        """The cached response of one request (checked), or None: not cached, or not a valid response."""
        from lm_eval.api.model import hash_args

        try:
            raw = self.db.get(hash_args(attr, args))
        except Exception:  # noqa: BLE001 - a row that is not JSON: computed again
            raw = None
            self.skipped += 1
        if raw is None:
            return None
        value = valid_response(attr, raw)
        self.skipped += value is None
        return value

    def put(self, attr: str, args, value) -> None:
        from lm_eval.api.model import hash_args

        self.db[hash_args(attr, args)] = list(value) if isinstance(value, tuple) else value
        if time.monotonic() - self._last_commit >= COMMIT_EVERY_S:
            self.commit()

    def commit(self) -> None:
        self.db.commit()
        self._last_commit = time.monotonic()

    def close(self) -> None:
        self.db.commit()
        self.db.close()


def _check_database(path: Path) -> None:
    """Open and check the file here, in this thread: SqliteDict's own thread would print a traceback."""
    import sqlite3

    if not path.exists():
        return
    connection = sqlite3.connect(str(path))
    try:
        status = connection.execute("PRAGMA quick_check").fetchone()
    finally:
        connection.close()
    if status != ("ok",):
        raise sqlite3.DatabaseError(f"integrity check: {status[0] if status else 'no answer'}")


class _Hook:
    """The model's cache hook (lm-eval's HFLM calls `add_partial` once per answer it computes): stores the
    answer when a cache is kept and advances the progress bar."""

    def __init__(self, store: RequestStore | None, advance: Callable[[int], None]):
        self.store, self.advance, self.seen = store, advance, 0
        self.dbdict = None  # what lm-eval's CacheHook has; nothing reads it here

    def add_partial(self, attr: str, req, res) -> None:
        if self.store is not None and attr in REQUEST_TYPES:
            self.store.put(attr, req, res)
        self.seen += 1
        self.advance(1)


class RequestLayer:
    """Between lm-eval's evaluator and the model: the cache lookup, the counts, the progress.

    Installed on the model object itself (its `loglikelihood`, `loglikelihood_rolling`, `generate_until`),
    so that simple_evaluate still gets lm-eval's own LM class; the model's own progress bars are silenced
    (`disable_tqdm`): the run's one bar counts every request, cached or computed.
    """

    def __init__(self, lm, store: RequestStore | None, progress, task_objects: list):
        self.lm, self.store, self.progress = lm, store, progress
        self.tasks = task_objects
        self.counts: dict[str, dict[str, int]] = {}
        self.announced: dict[str, int] | None = None
        self.hook = _Hook(store, progress.advance)
        lm.set_cache_hook(self.hook)
        for attr in REQUEST_TYPES:
            setattr(lm, attr, self._wrap(attr, getattr(lm, attr)))

    def _wrap(self, attr: str, compute):
        def run(requests: list, disable_tqdm: bool = False) -> list:
            self._announce(attr, len(requests))
            results: list = [self.store.get(attr, req.args) if self.store else None for req in requests]
            if self._all_or_none(attr) and any_rank(any(r is None for r in results), self.lm):
                results = [None] * len(requests)
            missing = [req for req, result in zip(requests, results) if result is None]
            self.progress.advance(len(requests) - len(missing))
            counts = self.counts.setdefault(attr, {"requests": 0, "from_cache": 0})
            counts["requests"] += len(requests)
            counts["from_cache"] += len(requests) - len(missing)
            if missing:
                seen = self.hook.seen
                answers = compute(missing, disable_tqdm=True)
                self.progress.advance(len(missing) - (self.hook.seen - seen))  # answers the hook did not see
                if self.store is not None:  # as lm-eval's CachingLM: every answer, reported by the hook or not
                    for req, answer in zip(missing, answers):
                        self.store.put(attr, req.args, answer)
                computed = iter(answers)
                results = [next(computed) if result is None else result for result in results]
            if self.store is not None:
                self.store.commit()
            return results

        return run

    def _all_or_none(self, attr: str) -> bool:
        """Whether, under several processes, the model's own call meets the other ranks midway (lm-eval's
        HFLM pads rolling windows and picks an automatic batch size by all_gather): then a rank with every
        answer cached must still compute them all whenever another rank computes, or both would wait forever."""
        if self.store is None or getattr(self.lm, "world_size", 1) <= 1:
            return False
        return attr == "loglikelihood_rolling" or getattr(self.lm, "batch_size", None) == "auto"

    def _announce(self, attr: str, count: int) -> None:
        """The progress total: at the first request, every request the built tasks hold (all types); at
        each type's start, what it has more than that (lm-eval pads ranks to equal counts)."""
        if self.announced is None:
            self.announced = {}
            for task in _leaf_tasks(self.tasks):
                for instance in getattr(task, "instances", None) or ():
                    kind = instance.request_type
                    self.announced[kind] = self.announced.get(kind, 0) + instance.repeats
            self.progress.add_total(sum(self.announced.values()))
        extra = count - self.announced.get(attr, 0)
        self.announced[attr] = count
        if extra:
            self.progress.add_total(extra)

    def close(self) -> None:
        if self.store is not None:
            self.store.close()


def any_rank(flag: bool, lm) -> bool:
    """True on every rank when `flag` is true on one (an all_reduce over lm-eval's model's processes)."""
    import torch
    import torch.distributed as dist

    value = torch.tensor([int(flag)], device=lm.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def summed_counts(per_rank: list[dict[str, dict[str, int]]]) -> dict:
    """RESULTS.json's cache figures of lm-eval's requests: every rank's, by request type and in all."""
    by_type: dict[str, dict[str, int]] = {}
    for counts in per_rank:
        for attr, figures in counts.items():
            into = by_type.setdefault(attr, {"requests": 0, "from_cache": 0})
            for name in into:
                into[name] += figures[name]
    return {"requests": sum(f["requests"] for f in by_type.values()),
            "from_cache": sum(f["from_cache"] for f in by_type.values()), **by_type}


def _leaf_tasks(nodes) -> list:
    """The lm-eval Task objects among `nodes` (load_tasks' list of tasks and {group: children} dicts)."""
    found: list = []
    stack = list(nodes.values()) if isinstance(nodes, dict) else list(nodes)
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
        elif hasattr(node, "instances"):
            found.append(node)
    return found


# -- generation ------------------------------------------------------------------------------------
class GenerationStore:
    """`generations_rank<R>.jsonl` lines {"key", "prompt", "prediction", "new_tokens"} of one settings key."""

    def __init__(self, folder: Path, key: str, rank: int, max_new_tokens: int):
        self.folder, self.key, self.max_new_tokens = folder, key, max_new_tokens
        self.path = folder / f"generations_rank{rank}.jsonl"
        self.skipped: dict[str, int] = {}  # file name -> damaged lines
        self.answers: dict[str, tuple[str, int]] = {}
        self._torn = False  # this rank's file ends inside a line (a run killed mid-write)

    def load(self) -> dict[str, tuple[str, int]]:
        """{prompt: (prediction, new tokens)} from every rank's file; damaged lines are counted, not used."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            files = sorted(self.folder.glob("generations_rank*.jsonl"))
        except OSError as exc:
            raise WorkbenchError(f"the cache folder cannot be used: {exc.strerror or exc}", self.folder) from None
        _no_links(self.path, *files)
        if self.path.exists() and not self.path.is_file():
            raise WorkbenchError("the generation cache is not a file; delete it to start again", self.path)
        for file in files:
            if not file.is_file():
                continue
            with file.open("rb") as handle:
                for raw in handle:
                    if file == self.path:
                        self._torn = not raw.endswith(b"\n")
                    answer = self._parse(raw)
                    if answer is False:
                        self.skipped[file.name] = self.skipped.get(file.name, 0) + 1
                    elif answer is not None:
                        self.answers[answer[0]] = answer[1:]
        return self.answers

    def _parse(self, raw: bytes):
        """(prompt, prediction, new tokens); None: a line of another key; False: a damaged line."""
        try:
            row = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: nested too deeply
            return False
        if not isinstance(row, dict) or not isinstance(row.get("key"), str):
            return False
        if row["key"] != self.key:
            return None
        prompt, prediction, tokens = row.get("prompt"), row.get("prediction"), row.get("new_tokens")
        if (not isinstance(prompt, str) or not isinstance(prediction, str) or not isinstance(tokens, int)
                or isinstance(tokens, bool) or not 0 <= tokens <= self.max_new_tokens):
            return False
        return prompt, prediction, tokens

    def append(self, answers: list[tuple[str, str, int]]) -> None:
        """Add (prompt, prediction, new tokens) lines, flushed at once: a killed run keeps them."""
        lines = "".join(json.dumps({"key": self.key, "prompt": p, "prediction": t, "new_tokens": n},
                                   ensure_ascii=False) + "\n" for p, t, n in answers)
        if self._torn:  # the torn line stays one damaged line, not two
            lines, self._torn = "\n" + lines, False
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(lines)
            handle.flush()
