"""`wb diff --lora-rank R`: TUNED − RAW as a PEFT LoRA adapter, checked against peft (which must
load it and give TUNED's logits), `wb merge` (which must give TUNED back within the truncation
error), the SVD's own optimum (Eckart-Young) and mergekit-extract-lora on the same inputs."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from clicheck import assert_one_error
from click.testing import CliRunner
from safetensors.torch import load_file
from tiny import as_hub_cache, make_config, make_model, perturbed, save_layout, state_dict_for_files

from workbench.cli import wb

PROMPT = torch.tensor([[1, 17, 42, 99, 7, 250, 3, 64, 128, 200, 11, 5]])
PREFIX = "base_model.model."
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
UNCHANGED = ("model.layers.1.self_attn.k_proj.weight", "model.layers.1.post_attention_layernorm.weight")


# -- inputs ------------------------------------------------------------------------------------------
def low_rank(shape: tuple[int, ...], rank: int, generator: torch.Generator, equal: bool = False) -> torch.Tensor:
    """A delta of exactly `rank` (equal singular values 0.05 with `equal`, else random ones)."""
    rows, cols = shape
    if equal:
        left = torch.linalg.qr(torch.randn(rows, rank, generator=generator))[0]
        right = torch.linalg.qr(torch.randn(cols, rank, generator=generator))[0]
        return 0.05 * left @ right.T
    return 0.02 * torch.randn(rows, rank, generator=generator) @ torch.randn(rank, cols, generator=generator)


def save_model(state: dict[str, torch.Tensor], folder: Path, model, tokenizer) -> Path:
    model.config.architectures = ["LlamaForCausalLM"]  # mergekit reads the architecture from config.json
    return save_layout(state, folder, config=model.config, tokenizer=tokenizer)


def exact_tuned(state: dict[str, torch.Tensor], seed: int = 3) -> dict[str, torch.Tensor]:
    """Every Linear weight, the embedding and the head plus a rank-3 delta; two norms changed;
    UNCHANGED left bit-identical."""
    generator = torch.Generator().manual_seed(seed)
    tuned = {}
    for name, tensor in state.items():
        if name in UNCHANGED:
            tuned[name] = tensor.clone()
        elif tensor.dim() == 2:
            tuned[name] = tensor + low_rank(tuple(tensor.shape), 3, generator)
        elif name in ("model.layers.0.input_layernorm.weight", "model.norm.weight"):
            tuned[name] = tensor + 0.01 * torch.randn(tensor.shape, generator=generator)
        else:
            tuned[name] = tensor.clone()
    return tuned


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("extract-lora")


@pytest.fixture(scope="module")
def models(work, tiny_tokenizer) -> dict[str, Path]:
    """RAW and three TUNEDs of it: exact rank-3 deltas, full-rank noise, and ranks 1 / 3 by module."""
    model = make_model(len(tiny_tokenizer))
    state = state_dict_for_files(model)
    generator = torch.Generator().manual_seed(5)
    mixed = {name: tensor + low_rank(tuple(tensor.shape), 1 if "q_proj" in name else 3, generator, equal=True)
             if tensor.dim() == 2 and any(p in name for p in LINEAR) else tensor.clone()
             for name, tensor in state.items()}
    return {
        "base": save_model(state, work / "base", model, tiny_tokenizer),
        "exact": save_model(exact_tuned(state), work / "exact", model, tiny_tokenizer),
        "noisy": save_model(perturbed(state, scale=0.05), work / "noisy", model, tiny_tokenizer),
        "mixed": save_model(mixed, work / "mixed", model, tiny_tokenizer),
    }


def run_wb(*args) -> object:
    return CliRunner().invoke(wb, [str(arg) for arg in args])


def extract(base: Path, tuned: Path, out: Path, *options) -> dict:
    result = run_wb("diff", "--base", base, "--tuned", tuned, "--out", out, *options, "--json")
    assert result.exit_code == 0, (result.output, result.stderr)
    return json.loads(result.stdout)


def merge(base: Path, adapter: Path, out: Path) -> Path:
    result = run_wb("merge", "--base", base, "--adapter", adapter, "--out", out)
    assert result.exit_code == 0, (result.output, result.stderr)
    return out


def logits(folder: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()(PROMPT).logits


def peft_model(base: Path, adapter: Path):
    """peft's PeftModel on RAW with the adapter, refusing any warning about keys it could not place."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    keys = [str(w.message) for w in caught if "key" in str(w.message).lower()]
    assert not keys, keys
    return model.eval()


def peft_logits(base: Path, adapter: Path) -> torch.Tensor:
    with torch.no_grad():
        return peft_model(base, adapter)(PROMPT).logits


def pair_error(delta: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> float:
    delta = delta.double()
    return float((delta - b.double() @ a.double()).norm() / delta.norm())


def optimal_error(delta: torch.Tensor, rank: int) -> float:
    """Eckart-Young: the best rank-r error is the norm of the singular values left out."""
    values = torch.linalg.svdvals(delta.double())
    return float(values[rank:].norm() / values.norm())


# -- the adapter and its readers -------------------------------------------------------------------------
def test_exact_rank_delta_is_recovered_and_peft_equals_wb_merge(models, work):
    base, tuned, out = models["base"], models["exact"], work / "exact-lora"
    record = extract(base, tuned, out, "--lora-rank", 3)
    config = json.loads((out / "adapter_config.json").read_text())
    tensors = load_file(out / "adapter_model.safetensors")
    raw, fine = load_file(base / "model.safetensors"), load_file(tuned / "model.safetensors")

    for name, entry in record["tensors"].items():
        module = name.removesuffix(".weight")
        a, b = tensors[f"{PREFIX}{module}.lora_A.weight"], tensors[f"{PREFIX}{module}.lora_B.weight"]
        assert (entry["rank"], a.shape[0], b.shape[1]) == (3, 3, 3)
        assert pair_error(fine[name] - raw[name], b, a) < 1e-5 and entry["relative_error"] < 1e-5
        assert entry["kept_energy"] == pytest.approx(1.0, abs=1e-9)
    lora_modules = {name.removesuffix(".weight") for name in record["tensors"]}
    assert lora_modules == {n.removesuffix(".weight") for n in raw if raw[n].dim() == 2 and n not in UNCHANGED
                            and "embed" not in n and "lm_head" not in n}
    # unchanged tensors are left out; what no LoRA pair can carry is saved whole, bit for bit
    assert not any(name.removeprefix(PREFIX) in UNCHANGED for name in tensors)
    assert sorted(config["modules_to_save"]) == ["lm_head", "model.embed_tokens", "model.layers.0.input_layernorm",
                                                 "model.norm"]
    for module in config["modules_to_save"]:
        assert torch.equal(tensors[f"{PREFIX}{module}.weight"], fine[f"{module}.weight"])
    # k_proj is unchanged in layer 1, so only layer 0's is named; every other target by its short name
    assert sorted(config["target_modules"]) == sorted(
        ["model.layers.0.self_attn.k_proj", *(p for p in LINEAR if p != "k_proj")])
    assert (config["r"], config["lora_alpha"], config["rank_pattern"]) == (3, 3, {})
    assert config["base_model_name_or_path"] == str(base.absolute())
    assert (out / "tokenizer.json").read_bytes() == (tuned / "tokenizer.json").read_bytes()
    assert json.loads((out / "extract_lora.json").read_text())["provenance"]["command"].startswith("wb ")

    merged = merge(base, out, work / "exact-merged")
    merged_state = load_file(merged / "model.safetensors")
    for name, tensor in fine.items():
        torch.testing.assert_close(merged_state[name], tensor, rtol=0, atol=1e-6)
    tuned_logits, via_peft = logits(tuned), peft_logits(base, out)
    torch.testing.assert_close(via_peft, logits(merged), rtol=0, atol=1e-5)
    torch.testing.assert_close(via_peft, tuned_logits, rtol=0, atol=1e-4)


def test_truncation_is_optimal_and_no_worse_than_mergekit(models, work):
    """Full-rank noise cut to rank 2: each tensor's recorded error is the one its stored factors
    have, equals the SVD optimum, is no worse than mergekit-extract-lora's, and `wb merge`
    gives TUNED back within exactly that error."""
    from mergekit.scripts.extract_lora import main as mergekit_extract

    base, tuned, out, theirs = models["base"], models["noisy"], work / "noisy-lora", work / "noisy-mergekit"
    record = extract(base, tuned, out, "--lora-rank", 2)
    mergekit_extract.main(["--model", str(tuned.absolute()), "--base-model", str(base.absolute()),
                           "--out-path", str(theirs), "--max-rank", "2", "--quiet"], standalone_mode=False)
    ours, others = load_file(out / "adapter_model.safetensors"), load_file(theirs / "adapter_model.safetensors")
    raw, fine = load_file(base / "model.safetensors"), load_file(tuned / "model.safetensors")
    merged = load_file(merge(base, out, work / "noisy-merged") / "model.safetensors")

    assert set(record["tensors"]) == {n for n in raw if raw[n].dim() == 2 and "embed" not in n and "lm_head" not in n}
    for name, entry in record["tensors"].items():
        module, delta = name.removesuffix(".weight"), fine[name] - raw[name]
        mine = pair_error(delta, ours[f"{PREFIX}{module}.lora_B.weight"], ours[f"{PREFIX}{module}.lora_A.weight"])
        mergekit = pair_error(delta, others[f"{PREFIX}{module}.lora_B.weight"],
                              others[f"{PREFIX}{module}.lora_A.weight"])
        assert entry["relative_error"] == pytest.approx(mine, rel=1e-5)
        assert mine == pytest.approx(optimal_error(delta, 2), rel=1e-5)
        assert mine <= mergekit * (1 + 1e-6), (name, mine, mergekit)
        assert float((fine[name] - merged[name]).double().norm() / delta.double().norm()) == pytest.approx(mine, rel=1e-4)
    worst = max(record["tensors"], key=lambda name: record["tensors"][name]["relative_error"])
    assert record["worst"] == worst


def test_rank_by_energy_gives_per_module_ranks_that_peft_loads(models, work):
    """q_proj deltas are rank 1, the others rank 3 with equal singular values: keeping 99.9 % of
    the energy needs 1 and 3; peft must give each module its own rank, at scale 1."""
    from peft.tuners.lora import LoraLayer

    base, tuned, out = models["base"], models["mixed"], work / "mixed-lora"
    record = extract(base, tuned, out, "--lora-rank", 8, "--rank-by-energy", 0.999)
    expected = {name.removesuffix(".weight"): 1 if "q_proj" in name else 3 for name in record["tensors"]}
    assert {entry["module"]: entry["rank"] for entry in record["tensors"].values()} == expected
    config = json.loads((out / "adapter_config.json").read_text())
    q_modules = {module: 1 for module in expected if module.endswith("q_proj")}
    assert (config["r"], config["lora_alpha"]) == (3, 3)
    assert config["rank_pattern"] == config["alpha_pattern"] == q_modules
    model = peft_model(base, out)
    loaded = {name.removeprefix("base_model.model."): (layer.r["default"], layer.scaling["default"])
              for name, layer in model.named_modules() if isinstance(layer, LoraLayer)}
    assert loaded == {module: (rank, 1.0) for module, rank in expected.items()}
    with torch.no_grad():
        torch.testing.assert_close(model(PROMPT).logits, logits(tuned), rtol=0, atol=1e-4)


def test_rank_above_min_out_in_is_capped_and_exact(models, work):
    result = run_wb("diff", "--base", models["base"], "--tuned", models["noisy"], "--out", work / "capped",
                    "--lora-rank", 100)
    assert result.exit_code == 0, result.output
    assert "capped" in result.stderr and "rank 100 is above min(out, in)" in result.stderr
    record = json.loads((work / "capped" / "extract_lora.json").read_text())
    for entry in record["tensors"].values():
        assert entry["capped"] and entry["rank"] == min(entry["shape"]) and entry["relative_error"] < 1e-5


def test_embed_lora_makes_an_embedding_pair_and_a_head_pair(models, work, tiny_tokenizer):
    base, tuned, out = models["base"], models["exact"], work / "embed-lora"
    record = extract(base, tuned, out, "--lora-rank", 3, "--embed-lora")
    tensors = load_file(out / "adapter_model.safetensors")
    vocab, dim = len(tiny_tokenizer), 64
    assert tensors[f"{PREFIX}model.embed_tokens.lora_embedding_A"].shape == (3, vocab)
    assert tensors[f"{PREFIX}model.embed_tokens.lora_embedding_B"].shape == (dim, 3)
    assert tensors[f"{PREFIX}lm_head.lora_A.weight"].shape == (3, dim)
    assert record["tensors"]["model.embed_tokens.weight"]["kind"] == "embedding_lora"
    assert all(entry["relative_error"] < 1e-5 for entry in record["tensors"].values())
    config = json.loads((out / "adapter_config.json").read_text())
    assert sorted(config["modules_to_save"]) == ["model.layers.0.input_layernorm", "model.norm"]
    merged = merge(base, out, work / "embed-merged")
    via_peft = peft_logits(base, out)
    torch.testing.assert_close(via_peft, logits(merged), rtol=0, atol=1e-5)
    torch.testing.assert_close(via_peft, logits(tuned), rtol=0, atol=1e-4)


@pytest.fixture(scope="module")
def tied(work, tiny_tokenizer) -> tuple[Path, Path]:
    """RAW and TUNED of a model that ties lm_head to embed_tokens (no lm_head tensor in its files)."""
    model = make_model(len(tiny_tokenizer), tie=True)
    state = state_dict_for_files(model)
    return (save_model(state, work / "tied-base", model, tiny_tokenizer),
            save_model(exact_tuned(state, seed=4), work / "tied-tuned", model, tiny_tokenizer))


@pytest.mark.parametrize("embed_lora", [False, True], ids=["modules-to-save", "embed-lora"])
def test_tied_embeddings_load_in_peft_tied(tied, work, embed_lora):
    """peft (ensure_weight_tying) looks for the tied head's copy of the embedding's adapter
    tensors, so they are repeated for it."""
    base, tuned = tied
    out = work / f"tied-lora-{embed_lora}"
    extract(base, tuned, out, "--lora-rank", 3, *(["--embed-lora"] if embed_lora else []))
    config = json.loads((out / "adapter_config.json").read_text())
    tensors = load_file(out / "adapter_model.safetensors")
    assert config["ensure_weight_tying"] is True
    if embed_lora:
        assert torch.equal(tensors[f"{PREFIX}lm_head.lora_A.weight"],
                           tensors[f"{PREFIX}model.embed_tokens.lora_embedding_B"].T)
    else:
        assert torch.equal(tensors[f"{PREFIX}lm_head.weight"], tensors[f"{PREFIX}model.embed_tokens.weight"])
    torch.testing.assert_close(peft_logits(base, out), logits(tuned), rtol=0, atol=1e-4)


def test_tied_adapter_merges_as_peft_loads_it(tied, work):
    base, tuned = tied
    out = work / "tied-lora-merge"
    extract(base, tuned, out, "--lora-rank", 3)
    merged = merge(base, out, work / "tied-merged")
    torch.testing.assert_close(peft_logits(base, out), logits(merged), rtol=0, atol=1e-5)


def test_changed_bias_saves_its_module_whole(work, tiny_tokenizer):
    """peft cannot carry a bias delta beside a LoRA pair exactly: the module is saved whole."""
    from transformers import LlamaForCausalLM

    config = make_config(len(tiny_tokenizer))
    config.attention_bias = True
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    state = state_dict_for_files(model)
    tuned_state = dict(state)
    bias = "model.layers.0.self_attn.q_proj.bias"
    tuned_state[bias] = state[bias] + 0.1
    tuned_state["model.layers.1.self_attn.v_proj.weight"] = state["model.layers.1.self_attn.v_proj.weight"] + \
        low_rank((32, 64), 2, torch.Generator().manual_seed(0))
    base = save_model(state, work / "bias-base", model, tiny_tokenizer)
    tuned = save_model(tuned_state, work / "bias-tuned", model, tiny_tokenizer)
    out = work / "bias-lora"
    result = run_wb("diff", "--base", base, "--tuned", tuned, "--out", out, "--lora-rank", 2)
    assert result.exit_code == 0, result.output
    assert "model.layers.0.self_attn.q_proj: saved whole (modules_to_save): model.layers.0.self_attn.q_proj.bias changed" \
        in result.stdout
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["model.layers.0.self_attn.q_proj"]
    assert config["target_modules"] == ["model.layers.1.self_attn.v_proj"]
    tensors = load_file(out / "adapter_model.safetensors")
    assert {f"{PREFIX}{bias}", f"{PREFIX}model.layers.0.self_attn.q_proj.weight"} <= set(tensors)
    torch.testing.assert_close(peft_logits(base, out), logits(tuned), rtol=0, atol=1e-4)


# -- layouts, paths, output -----------------------------------------------------------------------------
def test_hub_cache_and_relative_paths_give_the_same_adapter(models, work, monkeypatch):
    cache = work / "hub"
    base = as_hub_cache(models["base"], cache)
    tuned = as_hub_cache(models["exact"], cache, repo_id="wb-test/tiny-tuned")
    monkeypatch.chdir(cache)
    relative_base, relative_tuned = base.relative_to(cache), tuned.relative_to(cache)
    record = extract(relative_base, relative_tuned, Path("out-lora"), "--lora-rank", 3)
    out = cache / "out-lora"
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["base_model_name_or_path"], config["revision"]) == ("wb-test/tiny-llama", base.name)
    assert record["out"] == "out-lora" and record["base"]["base_model_name_or_path"] == "wb-test/tiny-llama"
    plain = work / "exact-lora-plain"
    extract(models["base"], models["exact"], plain, "--lora-rank", 3)
    assert (out / "adapter_model.safetensors").read_bytes() == (plain / "adapter_model.safetensors").read_bytes()


def test_json_is_the_record_and_text_names_every_tensor(models, work):
    out = work / "text-lora"
    result = run_wb("diff", "--base", models["base"], "--tuned", models["exact"], "--out", out, "--lora-rank", 2)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "extract_lora.json").read_text())
    lines = result.stdout.splitlines()
    for name, entry in record["tensors"].items():
        assert f"{name}: rank 2, relative error {entry['relative_error']:.3e}" in result.stdout
    assert lines[-1].startswith(f"worst: {record['worst']}, relative error")
    assert any(line.startswith(f"wrote {out}: LoRA rank 2 on 13 tensor(s), 4 module(s) saved whole, "
                               "4 tensor(s) unchanged and left out") for line in lines)
    narrow = extract(models["base"], models["exact"], work / "bf16-lora", "--lora-rank", 2, "--dtype", "bf16")
    assert narrow["dtype"] == "bfloat16" and narrow["adapter"]["side_files"] == record["adapter"]["side_files"]
    header = json.loads(_header(work / "bf16-lora" / "adapter_model.safetensors"))
    assert {entry["dtype"] for name, entry in header.items() if ".lora_" in name} == {"BF16"}
    assert {entry["dtype"] for name, entry in header.items() if name.endswith("norm.weight")} == {"F32"}  # TUNED's
    for name, entry in narrow["tensors"].items():  # bf16 factors add their rounding to the truncation
        assert record["tensors"][name]["relative_error"] <= entry["relative_error"] < 1.0


def _header(file: Path) -> bytes:
    data = file.read_bytes()
    return data[8:8 + int.from_bytes(data[:8], "little")]


# -- bad inputs -----------------------------------------------------------------------------------------
def test_bad_inputs_are_one_error_line_and_no_output(models, work, tiny_tokenizer):
    base, tuned = models["base"], models["exact"]
    state = load_file(base / "model.safetensors")
    resized = dict(state, **{"model.embed_tokens.weight": torch.zeros(len(tiny_tokenizer) + 1, 64)})
    bad_shape = save_layout(resized, work / "bad-shape")
    with_ints = {**state, "model.layers.0.self_attn.positions": torch.arange(4)}
    int_base = save_layout(with_ints, work / "int-base")
    int_tuned = save_layout({**with_ints, "model.layers.0.self_attn.positions": torch.arange(4) + 1}, work / "int-tuned")
    cases = [
        ((base, bad_shape), "is [320, 64] in RAW but [321, 64] in TUNED"),
        ((int_base, int_tuned), "tensor 'model.layers.0.self_attn.positions' differs between RAW and TUNED and is torch.int64"),
        ((base, base), "TUNED is bit-identical to RAW"),
        ((base, save_layout({**state, "model.norm.weight": state["model.norm.weight"] + 1}, work / "norm-only")),
         "no weight that a LoRA pair carries changed (only modules saved whole: model.norm)"),
        ((base, save_layout({k: v for k, v in state.items() if k != "model.norm.weight"}, work / "missing")),
         "are not in TUNED"),
    ]
    for (raw, fine), fragment in cases:
        out = work / "refused"
        assert_one_error(run_wb("diff", "--base", raw, "--tuned", fine, "--out", out, "--lora-rank", 2), fragment)
        assert not out.exists()
    zero = run_wb("diff", "--base", base, "--tuned", tuned, "--out", work / "refused", "--lora-rank", 0)
    assert zero.exit_code == 2 and "--lora-rank" in zero.stderr
    existing = work / "exists"
    existing.mkdir()
    assert_one_error(run_wb("diff", "--base", base, "--tuned", tuned, "--out", existing, "--lora-rank", 2),
                     "pass --force")


def test_extraction_imports_no_transformers_peft_or_mergekit(models, work):
    out = work / "no-imports"
    code = (
        "import sys\n"
        "from workbench.cli import wb\n"
        f"wb(['diff', '--base', {str(models['base'])!r}, '--tuned', {str(models['exact'])!r}, '--out', {str(out)!r},"
        " '--lora-rank', '2'], standalone_mode=False)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'peft', 'mergekit', 'lm_eval')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
    assert (out / "adapter_model.safetensors").is_file()
