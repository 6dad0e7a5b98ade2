"""`wb recover` against the way Alpaca / KnowLM / FastChat rebuild a model from a weight diff, on
a synthetic >= 2 GB bf16 Llama (safetensors shards + config.json that transformers loads).

Built first, not timed: RAW, TUNED (RAW plus seeded noise) and DIFF (made by `wb diff`, float32).
Then, in the same run, on the same warm files, each contender runs once and is measured for wall
time and peak RssAnon of its process tree:

- `python -m workbench recover --base RAW --diff DIFF --out OUT` (checks its files against TUNED's
  recorded md5/sha256 before it finishes);
- the baseline, Alpaca's `weight_diff.py recover`: both models loaded with `from_pretrained` in
  float32, `state_dict` added, then cast back to TUNED's bf16 (KnowLM's `--is_fp16` step, so that
  both write the same model) and `save_pretrained`.

The two outputs are compared tensor by tensor. `python bench/bench_recover.py baseline RAW DIFF OUT`
is the baseline contender itself.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

HIDDEN, INTERMEDIATE, LAYERS, HEADS, VOCAB = 2048, 5632, 18, 16, 32000
SHARD_BYTES = 600 * 1000**2
NOISE = 0.002  # the "fine-tuning": TUNED = RAW + NOISE * N(0, 1), rounded to bf16


def llama_shapes() -> dict[str, tuple[int, ...]]:
    """Tensor shapes of an untied LlamaForCausalLM of the sizes above (2.1 GB in bf16)."""
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{p}self_attn.{proj}.weight"] = (HIDDEN, HIDDEN)
        shapes[f"{p}mlp.gate_proj.weight"] = (INTERMEDIATE, HIDDEN)
        shapes[f"{p}mlp.up_proj.weight"] = (INTERMEDIATE, HIDDEN)
        shapes[f"{p}mlp.down_proj.weight"] = (HIDDEN, INTERMEDIATE)
        shapes[f"{p}input_layernorm.weight"] = (HIDDEN,)
        shapes[f"{p}post_attention_layernorm.weight"] = (HIDDEN,)
    shapes["model.norm.weight"] = (HIDDEN,)
    shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    return shapes


def build_raw_and_tuned(raw: Path, tuned: Path) -> int:
    """Write RAW and TUNED shard by shard with safetensors.save_file; returns RAW's tensor bytes."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in llama_shapes().items():
        nbytes = 2 * _numel(shape)
        if groups[-1] and size + nbytes > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    shapes = llama_shapes()
    weight_map, total = {}, 0
    for folder in (raw, tuned):
        folder.mkdir(parents=True)
    for k, group in enumerate(groups, start=1):
        filename = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        raw_part, tuned_part = {}, {}
        for name in group:
            shape = shapes[name]
            base = (1 + 0.1 * torch.randn(shape, generator=generator)) if len(shape) == 1 \
                else 0.02 * torch.randn(shape, generator=generator)
            raw_part[name] = base.to(torch.bfloat16)
            tuned_part[name] = base.add_(torch.randn(shape, generator=generator), alpha=NOISE).to(torch.bfloat16)
            del base
        save_file(raw_part, str(raw / filename), metadata={"format": "pt"})
        save_file(tuned_part, str(tuned / filename), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in raw_part.values())
        weight_map.update(dict.fromkeys(group, filename))
        del raw_part, tuned_part
    index = json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True)
    config = json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": HEADS, "vocab_size": VOCAB, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 1,
        "eos_token_id": 2, "dtype": "bfloat16",
    }, indent=2)
    for folder in (raw, tuned):
        (folder / "model.safetensors.index.json").write_text(index)
        (folder / "config.json").write_text(config)
    return total


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def warm(*folders: Path) -> None:
    """Read every file once, so both contenders start from the same warm page cache."""
    for folder in folders:
        for path in sorted(folder.iterdir()):
            with open(path, "rb") as handle:
                while handle.read(64 << 20):
                    pass


def run(work: Path) -> dict:
    from bench.measure import compare_checkpoints, run_measured, target

    raw, tuned, diff = work / "raw", work / "tuned", work / "diff"
    raw_bytes = build_raw_and_tuned(raw, tuned)
    started = time.perf_counter()
    made = run_measured([sys.executable, "-m", "workbench", "diff", "--base", str(raw), "--tuned", str(tuned),
                         "--out", str(diff), "--json"])
    if made["returncode"] != 0:
        raise RuntimeError(f"wb diff failed: {made['stderr_tail']}")
    diff_s = time.perf_counter() - started
    meta = json.loads((diff / "weight_diff.json").read_text())
    warm(raw, diff)
    ours = run_measured([sys.executable, "-m", "workbench", "recover", "--base", str(raw), "--diff", str(diff),
                         "--out", str(work / "wb-out")])
    warm(raw, diff)
    theirs = run_measured([sys.executable, str(Path(__file__).resolve()), "baseline", str(raw), str(diff),
                           str(work / "baseline-out")])
    for label, result in (("wb recover", ours), ("baseline", theirs)):
        if result["returncode"] != 0:
            raise RuntimeError(f"{label} failed: {result['stderr_tail']}")
    memory_ratio = ours["peak_rss_anon_mb"] / theirs["peak_rss_anon_mb"]
    wall_ratio = ours["wall_s"] / theirs["wall_s"]
    return {
        "figures": {
            "raw_bytes": raw_bytes,
            "diff_bytes": sum(p.stat().st_size for p in diff.glob("*.safetensors")),
            "diff_fixups": meta["fixups"]["count"],
            "wb_diff_wall_s": round(diff_s, 1),
            "wb_diff_peak_rss_anon_mb": made["peak_rss_anon_mb"],
            "wb_wall_s": ours["wall_s"],
            "wb_peak_rss_anon_mb": ours["peak_rss_anon_mb"],
            "baseline_wall_s": theirs["wall_s"],
            "baseline_peak_rss_anon_mb": theirs["peak_rss_anon_mb"],
            "peak_anon_ratio": round(memory_ratio, 4),
            "wall_ratio": round(wall_ratio, 4),
            "output_agreement": compare_checkpoints(work / "wb-out", work / "baseline-out"),
        },
        "targets": {
            "peak_anon_ratio": target(memory_ratio, 0.2),
            "wall_ratio": target(wall_ratio, 1.0),
        },
    }


def baseline_recover(raw: str, diff: str, out: str) -> None:
    """The baseline: stanford_alpaca weight_diff.py recover (no resize needed here), then cast."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.inference_mode():
        model_raw = AutoModelForCausalLM.from_pretrained(raw, dtype=torch.float32, low_cpu_mem_usage=True)
        model_recovered = AutoModelForCausalLM.from_pretrained(diff, dtype=torch.float32, low_cpu_mem_usage=True)
        state_dict_recovered = model_recovered.state_dict()
        state_dict_raw = model_raw.state_dict()
        for key in state_dict_recovered:
            state_dict_recovered[key].add_(state_dict_raw[key])
        model_recovered.to(torch.bfloat16).save_pretrained(out)


if __name__ == "__main__":
    if len(sys.argv) != 5 or sys.argv[1] != "baseline":
        sys.exit("usage: python bench/bench_recover.py baseline RAW DIFF OUT")
    baseline_recover(*sys.argv[2:])
