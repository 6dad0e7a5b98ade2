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


class CheckFailed(WorkbenchError):
    """Raised after a verification found failures; `failures` holds one line per failure."""

    def __init__(self, failures: list[str], path: str | Path | None = None):
        self.failures = failures
        super().__init__(f"{len(failures)} check(s) failed", path)
