"""`wb merge` against peft's way (`from_pretrained` + `PeftModel.from_pretrained` + `merge_and_unload`
+ `save_pretrained`) on a synthetic >= 2 GB bf16 Llama with a rank-16 all-linear LoRA adapter, and
`wb merge --config` against `mergekit-yaml` on the same recipe (task_arithmetic, ties, slerp over the
base and two fine-tunes of the same shape), beside the I/O floor of that merge: every input byte
read once and the output's bytes written once, in the same run.

WB_BENCH_MERGE_LAYERS scales the model down (default 21 layers: 2.1 GB); the figures say which ran.

The base (config.json transformers loads + safetensors shards written one at a time) and the adapter
(PEFT layout written directly: adapter_config.json + adapter_model.safetensors) are built first, not
timed. Both contenders then run twice each, alternating, in the same run on the same warm files;
each run is measured for wall time and peak RssAnon of its process tree (best wall time and worst
peak count). The two outputs are compared tensor by tensor.

`python bench/bench_merge.py peft BASE ADAPTER OUT` is the baseline contender itself.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, VOCAB = 2048, 5632, 16, 4, 32000
LAYERS = int(os.environ.get("WB_BENCH_MERGE_LAYERS", "21"))
RANK, ALPHA = 16, 32
SHARD_BYTES = 600 * 1000**2
REPEATS = 2  # each contender runs this many times, alternating; the best wall time counts
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def llama_shapes() -> dict[str, tuple[int, int] | tuple[int]]:
    """Tensor shapes of a LlamaForCausalLM with the sizes above (untied embeddings)."""
    kv = HIDDEN // HEADS * KV_HEADS
    shapes: dict = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.k_proj.weight": (kv, HIDDEN),
            p + "self_attn.v_proj.weight": (kv, HIDDEN), p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            p + "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN), p + "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
            p + "input_layernorm.weight": (HIDDEN,), p + "post_attention_layernorm.weight": (HIDDEN,),
        })
    shapes["model.norm.weight"] = (HIDDEN,)
    shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    return shapes


def build_base(folder: Path, seed: int = 0) -> int:
    """Write the base shard by shard (never more than one shard in memory); returns its bytes.
    Another `seed` gives another model of the same shape (a "fine-tune" for the recipe benches)."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    groups: list[dict] = [{}]
    size = 0
    for name, shape in llama_shapes().items():
        nbytes = 2 * int(torch.tensor(shape).prod())
        if groups[-1] and size + nbytes > SHARD_BYTES:
            groups.append({})
            size = 0
        groups[-1][name] = shape
        size += nbytes
    weight_map, total = {}, 0
    for k, group in enumerate(groups, start=1):
        filename = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        tensors = {
            name: (1 + 0.1 * torch.randn(shape, generator=generator)) if len(shape) == 1
            else 0.02 * torch.randn(shape, generator=generator)
            for name, shape in group.items()
        }
        tensors = {name: t.to(torch.bfloat16) for name, t in tensors.items()}
        save_file(tensors, str(folder / filename), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map.update(dict.fromkeys(group, filename))
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "dtype": "bfloat16",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return total


def build_adapter(folder: Path) -> int:
    """A rank-16 LoRA on every Linear of every layer, in PEFT's saved layout; returns its bytes."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(1)
    tensors = {}
    for name, shape in llama_shapes().items():
        module = name.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] in LINEAR:
            out_features, in_features = shape
            prefix = f"base_model.model.{module}"
            tensors[prefix + ".lora_A.weight"] = 0.02 * torch.randn(RANK, in_features, generator=generator)
            tensors[prefix + ".lora_B.weight"] = 0.02 * torch.randn(out_features, RANK, generator=generator)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": ALPHA, "lora_dropout": 0.0,
        "target_modules": list(LINEAR), "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
        "modules_to_save": None, "init_lora_weights": True, "inference_mode": True,
        "base_model_name_or_path": None,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return sum(t.numel() * 4 for t in tensors.values())


def run(work: Path) -> dict:
    base, adapter = work / "base", work / "adapter"
    base_bytes = build_base(base)
    adapter_bytes = build_adapter(adapter)
    lora = run_lora(work, base, adapter, base_bytes, adapter_bytes)
    recipes = run_recipes(work, base)
    return {"figures": {**lora["figures"], "layers": LAYERS, "recipes": recipes["figures"]},
            "targets": {**lora["targets"], **recipes["targets"]}}


def run_lora(work: Path, base: Path, adapter: Path, base_bytes: int, adapter_bytes: int) -> dict:
    """`wb merge --base --adapter` against peft's merge_and_unload."""
    from bench.measure import compare_checkpoints, run_measured, target

    contenders = {
        "wb": lambda out: [sys.executable, "-m", "workbench", "merge", "--base", str(base), "--adapter", str(adapter),
                           "--out", str(out)],
        "peft": lambda out: [sys.executable, str(Path(__file__).resolve()), "peft", str(base), str(adapter), str(out)],
    }
    runs: dict[str, list[dict]] = {name: [] for name in contenders}
    for _ in range(REPEATS):  # alternate, so that both see the same machine load
        for name, command in contenders.items():
            out = work / f"{name}-out"
            shutil.rmtree(out, ignore_errors=True)
            result = run_measured(command(out))
            if result["returncode"] != 0:
                raise RuntimeError(f"{name} failed: {result['stderr_tail']}")
            runs[name].append(result)
    agreement = compare_checkpoints(work / "wb-out", work / "peft-out")
    wall = {name: min(r["wall_s"] for r in results) for name, results in runs.items()}
    peak = {name: max(r["peak_rss_anon_mb"] for r in results) for name, results in runs.items()}
    memory_ratio, wall_ratio = peak["wb"] / peak["peft"], wall["wb"] / wall["peft"]
    return {
        "figures": {
            "base_bytes": base_bytes,
            "adapter_bytes": adapter_bytes,
            "runs_each": REPEATS,
            "wb_wall_s_best": wall["wb"],
            "wb_wall_s_all": [r["wall_s"] for r in runs["wb"]],
            "wb_peak_rss_anon_mb": peak["wb"],
            "peft_wall_s_best": wall["peft"],
            "peft_wall_s_all": [r["wall_s"] for r in runs["peft"]],
            "peft_peak_rss_anon_mb": peak["peft"],
            "peak_anon_ratio": round(memory_ratio, 4),
            "wall_ratio": round(wall_ratio, 4),
            "output_agreement": agreement,
        },
        "targets": {
            "peak_anon_ratio": target(memory_ratio, 0.2),
            "wall_ratio": target(wall_ratio, 1.0),
        },
    }


RECIPES = {
    "task_arithmetic": "merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
                       "  - {{model: {ft1}, parameters: {{weight: 0.6}}}}\n  - {{model: {ft2}, parameters: {{weight: 0.4}}}}\n",
    "ties": "merge_method: ties\nbase_model: {base}\nmodels:\n"
            "  - {{model: {ft1}, parameters: {{weight: 0.6, density: 0.5}}}}\n"
            "  - {{model: {ft2}, parameters: {{weight: 0.4, density: 0.5}}}}\n",
    "slerp": "merge_method: slerp\nbase_model: {base}\nmodels: [{{model: {base}}}, {{model: {ft1}}}]\n"
             "parameters: {{t: [0, 0.5, 1]}}\n",
}


def run_recipes(work: Path, base: Path) -> dict:
    """Each recipe by `wb merge --config` and by `mergekit-yaml`, alternating, once each (a slow
    machine cannot afford more), and the I/O floor of the merge (its inputs read, its output
    written) measured right before them."""
    from bench.measure import compare_checkpoints, run_measured, target

    fine_tunes = [work / "ft1", work / "ft2"]
    for seed, folder in enumerate(fine_tunes, start=1):
        build_base(folder, seed=seed)
    mergekit = Path(sys.executable).with_name("mergekit-yaml")
    figures: dict = {}
    targets: dict = {}
    for name, text in RECIPES.items():
        models = [base, *fine_tunes] if name != "slerp" else [base, fine_tunes[0]]
        recipe = work / f"{name}.yml"
        recipe.write_text(text.format(base=base, ft1=fine_tunes[0], ft2=fine_tunes[1]))
        floor = io_floor(models, work / "floor.bin")
        results = {}
        for contender in ("wb", "mergekit"):
            out = work / f"{name}-{contender}"
            shutil.rmtree(out, ignore_errors=True)
            command = ([sys.executable, "-m", "workbench", "merge", "--config", str(recipe), "--out", str(out)]
                       if contender == "wb" else [str(mergekit), str(recipe), str(out), "--quiet"])
            result = run_measured(command)
            if result["returncode"] != 0:
                raise RuntimeError(f"{contender} {name} failed: {result['stderr_tail']}")
            results[contender] = result
        agreement = compare_checkpoints(work / f"{name}-wb", work / f"{name}-mergekit")
        for contender in results:
            shutil.rmtree(work / f"{name}-{contender}", ignore_errors=True)
        wb, mk = results["wb"], results["mergekit"]
        figures[name] = {
            "wb_wall_s": wb["wall_s"], "wb_peak_rss_anon_mb": wb["peak_rss_anon_mb"],
            "mergekit_wall_s": mk["wall_s"], "mergekit_peak_rss_anon_mb": mk["peak_rss_anon_mb"],
            "io_floor_s": floor, "wb_over_io_floor": round(wb["wall_s"] / floor, 3),
            "output_agreement": agreement,
        }
        targets[f"{name}_peak_anon_vs_mergekit"] = target(wb["peak_rss_anon_mb"] / mk["peak_rss_anon_mb"], 0.5)
        targets[f"{name}_wall_vs_mergekit"] = target(wb["wall_s"] / mk["wall_s"], 1.0)
        if name == "task_arithmetic":  # a row-block method: within 1.3x of the I/O floor
            targets[f"{name}_wall_vs_io_floor"] = target(wb["wall_s"] / floor, 1.3)
    return {"figures": figures, "targets": targets}


def io_floor(models: list[Path], scratch: Path) -> float:
    """Seconds to read every weight byte of `models` once (16 MiB reads) and write as many bytes as
    one model's weights once (the merged output), unbuffered and not fsynced (nor are the merges' outputs)."""
    started = time.perf_counter()
    out_bytes = 0
    for k, model in enumerate(models):
        for file in sorted(model.glob("*.safetensors")):
            with open(file, "rb", buffering=0) as handle:
                while chunk := handle.read(16 << 20):
                    out_bytes += len(chunk) if k == 0 else 0
    block = bytes(16 << 20)
    with open(scratch, "wb", buffering=0) as handle:
        for _ in range(0, out_bytes, len(block)):
            handle.write(block)
    elapsed = time.perf_counter() - started
    scratch.unlink()
    return round(elapsed, 3)


def peft_merge(base: str, adapter: str, out: str) -> None:
    """The baseline: what people run today."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.save_pretrained(out)


if __name__ == "__main__":
    if len(sys.argv) != 5 or sys.argv[1] != "peft":
        sys.exit("usage: python bench/bench_merge.py peft BASE ADAPTER OUT")
    peft_merge(*sys.argv[2:])
