"""LLaMA-Factory template names: the same input_ids and labels as LLaMA-Factory 0.9.5, on the real
Llama-3 and Qwen2 tokenizers.

REFERENCE was produced by LLaMA-Factory itself: `pip download llamafactory==0.9.5 --no-deps`, its
llamafactory/data/template.py imported with the multimodal imports stubbed (torchaudio...),
`get_template_and_fix_tokenizer(tokenizer, data_args)` (enable_thinking True, its default), then
`template.encode_multiturn(tokenizer, messages, system, tools)` with labels built as its
SupervisedDatasetProcessor does (prompt ids -100, answer ids learned; no truncation). The script
compared every template of LF_TEMPLATES on both tokenizers and several conversations; all matched.
"""

from __future__ import annotations

import json

import pytest
from conftest import shared_path

from workbench.errors import WorkbenchError
from workbench.train.data import Conversation
from workbench.train.encode import IGNORE
from workbench.train.templates import BUILTINS, LF_TEMPLATES, TEMPLATES, encode_lf, resolve_template

TOOLS = [{"name": "get_weather", "description": "Weather of a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "description": "City name"},
                                     "unit": {"type": "string", "enum": ["c", "f"]}}, "required": ["city"]}}]
CONVERSATIONS = {
    "one": [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}],
    "multi_system": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"},
                     {"role": "assistant", "content": "Hello!\nHow can I help?"}, {"role": "user", "content": "2+2?"},
                     {"role": "assistant", "content": "4"}],
    "tools": [{"role": "user", "content": "Weather in Paris?"},
              {"role": "assistant", "content": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}}),
               "function_call": True},
              {"role": "tool", "content": "{\"temp\": 21}"}, {"role": "assistant", "content": "It is 21 degrees."}],
    "think": [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nBecause."}],
}

REFERENCE = {
    'llama3/llama3/multi_system': (
        [
            128000, 128006, 9125, 128007, 271, 2675, 527, 51637, 13, 128009, 128006, 882, 128007,
            271, 13347, 1070, 128009, 128006, 78191, 128007, 271, 9906, 4999, 4438, 649, 358, 1520,
            30, 128009, 128006, 882, 128007, 271, 17, 10, 17, 30, 128009, 128006, 78191, 128007,
            271, 19, 128009
        ],
        [
            -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100,
            -100, -100, -100, -100, -100, -100, -100, 9906, 4999, 4438, 649, 358, 1520, 30, 128009,
            -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, 19, 128009
        ],
    ),
    'llama3/default/one': (
        [
            35075, 25, 3639, 374, 279, 6864, 315, 9822, 30, 128001, 198, 72803, 25, 60704, 13,
            128001, 198
        ],
        [
            -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, 60704, 13,
            128001, 198
        ],
    ),
    'llama3/llama2/multi_system': (
        [
            128000, 58, 65562, 60, 1134, 39031, 40171, 2675, 527, 51637, 627, 27, 524, 39031, 58645,
            13347, 1070, 66028, 65562, 60, 9906, 4999, 4438, 649, 358, 1520, 30, 128001, 128000, 58,
            65562, 60, 220, 17, 10, 17, 30, 66028, 65562, 60, 19, 128001
        ],
        [
            -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100,
            -100, -100, -100, -100, -100, -100, 9906, 4999, 4438, 649, 358, 1520, 30, 128001, -100,
            -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, 19, 128001
        ],
    ),
    'qwen2/qwen/multi_system': (
        [
            151644, 8948, 198, 2610, 525, 50537, 13, 151645, 198, 151644, 872, 198, 13048, 1052,
            151645, 198, 151644, 77091, 198, 9707, 4894, 4340, 646, 358, 1492, 30, 151645, 198,
            151644, 872, 198, 17, 10, 17, 30, 151645, 198, 151644, 77091, 198, 19, 151645, 198
        ],
        [
            -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100,
            -100, -100, -100, -100, -100, 9707, 4894, 4340, 646, 358, 1492, 30, 151645, 198, -100,
            -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, 19, 151645, 198
        ],
    ),
    'qwen2/qwen3/one': (
        [
            151644, 872, 198, 3838, 374, 279, 6722, 315, 9625, 30, 151645, 198, 151644, 77091, 198,
            13708, 766, 1339, 522, 26865, 1339, 59604, 13, 151645, 198
        ],
        [
            -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100,
            -100, 13708, 766, 1339, 522, 26865, 1339, 59604, 13, 151645, 198
        ],
    ),
    'qwen2/qwen3/think': (
        [
            151644, 872, 198, 10234, 30, 151645, 198, 151644, 77091, 198, 13708, 766, 397, 71, 3821,
            198, 522, 26865, 1339, 17949, 13, 151645, 198
        ],
        [
            -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, 13708, 766, 397, 71, 3821,
            198, 522, 26865, 1339, 17949, 13, 151645, 198
        ],
    ),
    'qwen2/qwen3_nothink/tools': (
        [
            151644, 8948, 1406, 2, 13852, 271, 2610, 1231, 1618, 825, 476, 803, 5746, 311, 7789,
            448, 279, 1196, 3239, 382, 2610, 525, 3897, 448, 729, 32628, 2878, 366, 15918, 1472,
            15918, 29, 11874, 9492, 510, 27, 15918, 397, 4913, 1313, 788, 330, 1688, 497, 330, 1688,
            788, 5212, 606, 788, 330, 455, 69364, 497, 330, 4684, 788, 330, 28981, 315, 264, 3283,
            497, 330, 13786, 788, 5212, 1313, 788, 330, 1700, 497, 330, 13193, 788, 5212, 8926, 788,
            5212, 1313, 788, 330, 917, 497, 330, 4684, 788, 330, 12730, 829, 14345, 330, 3843, 788,
            5212, 1313, 788, 330, 917, 497, 330, 9018, 788, 4383, 66, 497, 330, 69, 1341, 38154,
            330, 6279, 788, 4383, 8926, 1341, 3417, 532, 522, 15918, 1339, 2461, 1817, 729, 1618,
            11, 470, 264, 2951, 1633, 448, 729, 829, 323, 5977, 2878, 220, 151657, 151658, 11874,
            9492, 510, 151657, 198, 4913, 606, 788, 366, 1688, 11494, 8066, 330, 16370, 788, 366,
            2116, 56080, 40432, 31296, 151658, 151645, 198, 151644, 872, 198, 28981, 304, 12095, 30,
            151645, 198, 151644, 77091, 198, 151657, 198, 4913, 606, 788, 330, 455, 69364, 497, 330,
            16370, 788, 5212, 8926, 788, 330, 59604, 95642, 151658, 151645, 198, 151644, 872, 198,
            27, 14172, 9655, 397, 4913, 3888, 788, 220, 17, 16, 532, 522, 14172, 9655, 29, 151645,
            198, 151644, 77091, 198, 2132, 374, 220, 17, 16, 12348, 13, 151645, 198
        ],
        [
            -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100,
            -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100,
            -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100,
            -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100,
            -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100,
            -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100,
            -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100,
            -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100,
            -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100,
            -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100,
            -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100,
            -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100,
            -100, -100, -100, -100, -100, -100, 151657, 198, 4913, 606, 788, 330, 455, 69364, 497,
            330, 16370, 788, 5212, 8926, 788, 330, 59604, 95642, 151658, 151645, 198, -100, -100,
            -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100,
            -100, -100, -100, -100, -100, -100, -100, 2132, 374, 220, 17, 16, 12348, 13, 151645, 198
        ],
    ),
    'qwen2/empty/one': (
        [
            3838, 374, 279, 6722, 315, 9625, 30, 59604, 13
        ],
        [
            -100, -100, -100, -100, -100, -100, -100, 59604, 13
        ],
    ),
    'qwen2/mistral/one': (
        [
            58, 64462, 60, 3555, 374, 279, 6722, 315, 9625, 30, 24157, 64462, 60, 12095, 13, 151645
        ],
        [
            -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, 12095, 13,
            151645
        ],
    ),
}
# LLaMA-Factory gave chatml the very ids and labels of qwen here: the conversation's own system turn replaces
# qwen's default system prompt, and the rest of both templates is ChatML.
REFERENCE["qwen2/chatml/multi_system"] = REFERENCE["qwen2/qwen/multi_system"]


def _tokenizer(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(shared_path("tokenizers", name))


def _encode(tokenizer_name: str, template: str, conversation: str, cutoff_len: int = 100_000):
    tokenizer = _tokenizer(tokenizer_name)
    chat = resolve_template(template, tokenizer, tokenizer_name)
    tools = TOOLS if conversation == "tools" else None
    (example,) = encode_lf([Conversation(CONVERSATIONS[conversation], tools)], chat, tokenizer, cutoff_len).examples
    return tokenizer, chat, example


@pytest.mark.parametrize("key", sorted(REFERENCE))
def test_ids_and_labels_equal_llamafactory(key):
    tokenizer_name, template, conversation = key.split("/")
    _, _, example = _encode(tokenizer_name, template, conversation)
    assert (example["input_ids"], example["labels"]) == REFERENCE[key]


def test_chatml_learns_the_newline_after_im_end_as_llamafactory():
    tokenizer, chat, example = _encode("qwen2", "chatml", "one")
    newline = tokenizer.encode("\n", add_special_tokens=False)
    assert example["input_ids"][-2:] == example["labels"][-2:] == [chat.eot_id, *newline]
    assert chat.eot_token == "<|im_end|>" and tokenizer.eos_token == "<|im_end|>"  # replace_eos


def test_saved_jinja_renders_the_text_that_was_trained():
    for tokenizer_name, template in [("llama3", "llama3"), ("qwen2", "qwen"), ("qwen2", "qwen3_nothink"),
                                     ("llama3", "default"), ("llama3", "llama2")]:
        tokenizer, chat, example = _encode(tokenizer_name, template, "multi_system")
        text = tokenizer.apply_chat_template(CONVERSATIONS["multi_system"], chat_template=BUILTINS[template],
                                             tokenize=False)
        assert text == tokenizer.decode(example["input_ids"]), template
        assert chat.source == BUILTINS[template]


def test_qwen_default_system_and_qwen3_empty_thought():
    tokenizer, _, example = _encode("qwen2", "qwen", "one")
    assert tokenizer.decode(example["input_ids"]).startswith(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n")
    tokenizer, _, example = _encode("qwen2", "qwen3", "one")
    learned = [t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE]
    assert tokenizer.decode(learned) == "<think>\n\n</think>\n\nParis.<|im_end|>\n"
    tokenizer, _, example = _encode("qwen2", "qwen3_nothink", "one")
    learned = [t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE]
    assert tokenizer.decode(learned) == "Paris.<|im_end|>\n"


def test_truncation_keeps_the_header_and_the_answer_end():
    """wb's truncation (not LLaMA-Factory's): whole turns while they fit; a first turn that does not fit
    is cut inside its contents, keeping the assistant header and the answer's <|im_end|>\\n."""
    tokenizer, chat, full = _encode("qwen2", "chatml", "multi_system")
    _, _, cut = _encode("qwen2", "chatml", "multi_system", cutoff_len=len(full["input_ids"]) - 1)
    first_turn = full["labels"].index(chat.eot_id) + 2  # through the first answer's <|im_end|>\n
    assert cut["input_ids"] == full["input_ids"][:first_turn]
    _, _, tiny = _encode("qwen2", "chatml", "multi_system", cutoff_len=16)
    text = tokenizer.decode(tiny["input_ids"])
    assert len(tiny["input_ids"]) == 16 and text.endswith("<|im_end|>\n")
    assert "<|im_end|>\n<|im_start|>assistant\n" in text
    with pytest.raises(WorkbenchError, match="--cutoff-len 8 is too small"):
        _encode("qwen2", "chatml", "one", cutoff_len=8)


def test_template_names_and_refusals(tiny_tokenizer):
    assert {"llama3", "qwen", "qwen3", "qwen3_nothink", "chatml", "default", "empty"} <= set(TEMPLATES)
    assert set(TEMPLATES) == {"auto", *LF_TEMPLATES}
    with pytest.raises(WorkbenchError, match="--template llama3 needs the special token"):
        resolve_template("llama3", _tokenizer("qwen2"), "qwen2")
    empty = resolve_template("empty", _tokenizer("qwen2"), "qwen2")
    assert empty.eot_id == -1  # LLaMA-Factory's empty template writes no stop token
    tokenizer = _tokenizer("llama3")
    chat = resolve_template("llama3", tokenizer, "llama3")
    encoded = encode_lf([Conversation(CONVERSATIONS["tools"], TOOLS)], chat, tokenizer, 4096)
    assert encoded.examples == [] and encoded.dropped == {
        "tool definitions are not supported with this LLaMA-Factory template in wb": 1}
