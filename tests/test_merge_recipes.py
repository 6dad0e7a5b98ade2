"""`wb merge --config`: mergekit 0.1.5's own YAML recipes, run by mergekit (in-process, on the CPU)
and by `wb merge` on the same tiny Llama models, every tensor compared; plus what a recipe may say
that wb refuses, hub-cache model ids and relative paths."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from clicheck import assert_one_error
from click.testing import CliRunner
from safetensors.torch import load_file
from tiny import as_hub_cache, make_model, make_tokenizer, perturbed, save_layout, state_dict_for_files

from workbench.cli import wb
from workbench.io.reader import open_checkpoint
from workbench.weights.methods.base import Param
from workbench.weights.recipe import Conditional, evaluate_setting

LAYERS = 4
FP32_TOLERANCE = 2e-5


# -- the models ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    """A 4-layer tiny Llama `base`, fine-tunes `ft1`, `ft2` (perturbed copies), `ftx` (ft1 with three
    added tokens, its embeddings grown), a LoRA adapter `lora` and a DoRA adapter `dora` on base."""
    root = tmp_path_factory.mktemp("zoo")
    tokenizer = make_tokenizer()
    model = make_model(len(tokenizer), layers=LAYERS)
    model.config.architectures = ["LlamaForCausalLM"]  # what a saved model's config says; mergekit reads it
    state = state_dict_for_files(model)
    save_layout(state, root / "base", config=model.config, tokenizer=tokenizer)
    for seed in (1, 2):
        save_layout(perturbed(state, 0.05, seed), root / f"ft{seed}", config=model.config, tokenizer=tokenizer)
    grown = perturbed(state, 0.05, 1)
    generator = torch.Generator().manual_seed(9)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        grown[name] = torch.cat([grown[name], 0.02 * torch.randn(3, grown[name].shape[1], generator=generator)])
    tokenizer.add_tokens(["<extra_a>", "<extra_b>", "zebra"])
    model.config.vocab_size = len(tokenizer)
    save_layout(grown, root / "ftx", config=model.config, tokenizer=tokenizer)
    _adapter(root / "base", root / "lora", seed=3, target_modules=["q_proj", "v_proj", "down_proj"])
    _adapter(root / "base", root / "dora", seed=4, target_modules=["q_proj", "o_proj"], use_dora=True)
    return root


def _adapter(base: Path, out: Path, seed: int, **lora) -> None:
    """A peft adapter on `base` with every adapter weight randomized (so its deltas are not zero)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, lora_alpha=8, **lora))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(out)


def mergekit_merge(zoo: Path, recipe: str, out: Path) -> None:
    """mergekit's own run_merge on `recipe`, in-process, on the CPU, from `zoo` (relative paths)."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    options = MergeOptions(lazy_unpickle=False, write_model_card=False, quiet=True, device="cpu",
                           lora_merge_cache=str(zoo / "mergekit-lora-cache"))
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(recipe)), str(out), options)


def wb_merge(*args: str):
    return CliRunner().invoke(wb, ["merge", *map(str, args)])


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in open_checkpoint(folder).iter_tensors()}


def assert_same_tensors(ours: Path, theirs: Path, tolerance: float = FP32_TOLERANCE) -> None:
    mine, reference = tensors(ours), tensors(theirs)
    assert sorted(mine) == sorted(reference)
    for name, tensor in reference.items():
        assert mine[name].shape == tensor.shape and mine[name].dtype == tensor.dtype, name
        assert float((mine[name].float() - tensor.float()).abs().max()) <= tolerance, name


def run_both(zoo: Path, name: str, recipe: str, monkeypatch) -> tuple[Path, Path, dict]:
    """(wb's output, mergekit's output, wb's merge.json) for `recipe`, both run from `zoo`."""
    monkeypatch.chdir(zoo)
    (zoo / f"{name}.yml").write_text(recipe)
    ours, theirs = zoo / f"wb-{name}", zoo / f"mk-{name}"
    for folder in (ours, theirs):
        shutil.rmtree(folder, ignore_errors=True)
    mergekit_merge(zoo, recipe, theirs)
    result = wb_merge("--config", f"{name}.yml", "--out", ours.name)
    assert result.exit_code == 0, result.output
    return ours, theirs, json.loads((ours / "merge.json").read_text())


# -- recipes: every tensor as mergekit's ------------------------------------------------------------
RECIPES = {
    "task_arithmetic": """
merge_method: task_arithmetic
base_model: base
models:
  - model: ft1
    parameters: {weight: 0.7}
  - model: ft2
    parameters: {weight: [0.2, 0.5, 0.9]}   # a gradient across the layers
parameters: {lambda: 0.8}
""",
    "ties": """
merge_method: ties
base_model: base
models:
  - model: base
  - model: ft1
    parameters: {weight: 0.6, density: 0.5}
  - model: ft2
    parameters:
      weight: 0.4
      density: [{filter: self_attn, value: 0.3}, {value: 0.7}]
parameters: {int8_mask: true}
""",
    "slerp": """
merge_method: slerp
base_model: base
models: [{model: base}, {model: ft1}]
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float32
""",
    "passthrough": """
merge_method: passthrough
slices:
  - sources: [{model: base, layer_range: [0, 3]}]
  - sources: [{model: ft1, layer_range: [1, 4]}]
""",
    "linear": """
merge_method: linear
models:
  - model: ft1
    parameters: {weight: 1.0}
  - model: ft2
    parameters: {weight: 0.5}
""",
    "lora": """
merge_method: task_arithmetic
base_model: base
models:
  - model: base+lora
    parameters: {weight: 0.8}
  - model: ft2
    parameters: {weight: 0.3}
""",
    "dora": """
merge_method: ties
base_model: base
models:
  - model: base+dora
    parameters: {weight: 1.0, density: 0.6}
  - model: ft1
    parameters: {weight: 0.5, density: 0.6}
""",
}


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_gives_mergekits_tensors(zoo, monkeypatch, name):
    ours, theirs, record = run_both(zoo, name, RECIPES[name], monkeypatch)
    assert_same_tensors(ours, theirs)
    mine, reference = (json.loads((f / "config.json").read_text()) for f in (ours, theirs))
    assert mine["num_hidden_layers"] == reference["num_hidden_layers"]
    assert record["method"] == yaml.safe_load(RECIPES[name])["merge_method"]
    assert record["reference"].startswith("mergekit 0.1.5 ")
    given = yaml.safe_load(RECIPES[name])
    assert record["recipe"]["given"] == given
    donor = given.get("base_model") or (given.get("models") or given.get("slices")[0]["sources"])[0]["model"]
    assert record["tokenizer"]["source"] == "base" and record["tokenizer"]["from"] == str(zoo / donor)
    if name == "passthrough":
        assert mine["num_hidden_layers"] == 6 and record["output"]["tensors"] == 3 + 6 * 9


def test_model_plus_lora_is_applied_streamed_never_materialised(zoo, monkeypatch):
    """mergekit writes the merged LoRA model to its cache first; wb writes nothing but OUT."""
    run_both(zoo, "lora", RECIPES["lora"], monkeypatch)
    assert any((zoo / "mergekit-lora-cache").iterdir())
    record = json.loads((zoo / "wb-lora" / "merge.json").read_text())
    lora = next(m for m in record["models"] if m["reference"] == "base+lora")
    assert (lora["kind"], lora["lora"], lora["lora_modules"]) == ("lora", str(zoo / "lora"), 3 * LAYERS)


class NotStreamed:
    """What the engine's `StreamedMethod` becomes in a test that wants whole tensors: no method is one."""


@pytest.mark.parametrize(("name", "passes"), [("ties", 2), ("slerp", 1)])
def test_streamed_methods_merge_row_block_by_row_block(zoo, monkeypatch, name, passes):
    """The engine hands a streamed whole-tensor method (ties' exact thresholds, slerp's angle) the
    row blocks of each of its passes through `merge_blocks`: over blocks of 300 entries (four or
    more per matrix), the output is the whole-tensor merge's and mergekit's, and no read asks for a
    whole matrix: every block is read once per pass and once more to merge."""
    import workbench.weights.merge as merging
    from workbench.io.blocks import row_blocks

    monkeypatch.chdir(zoo)
    (zoo / f"{name}.yml").write_text(RECIPES[name])
    whole = zoo / f"wb-whole-{name}"
    shutil.rmtree(whole, ignore_errors=True)
    with monkeypatch.context() as patch:
        patch.setattr(merging, "StreamedMethod", NotStreamed)  # merge_tensor on whole tensors
        result = wb_merge("--config", f"{name}.yml", "--out", whole.name)
        assert result.exit_code == 0, result.output

    reads: dict[str, list[tuple[int, int]]] = {}
    inputs = merging.TensorMerger._inputs

    def counted(self, plan, start, stop, *args):
        reads.setdefault(plan.name, []).append((start, stop))
        return inputs(self, plan, start, stop, *args)

    monkeypatch.setattr(merging.TensorMerger, "_inputs", counted)
    monkeypatch.setattr(merging, "row_blocks", lambda shape: row_blocks(shape, 300))
    streamed, theirs, _ = run_both(zoo, name, RECIPES[name], monkeypatch)
    assert_same_tensors(streamed, whole, 1e-6)
    assert_same_tensors(streamed, theirs)
    shapes = {name: tuple(tensor.shape) for name, tensor in tensors(whole).items()}
    matrices = [tensor for tensor, shape in shapes.items() if len(shape) == 2 and tensor in reads]
    assert len(matrices) >= 7 * LAYERS
    for tensor in matrices:
        blocks = row_blocks(shapes[tensor], 300)
        assert len(blocks) >= 4, tensor
        assert sorted(reads[tensor]) == sorted([blocks[0]] + blocks[1:] * (passes + 1)), tensor  # block 0 kept
        assert max(stop - start for start, stop in reads[tensor]) < shapes[tensor][0], tensor


def test_tokenizer_union_gives_mergekits_vocabulary_and_rows(zoo, monkeypatch):
    from transformers import AutoTokenizer

    recipe = """
merge_method: ties
base_model: base
models:
  - model: ft2
    parameters: {weight: 0.5, density: 0.6}
  - model: ftx
    parameters: {weight: 0.5, density: 0.6}
tokenizer_source: union
"""
    ours, theirs, record = run_both(zoo, "union", recipe, monkeypatch)
    assert_same_tensors(ours, theirs)
    assert tensors(ours)["model.embed_tokens.weight"].shape[0] == len(make_tokenizer()) + 3
    mine, reference = (AutoTokenizer.from_pretrained(f) for f in (ours, theirs))
    assert mine.get_vocab() == reference.get_vocab()
    assert json.loads((ours / "config.json").read_text())["vocab_size"] == len(reference)
    assert record["tokenizer"]["source"] == "union" and record["tokenizer"]["added_to_base"] == 3


# -- gradients and filters: mergekit's resolution rule ---------------------------------------------
def test_evaluate_setting_is_mergekits():
    from mergekit.config import ConditionalParameter
    from mergekit.config import evaluate_setting as mergekit_evaluate
    from pydantic import TypeAdapter

    settings = [0.3, [0.0, 1.0], [1, 0.5, 0.2], [0.1, 0.9, 0.4, 0.7, 0.2], [True, False, True], "1e-3",
                [{"filter": "mlp", "value": [0.0, 1.0]}, {"value": 0.25}],
                [{"filter": "self_attn", "value": 0.9}], {"filter": "*", "value": [2, 4]}, []]
    names = ["model.layers.3.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.weight", "lm_head.weight"]
    for setting in settings:
        ours_setting = _ours(setting)
        theirs_setting = ([ConditionalParameter(**s) for s in setting] if setting and isinstance(setting, list)
                          and isinstance(setting[0], dict) else
                          ConditionalParameter(**setting) if isinstance(setting, dict) else setting)
        kind = bool if setting and isinstance(setting, list) and isinstance(setting[0], bool) else float
        for name in names:
            for t in (0.0, 1 / 3, 0.5, 0.7, 2 / 3, 1.0):
                expected = mergekit_evaluate(name, theirs_setting, t, validate=TypeAdapter(kind).validate_python)
                got = evaluate_setting(name, ours_setting, t, Param("p", kind, None), "r.yml")
                assert got == pytest.approx(expected, abs=1e-12) if expected is not None else got is None, \
                    (setting, name, t)


def _ours(setting):
    """A setting as recipe.py reads it (its {value, filter} entries as Conditional)."""
    if isinstance(setting, dict):
        return Conditional(setting["value"], setting.get("filter"))
    if isinstance(setting, list) and setting and isinstance(setting[0], dict):
        return [Conditional(s["value"], s.get("filter")) for s in setting]
    return setting


def test_the_command_line_is_a_shorthand_of_the_same_recipe(zoo, monkeypatch, tmp_path):
    monkeypatch.chdir(zoo)
    (tmp_path / "r.yml").write_text("""
merge_method: ties
base_model: base
models:
  - {model: ft1, parameters: {weight: 0.6}}
  - {model: ft2, parameters: {weight: 0.4}}
parameters: {density: 0.5}
""")
    assert wb_merge("--config", tmp_path / "r.yml", "--out", tmp_path / "recipe").exit_code == 0
    result = wb_merge("--base", "base", "--adapter", "ft1", "--adapter", "ft2", "--weights", "0.6,0.4",
                      "--method", "ties", "--density", "0.5", "--out", tmp_path / "shorthand")
    assert result.exit_code == 0, result.output
    a, b = tensors(tmp_path / "recipe"), tensors(tmp_path / "shorthand")
    assert all(torch.equal(a[n], b[n]) for n in a) and sorted(a) == sorted(b)


# -- what wb refuses: one line naming it ------------------------------------------------------------
BASE = "merge_method: task_arithmetic\nbase_model: base\n"
REFUSED = {
    "unknown-key": (BASE + "models: [{model: ft1, parameters: {weight: 1}}]\nmerge_methd: ties\n",
                    "unknown recipe key 'merge_methd'"),
    "modules": ("merge_method: linear\nmodules: {text: {models: [{model: ft1}]}}\n", "wb does not do per-module"),
    "unknown-method": ("merge_method: frankenmerge\nmodels: [{model: ft1}]\n", "merge_method 'frankenmerge': wb does not do it"),
    "entry-key": (BASE + "models: [{model: ft1, paramters: {weight: 1}}]\n", "unknown key 'paramters' in models[0]"),
    "required": (BASE + "models: [{model: ft1}]\n", "missing parameter 'weight' for ft1."),
    "global-per-model": ("merge_method: slerp\nbase_model: base\nmodels: [{model: base}, {model: ft1, parameters: {t: 0.5}}]\n",
                         "'t' is a global parameter of slerp"),
    "named-template": (BASE + "models: [{model: ft1, parameters: {weight: 1}}]\nchat_template: chatml\n",
                       "chat_template 'chatml'"),
    "residual": ("merge_method: passthrough\nslices: [{sources: [{model: ft1, layer_range: [0, 2]}], residual_weight: 0.5}]\n",
                 "residual_weight"),
    "architecture": (BASE + "models: [{model: {model: ft1, override_architecture: X}, parameters: {weight: 1}}]\n",
                     "override_architecture"),
    "missing-model": (BASE + "models: [{model: nowhere/at-all, parameters: {weight: 1}}]\n",
                      "'nowhere/at-all' is not a folder"),
    "bad-range": ("merge_method: passthrough\nslices: [{sources: [{model: ft1, layer_range: [2, 9]}]}]\n",
                  "goes past its 4 layers"),
    "bad-value": (BASE + "models: [{model: ft1, parameters: {weight: [1, {x: 2}]}}]\n", "models[0].parameters.weight"),
    "yaml": ("merge_method: [unclosed\n", "not valid YAML"),
    "both-tokenizers": (BASE + "models: [{model: ft1, parameters: {weight: 1}}]\ntokenizer_source: base\n"
                        "tokenizer: {source: union}\n", "not both"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_what_wb_does_not_do_is_one_line_naming_it(zoo, monkeypatch, tmp_path, case):
    recipe, fragment = REFUSED[case]
    monkeypatch.chdir(zoo)
    (tmp_path / "r.yml").write_text(recipe)
    result = wb_merge("--config", tmp_path / "r.yml", "--out", tmp_path / "out")
    assert_one_error(result, fragment, "r.yml")
    assert not (tmp_path / "out").exists()


def test_config_excludes_the_shorthand_options(zoo, tmp_path):
    (tmp_path / "r.yml").write_text(RECIPES["linear"])
    result = wb_merge("--config", tmp_path / "r.yml", "--base", zoo / "base", "--out", tmp_path / "out")
    assert_one_error(result, "--config gives the whole merge; drop --base")


# -- where the models are ---------------------------------------------------------------------------
def test_hub_cache_model_ids_resolve_offline(zoo, monkeypatch, tmp_path):
    cache = tmp_path / "cache"
    revision = "89abcdef0123456789abcdef0123456789abcdef"
    as_hub_cache(zoo / "base", cache, "wb-test/base")
    as_hub_cache(zoo / "ft1", cache, "wb-test/ft1", revision=revision)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    recipe = RECIPES["task_arithmetic"].replace("base_model: base", "base_model: wb-test/base")
    recipe = recipe.replace("model: ft1", f"model: wb-test/ft1@{revision}").replace("model: ft2", f"model: {zoo / 'ft2'}")
    (tmp_path / "r.yml").write_text(recipe)
    result = wb_merge("--config", "r.yml", "--out", "hub-out")
    assert result.exit_code == 0, result.output
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "elsewhere"))  # no hub/ there: nothing is downloaded
    assert_one_error(wb_merge("--config", "r.yml", "--out", "hub-out-2"), "'wb-test/base'", "works offline", "r.yml")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    shutil.move(cache, tmp_path / "hub")  # $HF_HOME/hub is the cache where $HF_HUB_CACHE is unset
    assert wb_merge("--config", "r.yml", "--out", "hub-out-3").exit_code == 0

    run_both(zoo, "task_arithmetic", RECIPES["task_arithmetic"], monkeypatch)
    a, b = tensors(tmp_path / "hub-out"), tensors(zoo / "wb-task_arithmetic")
    assert all(torch.equal(a[n], b[n]) for n in b)
    references = json.loads((tmp_path / "hub-out" / "merge.json").read_text())["recipe"]["resolved"]["references"]
    assert references["wb-test/base"]["path"] == str(cache / "models--wb-test--base" / "snapshots" /
                                                     "0123456789abcdef0123456789abcdef01234567")
    assert references[f"wb-test/ft1@{revision}"]["path"].endswith(f"snapshots/{revision}")


def test_relative_paths_are_relative_to_the_current_directory(zoo, monkeypatch, tmp_path):
    """As in mergekit: a recipe's paths are read from where the command runs, not where the recipe is."""
    work = tmp_path / "work"
    work.mkdir()
    for name in ("base", "ft1"):
        shutil.copytree(zoo / name, tmp_path / name)
    recipe = tmp_path / "recipes" / "r.yml"
    recipe.parent.mkdir()
    recipe.write_text("merge_method: task_arithmetic\nbase_model: ../base\nmodels: [{model: ../ft1, parameters: {weight: 0.5}}]\n")
    monkeypatch.chdir(work)
    result = wb_merge("--config", "../recipes/r.yml", "--out", "out")
    assert result.exit_code == 0, result.output
    b, f, ours = (load_file(tmp_path / n / "model.safetensors") for n in ("base", "ft1", "work/out"))
    assert all(torch.allclose(ours[n], b[n] + 0.5 * (f[n] - b[n]), atol=1e-6) for n in b)
    monkeypatch.chdir(tmp_path)  # ../base is now outside tmp_path, where there is none
    assert_one_error(wb_merge("--config", "recipes/r.yml", "--out", "out2"), "'../base' is not a folder", "r.yml")
    assert not (tmp_path / "out2").exists()
