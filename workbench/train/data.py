"""Training data: JSON/JSONL files in alpaca, sharegpt or prompt/response-column format -> conversations.

Every record becomes a list of chat messages (`{"role", "content"}` with roles system, user,
assistant, tool) that the chat template renders later. Records that cannot be trained on (no
response, roles out of order, text that is not a string) are dropped and counted per reason;
an empty result is an error, never a silent no-op run.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from workbench.errors import WorkbenchError
from workbench.train.datasets import DataSource, shown_names

FORMATS = ("auto", "alpaca", "sharegpt", "columns")
COLUMN_KEYS = ("prompt", "query", "response", "system")
DEFAULT_COLUMNS = {"prompt": "prompt", "response": "response"}
# sharegpt `from` values (LLaMA-Factory's) and OpenAI `role` values -> our roles
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "function_call": "function_call",
    "observation": "tool",
    "tool": "tool",
}
PROMPT_SIDE = ("user", "tool")
# LLaMA-Factory's defaults for a dataset_info.json entry (its DatasetAttr)
LF_COLUMNS = {"alpaca": {"prompt": "instruction", "query": "input", "response": "output"},
              "sharegpt": {"messages": "conversations"}}
LF_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
           "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}


class Dropped(Exception):
    """A record that cannot be trained on; the message is the reason counted in the summary."""


@dataclass
class Conversation:
    """Messages in order (system first when present); `tools` is the record's tool list, if any."""

    messages: list[dict]
    tools: list | None = None


@dataclass
class DataFile:
    path: str
    sha256: str
    format: str
    records: int
    kept: int
    dropped: dict[str, int] = field(default_factory=dict)
    dataset: str | None = None  # its dataset_info.json name, when it was given by name

    def label(self) -> str:
        """How `wb train` names it: `identity: data/identity.json`, or the path alone."""
        return f"{self.dataset}: {self.path}" if self.dataset else self.path


@dataclass
class LoadedData:
    files: list[DataFile]
    conversations: list[Conversation]

    def summary(self) -> dict:
        return {
            "files": [vars(f) for f in self.files],
            "records": sum(f.records for f in self.files),
            "kept": len(self.conversations),
        }


def load_conversations(
    paths: list[Path | DataSource],
    fmt: str = "auto",
    columns: str | None = None,
    max_samples: int | None = None,
) -> LoadedData:
    """Read every file (its first `max_samples` records), detect its format, convert and filter.
    A DataSource from dataset_info.json is read in its declared formatting with its columns and tags
    (--format and --columns apply to plain files); a preference (ranking) source is refused here."""
    if fmt not in FORMATS:
        raise WorkbenchError(f"unknown --format {fmt!r}; use one of {', '.join(FORMATS)}")
    column_map = _parse_columns(columns) if columns else None
    if column_map is not None and fmt not in ("auto", "columns"):
        raise WorkbenchError(f"--columns applies to --format columns, not {fmt}")
    files: list[DataFile] = []
    conversations: list[Conversation] = []
    for item in paths:
        source = item if isinstance(item, DataSource) and item.name is not None else None
        path = item.path if isinstance(item, DataSource) else Path(item)
        if source is not None and source.ranking:
            raise WorkbenchError(f"dataset {source.name!r} is a preference dataset (ranking: true): use --stage dpo",
                                 path)
        raw = _read_bytes(path)
        records = _parse_records(raw, path)
        if max_samples is not None:
            records = records[:max_samples]
        if source is not None:
            file_fmt = source.formatting
            convert = _lf_converter(source, records, path)
        else:
            file_fmt = _detect(records, fmt, column_map, path)
            mapping = column_map or DEFAULT_COLUMNS
            convert = lambda record, f=file_fmt, m=mapping: _convert(record, f, m)  # noqa: E731
        dropped: Counter[str] = Counter()
        kept = 0
        for record in records:
            try:
                conversations.append(convert(record))
                kept += 1
            except Dropped as reason:
                dropped[str(reason)] += 1
        files.append(DataFile(str(path), hashlib.sha256(raw).hexdigest(), file_fmt, len(records), kept, dict(dropped),
                              source.name if source is not None else None))
    if not conversations:
        refuse_empty("dataset", files)
    return LoadedData(files, conversations)


def refuse_empty(what: str, files: list[DataFile], reasons: Counter | None = None) -> NoReturn:
    """The error for a set that filtering left empty: the drop reasons counted (`reasons`, else the
    files' own), naming the files."""
    if reasons is None:
        reasons = Counter()
        for f in files:
            reasons.update(f.dropped)
    detail = "; ".join(f"{reason} ({count})" for reason, count in reasons.most_common()) or "no records"
    raise WorkbenchError(f"the {what} is empty after filtering: {detail}", ",".join(f.path for f in files))


def _lf_converter(source: DataSource, records: list[dict], path: Path):
    """The record -> Conversation function of a dataset_info.json entry (LLaMA-Factory's converters:
    only the mapped columns are read). A mapped column that the records lack is an error."""
    columns = {**LF_COLUMNS[source.formatting], **source.columns}
    tags = {**LF_TAGS, **source.tags}
    if records:
        missing = [f"{key}={column!r}" for key, column in columns.items() if column not in records[0]
                   and key in ("prompt", "response", "messages")]
        if missing:
            raise WorkbenchError(f"dataset {source.name!r}: its columns map {', '.join(missing)}, but the records have "
                                 f"keys {shown_names(sorted(records[0]))}", path)
    if source.formatting == "alpaca":
        return lambda record: _from_lf_alpaca(record, columns)
    return lambda record: _from_lf_sharegpt(record, columns, tags)


def _from_lf_alpaca(record: dict, columns: dict[str, str]) -> Conversation:
    """LLaMA-Factory's AlpacaDatasetConverter: history pairs, prompt + "\n" + query, system, tools."""
    messages = _system(record.get(columns["system"]) if "system" in columns else None)
    history = record.get(columns["history"]) if "history" in columns else None
    if history:
        if not isinstance(history, list) or not all(isinstance(t, list) and len(t) == 2 for t in history):
            raise Dropped("history is not a list of [prompt, response] pairs")
        for prompt, response in history:
            messages += [{"role": "user", "content": _text(prompt, "history")},
                         {"role": "assistant", "content": _text(response, "history")}]
    parts = [_text(record.get(columns["prompt"]), columns["prompt"], required=False)]
    if "query" in columns:
        parts.append(_text(record.get(columns["query"]), columns["query"], required=False))
    messages.append({"role": "user", "content": "\n".join(p for p in parts if p)})
    response = record.get(columns["response"])
    if isinstance(response, list):  # LLaMA-Factory takes a list's first answer
        response = response[0] if response else None
    messages.append({"role": "assistant", "content": _text(response, columns["response"])})
    return _validated(messages, _tools(record.get(columns["tools"])) if "tools" in columns else None)


def _from_lf_sharegpt(record: dict, columns: dict[str, str], tags: dict[str, str]) -> Conversation:
    """LLaMA-Factory's SharegptDatasetConverter with the entry's tags (a system turn only first)."""
    turns = record.get(columns["messages"])
    if not isinstance(turns, list):
        raise Dropped(f"{columns['messages']} is not a list")
    roles = {tags["user_tag"]: "user", tags["assistant_tag"]: "assistant", tags["observation_tag"]: "tool",
             tags["function_tag"]: "function_call"}
    role_tag, content_tag = tags["role_tag"], tags["content_tag"]
    if turns and isinstance(turns[0], dict) and turns[0].get(role_tag) == tags["system_tag"]:
        messages = _system(turns[0].get(content_tag))
        turns = turns[1:]
    else:
        messages = _system(record.get(columns["system"]) if "system" in columns else None)
    for turn in turns:
        if not isinstance(turn, dict):
            raise Dropped("a turn is not an object")
        role = _lookup(roles, turn.get(role_tag))
        if role is None:
            raise Dropped(f"unknown role {turn.get(role_tag)!r}")
        content = _text(turn.get(content_tag), "content")
        if role == "function_call":
            messages.append({"role": "assistant", "content": content, "function_call": True})
        else:
            messages.append({"role": role, "content": content})
    return _validated(messages, _tools(record.get(columns["tools"])) if "tools" in columns else None)


def _parse_columns(spec: str) -> dict[str, str]:
    """`prompt=content,response=summary[,query=..][,system=..]` -> {key: column}."""
    mapping = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, sep, column = part.partition("=")
        key, column = key.strip(), column.strip()
        if not sep or not column or key not in COLUMN_KEYS:
            raise WorkbenchError(f"bad --columns entry {part!r}: use KEY=COLUMN with KEY one of {', '.join(COLUMN_KEYS)}")
        mapping[key] = column
    missing = [k for k in ("prompt", "response") if k not in mapping]
    if missing:
        raise WorkbenchError(f"--columns needs {' and '.join(missing)}= (e.g. prompt=content,response=summary)")
    return mapping


def _read_bytes(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise WorkbenchError(f"cannot read data file: {exc.strerror}", path) from None


def _parse_records(raw: bytes, path: Path) -> list[dict]:
    """A JSON array of objects, or JSON Lines (one object per line); errors name file:line."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise WorkbenchError(f"not UTF-8 text (byte {exc.start})", path) from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise WorkbenchError(f"bad JSON: {exc.msg} (column {exc.colno})", f"{path}:{exc.lineno}") from None
        except RecursionError:
            raise WorkbenchError("bad JSON: nested too deeply", path) from None
        except ValueError as exc:  # not JSONDecodeError: a number over Python's 4300-digit limit
            raise WorkbenchError(f"bad JSON: {str(exc)[:100]}", path) from None
        for index, record in enumerate(records):
            if not isinstance(record, dict):
                raise WorkbenchError(f"record {index} is a {type(record).__name__}, not an object", path)
        return records
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise WorkbenchError(f"bad JSON line: {exc.msg} (column {exc.colno})", f"{path}:{number}") from None
        except RecursionError:
            raise WorkbenchError("bad JSON line: nested too deeply", f"{path}:{number}") from None
        except ValueError as exc:  # not JSONDecodeError: a number over Python's 4300-digit limit
            raise WorkbenchError(f"bad JSON line: {str(exc)[:100]}", f"{path}:{number}") from None
        if not isinstance(record, dict):
            raise WorkbenchError(f"a JSON line must be an object, not {type(record).__name__}", f"{path}:{number}")
        records.append(record)
    return records


def _detect(records: list[dict], fmt: str, column_map: dict | None, path: Path) -> str:
    if fmt != "auto":
        return fmt
    if column_map is not None:
        return "columns"
    if not records:
        return "empty"
    keys = set(records[0])
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if "conversations" in keys or "messages" in keys:
        return "sharegpt"
    if {"prompt", "response"} <= keys:
        return "columns"
    raise WorkbenchError(
        f"unknown data format: records have keys {shown_names(sorted(keys))}; expected alpaca "
        "(instruction/input/output), sharegpt (conversations or messages) or prompt/response; "
        "name the columns with --columns prompt=COL,response=COL or force --format",
        path,
    )


def _convert(record: dict, fmt: str, columns: dict[str, str]) -> Conversation:
    if fmt == "alpaca":
        return _from_alpaca(record)
    if fmt == "sharegpt":
        return _from_sharegpt(record)
    if fmt == "columns":
        return _from_columns(record, columns)
    raise Dropped("empty file")


def _text(value, what: str, required: bool = True) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise Dropped(f"{what} is not text")
    return value


def _from_alpaca(record: dict) -> Conversation:
    if "instruction" not in record or "output" not in record:
        raise Dropped("missing instruction/output")
    messages = _system(record.get("system"))
    history = record.get("history") or []
    if not isinstance(history, list) or not all(isinstance(t, list) and len(t) == 2 for t in history):
        raise Dropped("history is not a list of [prompt, response] pairs")
    for prompt, response in history:
        messages += [{"role": "user", "content": _text(prompt, "history")},
                     {"role": "assistant", "content": _text(response, "history")}]
    instruction = _text(record["instruction"], "instruction")
    query = _text(record.get("input"), "input", required=False)
    messages.append({"role": "user", "content": f"{instruction}\n{query}" if query else instruction})
    messages.append({"role": "assistant", "content": _text(record["output"], "output")})
    return _validated(messages, None)


def _from_columns(record: dict, columns: dict[str, str]) -> Conversation:
    for key in ("prompt", "response"):
        if columns[key] not in record:
            raise Dropped(f"missing column {columns[key]!r}")
    prompt = _text(record[columns["prompt"]], columns["prompt"])
    if "query" in columns:
        query = _text(record.get(columns["query"]), columns["query"], required=False)
        prompt = f"{prompt}\n{query}" if query else prompt
    messages = _system(record.get(columns["system"]) if "system" in columns else None)
    messages.append({"role": "user", "content": prompt})
    messages.append({"role": "assistant", "content": _text(record[columns["response"]], columns["response"])})
    return _validated(messages, None)


def _from_sharegpt(record: dict) -> Conversation:
    turns = record.get("conversations", record.get("messages"))
    if not isinstance(turns, list):
        raise Dropped("conversations/messages is not a list")
    messages = _system(record.get("system"))
    for turn in turns:
        if not isinstance(turn, dict):
            raise Dropped("a turn is not an object")
        role_key, content_key = ("from", "value") if "from" in turn else ("role", "content")
        role = _lookup(SHAREGPT_ROLES, turn.get(role_key))
        if role is None:
            raise Dropped(f"unknown role {turn.get(role_key)!r}")
        if role == "function_call":
            messages.append({"role": "assistant", "content": _text(turn.get(content_key), "function_call"),
                             "function_call": True})
            continue
        message = {"role": role, "content": _text(turn.get(content_key), "content", required="tool_calls" not in turn)}
        if "tool_calls" in turn:
            message["tool_calls"] = turn["tool_calls"]
        messages.append(message)
    return _validated(messages, _tools(record.get("tools")))


def _lookup(table: dict[str, str], key) -> str | None:
    """`table[key]` for a text key; None for anything else (a crafted list or object is not hashable)."""
    return table.get(key) if isinstance(key, str) else None


def _system(value) -> list[dict]:
    text = _text(value, "system", required=False)
    return [{"role": "system", "content": text}] if text else []


def _tools(value) -> list | None:
    if value in (None, "", []):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):  # JSONDecodeError, a >4300-digit number, nesting too deep
            raise Dropped("tools is not valid JSON") from None
    if not isinstance(value, list):
        raise Dropped("tools is not a list")
    return value


def _validated(messages: list[dict], tools: list | None) -> Conversation:
    """System first (if any), then prompt side and assistant alternating; trailing prompts trimmed."""
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if any(m["role"] == "system" for m in body):
        raise Dropped("a system message after the first turn")
    while body and body[-1]["role"] in PROMPT_SIDE:
        body = body[:-1]
    if not body:
        raise Dropped("no response")
    if body[0]["role"] != "user":
        raise Dropped("conversation does not start with the user")
    for previous, current in zip(body, body[1:]):
        if previous["role"] == "assistant" and current["role"] == "assistant":
            raise Dropped("two assistant turns in a row")
    for message in body:
        if message["role"] == "assistant" and not message["content"].strip() and not message.get("tool_calls"):
            raise Dropped("empty response")
    head = messages[:1] if messages and messages[0]["role"] == "system" else []
    return Conversation(head + body, tools)
