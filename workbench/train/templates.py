"""Chat templates: the tokenizer's own (`auto`) or a built-in one (`llama3`, `chatml`, `default`).

Every template is a Jinja chat template rendered by `tokenizer.apply_chat_template`, so training sees
exactly the text inference will build. Resolving a template also finds its end-of-turn token (the
last special token that closes an assistant turn: `<|eot_id|>`, `<|im_end|>`, or EOS for `default`)
and the special tokens it emits, for the untrained-embedding check.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from jinja2 import TemplateError

from workbench.errors import WorkbenchError

TEMPLATES = ("auto", "llama3", "chatml", "default")

# The system message (plus the tool list, when a record has one) comes first in every built-in.
_SYSTEM = (
    "{%- if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set system = '' %}{% set loop_messages = messages %}{% endif %}"
    "{%- if tools %}{% set system = (system + '\\n\\n' if system else '') + 'You can call these functions:\\n'"
    " + (tools | tojson) %}{% endif %}"
)
BUILTINS = {
    # Meta's Llama-3-Instruct template
    "llama3": _SYSTEM
    + "{{- bos_token if bos_token else '' }}"
    "{%- if system %}{{ '<|start_header_id|>system<|end_header_id|>\\n\\n' + system | trim + '<|eot_id|>' }}{% endif %}"
    "{%- for message in loop_messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}",
    # ChatML (Qwen, SmolLM, ...)
    "chatml": _SYSTEM
    + "{%- if system %}{{ '<|im_start|>system\\n' + system + '<|im_end|>\\n' }}{% endif %}"
    "{%- for message in loop_messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
    # plain text for base models without a chat template; EOS ends each answer
    "default": _SYSTEM
    + "{{- bos_token if bos_token else '' }}"
    "{%- if system %}{{ system + '\\n\\n' }}{% endif %}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}{{ 'Human: ' + message['content'] + '\\n' }}"
    "{%- elif message['role'] == 'tool' %}{{ 'Observation: ' + message['content'] + '\\n' }}"
    "{%- else %}{{ 'Assistant: ' + message['content'] + eos_token + '\\n' }}{% endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}",
}
REQUIRED_TOKENS = {
    "llama3": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    "chatml": ["<|im_start|>", "<|im_end|>"],
    "default": [],
}
_PROBE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


@dataclass
class ChatTemplate:
    name: str  # "auto" (the tokenizer's own) or a built-in name
    source: str  # the Jinja text
    eot_id: int  # the token that ends an assistant turn: learned, and kept after truncation
    eot_token: str
    special_ids: list[int]  # special tokens the template itself emits
    tool_calls: bool  # the template renders `tool_calls` of assistant messages

    def render(self, tokenizer, messages: list[dict], tools: list | None, generation_prompt: bool) -> str:
        """The conversation as text; function calls become `tool_calls` where the template renders them."""
        chat = [self._message(m) for m in messages]
        return tokenizer.apply_chat_template(
            chat, tools=tools, chat_template=self.source, tokenize=False, add_generation_prompt=generation_prompt
        )

    def _message(self, message: dict) -> dict:
        if not message.get("function_call"):
            return message
        if self.tool_calls:
            try:
                call = json.loads(message["content"])
            except json.JSONDecodeError:
                call = None
            if isinstance(call, dict) and "name" in call:
                function = {"name": call["name"], "arguments": call.get("arguments", {})}
                return {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": function}]}
        return {"role": "assistant", "content": message["content"]}


def resolve_template(name: str, tokenizer, base: str) -> ChatTemplate:
    """The template `name` for `tokenizer`, checked; an unusable template is an error naming the fix."""
    if name not in TEMPLATES:
        raise WorkbenchError(f"unknown --template {name!r}; use one of {', '.join(TEMPLATES)}")
    if name == "auto":
        source = tokenizer.chat_template
        if isinstance(source, dict):
            source = source.get("default")
        if not source:
            raise WorkbenchError(
                "--template auto: the tokenizer has no chat template (a base model?); use --template default "
                "(plain Human:/Assistant:), chatml or llama3",
                base,
            )
    else:
        source = BUILTINS[name]
        missing = [t for t in REQUIRED_TOKENS[name] if _single_token(tokenizer, t) is None]
        if missing:
            raise WorkbenchError(
                f"--template {name} needs the special token(s) {', '.join(missing)}, which this tokenizer lacks; "
                "use --template auto (the tokenizer's own) or default",
                base,
            )
        if name == "default" and tokenizer.eos_token is None:
            raise WorkbenchError("--template default needs an EOS token to end answers; the tokenizer has none", base)
    template = ChatTemplate(name, source, -1, "", [], "tool_calls" in source)
    special = _special_ids(tokenizer)
    try:
        prompt = template.render(tokenizer, _PROBE[:1], None, True)
        full = template.render(tokenizer, _PROBE, None, False)
    except (TemplateError, TypeError, ValueError) as exc:
        raise WorkbenchError(f"--template {name} cannot render a conversation: {exc}", base) from None
    if not full.startswith(prompt):
        raise WorkbenchError(
            f"--template {name}: the prompt with the generation header is not a prefix of the conversation, "
            "so the answer cannot be told apart; use a built-in template",
            base,
        )
    answer = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
    ends = [t for t in answer if t in special]
    if not ends:
        raise WorkbenchError(
            f"--template {name} ends an answer without a special token, so the model could not learn to stop; "
            "use --template default (it appends EOS) or a chat model's tokenizer",
            base,
        )
    used = tokenizer(full, add_special_tokens=False)["input_ids"]
    template.eot_id = ends[-1]
    template.eot_token = tokenizer.convert_ids_to_tokens(ends[-1])
    template.special_ids = sorted({t for t in used if t in special})
    return template


def _special_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, token in tokenizer.added_tokens_decoder.items() if token.special)
    return ids


def _single_token(tokenizer, text: str) -> int | None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None
