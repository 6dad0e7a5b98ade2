"""The one exception type that the CLI turns into `error: <what> (<file>)` and exit 1."""

from __future__ import annotations

from pathlib import Path


class WorkbenchError(Exception):
    """An expected failure: bad input, a failed check. Never shown with a traceback unless --debug."""

    def __init__(self, message: str, path: str | Path | None = None):
        self.message = message
        self.path = None if path is None else str(path)
        super().__init__(self.line())

    def line(self) -> str:
        """The message and the file as one line, whatever they hold (a library's multi-line message, a
        crafted name with a newline in it)."""
        text = f"{self.message} ({self.path})" if self.path else self.message
        return " ".join(part.strip() for part in text.splitlines() if part.strip()) if "\n" in text or "\r" in text \
            else text


def first_line(exc: BaseException, limit: int = 300) -> str:
    """A library's error message cut to its first non-blank line (transformers' and torch's run to several
    lines of advice; the first says what happened), at most `limit` characters."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:limit]


class CheckFailed(WorkbenchError):
    """Raised after a verification found failures; `failures` holds one line per failure."""

    def __init__(self, failures: list[str], path: str | Path | None = None):
        self.failures = failures
        super().__init__(f"{len(failures)} check(s) failed", path)
