"""The merge-method registry: what each method declares, and that `wb merge` takes its choices, its
parameter checks, its streaming decision, its base-model policy and merge.json's reference from
those declarations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from workbench.cli import wb
from workbench.errors import WorkbenchError
from workbench.io.reader import open_checkpoint
from workbench.weights.merge import merge
from workbench.weights.methods import registry
from workbench.weights.methods.base import BASE_MODEL_POLICIES, WEIGHT, MergeMethod, Param, TensorInputs
from workbench.weights.methods.streaming import StreamedMethod
from workbench.weights.methods.ties import PeftTaskArithmetic
from workbench.weights.recipe import validate

MERGEKIT_NAMES = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties",
                  "della", "della_linear", "sce", "model_stock", "slerp", "nuslerp", "multislerp", "karcher",
                  "nearswap", "passthrough", "arcee_fusion")


@pytest.fixture(scope="module")
def base(tiny_models) -> Path:
    return tiny_models()


@pytest.fixture(scope="module")
def fine_tunes(tiny_models) -> list[Path]:
    """Two full fine-tunes of the tiny base (the same model from other seeds): sources that need no peft."""
    return [tiny_models(seed=1), tiny_models(seed=2)]


def test_names_are_mergekits_then_peft_and_the_cli_choices():
    assert set(MERGEKIT_NAMES) <= set(registry.names())
    assert registry.names()[-3:] == ("peft_ties", "peft_dare_linear", "peft_dare_ties")
    assert tuple(registry.REGISTRY) == tuple(m.name for m in registry.METHODS)  # no name twice
    option = next(p for p in wb.commands["merge"].params if p.name == "method")
    assert tuple(option.type.choices) == registry.names()
    assert option.default == "task_arithmetic"


@pytest.mark.parametrize("name", registry.names())
def test_every_method_declares_its_params_base_policy_and_reference(name):
    method = registry.get(name)
    assert isinstance(method, MergeMethod) and method.name == name
    assert isinstance(method.row_blocks, bool) and method.base_model in BASE_MODEL_POLICIES
    assert isinstance(method.reference, str) and method.reference.startswith(("mergekit 0.1.5", "peft 0.21"))
    assert len({p.name for p in method.params}) == len(method.params)
    for param in method.params:
        assert isinstance(param, Param) and param.type in (int, float, bool)
        if not param.required and param.default is not None:
            assert param.allows(param.default), (name, param)


def test_the_peft_family_is_one_class_configured_three_ways():
    ties, dare_linear, dare_ties = (registry.get(f"peft_{n}") for n in ("ties", "dare_linear", "dare_ties"))
    assert all(type(m) is PeftTaskArithmetic for m in (ties, dare_linear, dare_ties))
    assert (ties.sparsify, ties.sign_election) == ("magnitude", True)
    assert (dare_linear.sparsify, dare_linear.sign_election) == ("random", False)
    assert (dare_ties.sparsify, dare_ties.sign_election) == ("random", True)
    assert [p.name for p in ties.params] == ["weight", "density"] and ties.params[0] == WEIGHT
    assert not any(m.row_blocks for m in (ties, dare_linear, dare_ties))
    # all three are streamed methods: peft_ties takes two passes over the row blocks (its exact
    # thresholds) before it merges block by block; DARE draws whole-tensor masks, so it merges whole
    assert all(isinstance(m, StreamedMethod) for m in (ties, dare_linear, dare_ties))
    first = TensorInputs("w", torch.zeros(4, 3), [torch.ones(4, 3)], [{"weight": 1.0}], {"density": 0.5},
                         torch.Generator(), 0, 1)
    assert [m.passes(first, 12, 3).passes for m in (ties, dare_linear, dare_ties)] == [2, 0, 0]
    assert [m.merged_whole(first) for m in (ties, dare_linear, dare_ties)] == [False, True, True]
    assert ties.reference == "peft 0.21 utils/merge_utils.py (ties)"
    with pytest.raises(ValueError, match="sparsify must be one of magnitude, random"):
        PeftTaskArithmetic("bogus", sparsify="top", sign_election=False)


def test_values_are_checked_against_the_declarations():
    density = registry.get("peft_ties").param("density")
    assert validate(1, density, "r.yml") == 1.0 and validate("5e-1", density, "r.yml") == 0.5
    for bad in (0, -0.5, 1.5, float("nan"), float("inf"), True, "dense"):
        with pytest.raises(WorkbenchError, match=r"^parameter density must be in \(0, 1\], got "):
            validate(bad, density, "r.yml")
    flag = Param("normalize", bool, False)
    assert validate(True, flag, "r.yml") is True
    with pytest.raises(WorkbenchError, match=r"^parameter normalize must be true or false, got 1 \(r\.yml\)$"):
        validate(1, flag, "r.yml")
    with pytest.raises(WorkbenchError, match="^unknown merge method 'magic'; use one of linear, "):
        registry.get("magic")


@pytest.mark.parametrize("name", ["task_arithmetic", "peft_ties", "peft_dare_linear", "peft_dare_ties"])
def test_merge_json_records_the_method_its_reference_and_values(base, fine_tunes, tmp_path, name):
    result = merge(base, fine_tunes, out=tmp_path / "out", method=name, weights=[0.5, 0.25],
                   seed=5, **({} if name == "task_arithmetic" else {"density": 0.75}))
    record = result.record
    assert (record["method"], record["reference"]) == (name, registry.get(name).reference)
    assert record["weights"] == [0.5, 0.25] and record["seed"] == 5
    assert record["parameters"] == ({} if name == "task_arithmetic" else {"density": 0.75})
    assert result.to_json() is record == json.loads((tmp_path / "out" / "merge.json").read_text())
    output = record["output"]
    assert result.lines() == [
        f"merged 3 model(s) into {tmp_path / 'out'} with {name} ({record['reference']})",
        f"tokenizer: base (from {base})",
        f"tensors: {output['tensors']} ({output['tensors_changed']} merged), files: 1, dtype: F32",
        f"weight-sum: {output['weight_sum']:.6f}",
    ]


class Largest(MergeMethod):
    """A method that only this test adds: the weighted task vector of largest magnitude, entry by
    entry, times `gain`. Row-local, so it declares row_blocks and is merged block by block."""

    name = "largest"
    params = (WEIGHT, Param("gain", float, 1.0, low=0, low_inclusive=True))
    base_model = "required"
    row_blocks = True
    reference = "this test"

    def __init__(self):
        self.blocks: list[tuple[str, int, int]] = []

    def merge_tensor(self, inputs: TensorInputs) -> torch.Tensor:
        self.blocks.append((inputs.name, inputs.start, inputs.stop))
        tasks = [(m - inputs.base) * p["weight"] for m, p in zip(inputs.models, inputs.model_params)]
        return inputs.base + largest(tasks) * inputs.params["gain"]


def largest(tensors: list[torch.Tensor]) -> torch.Tensor:
    stacked = torch.stack(tensors)
    return stacked.gather(0, stacked.abs().argmax(dim=0, keepdim=True))[0]


def test_a_registered_method_is_checked_streamed_and_recorded(base, fine_tunes, tmp_path, monkeypatch):
    """Adding a method is its object in the registry: nothing in the engine names it."""
    import workbench.weights.merge as merging
    from workbench.io.blocks import row_blocks

    method = Largest()
    monkeypatch.setattr(registry, "METHODS", (*registry.METHODS, method))
    monkeypatch.setattr(registry, "REGISTRY", {**registry.REGISTRY, method.name: method})
    monkeypatch.setattr(merging, "row_blocks", lambda shape: row_blocks(shape, 1000))  # several blocks a tensor

    record = merge(base, fine_tunes, out=tmp_path / "out", method="largest", weights=[1.0, -0.5], gain=2.0).record
    assert (record["method"], record["reference"], record["weights"]) == ("largest", "this test", [1.0, -0.5])
    assert record["parameters"] == {"gain": 2.0}
    b = load_file(base / "model.safetensors")
    t1, t2 = (load_file(f / "model.safetensors") for f in fine_tunes)
    ours = dict(open_checkpoint(tmp_path / "out").iter_tensors())
    for name in b:
        expected = b[name] + 2.0 * largest([t1[name] - b[name], -0.5 * (t2[name] - b[name])])
        assert torch.allclose(ours[name], expected, atol=1e-6), name
        cut = [(start, stop) for tensor, start, stop in method.blocks if tensor == name]
        assert cut == row_blocks(tuple(b[name].shape), 1000), name
    assert any(start > 0 for _, start, _ in method.blocks)

    with pytest.raises(WorkbenchError, match=r"^parameter gain must be >= 0, got -1"):
        merge(base, fine_tunes, out=tmp_path / "bad", method="largest", gain=-1)
    with pytest.raises(WorkbenchError, match="^merge method 'largest' has no parameter 'gian'; it takes gain, weight$"):
        merge(base, fine_tunes, out=tmp_path / "bad", method="largest", gian=1)
    assert not (tmp_path / "bad").exists()


def test_a_lora_adapter_is_a_merge_source_and_a_fine_tune_a_model(base, fine_tunes, tmp_path):
    """A LoRA adapter is the one kind of source the engine applies to a model (`model+lora`); a full
    fine-tune is a model of its own: its task vector is model − base, every tensor."""
    from workbench.weights.adapters.base import MergeSource
    from workbench.weights.adapters.lora import LoraAdapter

    lora = LoraAdapter(path=base, config={}, checkpoint=open_checkpoint(base))
    assert isinstance(lora, MergeSource) and lora.kind == "lora" and not lora.needs_base_rows
    record = merge(base, fine_tunes[:1], out=tmp_path / "out").record
    assert [(m["kind"], m["lora"]) for m in record["models"]] == [("full", None), ("full", None)]
    assert record["output"]["tensors_changed"] == len(open_checkpoint(base))
