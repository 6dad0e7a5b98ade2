"""`wb compat` and the check diff, recover and eval run first: every difference it should see, from
configs and headers only, and the one-line refusals. Models here are hand-written folders (zeros,
a few KB) so that no test builds a transformers model; peft, tokenizers and sentencepiece are the
oracles where they say what a file means."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from clicheck import assert_one_error
from click.testing import CliRunner
from conftest import shared_path
from safetensors.torch import save_file
from tiny import as_hub_cache, save_layout

from workbench.cli import wb
from workbench.errors import WorkbenchError
from workbench.io.reader import Checkpoint
from workbench.weights.compat import check_before, compat, sentencepiece_pieces, tokenizer_facts

TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


# -- hand-written folders -----------------------------------------------------------------------------
def llama_state(vocab: int, hidden: int, layers: int, tie: bool, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A Llama checkpoint's tensor names and shapes (zeros: only headers are ever read)."""
    kv, inter = hidden // 2, hidden * 2
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        prefix = f"model.layers.{i}."
        shapes |= {prefix + "self_attn.q_proj.weight": (hidden, hidden), prefix + "self_attn.k_proj.weight": (kv, hidden),
                   prefix + "self_attn.v_proj.weight": (kv, hidden), prefix + "self_attn.o_proj.weight": (hidden, hidden),
                   prefix + "mlp.gate_proj.weight": (inter, hidden), prefix + "mlp.up_proj.weight": (inter, hidden),
                   prefix + "mlp.down_proj.weight": (hidden, inter), prefix + "input_layernorm.weight": (hidden,),
                   prefix + "post_attention_layernorm.weight": (hidden,)}
    shapes["model.norm.weight"] = (hidden,)
    if not tie:
        shapes["lm_head.weight"] = (vocab, hidden)
    return {name: torch.zeros(shape, dtype=dtype) for name, shape in shapes.items()}


def model_folder(path: Path, vocab: int = 40, hidden: int = 16, layers: int = 2, tie: bool = False,
                 dtype: torch.dtype = torch.float32, tokens: int | None = None, added: dict[str, int] | None = None,
                 template: str | None = TEMPLATE, eos: str = "<|im_end|>", layout: str = "safetensors",
                 **config: object) -> Path:
    """A model folder: config.json, weights, tokenizer.json (`tokens` ids), tokenizer_config.json and
    `added` as added_tokens.json (Alpaca's `{"[PAD]": 32000}`)."""
    save_layout(llama_state(vocab, hidden, layers, tie, dtype), path, layout)
    settings = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
                "num_hidden_layers": layers, "vocab_size": vocab, "tie_word_embeddings": tie,
                "torch_dtype": str(dtype).removeprefix("torch."), **config}
    (path / "config.json").write_text(json.dumps(settings))
    count = vocab if tokens is None else tokens
    specials = ["<unk>", "<s>", "</s>", "<|im_end|>"]
    tokenizer = {"version": "1.0", "added_tokens": [{"id": i, "content": t, "special": True} for i, t in enumerate(specials)],
                 "model": {"type": "BPE", "vocab": {**{t: i for i, t in enumerate(specials)},
                                                    **{f"t{i}": i for i in range(len(specials), count)}}, "merges": []}}
    (path / "tokenizer.json").write_text(json.dumps(tokenizer))
    tokenizer_config = {"bos_token": "<s>", "eos_token": eos, "unk_token": "<unk>"}
    if template:
        tokenizer_config["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    if added:
        (path / "added_tokens.json").write_text(json.dumps(added))
    return path


def adapter_folder(path: Path, modules: dict[str, tuple[int, int]], rank: int = 4, base: str | None = None,
                   targets: object = None, saved_rank: int | None = None, **config: object) -> Path:
    """A PEFT LoRA folder: {module: (out, in)} pairs, lora_A (r, in) and lora_B (out, r), as peft saves them."""
    path.mkdir(parents=True)
    state = {}
    for module, (out_features, in_features) in modules.items():
        state[f"base_model.model.{module}.lora_A.weight"] = torch.zeros(saved_rank or rank, in_features)
        state[f"base_model.model.{module}.lora_B.weight"] = torch.zeros(out_features, saved_rank or rank)
    save_file(state, str(path / "adapter_model.safetensors"))
    leaves = sorted({m.rsplit(".", 1)[-1] for m in modules})
    settings = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "base_model_name_or_path": base,
                "target_modules": leaves if targets is None else targets, **config}
    (path / "adapter_config.json").write_text(json.dumps(settings))
    return path


Q = "model.layers.0.self_attn.q_proj"
V = "model.layers.0.self_attn.v_proj"


def run(*args: object):
    return CliRunner().invoke(wb, [str(a) for a in args])


def by_what(result) -> dict[str, object]:
    return {f.what: f for f in result.findings}


def action(result, what: str) -> str:
    return by_what(result)[what].action


# -- two models ---------------------------------------------------------------------------------------------
def test_two_agreeing_models_are_compatible_in_milliseconds(tmp_path):
    first, second = model_folder(tmp_path / "a"), model_folder(tmp_path / "b")
    started = time.perf_counter()
    result = compat(first, second)
    elapsed = time.perf_counter() - started
    assert result.compatible and result.error() is None and elapsed < 0.5, elapsed
    assert {f.action for f in result.findings} == {"ok"}
    assert {"architecture", "hidden size", "layers", "embedding rows", "vocabulary", "tied embeddings", "dtype",
            "chat template", "special tokens", "special token ids", "tensor names"} <= set(by_what(result))
    assert result.lines()[-1] == f"compatible: {len(result.findings)} ok"


@pytest.mark.parametrize(("change", "what", "expected", "usable"), [
    ({"hidden": 32}, "hidden size", "refuse", False),
    ({"layers": 3}, "layers", "refuse", False),
    ({"architectures": ["MistralForCausalLM"], "model_type": "mistral"}, "architecture", "warn", True),
    ({"tie": True}, "tied embeddings", "warn", False),  # and lm_head.weight is on one side only
    ({"dtype": torch.bfloat16}, "dtype", "ok", True),
    ({"template": None}, "chat template", "warn", True),
    ({"eos": "</s>"}, "special tokens", "warn", True),
    ({"eos_token_id": 2}, "special token ids", "warn", True),
    ({"tokens": 44}, "vocabulary", "warn", True),  # the tokenizer has ids the embeddings lack
    ({"vocab_size": 41}, "vocabulary", "warn", True),  # config.json disagrees with the embeddings
])
def test_each_difference_is_found(tmp_path, change, what, expected, usable):
    result = compat(model_folder(tmp_path / "a"), model_folder(tmp_path / "b", **change))
    assert action(result, what) == expected, by_what(result)[what]
    assert result.compatible == usable
    assert any(line.startswith(f"{expected:<6} {what}: ") for line in result.lines())


def test_another_size_is_refused_with_diffs_own_message(tmp_path):
    result = compat(model_folder(tmp_path / "a"), model_folder(tmp_path / "b", hidden=32))
    error = result.error()
    assert error.message == "tensor 'lm_head.weight' has shape [40, 16] in FIRST but [40, 32] in SECOND"  # header order
    assert error.path == str(tmp_path / "a")
    shown = [f for f in result.findings if f.tensor]
    assert len(shown) == 21 and all(f.action == "refuse" for f in shown)  # every tensor, in --json
    assert sum(line.startswith("refuse tensor ") for line in result.lines()) == 8  # the first few on screen


def test_alpaca_32000_vs_32001_rows_is_a_resize_with_alpacas_rule(tmp_path):
    """LLaMA's 32000 tokens against Alpaca's 32001 ([PAD] in added_tokens.json): grown, not refused."""
    llama = model_folder(tmp_path / "llama", vocab=32000, hidden=4, layers=1)
    alpaca = model_folder(tmp_path / "alpaca", vocab=32001, hidden=4, layers=1, tokens=32000, added={"[PAD]": 32000})
    result = compat(llama, alpaca)
    assert result.compatible
    rows = by_what(result)["embedding rows"]
    assert (rows.first, rows.second, rows.action) == (32000, 32001, "resize")
    assert "[PAD]" in rows.why and "mean of the existing rows" in rows.why
    assert action(result, "vocabulary") == "ok"  # each folder agrees with itself: 32001 ids need 32001 rows
    assert by_what(result)["vocabulary"].second == {"rows": 32001, "config": 32001, "tokenizer": 32001}
    assert {f.what for f in result.findings if f.action == "resize"} == {
        "embedding rows", "tensor model.embed_tokens.weight", "tensor lm_head.weight"}
    backwards = compat(alpaca, llama)
    assert action(backwards, "embedding rows") == "refuse"
    assert "has shape [32001, 4] in FIRST but [32000, 4] in SECOND" in backwards.error().message
    assert check_before("diff", llama, alpaca) == []  # the resize is diff's own line, not a warning


def test_a_renamed_or_missing_tensor_is_refused(tmp_path):
    first = model_folder(tmp_path / "a")
    second = model_folder(tmp_path / "b", tie=True)  # no lm_head.weight
    result = compat(first, second)
    assert result.error().message == "1 tensor(s) in FIRST are not in SECOND: lm_head.weight"
    assert by_what(result)["tensor lm_head.weight"].why == "only in FIRST"


def test_no_tensor_data_is_read(tmp_path, monkeypatch):
    def refuse(self, name):
        raise AssertionError(f"tensor {name} was read")

    monkeypatch.setattr(Checkpoint, "tensor", refuse)
    base = model_folder(tmp_path / "a", layout="bin")
    tuned = model_folder(tmp_path / "b", vocab=41)
    adapter = adapter_folder(tmp_path / "lora", {Q: (16, 16)})
    assert compat(base, tuned).compatible and compat(base, adapter).compatible
    for purpose, second in (("diff", tuned), ("merge", adapter), ("eval", adapter), ("recover", tuned)):
        check_before(purpose, base, second)


# -- a model and an adapter -------------------------------------------------------------------------------
def test_an_adapter_that_fits_in_either_order(tmp_path):
    model = model_folder(tmp_path / "llama")
    adapter = adapter_folder(tmp_path / "lora", {Q: (16, 16), V: (8, 16)}, base=str(tmp_path / "llama"))
    for result in (compat(model, adapter), compat(adapter, model)):
        assert result.compatible and result.first["kind"] == "model" and result.second["kind"] == "adapter"
        assert action(result, "base model") == "ok" and action(result, "adapter tensors") == "ok"
        assert by_what(result)["target modules"].why == "every target module is in the model"


def test_an_adapter_for_another_base(tmp_path):
    model = model_folder(tmp_path / "llama")
    named = adapter_folder(tmp_path / "named", {Q: (16, 16)}, base="meta-llama/Llama-2-7b-hf")
    result = compat(model, named)
    assert result.compatible and action(result, "base model") == "warn"  # a name only: the tensors fit
    assert check_before("merge", model, named)[0].startswith("note: base model: ")
    wider = adapter_folder(tmp_path / "wider", {Q: (32, 32)}, base="meta-llama/Llama-2-7b-hf")
    error = compat(model, wider).error()
    assert error.message == ("shape mismatch for 'model.layers.0.self_attn.q_proj.weight': the adapter's delta is "
                             "[32, 32], the base tensor is [16, 16] (adapter made for another base?)")
    assert error.path == str(tmp_path / "wider")


def test_an_adapter_whose_module_does_not_exist_or_whose_rank_lies(tmp_path):
    model = model_folder(tmp_path / "llama")
    deeper = adapter_folder(tmp_path / "deeper", {"model.layers.5.self_attn.q_proj": (16, 16)})
    assert compat(model, deeper).error().message.startswith(
        "adapter targets module 'model.layers.5.self_attn.q_proj' but the base has no tensor")
    lying = adapter_folder(tmp_path / "lying", {Q: (16, 16)}, rank=8, saved_rank=4)
    assert "but the config gives it rank 8" in compat(model, lying).error().message
    nowhere = adapter_folder(tmp_path / "nowhere", {Q: (16, 16)}, targets=["c_attn"])
    result = compat(model, nowhere)
    assert result.error().message.startswith("adapter was made for another base: its target_modules ('c_attn')")
    assert action(result, "adapter tensors") == "ok"  # wb merge goes by tensors, so merge only warns
    assert check_before("merge", model, nowhere)[0].startswith("note: target modules: ")
    with pytest.raises(WorkbenchError, match="its target_modules"):
        check_before("eval", model, nowhere)


def test_a_regular_expression_target_is_compiled_never_matched(tmp_path):
    """A string target_modules is a regex peft matches at load; a crafted one could backtrack for hours here."""
    model = model_folder(tmp_path / "llama")
    for pattern in (r".*\.q_proj", "(.*)*(.*)*(.*)*x"):
        adapter = adapter_folder(tmp_path / f"lora{len(pattern)}", {Q: (16, 16)}, targets=pattern)
        started = time.perf_counter()
        assert action(compat(model, adapter), "target modules") == "ok"
        assert time.perf_counter() - started < 1


def test_variants_are_refused_by_merge_only(tmp_path):
    model = model_folder(tmp_path / "llama")
    biased = adapter_folder(tmp_path / "biased", {Q: (16, 16)}, lora_bias=True)
    assert check_before("eval", model, biased) == []  # peft applies it
    result = compat(model, biased)
    assert result.compatible and action(result, "adapter type") == "warn"
    with pytest.raises(WorkbenchError, match=r"refusing to merge a LoRA bias \(lora_bias\)"):
        check_before("merge", model, biased)


def test_tied_embeddings_keep_lm_head_as_a_module(tmp_path):
    model = model_folder(tmp_path / "tied", tie=True)
    adapter = adapter_folder(tmp_path / "lora", {Q: (16, 16)}, targets=["lm_head"])
    assert action(compat(model, adapter), "target modules") == "ok"  # peft finds the tied lm_head module


def test_adapter_tokenizer_vocabulary(tmp_path):
    model = model_folder(tmp_path / "llama")
    adapter = adapter_folder(tmp_path / "lora", {Q: (16, 16)})
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model / name, adapter / name)
    (adapter / "added_tokens.json").write_text(json.dumps({"[PAD]": 40}))
    result = compat(model, adapter)
    assert action(result, "vocabulary") == "warn"  # id 40 has no row in the model
    assert (by_what(result)["vocabulary"].first, by_what(result)["vocabulary"].second) == (40, 41)
    assert check_before("eval", model, adapter) == [
        "note: vocabulary: 40 vs 41: lm-eval resizes the model's embeddings from 40 to the adapter tokenizer's 41 "
        "tokens before it applies the adapter"]


# -- hub cache, relative paths, the CLI -------------------------------------------------------------------
def test_hub_cache_snapshot_and_relative_paths(tmp_path, monkeypatch):
    snapshot = as_hub_cache(model_folder(tmp_path / "plain"), tmp_path / "hub", repo_id="wb-test/tiny-llama")
    adapter_folder(tmp_path / "work" / "lora", {Q: (16, 16)}, base="wb-test/tiny-llama")
    monkeypatch.chdir(tmp_path / "work")
    relative = Path("..") / snapshot.relative_to(tmp_path)
    result = run("compat", relative, "lora", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    base = next(f for f in report["findings"] if f["what"] == "base model")
    assert base["action"] == "ok" and "wb-test/tiny-llama" in base["first"]
    assert report["first"]["path"] == str(relative) and report["compatible"] is True
    monkeypatch.chdir(snapshot)
    result = run("compat", ".", "../../../../work/lora")
    assert result.exit_code == 0, result.output
    assert "ok     base model: " in result.stdout and result.stdout.rstrip().splitlines()[-1].startswith("compatible: ")


def test_cli_json_and_exit_code(tmp_path):
    first, second = model_folder(tmp_path / "a"), model_folder(tmp_path / "b", layers=3)
    result = run("compat", first, second, "--json")
    report = json.loads(result.stdout)
    assert report["compatible"] is False and report["counts"]["refuse"] >= 1
    assert {"what", "first", "second", "action", "why"} == set(report["findings"][0])
    assert_one_error(result, "9 tensor(s) in SECOND are missing from FIRST: model.layers.2.", f"({first})")
    text = run("compat", first, second)
    assert "refuse layers: 2 vs 3: " in text.stdout and text.stdout.rstrip().splitlines()[-1].startswith("refused: ")
    assert_one_error(text, "are missing from FIRST")


# -- hostile files: one line each ---------------------------------------------------------------------------
@pytest.mark.parametrize(("file", "text", "fragment"), [
    ("config.json", "{not json", "config.json is not valid JSON"),
    ("config.json", json.dumps({"hidden_size": 2**40}), "config.json's hidden_size must be a whole number"),
    ("config.json", json.dumps({"vocab_size": float("nan")}), "vocab_size must be a whole number"),
    ("adapter_config.json", "[1, 2]", "adapter config is not a JSON object"),
    ("adapter_config.json", json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": float("inf")}), "lora_alpha must be"),
    ("adapter_config.json", json.dumps({"peft_type": "LORA", "r": 4, "target_modules": {"q": 1}}), "target_modules must"),
    ("adapter_config.json", json.dumps({"peft_type": "LORA", "r": 4, "target_modules": "q_proj("}), "not a valid regular"),
])
def test_hostile_config_files_are_one_line(tmp_path, file, text, fragment):
    model = model_folder(tmp_path / "llama")
    adapter = adapter_folder(tmp_path / "lora", {Q: (16, 16)})
    (model if file == "config.json" else adapter).joinpath(file).write_text(text)
    assert_one_error(run("compat", model, adapter), fragment)


@pytest.mark.parametrize(("file", "text"), [
    ("tokenizer.json", "{not json"),
    ("tokenizer.json", json.dumps({"model": {"vocab": {"a": -1}}})),
    ("added_tokens.json", json.dumps({"[PAD]": 2**40})),
    ("tokenizer_config.json", json.dumps({"added_tokens_decoder": {"x": {}}})),
    ("tokenizer.model", "not a protobuf \xff\xff\xff"),
])
def test_hostile_tokenizer_files_are_one_warning(tmp_path, file, text):
    """No weight command reads tokenizer files, so a broken one is a warning, never a refusal of diff."""
    first, second = model_folder(tmp_path / "a"), model_folder(tmp_path / "b")
    if file == "tokenizer.model":
        (second / "tokenizer.json").unlink()
    (second / file).write_text(text)
    notes = check_before("diff", first, second)
    assert len(notes) == 1 and notes[0].startswith("note: tokenizer files: ok vs unreadable: ")
    assert notes[0].endswith(f"({second / file}); they are not compared")
    result = run("compat", first, second)
    assert result.exit_code == 0 and "warn   tokenizer files: ok vs unreadable: " in result.stdout


def test_a_broken_config_is_a_warning_for_diff_which_never_reads_it(tmp_path):
    first, second = model_folder(tmp_path / "a"), model_folder(tmp_path / "b")
    (second / "config.json").write_text("{not json")
    assert check_before("diff", first, second) == [
        "note: config.json: ok vs unreadable: config.json is not valid JSON: Expecting property name enclosed in "
        f"double quotes: line 1 column 2 (char 1) ({second / 'config.json'}); its settings are not compared"]


# -- recover: RAW against a diff ----------------------------------------------------------------------------
def test_recover_compares_raw_with_the_recorded_base(tmp_path):
    base, tuned = model_folder(tmp_path / "base"), model_folder(tmp_path / "tuned", vocab=42)
    assert run("diff", "--base", base, "--tuned", tuned, "--out", tmp_path / "diff").exit_code == 0
    result = compat(base, tmp_path / "diff")
    assert result.compatible and result.second["kind"] == "wb diff"
    assert {f.what for f in result.findings if f.action == "resize"} == {"tensor model.embed_tokens.weight",
                                                                          "tensor lm_head.weight"}
    other = model_folder(tmp_path / "other", hidden=32)
    error = compat(other, tmp_path / "diff").error()
    assert error.message == ("RAW is not the base this diff was made from: tensor 'lm_head.weight' has shape "
                             "[40, 32] in RAW, [40, 16] in the base this diff was made from")
    half = model_folder(tmp_path / "half", dtype=torch.bfloat16)
    notes = check_before("recover", half, tmp_path / "diff")
    assert len(notes) == 1 and notes[0].startswith("note: dtype: [bfloat16] vs [float32]: 21 of RAW's tensors")


def test_recover_of_another_tools_diff_skips_rotary_buffers(tmp_path):
    raw = model_folder(tmp_path / "raw")
    diff = model_folder(tmp_path / "diff", vocab=41)
    state = llama_state(41, 16, 2, False, torch.float32) | {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(4)}
    save_layout(state, diff, "bin")
    (diff / "model.safetensors").unlink()
    result = compat(raw, diff)  # as two models: the buffer is a tensor RAW lacks
    assert not result.compatible
    assert check_before("recover", raw, diff) == []
    state["model.norm.weight"] = torch.zeros(16, dtype=torch.int32)
    save_layout(state, diff, "bin")
    with pytest.raises(WorkbenchError, match="is int32 in DIFF but float32 in RAW; a weight diff adds like to like"):
        check_before("recover", raw, diff)


# -- the commands: refused before any weight work, in one line ------------------------------------------------
def test_diff_and_recover_refuse_an_incompatible_pair_first(tmp_path, monkeypatch):
    import workbench.weights.diff as diff_module
    import workbench.weights.recover as recover_module

    def too_late(path):
        raise AssertionError("the command opened its inputs: the check did not run first")

    base, other = model_folder(tmp_path / "base"), model_folder(tmp_path / "other", layers=3)
    monkeypatch.setattr(diff_module, "open_checkpoint", too_late)
    monkeypatch.setattr(recover_module, "open_checkpoint", too_late)
    assert_one_error(run("diff", "--base", base, "--tuned", other, "--out", tmp_path / "d"),
                     "9 tensor(s) in TUNED are missing from RAW: model.layers.2.", f"({base})")
    assert_one_error(run("recover", "--base", base, "--diff", other, "--out", tmp_path / "r"),
                     "9 tensor(s) in DIFF are missing from RAW: model.layers.2.")
    assert not (tmp_path / "d").exists() and not (tmp_path / "r").exists()


def test_eval_refuses_an_adapter_peft_cannot_apply_before_loading(tmp_path):
    model = model_folder(tmp_path / "llama")
    adapter = adapter_folder(tmp_path / "lora", {Q: (16, 16)}, targets=["c_attn"])
    (tmp_path / "gen.jsonl").write_text('{"content": "a", "summary": "b"}\n')
    result = run("eval", "--model", model, "--adapter", adapter, "--gen-data", tmp_path / "gen.jsonl",
                 "--out", tmp_path / "R.json")
    assert_one_error(result, "adapter was made for another base: its target_modules ('c_attn') name no module",
                     f"({adapter / 'adapter_config.json'})")
    assert not (tmp_path / "R.json").exists()


# -- oracles: what the libraries say the files mean ---------------------------------------------------------
def test_peft_refuses_what_compat_refuses(tmp_path, tiny_model):
    """peft itself (PeftModel.from_pretrained) refuses the adapters compat refuses, and loads the one it passes."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    hidden = json.loads((tiny_model / "config.json").read_text())["hidden_size"]
    good = adapter_folder(tmp_path / "good", {Q: (hidden, hidden), "model.layers.1.self_attn.q_proj": (hidden, hidden)})
    nowhere = adapter_folder(tmp_path / "nowhere", {Q: (hidden, hidden)}, targets=["c_attn"])
    wider = adapter_folder(tmp_path / "wider", {Q: (2 * hidden, 2 * hidden)})
    assert compat(tiny_model, good).compatible
    assert not compat(tiny_model, nowhere).compatible and not compat(tiny_model, wider).compatible
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    PeftModel.from_pretrained(model, good)
    for refused, message in ((nowhere, "not found in the base model"), (wider, "size mismatch")):
        with pytest.raises((ValueError, RuntimeError), match=message):
            PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), refused)


def test_token_counts_agree_with_the_tokenizers_library():
    """Llama-3's tokenizer.json: 128,000 BPE tokens and 256 added specials."""
    from tokenizers import Tokenizer

    folder = shared_path("tokenizers", "llama3")
    facts = tokenizer_facts(folder)
    assert facts.problem is None
    assert facts.tokens == Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size(with_added_tokens=True)


def test_sentencepiece_piece_count_agrees_with_sentencepiece(tmp_path):
    import sentencepiece

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"the quick brown fox {i} jumps over the lazy dog {i * 7}" for i in range(200)))
    sentencepiece.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=60,
                                             model_type="bpe", minloglevel=3)
    processor = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    assert sentencepiece_pieces(tmp_path / "sp.model") == processor.get_piece_size() == 60
    truncated = tmp_path / "cut.model"
    truncated.write_bytes((tmp_path / "sp.model").read_bytes()[:-3])
    with pytest.raises(WorkbenchError, match="tokenizer.model is truncated"):
        sentencepiece_pieces(truncated)
