"""Preference data: records with a prompt, a chosen and a rejected answer -> token ids for trl.

Formats, detected per file (LLaMA-Factory's `ranking: true` datasets and trl's plain layout):

- alpaca: `instruction`, `input`, optional `system` and `history`, with `chosen` and `rejected` strings;
- sharegpt: `conversations` (or `messages`) ending with the user's turn, and `chosen` / `rejected`
  messages (`{"from": "gpt", "value": ...}` or `{"role": "assistant", "content": ...}`);
- pairs: `prompt` (a string, or a list of messages) with `chosen` / `rejected` (strings, or lists of
  messages ending with the assistant's answer, trl's conversational layout).

Each side is converted with data.py's converters (the same checks as SFT: roles in order, text that is
text, a non-empty answer), so prompt and answer are chat messages. A record that cannot be trained on
is dropped and counted per reason, naming where the first one of each reason is (file:line for JSON
Lines, file record N for a JSON array); a pair whose chosen answer equals the rejected one is dropped
too (it carries no preference: its loss gradient is zero). A malformed file is one error.

Encoding (`encode_pairs`): the prompt is what the chat template renders with the generation prompt,
tokenized as SFT does (the template's text, no special tokens added), so `prompt_ids` are exactly
what inference feeds; each answer is the rendered answer up to and including the end-of-turn token
(the template's glue after it is dropped, as after SFT's last answer). Truncation to `cutoff_len`
follows LLaMA-Factory's pairwise preprocessing (`infer_seqlen` on the prompt and the longer answer:
answers shorter than half the room are kept whole and the prompt is cut; otherwise both are cut in
proportion), with two differences: the assistant header at the end of the prompt is kept whole, and
each cut answer keeps its end-of-turn token (LLaMA-Factory's cut loses it).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from jinja2 import TemplateError

from workbench.errors import WorkbenchError
from workbench.train.data import (
    SHAREGPT_ROLES,
    Conversation,
    DataFile,
    Dropped,
    _from_alpaca,
    _from_sharegpt,
    _parse_records,
    _read_bytes,
    refuse_empty,
)
from workbench.train.datasets import DataSource, shown_names
from workbench.train.templates import ChatTemplate

PREF_FORMATS = ("auto", "alpaca", "sharegpt", "pairs")
# LLaMA-Factory's dataset_info.json column keys -> the names the converters read
CANONICAL = {"prompt": "instruction", "query": "input", "messages": "conversations", "system": "system",
             "history": "history", "chosen": "chosen", "rejected": "rejected", "tools": "tools"}


@dataclass
class Pair:
    """A prompt (chat messages, system first when present) with two answers (assistant messages)."""

    prompt: list[dict]
    chosen: dict
    rejected: dict
    tools: list | None = None


@dataclass
class LoadedPairs:
    files: list[DataFile]
    pairs: list[Pair]

    def summary(self) -> dict:
        return {"files": [vars(f) for f in self.files], "records": sum(f.records for f in self.files),
                "kept": len(self.pairs)}


@dataclass
class EncodedPairs:
    examples: list[dict]  # {"prompt_ids", "chosen_ids", "rejected_ids"}
    dropped: Counter = field(default_factory=Counter)
    truncated: int = 0

    def summary(self) -> dict:
        tokens = sum(len(e["prompt_ids"]) * 2 + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in self.examples)
        learned = sum(len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in self.examples)
        return {"examples": len(self.examples), "dropped": dict(self.dropped), "truncated": self.truncated,
                "tokens": tokens, "learned_tokens": learned}


def load_pairs(sources: list[DataSource], max_samples: int | None = None) -> LoadedPairs:
    """Read every file (its first `max_samples` records), detect its format, convert and filter."""
    files: list[DataFile] = []
    pairs: list[Pair] = []
    for source in sources:
        raw = _read_bytes(source.path)
        records = _parse_records(raw, source.path)
        places = _places(raw, source.path, len(records))
        if max_samples is not None:
            records = records[:max_samples]
        records = [_renamed(r, source.columns) for r in records]
        fmt = _detect(records, source.formatting, source.path)
        dropped: Counter[str] = Counter()
        first: dict[str, str] = {}
        for record, place in zip(records, places):
            try:
                pairs.append(_convert(record, fmt, source.tags))
            except Dropped as reason:
                dropped[str(reason)] += 1
                first.setdefault(str(reason), place)
        counted = {f"{reason} (first: {first[reason]})": n for reason, n in dropped.items()}
        files.append(DataFile(str(source.path), hashlib.sha256(raw).hexdigest(), fmt, len(records),
                              len(records) - sum(dropped.values()), counted, source.name))
    if not pairs:
        refuse_empty("preference dataset", files)
    return LoadedPairs(files, pairs)


def _places(raw: bytes, path: Path, count: int) -> list[str]:
    """Where each record is: file:line for JSON Lines, `file record N` for a JSON array."""
    text = raw.decode("utf-8-sig")
    if text.lstrip().startswith("["):
        return [f"{path} record {i}" for i in range(count)]
    return [f"{path}:{n}" for n, line in enumerate(text.splitlines(), start=1) if line.strip()]


def _renamed(record: dict, columns: dict[str, str]) -> dict:
    """dataset_info.json's `columns` applied: the record's columns under the names the converters read."""
    if not columns:
        return record
    renamed = {k: v for k, v in record.items() if k not in columns.values()}
    for key, column in columns.items():
        if key in CANONICAL and column in record:
            renamed[CANONICAL[key]] = record[column]
    return renamed


def _detect(records: list[dict], fmt: str, path: Path) -> str:
    if fmt not in PREF_FORMATS:
        raise WorkbenchError(f"unknown preference data format {fmt!r}; use one of {', '.join(PREF_FORMATS)}", path)
    if fmt != "auto":
        return fmt
    if not records:
        raise WorkbenchError("the preference data file has no records", path)
    keys = set(records[0])
    if "instruction" in keys:
        return "alpaca"
    if "conversations" in keys or "messages" in keys:
        return "sharegpt"
    if "prompt" in keys:
        return "pairs"
    raise WorkbenchError(
        f"unknown preference data format: records have keys {shown_names(sorted(keys))}; expected alpaca "
        "(instruction/input with chosen/rejected), sharegpt (conversations with chosen/rejected messages) or "
        "prompt/chosen/rejected",
        path,
    )


def _convert(record: dict, fmt: str, tags: dict[str, str]) -> Pair:
    if "chosen" not in record or "rejected" not in record:
        raise Dropped("missing chosen/rejected")
    if fmt == "alpaca":
        if not isinstance(record["chosen"], str) or not isinstance(record["rejected"], str):
            raise Dropped("chosen/rejected is not text")
        sides = [_from_alpaca({**record, "output": record[side]}) for side in ("chosen", "rejected")]
    elif fmt == "sharegpt":
        turns = record.get("conversations", record.get("messages"))
        if not isinstance(turns, list):
            raise Dropped("conversations/messages is not a list")
        sides = [_from_sharegpt({"conversations": [_tagged(t, tags) for t in [*turns, _answer(record[side])]],
                                 "system": record.get("system"), "tools": record.get("tools")})
                 for side in ("chosen", "rejected")]
    else:
        if "prompt" not in record:  # the format is detected from the first record only
            raise Dropped("missing prompt")
        prompt = record["prompt"]
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        if not isinstance(prompt, list):
            raise Dropped("prompt is neither text nor a list of messages")
        sides = [_from_sharegpt({"messages": [*prompt, *_answers(record[side])], "tools": record.get("tools")})
                 for side in ("chosen", "rejected")]
    return _pair(*sides)


def _answer(value) -> dict:
    """A sharegpt `chosen`/`rejected` message (an object); a bare string is taken as the answer's text."""
    if isinstance(value, str):
        return {"from": "gpt", "value": value}
    if not isinstance(value, dict):
        raise Dropped("chosen/rejected is not a message")
    return value


def _answers(value) -> list:
    """trl's chosen/rejected: a string, or a list of messages."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if not isinstance(value, list):
        raise Dropped("chosen/rejected is neither text nor a list of messages")
    return value


def _tagged(turn, tags: dict[str, str]):
    """A sharegpt turn under dataset_info.json's `tags` (role_tag, content_tag, user_tag, ...) -> from/value."""
    if not tags or not isinstance(turn, dict):
        return turn
    role_key, content_key = tags.get("role_tag", "from"), tags.get("content_tag", "value")
    if role_key not in turn or not isinstance(turn[role_key], str):
        return turn  # a missing or non-text role: data.py's converter drops the record
    roles = {tags.get(f"{name}_tag"): name for name in ("user", "assistant", "observation", "function", "system")}
    role = roles.get(turn[role_key], turn[role_key])
    role = {"function": "function_call"}.get(role, role)
    return {"from": role if role in SHAREGPT_ROLES else turn[role_key], "value": turn.get(content_key)}


def _pair(chosen: Conversation, rejected: Conversation) -> Pair:
    """The two conversations must share the prompt and end with one assistant answer each."""
    if chosen.messages[-1]["role"] != "assistant" or rejected.messages[-1]["role"] != "assistant":
        raise Dropped("no chosen/rejected answer")
    prompt = chosen.messages[:-1]
    if prompt != rejected.messages[:-1] or not prompt:
        raise Dropped("chosen and rejected do not share the prompt")
    if chosen.messages[-1]["content"] == rejected.messages[-1]["content"]:
        raise Dropped("chosen equals rejected")
    return Pair(prompt, chosen.messages[-1], rejected.messages[-1], chosen.tools)


def encode_pairs(pairs: list[Pair], template: ChatTemplate, tokenizer, cutoff_len: int) -> EncodedPairs:
    """Render and tokenize every pair (one batched tokenizer call); cut to `cutoff_len`."""
    result = EncodedPairs([])
    texts: list[tuple[str, str, str, str]] = []
    for pair in pairs:
        try:
            texts.append(_texts(pair, template, tokenizer))
        except Dropped as reason:
            result.dropped[str(reason)] += 1
    flat = [t for group in texts for t in group]
    ids = iter(tokenizer(flat, add_special_tokens=False)["input_ids"]) if flat else iter(())
    for _ in texts:
        body, header, chosen, rejected = next(ids), next(ids), next(ids), next(ids)
        try:
            chosen, rejected = _learned(chosen, template.eot_id), _learned(rejected, template.eot_id)
        except Dropped as reason:
            result.dropped[str(reason)] += 1
            continue
        body, chosen, rejected, cut = _truncate(body, header, chosen, rejected, cutoff_len)
        result.examples.append({"prompt_ids": body + header, "chosen_ids": chosen, "rejected_ids": rejected})
        result.truncated += cut
    return result


def _texts(pair: Pair, template: ChatTemplate, tokenizer) -> tuple[str, str, str, str]:
    """(prompt, assistant header, chosen answer, rejected answer) texts, checked to concatenate."""
    try:
        before = template.render(tokenizer, pair.prompt, pair.tools, False)
        header = template.render(tokenizer, pair.prompt, pair.tools, True)
        answers = [template.render(tokenizer, [*pair.prompt, a], pair.tools, False) for a in (pair.chosen, pair.rejected)]
    except (TemplateError, TypeError, ValueError) as exc:
        raise Dropped(f"the chat template failed: {exc}") from None
    if not header.startswith(before) or not all(a.startswith(header) for a in answers):
        raise Dropped("the chat template does not render the conversation incrementally")
    return before, header[len(before):], answers[0][len(header):], answers[1][len(header):]


def _learned(answer: list[int], eot_id: int) -> list[int]:
    """The answer's tokens up to and including its last end-of-turn token."""
    if eot_id not in answer:
        raise Dropped("an answer does not end with the end-of-turn token")
    return answer[: len(answer) - answer[::-1].index(eot_id)]


def _truncate(body: list[int], header: list[int], chosen: list[int], rejected: list[int], cutoff_len: int):
    """Fit prompt + the longer answer into `cutoff_len` (LLaMA-Factory's split), keeping the header and
    each answer's end-of-turn token."""
    longest = max(len(chosen), len(rejected))
    if len(body) + len(header) + longest <= cutoff_len:
        return body, chosen, rejected, False
    room = cutoff_len - len(header)
    if room < 3:
        raise WorkbenchError(
            f"--cutoff-len {cutoff_len} is too small: the chat template's assistant header and an answer's "
            f"end-of-turn token alone take {len(header) + 1} tokens"
        )
    keep_body, keep_answer = infer_seqlen(len(body), longest, room)
    keep_answer = max(keep_answer, 2)
    keep_body = min(keep_body, room - keep_answer)
    return body[:keep_body], _cut(chosen, keep_answer), _cut(rejected, keep_answer), True


def _cut(answer: list[int], keep: int) -> list[int]:
    return answer if len(answer) <= keep else answer[: keep - 1] + answer[-1:]


def infer_seqlen(source_len: int, target_len: int, cutoff_len: int) -> tuple[int, int]:
    """LLaMA-Factory's split of `cutoff_len` between a prompt and an answer (data/processor/processor_utils.py)."""
    if target_len * 2 < cutoff_len:  # the answer fits in half: keep it, cut the prompt
        max_target_len = cutoff_len
    elif source_len * 2 < cutoff_len:  # the prompt fits in half: keep it, cut the answer
        max_target_len = cutoff_len - source_len
    else:  # both are long: in proportion
        max_target_len = int(cutoff_len * (target_len / (source_len + target_len)))
    new_target_len = min(max_target_len, target_len)
    new_source_len = min(max(cutoff_len - new_target_len, 0), source_len)
    return new_source_len, new_target_len
