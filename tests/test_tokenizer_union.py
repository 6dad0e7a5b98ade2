"""`tokenizer_source` / `tokenizer:` of a recipe: wb's vocabulary, tokenizer files and permuted
embedding rows against mergekit 0.1.5's own build_tokenizer and PermutedVocabulary, called in this
process on the same tokenizer folders and tensors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import shared_path
from tiny import make_config, make_tokenizer
from tokenizers import AddedToken

from workbench.errors import WorkbenchError
from workbench.weights.tokenizer_union import (
    TokenizerChoice,
    config_vocab_size,
    plan_vocabulary,
    resolve_chat_template,
    tokenizer_choice,
)

WIDTH = 6  # the hidden size of the test tensors


# -- folders and the oracle ------------------------------------------------------------------------
def save_folder(folder: Path, tokenizer, vocab_size: int | None = None) -> Path:
    """A model folder's tokenizer and config.json (no weights: only the vocabulary matters here)."""
    tokenizer.save_pretrained(folder)
    config = make_config(vocab_size or len(tokenizer))
    config.architectures = ["LlamaForCausalLM"]  # mergekit reads vocab_size through its architecture table
    config.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """A base; a chat fine-tune with an added special and an added plain token; a model with a
    wider ordinary vocabulary sharing one added token; a base whose tokenizer outgrew its embedding."""
    root = tmp_path_factory.mktemp("tokenizers")
    chat = make_tokenizer()
    chat.add_tokens([AddedToken("<tool>", special=True), "<extra>"])
    wide = make_tokenizer(360)
    wide.add_special_tokens({"additional_special_tokens": ["<tool>", "<wide_only>"]})
    outgrown = make_tokenizer()
    outgrown.add_tokens(["<unused_a>", "<unused_b>"])
    return {
        "base": save_folder(root / "base", make_tokenizer()),
        "chat": save_folder(root / "chat", chat),
        "wide": save_folder(root / "wide", wide),
        "outgrown": save_folder(root / "outgrown", outgrown, vocab_size=320),
    }


@pytest.fixture(autouse=True)
def vocab_by_id(monkeypatch):
    """mergekit walks each tokenizer's get_vocab(), a Rust hash map whose order changes from run to
    run; walked by id it has one answer, the order wb takes."""
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    original = TokenizersBackend.get_vocab
    monkeypatch.setattr(TokenizersBackend, "get_vocab",
                        lambda self: dict(sorted(original(self).items(), key=lambda item: item[1])))


def oracle(models: dict[str, Path], base: str | None, recipe: dict, tensors: dict[str, torch.Tensor] | None = None):
    """mergekit's TokenizerInfo for the recipe's tokenizer keys, and its permuted tensors."""
    from mergekit.common import ModelReference
    from mergekit.tokenizer.build import build_tokenizer
    from mergekit.tokenizer.config import TokenizerConfig
    from mergekit.tokenizer.embed import PermutedVocabulary

    refs = {name: ModelReference.parse(str(path)) for name, path in models.items()}
    block = TokenizerConfig.model_validate(recipe["tokenizer"]) if "tokenizer" in recipe else None
    source = block.source if block else recipe["tokenizer_source"]
    if isinstance(source, str) and source not in ("base", "union"):
        source = ModelReference.parse(source)
    tokens = dict(block.tokens or {}) if block else {}
    info = build_tokenizer(refs[base] if base else None, list(refs.values()), source, False, add_tokens=list(tokens))
    if tensors is None:
        return info, None
    task = PermutedVocabulary.model_construct(tokens=tokens, pad_to_multiple_of=block.pad_to_multiple_of if block else None,
                                              base_model=refs[base] if base else None, vocabulary_axis=0)
    permuted = task.execute(tokenizer_info=info, tensors={refs[n]: t for n, t in tensors.items()})
    return info, {name: permuted[refs[name]] for name in tensors}


def named(models: dict[str, Path], recipe: dict, for_mergekit: bool) -> dict:
    """The recipe with each "@name" written as wb's plan names it (the name) or as mergekit's
    reference (the folder)."""
    text = json.dumps(recipe)
    for name, path in models.items():
        text = text.replace(f'"@{name}"', json.dumps(str(path) if for_mergekit else name))
    return json.loads(text)


def random_tensors(models: dict[str, Path], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {name: torch.randn(json.loads((path / "config.json").read_text())["vocab_size"], WIDTH,
                              generator=generator).to(dtype)
            for name, path in models.items()}


def wb_rows(plan, tensors: dict[str, torch.Tensor], block: int = 37) -> dict[str, torch.Tensor]:
    """Every model's permuted tensor, assembled from row blocks of `block` rows."""
    permuted = plan.permute([tensors.get(name) for name in plan.names])
    return {name: torch.cat([permuted.rows(i, start, start + block) for start in range(0, plan.vocab_size, block)])
            for i, name in enumerate(plan.names) if name in tensors}


def assert_same_tokenizer(plan, info, tmp_path: Path) -> None:
    """Same vocabulary, same added tokens with the same settings, same files written."""
    ours, theirs = plan.tokenizer, info.tokenizer
    assert plan.vocab == theirs.get_vocab()
    assert {i: str(t) for i, t in ours.added_tokens_decoder.items()} == {i: str(t) for i, t in theirs.added_tokens_decoder.items()}
    written = plan.write(tmp_path / "wb")
    theirs.save_pretrained(str(tmp_path / "mergekit"))
    assert written == sorted(os.listdir(tmp_path / "mergekit"))
    for name in written:
        assert (tmp_path / "wb" / name).read_bytes() == (tmp_path / "mergekit" / name).read_bytes(), name


def assert_same_positions(plan, info, models: dict[str, Path]) -> None:
    from mergekit.common import ModelReference

    for i, name in enumerate(plan.names):
        permutation = info.permutations[ModelReference.parse(str(models[name]))]
        expected = torch.tensor([permutation[token_id] for token_id in range(len(plan.vocab))])
        assert torch.equal(plan.positions[i], expected), name


# -- equal to mergekit ------------------------------------------------------------------------------
TOKENS_BLOCK = {
    "source": "union",
    "tokens": {
        "<new>": {"source": {"kind": "zero"}},
        "<tool>": {"source": "@chat", "force": True},
        "<extra>": {"source": {"kind": "model_token", "model": "@base", "token": "<s>"}},
        "<wide_only>": {"source": {"kind": "model_token", "model": "@wide", "token_id": 7}},
    },
    "pad_to_multiple_of": 16,
}


def test_union_with_a_tokens_block_equals_mergekit(folders, tmp_path):
    models = {name: folders[name] for name in ("base", "chat", "wide")}
    recipe = {"tokenizer": TOKENS_BLOCK}
    choice = tokenizer_choice(None, named(models, recipe, False)["tokenizer"])
    plan = plan_vocabulary(models, "base", choice)
    tensors = random_tensors(models)
    info, expected = oracle(models, "base", named(models, recipe, True), tensors)
    assert_same_tokenizer(plan, info, tmp_path)
    assert_same_positions(plan, info, models)
    from transformers import AutoTokenizer

    vocabularies = {name: set(AutoTokenizer.from_pretrained(path).get_vocab()) for name, path in models.items()}
    new = (vocabularies["chat"] | vocabularies["wide"] | {"<new>"}) - vocabularies["base"]
    assert sorted(plan.added) == sorted(new) and len(plan.vocab) == 320 + len(new)
    assert plan.vocab_size == -(-len(plan.vocab) // 16) * 16 > len(plan.vocab)
    ours = wb_rows(plan, tensors)
    for name in models:
        mine, theirs = ours[name], expected[name]
        assert mine.shape == theirs.shape == (plan.vocab_size, WIDTH)
        tokens = len(plan.vocab)
        assert torch.equal(mine[:tokens], theirs[:tokens]), name  # token rows: the same arithmetic, bit for bit
        torch.testing.assert_close(mine[tokens:], theirs[tokens:], rtol=0, atol=1e-6)  # padding: the mean row
    base_rows = ours["base"]
    assert torch.equal(base_rows[plan.vocab["<new>"]], torch.zeros(WIDTH))
    assert torch.equal(base_rows[plan.vocab["<extra>"]], tensors["base"][1])  # the base's row of <s>


@pytest.mark.parametrize("recipe, base", [
    ({"tokenizer_source": "base"}, "base"),
    ({"tokenizer": {"source": "base", "pad_to_multiple_of": 48}}, "base"),
    ({"tokenizer_source": "@wide"}, None),  # no base model: the first model's tokenizer, averages where shared
    ({"tokenizer_source": "union"}, None),
])
def test_sources_equal_mergekit(folders, tmp_path, recipe, base):
    models = {name: folders[name] for name in ("chat", "wide", "base")} if base is None else \
        {name: folders[name] for name in ("base", "chat", "wide")}
    ours_recipe = named(models, recipe, False)
    choice = tokenizer_choice(ours_recipe.get("tokenizer_source"), ours_recipe.get("tokenizer"))
    plan = plan_vocabulary(models, base, choice)
    tensors = random_tensors(models)
    info, expected = oracle(models, base, named(models, recipe, True), tensors)
    assert_same_tokenizer(plan, info, tmp_path)
    assert_same_positions(plan, info, models)
    ours = wb_rows(plan, tensors)
    for name in models:
        torch.testing.assert_close(ours[name], expected[name], rtol=0, atol=1e-6)


def test_bf16_rows_are_computed_in_bf16_as_mergekit(folders):
    models = {name: folders[name] for name in ("chat", "wide", "base")}
    plan = plan_vocabulary(models, None, TokenizerChoice("union"))
    tensors = random_tensors(models, torch.bfloat16)
    _, expected = oracle(models, None, {"tokenizer_source": "union"}, tensors)
    ours = wb_rows(plan, tensors)
    for name in models:
        assert ours[name].dtype == torch.bfloat16
        assert torch.equal(ours[name], expected[name]), name


def test_a_base_tokenizer_beyond_its_embedding_is_cut(folders, tmp_path):
    models = {"outgrown": folders["outgrown"], "chat": folders["chat"]}
    for source in ("base", "union"):
        plan = plan_vocabulary(models, "outgrown", TokenizerChoice(source))
        info, _ = oracle(models, "outgrown", {"tokenizer_source": source})
        assert "<unused_a>" not in plan.vocab
        assert_same_tokenizer(plan, info, tmp_path / source)


def test_an_adapter_folder_takes_its_models_embedding_size(folders, tmp_path):
    """A `model+lora` whose adapter carries the tokenizer: the folder has no config.json, so the size
    the engine passes (the model's vocab_size) decides, as the outgrown model's own config does."""
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for file in folders["outgrown"].iterdir():
        if file.name != "config.json":
            (adapter / file.name).write_bytes(file.read_bytes())
    for source in ("base", "union"):
        from_config = plan_vocabulary({"outgrown": folders["outgrown"], "chat": folders["chat"]}, "outgrown",
                                      TokenizerChoice(source))
        passed = plan_vocabulary({"outgrown": adapter, "chat": folders["chat"]}, "outgrown", TokenizerChoice(source),
                                 sizes={"outgrown": 320, "chat": config_vocab_size(folders["chat"])})
        assert "<unused_a>" not in passed.vocab
        assert passed.vocab == from_config.vocab and passed.vocab_size == from_config.vocab_size


def test_a_model_without_a_tokenizer_is_taken_as_the_base(folders, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_bytes((folders["chat"] / "config.json").read_bytes())
    plan = plan_vocabulary({"base": folders["chat"], "bare": bare}, "base", TokenizerChoice("union"))
    assert plan.notes and "bare has no tokenizer wb can load" in plan.notes[0]
    assert torch.equal(plan.positions[1], plan.positions[0]) and int((plan.positions[1] < 0).sum()) == 0


@pytest.mark.slow
def test_real_llama3_tokenizer_with_added_tokens(tmp_path):
    """Llama-3's tokenizer as the base and a fine-tune's copy with two new special tokens (written
    into its tokenizer.json): their union is the fine-tune's vocabulary, ids and settings."""
    source = shared_path("tokenizers", "llama3")
    base, tuned = tmp_path / "llama3", tmp_path / "tuned"
    for folder, vocab_size in ((base, 128256), (tuned, 128258)):
        folder.mkdir()
        for file in source.iterdir():
            (folder / file.name).symlink_to(file)
        config = make_config(vocab_size)
        config.architectures = ["LlamaForCausalLM"]
        config.save_pretrained(folder)
    state = json.loads((source / "tokenizer.json").read_text())
    extra = [{"id": 128256 + i, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, text in enumerate(["<|tool_call|>", "<|tool_result|>"])]
    state["added_tokens"] += extra
    (tuned / "tokenizer.json").unlink()
    (tuned / "tokenizer.json").write_text(json.dumps(state))
    plan = plan_vocabulary({"llama3": base, "tuned": tuned}, "llama3", TokenizerChoice("union"))
    expected = {**state["model"]["vocab"], **{entry["content"]: entry["id"] for entry in state["added_tokens"]}}
    assert plan.vocab == expected and plan.added == ["<|tool_call|>", "<|tool_result|>"]
    assert all(plan.tokenizer.added_tokens_decoder[e["id"]].special for e in extra)
    assert torch.equal(plan.positions[1], torch.arange(128258))
    assert torch.equal(plan.positions[0][:128256], torch.arange(128256)) and plan.positions[0][128256:].tolist() == [-1, -1]


# -- checked input: one error line -------------------------------------------------------------------
BAD_CHOICES = {
    "block-not-mapping": (None, ["union"], "tokenizer: must be a mapping"),
    "unknown-key": (None, {"source": "union", "token": {}}, "tokenizer has 'token', which wb does not know"),
    "force-text": (None, {"tokens": {"<t>": {"force": "yes"}}}, "tokenizer.tokens['<t>'].force must be true or false"),
    "both-ids": (None, {"tokens": {"<t>": {"source": {"kind": "model_token", "model": "m", "token": "a", "token_id": 1}}}},
                 "exactly one of token and token_id"),
    "negative-id": (None, {"tokens": {"<t>": {"source": {"kind": "model_token", "model": "m", "token_id": -1}}}},
                    "token_id must be a whole number"),
    "bad-kind": (None, {"tokens": {"<t>": {"source": {"kind": "mean"}}}}, "must be a model's name, {kind: zero}"),
    "pad-zero": (None, {"pad_to_multiple_of": 0}, "pad_to_multiple_of must be a whole number from 1"),
    "pad-float": (None, {"pad_to_multiple_of": 8.5}, "pad_to_multiple_of must be a whole number from 1"),
    "source-number": (3, None, "tokenizer_source must be base, union or the name of a model"),
}


@pytest.mark.parametrize("case", BAD_CHOICES)
def test_bad_tokenizer_settings_are_refused(case, tmp_path):
    source, block, message = BAD_CHOICES[case]
    with pytest.raises(WorkbenchError) as caught:
        tokenizer_choice(source, block, tmp_path / "recipe.yml")
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert caught.value.path == str(tmp_path / "recipe.yml")


def test_neither_key_means_no_choice():
    assert tokenizer_choice(None, None) is None
    assert tokenizer_choice(None, {}).source == "union"  # mergekit's default for a tokenizer: block
    assert tokenizer_choice("base", {"source": "@m"}).source == "@m"  # the block wins


def test_bad_references_are_refused(folders):
    models = {"base": folders["base"], "chat": folders["chat"]}
    cases = [
        (TokenizerChoice("other"), "tokenizer source 'other' is not base, union or a model of the recipe"),
        (tokenizer_choice(None, {"tokens": {"<t>": {"source": "other"}}}), "takes its embedding from 'other'"),
    ]
    for choice, message in cases:
        with pytest.raises(WorkbenchError, match=message):
            plan_vocabulary(models, "base", choice)
    tensors = random_tensors(models)
    for block, message in (({"tokens": {"<extra>": {}}}, "gives no source, but some model lacks the token"),
                           ({"tokens": {"<extra>": {"source": "base"}}}, "from base, which lacks the token"),
                           ({"tokens": {"<t>": {"source": {"kind": "model_token", "model": "base", "token": "<none>"}}}},
                            "which lacks that token"),
                           ({"tokens": {"<t>": {"source": {"kind": "model_token", "model": "base", "token_id": 999}}}},
                            "row 999 of base, whose tensor has 320 rows")):
        plan = plan_vocabulary(models, "base", tokenizer_choice(None, block))
        with pytest.raises(WorkbenchError, match=message):
            plan.permute([tensors["base"], tensors["chat"]])


def test_damaged_config_and_short_tensors_are_refused(folders, tmp_path):
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for file in folders["base"].iterdir():
        (damaged / file.name).write_bytes(file.read_bytes())
    config = json.loads((damaged / "config.json").read_text())
    for value, message in ((float("nan"), "vocab_size must be a whole number"), ("320", "vocab_size must be a whole number"),
                           (0, "vocab_size must be a whole number")):
        (damaged / "config.json").write_text(json.dumps({**config, "vocab_size": value}))
        with pytest.raises(WorkbenchError, match=message):
            plan_vocabulary({"d": damaged}, "d", TokenizerChoice("base"))
    plan = plan_vocabulary({"base": folders["base"], "chat": folders["chat"]}, "base", TokenizerChoice("union"))
    with pytest.raises(WorkbenchError, match=r"chat's tokenizer gives '.+' the id 30\d, but its vocabulary tensor has 300 rows"):
        plan.permute([torch.zeros(320, 4), torch.zeros(300, 4)])
    with pytest.raises(WorkbenchError, match="differ beyond the vocabulary axis"):
        plan.permute([torch.zeros(320, 4), torch.zeros(322, 5)])
    with pytest.raises(WorkbenchError, match="could not load the tokenizer"):
        plan_vocabulary({"x": tmp_path}, "x", TokenizerChoice("base"))


def test_chat_template_choice(folders):
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert resolve_chat_template(template, []) == template
    assert resolve_chat_template("auto", [folders["base"], folders["chat"]]) == make_tokenizer().chat_template.strip()
    assert resolve_chat_template(None, []) is None
    with pytest.raises(WorkbenchError, match="mergekit's bundled templates"):
        resolve_chat_template("chatml", [])
    with pytest.raises(WorkbenchError, match="neither auto nor a template"):
        resolve_chat_template("my template", [])
