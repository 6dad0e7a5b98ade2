"""Chat templates: the tokenizer's own (`auto`) or one of LLaMA-Factory's, by its name.

`auto` renders the tokenizer's Jinja chat template (encode.py finds the prompt/answer boundaries).
Every other name is a LLaMA-Factory template (`llama3`, `qwen`, `qwen3`, `qwen3_nothink`, `chatml`,
`default`, `empty`, ...), copied slot for slot from LLaMA-Factory 0.9.5's data/template.py, and
encoded the way LLaMA-Factory's SFT processor does (`encode_lf`): each message's slots tokenized
one by one, the prompt of a turn (prefix + system + user text + the assistant header) masked, the
answer learned as the slot writes it, its trailing text included (ChatML's "\\n" after <|im_end|>
is learned, as in LLaMA-Factory). Only truncation differs: wb keeps whole turns and the answer's end
(see `encode_lf`). The Jinja source saved with the tokenizer renders exactly the same text, so `wb
chat` prompts as training did.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from jinja2 import TemplateError

from workbench.errors import WorkbenchError
from workbench.train.data import Conversation, Dropped

IGNORE = -100
BOS, EOS = "\x00bos_token", "\x00eos_token"  # LLaMA-Factory's {"bos_token"} / {"eos_token"} slots
CONTENT = "{{content}}"
THOUGHT = "<think>\n\n</think>\n\n"  # LLaMA-Factory's empty thought for reasoning templates (enable_thinking)
_CHATML_USER = "<|im_start|>user\n{{content}}<|im_end|>\n<|im_start|>assistant\n"
_QWEN_OBSERVATION = "<|im_start|>user\n<tool_response>\n{{content}}\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
_LLAMA3_HEADER = "<|start_header_id|>assistant<|end_header_id|>\n\n"
DEFAULT_TOOL_PROMPT = (
    "You have access to the following tools:\n{tool_text}"
    "Use the following format if using a tool:\n"
    "```\n"
    "Action: tool name (one of [{tool_names}])\n"
    "Action Input: the input to the tool, in a JSON format representing the kwargs "
    """(e.g. ```{{"input": "hello world", "num_beams": 5}}```)\n"""
    "```\n"
)
QWEN_TOOL_PROMPT = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>{tool_text}"
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    """<tool_call></tool_call> XML tags:\n<tool_call>\n{{"name": <function-name>, """
    """"arguments": <args-json-object>}}\n</tool_call>"""
)


@dataclass(frozen=True)
class LFTemplate:
    """One LLaMA-Factory template: slot lists (text with {{content}}, or BOS/EOS) per message kind."""

    user: tuple
    assistant: tuple
    system: tuple
    observation: tuple
    function: tuple
    prefix: tuple = ()
    default_system: str = ""
    stop_words: tuple = ()
    replace_eos: bool = False
    tool_format: str | None = "default"  # "default" | "qwen"; None: tool records are not supported
    fuse_system: bool = False  # Llama2Template: the system text goes inside the first user message
    reasoning: bool = False  # ReasoningTemplate with enable_thinking (its default): an empty thought is learned


def _lf(user=(CONTENT,), assistant=None, system=None, observation=None, function=None, **rest) -> LFTemplate:
    """LLaMA-Factory's register_template defaults: assistant = content + EOS, system = the bare content,
    observation formatted like the user, function calls like the assistant."""
    assistant = assistant or (CONTENT, EOS)
    return LFTemplate(user=user, assistant=assistant, system=system or (CONTENT,), observation=observation or user,
                      function=function or assistant, **rest)


# name -> template, exactly as LLaMA-Factory 0.9.5 registers it (only those whose encoding wb reproduces)
LF_TEMPLATES = {
    "default": _lf(user=("Human: {{content}}", EOS, "\nAssistant:"), assistant=(CONTENT, EOS, "\n"),
                   system=("System: {{content}}", EOS, "\n")),
    "empty": _lf(assistant=(CONTENT,)),
    "alpaca": _lf(user=("### Instruction:\n{{content}}\n\n### Response:\n",), assistant=(CONTENT, EOS, "\n\n"),
                  default_system="Below is an instruction that describes a task. Write a response that "
                  "appropriately completes the request.\n\n"),
    "vicuna": _lf(user=("USER: {{content}} ASSISTANT:",),
                  default_system="A chat between a curious user and an artificial intelligence assistant. "
                  "The assistant gives helpful, detailed, and polite answers to the user's questions."),
    "chatml": _lf(user=(_CHATML_USER,), assistant=("{{content}}<|im_end|>\n",),
                  system=("<|im_start|>system\n{{content}}<|im_end|>\n",),
                  observation=("<|im_start|>tool\n{{content}}<|im_end|>\n<|im_start|>assistant\n",),
                  stop_words=("<|im_end|>", "<|im_start|>"), replace_eos=True),
    "yi": _lf(user=(_CHATML_USER,), assistant=("{{content}}<|im_end|>\n",),
              system=("<|im_start|>system\n{{content}}<|im_end|>\n",), stop_words=("<|im_end|>",)),
    "qwen": _lf(user=(_CHATML_USER,), assistant=("{{content}}<|im_end|>\n",),
                system=("<|im_start|>system\n{{content}}<|im_end|>\n",), observation=(_QWEN_OBSERVATION,),
                default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
                stop_words=("<|im_end|>",), replace_eos=True, tool_format="qwen"),
    "qwen3": _lf(user=(_CHATML_USER,), assistant=("{{content}}<|im_end|>\n",),
                 system=("<|im_start|>system\n{{content}}<|im_end|>\n",), observation=(_QWEN_OBSERVATION,),
                 stop_words=("<|im_end|>",), replace_eos=True, tool_format="qwen", reasoning=True),
    "qwen3_nothink": _lf(user=(_CHATML_USER,), assistant=("{{content}}<|im_end|>\n",),
                         system=("<|im_start|>system\n{{content}}<|im_end|>\n",), observation=(_QWEN_OBSERVATION,),
                         stop_words=("<|im_end|>",), replace_eos=True, tool_format="qwen"),
    "llama3": _lf(user=("<|start_header_id|>user<|end_header_id|>\n\n{{content}}<|eot_id|>" + _LLAMA3_HEADER,),
                  assistant=("{{content}}<|eot_id|>",),
                  system=("<|start_header_id|>system<|end_header_id|>\n\n{{content}}<|eot_id|>",),
                  observation=("<|start_header_id|>ipython<|end_header_id|>\n\n{{content}}<|eot_id|>"
                               + _LLAMA3_HEADER,),
                  prefix=(BOS,), stop_words=("<|eot_id|>", "<|eom_id|>"), replace_eos=True, tool_format=None),
    "llama2": _lf(user=(BOS, "[INST] {{content}} [/INST]"), system=("<<SYS>>\n{{content}}\n<</SYS>>\n\n",),
                  fuse_system=True),
    "mistral": _lf(user=("[INST] {{content}}[/INST]",), assistant=(" {{content}}", EOS),
                   system=("{{content}}\n\n",), observation=("""[TOOL_RESULTS] {"content": {{content}}}[/TOOL_RESULTS]""",),
                   prefix=(BOS,), tool_format=None, fuse_system=True),
    "phi": _lf(user=("<|user|>\n{{content}}<|end|>\n<|assistant|>\n",), assistant=("{{content}}<|end|>\n",),
               system=("<|system|>\n{{content}}<|end|>\n",), stop_words=("<|end|>",), replace_eos=True),
}
TEMPLATES = ("auto", *LF_TEMPLATES)
_PROBE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


def _jinja_slots(slots: tuple, content: str) -> str:
    """A Jinja expression writing `slots` with `content` (a Jinja expression) in place of {{content}}."""
    parts = []
    for slot in slots:
        if slot in (BOS, EOS):
            variable = "bos_token" if slot == BOS else "eos_token"
            parts.append(f"({variable} if {variable} else '')")
            continue
        before, found, after = slot.partition(CONTENT)
        parts += [json.dumps(before, ensure_ascii=False)] if before else []
        parts += [content] if found else []
        parts += [json.dumps(after, ensure_ascii=False)] if after else []
    return " + ".join(parts) or "''"


def lf_jinja(spec: LFTemplate) -> str:
    """The chat template that renders a conversation as LLaMA-Factory's slots write it (no tools)."""
    system = _jinja_slots(spec.system, "system")
    first_user = "content" if not spec.fuse_system else f"(({system}) if loop.first and system else '') + content"
    think = ("{% if '<think>' not in content and '</think>' not in content %}"
             f"{{% set content = {json.dumps(THOUGHT)} + content %}}{{% endif %}}") if spec.reasoning else ""
    return (
        f"{{% set system = {json.dumps(spec.default_system, ensure_ascii=False)} %}}"
        "{% if messages and messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
        "{% set loop_messages = messages[1:] %}{% else %}{% set loop_messages = messages %}{% endif %}"
        + (f"{{{{ {_jinja_slots(spec.prefix, 'none')} }}}}" if spec.prefix else "")
        + ("" if spec.fuse_system else f"{{% if system %}}{{{{ {system} }}}}{{% endif %}}")
        + "{% for message in loop_messages %}{% set content = message['content'] %}"
        f"{{% if message['role'] == 'user' %}}{{{{ {_jinja_slots(spec.user, first_user)} }}}}"
        f"{{% elif message['role'] == 'tool' %}}{{{{ {_jinja_slots(spec.observation, 'content')} }}}}"
        f"{{% elif message['role'] == 'assistant' %}}{think}{{{{ {_jinja_slots(spec.assistant, 'content')} }}}}"
        "{% endif %}{% endfor %}"
    )


BUILTINS = {name: lf_jinja(spec) for name, spec in LF_TEMPLATES.items()}  # name -> the Jinja saved with the tokenizer


@dataclass
class ChatTemplate:
    name: str  # "auto" (the tokenizer's own) or a LLaMA-Factory template name
    source: str  # the Jinja text
    eot_id: int  # the token that ends an assistant turn (-1: the template writes none, e.g. `empty`)
    eot_token: str
    special_ids: list[int]  # special tokens the template itself emits
    tool_calls: bool  # the template renders `tool_calls` of assistant messages
    lf: LFTemplate | None = None  # set for LLaMA-Factory names: encode with `encode_lf`

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
    """The template `name` for `tokenizer`, checked; an unusable template is an error naming the fix.
    A LLaMA-Factory template whose EOS LLaMA-Factory replaces (qwen, chatml, llama3, ...) replaces
    the tokenizer's EOS the same way, so the saved tokenizer stops where training taught it to."""
    if name not in TEMPLATES:
        raise WorkbenchError(f"unknown --template {name!r}; use one of {', '.join(TEMPLATES)}")
    if name != "auto":
        return _resolve_lf(name, tokenizer, base)
    source = tokenizer.chat_template
    if isinstance(source, dict):
        source = source.get("default")
    if not source:
        raise WorkbenchError(
            "--template auto: the tokenizer has no chat template (a base model?); use --template default "
            "(plain Human:/Assistant:), chatml or llama3",
            base,
        )
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


def _resolve_lf(name: str, tokenizer, base: str) -> ChatTemplate:
    spec = LF_TEMPLATES[name]
    texts = [s for slots in (spec.user, spec.assistant, spec.system, spec.observation) for s in slots]
    needed = sorted({t for text in texts for t in _markup_tokens(text)} | set(spec.stop_words[:1]),
                    key=lambda t: (len(t), t))
    missing = [t for t in needed if _single_token(tokenizer, t) is None]
    if missing:
        raise WorkbenchError(
            f"--template {name} needs the special token(s) {', '.join(missing)}, which this tokenizer lacks; "
            "use --template auto (the tokenizer's own) or one whose tokens it has (default, empty)",
            base,
        )
    if EOS in spec.assistant + spec.user and tokenizer.eos_token is None:
        raise WorkbenchError(f"--template {name} needs an EOS token to end answers; the tokenizer has none", base)
    if spec.replace_eos and tokenizer.eos_token != spec.stop_words[0]:
        tokenizer.eos_token = spec.stop_words[0]  # LLaMA-Factory's fix_special_tokens
    tail = _slot_ids(tokenizer, spec.assistant, None)
    special = _special_ids(tokenizer)
    ends = [t for t in tail if t in special]
    template = ChatTemplate(name, BUILTINS[name], ends[-1] if ends else -1, "", [], False, spec)
    template.eot_token = tokenizer.convert_ids_to_tokens(ends[-1]) if ends else "(none)"
    pairs = lf_pairs(spec, tokenizer, Conversation([{"role": "system", "content": "S"}, *_PROBE]))
    template.special_ids = sorted({t for source, target in pairs for t in source + target if t in special})
    return template


def _markup_tokens(text: str) -> list[str]:
    """The `<|...|>` tokens a slot writes (they must be single tokens of the tokenizer)."""
    found, start = [], text.find("<|")
    while start != -1:
        end = text.find("|>", start + 2)
        if end == -1:
            break
        found.append(text[start:end + 2])
        start = text.find("<|", end + 2)
    return found


def _slot_ids(tokenizer, slots: tuple, content: str | None) -> list[int]:
    """LLaMA-Factory's _convert_elements_to_ids of `slots` filled with `content`; with content None,
    only what follows {{content}} (the slot's fixed tail)."""
    elements: list[str] = []
    seen = content is not None
    for slot in slots:
        if slot in (BOS, EOS):
            elements += [slot] if seen else []
            continue
        if content is None:
            before, found, after = slot.partition(CONTENT)
            if found:
                seen = True
                elements.append(after)
            elif seen:
                elements.append(slot)
        else:
            elements.append(slot.replace(CONTENT, content, 1))
    return _element_ids(tokenizer, elements)


def _element_ids(tokenizer, elements: list[str]) -> list[int]:
    ids: list[int] = []
    for element in elements:
        if element == BOS:
            ids += [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        elif element == EOS:
            ids += [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        elif element:
            ids += tokenizer.encode(element, add_special_tokens=False)
    return ids


def _fill(slots: tuple, content: str) -> list[str]:
    return [slot if slot in (BOS, EOS) else slot.replace(CONTENT, content, 1) for slot in slots]


def lf_pairs(spec: LFTemplate, tokenizer, conversation: Conversation) -> list[tuple[list[int], list[int]]]:
    """LLaMA-Factory's Template.encode_multiturn: (prompt ids, answer ids) per turn. Raises Dropped
    for what LLaMA-Factory would reject (roles out of order, a bad function call, unsupported tools)."""
    messages = conversation.messages
    has_system = bool(messages) and messages[0]["role"] == "system"
    body = messages[1:] if has_system else messages
    system = (messages[0]["content"] if has_system else "") or spec.default_system
    tools = _tool_text(spec, conversation.tools)
    encoded = []
    for i, message in enumerate(body):
        expected = ("user", "tool") if i % 2 == 0 else ("assistant",)
        if message["role"] not in expected:
            raise Dropped("roles do not alternate prompt/answer (LLaMA-Factory's rule)")
        if message.get("tool_calls"):
            raise Dropped("OpenAI tool_calls messages are not supported by LLaMA-Factory templates")
        elements: list[str] = []
        system_text = ""
        if i == 0:
            elements += list(spec.prefix)
            if system or tools:
                system_text = "".join(_fill(spec.system, system + tools))
                if not spec.fuse_system:
                    elements += _fill(spec.system, system + tools)
                    system_text = ""
        if message["role"] == "user":
            elements += _fill(spec.user, system_text + message["content"])
        elif message["role"] == "tool":
            elements += _fill(spec.observation, message["content"])
        elif message.get("function_call"):
            elements += _fill(spec.function, _function_text(spec, message["content"]))
        else:
            elements += _fill(spec.assistant, message["content"])
        encoded.append(_element_ids(tokenizer, elements))
    if len(encoded) % 2:
        raise Dropped("no response")
    pairs = [(encoded[i], encoded[i + 1]) for i in range(0, len(encoded), 2)]
    if spec.reasoning:
        thought = tokenizer.encode(THOUGHT, add_special_tokens=False)
        answers = body[1::2]
        pairs = [(source, target if "<think>" in m["content"] or "</think>" in m["content"] else thought + target)
                 for (source, target), m in zip(pairs, answers)]
    return pairs


def _tool_text(spec: LFTemplate, tools: list | None) -> str:
    if not tools:
        return ""
    if spec.tool_format is None:
        raise Dropped("tool definitions are not supported with this LLaMA-Factory template in wb")
    try:
        if spec.tool_format == "qwen":
            text = "".join("\n" + json.dumps(t if t.get("type") == "function" else {"type": "function", "function": t},
                                             ensure_ascii=False) for t in tools)
            return QWEN_TOOL_PROMPT.format(tool_text=text)
        return _default_tools(tools)
    except (AttributeError, KeyError, TypeError):
        raise Dropped("a tool definition is not a function schema") from None


def _default_tools(tools: list) -> str:
    """LLaMA-Factory's DefaultToolUtils.tool_formatter."""
    tool_text, names = "", []
    for tool in tools:
        tool = tool.get("function", "") if tool.get("type") == "function" else tool
        params = ""
        for name, param in tool["parameters"]["properties"].items():
            required = ", required" if name in tool["parameters"].get("required", []) else ""
            enum = ", should be one of [{}]".format(", ".join(param["enum"])) if param.get("enum", None) else ""
            items = (", where each item should be {}".format(param["items"].get("type", ""))
                     if param.get("items", None) else "")
            params += f"  - {name} ({param.get('type', '')}{required}): {param.get('description', '')}{enum}{items}\n"
        tool_text += f"> Tool Name: {tool['name']}\nTool Description: {tool.get('description', '')}\nTool Args:\n{params}\n"
        names.append(tool["name"])
    return DEFAULT_TOOL_PROMPT.format(tool_text=tool_text, tool_names=", ".join(names))


def _function_text(spec: LFTemplate, content: str) -> str:
    """LLaMA-Factory's FunctionFormatter: the JSON call(s) in the template's tool-call format."""
    if spec.tool_format is None:
        raise Dropped("function calls are not supported with this LLaMA-Factory template in wb")
    try:
        calls = json.loads(content)
        calls = calls if isinstance(calls, list) else [calls]
        functions = [(c["name"], json.dumps(c["arguments"], ensure_ascii=False)) for c in calls]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise Dropped("a function call is not JSON with name and arguments") from None
    if spec.tool_format == "qwen":
        texts = [json.dumps({"name": n, "arguments": json.loads(a)}, ensure_ascii=False) for n, a in functions]
        return "\n".join(f"<tool_call>\n{text}\n</tool_call>" for text in texts)
    return "\n".join(f"Action: {name}\nAction Input: {arguments}" for name, arguments in functions)


def encode_lf(conversations: list[Conversation], template: ChatTemplate, tokenizer, cutoff_len: int,
              train_on_prompt: bool = False):
    """input_ids + labels as LLaMA-Factory's SFT processor makes them, with wb's truncation: whole
    turns while they fit; when the first turn alone does not, its prompt content and answer content
    are cut (the answer keeps at least half the room) and the template's text after each content
    (the assistant header; the answer's end-of-turn and what follows) is kept whole. LLaMA-Factory
    instead cuts each turn's prompt and answer ids at their ends (its infer_seqlen), which can drop
    the assistant header and the end-of-turn token."""
    from workbench.train.encode import EncodedSet

    spec = template.lf
    tails = (len(_slot_ids(tokenizer, spec.user, None)), len(_slot_ids(tokenizer, spec.assistant, None)))
    result = EncodedSet([])
    for conversation in conversations:
        try:
            pairs = lf_pairs(spec, tokenizer, conversation)
        except Dropped as reason:
            result.dropped[str(reason)] += 1
            continue
        input_ids: list[int] = []
        labels: list[int] = []
        for index, (source, target) in enumerate(pairs):
            if len(input_ids) + len(source) + len(target) > cutoff_len:
                if index == 0:
                    source, target = _cut_first_turn(source, target, tails, cutoff_len)
                    _append(input_ids, labels, source, target, train_on_prompt)
                result.truncated += 1
                break
            _append(input_ids, labels, source, target, train_on_prompt)
        result.examples.append({"input_ids": input_ids, "labels": labels})
    return result


def _append(input_ids: list[int], labels: list[int], source: list[int], target: list[int], on_prompt: bool) -> None:
    input_ids += source + target
    labels += (source if on_prompt else [IGNORE] * len(source)) + target


def _cut_first_turn(source: list[int], target: list[int], tails: tuple[int, int], cutoff_len: int):
    source_tail, target_tail = (min(tails[0], len(source)), min(tails[1], len(target)))
    room = cutoff_len - source_tail - target_tail
    if room < 2:
        raise WorkbenchError(f"--cutoff-len {cutoff_len} is too small: the chat template's assistant header and "
                             f"answer end alone take {source_tail + target_tail} tokens")
    prompt, answer = source[:len(source) - source_tail], target[:len(target) - target_tail]
    keep_answer = min(len(answer), max(room - len(prompt), room // 2))
    keep_prompt = min(len(prompt), room - keep_answer)
    return (prompt[:keep_prompt] + source[len(source) - source_tail:],
            answer[:keep_answer] + target[len(target) - target_tail:])


def _special_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, token in tokenizer.added_tokens_decoder.items() if token.special)
    return ids


def _single_token(tokenizer, text: str) -> int | None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None
