"""`wb merge` against peft's way (`from_pretrained` + `PeftModel.from_pretrained` + `merge_and_unload`
+ `save_pretrained`) on a synthetic >= 2 GB bf16 Llama with a rank-16 all-linear LoRA adapter.

The base (config.json transformers loads + safetensors shards written one at a time) and the adapter
(PEFT layout written directly: adapter_config.json + adapter_model.safetensors) are built first, not
timed. Both contenders then run twice each, alternating, in the same run on the same warm files;
each run is measured for wall time and peak RssAnon of its process tree (best wall time and worst
peak count). The two outputs are compared tensor by tensor.

`python bench/bench_merge.py peft BASE ADAPTER OUT` is the baseline contender itself.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS, VOCAB = 2048, 5632, 21, 16, 4, 32000
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


def build_base(folder: Path) -> int:
    """Write the base shard by shard (never more than one shard in memory); returns its bytes."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
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
    from bench.measure import compare_checkpoints, run_measured, target

    base, adapter = work / "base", work / "adapter"
    base_bytes = build_base(base)
    adapter_bytes = build_adapter(adapter)
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
