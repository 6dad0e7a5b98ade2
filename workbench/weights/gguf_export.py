"""`wb export-gguf`: write a Hugging Face Llama or Qwen2 folder as one GGUF file, for llama.cpp and ollama.

The reverse of `wb import-gguf`. What the file holds follows llama.cpp's `convert_hf_to_gguf.py`, which
is what llama.cpp, ollama and transformers' GGUF loader expect (docs/export-gguf.md has the mapping):

* `general.*`, then the hyper-parameters under the architecture's prefix (`llama.block_count`, ...);
* the tokenizer (byte-level BPE: tokens, token types, merges, special ids, add_bos/add_eos, chat
  template; see gguf_tokenizer.py);
* the tensors under GGUF names (gguf's own TensorNameMap), the Llama attention's q/k rows permuted
  from Hugging Face's rotate-half order to GGML's adjacent pairs (Qwen2 keeps HF's order: llama.cpp
  runs it with NeoX-style RoPE); no `output.weight` when the embeddings are tied.

Tensors are streamed: every tensor's name, shape and type goes into the header first (the gguf
package's GGUFWriter with `add_tensor_info`), then each tensor is read from the memory-mapped
checkpoint, converted and written (`write_tensor_data`) before the next is read, so memory stays
about that of the largest tensor. The file is written as a temporary beside FILE.gguf and renamed
into place when complete; the `Modelfile` and `export.json` beside it follow (export.json last).

With `check` (`--check`), `check_round_trip` then loads the written file with transformers' GGUF
loader and the source folder, both in float32, runs both on one chat-template probe and compares
the logits against the outtype's bound (CHECK_BOUNDS); export.json records the figures. A failed
check keeps the file (it is a valid GGUF: the check is what failed) and `wb` exits 1.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from workbench.errors import CheckFailed, WorkbenchError
from workbench.io.jsonfile import read_model_config
from workbench.io.paths import hub_snapshot
from workbench.outputs import Note, atomic_file, check_can_write, check_not_input

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
MODEL_TYPES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
FLOAT_DTYPES = ("float32", "float16", "bfloat16")
Q8_0_BLOCK = 32
QUANT_CHUNK = 1 << 24  # elements quantized at once (64 MiB of float32)
MODELFILE = "Modelfile"
RECORD = "export.json"
# --check: the largest max |GGUF logit - source logit| / max |source logit| each outtype may show.
# Measured on CHECK_PROBE (the tests' tiny model / SmolLM2-135M-Instruct): f32 0 / 0, f16 4.4e-4 /
# 1.1e-3 (the demo's fine-tuned SmolLM2: 1.4e-3), bf16 3.3e-3 / 7.3e-3, q8_0 8.8e-3 / 3.5e-2; a broken
# export (Llama q/k rows left unpermuted, f16) gives 0.82 on SmolLM2, 1.4e-2 on the tiny model. The
# bounds leave 3-5x over the larger measured figure.
CHECK_BOUNDS = {"f32": 1e-5, "f16": 5e-3, "bf16": 3e-2, "q8_0": 1e-1}
CHECK_PROBE = "What is the capital of France?"  # one user message, in the model's chat template
CHECK_FALLBACK = "The quick brown fox jumps over the lazy dog."  # without a chat template: this text


@dataclass
class ExportResult:
    out: str
    modelfile: str
    record: str
    source: str
    architecture: str  # the GGUF architecture: llama, qwen2
    hf_architecture: str
    outtype: str
    file_type: int  # general.file_type (llama.cpp's LlamaFileType)
    tensors: int
    parameters: int
    tensor_types: dict[str, int]  # GGML type name -> tensor count
    bytes: int
    sha256: str
    tied_embeddings: bool
    tokenizer: dict
    template: str | None  # the Modelfile's TEMPLATE: chatml, llama3, or None
    stop: list[str]
    system: str | None
    system_source: str
    notes: list[str] = field(default_factory=list)
    duration_s: float = 0.0
    check: dict | None = None  # check_round_trip's figures, with --check

    def to_json(self) -> dict:
        return asdict(self)

    def error(self) -> CheckFailed | None:
        """With --check: the failed round trip (a FAILED line, exit 1; the file stays), else None."""
        if self.check is None or self.check["ok"]:
            return None
        return CheckFailed(self.check["failures"], self.out)

    def lines(self) -> list[str]:
        """The summary (stdout), then one `note:` line per note (a Note: stderr)."""
        types = ", ".join(f"{name} {count}" for name, count in sorted(self.tensor_types.items(), key=lambda kv: -kv[1]))
        tok = self.tokenizer
        system = f"SYSTEM from {self.system_source}" if self.system is not None else "no SYSTEM"
        template = f"TEMPLATE {self.template}" if self.template else "no TEMPLATE"
        stops = ", ".join(self.stop) if self.stop else "none"
        return [
            f"wrote {self.out}: {self.architecture} ({self.hf_architecture}), {self.parameters / 1e6:.1f}M parameters in "
            f"{self.tensors} tensors ({types}), {self.bytes / 1e6:.1f} MB, {self.outtype}"
            f"{', tied embeddings' if self.tied_embeddings else ''}, in {self.duration_s:.1f} s",
            f"tokenizer: {tok['model']}/{tok['pre']}, {tok['tokens']:,} tokens, {tok['merges']:,} merges, "
            f"add_bos {'yes' if tok['add_bos_token'] else 'no'}, chat template {'yes' if tok['chat_template'] else 'no'}",
            f"{self.modelfile}: {template}, PARAMETER stop {stops}, {system}",
            f"{self.record}: sha256 {self.sha256}",
        ] + ([check_line(self.check, self.out)] if self.check is not None else []) + [
            Note(f"note: {note}") for note in self.notes]


@dataclass(frozen=True)
class Spec:
    """The hyper-parameters, checked, that decide the tensor shapes and the GGUF keys."""

    arch: str
    hf_arch: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    context: int
    vocab: int
    eps: float
    theta: float
    tied: bool
    qkv_bias: bool
    rope: dict  # rope scaling: {"type": "default" | "linear" | "yarn" | "llama3", ...}


@dataclass
class Planned:
    """One tensor of the output: where it comes from, what it becomes."""

    name: str  # GGUF name
    source: str | None  # checkpoint name; None for a computed tensor (rope_freqs)
    shape: tuple[int, ...]  # numpy order (GGUF's header reverses it)
    ggml_type: object  # gguf.GGMLQuantizationType
    permute_heads: int = 0  # rows permuted for GGML's RoPE, in this many heads
    data: object = None  # a computed tensor

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def export_gguf(model_dir, out, outtype: str = "f16", force: bool = False, command: str | None = None,
                check: bool = False) -> ExportResult:
    """Write `model_dir` (a Llama or Qwen2 HF folder) as the GGUF file `out`, with a Modelfile and export.json.

    With `check`, the written file is loaded back with transformers and compared with the source
    (`check_round_trip`) before export.json is written; the result's `check` holds the figures and
    its `error()` the failure, if any (the files are written either way).
    """
    import gguf

    from workbench.io.reader import open_checkpoint

    started = time.perf_counter()
    model_dir, out = Path(model_dir), Path(out)
    if outtype not in OUTTYPES:
        raise WorkbenchError(f"unknown --outtype {outtype!r}; use one of {', '.join(OUTTYPES)}")
    if out.suffix.lower() != ".gguf":
        raise WorkbenchError("--out must name a .gguf file", out)
    config = read_model_config(model_dir, "export-gguf needs config.json, tokenizer.json and the weights")
    config_path = model_dir / "config.json"
    spec = read_spec(config, config_path)
    notes: list[str] = []
    if spec.rope["type"] != "default":
        notes.append(f"RoPE scaling {spec.rope['type']!r} is written as llama.cpp reads it; transformers' GGUF loader "
                     "ignores it, so a transformers round trip runs without it")

    modelfile, record = out.parent / MODELFILE, out.parent / RECORD
    for target in (out, modelfile, record):
        check_not_input(target, [model_dir])
        check_can_write(target, force)

    with open_checkpoint(model_dir) as checkpoint:
        plan = plan_tensors(spec, checkpoint, outtype, gguf)  # headers only: refuse a wrong folder early
        return _export(model_dir, out, outtype, force, command, gguf, config, config_path, spec, notes,
                       modelfile, record, checkpoint, plan, started, check)


def _export(model_dir: Path, out: Path, outtype: str, force: bool, command: str | None, gguf, config: dict,
            config_path: Path, spec: Spec, notes: list[str], modelfile: Path, record: Path, checkpoint,
            plan: list[Planned], started: float, check: bool = False) -> ExportResult:
    from workbench import provenance
    from workbench.io.hashing import sha256_file
    from workbench.progress import progress_bar
    from workbench.weights.gguf_modelfile import (
        modelfile_text,
        quotable,
        recognise,
        stop_quotable,
        stop_tokens,
        training_system,
    )
    from workbench.weights.gguf_tokenizer import read_vocab

    vocab = read_vocab(model_dir, spec.vocab, config)
    if vocab.padded:
        notes.append(f"{vocab.padded:,} embedding rows have no token in tokenizer.json; written as [PAD<id>] (unused)")

    # the Modelfile, decided before anything is written
    special = {kind: vocab.token(kind) for kind in ("bos", "eos", "unk", "pad")}
    recognised = recognise(vocab.chat_template, special, set(vocab.tokens), vocab.add_bos)
    if recognised.format is None and vocab.chat_template is not None:
        notes.append(f"the chat template is not one export-gguf can render as an ollama template ({recognised.reason}); "
                     "the Modelfile has no TEMPLATE (ollama falls back to the GGUF's own chat template or the bare prompt)")
    chosen = training_system(model_dir)
    notes += chosen.notes
    system, system_source = chosen.text, chosen.source
    if system is None and recognised.default_system:
        system, system_source = recognised.default_system, "the chat template's default"
    if system is not None and not quotable(system):
        notes.append('the system message contains """, which a Modelfile cannot quote; SYSTEM left out')
        system, system_source = None, "none"
    stops = [s for s in stop_tokens(recognised, vocab.token("eos")) if stop_quotable(s)]

    fingerprints = provenance.weight_fingerprints(model_dir)
    extra_files = [config_path] + vocab.files
    for name in ("generation_config.json", "special_tokens_map.json"):
        if (model_dir / name).is_file():
            extra_files.append(model_dir / name)
    metadata_hashes = provenance.file_fingerprints(model_dir, extra_files)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]
    total = sum(_nbytes(p, gguf) for p in plan)
    with atomic_file(out, force, "wb", inputs=[model_dir]) as handle:
        tmp = Path(handle.name)
        writer = gguf.GGUFWriter(tmp, spec.arch)
        try:
            _add_metadata(writer, spec, model_dir, int(file_type), gguf)
            vocab.add_to(writer)
            for item in plan:
                _add_info(writer, item, gguf)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            with progress_bar(total, f"export-gguf {out.name}") as bar:
                for item in plan:
                    array = _produce(item, checkpoint, gguf)
                    writer.write_tensor_data(array)
                    bar.update(array.nbytes)
                    del array
        finally:
            writer.close()
        size = tmp.stat().st_size
        sha256 = sha256_file(tmp)

    counts: dict[str, int] = {}
    for item in plan:
        counts[item.ggml_type.name] = counts.get(item.ggml_type.name, 0) + 1
    result = ExportResult(
        out=str(out), modelfile=str(modelfile), record=str(record), source=str(model_dir), architecture=spec.arch,
        hf_architecture=spec.hf_arch, outtype=outtype, file_type=int(file_type), tensors=len(plan),
        parameters=sum(p.numel for p in plan), tensor_types=counts, bytes=size, sha256=sha256, tied_embeddings=spec.tied,
        tokenizer=vocab.summary(), template=recognised.format.name if recognised.format else None, stop=stops,
        system=system, system_source=system_source, notes=notes,
    )
    text = modelfile_text(out.name, recognised, system, stops, str(model_dir))
    with atomic_file(modelfile, force, "w", inputs=[model_dir]) as handle:
        handle.write(text)
    result.duration_s = round(time.perf_counter() - started, 2)
    if check:
        from transformers.utils import logging as transformers_logging

        bars = transformers_logging.is_progress_bar_enabled()
        transformers_logging.disable_progress_bar()  # its "Loading weights" bars around the check's line
        try:
            result.check = check_round_trip(model_dir, out, outtype)
        finally:
            if bars:
                transformers_logging.enable_progress_bar()
    entry = {
        "command": command if command is not None else provenance.command_line(),
        "source": {"path": str(model_dir), "architecture": spec.hf_arch, "files_sha256": fingerprints,
                   "metadata_sha256": metadata_hashes},
        "output": {"file": out.name, "sha256": sha256, "bytes": size, "outtype": outtype, "file_type": int(file_type),
                   "architecture": spec.arch, "tensors": len(plan), "tensor_types": counts,
                   "parameters": result.parameters, "tied_embeddings": spec.tied},
        "tokenizer": result.tokenizer,
        "modelfile": {"file": modelfile.name, "template": result.template, "stop": stops, "system": system,
                      "system_source": system_source},
        "notes": notes,
        **({"check": result.check} if result.check is not None else {}),
        "versions": provenance.versions(("torch", "transformers", "gguf")),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "duration_s": result.duration_s,
    }
    with atomic_file(record, force, "w", inputs=[model_dir]) as handle:
        handle.write(json.dumps(entry, indent=2, ensure_ascii=False) + "\n")
    return result


# ----- the round-trip check (--check) --------------------------------------------------------


def check_round_trip(model_dir, gguf_file, outtype: str) -> dict:
    """Load `gguf_file` with transformers and `model_dir`, both float32, and compare them on one probe.

    The probe is CHECK_PROBE as one user message in the source tokenizer's chat template (with the
    generation prompt), else CHECK_FALLBACK as plain text. Both models get the same token ids; the
    figure is max |GGUF logit - source logit| over every position and token, relative to the largest
    |source logit|, against CHECK_BOUNDS[outtype]. Also recorded: whether the greedy next token (the
    argmax at the last position) is the same, at how many positions the argmax agrees, and whether
    the GGUF's own tokenizer (as transformers builds it) encodes the probe to the same ids. Fails
    (`ok` false, one line per failure in `failures`) on a bound exceeded, a tokenizer that differs,
    or a file transformers cannot load. The models are loaded one after the other, so memory peaks at
    one float32 copy of the model (plus transformers' own reading of the file).

    A source with RoPE scaling is run without it, as transformers' GGUF loader runs the file (it
    ignores the scaling keys llama.cpp reads); a note says so.
    """
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    model_dir, gguf_file = Path(model_dir), Path(gguf_file)
    check = {"ok": False, "loader": f"transformers {transformers.__version__}", "file": str(gguf_file),
             "outtype": outtype, "probe": None, "probe_tokens": None, "bound": CHECK_BOUNDS[outtype],
             "max_abs_diff": None, "max_abs_source": None, "relative": None, "greedy_next_token_agrees": None,
             "greedy_positions_agree": None, "tokenizer_ids_agree": None, "notes": [], "failures": [],
             "duration_s": 0.0}

    def failed(what: str, exc: Exception) -> dict:
        message = str(exc).strip().splitlines()
        check["failures"].append(f"{what}: {type(exc).__name__}: {message[0] if message else 'no message'}")
        check["duration_s"] = round(time.perf_counter() - started, 2)
        return check

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        ids, check["probe"] = _probe_ids(tokenizer)
        check["probe_tokens"] = int(ids.shape[1])
        config = AutoConfig.from_pretrained(model_dir)
        if _drop_rope_scaling(config):
            check["notes"].append("RoPE scaling left out of the source too: transformers' GGUF loader runs the file "
                                  "without it")
        source = AutoModelForCausalLM.from_pretrained(model_dir, config=config, dtype=torch.float32).eval()
        with torch.no_grad():
            reference = source(ids).logits[0].float()
        del source
    except Exception as exc:  # noqa: BLE001 - the check could not run: it failed, with transformers' words
        return failed(f"transformers cannot run the source folder {model_dir}", exc)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name,
                                                      dtype=torch.float32).eval()
        with torch.no_grad():
            got = loaded(ids).logits[0].float()
        del loaded
        loaded_tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    except Exception as exc:  # noqa: BLE001 - whatever the loader raises, the check failed with its words
        return failed(f"transformers cannot load {gguf_file.name}", exc)
    bound, probe = check["bound"], check["probe"]
    if bool(torch.isfinite(reference).all()):
        check["max_abs_source"] = float(reference.abs().max())
    if got.shape != reference.shape:
        check["failures"].append(f"the GGUF model's logits have shape {list(got.shape)}, the source's "
                                 f"{list(reference.shape)}")
    elif check["max_abs_source"] is None or not bool(torch.isfinite(got).all()):
        check["failures"].append(f"the logits of {'the source' if check['max_abs_source'] is None else 'the GGUF model'}"
                                 " are not all finite")
    else:
        diff = float((got - reference).abs().max())
        largest = check["max_abs_source"]
        relative = diff / largest if largest > 0 else (0.0 if diff == 0 else math.inf)
        agree = got.argmax(-1) == reference.argmax(-1)
        check.update(max_abs_diff=diff, relative=relative if math.isfinite(relative) else None,
                     greedy_next_token_agrees=bool(agree[-1]), greedy_positions_agree=int(agree.sum()))
        if not relative <= bound:
            check["failures"].append(
                f"the {outtype} export's logits (loaded by transformers) differ from the source's by "
                f"{relative:.2e} of the largest, above the {outtype} bound {bound:.0e} "
                f"(max |diff| {diff:.4g}, max |logit| {largest:.4g}); {gguf_file.name} is kept")
    try:
        encoded = _probe_ids(loaded_tokenizer, probe)[0].tolist()
    except Exception as exc:  # noqa: BLE001 - the file's chat template does not render the probe
        encoded = None
        check["failures"].append(f"the tokenizer transformers reads from {gguf_file.name} cannot encode the probe: "
                                 f"{type(exc).__name__}")
    else:
        if encoded != ids.tolist():
            check["failures"].append(f"the tokenizer transformers reads from {gguf_file.name} encodes the probe "
                                     f"({probe}) to other ids than the source's tokenizer")
    check["tokenizer_ids_agree"] = encoded == ids.tolist()
    check["ok"] = not check["failures"]
    check["duration_s"] = round(time.perf_counter() - started, 2)
    return check


def _probe_ids(tokenizer, probe: str | None = None):
    """(ids [1, n], how they were made): CHECK_PROBE in the chat template, else CHECK_FALLBACK as text."""
    if probe in (None, "chat template") and getattr(tokenizer, "chat_template", None):
        try:
            encoded = tokenizer.apply_chat_template([{"role": "user", "content": CHECK_PROBE}],
                                                    add_generation_prompt=True, return_dict=True,
                                                    return_tensors="pt")
            return encoded["input_ids"], "chat template"
        except Exception:  # noqa: BLE001 - a template that does not render one user message: plain text
            if probe is not None:
                raise
    return tokenizer(CHECK_FALLBACK, return_tensors="pt")["input_ids"], "text"


def _drop_rope_scaling(config) -> bool:
    """Reset a config's RoPE scaling to the default (keeping theta); True where there was one."""
    parameters = getattr(config, "rope_parameters", None)
    if isinstance(parameters, dict) and parameters.get("rope_type", "default") != "default":
        config.rope_parameters = {"rope_type": "default", "rope_theta": parameters.get("rope_theta", 10000.0)}
        return True
    scaling = getattr(config, "rope_scaling", None)
    if isinstance(scaling, dict) and (scaling.get("rope_type") or scaling.get("type") or "default") != "default":
        config.rope_scaling = None
        return True
    return False


def check_line(check: dict, out: str) -> str:
    """The `check:` line of the summary (its failures follow as FAILED lines, from `error()`)."""
    name = Path(out).name
    if check["relative"] is None:
        return f"check: FAILED: {check['failures'][0]}"
    relative, bound = check["relative"], check["bound"]
    logits = (f"logits match the source within {relative:.1e} of the largest (bound {bound:.0e})" if relative <= bound
              else f"logits differ from the source by {relative:.1e} of the largest (bound {bound:.0e})")
    agree, positions = check["greedy_positions_agree"], check["probe_tokens"]
    greedy = "greedy tokens agree" if agree == positions else (
        f"greedy tokens agree at {agree} of {positions} positions"
        f" ({'the next token too' if check['greedy_next_token_agrees'] else 'not the next token'})")
    tokenizer = "its tokenizer gives the same ids" if check["tokenizer_ids_agree"] else \
        "its tokenizer encodes the probe differently"
    return (f"check: transformers loads {name}; {logits}, {greedy}, {tokenizer}"
            f"{'' if check['ok'] else ': FAILED'}")


# ----- the hyper-parameters ------------------------------------------------------------------


def read_spec(config: dict, path: Path) -> Spec:
    """The checked hyper-parameters of a Llama or Qwen2 config.json; anything else is refused by name."""
    architectures = config.get("architectures")
    if isinstance(architectures, list) and architectures:
        names = {a for a in architectures if isinstance(a, str)}
        if len(names) != 1:
            raise WorkbenchError(f"config.json lists architectures {architectures!r}; export-gguf needs one", path)
        hf_arch = names.pop()
    else:
        model_type = config.get("model_type")
        if model_type not in MODEL_TYPES:
            raise WorkbenchError(f"model type {model_type!r} is not one export-gguf writes (llama, qwen2); nothing "
                                 "written", path)
        hf_arch = MODEL_TYPES[model_type]
    if hf_arch not in ARCHITECTURES:
        raise WorkbenchError(f"architecture {hf_arch} is not one export-gguf writes "
                             f"({', '.join(ARCHITECTURES)}); nothing written", path)
    arch = ARCHITECTURES[hf_arch]
    if config.get("model_type") not in (None, arch):
        raise WorkbenchError(f"config.json says architecture {hf_arch} but model type {config.get('model_type')!r}",
                             path)
    if config.get("quantization_config") is not None:
        raise WorkbenchError("the model is quantized (config.json has quantization_config); export-gguf converts "
                             "float checkpoints", path)

    def count(key: str, default=None) -> int:
        value = config.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 2**31:
            raise WorkbenchError(f"config.json's {key} must be a positive integer, not {value!r}", path)
        return value

    def number(value, key: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise WorkbenchError(f"config.json's {key} must be a positive number, not {value!r}", path)
        return float(value)

    hidden, heads = count("hidden_size"), count("num_attention_heads")
    kv_heads = count("num_key_value_heads", heads)
    head_dim = config.get("head_dim") or hidden // heads
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
        raise WorkbenchError(f"config.json's head_dim must be a positive even integer, not {head_dim!r}", path)
    if heads % kv_heads:
        raise WorkbenchError(f"num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads})", path)
    if config.get("hidden_act", "silu") != "silu":
        raise WorkbenchError(f"hidden_act {config.get('hidden_act')!r}: llama.cpp's {arch} runs SiLU only; not exported",
                             path)
    if arch == "llama" and (config.get("attention_bias") or config.get("mlp_bias")):
        raise WorkbenchError("a Llama with attention_bias/mlp_bias: transformers' GGUF loader drops the biases; "
                             "not exported", path)
    if arch == "qwen2" and config.get("use_sliding_window"):
        raise WorkbenchError("use_sliding_window is set: llama.cpp's qwen2 has no sliding-window attention; "
                             "not exported", path)
    parameters = config.get("rope_parameters") if isinstance(config.get("rope_parameters"), dict) else {}
    scaling = config.get("rope_scaling") if isinstance(config.get("rope_scaling"), dict) else {}
    theta = number(config.get("rope_theta", parameters.get("rope_theta", 10000.0)), "rope_theta")
    rope = _rope(scaling or parameters, arch, path, number)
    return Spec(arch=arch, hf_arch=hf_arch, layers=count("num_hidden_layers"), hidden=hidden, heads=heads,
                kv_heads=kv_heads, head_dim=head_dim, intermediate=count("intermediate_size"),
                context=count("max_position_embeddings", 2048), vocab=count("vocab_size"),
                eps=number(config.get("rms_norm_eps", 1e-6), "rms_norm_eps"), theta=theta,
                tied=bool(config.get("tie_word_embeddings", False)), qkv_bias=arch == "qwen2", rope=rope)


def _rope(scaling: dict, arch: str, path: Path, number) -> dict:
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind == "default":
        return {"type": "default"}
    if kind == "linear":
        return {"type": "linear", "factor": number(scaling.get("factor"), "rope factor")}
    if kind == "yarn":
        original = scaling.get("original_max_position_embeddings")
        return {"type": "yarn", "factor": number(scaling.get("factor"), "rope factor"),
                "original_context": int(number(original, "original_max_position_embeddings"))}
    if kind == "llama3" and arch == "llama":
        return {"type": "llama3", "factor": number(scaling.get("factor"), "rope factor"),
                "low_freq_factor": number(scaling.get("low_freq_factor"), "low_freq_factor"),
                "high_freq_factor": number(scaling.get("high_freq_factor"), "high_freq_factor"),
                "original_context": number(scaling.get("original_max_position_embeddings"),
                                           "original_max_position_embeddings")}
    raise WorkbenchError(f"RoPE scaling {kind!r} is not one export-gguf writes for {arch} (linear, yarn"
                         f"{', llama3' if arch == 'llama' else ''}); not exported", path)


def llama3_rope_factors(spec: Spec):
    """llama.cpp's `rope_freqs.weight` for Llama-3.1-style RoPE: each frequency is divided by its factor."""
    import torch

    rope = spec.rope
    inv_freq = 1.0 / (spec.theta ** (torch.arange(0, spec.head_dim, 2, dtype=torch.float64) / spec.head_dim))
    low_wavelen = rope["original_context"] / rope["low_freq_factor"]
    high_wavelen = rope["original_context"] / rope["high_freq_factor"]
    factors = []
    for freq in inv_freq.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(rope["factor"])
        else:
            smooth = (rope["original_context"] / wavelen - rope["low_freq_factor"]) / (
                rope["high_freq_factor"] - rope["low_freq_factor"])
            factors.append(1.0 / ((1 - smooth) / rope["factor"] + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def _add_metadata(writer, spec: Spec, model_dir: Path, file_type: int, gguf) -> None:
    writer.add_type("model")
    writer.add_name(_model_name(model_dir))
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(spec.vocab)
    writer.add_context_length(spec.context)
    writer.add_embedding_length(spec.hidden)
    writer.add_block_count(spec.layers)
    writer.add_feed_forward_length(spec.intermediate)
    writer.add_head_count(spec.heads)
    writer.add_head_count_kv(spec.kv_heads)
    writer.add_layer_norm_rms_eps(spec.eps)
    writer.add_rope_freq_base(spec.theta)
    writer.add_rope_dimension_count(spec.head_dim)
    if spec.head_dim != spec.hidden // spec.heads:
        writer.add_key_length(spec.head_dim)
        writer.add_value_length(spec.head_dim)
    rope = spec.rope
    if rope["type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif rope["type"] == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_context"])


def _model_name(folder: Path) -> str:
    """The folder's name; for a hub cache snapshot, the repository's (`org/name`)."""
    resolved = folder.resolve()
    snapshot = hub_snapshot(resolved)
    return snapshot[0] if snapshot else (resolved.name or str(folder))


# ----- the tensors ---------------------------------------------------------------------------


def expected_tensors(spec: Spec) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of this spec holds (HF names), with its shape."""
    h, q, kv, inter = spec.hidden, spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim, spec.intermediate
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (spec.vocab, h)}
    for i in range(spec.layers):
        layer = f"model.layers.{i}"
        shapes.update({
            f"{layer}.input_layernorm.weight": (h,),
            f"{layer}.self_attn.q_proj.weight": (q, h),
            f"{layer}.self_attn.k_proj.weight": (kv, h),
            f"{layer}.self_attn.v_proj.weight": (kv, h),
            f"{layer}.self_attn.o_proj.weight": (h, q),
            f"{layer}.post_attention_layernorm.weight": (h,),
            f"{layer}.mlp.gate_proj.weight": (inter, h),
            f"{layer}.mlp.up_proj.weight": (inter, h),
            f"{layer}.mlp.down_proj.weight": (h, inter),
        })
        if spec.qkv_bias:
            shapes.update({f"{layer}.self_attn.q_proj.bias": (q,), f"{layer}.self_attn.k_proj.bias": (kv,),
                           f"{layer}.self_attn.v_proj.bias": (kv,)})
    shapes["model.norm.weight"] = (h,)
    if not spec.tied:
        shapes["lm_head.weight"] = (spec.vocab, h)
    return shapes


def plan_tensors(spec: Spec, checkpoint, outtype: str, gguf) -> list[Planned]:
    """The output's tensors in order, checked against the checkpoint: every tensor there, none unknown."""
    expected = expected_tensors(spec)
    names = set(checkpoint.names())
    for name in sorted(names - set(expected)):
        if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and spec.tied):
            continue  # recomputed from the config / the embedding itself, as transformers does
        raise WorkbenchError(f"tensor {name!r} has no place in a {spec.arch} GGUF (a {spec.hf_arch} holds no such "
                             "tensor); not exported", checkpoint.root)
    missing = [name for name in expected if name not in names]
    if missing:
        raise WorkbenchError(f"tensor {missing[0]!r} is missing{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}"
                             f"; a {spec.hf_arch} with this config.json needs it", checkpoint.root)
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == spec.arch)
    name_map = gguf.get_tensor_name_map(arch, spec.layers)
    plan: list[Planned] = []
    if spec.rope["type"] == "llama3":
        factors = llama3_rope_factors(spec)
        plan.append(Planned(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", None, tuple(factors.shape),
                            gguf.GGMLQuantizationType.F32, data=factors))
    for name, shape in expected.items():
        info = checkpoint.info(name)
        if tuple(info.shape) != shape:
            raise WorkbenchError(f"tensor {name!r} has shape {list(info.shape)}, config.json implies {list(shape)}",
                                 checkpoint.root)
        if str(info.dtype).removeprefix("torch.") not in FLOAT_DTYPES:
            raise WorkbenchError(f"tensor {name!r} is {str(info.dtype).removeprefix('torch.')}; export-gguf converts "
                                 "float32/float16/bfloat16 checkpoints", checkpoint.root)
        target = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:  # pragma: no cover - expected_tensors names only what the map knows
            raise WorkbenchError(f"gguf has no name for tensor {name!r}", checkpoint.root)
        heads = 0
        if spec.arch == "llama" and ".self_attn.q_proj." in name:
            heads = spec.heads
        elif spec.arch == "llama" and ".self_attn.k_proj." in name:
            heads = spec.kv_heads
        plan.append(Planned(target, name, shape, tensor_type(outtype, shape, gguf), permute_heads=heads))
    return plan


def tensor_type(outtype: str, shape: tuple[int, ...], gguf):
    """llama.cpp's choice: 1-D tensors (norms, biases) stay F32; Q8_0 needs rows of whole 32-blocks, else F16."""
    types = gguf.GGMLQuantizationType
    if len(shape) == 1 or outtype == "f32":
        return types.F32
    if outtype == "f16":
        return types.F16
    if outtype == "bf16":
        return types.BF16
    return types.Q8_0 if shape[-1] % Q8_0_BLOCK == 0 else types.F16


def _nbytes(item: Planned, gguf) -> int:
    block, block_bytes = gguf.GGML_QUANT_SIZES[item.ggml_type]
    return item.numel // block * block_bytes


def _add_info(writer, item: Planned, gguf) -> None:
    import numpy as np

    types = gguf.GGMLQuantizationType
    if item.ggml_type == types.Q8_0:  # given as the uint8 rows the quantizer returns
        shape = (*item.shape[:-1], item.shape[-1] // Q8_0_BLOCK * gguf.GGML_QUANT_SIZES[types.Q8_0][1])
        writer.add_tensor_info(item.name, shape, np.dtype(np.uint8), _nbytes(item, gguf), raw_dtype=types.Q8_0)
    elif item.ggml_type == types.BF16:  # bfloat16 bits as int16: numpy has no bfloat16
        writer.add_tensor_info(item.name, item.shape, np.dtype(np.int16), _nbytes(item, gguf), raw_dtype=types.BF16)
    else:
        dtype = np.float32 if item.ggml_type == types.F32 else np.float16
        writer.add_tensor_info(item.name, item.shape, np.dtype(dtype), _nbytes(item, gguf))


def rope_permute(weight, heads: int):
    """Rows of each head from HF's rotate-half order (x_j pairs with x_{j+d/2}) to GGML's (x_2j with x_2j+1).

    Row `half * d/2 + j` of a head moves to row `2j + half`. transformers' GGUF loader applies the inverse.
    """
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, 2, half, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _produce(item: Planned, checkpoint, gguf):
    """The tensor's bytes as GGUF stores them, as a numpy array (a view of the mapped file where possible)."""
    import torch

    tensor = item.data if item.source is None else checkpoint.tensor(item.source)
    if item.permute_heads:
        tensor = rope_permute(tensor, item.permute_heads)
    types = gguf.GGMLQuantizationType
    if item.ggml_type == types.F32:
        return tensor.to(torch.float32).contiguous().numpy()
    if item.ggml_type == types.BF16:
        return tensor.to(torch.bfloat16).contiguous().view(torch.int16).numpy()
    if item.ggml_type == types.F16:
        half = tensor.to(torch.float16).contiguous()
        if torch.isinf(half).any() and not torch.isinf(tensor).any():
            raise WorkbenchError(f"tensor {item.source!r} has values beyond float16's range (max |x| = "
                                 f"{float(tensor.abs().max()):.4g}); use --outtype bf16 or f32", checkpoint.root)
        return half.numpy()
    # Q8_0, a block of rows at a time: the float32 copy the quantizer works on stays QUANT_CHUNK elements
    import numpy as np

    rows = tensor.reshape(-1, tensor.shape[-1])
    row_bytes = tensor.shape[-1] // Q8_0_BLOCK * gguf.GGML_QUANT_SIZES[types.Q8_0][1]
    out = np.empty((rows.shape[0], row_bytes), dtype=np.uint8)
    step = max(1, QUANT_CHUNK // tensor.shape[-1])
    for start in range(0, rows.shape[0], step):
        block = rows[start:start + step].to(torch.float32).contiguous().numpy()
        out[start:start + step] = gguf.quants.quantize(block, types.Q8_0)
    return out.reshape(*tensor.shape[:-1], row_bytes)
