"""The one-line failure contract, checked on a CliRunner result: shared by every test module."""

from __future__ import annotations


def assert_one_error(result, *fragments: str) -> str:
    """Exit 1, stderr exactly one line `error: ...` containing `fragments`, no traceback anywhere."""
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output + result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]
