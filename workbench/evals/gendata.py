"""Prompt/reference pairs for the generation metrics: alpaca records or AdvertiseGen lines.

A file is either one JSON array or JSON lines (AdvertiseGen's `dev.json` is JSON lines despite its
name). Each record is read the way LLaMA-Factory reads its datasets:
- alpaca: `instruction` and `input` joined by a newline (input only when non-empty) is the prompt,
  `output` the reference; optional `system` and `history` ([[question, answer], ...]) become chat turns;
- AdvertiseGen: `content` is the prompt, `summary` the reference.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from workbench.errors import WorkbenchError


@dataclass(frozen=True)
class GenItem:
    id: str | int
    prompt: str
    reference: str
    system: str | None = None
    history: list[tuple[str, str]] = field(default_factory=list)

    def messages(self) -> list[dict[str, str]]:
        """The conversation a chat template renders: system, earlier turns, then the prompt."""
        turns = [{"role": "system", "content": self.system}] if self.system else []
        for question, answer in self.history:
            turns += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        return [*turns, {"role": "user", "content": self.prompt}]

    def plain_text(self) -> str:
        """The prompt without a chat template: earlier turns, then the prompt, one per line."""
        parts = [self.system] if self.system else []
        for question, answer in self.history:
            parts += [question, answer]
        return "\n".join([*parts, self.prompt])


def load_gen_data(path: Path) -> list[GenItem]:
    """Every record of `path` as a GenItem; a record of neither format fails with its position."""
    records = _records(path)
    if not records:
        raise WorkbenchError("no records", path)
    return [_item(record, index, where, path) for index, (where, record) in enumerate(records)]


def _records(path: Path) -> list[tuple[str, object]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise WorkbenchError(f"not UTF-8 text ({exc.reason} at byte {exc.start})", path) from None
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise WorkbenchError(f"not valid JSON ({exc.msg})", f"{path}:{exc.lineno}") from None
        return [(f"{path}[{i}]", row) for i, row in enumerate(rows)]
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                records.append((f"{path}:{number}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise WorkbenchError(f"not a JSON line ({exc.msg})", f"{path}:{number}") from None
    return records


def _item(record: object, index: int, where: str, path: Path) -> GenItem:
    if isinstance(record, dict) and "instruction" in record and "output" in record:
        query = [str(record["instruction"])]
        if record.get("input"):
            query.append(str(record["input"]))
        history = record.get("history") or []
        if not all(isinstance(turn, (list, tuple)) and len(turn) == 2 for turn in history):
            raise WorkbenchError("history must be a list of [question, answer] pairs", where)
        return GenItem(
            id=record.get("id", index),
            prompt="\n".join(query),
            reference=str(record["output"]),
            system=record.get("system") or None,
            history=[(str(q), str(a)) for q, a in history],
        )
    if isinstance(record, dict) and "content" in record and "summary" in record:
        return GenItem(id=record.get("id", index), prompt=str(record["content"]), reference=str(record["summary"]))
    raise WorkbenchError("expected an alpaca record (instruction, input, output) or content/summary", where)
