"""DoRA adapters merged by wb's own reader (workbench.weights.adapters), compared with peft 0.21's
merge_and_unload on real adapters saved by peft: Linear, Embedding and Conv1D (fan_in_fan_out)
layers, rank/alpha patterns, rsLoRA, several adapters, hub-cache folders, damaged magnitudes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from clicheck import assert_one_error
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from tiny import as_hub_cache

from workbench.cli import wb
from workbench.errors import WorkbenchError
from workbench.io.blocks import row_blocks
from workbench.io.reader import open_checkpoint
from workbench.weights.adapters.base import MergeSource
from workbench.weights.adapters.lora import read_lora_adapter

TOLERANCE = 1e-6  # fp32, as the issue asks
SMALL_BLOCKS = 200  # elements per row block: several blocks per tensor, so column norms are combined across blocks


# -- helpers ---------------------------------------------------------------------------------------
def load_model(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def make_dora(base: Path, out: Path, seed: int, **lora) -> Path:
    """A peft DoRA adapter on `base` with random A, B and a magnitude vector moved off its
    initial value (the norm of W), so that every part of W′ = m / ‖W + D‖ ⊙ (W + D) matters."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_model(base), LoraConfig(**{"r": 4, "lora_alpha": 8, "use_dora": True, **lora}))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1.0 + 0.2 * torch.randn(param.shape, generator=generator))
            elif "lora_" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(out)
    return out


def peft_merged(base: Path, *adapters: Path) -> dict[str, torch.Tensor]:
    """peft's merge_and_unload with every adapter active at once (peft stacks them layer by layer)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_model(base), adapters[0], adapter_name="a0")
    for i, adapter in enumerate(adapters[1:], start=1):
        model.load_adapter(adapter, adapter_name=f"a{i}")
    model.base_model.set_adapter([f"a{i}" for i in range(len(adapters))])
    return {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}


def wb_merged(base: Path, adapters: list[Path], weights: list[float] | None = None, block_elements: int = SMALL_BLOCKS,
              base_rows: str = "copy") -> dict[str, torch.Tensor]:
    """base + Σ wᵢ·τᵢ through the MergeSource protocol only, row block by row block, as an engine
    does: τ = (replacement − base) + delta, the delta given the float32 base rows ("copy"), or
    none ("none"), or the accumulator itself while it holds them ("acc", one adapter only)."""
    checkpoint = open_checkpoint(base)
    sources = [read_lora_adapter(Path(a)).bind(checkpoint) for a in adapters]
    weights = weights or [1.0] * len(sources)
    merged = {}
    for name, info in checkpoint.infos.items():
        blocks = []
        for start, stop in row_blocks(info.shape, block_elements):
            rows = checkpoint.tensor(name)[start:stop].float()
            acc = rows.clone()
            given = {"copy": rows, "none": None, "acc": acc}[base_rows]
            for source, weight in zip(sources, weights):
                replacement = source.replacement(name)
                if replacement is not None:
                    acc += weight * (replacement[start:stop].float() - rows)
                if source.adds_delta(name):
                    source.add_delta(acc, name, start, stop, weight, base_rows=given)
            blocks.append(acc)
        merged[name] = torch.cat(blocks)
    return merged


def assert_equal_tensors(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], base: Path) -> int:
    """Every tensor within TOLERANCE of the reference; returns how many differ from the base (so a
    test can check the adapter changed something)."""
    base_state = load_file(base / "model.safetensors")
    assert set(ours) == set(base_state)
    changed = 0
    for name, tensor in ours.items():
        difference = float((tensor - reference[name].float()).abs().max())
        assert difference <= TOLERANCE, (name, difference)
        changed += not torch.equal(reference[name].float(), base_state[name].float())
    return changed


def edited(adapter: Path, out: Path, tensors=None, config=None) -> Path:
    shutil.copytree(adapter, out)
    if tensors is not None:
        state = load_file(adapter / "adapter_model.safetensors")
        save_file(tensors(state), str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    if config is not None:
        settings = json.loads((adapter / "adapter_config.json").read_text())
        (out / "adapter_config.json").write_text(json.dumps({**settings, **config}))
    return out


def magnitude_key(state: dict, module: str = "layers.0.self_attn.q_proj") -> str:
    return next(k for k in state if module in k and k.endswith("lora_magnitude_vector"))


def run_merge(*args) -> object:
    return CliRunner().invoke(wb, ["merge", *map(str, args)])


@pytest.fixture(scope="module")
def base(tiny_models) -> Path:
    return tiny_models()


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dora")


@pytest.fixture(scope="module")
def dora(base, work) -> Path:
    """Linear layers, the embedding and lm_head: all three of peft's DoRA merge paths on Llama."""
    return make_dora(base, work / "dora", seed=1, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens", "lm_head"])


# -- equal to peft ---------------------------------------------------------------------------------
def test_dora_equals_peft_merge_and_unload(base, dora):
    adapter = read_lora_adapter(dora)
    assert adapter.config["use_dora"] and sum(p.dora for p in adapter.modules.values()) == 8
    source = read_lora_adapter(dora).bind(open_checkpoint(base))
    assert isinstance(source, MergeSource) and source.needs_base_rows
    assert source.summary()["dora_modules"] == 8
    reference = peft_merged(base, dora)
    assert assert_equal_tensors(wb_merged(base, [dora]), reference, base) == 8


def test_base_rows_given_read_or_whole_give_the_same(base, dora):
    """base_rows passed, read by the source itself or the accumulator itself, small row blocks or
    whole tensors: one result (the column norms of the embedding are combined across blocks)."""
    given = wb_merged(base, [dora])
    for other in (wb_merged(base, [dora], base_rows="none"), wb_merged(base, [dora], base_rows="acc"),
                  wb_merged(base, [dora], block_elements=2**24)):
        for name, tensor in given.items():
            assert float((tensor - other[name]).abs().max()) <= TOLERANCE, name


def test_dora_is_not_plain_lora(base, dora):
    """The magnitude rescaling is applied: wb's result is far from base + scale·B@A."""
    ours = wb_merged(base, [dora])
    plain = edited(dora, dora.parent / "as-plain", config={"use_dora": False},
                   tensors=lambda s: {k: v for k, v in s.items() if "magnitude" not in k})
    without = wb_merged(base, [plain])
    name = "model.layers.0.self_attn.q_proj.weight"
    assert float((ours[name] - without[name]).abs().max()) > 1e-3


def test_conv1d_fan_in_fan_out_equals_peft(work):
    """GPT-2 stores its projections (in, out) as Conv1D: DoRA's norm is then over each column of the
    stored tensor, square c_proj included."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = work / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=300, n_positions=64)).save_pretrained(gpt2)
    adapter = make_dora(gpt2, work / "gpt2-dora", seed=4, target_modules=["c_attn", "c_proj", "c_fc"],
                        fan_in_fan_out=True)
    source = read_lora_adapter(adapter).bind(open_checkpoint(gpt2))
    assert all(pair.transposed and pair.dora for pair in source.modules.values())
    assert assert_equal_tensors(wb_merged(gpt2, [adapter]), peft_merged(gpt2, adapter), gpt2) == 8


def test_rank_alpha_patterns_and_rslora_with_dora(base, work):
    adapter = make_dora(base, work / "dora-patterns", seed=5, r=4, lora_alpha=8, use_rslora=True,
                        target_modules=["q_proj", "k_proj", "up_proj"],
                        rank_pattern={"k_proj": 2, "layers.1.mlp.up_proj": 6},
                        alpha_pattern={"layers.0.self_attn.q_proj": 3})
    modules = read_lora_adapter(adapter).modules
    assert modules["model.layers.1.mlp.up_proj.weight"].rank == 6
    assert modules["model.layers.0.self_attn.q_proj.weight"].scale == 3 / 2  # rsLoRA: alpha / sqrt(r)
    assert assert_equal_tensors(wb_merged(base, [adapter]), peft_merged(base, adapter), base) == 6


def test_two_dora_adapters(base, work, dora):
    """On separate layers, two adapters give what peft gives with both active. On a shared layer
    each adapter's task vector is its own peft merge minus the base (its norm from the unmerged
    base), combined with the weights; peft with both active instead rescales the first's merged
    weight by the second's factor, which differs."""
    other = make_dora(base, work / "dora-k", seed=2, target_modules=["k_proj", "gate_proj"], r=8, lora_alpha=16)
    assert assert_equal_tensors(wb_merged(base, [dora, other]), peft_merged(base, dora, other), base) == 12

    shared = make_dora(base, work / "dora-q", seed=3, target_modules=["q_proj", "k_proj"])
    base_state = load_file(base / "model.safetensors")
    alone = [peft_merged(base, dora), peft_merged(base, shared)]
    ours = wb_merged(base, [dora, shared], weights=[0.6, 0.4])
    expected = {name: tensor + 0.6 * (alone[0][name] - tensor) + 0.4 * (alone[1][name] - tensor)
                for name, tensor in base_state.items()}
    assert_equal_tensors(ours, expected, base)
    stacked = peft_merged(base, dora, shared)["model.layers.0.self_attn.q_proj.weight"]
    summed = wb_merged(base, [dora, shared])["model.layers.0.self_attn.q_proj.weight"]
    assert float((stacked - summed).abs().max()) > 1e-3


def test_hub_cache_and_relative_adapter_folders(base, work, dora, monkeypatch):
    snapshot = as_hub_cache(dora, work / "hub", repo_id="wb-test/tiny-dora")
    assert (snapshot / "adapter_model.safetensors").is_symlink()
    reference = wb_merged(base, [dora])
    monkeypatch.chdir(work)
    for folder in (snapshot, Path("dora"), snapshot.relative_to(work)):
        ours = wb_merged(base, [folder])
        assert all(torch.equal(ours[name], reference[name]) for name in reference), folder


# -- damaged adapters: one error naming the module -------------------------------------------------
def _wrong_shape(state):
    key = magnitude_key(state)
    return {**state, key: torch.ones(63)}


def _nan(state):
    key = magnitude_key(state)
    return {**state, key: state[key].clone().index_fill_(0, torch.tensor([5]), float("nan"))}


def _integer(state):
    key = magnitude_key(state)
    return {**state, key: state[key].to(torch.int32)}


def _missing(state):
    return {k: v for k, v in state.items() if k != magnitude_key(state)}


def _orphan(state):
    return {**state, "base_model.model.model.layers.1.mlp.up_proj.lora_magnitude_vector": torch.ones(64)}


DAMAGED = {
    "wrong-shape": ({"tensors": _wrong_shape}, "DoRA magnitude vector is torch.float32 [63], but its lora_B gives 64"),
    "nan": ({"tensors": _nan}, "'model.layers.0.self_attn.q_proj': its DoRA magnitude vector holds NaN or inf"),
    "integer": ({"tensors": _integer}, "so it must be float [64]"),
    "missing": ({"tensors": _missing}, "has no lora_magnitude_vector, but the config says use_dora"),
    "orphan": ({"tensors": _orphan}, "'model.layers.1.mlp.up_proj' has a DoRA magnitude vector but no lora_A/lora_B"),
    "not-dora": ({"config": {"use_dora": False}}, "does not say use_dora"),
    "use-dora-text": ({"config": {"use_dora": "yes"}}, "use_dora must be true or false"),
}


@pytest.mark.parametrize("case", DAMAGED)
def test_damaged_magnitude_is_refused(work, dora, case):
    edits, message = DAMAGED[case]
    adapter = edited(dora, work / f"damaged-{case}", **edits)
    with pytest.raises(WorkbenchError) as caught:
        read_lora_adapter(adapter)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert caught.value.path in (str(adapter), str(adapter / "adapter_config.json"))


def test_other_variants_stay_refused(work, dora):
    for field, what in (("lora_bias", "lora_bias"), ("use_qalora", "QALoRA"), ("use_bdlora", "block-diagonal")):
        adapter = edited(dora, work / f"variant-{field}", config={field: True})
        with pytest.raises(WorkbenchError, match=what):
            read_lora_adapter(adapter)


# -- through the CLI -------------------------------------------------------------------------------
def test_cli_merges_dora_equal_to_peft(base, work, dora, monkeypatch):
    snapshot = as_hub_cache(dora, work / "hub-cli", repo_id="wb-test/tiny-dora-cli")
    monkeypatch.chdir(work)
    result = run_merge("--base", base, "--adapter", Path("hub-cli") / snapshot.relative_to(work / "hub-cli"),
                       "--out", "cli-merged")
    assert result.exit_code == 0, result.output
    merged = dict(open_checkpoint(work / "cli-merged").iter_tensors())
    assert assert_equal_tensors(merged, peft_merged(base, dora), base) == 8
    record = json.loads((work / "cli-merged" / "merge.json").read_text())
    adapter = next(model for model in record["models"] if model.get("lora"))
    assert adapter["dora_modules"] == 8 and adapter["config"]["use_dora"] is True


def test_cli_refuses_a_damaged_magnitude_in_one_line(base, work, dora):
    adapter = edited(dora, work / "cli-nan", tensors=_nan)
    result = run_merge("--base", base, "--adapter", adapter, "--out", work / "cli-nan-out")
    assert_one_error(result, "DoRA magnitude vector holds NaN or inf", f"({adapter})")
    assert not (work / "cli-nan-out").exists()
