"""JSON read from files that may be crafted: one place that turns every way parsing can fail
(bad UTF-8, bad syntax, nesting deep enough to exhaust the parser's recursion, a file that cannot
be read) into one WorkbenchError naming the file."""

from __future__ import annotations

import json
from pathlib import Path

from workbench.errors import WorkbenchError


def parse_json(text: str | bytes, problem: str, source: str | Path, allow_nan: bool = True) -> object:
    """`text` parsed, or a WorkbenchError "<problem>: <why>"; `allow_nan=False` refuses NaN and
    Infinity, which JSON itself does not allow."""
    try:
        return json.loads(text, parse_constant=None if allow_nan else _refuse_constant)
    except RecursionError:
        raise WorkbenchError(f"{problem}: nested too deeply", source) from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, a refused constant
        detail = str(exc)
        raise WorkbenchError(f"{problem}: {detail[:200]}{'…' if len(detail) > 200 else ''}", source) from None


def read_json(path: Path, what: str, allow_nan: bool = True, problem: str | None = None) -> object:
    """The parsed content of the JSON file `path` (`what` names it in errors)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise WorkbenchError(f"cannot read {what}: {exc.strerror or exc}", path) from None
    return parse_json(data, problem or f"{what} is not valid JSON", path, allow_nan)


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number JSON allows")


def read_model_config(folder: Path, needs: str) -> dict:
    """A model folder's config.json as an object; `needs` names what the command reads from the
    folder, for the message when it is not a folder at all."""
    folder = Path(folder)
    if not folder.is_dir():
        raise WorkbenchError(f"not a model folder ({needs})", folder)
    file = folder / "config.json"
    if not file.is_file():
        raise WorkbenchError("model folder has no config.json", folder)
    config = read_json(file, "config.json")
    if not isinstance(config, dict):
        raise WorkbenchError("config.json is not a JSON object", file)
    return config
