"""Conversations -> `input_ids` + `labels` (prompt tokens masked with -100).

How the prompt/answer boundaries are found with any chat template (the tokenizer's own included):
the conversation is rendered incrementally. For the assistant message at index i,

    render(messages[:i])                               ends the prompt so far
    render(messages[:i], add_generation_prompt=True)   adds the assistant header
    render(messages[:i + 1])                           adds the answer and the template's turn end

and each rendering must be a string prefix of the next (checked for every record; a record that
breaks it is dropped and counted). The differences are tokenized one by one (no special tokens
added: the template writes BOS itself), so the prompt tokens are exactly what `apply_chat_template(
..., add_generation_prompt=True)` gives at inference. In an answer's text, the tokens up to and
including the last end-of-turn token are learned; what the template writes after it (ChatML's "\\n")
is template glue, masked, and dropped after the final answer, so every example ends with the
end-of-turn token.

Truncation to `cutoff_len`: whole turns are kept while they fit; when even the first turn does not,
its prompt and answer are cut (the answer gets at least half of the room) and the end-of-turn token
is put back at the end, so the model always learns to stop.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from jinja2 import TemplateError

from workbench.errors import WorkbenchError
from workbench.train.data import Conversation, Dropped
from workbench.train.templates import ChatTemplate

IGNORE = -100


@dataclass
class EncodedSet:
    examples: list[dict]  # {"input_ids": [...], "labels": [...]}
    dropped: Counter = field(default_factory=Counter)
    truncated: int = 0

    def summary(self) -> dict:
        return {"examples": len(self.examples), "dropped": dict(self.dropped), "truncated": self.truncated,
                "tokens": sum(len(e["input_ids"]) for e in self.examples),
                "learned_tokens": sum(sum(1 for t in e["labels"] if t != IGNORE) for e in self.examples)}


def encode_all(
    conversations: list[Conversation],
    template: ChatTemplate,
    tokenizer,
    cutoff_len: int,
    train_on_prompt: bool = False,
) -> EncodedSet:
    """Render, tokenize (one batched call) and label every conversation. LLaMA-Factory's template
    names are encoded by its own rules (templates.encode_lf): its token ids and label masks."""
    if template.lf is not None:
        from workbench.train.templates import encode_lf

        return encode_lf(conversations, template, tokenizer, cutoff_len, train_on_prompt)
    result = EncodedSet([])
    segmented: list[list[tuple[str, str, str]]] = []
    for conversation in conversations:
        try:
            segmented.append(_segments(conversation, template, tokenizer))
        except Dropped as reason:
            result.dropped[str(reason)] += 1
    texts = [text for turns in segmented for turn in turns for text in turn]
    ids = iter(tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else iter(())
    for turns in segmented:
        tokenized = [(next(ids), next(ids), next(ids)) for _ in turns]
        try:
            input_ids, labels, truncated = _assemble(tokenized, template.eot_id, cutoff_len, train_on_prompt)
        except Dropped as reason:
            result.dropped[str(reason)] += 1
            continue
        result.examples.append({"input_ids": input_ids, "labels": labels})
        result.truncated += truncated
    return result


def _segments(conversation: Conversation, template: ChatTemplate, tokenizer) -> list[tuple[str, str, str]]:
    """(prompt, assistant header, answer) texts per assistant turn, checked to concatenate to the whole."""
    messages, tools = conversation.messages, conversation.tools
    turns = []
    consumed = ""
    try:
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = template.render(tokenizer, messages[:i], tools, False)
            header = template.render(tokenizer, messages[:i], tools, True)
            after = template.render(tokenizer, messages[: i + 1], tools, False)
            if not (before.startswith(consumed) and header.startswith(before) and after.startswith(header)):
                raise Dropped("the chat template does not render the conversation incrementally")
            turns.append((before[len(consumed):], header[len(before):], after[len(header):]))
            consumed = after
    except (TemplateError, TypeError, ValueError) as exc:
        raise Dropped(f"the chat template failed: {exc}") from None
    return turns


def _assemble(turns, eot_id: int, cutoff_len: int, train_on_prompt: bool) -> tuple[list[int], list[int], bool]:
    input_ids: list[int] = []
    labels: list[int] = []
    glue: list[int] = []  # the previous turn's tail, added only if another turn follows
    for index, (prompt, header, answer) in enumerate(turns):
        if eot_id not in answer:
            raise Dropped("an answer does not end with the end-of-turn token")
        end = len(answer) - answer[::-1].index(eot_id)
        learned = answer[:end]
        room = cutoff_len - len(input_ids)
        if len(glue) + len(prompt) + len(header) + len(learned) <= room:
            _extend(input_ids, labels, glue, False, train_on_prompt)
            _extend(input_ids, labels, prompt + header, False, train_on_prompt)
            _extend(input_ids, labels, learned, True, train_on_prompt)
            glue = answer[end:]
            continue
        if index == 0:
            prompt, learned = _cut_first_turn(prompt, header, learned, cutoff_len)
            _extend(input_ids, labels, prompt + header, False, train_on_prompt)
            _extend(input_ids, labels, learned, True, train_on_prompt)
        return input_ids, labels, True
    return input_ids, labels, False


def _cut_first_turn(prompt: list[int], header: list[int], learned: list[int], cutoff_len: int):
    """Cut prompt and answer to fit; keep the header and the end-of-turn token whole."""
    content, eot = learned[:-1], learned[-1:]
    room = cutoff_len - len(header) - 1
    if room < 2:
        raise WorkbenchError(
            f"--cutoff-len {cutoff_len} is too small: the chat template's assistant header and end-of-turn token "
            f"alone take {len(header) + 1} tokens"
        )
    keep_answer = min(len(content), max(room - len(prompt), room // 2))
    keep_prompt = min(len(prompt), room - keep_answer)
    return prompt[:keep_prompt], content[:keep_answer] + eot


def _extend(input_ids: list[int], labels: list[int], tokens: list[int], learned: bool, train_on_prompt: bool) -> None:
    input_ids.extend(tokens)
    labels.extend(tokens if (learned or train_on_prompt) else [IGNORE] * len(tokens))
