"""`wb chat`: talk to a model (and an adapter, unmerged) in the terminal, or answer prompts for scripts.

Interactive on a terminal: a `>>> ` prompt, the answer streamed as it is generated, the commands
/clear, /system TEXT, /help and /exit (or Ctrl-D); Ctrl-C stops an answer and keeps the session.
Otherwise (`--prompt`, or prompts one per line on standard input) the answers are collected into a
`ChatResult` that the CLI prints as text or, with `--json`, as one object.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from workbench.errors import WorkbenchError

PROMPT = ">>> "
BRIEF = "Commands: /clear, /system TEXT, /exit (or Ctrl-D), /help; Ctrl-C stops an answer."
COMMANDS = "/clear forgets the conversation, /system TEXT sets the system message (alone: removes it), " \
           "/exit (or Ctrl-D) leaves; Ctrl-C stops an answer; //text sends /text"


@dataclass
class Turn:
    prompt: str
    answer: str
    tokens: int  # generated, the end-of-turn token included
    seconds: float


@dataclass
class ChatResult:
    model: str
    adapter: str | None
    template: str  # where the chat template came from, in words
    template_origin: str  # model | adapter | adapter-tokenizer
    device: str
    dtype: str
    settings: dict
    interactive: bool
    notes: list[str] = field(default_factory=list)  # also printed on stderr as `note:` lines as they arise
    turns: list[Turn] = field(default_factory=list)

    def lines(self) -> list[str]:
        """The answers (after their prompts when there are several); nothing after an interactive session."""
        if self.interactive:
            return []
        if len(self.turns) == 1:
            return self.turns[0].answer.splitlines() or [""]
        lines: list[str] = []
        for turn in self.turns:
            lines += ([""] if lines else []) + [PROMPT + turn.prompt, *turn.answer.splitlines()]
        return lines

    def to_json(self) -> dict:
        data = asdict(self)
        data.pop("interactive")
        return data


def chat(
    model: str | Path,
    adapter: str | Path | None = None,
    prompts: list[str] | tuple[str, ...] = (),
    *,
    system: str | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_context: int | None = None,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    as_json: bool = False,
    interactive: bool | None = None,
    stdin=None,
    stdout=None,
    stderr=None,
) -> ChatResult:
    """Chat with `model` (plus `adapter`, applied unmerged with peft).

    Interactive when `interactive` is True, or (None) when no `prompts` are given and `stdin` is a
    terminal; otherwise each prompt (else each non-empty line of `stdin`) is one user turn of one
    conversation, commands included (a `/clear` line makes the next prompts a new conversation).
    Greedy unless `temperature` > 0 (then sampling with `top_p`). `max_context`: the prompt plus
    `max_new_tokens` must fit in it, whole oldest turns dropped to make them fit (default: the
    model's context length). Notes (a template differing from the model's own, dropped turns) go to
    `stderr` as `note:` lines.
    """
    from workbench.chat.session import open_session

    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    terminal = not prompts and _isatty(stdin)  # nothing to answer but what a person types
    if interactive is None:
        interactive = terminal and not as_json
    if as_json and (interactive or terminal):
        raise WorkbenchError("--json is for scripts: give --prompt, or prompts on standard input")
    if terminal and not interactive:
        raise WorkbenchError("no prompt: give --prompt, or prompts on standard input (one per line)")
    if interactive:
        _say(stdout, f"loading {model}{f' + {adapter}' if adapter is not None else ''} ...")
    loaded = open_session(model, adapter, system=system, max_new_tokens=max_new_tokens, temperature=temperature,
                          top_p=top_p, max_context=max_context, dtype=dtype, device=device,
                          trust_remote_code=trust_remote_code)
    session = loaded.session
    result = ChatResult(
        model=str(Path(model)), adapter=str(Path(adapter)) if adapter is not None else None,
        template=loaded.template.description, template_origin=loaded.template.origin,
        device=loaded.device, dtype=loaded.dtype, interactive=interactive,
        settings={"system": session.system, "max_new_tokens": max_new_tokens, "temperature": temperature,
                  "top_p": top_p, "max_context": session.max_context, "context_length": loaded.context_length},
    )
    for note in loaded.notes:
        _note(result, stderr, note)
    if interactive:
        _interactive(session, result, stdin, stdout, stderr)
    else:
        _scripted(session, result, prompts or _lines(stdin), stderr)
    return result


# -- modes ----------------------------------------------------------------------------------------
def _scripted(session, result: ChatResult, prompts, stderr) -> None:
    for prompt in prompts:
        text = prompt.rstrip("\r\n")
        if not text.strip():
            continue
        command = _command(session, text)
        if command == "exit":
            break
        if command is not None:
            continue
        session.reply(_unescape(text))
        _record(session, result, _unescape(text), stderr)


def _interactive(session, result: ChatResult, stdin, stdout, stderr) -> None:
    read = _reader(stdin, stdout)
    name = Path(result.model).resolve().name + (f" + {Path(result.adapter).resolve().name}" if result.adapter else "")
    _say(stdout, f"wb chat: {name} on {result.device} ({result.dtype}), {result.template}.")
    _say(stdout, BRIEF)
    while True:
        try:
            line = read(PROMPT)
        except EOFError:
            _say(stdout, "")
            return
        except KeyboardInterrupt:
            _say(stdout, "\n(/exit or Ctrl-D leaves)")
            continue
        text = line.strip()
        if not text:
            continue
        command = _command(session, text)
        if command == "exit":
            return
        if command is not None:
            _say(stdout, f"({command})")
            continue
        printer = _Printer(stdout)
        try:
            session.reply(_unescape(text), on_token=printer)
        except KeyboardInterrupt:
            _say(stdout, "\n(interrupted: this turn is not kept)")
            continue
        except WorkbenchError as exc:  # a message too long for --max-context: the session goes on
            printer.finish()
            _say(stderr, f"error: {exc.line()}")
            continue
        printer.finish()
        _record(session, result, _unescape(text), stderr)


def _record(session, result: ChatResult, prompt: str, stderr) -> None:
    reply = session.last
    result.turns.append(Turn(prompt, reply.text, reply.tokens, round(reply.seconds, 3)))
    if reply.dropped_turns:
        _note(result, stderr, f"dropped the {reply.dropped_turns} oldest turn(s) to fit --max-context "
                              f"{session.max_context} (with --max-new-tokens {session.max_new_tokens})")


def _note(result: ChatResult, stderr, text: str) -> None:
    result.notes.append(text)
    _say(stderr, f"note: {text}")


def _command(session, text: str) -> str | None:
    """Run a /command: what was done ("exit" to leave), or None for a message to send."""
    if not text.startswith("/") or text.startswith("//"):
        return None
    name, _, argument = text.partition(" ")
    if name in ("/exit", "/quit"):
        return "exit"
    if name == "/clear":
        session.clear()
        return "conversation cleared"
    if name == "/system":
        session.set_system(argument)
        return "system message set" if session.system else "system message removed"
    if name == "/help":
        return COMMANDS
    return f"unknown command {name}; /help lists the commands"


def _unescape(text: str) -> str:
    return text[1:] if text.startswith("//") else text


class _Printer:
    """Writes streamed pieces as they come (leading whitespace of the answer dropped), then a newline."""

    def __init__(self, stream):
        self.stream, self.started = stream, False

    def __call__(self, piece: str) -> None:
        if not self.started:
            piece = piece.lstrip()
            if not piece:
                return
            self.started = True
        self.stream.write(piece)
        self.stream.flush()

    def finish(self) -> None:
        if self.started:
            _say(self.stream, "")


# -- terminal -------------------------------------------------------------------------------------
def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _reader(stdin, stdout):
    """`input()` (with line editing) on the process's own terminal; else prompt and read a line."""
    if stdin is sys.stdin and stdout is sys.stdout and _isatty(stdin) and _isatty(stdout):
        try:
            import readline  # noqa: F401 - line editing and history for input()
        except ImportError:
            pass
        return input

    def read(prompt: str) -> str:
        stdout.write(prompt)
        stdout.flush()
        line = stdin.readline()
        if not line:
            raise EOFError
        return line

    return read


def _lines(stdin):
    while True:
        line = stdin.readline()
        if not line:
            return
        yield line


def _say(stream, text: str) -> None:
    stream.write(text + "\n")
    stream.flush()
