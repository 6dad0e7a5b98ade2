"""What a command prints: the contract between each command's result and `workbench.cli.emit`.

Each command's one public function returns a result with

- `lines()`: the text `wb` prints without `--json`, one line per item, in order; a `Note` goes to
  stderr (about the run or its files: "wrote OUT", a warning), every other line to stdout;
- `to_json()`: the one JSON object `wb` prints with `--json` (and no lines); None prints nothing
  (a process that does not report: `wb train` on a rank other than 0);
- optionally `error()`: the failure the command ends with (a `CheckFailed`), raised after the result
  is printed, or None.

The modules decide what is printed and whether a check failed; the CLI only prints it.
"""

from __future__ import annotations


class Note(str):
    """A line of a result that is printed on stderr, not stdout."""

    __slots__ = ()
