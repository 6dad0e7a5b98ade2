"""Tiny Llama checkpoints built in-process: a 2-layer model and a BPE tokenizer trained here.

Shared by every test module (and by `make bench`, which scales the same builder up). Nothing is
downloaded: the tokenizer is trained on a few lines of text, the weights are seeded random.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Question: what is two plus two? Answer: four.",
    "Write an advertisement for a black striped dress. A black dress with stripes, simple and elegant.",
    "类型#裙*颜色#黑色*图案#条纹 这条黑色条纹裙简约大方，穿上显瘦。",
    "user assistant system Human: Assistant: A B C D answer correct wrong",
    "今天天气很好 今天天气不错 我们去公园散步吧",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,;:!?#*-_()[]{}",
]


def make_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer with a ChatML template, trained on CORPUS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def make_config(vocab_size: int, tie: bool = False, hidden: int = 64, layers: int = 2, intermediate: int = 128):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=5,
        pad_token_id=3,
    )


def make_model(vocab_size: int, tie: bool = False, seed: int = 0, **config_kwargs):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(make_config(vocab_size, tie=tie, **config_kwargs))
    with torch.no_grad():  # random norms, so that no tensor is all ones
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
    return model.eval()


def state_dict_for_files(model) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint holds: tied weights once, as transformers saves them."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return state


def save_layout(
    state: dict[str, torch.Tensor],
    out: Path,
    layout: str = "safetensors",
    dtype: torch.dtype | None = None,
    shards: int = 3,
    config=None,
    tokenizer=None,
) -> Path:
    """Write `state` as a HF folder in one of: safetensors, safetensors-sharded, bin, bin-sharded."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    names = list(state)
    sharded = layout.endswith("-sharded")
    suffix = "safetensors" if layout.startswith("safetensors") else "bin"
    stem = "model" if suffix == "safetensors" else "pytorch_model"
    groups = [names[i::shards] for i in range(shards)] if sharded else [names]
    weight_map = {}
    for k, group in enumerate(groups, start=1):
        filename = f"{stem}-{k:05d}-of-{len(groups):05d}.{suffix}" if sharded else f"{stem}.{suffix}"
        part = {n: state[n] for n in group}
        if suffix == "safetensors":
            save_file(part, str(out / filename), metadata={"format": "pt"})
        else:
            torch.save(part, out / filename)
        weight_map.update({n: filename for n in group})
    if sharded:
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / f"{stem}.{suffix}.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    if config is not None:
        config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def save_tiny_model(out: Path, layout: str = "safetensors", dtype: torch.dtype = torch.float32, tie: bool = False,
                    seed: int = 0, tokenizer=None) -> Path:
    """A complete tiny Llama folder (config, tokenizer, weights) in the given layout and dtype."""
    tokenizer = tokenizer or make_tokenizer()
    model = make_model(len(tokenizer), tie=tie, seed=seed)
    model.config.torch_dtype = dtype
    return save_layout(state_dict_for_files(model), out, layout, dtype, config=model.config, tokenizer=tokenizer)


def save_scaled_model(out: Path, tokenizer, logit_scale: float) -> Path:
    """The tiny Llama (seed 0, untied, fp32 as built) with lm_head multiplied by `logit_scale`: 16 gives a
    pretrained-like logit scale a few LoRA steps can learn from (random init gives near-uniform logits)."""
    model = make_model(len(tokenizer), seed=0)
    with torch.no_grad():
        model.lm_head.weight.mul_(logit_scale)
    return save_layout(state_dict_for_files(model), out, config=model.config, tokenizer=tokenizer)


MMLU_SUBJECTS = {"nutrition": 5, "anatomy": 4}  # test questions each; odd and even: lm-eval pads a short rank


def write_mmlu(root: Path, subjects: dict[str, int] = MMLU_SUBJECTS, dev: int = 5,
               question: str = "{subject} {split} question {i}: which colour?",
               choices: tuple[str, ...] = ("red", "blue", "green", "black")) -> Path:
    """MMLU's official CSV layout (data/dev, data/test; no header): `dev` shots and subjects[s] test questions
    a subject (`question` formatted with subject, split, i), answers spread over A-D."""
    for subject, count in subjects.items():
        for split, n in (("dev", dev), ("test", count)):
            path = root / "data" / split / f"{subject}_{split}.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("w", encoding="utf-8", newline="") as handle:
                csv.writer(handle).writerows([[question.format(subject=subject, split=split, i=i), *choices,
                                               "ABCD"[i % 4]] for i in range(n)])
    return root


def write_gen_data(path: Path, count: int) -> Path:
    """`count` alpaca generation records: "Say the number i twice" -> "i i"."""
    records = [{"instruction": f"Say the number {i} twice", "input": "", "output": f"{i} {i}"}
               for i in range(count)]
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def read_log(out: Path) -> list[dict]:
    """The rows of a `wb train` run's OUT/trainer_log.jsonl."""
    return read_jsonl(out / "trainer_log.jsonl")


def perturbed(state: dict[str, torch.Tensor], scale: float = 0.01, seed: int = 1) -> dict[str, torch.Tensor]:
    """A "fine-tuned" copy: every floating tensor nudged by seeded noise."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, tensor in state.items():
        noise = torch.randn(tensor.shape, generator=generator) * scale * max(1e-3, float(tensor.float().std()) if tensor.numel() > 1 else 1.0)
        out[name] = (tensor.float() + noise).to(tensor.dtype)
    return out


def as_hub_cache(folder: Path, cache_dir: Path, repo_id: str = "wb-test/tiny-llama",
                 revision: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    """Lay `folder` out as huggingface_hub's cache does and return the snapshot folder:
    `models--org--name/blobs/<sha256>` holds the bytes, `snapshots/<rev>/<file>` are relative
    symlinks into `../../blobs/`, and `refs/main` names the revision."""
    import hashlib
    import os

    repo = cache_dir / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = file.relative_to(folder)
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        if not blob.exists():
            blob.write_bytes(file.read_bytes())
        link = snapshot / relative
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot
