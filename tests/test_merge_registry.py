"""The merge-method registry: what each method declares, and that `wb merge` takes its choices, its
checks, its streaming decision and merge.json's settings from those declarations."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from workbench.cli import wb
from workbench.errors import WorkbenchError
from workbench.io.reader import open_checkpoint
from workbench.weights.merge import merge
from workbench.weights.methods import registry
from workbench.weights.methods.base import WEIGHTS, MergeBlock, MergeMethod, Param
from workbench.weights.methods.ties import GeneralizedTaskArithmetic


@pytest.fixture(scope="module")
def base(tiny_models) -> Path:
    return tiny_models()


@pytest.fixture(scope="module")
def fine_tunes(tiny_models) -> list[Path]:
    """Two full fine-tunes of the tiny base (the same model from other seeds): sources that need no peft."""
    return [tiny_models(seed=1), tiny_models(seed=2)]


def test_names_are_the_methods_in_order_and_the_cli_choices():
    assert registry.names() == ("linear", "ties", "dare_linear", "dare_ties")
    assert tuple(registry.REGISTRY) == tuple(m.name for m in registry.METHODS)  # no name twice
    option = next(p for p in wb.commands["merge"].params if p.name == "method")
    assert tuple(option.type.choices) == registry.names()
    assert option.default == registry.names()[0]


@pytest.mark.parametrize("name", registry.names())
def test_every_method_declares_its_params(name):
    method = registry.get(name)
    assert isinstance(method, MergeMethod) and method.name == name
    assert isinstance(method.row_blocks, bool)
    assert method.params[0] == WEIGHTS  # the per-model weights come first, in every method
    assert len({p.name for p in method.params}) == len(method.params)
    for param in method.params:
        assert isinstance(param, Param) and param.type in (int, float)
        assert param.check(None, 2) == ([param.default] * 2 if param.per_model else param.default)
        assert registry.params()[[p.name for p in registry.params()].index(param.name)] == param  # one declaration


def test_the_family_is_one_class_configured_three_ways():
    ties, dare_linear, dare_ties = (registry.get(n) for n in ("ties", "dare_linear", "dare_ties"))
    assert all(type(m) is GeneralizedTaskArithmetic for m in (ties, dare_linear, dare_ties))
    assert (ties.sparsify, ties.sign_election) == ("magnitude", True)
    assert (dare_linear.sparsify, dare_linear.sign_election) == ("random", False)
    assert (dare_ties.sparsify, dare_ties.sign_election) == ("random", True)
    assert [p.name for p in ties.params] == ["weights", "density"]
    assert [p.name for p in dare_ties.params] == ["weights", "density", "seed"]
    assert registry.get("linear").row_blocks and not any(m.row_blocks for m in (ties, dare_linear, dare_ties))
    with pytest.raises(ValueError, match="sparsify must be one of magnitude, random"):
        GeneralizedTaskArithmetic("bogus", sparsify="top", sign_election=False)


def test_settings_are_checked_against_the_declarations():
    ties = registry.get("ties")
    assert ties.check({"weights": [1, 2], "density": 1}, 2) == {"weights": [1.0, 2.0], "density": 1}
    for density in (0, -0.5, 1.5, float("nan"), float("inf")):
        with pytest.raises(WorkbenchError, match=r"^--density must be in \(0, 1\], got "):
            ties.check({"density": density}, 1)
    with pytest.raises(WorkbenchError, match=r"^--weights has 3 value\(s\) for 2 adapter\(s\)$"):
        ties.check({"weights": [1, 2, 3]}, 2)
    with pytest.raises(WorkbenchError, match="^--weights must be finite numbers$"):
        ties.check({"weights": [1, float("inf")]}, 2)
    assert registry.get("linear").check({"weights": None, "density": 0, "seed": 3}, 2) == {"weights": [1.0, 1.0]}
    with pytest.raises(WorkbenchError, match="^unknown merge method 'magic'; use one of linear, ties, dare_linear, dare_ties$"):
        registry.get("magic")


@pytest.mark.parametrize("name", registry.names())
def test_merge_json_settings_derive_from_the_method(base, fine_tunes, tmp_path, name):
    result = merge(base, fine_tunes, out=tmp_path / "out", method=name, weights=[0.5, 0.25], density=0.75, seed=5)
    method, given = registry.get(name), {"weights": [0.5, 0.25], "density": 0.75, "seed": 5}
    recorded = {p.name: result.record[p.name] for p in registry.params()}
    assert recorded == {key: value if method.param(key) else None for key, value in given.items()}
    assert result.record["method"] == name
    assert result.to_json() is result.record == json.loads((tmp_path / "out" / "merge.json").read_text())
    output = result.record["output"]
    assert result.lines() == [
        f"merged 2 adapter(s) into {tmp_path / 'out'} ({name}, weights [0.5, 0.25])",
        f"tensors: {output['tensors']} ({output['tensors_changed']} changed), files: 1, dtype: F32",
        f"weight-sum: {output['weight_sum']:.6f}",
    ]


class Largest(MergeMethod):
    """A method that only this test adds: the weighted task vector of largest magnitude, entry by
    entry, times `gain`. Row-local, so it declares row_blocks and is merged block by block."""

    name = "largest"
    params = (WEIGHTS, Param("gain", float, 1.0, low=0, low_inclusive=True))
    row_blocks = True

    def __init__(self):
        self.blocks: list[tuple[str, int, int]] = []

    def combine(self, tasks: list[torch.Tensor], weights: Sequence[float], options: Mapping[str, Any],
                generator: torch.Generator | None = None) -> torch.Tensor:
        return largest([task * weight for task, weight in zip(tasks, weights)]) * options["gain"]

    def merge(self, block: MergeBlock) -> torch.Tensor:
        self.blocks.append((block.name, block.start, block.stop))
        return super().merge(block)


def largest(tensors: list[torch.Tensor]) -> torch.Tensor:
    stacked = torch.stack(tensors)
    return stacked.gather(0, stacked.abs().argmax(dim=0, keepdim=True))[0]


def test_a_registered_method_is_checked_streamed_and_recorded(base, fine_tunes, tmp_path, monkeypatch):
    """Adding a method is its object in the registry: nothing in the merger names it."""
    import workbench.weights.merge as merging
    from workbench.io.blocks import row_blocks

    method = Largest()
    monkeypatch.setattr(registry, "METHODS", (*registry.METHODS, method))
    monkeypatch.setattr(registry, "REGISTRY", {**registry.REGISTRY, method.name: method})
    monkeypatch.setattr(merging, "row_blocks", lambda shape: row_blocks(shape, 1000))  # several blocks a tensor

    record = merge(base, fine_tunes, out=tmp_path / "out", method="largest", weights=[1.0, -0.5], gain=2.0).record
    assert (record["method"], record["weights"], record["gain"]) == ("largest", [1.0, -0.5], 2.0)
    assert record["density"] is None and record["seed"] is None
    b = load_file(base / "model.safetensors")
    t1, t2 = (load_file(f / "model.safetensors") for f in fine_tunes)
    ours = dict(open_checkpoint(tmp_path / "out").iter_tensors())
    for name in b:
        expected = b[name] + 2.0 * largest([t1[name] - b[name], -0.5 * (t2[name] - b[name])])
        assert torch.allclose(ours[name], expected, atol=1e-6), name
        cut = [(start, stop) for tensor, start, stop in method.blocks if tensor == name]
        assert cut == row_blocks(tuple(b[name].shape), 1000), name
    assert any(start > 0 for _, start, _ in method.blocks)

    with pytest.raises(WorkbenchError, match=r"^--gain must be >= 0, got -1$"):
        merge(base, fine_tunes, out=tmp_path / "bad", method="largest", gain=-1)
    with pytest.raises(TypeError, match="unexpected keyword argument 'gian'"):
        merge(base, fine_tunes, out=tmp_path / "bad", method="largest", gian=1)
    assert not (tmp_path / "bad").exists()


def test_adapter_kinds_are_merge_sources(base, fine_tunes):
    """Both kinds satisfy the one protocol the merger works through; a fine-tune adds no delta."""
    from workbench.weights.adapters.base import MergeSource
    from workbench.weights.adapters.finetune import FineTune, open_fine_tune
    from workbench.weights.adapters.lora import LoraAdapter

    tuned = open_fine_tune(fine_tunes[0], open_checkpoint(base))
    lora = LoraAdapter(path=base, config={}, checkpoint=open_checkpoint(base))
    assert isinstance(tuned, FineTune) and isinstance(tuned, MergeSource) and isinstance(lora, MergeSource)
    names = open_checkpoint(base).names()
    assert all(tuned.touches(n) and not tuned.adds_delta(n) and tuned.replacement(n) is not None for n in names)
    assert tuned.kind == "full" and lora.kind == "lora"
