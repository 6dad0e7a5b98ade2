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
    for section in (config, config.get("text_config")):
        if isinstance(section, dict):
            _check_architecture_numbers(section, file)
    return config


# The sizes and constants transformers builds a model from: a crafted value (a negative width, a NaN
# epsilon, a 2**40 vocabulary) would otherwise surface as a traceback, or a huge allocation, inside it.
SIZE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "max_position_embeddings")
FLOAT_KEYS = ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "rope_theta", "initializer_range")
MAX_SIZE = 2**24  # above any real width, layer count, vocabulary or context length


def _check_architecture_numbers(config: dict, file: Path) -> None:
    for key in SIZE_KEYS:
        value = config.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_SIZE):
            raise WorkbenchError(f"config.json's {key} must be a whole number from 1 to {MAX_SIZE}, not {value!r}", file)
    for key in FLOAT_KEYS:
        value = config.get(key)
        finite = isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) <= 1e30
        if value is not None and not finite:  # `abs(x) <= bound` is False for NaN and never overflows
            raise WorkbenchError(f"config.json's {key} must be a finite number, not {value!r}", file)
