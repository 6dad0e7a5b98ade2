"""`wb merge`: LoRA adapters made by peft on the tiny Llama, merged and compared with peft's own
merge_and_unload, with peft's merge_utils (ties / dare on full deltas), and with plain arithmetic."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from tiny import perturbed, save_layout, state_dict_for_files

from workbench.cli import wb
from workbench.errors import WorkbenchError
from workbench.io.hashing import hash_file
from workbench.io.reader import open_checkpoint
from workbench.io.weightsum import checkpoint_weight_sum
from workbench.weights.merge import merge
from workbench.weights.methods.base import tensor_seed

REPO = Path(__file__).resolve().parents[1]
PROMPT = torch.tensor([[1, 17, 42, 99, 7, 250, 3, 64, 128, 200, 11, 5]])


# -- helpers ---------------------------------------------------------------------------------------
def load_model(folder: Path, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


def make_adapter(base: Path, out: Path, seed: int = 0, dtype: torch.dtype = torch.float32,
                 safe: bool = True, tokenizer=None, **lora) -> Path:
    """A real peft adapter on `base` with every LoRA (and modules_to_save) weight randomized, so
    that its deltas are nonzero."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_model(base, dtype), LoraConfig(**{"r": 4, "lora_alpha": 8, **lora}))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(out, safe_serialization=safe)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def peft_merged(base: Path, adapter: Path, dtype: torch.dtype = torch.float32):
    """(peft's merged state dict, logits of the unmerged PeftModel)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_model(base, dtype), adapter)
    with torch.no_grad():
        logits = model(PROMPT).logits
    merged = model.merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}, logits


def peft_deltas(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """Each changed base tensor's full delta, from peft's own get_delta_weight (and modules_to_save)."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    base_state = load_file(base / "model.safetensors")
    model = PeftModel.from_pretrained(load_model(base), adapter)
    deltas = {}
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.scaling:
            deltas[f"{name}.weight"] = module.get_delta_weight("default").detach().float()
    merged = model.merge_and_unload().state_dict()
    for name in merged:  # whole tensors the adapter replaced (beyond its LoRA deltas)
        if name not in deltas and not torch.equal(merged[name], base_state[name]):
            deltas[name] = merged[name].float() - base_state[name].float()
    return deltas


def run_merge(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(wb, ["merge", *map(str, args)])
    return result.exit_code, result.output


def merged_state(out: Path) -> dict[str, torch.Tensor]:
    checkpoint = open_checkpoint(out)
    return {name: tensor.clone() for name, tensor in checkpoint.iter_tensors()}


def check_complete(out: Path, base: Path) -> dict[str, torch.Tensor]:
    """The output holds exactly the base's tensors, with their shapes, and no NaN/inf."""
    state, base_ckpt = merged_state(out), open_checkpoint(base)
    assert set(state) == set(base_ckpt.names())
    for name, tensor in state.items():
        assert tuple(tensor.shape) == base_ckpt.info(name).shape, name
        assert torch.isfinite(tensor.float()).all(), name
    return state


def adapter_entries(record: dict) -> list[dict]:
    """merge.json's entries of the --adapter models (the base is the first entry of "models")."""
    assert record["models"][0]["reference"] == record["base"]
    return record["models"][1:]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


@pytest.fixture(scope="module")
def base(tiny_models) -> Path:
    return tiny_models()


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("merge")


@pytest.fixture(scope="module")
def adapter_q(base, work) -> Path:
    return make_adapter(base, work / "adapter-q", seed=1, target_modules=["q_proj", "v_proj"])


@pytest.fixture(scope="module")
def adapter_k(base, work) -> Path:
    return make_adapter(base, work / "adapter-k", seed=2, target_modules=["q_proj", "k_proj", "down_proj"],
                        r=8, lora_alpha=16)


# -- one adapter: equal to peft --------------------------------------------------------------------
VARIANTS = {
    "default": {"target_modules": ["q_proj", "v_proj"]},
    "rslora": {"target_modules": ["q_proj", "o_proj"], "use_rslora": True, "lora_alpha": 16},
    "patterns": {"target_modules": ["q_proj", "k_proj", "gate_proj", "up_proj"],
                 "rank_pattern": {"model.layers.1.self_attn.k_proj": 2, "up_proj": 6},
                 "alpha_pattern": {"gate_proj": 32, r"layers\.0\.self_attn\.q_proj": 3}},
    "all-linear": {"target_modules": "all-linear"},
    "embeddings": {"target_modules": ["embed_tokens", "q_proj"]},
    "modules-to-save": {"target_modules": ["v_proj"], "modules_to_save": ["lm_head"]},
}


@pytest.fixture(scope="module")
def variant_merge(base, work):
    """A factory: variant -> (its adapter, the folder `wb merge` made of it), each made once, by
    whichever test asks first."""
    made: dict[str, tuple[Path, Path]] = {}

    def build(variant: str) -> tuple[Path, Path]:
        if variant not in made:
            adapter = make_adapter(base, work / f"v-{variant}", seed=3, **VARIANTS[variant])
            out = work / f"merged-{variant}"
            code, output = run_merge("--base", base, "--adapter", adapter, "--out", out)
            assert code == 0, output
            made[variant] = adapter, out
        return made[variant]

    return build


@pytest.mark.parametrize("variant", VARIANTS)
def test_one_adapter_equals_peft_merge_and_unload(base, variant_merge, variant):
    adapter, out = variant_merge(variant)
    ours = check_complete(out, base)
    reference, peft_logits = peft_merged(base, adapter)
    base_state = load_file(base / "model.safetensors")
    changed = [n for n in ours if not torch.equal(ours[n], base_state[n])]
    assert changed, "the adapter changed nothing"
    for name, tensor in ours.items():
        assert max_diff(tensor, reference[name]) <= 1e-6, name
    with torch.no_grad():
        merged_logits = load_model(out)(PROMPT).logits
    torch.testing.assert_close(merged_logits, peft_logits, rtol=1e-5, atol=1e-5)


def test_rank_and_alpha_patterns_change_the_scale(variant_merge):
    """The pattern variant really exercised the patterns: the pattern modules have their own rank."""
    adapter, out = variant_merge("patterns")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["rank_pattern"] and config["alpha_pattern"]
    record = json.loads((out / "merge.json").read_text())
    assert adapter_entries(record)[0]["config"]["rank_pattern"] == config["rank_pattern"]
    from workbench.weights.adapters.lora import lora_scale

    assert lora_scale(config, "model.layers.1.self_attn.k_proj") == (2, 8.0, 4.0)
    assert lora_scale(config, "model.layers.0.mlp.up_proj") == (6, 8.0, 8 / 6)
    assert lora_scale(config, "model.layers.1.mlp.gate_proj") == (4, 32.0, 8.0)
    assert lora_scale(config, "model.layers.0.self_attn.q_proj") == (4, 3.0, 0.75)
    assert lora_scale(config, "model.layers.1.self_attn.q_proj") == (4, 8.0, 2.0)


def test_fan_in_fan_out_conv1d_equals_peft(work):
    """GPT-2 keeps its Linear weights as Conv1D (in, out): peft's fan_in_fan_out layout,
    including square ones (attn.c_proj) where only the flag tells the orientation."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=300, n_positions=64)).eval()
    gpt2 = work / "gpt2"
    model.save_pretrained(gpt2)
    adapter = make_adapter(gpt2, work / "gpt2-lora", seed=4, target_modules=["c_attn", "c_proj", "c_fc"],
                           fan_in_fan_out=True)
    out = work / "gpt2-merged"
    code, output = run_merge("--base", gpt2, "--adapter", adapter, "--out", out)
    assert code == 0, output
    ours = check_complete(out, gpt2)
    reference, peft_logits = peft_merged(gpt2, adapter)
    for name, tensor in ours.items():
        assert max_diff(tensor, reference[name]) <= 1e-6, name
    assert ours["transformer.h.0.attn.c_proj.weight"].shape == (32, 32)
    with torch.no_grad():
        torch.testing.assert_close(load_model(out)(PROMPT % 300).logits, peft_logits, rtol=1e-5, atol=1e-5)


def test_bf16_base_equals_peft_within_rounding(tiny_models, work):
    base = tiny_models(dtype="bf16")
    adapter = make_adapter(base, work / "bf16-lora", seed=5, dtype=torch.bfloat16, target_modules="all-linear")
    out = work / "bf16-merged"
    code, output = run_merge("--base", base, "--adapter", adapter, "--out", out)
    assert code == 0, output
    ours = check_complete(out, base)
    reference, _ = peft_merged(base, adapter, torch.bfloat16)
    for name, tensor in ours.items():
        assert tensor.dtype == torch.bfloat16
        # at most one bf16 rounding step apart (peft rounds once, like us; allow one ulp)
        torch.testing.assert_close(tensor.float(), reference[name].float(), rtol=2**-7, atol=1e-6, msg=name)


def test_bin_adapter_and_sharded_bin_base(tiny_models, work, adapter_q):
    base = tiny_models(layout="bin-sharded")
    adapter = make_adapter(base, work / "bin-lora", seed=1, safe=False, target_modules=["q_proj", "v_proj"])
    assert (adapter / "adapter_model.bin").is_file()
    out = work / "bin-merged"
    code, output = run_merge("--base", base, "--adapter", adapter, "--out", out)
    assert code == 0, output
    ours = merged_state(out)
    reference, _ = peft_merged(tiny_models(), adapter_q)  # same base weights, same seed: same adapter
    assert set(ours) == set(reference)
    for name, tensor in ours.items():
        assert max_diff(tensor, reference[name]) <= 1e-6, name


# -- several adapters ------------------------------------------------------------------------------
def test_two_adapters_linear_is_weighted_sum_of_peft_deltas(base, work, adapter_q, adapter_k):
    out = work / "two-linear"
    code, output = run_merge("--base", base, "--adapter", adapter_q, "--adapter", adapter_k,
                             "--weights", "0.7,-0.3", "--out", out)
    assert code == 0, output
    ours = check_complete(out, base)
    base_state = load_file(base / "model.safetensors")
    expected = {name: tensor.clone() for name, tensor in base_state.items()}
    for adapter, weight in ((adapter_q, 0.7), (adapter_k, -0.3)):
        for name, delta in peft_deltas(base, adapter).items():
            expected[name] += weight * delta
    for name in ours:
        assert max_diff(ours[name], expected[name]) <= 1e-6, name
    record = json.loads((out / "merge.json").read_text())
    assert record["weights"] == [0.7, -0.3] and record["method"] == "task_arithmetic"
    assert record["reference"].startswith("mergekit 0.1.5")


@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties"])
def test_peft_ties_and_dare_equal_peft_merge_utils_on_full_deltas(base, work, adapter_q, adapter_k, method):
    from peft.utils import merge_utils

    out = work / f"two-{method}"
    code, output = run_merge("--base", base, "--adapter", adapter_q, "--adapter", adapter_k, "--method", f"peft_{method}",
                             "--weights", "0.6,0.9", "--density", "0.4", "--seed", "7", "--out", out)
    assert code == 0, output
    ours = check_complete(out, base)
    base_state = load_file(base / "model.safetensors")
    per_adapter = [peft_deltas(base, adapter_q), peft_deltas(base, adapter_k)]
    for name, base_tensor in base_state.items():
        present = [(d[name], w) for d, w in zip(per_adapter, (0.6, 0.9)) if name in d]
        if not present:
            assert torch.equal(ours[name], base_tensor), name
            continue
        deltas, weights = [d for d, _ in present], torch.tensor([w for _, w in present])
        torch.manual_seed(tensor_seed(7, name))  # peft draws DARE masks from the global generator
        if method == "ties":
            merged = merge_utils.ties(deltas, weights, 0.4)
        else:
            merged = getattr(merge_utils, method)(deltas, weights, 0.4)
        assert max_diff(ours[name], base_tensor + merged) <= 1e-6, name
    assert json.loads((out / "merge.json").read_text())["reference"] == f"peft 0.21 utils/merge_utils.py ({method})"


def magnitude_prune(task: torch.Tensor, density: float) -> torch.Tensor:
    """peft_ties' trim of one τ, seen through the method: one model of weight 1 on a zero base gives
    its trimmed τ back (a lone τ agrees with its own signs). Whole, and over blocks of one row (a
    vector as a column: its ties then cross the blocks)."""
    from workbench.weights.methods.base import TensorInputs
    from workbench.weights.methods.registry import get

    method = get("peft_ties")
    rows = task.reshape(task.shape[0], -1)

    def read(start: int, stop: int) -> TensorInputs:
        return TensorInputs("w", torch.zeros_like(rows[start:stop]), [rows[start:stop].clone()], [{"weight": 1.0}],
                            {"density": density}, None, start, stop)

    whole = method.merge_tensor(read(0, rows.shape[0]))
    streamed = torch.cat(list(method.merge_blocks(read, [(i, i + 1) for i in range(rows.shape[0])])))
    assert torch.equal(streamed, whole)
    return whole.reshape(task.shape)


def test_magnitude_prune_keeps_exactly_the_top_fraction_ties_by_position():
    from peft.utils.merge_utils import prune

    x = torch.randn(50, 40, generator=torch.Generator().manual_seed(0))
    assert torch.equal(magnitude_prune(x.clone(), 0.3), prune(x, 0.3, "magnitude"))
    tied = torch.tensor([0.5, -0.5, 0.1, 2.0, -0.5, 0.0])
    assert magnitude_prune(tied.clone(), 0.5).tolist() == [0.5, -0.5, 0.0, 2.0, 0.0, 0.0]  # k = 3: the earlier ties
    assert magnitude_prune(tied.clone(), 0.1).tolist() == [0.0] * 6  # int(0.6) = 0 entries kept
    assert torch.equal(magnitude_prune(tied.clone(), 1.0), tied)


def test_streamed_peft_ties_keeps_exactly_k_in_row_order_across_row_blocks(base, work, fine_tunes, monkeypatch):
    """peft_ties reads row blocks (two statistic passes, then the merge): with deltas full of equal
    magnitudes and blocks of 700 elements, it keeps exactly int(density·n) entries per delta, the
    earliest of the tied ones (a stable sort is the oracle), and gives peft's disjoint mean."""
    import workbench.weights.merge as merging
    from workbench.io.blocks import row_blocks

    quantized = []
    for k, folder in enumerate(fine_tunes):  # deltas rounded to a few levels: many exact ties
        b = load_file(base / "model.safetensors")
        state = {n: b[n] + quantize(t - b[n]) for n, t in load_file(folder / "model.safetensors").items()}
        quantized.append(save_layout(state, work / f"quantized-{k}"))
        shutil.copy(base / "config.json", quantized[-1] / "config.json")
    monkeypatch.setattr(merging, "row_blocks", lambda shape: row_blocks(shape, 700))
    out = work / "streamed-ties"
    merge(base, quantized, out=out, method="peft_ties", weights=[0.7, 0.5], density=0.3)
    ours = merged_state(out)
    b = load_file(base / "model.safetensors")
    tied_at_threshold = 0
    for name, base_tensor in b.items():
        tasks = [load_file(q / "model.safetensors")[name] - base_tensor for q in quantized]
        pruned = []
        for task in tasks:
            keep = int(0.3 * task.numel())
            kth = task.abs().reshape(-1).sort(descending=True).values[keep - 1]
            tied_at_threshold += int(kth > 0 and (task.abs() == kth).sum() > 1)
            order = torch.sort(-task.abs().reshape(-1), stable=True).indices[:keep]
            mask = torch.zeros(task.numel(), dtype=torch.bool)
            mask[order] = True
            pruned.append(task * mask.reshape(task.shape))
            assert int(mask.sum()) == keep
        stacked = torch.stack(pruned)
        sign = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
        agree = stacked.sign() == sign
        weighted = stacked * torch.tensor([0.7, 0.5]).view(-1, *[1] * base_tensor.dim())
        expected = base_tensor + (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)
        assert max_diff(ours[name], expected) <= 1e-6, name
    assert tied_at_threshold > 10  # the ties were real: equal nonzero magnitudes straddled k


def quantize(delta: torch.Tensor) -> torch.Tensor:
    """`delta` rounded to 9 levels (0, ±1..4 steps): most entries tie with others."""
    step = float(delta.abs().max()) / 4 or 1.0
    return (torch.round(delta / step) * step).to(delta.dtype)


def test_dare_is_reproducible_and_seeded(base, work, adapter_q, adapter_k):
    common = ["--base", base, "--adapter", adapter_q, "--adapter", adapter_k, "--method", "dare_ties", "--density", "0.5"]
    hashes = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        code, output = run_merge(*common, "--seed", seed, "--out", work / f"dare-{name}")
        assert code == 0, output
        hashes.append(hash_file(work / f"dare-{name}" / "model.safetensors", ("sha256",))["sha256"])
    assert hashes[0] == hashes[1] != hashes[2]


# -- full fine-tunes -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fine_tunes(base, work) -> list[Path]:
    state = load_file(base / "model.safetensors")
    folders = []
    for seed in (1, 2):
        folder = work / f"full-{seed}"
        save_layout(perturbed(state, scale=0.05, seed=seed), folder)
        shutil.copy(base / "config.json", folder / "config.json")
        folders.append(folder)
    return folders


def test_full_fine_tune_alone_gives_itself(base, work, fine_tunes):
    out = work / "full-alone"
    code, output = run_merge("--base", base, "--adapter", fine_tunes[0], "--out", out)
    assert code == 0, output
    tuned = load_file(fine_tunes[0] / "model.safetensors")
    ours = check_complete(out, base)
    assert all(torch.equal(ours[n], tuned[n]) for n in tuned)


def test_task_arithmetic_of_fine_tunes_and_a_lora(base, work, fine_tunes, adapter_q):
    out = work / "full-mixed"
    code, output = run_merge("--base", base, "--adapter", fine_tunes[0], "--adapter", fine_tunes[1],
                             "--adapter", adapter_q, "--weights", "0.5,0.25,1", "--out", out)
    assert code == 0, output
    ours = check_complete(out, base)
    b = load_file(base / "model.safetensors")
    t1, t2 = load_file(fine_tunes[0] / "model.safetensors"), load_file(fine_tunes[1] / "model.safetensors")
    lora = peft_deltas(base, adapter_q)
    for name in b:
        expected = b[name] + 0.5 * (t1[name] - b[name]) + 0.25 * (t2[name] - b[name]) + lora.get(name, 0)
        assert max_diff(ours[name], expected) <= 1e-6, name
    kinds = [a["kind"] for a in adapter_entries(json.loads((out / "merge.json").read_text()))]
    assert kinds == ["full", "full", "lora"]


# -- output folder ---------------------------------------------------------------------------------
def test_output_files_record_and_dtype(base, work, adapter_q, tiny_tokenizer):
    """The tokenizer is the base's by default (mergekit's rule), even where an adapter carries its own."""
    tokenizer_adapter = work / "adapter-with-tokenizer"
    shutil.copytree(adapter_q, tokenizer_adapter)
    tiny_tokenizer.save_pretrained(tokenizer_adapter)
    template = tokenizer_adapter / "chat_template.jinja"
    template.write_text(template.read_text() + "{# adapter's template #}")
    out = work / "sharded-bf16"
    code, output = run_merge("--base", base, "--adapter", tokenizer_adapter, "--out", out, "--dtype", "bf16",
                             "--shard-size", "60KB")
    assert code == 0, output
    files = sorted(os.listdir(out))
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) > 1 and all(f.endswith(f"-of-{len(shards):05d}.safetensors") for f in shards)
    assert files == sorted(["chat_template.jinja", "config.json", "merge.json", "model.safetensors.index.json",
                            "tokenizer.json", "tokenizer_config.json", *shards])
    assert (base / "chat_template.jinja").read_text() == (out / "chat_template.jinja").read_text()
    assert template.read_text() != (out / "chat_template.jinja").read_text()
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"

    record = json.loads((out / "merge.json").read_text())
    base_hash = hash_file(base / "model.safetensors", ("sha256",))["sha256"]
    assert record["models"][0]["files_sha256"]["model.safetensors"] == base_hash
    (adapter,) = adapter_entries(record)
    adapter_files = adapter["files_sha256"]
    assert adapter_files["model.safetensors"] == base_hash  # the adapter is applied to the base
    assert adapter_files["lora/adapter_model.safetensors"] == hash_file(adapter_q / "adapter_model.safetensors", ("sha256",))["sha256"]
    assert (adapter["kind"], adapter["lora"], adapter["path"]) == ("lora", str(tokenizer_adapter), str(base))
    assert adapter["config"]["r"] == 4 and adapter["config"]["lora_alpha"] == 8
    assert (record["dtype"], record["output_dtypes"], record["device"]) == ("bfloat16", ["BF16"], "cpu")
    assert record["tokenizer"]["source"] == "base" and record["tokenizer"]["from"] == str(base)
    assert f"tokenizer: base (from {base})" in output
    for name, entry in record["output"]["files"].items():
        assert entry["sha256"] == hash_file(out / name, ("sha256",))["sha256"]
    assert record["output"]["weight_sum"] == pytest.approx(checkpoint_weight_sum(open_checkpoint(out)), abs=1e-6)

    merge(base, [adapter_q], out=work / "sharded-fp32")  # the same merge in fp32, then cast once
    fp32, ours = merged_state(work / "sharded-fp32"), merged_state(out)
    assert all(torch.equal(ours[n], fp32[n].to(torch.bfloat16)) for n in fp32)


def test_tokenizer_source_takes_an_adapters_tokenizer(base, work, adapter_q, tiny_tokenizer):
    """--tokenizer-source ADAPTER: the tokenizer saved beside the adapter (its chat template), said
    in the output and in merge.json; the vocabulary is the same, so the embeddings are the base's."""
    adapter = work / "adapter-own-template"
    shutil.copytree(adapter_q, adapter)
    tiny_tokenizer.save_pretrained(adapter)
    (adapter / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    out = work / "adapter-tokenizer"
    code, output = run_merge("--base", base, "--adapter", adapter, "--tokenizer-source", adapter, "--out", out)
    assert code == 0, output
    assert (out / "chat_template.jinja").read_text() == (adapter / "chat_template.jinja").read_text()
    tokenizer = json.loads((out / "merge.json").read_text())["tokenizer"]
    assert tokenizer["source"] == f"{base}+{adapter}" and tokenizer["added_to_base"] == 0
    assert tokenizer["line"] in output
    ours, base_state = merged_state(out), load_file(base / "model.safetensors")
    assert torch.equal(ours["model.embed_tokens.weight"], base_state["model.embed_tokens.weight"])
    code, output = run_merge("--base", base, "--adapter", adapter, "--tokenizer-source", work, "--out", out / "x")
    assert code == 1 and "is not base, union, --base or an --adapter" in output


def test_single_file_output_set_and_json(base, work, adapter_q):
    out = work / "json-out"
    threads = torch.get_num_threads()
    result = CliRunner().invoke(wb, ["merge", "--base", str(base), "--adapter", str(adapter_q), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["output"]["tensors"] == len(open_checkpoint(base))
    assert sorted(os.listdir(out)) == sorted(["chat_template.jinja", "config.json", "merge.json", "model.safetensors",
                                              "tokenizer.json", "tokenizer_config.json"])
    assert (out / "config.json").read_bytes() == (base / "config.json").read_bytes()
    assert torch.get_num_threads() == threads  # the single-threaded merge restores torch's setting


def test_merge_path_imports_no_transformers_or_peft(base, work, adapter_q):
    out = work / "no-imports"
    code = (
        "import sys\n"
        "from workbench.cli import wb\n"
        f"wb(['merge', '--base', {str(base)!r}, '--adapter', {str(adapter_q)!r}, '--out', {str(out)!r}],"
        " standalone_mode=False)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'peft', 'lm_eval')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
    assert (out / "model.safetensors").is_file()


# -- errors: one line, exit 1, no output -----------------------------------------------------------
def edited_adapter(source: Path, dest: Path, config: dict | None = None, tensors=None) -> Path:
    """A copy of `source` with config keys overridden and/or its tensors transformed."""
    shutil.copytree(source, dest)
    if config:
        current = json.loads((dest / "adapter_config.json").read_text())
        (dest / "adapter_config.json").write_text(json.dumps({**current, **config}))
    if tensors:
        state = tensors(load_file(dest / "adapter_model.safetensors"))
        save_file(state, str(dest / "adapter_model.safetensors"))
    return dest


def rename_layer(state: dict) -> dict:
    return {k.replace("layers.1.self_attn.q_proj", "layers.7.self_attn.q_proj"): v for k, v in state.items()}


def widen_a(state: dict) -> dict:
    key = "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"
    return {**state, key: torch.zeros(4, 65)}


ERRORS = {
    "missing-module": ({"tensors": rename_layer}, "'model.layers.7.self_attn.q_proj' but the base has no tensor"),
    "shape-mismatch": ({"tensors": widen_a}, "the base tensor is [32, 64]"),
    "dora": ({"config": {"use_dora": True}}, "DoRA"),
    "not-lora": ({"config": {"peft_type": "IA3"}}, "peft_type 'IA3' is not LoRA"),
    "pissa": ({"config": {"init_lora_weights": "pissa_niter_4"}}, "rewrites the base weights"),
    "lora-bias": ({"config": {"lora_bias": True}}, "lora_bias"),
    "rank-mismatch": ({"config": {"r": 8}}, "the config gives it rank 8"),
}


@pytest.mark.parametrize("case", ERRORS)
def test_bad_adapters_are_refused_by_name(base, work, adapter_q, case):
    edits, message = ERRORS[case]
    adapter = edited_adapter(adapter_q, work / f"bad-{case}", **edits)
    out = work / f"bad-out-{case}"
    code, output = run_merge("--base", base, "--adapter", adapter, "--out", out)
    assert code == 1, output
    assert output.startswith("error: ") and message in output and len(output.strip().splitlines()) == 1
    assert not out.exists() and not list(work.glob(f".wb-tmp-{out.name}*"))


def test_quantized_base_is_refused(base, work, adapter_q):
    quantized = work / "quantized-base"
    shutil.copytree(base, quantized)
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantized / "config.json").write_text(json.dumps(config))
    code, output = run_merge("--base", quantized, "--adapter", adapter_q, "--out", work / "q-out")
    assert code == 1 and "quantized model (bitsandbytes)" in output
    assert not (work / "q-out").exists()


def test_usage_errors(base, work, adapter_q, adapter_k):
    out = work / "usage-out"
    code, output = run_merge("--base", base, "--adapter", adapter_q, "--adapter", adapter_k, "--weights", "1,2,3",
                             "--out", out)
    assert code == 1 and "--weights has 3 value(s) for 2 adapter(s)" in output
    code, output = run_merge("--base", base, "--adapter", adapter_q, "--method", "magic", "--out", out)
    assert code == 2 and "magic" in output
    code, output = run_merge("--base", base, "--adapter", adapter_q, "--method", "peft_ties", "--density", "0", "--out", out)
    assert code == 1 and "density must be in (0, 1]" in output
    with pytest.raises(WorkbenchError, match="unknown merge method 'magic'"):
        merge(base, [adapter_q], out=out, method="magic")
    code, output = run_merge("--base", base, "--adapter", base / "config.json", "--out", out)
    assert code == 1 and "not a PEFT adapter" in output
    if not torch.cuda.is_available():
        code, output = run_merge("--base", base, "--adapter", adapter_q, "--device", "cuda", "--out", out)
        assert code == 1 and "no CUDA device is available" in output
    assert not out.exists()


def test_existing_output_needs_force(base, work, adapter_q):
    out = work / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, output = run_merge("--base", base, "--adapter", adapter_q, "--out", out)
    assert code == 1 and "output exists; pass --force" in output
    assert (out / "keep.txt").read_text() == "mine"
    code, output = run_merge("--base", base, "--adapter", adapter_q, "--out", out, "--force")
    assert code == 0, output
    assert not (out / "keep.txt").exists() and (out / "merge.json").is_file()


def test_adapter_for_another_base_is_refused(tiny_models, work, adapter_q):
    """A full fine-tune of another shape, and a LoRA adapter on a base whose vocabulary differs."""
    from tiny import make_model

    other = work / "other-base"
    model = make_model(400)
    save_layout(state_dict_for_files(model), other, config=model.config)
    embed_adapter = make_adapter(tiny_models(), work / "embed-lora", seed=6, target_modules=["embed_tokens"])
    code, output = run_merge("--base", other, "--adapter", embed_adapter, "--out", work / "other-out")
    assert code == 1 and "shape mismatch for 'model.embed_tokens.weight'" in output and "[400, 64]" in output
    code, output = run_merge("--base", other, "--adapter", tiny_models(), "--out", work / "other-out")
    assert code == 1 and "shape mismatch for 'lm_head.weight'" in output
    assert not (work / "other-out").exists()
