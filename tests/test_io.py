"""The checkpoint I/O layer: lazy reading in every layout, exact writing, refusal of bad input."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest
import torch
from conftest import DTYPES, LAYOUTS
from safetensors.torch import load_file, save_file
from tiny import make_model, state_dict_for_files

from workbench.errors import WorkbenchError
from workbench.io.reader import open_checkpoint
from workbench.io.writer import TensorSpec, plan_shards, write_checkpoint
from workbench.outputs import atomic_dir


def expected_state(tiny_tokenizer, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    state = state_dict_for_files(make_model(len(tiny_tokenizer), seed=0))
    return {k: v.to(dtype) for k, v in state.items()}


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_reader_lists_and_reads_every_layout_bit_exact(tiny_models, tiny_tokenizer, layout, dtype):
    expected = expected_state(tiny_tokenizer, DTYPES[dtype])
    with open_checkpoint(tiny_models(layout, dtype)) as checkpoint:
        assert set(checkpoint.names()) == set(expected)
        assert checkpoint.format == layout.split("-")[0]
        assert len(checkpoint.files) == (3 if layout.endswith("sharded") else 1)
        read = dict(checkpoint.iter_tensors())
        assert read.keys() == expected.keys()
        for name, tensor in read.items():
            info = checkpoint.info(name)
            assert info.shape == tuple(expected[name].shape) and info.dtype == expected[name].dtype
            assert torch.equal(tensor, expected[name]), name


def test_safetensors_views_are_zero_copy(tiny_model):
    with open_checkpoint(tiny_model) as checkpoint:
        name = checkpoint.names()[0]
        first, second = checkpoint.tensor(name), checkpoint.tensor(name)
        assert first.data_ptr() == second.data_ptr()  # both point into the one mapping


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_writer_round_trip_sharded_bit_exact_with_index(tiny_models, dtype, tmp_path):
    source = open_checkpoint(tiny_models("bin-sharded", dtype))
    specs = [TensorSpec(n, i.shape, i.dtype) for n, i in source.infos.items()]
    plans = plan_shards(specs, max_shard_size=source.total_bytes // 3)
    assert len(plans) >= 3
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        report = write_checkpoint(tmp, plans, lambda spec: source.tensor(spec.name))
    names = sorted(p.name for p in out.iterdir())
    n = len(plans)
    assert names == sorted([f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)] + ["model.safetensors.index.json"])
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == source.total_bytes
    assert set(index["weight_map"]) == set(source.names())
    with open_checkpoint(out) as written:
        read = dict(written.iter_tensors())
        assert read.keys() == set(source.names())
        for name, tensor in read.items():
            assert tensor.dtype == source.info(name).dtype
            assert torch.equal(tensor, source.tensor(name)), name
    assert sorted(report.files) == names[:-1]  # every shard hashed (the index is not a weight file)
    for filename, entry in report.files.items():
        data = (out / filename).read_bytes()
        assert entry["md5"] == hashlib.md5(data).hexdigest()
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
        assert entry["size"] == len(data)
    expected_sum = sum(float(t.double().sum()) for t in load_all(out).values())
    assert report.weight_sum == pytest.approx(expected_sum, rel=1e-12, abs=1e-9)


def load_all(folder):
    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(file))
    return state


def test_single_file_is_byte_identical_to_safetensors_save_file(tiny_model, tmp_path):
    source = open_checkpoint(tiny_model)
    specs = [TensorSpec(n, i.shape, i.dtype) for n, i in source.infos.items()]
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        write_checkpoint(tmp, plan_shards(specs, 10**12), lambda spec: source.tensor(spec.name).clone())
    assert (out / "model.safetensors").read_bytes() == (tiny_model / "model.safetensors").read_bytes()


def test_writer_accepts_row_blocks(tmp_path):
    tensor = torch.arange(40 * 7, dtype=torch.float32).reshape(40, 7)
    plans = plan_shards([TensorSpec("w", (40, 7), torch.float32)], 10**9)
    with atomic_dir(tmp_path / "out") as tmp:
        write_checkpoint(tmp, plans, lambda spec: (tensor[i:i + 16] for i in range(0, 40, 16)))
    assert torch.equal(load_file(tmp_path / "out" / "model.safetensors")["w"], tensor)


def test_failed_write_leaves_no_output(tiny_model, tmp_path):
    source = open_checkpoint(tiny_model)
    specs = [TensorSpec(n, i.shape, i.dtype) for n, i in source.infos.items()]

    def produce(spec):
        if spec.name == specs[-1].name:
            raise WorkbenchError("boom")
        return source.tensor(spec.name)

    with pytest.raises(WorkbenchError, match="boom"):
        with atomic_dir(tmp_path / "out") as tmp:
            write_checkpoint(tmp, plan_shards(specs, 10**12), produce)
    assert list(tmp_path.iterdir()) == []


def test_wrong_dtype_from_producer_is_refused(tmp_path):
    plans = plan_shards([TensorSpec("w", (2, 2), torch.float32)], 10**9)
    with pytest.raises(WorkbenchError, match="expected torch.float32"):
        with atomic_dir(tmp_path / "out") as tmp:
            write_checkpoint(tmp, plans, lambda spec: torch.zeros(2, 2, dtype=torch.float16))


def test_existing_output_needs_force(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(WorkbenchError, match="--force"):
        with atomic_dir(tmp_path / "out"):
            pass
    with atomic_dir(tmp_path / "out", force=True) as tmp:
        (tmp / "new").write_text("x")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["new"]


# -- bad input ---------------------------------------------------------------------------------


class NotATensor:
    pass


def write_header(path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_refuses_pickle_that_weights_only_rejects(tmp_path):
    torch.save({"w": torch.zeros(2), "evil": NotATensor()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(WorkbenchError, match="refusing to unpickle") as exc:
        open_checkpoint(tmp_path)
    assert exc.value.path.endswith("pytorch_model.bin")


def test_refuses_index_naming_a_shard_outside_the_folder(tmp_path):
    (tmp_path / "model").mkdir()
    save_file({"w": torch.zeros(2)}, tmp_path / "evil.safetensors")
    index = {"metadata": {}, "weight_map": {"w": "../evil.safetensors"}}
    (tmp_path / "model" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WorkbenchError, match="leaves its folder"):
        open_checkpoint(tmp_path / "model")


def test_refuses_index_naming_a_missing_shard(tmp_path):
    index = {"metadata": {}, "weight_map": {"w": "model-00001-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WorkbenchError, match="missing shard 'model-00001-of-00002.safetensors'"):
        open_checkpoint(tmp_path)


def test_refuses_header_that_does_not_parse(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 12) + b"{not json!!}")
    with pytest.raises(WorkbenchError, match="header does not parse"):
        open_checkpoint(path)
    path.write_bytes(struct.pack("<Q", 10**6) + b"{}")
    with pytest.raises(WorkbenchError, match="header does not parse: it claims"):
        open_checkpoint(path)


def test_refuses_tensor_running_past_the_end_of_the_file(tmp_path):
    path = tmp_path / "model.safetensors"
    write_header(path, {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8)
    with pytest.raises(WorkbenchError, match="'w' runs past the end of the file"):
        open_checkpoint(path)


def test_refuses_truncated_safetensors(tiny_model, tmp_path):
    data = (tiny_model / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(WorkbenchError, match="truncated or damaged"):
        open_checkpoint(tmp_path)


def test_refuses_truncated_bin(tiny_models, tmp_path):
    data = (tiny_models("bin") / "pytorch_model.bin").read_bytes()
    (tmp_path / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(WorkbenchError, match="truncated or damaged"):
        open_checkpoint(tmp_path)


def test_refuses_folder_without_weights(tmp_path):
    with pytest.raises(WorkbenchError, match="no weight files found"):
        open_checkpoint(tmp_path)


def test_outputs_get_the_usual_permissions(tmp_path):
    import os

    umask = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "f").write_text("x")
    finally:
        os.umask(umask)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
