"""Hostile inputs: every file `wb` reads may be crafted by an attacker.

Property-based (hypothesis): valid files are built once, then mutated or truncated per example
and handed to the command that reads them. Whatever the damage, the command must end in success
(exit 0) or in a WorkbenchError (exit 1, exactly one `error: ` line, last on stderr, after the
`FAILED: ` lines of a failed check) -- never another exception or a traceback -- and it must not
touch anything outside its OUT: the sandbox holding the inputs is snapshotted (path, size,
mtime_ns, sha256 of small files) before and after, and every file the command opens is recorded
(the interpreter's audit events), so a crafted path that reads or writes beside the inputs fails.

The default profile is short and deterministic (CI); `make fuzz` (WB_FUZZ=1) runs thousands of
examples per property, WB_FUZZ_EXAMPLES=N sets the count.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hostile import (
    DEPTH,
    DTYPE_NAMES,
    OTHER_STRINGS,
    PATH_STRINGS,
    Sandbox,
    adapter_config,
    assorted_state,
    blob,
    blobs,
    check_outcome,
    dumps,
    gguf_data_offset,
    hostile_binary,
    hostile_json_file,
    hostile_keys,
    hostile_safetensors,
    hostile_values,
    jsonl,
    llama_config,
    llama_state,
    md5_hex,
    mutated_doc,
    prediction_rows,
    results_doc,
    run_wb,
    sample_rows,
    train_docs,
    tuned_state,
    write_adapter,
    write_model,
    write_results,
    write_tiny_gguf,
    write_train_dir,
)
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

FUZZ = os.environ.get("WB_FUZZ", "") not in ("", "0")
# Shrinking a failure to a minimal example costs minutes per distinct bug: on with WB_FUZZ or
# WB_SHRINK=1 (to report a bug), off in the default run, which then prints the first failing
# example as found (and a @reproduce_failure blob).
SHRINK = FUZZ or os.environ.get("WB_SHRINK", "") not in ("", "0")
EXAMPLES = int(os.environ.get("WB_FUZZ_EXAMPLES", "3000" if FUZZ else "50"))
_common = dict(deadline=None, print_blob=True,
               phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target]
               + ([Phase.shrink, Phase.explain] if SHRINK else []),
               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                      HealthCheck.data_too_large, HealthCheck.large_base_example])
settings.register_profile("wb-hostile", max_examples=EXAMPLES, derandomize=True, database=None, **_common)
settings.register_profile("wb-hostile-fuzz", max_examples=EXAMPLES, derandomize=False, **_common)
# Applied per test (not loaded globally), so the other test modules keep hypothesis' defaults.
HOSTILE = settings.get_profile("wb-hostile-fuzz" if FUZZ else "wb-hostile")
INDEX = "model.safetensors.index.json"
META = "weight_diff.json"


# -- the valid inputs, built once ----------------------------------------------------------------
class Assets:
    """The valid inputs every property damages a copy of (a plain class: hypothesis prints a
    dataclass field by field in every falsifying example)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.assorted = b""  # a safetensors file holding one tensor of each kind
        self.assorted_sum = "0"  # its weight-sum, as `wb checksum --weight-sum` prints it
        self.assorted_bin = b""  # the same tensors as a torch.save zip
        self.single: Path | None = None  # Llama folder: config.json + model.safetensors
        self.sharded: Path | None = None  # the same in 3 shards + index
        self.diff_base: Path | None = None
        self.diffs: dict[str, Path] = {}  # variant -> a `wb diff` output folder
        self.adapter: Path | None = None
        self.results: Path | None = None  # base.json, tuned.json and their predictions/samples files
        self._gguf: tuple[Path, int] | None = None
        self._gguf_error: str | None = None

    def __repr__(self) -> str:
        return f"Assets({self.root})"

    def gguf(self) -> tuple[Path, int]:
        """(a tiny valid GGUF, where its tensor data starts), or a skip saying why there is none."""
        if self._gguf is None and self._gguf_error is None:
            try:
                path = write_tiny_gguf(self.root / "tiny.gguf")
                self._gguf = (path, gguf_data_offset(path))
            except Exception as exc:  # noqa: BLE001 - any failure means: no GGUF to mutate
                self._gguf_error = f"cannot write a tiny GGUF with gguf.GGUFWriter: {exc!r}"
        if self._gguf is None:
            packaged = _packaged_gguf_head()
            if packaged is None:
                pytest.skip(self._gguf_error or "no GGUF")
            self._gguf = packaged
        return self._gguf


def _packaged_gguf_head() -> tuple[Path, int] | None:
    try:
        from workbench.weights.gguf_import import packaged_gguf

        path = packaged_gguf()
        return None if path is None else (path, gguf_data_offset(path))
    except Exception:  # noqa: BLE001
        return None


@pytest.fixture(scope="module")
def assets():
    from safetensors.torch import save_file

    root = Path(tempfile.mkdtemp(prefix="wb-hostile-assets-"))
    made = Assets(root=root)
    save_file(assorted_state(), str(root / "assorted.safetensors"), metadata={"format": "pt", "note": "assorted"})
    made.assorted = (root / "assorted.safetensors").read_bytes()
    result = run_wb(["checksum", "--weight-sum", "--json", root / "assorted.safetensors"])
    assert result.exit_code == 0, result.output
    made.assorted_sum = repr(json.loads(result.stdout)["weight_sum"])
    torch.save(assorted_state(), root / "assorted.bin")
    made.assorted_bin = (root / "assorted.bin").read_bytes()
    base_state = llama_state(seed=0)
    made.single = write_model(root / "single", base_state, llama_config())
    made.sharded = write_model(root / "sharded", base_state, llama_config(), shards=3)
    # `wb diff` of a bf16, 2-shard TUNED with 2 added tokens against an fp32 RAW: layout, index and
    # resize recorded; stored in bf16, the diff also needs fixups.
    made.diff_base = made.single
    tuned = write_model(root / "tuned", tuned_state(base_state), llama_config(vocab=34, dtype="bfloat16"), shards=2,
                        dtype=torch.bfloat16)
    for variant, dtype in (("fp32", "float32"), ("bf16-fixups", "bf16")):
        out = root / f"diff-{variant}"
        result = run_wb(["diff", "--base", made.diff_base, "--tuned", tuned, "--out", out, "--dtype", dtype])
        assert result.exit_code == 0, result.output
        made.diffs[variant] = out
    assert json.loads((made.diffs["bf16-fixups"] / META).read_text())["fixups"]["count"] > 0
    made.adapter = write_adapter(root / "adapter")
    made.results = root / "results"
    write_results(made.results, "base", 0.40)
    write_results(made.results, "tuned", 0.55)
    write_train_dir(made.results / "run")
    yield made
    shutil.rmtree(root, ignore_errors=True)


def test_valid_inputs_succeed(assets):
    """The unmutated inputs pass every command the properties run (else the properties test nothing)."""
    with Sandbox() as box:
        model = box.path("model")
        box.write(assets.assorted, "model", "model.safetensors")
        box.write(assets.assorted_bin, "bin", "pytorch_model.bin")
        sharded = box.copy(assets.sharded, "sharded")
        base = box.copy(assets.diff_base, "base")
        diffs = {v: box.copy(d, f"diff-{v}") for v, d in assets.diffs.items()}
        adapter = box.copy(assets.adapter, "adapter")
        results = box.copy(assets.results, "results")
        listing = box.write(f"{md5_hex((base / 'model.safetensors').read_bytes())}  model.safetensors\n".encode(), "list.md5")
        commands = [
            ["verify", model / "model.safetensors", "--weight-sum", assets.assorted_sum],
            ["checksum", "--weight-sum", model],
            ["verify", box.path("bin", "pytorch_model.bin")],
            ["checksum", "--weight-sum", box.path("bin")],
            ["verify", sharded],
            ["checksum", "--json", sharded],
            ["checksum", "--weight-sum", sharded],
            ["verify", base, "--checksums", listing],
            ["merge", "--base", base, "--adapter", adapter, "--out", box.out("merged")],
            ["report", results / "base.json", results / "tuned.json", "-o", box.out("report.html")],
            ["report", results / "base.json", results / "tuned.json", "--train", results / "run", "-o", box.out("r2.html")],
            *(["recover", "--base", base, "--diff", d, "--out", box.out(f"recovered-{v}")] for v, d in diffs.items()),
        ]
        for command in commands:
            result = run_wb(command)
            check_outcome(result)
            assert result.exit_code == 0, f"valid input refused: wb {' '.join(result.argv)}\n{result.output}"
        assert "weight files: byte-identical" in run_wb(["recover", "--base", base, "--diff", diffs["fp32"],
                                                         "--out", box.out("again")]).stdout


def test_valid_gguf_imports(assets, tmp_path):
    """The GGUF the GGUF property damages imports cleanly as it is."""
    path, _ = assets.gguf()
    result = run_wb(["import-gguf", path, "--out", tmp_path / "out"])
    check_outcome(result)
    assert result.exit_code == 0, result.output


# -- 1. safetensors headers ----------------------------------------------------------------------
SAFETENSORS_COMMANDS = {
    "verify FILE": lambda d, s: ["verify", d / "model.safetensors"],
    "verify FILE --weight-sum": lambda d, s: ["verify", d / "model.safetensors", "--weight-sum", s],
    "verify DIR --json": lambda d, s: ["verify", "--json", d],
    "checksum --weight-sum DIR": lambda d, s: ["checksum", "--weight-sum", d],
    "checksum --weight-sum --json DIR": lambda d, s: ["checksum", "--weight-sum", "--json", d],
}


@HOSTILE
@given(data=st.data())
def test_damaged_safetensors_file(assets, data):
    raw = data.draw(blobs(hostile_safetensors(assets.assorted), assets.assorted), label="model.safetensors")
    command = data.draw(st.sampled_from(sorted(SAFETENSORS_COMMANDS)), label="command")
    with Sandbox() as box:
        box.write(raw, "model", "model.safetensors")
        box.may_read(box.path("model"))
        box.freeze()
        box.check(run_wb(SAFETENSORS_COMMANDS[command](box.path("model"), assets.assorted_sum)))


@HOSTILE
@given(data=st.data())
def test_damaged_pytorch_bin_file(assets, data):
    raw = data.draw(blobs(hostile_binary(assets.assorted_bin, len(assets.assorted_bin)), assets.assorted_bin), label="pytorch_model.bin")
    command = data.draw(st.sampled_from(["verify", "verify-sum", "checksum-sum"]), label="command")
    with Sandbox() as box:
        folder = box.path("model")
        box.write(raw, "model", "pytorch_model.bin")
        args = {"verify": ["verify", folder / "pytorch_model.bin"],
                "verify-sum": ["verify", folder, "--weight-sum", assets.assorted_sum],
                "checksum-sum": ["checksum", "--weight-sum", folder]}[command]
        box.may_read(folder)
        box.freeze()
        box.check(run_wb(args))


# -- 2. model.safetensors.index.json --------------------------------------------------------------
INDEX_COMMANDS = {
    "verify DIR": lambda d: ["verify", d],
    "verify INDEX": lambda d: ["verify", d / INDEX],
    "verify DIR --weight-sum": lambda d: ["verify", d, "--weight-sum", "1.0"],
    "checksum --json DIR": lambda d: ["checksum", "--json", d],
    "checksum --weight-sum DIR": lambda d: ["checksum", "--weight-sum", d],
}


def _index_strings(assets) -> list[str]:
    shards = sorted(p.name for p in assets.sharded.glob("*.safetensors"))
    return PATH_STRINGS + shards + [f"./{shards[0]}", f"../model/{shards[0]}", f"sub/../{shards[0]}",
                                    f"{{HOME}}/model/{shards[0]}", "../lure.safetensors", "{HOME}/lure.safetensors",
                                    f"{shards[0]}\x00", "config.json", INDEX]


@HOSTILE
@given(data=st.data())
def test_damaged_index(assets, data):
    doc = json.loads((assets.sharded / INDEX).read_text())
    raw = data.draw(blobs(hostile_json_file(doc, _index_strings(assets)), dumps(doc, 2)), label=INDEX)
    command = data.draw(st.sampled_from(sorted(INDEX_COMMANDS)), label="command")
    with Sandbox() as box:
        model = box.copy(assets.sharded, "model")
        box.write(raw, "model", INDEX)
        box.copy(next(assets.sharded.glob("*.safetensors")), "lure.safetensors")  # beside DIR: never to be read
        box.may_read(model)
        box.freeze()
        result = run_wb(INDEX_COMMANDS[command](model))
        box.check(result)
        if result.exit_code == 0 and "--json" in result.argv:
            names = json.loads(result.stdout)["files"]
            outside = [n for n in names if n.startswith("/") or ".." in Path(n).parts or "\x00" in n]
            assert not outside, f"checksum listed files outside DIR: {outside}"


# -- 3. weight_diff.json -> wb recover ------------------------------------------------------------
@st.composite
def hostile_weight_diff(draw, meta: dict) -> bytes:
    """weight_diff.json mutated anywhere, or aimed at what recover turns into paths and headers:
    the layout's file names, the index, the base64 safetensors headers."""
    layout = meta["tuned"].get("layout")
    kinds = ["json", "json", "layout-name", "layout-name", "header", "header", "index-text", "index-name"]
    kind = draw(st.sampled_from(kinds if layout else ["json"]), label="kind")
    if kind == "json":
        return draw(hostile_json_file(meta, PATH_STRINGS))
    meta = copy.deepcopy(meta)
    layout = meta["tuned"]["layout"]
    files = layout["files"]
    if kind == "layout-name":
        old = draw(st.sampled_from(sorted(files)))
        new = draw(st.one_of(st.sampled_from(PATH_STRINGS), hostile_keys), label="new file name")
        layout["files"] = {new if k == old else k: v for k, v in files.items()}
        if layout.get("index") and draw(st.booleans()):  # keep the index consistent with the new name
            index = json.loads(layout["index"]["text"])
            index["weight_map"] = {k: new if v == old else v for k, v in index["weight_map"].items()}
            layout["index"]["text"] = json.dumps(index, indent=2)
    elif kind == "header":
        name = draw(st.sampled_from(sorted(files)))
        raw = base64.b64decode(files[name]["header"])
        if draw(st.booleans()):
            header = draw(mutated_doc(json.loads(raw), DTYPE_NAMES), label="header")
            text = dumps(header)
            text += b" " * (-len(text) % 8) if draw(st.booleans()) else b""
            files[name]["header"] = base64.b64encode(text).decode()
        else:
            files[name]["header"] = draw(st.sampled_from(["", "!!!!", "AAAA", "=", files[name]["header"][:-4],
                                                          files[name]["header"][1:], base64.b64encode(b"[]").decode(),
                                                          base64.b64encode(b"\xff" * 9).decode(), 12, None]))
    elif kind == "index-text":
        if layout.get("index") is None:
            layout["index"] = {"name": INDEX, "text": "{}"}
        index = json.loads(layout["index"]["text"])
        layout["index"]["text"] = dumps(draw(mutated_doc(index, PATH_STRINGS)), indent=2).decode("utf-8", "replace")
    else:
        value = draw(st.one_of(st.sampled_from(PATH_STRINGS), hostile_values), label="index")
        if layout.get("index") and draw(st.booleans()):
            layout["index"]["name"] = value
        else:
            layout["index"] = value
    return dumps(meta, indent=2)


@HOSTILE
@given(data=st.data())
def test_damaged_weight_diff_json(assets, data):
    variant = data.draw(st.sampled_from(sorted(assets.diffs)), label="diff")
    meta = json.loads((assets.diffs[variant] / META).read_text())
    raw = data.draw(blobs(hostile_weight_diff(meta), dumps(meta, 2)), label=META)
    dtype = data.draw(st.sampled_from([[], [], ["--dtype", "bf16"], ["--dtype", "fp32"]]), label="dtype")
    with Sandbox() as box:
        base = box.copy(assets.diff_base, "base")
        diff = box.copy(assets.diffs[variant], "diff")
        box.write(raw, "diff", META)
        box.copy(next(assets.diffs[variant].glob("*.safetensors")), "lure.safetensors")
        out = box.out("out")
        box.may_read(base, diff)
        box.freeze()
        box.check(run_wb(["recover", "--base", base, "--diff", diff, "--out", out, *dtype]))


FIXUPS = "weight_diff_fixups.safetensors"
HOSTILE_INDICES = [0, 1, -1, -2, 2**31, 2**62, 2**63 - 1, -(2**63), 511, 512, 513, 543, 544, 545, 10**6]


@st.composite
def hostile_tensor(draw, like: torch.Tensor, integer: bool):
    """A tensor that could stand in for `like`: other values (NaN, inf, out-of-range indices,
    unsorted, repeated), another dtype, another length or rank, or empty."""
    kind = draw(st.sampled_from(["values", "values", "dtype", "length", "rank", "empty", "order"]), label="tensor change")
    if kind == "values":
        count = like.numel()
        if integer:
            values = draw(st.lists(st.one_of(st.sampled_from(HOSTILE_INDICES), st.integers(-5, 600)), min_size=count,
                                   max_size=count))
            return torch.tensor(values, dtype=torch.int64).reshape(like.shape).to(like.dtype)
        fill = draw(st.sampled_from([math.nan, math.inf, -math.inf, 1e38, -1e38, 0.0, 1e-45]))
        out = like.clone()
        out.view(-1)[: draw(st.integers(1, max(1, count)))] = fill
        return out
    if kind == "dtype":
        dtype = draw(st.sampled_from([torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.float16,
                                      torch.bfloat16, torch.float32, torch.float64, torch.bool]))
        return like.to(dtype)
    if kind == "length":
        extra = draw(st.sampled_from([-1, 1, 5]))
        if extra < 0:
            return like.reshape(-1)[:extra].clone() if like.numel() else like
        return torch.cat([like.reshape(-1), like.reshape(-1)[:1].repeat(extra)]) if like.numel() else torch.zeros(extra)
    if kind == "rank":
        return like.reshape(1, -1).clone() if like.dim() != 2 else like.reshape(-1).clone()
    if kind == "empty":
        return like.reshape(-1)[:0].clone()
    return like.reshape(-1).flip(0).clone() if like.numel() else like


def _file_record(data: bytes) -> dict:
    return {"size": len(data), "md5": md5_hex(data), "sha256": hashlib.sha256(data).hexdigest()}


@HOSTILE
@given(data=st.data())
def test_damaged_fixups_and_diff_tensors(assets, data):
    """The fixups file and the diff's own tensors, damaged with weight_diff.json updated to match
    (an attacker writes both): recover refuses in one line or rebuilds exactly what was recorded."""
    from safetensors.torch import load_file
    from safetensors.torch import save as save_bytes

    variant = data.draw(st.sampled_from(["bf16-fixups", "bf16-fixups", "fp32"]), label="diff")
    diff_dir = assets.diffs[variant]
    meta = json.loads((diff_dir / META).read_text())
    target = data.draw(st.sampled_from(([FIXUPS] if (diff_dir / FIXUPS).is_file() else [])
                                       + sorted(p.name for p in diff_dir.glob("model*.safetensors"))), label="file")
    valid = (diff_dir / target).read_bytes()
    how = data.draw(st.sampled_from(["bytes", "tensor", "tensor", "drop", "extra"]), label="how")
    if how == "bytes":
        raw = data.draw(blobs(hostile_safetensors(valid), valid), label=target)
    else:
        state = load_file(diff_dir / target)
        name = data.draw(st.sampled_from(sorted(state)), label="tensor")
        if how == "tensor":
            state[name] = data.draw(hostile_tensor(state[name], integer=not state[name].is_floating_point()),
                                    label="new tensor").contiguous()
        elif how == "drop":
            del state[name]
        else:
            state[data.draw(st.sampled_from([name + ".extra", "lm_head.weight.fixup_index", "x", ""]), label="extra")] = \
                state[name].clone()
        raw = blob(save_bytes(state, metadata={"format": "pt"}), valid)
    if target == FIXUPS:
        meta["fixups"]["file_hashes"] = _file_record(raw)
    elif target in meta.get("diff_files", {}):
        meta["diff_files"][target] = _file_record(raw)
    with Sandbox() as box:
        base = box.copy(assets.diff_base, "base")
        diff = box.copy(diff_dir, "diff")
        box.path("diff", target).write_bytes(raw)
        box.path("diff", META).write_bytes(dumps(meta, indent=2))
        out = box.out("out")
        box.may_read(base, diff)
        box.freeze()
        box.check(run_wb(["recover", "--base", base, "--diff", diff, "--out", out]))


# -- 4. adapter_config.json -> wb merge -----------------------------------------------------------
ADAPTER_FIELDS = ["r", "lora_alpha", "rank_pattern", "alpha_pattern", "target_modules", "peft_type", "use_rslora",
                  "modules_to_save", "fan_in_fan_out", "bias", "init_lora_weights", "use_dora", "layers_to_transform"]
nasty_numbers = st.sampled_from([0, -1, -4, 4.5, 1e-300, 1e308, math.nan, math.inf, -math.inf, 2**63, 10**400, "4",
                                 "8.0", "nan", None, True, False, [], {}, [4], {"r": 4}])
nasty_patterns = st.dictionaries(
    st.one_of(st.sampled_from(["(", "[", "*", "+", "?", "(?P<x", "\\", ".*", "q_proj", "v_proj", "(a+)+$", "", "a{99999}",
                               "lm_head", "embed_tokens", "layers.0.self_attn.q_proj", "(?i)Q_PROJ", "\x00"]),
              st.text(max_size=6)),
    st.one_of(nasty_numbers, hostile_values), max_size=3)


@st.composite
def hostile_adapter_config(draw) -> bytes:
    doc = adapter_config()
    if draw(st.booleans()):
        return draw(hostile_json_file(doc, OTHER_STRINGS))
    for _ in range(draw(st.integers(1, 3))):  # aimed: the fields that set each delta's scale and targets
        key = draw(st.sampled_from(ADAPTER_FIELDS), label="field")
        if key in ("rank_pattern", "alpha_pattern"):
            doc[key] = draw(st.one_of(nasty_patterns, hostile_values), label=key)
        elif key in ("r", "lora_alpha"):
            doc[key] = draw(st.one_of(nasty_numbers, hostile_values), label=key)
        else:
            doc[key] = draw(st.one_of(st.sampled_from(OTHER_STRINGS), hostile_values), label=key)
    return dumps(doc, indent=2)


@HOSTILE
@given(data=st.data())
def test_damaged_adapter_config(assets, data):
    raw = data.draw(blobs(hostile_adapter_config(), dumps(adapter_config(), 2)), label="adapter_config.json")
    method = data.draw(st.sampled_from([[], [], ["--method", "ties"], ["--method", "dare_linear"]]), label="method")
    with Sandbox() as box:
        base = box.copy(assets.single, "base")
        adapter = box.copy(assets.adapter, "adapter")
        box.write(raw, "adapter", "adapter_config.json")
        out = box.out("out")
        box.may_read(base, adapter)
        box.freeze()
        box.check(run_wb(["merge", "--base", base, "--adapter", adapter, "--out", out, *method]))


NONFINITE_CONFIGS = {
    "lora_alpha NaN": {"lora_alpha": math.nan},
    "lora_alpha Infinity": {"lora_alpha": math.inf},
    "lora_alpha -Infinity": {"lora_alpha": -math.inf},
    "lora_alpha 1e308": {"lora_alpha": 1e308},
    "alpha_pattern NaN": {"alpha_pattern": {"q_proj": math.nan}},
    "alpha_pattern Infinity": {"alpha_pattern": {"v_proj": math.inf}},
    "r NaN in rank_pattern": {"rank_pattern": {"v_proj": math.nan}},
    "r 1e-300 with rslora": {"r": 1e-300, "rank_pattern": {}, "use_rslora": True},
}


@pytest.mark.parametrize("case", NONFINITE_CONFIGS)
def test_adapter_config_never_yields_nonfinite_weights(assets, tmp_path, case):
    """A config value that makes a LoRA scale NaN/inf is refused; it never writes NaN/inf weights."""
    from safetensors.torch import load_file

    adapter = shutil.copytree(assets.adapter, tmp_path / "adapter")
    (adapter / "adapter_config.json").write_bytes(dumps({**adapter_config(), **NONFINITE_CONFIGS[case]}, indent=2))
    result = run_wb(["merge", "--base", assets.single, "--adapter", adapter, "--out", tmp_path / "out"])
    check_outcome(result)
    if result.exit_code == 0:
        bad = [name for path in sorted((tmp_path / "out").glob("*.safetensors"))
               for name, t in load_file(path).items() if not torch.isfinite(t.float()).all()]
        assert not bad, f"merge with {NONFINITE_CONFIGS[case]} exited 0 and wrote non-finite tensors: {bad}"


# -- 5. checksum lists -> wb verify --checksums -----------------------------------------------------
@dataclass(frozen=True)
class ListContext:
    model_md5: str
    model_sha256: str
    sentinel_md5: str
    passwd_md5: str | None


SENTINEL = b"a sentinel file beside DIR: no checksum list may make wb read it\n"


@st.composite
def hostile_checksum_list(draw, ctx: ListContext) -> bytes:
    outside = ["../sentinel", "./../sentinel", "..//sentinel", "sub/../../sentinel", "model.safetensors/../../sentinel",
               "{HOME}/sentinel", "{HOME}/model/../sentinel", "../model/../sentinel", "{ROOT}/" + "/".join(f"d{i}" for i in range(DEPTH)) + "/sentinel"]
    system = ["/etc/passwd", "/etc/../etc/passwd", "//etc/passwd", "../" * 12 + "etc/passwd", "/etc/shadow"]
    templates = (
        [f"{ctx.sentinel_md5}  {name}" for name in outside]
        + [f"{ctx.sentinel_md5} *{name}" for name in outside[:2]]
        + [f"\\{ctx.sentinel_md5}  {outside[0]}"]
        + ([f"{ctx.passwd_md5}  {name}" for name in system] if ctx.passwd_md5 else [])
        + [f"{ctx.model_md5}  model.safetensors", f"{ctx.model_md5} *model.safetensors", f"{ctx.model_md5.upper()}  model.safetensors",
           f"{ctx.model_sha256}  model.safetensors", f"{ctx.model_md5}  ./model.safetensors", f"{ctx.model_md5}  {{HOME}}/model/model.safetensors",
           f"{ctx.model_md5}  model.safetensors\x00", f"{ctx.model_md5}  model.safetensors\x00../sentinel",
           f"{ctx.model_md5}\tmodel.safetensors", f"{ctx.model_md5} model.safetensors", f"{ctx.model_md5}model.safetensors",
           f"{ctx.model_md5[:-1]}g  model.safetensors", f"{ctx.model_md5[:-1]}  model.safetensors", f"{ctx.model_md5}0  model.safetensors",
           f"{ctx.model_md5}  ", f"{ctx.model_md5}  " + "x" * 100_000, f"{ctx.model_md5}  model.safetensors  ",
           f"{ctx.model_md5}  config.json", f"{ctx.model_md5}  missing.safetensors", f"{ctx.model_md5}  .", f"{ctx.model_md5}  ..",
           f"{ctx.model_md5}  /", f"{ctx.model_md5}  model", "# comment", "", "   ", "\x00", "\ufeff" + f"{ctx.model_md5}  model.safetensors",
           "MD5 (model.safetensors) = " + ctx.model_md5, "0" * 32 + "  " + "\u202e" + "sentinel"]
    )
    good = [f"{ctx.model_md5}  model.safetensors", f"{ctx.model_md5} *model.safetensors", f"{ctx.model_md5}  config.json",
            f"{ctx.model_md5.upper()}  model.safetensors", "", "# a comment"]
    escaping = [t for t in templates if "sentinel" in t or "passwd" in t or "shadow" in t]
    line = st.one_of(st.sampled_from(good), st.sampled_from(escaping), st.sampled_from(templates), st.text(max_size=40))
    lines = draw(st.lists(line, min_size=1, max_size=5), label="lines")
    ending = draw(st.sampled_from(["\n", "\r\n", "\r", "", "\n\n"]), label="line ending")
    text = ending.join(lines) + draw(st.sampled_from(["", ending, "\n"]))
    encoding = draw(st.sampled_from(["utf-8"] * 6 + ["utf-16", "latin-1"]), label="encoding")
    return text.encode(encoding, "surrogateescape" if encoding == "utf-8" else "replace")


def _list_context(assets) -> ListContext:
    model = (assets.single / "model.safetensors").read_bytes()
    try:
        passwd = md5_hex(Path("/etc/passwd").read_bytes())
    except OSError:
        passwd = None
    return ListContext(md5_hex(model), hashlib.sha256(model).hexdigest(), md5_hex(SENTINEL), passwd)


def _reported_ok_outside(result, model: Path) -> list[str]:
    """Names the run reported OK that are not files inside DIR."""
    states: dict[str, str] = {}
    if "--json" in result.argv:
        try:
            states = json.loads(result.stdout).get("checksums") or {}
        except (json.JSONDecodeError, AttributeError):
            states = {}
        if "files" in states and isinstance(states["files"], dict):  # recover: {"algo": ..., "files": {...}}
            states = states["files"]
    else:
        for line in result.stdout.splitlines():
            if line.endswith(": OK"):
                states[line[: -len(": OK")]] = "ok"
    outside = []
    root = Path(os.path.realpath(model))
    for name, state in states.items():
        if state != "ok":
            continue
        if "\x00" in name or "sentinel" in name or "passwd" in name or "shadow" in name:
            outside.append(name)
            continue
        if not Path(os.path.realpath(model / name)).is_relative_to(root):
            outside.append(name)
    return outside


@HOSTILE
@given(data=st.data())
def test_hostile_checksum_list(assets, data):
    """`verify DIR --checksums LIST` (and `recover --checksums LIST`, whose names are OUT's): a name
    leaving the folder is never opened and never reported OK, whatever its hash."""
    raw = data.draw(blobs(hostile_checksum_list(_list_context(assets))), label="checksum list")
    command = data.draw(st.sampled_from(["verify", "verify", "verify --json", "recover --json"]), label="command")
    with Sandbox() as box:
        model = box.copy(assets.single, "model")
        box.write(SENTINEL, "sentinel")
        listing = box.write(raw, "list.md5")
        if command.startswith("verify"):
            folder = model
            args = ["verify", model, "--checksums", listing]
            box.may_read(model, listing)
        else:
            base, diff, folder = box.copy(assets.diff_base, "base"), box.copy(assets.diffs["fp32"], "diff"), box.out("out")
            args = ["recover", "--base", base, "--diff", diff, "--out", folder, "--checksums", listing]
            box.may_read(base, diff, listing)
        args += ["--json"] if command.endswith("--json") else []
        box.freeze()
        result = run_wb(args)
        box.check(result)
        assert "/etc/passwd: OK" not in result.stdout
        outside = _reported_ok_outside(result, folder)
        assert not outside, f"{command.split()[0]} reported OK for files outside its folder: {outside}"


# -- 6. GGUF headers -> wb import-gguf --------------------------------------------------------------
@settings(HOSTILE, max_examples=EXAMPLES if FUZZ else min(EXAMPLES, 25))
@given(data=st.data())
def test_damaged_gguf(assets, data):
    path, data_offset = assets.gguf()
    valid = path.read_bytes() if path.stat().st_size < (64 << 20) else None
    if valid is None:  # the packaged SmolLM2 file: damage its header, keep its (large) data
        with open(path, "rb") as handle:
            head = handle.read(data_offset)
        raw = data.draw(blobs(hostile_binary(head, data_offset), head), label="gguf header")
    else:
        raw = data.draw(blobs(hostile_binary(valid, data_offset), valid), label="gguf")
    with Sandbox() as box:
        target = box.path("model.gguf")
        if valid is None:
            shutil.copyfile(path, target)
            with open(target, "r+b") as handle:
                handle.write(raw)
        else:
            target.write_bytes(raw)
        out = box.out("out")
        box.may_read(box.home)  # transformers looks for tokenizer files beside the GGUF
        box.freeze()
        box.check(run_wb(["import-gguf", target, "--out", out]))


# -- 7. results files -> wb report ------------------------------------------------------------------
REPORT_STRINGS = OTHER_STRINGS + ["../lure.jsonl", "{HOME}/lure.jsonl", "lure.jsonl", "base.predictions.jsonl",
                                  "tuned.samples.jsonl", "base.json", "/etc/passwd", "", ".", ".."]


@st.composite
def hostile_jsonl(draw, rows: list[dict]) -> bytes:
    kind = draw(st.sampled_from(["row", "row", "raw-line", "truncate", "encoding"]))
    rows = copy.deepcopy(rows)
    if kind == "row":
        index = draw(st.integers(0, len(rows) - 1))
        rows[index] = draw(mutated_doc(rows[index], REPORT_STRINGS))
        return b"".join(dumps(row) + b"\n" for row in rows)
    text = jsonl(rows)
    if kind == "raw-line":
        line = draw(st.sampled_from([b"[1]", b"null", b"{", b"[" * 100_000, b"\xff\xfe", b'"x"', b"NaN", b"{}" * 3]))
        return text + line + b"\n"
    if kind == "truncate":
        return text[: draw(st.integers(0, len(text) - 1))]
    return text.decode().encode("utf-16")


REPORT_FILES = ["base.json", "tuned.json", "base.json", "tuned.json", "base.predictions.jsonl", "tuned.predictions.jsonl",
                "base.samples.jsonl", "run/train_args.json", "run/trainer_log.jsonl", "run/metrics.json",
                "run/adapter_config.json"]


@HOSTILE
@given(data=st.data())
def test_damaged_results_files(assets, data):
    """`wb report` of two results files (with their predictions and samples) and a training run."""
    target = data.draw(st.sampled_from(REPORT_FILES), label="file")
    name = target.split(".")[0]
    if target.startswith("run/"):
        doc = train_docs()[target.removeprefix("run/")]
        if target.endswith(".jsonl"):
            raw = data.draw(blobs(hostile_jsonl(doc), jsonl(doc)), label=target)
        else:
            raw = data.draw(blobs(hostile_json_file(doc, REPORT_STRINGS), dumps(doc, 2)), label=target)
    elif target.endswith(".predictions.jsonl"):
        raw = data.draw(blobs(hostile_jsonl(prediction_rows(name)), jsonl(prediction_rows(name))), label=target)
    elif target.endswith(".samples.jsonl"):
        raw = data.draw(blobs(hostile_jsonl(sample_rows(name)), jsonl(sample_rows(name))), label=target)
    else:
        doc = results_doc(name, 0.40 if name == "base" else 0.55)
        raw = data.draw(blobs(hostile_json_file(doc, REPORT_STRINGS), dumps(doc, 2)), label=target)
    options = data.draw(st.sampled_from([[], ["--baseline", "tuned"], ["--samples", "1"], ["--json"]]), label="options")
    with Sandbox() as box:
        results = box.copy(assets.results, "results")
        box.write(raw, "results", *target.split("/"))
        box.write(b'{"id": "lure"}\n', "lure.jsonl")
        out = box.out("out.html")
        box.may_read(results)
        box.freeze()
        box.check(run_wb(["report", results / "base.json", results / "tuned.json", "--train", results / "run", "-o", out,
                          *options]))


# -- 8. path arguments: relative, `.`, through a symlinked folder -------------------------------------
def _model_names(folder: Path) -> set[str]:
    return {p.name for p in folder.glob("*.safetensors")}


@pytest.fixture(params=["single", "sharded"])
def model_folder(request, assets, tmp_path) -> Path:
    return shutil.copytree(getattr(assets, request.param), tmp_path / "models" / "m")


def _expect_ok(result) -> None:
    check_outcome(result)
    assert result.exit_code == 0, f"wb {' '.join(result.argv)} failed:\n{result.output}"


@pytest.mark.parametrize("how", ["relative-from-elsewhere", "dot", "dot-slash", "symlinked-folder",
                                 "relative-symlink-from-elsewhere", "trailing-slash", "dotdot-detour"])
def test_checksum_and_verify_take_any_spelling_of_the_folder(model_folder, tmp_path, monkeypatch, how):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "link").symlink_to(model_folder, target_is_directory=True)
    cwd, arg = {
        "relative-from-elsewhere": (elsewhere, "../models/m"),
        "dot": (model_folder, "."),
        "dot-slash": (model_folder, "./"),
        "symlinked-folder": (elsewhere, str(tmp_path / "link")),
        "relative-symlink-from-elsewhere": (elsewhere, "../link"),
        "trailing-slash": (tmp_path, "models/m/"),
        "dotdot-detour": (tmp_path, "models/../models/m"),
    }[how]
    monkeypatch.chdir(cwd)
    listing = tmp_path / "list.md5"
    result = run_wb(["checksum", arg, "-o", str(listing)])
    _expect_ok(result)
    listed = {line.split("  ", 1)[1] for line in listing.read_text().splitlines()}
    assert listed == _model_names(model_folder), f"names are not relative to the folder: {listed}"
    for args in (["checksum", arg], ["checksum", "--json", arg], ["checksum", "--weight-sum", arg],
                 ["checksum", "--all-files", arg], ["verify", arg], ["verify", arg, "--checksums", str(listing)]):
        result = run_wb(args)
        _expect_ok(result)
    json_names = set(json.loads(run_wb(["checksum", "--json", arg]).stdout)["files"])
    assert json_names == _model_names(model_folder)


@pytest.mark.parametrize("how", ["relative-file", "file-in-cwd", "index-file", "file-through-symlink"])
def test_checksum_of_a_file_argument(model_folder, tmp_path, monkeypatch, how):
    (tmp_path / "link").symlink_to(model_folder, target_is_directory=True)
    index = model_folder / INDEX
    first = sorted(model_folder.glob("*.safetensors"))[0].name
    cwd, arg = {
        "relative-file": (tmp_path, f"models/m/{first}"),
        "file-in-cwd": (model_folder, first),
        "index-file": (tmp_path, f"models/m/{INDEX}" if index.is_file() else f"models/m/{first}"),
        "file-through-symlink": (tmp_path, f"link/{index.name if index.is_file() else first}"),
    }[how]
    monkeypatch.chdir(cwd)
    for args in (["checksum", arg], ["checksum", "--weight-sum", arg], ["verify", arg]):
        _expect_ok(run_wb(args))
