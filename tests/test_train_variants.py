"""`wb train`'s adapter variants (DoRA, rsLoRA, PiSSA), QLoRA on a bitsandbytes base, and --adapter DIR.

peft is the oracle for what an adapter means: `wb merge` of base + DIR's adapter must equal peft's own
`merge_and_unload()` (DoRA, rsLoRA), or, for PiSSA, the residual base + the trained PiSSA adapter
computed here from the run's last checkpoint and its initial adapter.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from clicheck import assert_one_error
from click.testing import CliRunner
from conftest import run_train, train_args
from safetensors.torch import load_file
from tiny import read_log

from workbench import quiet
from workbench.cli import wb
from workbench.errors import WorkbenchError
from workbench.train import adapters
from workbench.weights.merge import quantized_base_note

IDS = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46], [1, 50, 51, 52, 53, 54, 55, 56]])
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, learn_model, learn_data):
    """train(*options) -> DIR, one CLI run per option set (cached: several tests read the same run)."""
    root = tmp_path_factory.mktemp("runs")
    done: dict[tuple, Path] = {}

    def train(*options: str, epochs: str = "1", lr: str = "1e-2") -> Path:
        key = (*options, epochs, lr)
        if key not in done:
            out = root / f"run{len(done)}"
            result = train_cli(learn_model, learn_data, out, *options, "--epochs", epochs, "--lr", lr)
            assert result.exit_code == 0, result.output
            done[key] = out
        return done[key]

    return train


def train_cli(model: Path, data: Path, out: Path, *extra: str):
    return run_train(*train_args(model, data, out, "--logging-steps", "2", "--save-steps", "10", *extra))


def merge_cli(base: Path, adapter: Path, out: Path):
    result = CliRunner().invoke(wb, ["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return result


def losses(out: Path) -> list[float]:
    return [row["loss"] for row in read_log(out) if row["loss"] is not None]


def logits(folder: Path, adapter: Path | None = None, **load) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, **load)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits.float()


def peft_merged_state(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload()
    return {k: v.detach() for k, v in model.state_dict().items()}


def max_diff(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> float:
    assert set(ours) == set(theirs)
    return max(float((ours[k].float() - theirs[k].float()).abs().max()) for k in ours)


# ---- DoRA, rsLoRA ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("flag", "key"), [("--use-dora", "use_dora"), ("--use-rslora", "use_rslora")])
def test_dora_and_rslora_train_and_merge_as_peft_does(runs, learn_model, tmp_path, flag, key):
    out = runs(flag)
    seen = losses(out)
    assert seen[-1] < 0.75 * seen[0], seen
    config = json.loads((out / "adapter_config.json").read_text())
    assert config[key] is True and config["r"] == 8 and config["lora_alpha"] == 16
    other = "use_rslora" if key == "use_dora" else "use_dora"
    assert config[other] is False
    record = json.loads((out / "train_args.json").read_text())
    assert record["adapter"][key] is True and record["quantization"] is None
    merge_cli(learn_model, out, tmp_path / "merged")
    ours = load_file(tmp_path / "merged" / "model.safetensors")
    theirs = peft_merged_state(learn_model, out)
    assert max_diff(ours, theirs) < 1e-5
    base = load_file(learn_model / "model.safetensors")
    assert max_diff(ours, base) > 1e-3  # the adapter changed the model


# ---- PiSSA -------------------------------------------------------------------------------------------


def test_pissa_adapter_is_saved_as_a_lora_of_the_original_base(runs, learn_model, tmp_path):
    out = runs("--init", "pissa")  # 10 steps; checkpoint-10 is the trained PiSSA adapter
    seen = losses(out)
    assert seen[-1] < 0.75 * seen[0], seen
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (16, 32, True)
    record = json.loads((out / "train_args.json").read_text())
    assert record["adapter"] == {"r": 16, "lora_alpha": 32, "use_dora": False, "use_rslora": False, "init": "pissa",
                                 "pissa_converted": True, "continued_from": None}
    assert json.loads((out / "metrics.json").read_text())["adapter"] == record["adapter"]

    # the trained model: residual base (W - s B0 A0) + the trained PiSSA adapter (s B A), r 8, alpha 16
    base = load_file(learn_model / "model.safetensors")
    init = load_file(out / "checkpoints" / "pissa-init" / "adapter_model.safetensors")
    trained = load_file(out / "checkpoints" / "checkpoint-10" / "adapter_model.safetensors")
    expected = dict(base)
    for name in trained:
        if ".lora_A." in name:
            target = name.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
            b_name = name.replace("lora_A", "lora_B")
            expected[target] = (base[target] - 2.0 * init[b_name] @ init[name] + 2.0 * trained[b_name] @ trained[name])
    assert len(trained) == 2 * 14
    merge_cli(learn_model, out, tmp_path / "merged")
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    assert max_diff(merged, expected) < 1e-5
    assert max_diff(merged, base) > 1e-3
    # peft reads DIR's adapter on the ORIGINAL base as the same model
    assert torch.allclose(logits(learn_model, out), logits(tmp_path / "merged"), atol=1e-5, rtol=0)


def test_a_resumed_pissa_run_trains_against_the_same_residual_base(learn_model, learn_data, tmp_path):
    """--resume recomputes PiSSA's (seeded) initial adapter: it must be the one the checkpoint was trained from."""
    out = tmp_path / "out"
    assert train_cli(learn_model, learn_data, out, "--init", "pissa", "--epochs", "1").exit_code == 0
    before = load_file(out / "checkpoints" / "pissa-init" / "adapter_model.safetensors")
    again = train_cli(learn_model, learn_data, out, "--init", "pissa", "--epochs", "2", "--resume")
    assert again.exit_code == 0, again.output
    assert "resuming after step 10" in again.stderr
    after = load_file(out / "checkpoints" / "pissa-init" / "adapter_model.safetensors")
    assert max_diff(before, after) == 0
    trained = load_file(out / "checkpoints" / "checkpoint-20" / "adapter_model.safetensors")
    ours = load_file(out / "adapter_model.safetensors")
    for name, tensor in trained.items():  # the conversion: [A | A0] and [B | -B0]
        joined = torch.cat([tensor, after[name]], 0) if "lora_A" in name else torch.cat([tensor, -after[name]], 1)
        assert torch.equal(ours[name], joined), name


# ---- QLoRA -------------------------------------------------------------------------------------------


def test_qlora_4bit_trains_on_cpu_and_merges_into_the_full_precision_base(runs, learn_model, tmp_path):
    from transformers import BitsAndBytesConfig

    out = runs("--quantization-bit", "4", epochs="2")
    seen = losses(out)
    assert seen[-1] < 0.3 * seen[0], seen
    record = json.loads((out / "train_args.json").read_text())
    assert record["quantization"] == {"bits": 4, "type": "nf4", "double": True, "compute_dtype": "fp32"}
    assert (out / "adapter_model.safetensors").is_file()
    result = merge_cli(learn_model, out, tmp_path / "merged")
    notes = [line for line in result.stderr.splitlines() if line.startswith("note:")]
    assert notes == [f"note: {out} was trained on a 4-bit (nf4) quantized base (QLoRA): it learned against the "
                     "dequantized weights, so merged into this full-precision base it gives a slightly different "
                     "model from the one trained (close, not identical)"]
    merged = logits(tmp_path / "merged")
    quantized = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.float32)
    trained = logits(learn_model, out, quantization_config=quantized)  # the model as trained: 4-bit base + adapter
    base, base_4bit = logits(learn_model), logits(learn_model, quantization_config=quantized)
    # merged into the fp32 base, the trained model moves by about the base's own 4-bit error (measured: mean
    # |logit| gap 0.23, max 1.29, against the base's quantization error 0.24 / 1.09; the logits' std is 2.7)
    gap, error = (trained - merged).abs(), (base_4bit - base).abs()
    assert gap.mean() < 1.25 * error.mean() and gap.max() < 1.5 * error.max(), (gap.mean(), error.mean())
    assert (base - merged).abs().mean() > 5 * gap.mean()  # far below the adapter's own effect (measured 2.2)


def test_a_quantized_base_keeps_no_view_of_its_checkpoint(learn_model):
    """The weights bitsandbytes does not quantize are copied out of the memory-mapped file, values unchanged."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(learn_model, quantization_config=config, device_map={"": "cpu"})
    kept = {n: (p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()
            if type(p).__name__ != "Params4bit"}
    quantized = {n: p.data_ptr() for n, p in model.named_parameters() if type(p).__name__ == "Params4bit"}
    assert len(kept) == 7 and len(quantized) == 14  # embeddings, head, 5 norms; the 14 linear layers
    adapters.release_checkpoint_memory(model)
    now = dict(model.named_parameters())
    for name, (pointer, value) in kept.items():
        assert now[name].data_ptr() != pointer and torch.equal(now[name], value), name
    assert {n: now[n].data_ptr() for n in quantized} == quantized


def _mapped(path: Path) -> int:
    """How many of this process's memory mappings are of `path` (Linux)."""
    return sum(line.rstrip().endswith(str(path)) for line in Path("/proc/self/maps").read_text().splitlines())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_releasing_a_quantized_base_unmaps_its_checkpoint(learn_model):
    """Quantizing reads the whole fp32 file through its mapping; once released no page of it stays mapped."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(learn_model, quantization_config=config, device_map={"": "cpu"})
    checkpoint = (learn_model / "model.safetensors").resolve()
    assert _mapped(checkpoint) == 1
    adapters.release_checkpoint_memory(model)
    assert _mapped(checkpoint) == 0


HEAP_PROBE = """
import ctypes, sys
from pathlib import Path
from workbench.train.adapters import limit_heap_retention
limited = sys.argv[1] == "limit" and limit_heap_retention()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
def anon():
    return next(int(l.split()[1]) for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("RssAnon:"))
def touch_and_free(mib):
    block = libc.malloc(mib << 20)
    ctypes.memset(block, 1, mib << 20)
    libc.free(block)
touch_and_free(30)  # glibc's dynamic threshold rises to 30 MiB here, unless limited
before = anon()
touch_and_free(20)
print(limited, (anon() - before) // 1024)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or __import__("platform").libc_ver()[0] != "glibc",
                    reason="glibc's malloc")
def test_limiting_heap_retention_gives_large_freed_buffers_back():
    """Without the limit glibc keeps a freed 20 MiB buffer once a 30 MiB one has raised its mmap threshold
    (what bitsandbytes' per-step dequantized weights did); with it the buffer goes back to the OS."""
    def retained(mode: str) -> tuple[str, int]:
        done = subprocess.run([sys.executable, "-c", HEAP_PROBE, mode], capture_output=True, text=True, check=True)
        limited, mib = done.stdout.split()
        return limited, int(mib)

    limited, mib = retained("limit")
    assert limited == "True" and mib <= 1
    limited, mib = retained("default")
    assert limited == "False" and mib >= 19


def test_heap_retention_is_limited_only_for_a_quantized_cpu_load(learn_model, monkeypatch):
    from workbench.train.run import _load_model

    calls = []
    monkeypatch.setattr(adapters, "limit_heap_retention", lambda: calls.append(1) or True)
    o = {"quantization_bit": "4", "quantization_type": "nf4", "double_quantization": True}
    _load_model(str(learn_model), torch.float32, None, False, False, None, torch.device("cpu"))
    assert calls == []
    _load_model(str(learn_model), torch.float32, None, False, False, adapters.quantization_config(o, torch.float32),
                torch.device("cpu"))
    assert calls == [1]


def test_qlora_8bit_trains_on_cpu(runs):
    out = runs("--quantization-bit", "8")
    seen = losses(out)
    assert seen[-1] < 0.75 * seen[0], seen
    record = json.loads((out / "train_args.json").read_text())
    assert record["quantization"] == {"bits": 8, "type": "llm.int8", "double": None, "compute_dtype": "fp32"}


def test_quantization_without_bitsandbytes_is_one_error(learn_model, learn_data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
    result = train_cli(learn_model, learn_data, tmp_path / "out", "--quantization-bit", "4")
    assert_one_error(result, "--quantization-bit needs bitsandbytes: pip install 'wb[qlora]'")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("extra", "fragment"), [
    (["--init", "pissa", "--quantization-bit", "4"], "--init pissa with --quantization-bit 4"),
    (["--init", "pissa", "--use-dora"], "--init pissa with --use-dora"),
    (["--quantization-bit", "8", "--quantization-type", "fp4"], "--quantization-type fp4 is a 4-bit data type"),
    (["--quantization-bit", "8", "--no-double-quantization"], "--no-double-quantization is a 4-bit setting"),
])
def test_combinations_that_cannot_work_are_one_error(learn_model, learn_data, tmp_path, extra, fragment):
    assert_one_error(train_cli(learn_model, learn_data, tmp_path / "out", *extra), fragment)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("options", "fragment"), [
    ({"quantization_bit": "4", "strategy": "fsdp"}, "--quantization-bit 4 with --strategy fsdp"),
    ({"quantization_bit": "8", "strategy": "zero3"}, "--quantization-bit 8 with --strategy zero3"),
    ({"lora_init": "pissa", "strategy": "zero3"}, "--init pissa with --strategy zero3"),
    ({"lora_init": "pissa", "adapter": "x"}, "--init pissa with --adapter"),
])
def test_sharded_strategies_are_refused_with_quantization_and_pissa(options, fragment):
    given = {"quantization_bit": None, "quantization_type": "nf4", "double_quantization": True, "strategy": None,
             "lora_init": "default", "use_dora": False, "adapter": None, **options}
    with pytest.raises(WorkbenchError, match=fragment):
        adapters.check_options(given)


def test_only_bitsandbytes_uninformative_lines_are_dropped():
    """The two lines are filtered on their own loggers; any other line of those loggers still passes."""
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    for name, fragment in quiet.DROPPED.items():
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        try:
            logger.warning(f"{fragment}: No module named 'kernels'")
            logger.warning("something bitsandbytes means")
        finally:
            logger.removeHandler(handler)
    assert seen == ["something bitsandbytes means"] * 2


def test_importing_wb_train_then_peft_prints_nothing():
    code = "import workbench, peft, bitsandbytes"  # what wb chat, eval and train import
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "gemm_4bit_forward" not in done.stderr, done.stderr


# ---- wb merge's note -----------------------------------------------------------------------------------


@pytest.mark.parametrize("content", [
    b"{not json", b"[1, 2]", b'{"quantization": "4"}', b'{"quantization": {"bits": "4"}}',
    b'{"quantization": {"bits": true}}', b'{"quantization": {"bits": 3}}', b'{"quantization": {"bits": 4.0}}',
    b"[" * 100_000 + b"]" * 100_000, b"\xff\xfe", b'{"quantization": null}',
])
def test_hostile_train_args_give_no_note(tmp_path, content):
    (tmp_path / "train_args.json").write_bytes(content)
    assert quantized_base_note(tmp_path) is None


def test_merge_note_names_only_known_quantization_types(tmp_path):
    assert quantized_base_note(tmp_path) is None  # no train_args.json
    (tmp_path / "train_args.json").write_text(json.dumps({"quantization": {"bits": 4, "type": "\x1b[2J"}}))
    assert quantized_base_note(tmp_path).startswith(f"{tmp_path} was trained on a 4-bit quantized base (QLoRA)")
    (tmp_path / "train_args.json").write_text(json.dumps({"quantization": {"bits": 8, "type": "llm.int8"}}))
    assert quantized_base_note(tmp_path).startswith(f"{tmp_path} was trained on a 8-bit (llm.int8) quantized base")


def test_merge_with_a_hostile_train_args_merges_without_a_note(runs, learn_model, tmp_path):
    import shutil

    adapter = tmp_path / "adapter"
    shutil.copytree(runs("--use-dora"), adapter, ignore=shutil.ignore_patterns("checkpoints"))
    (adapter / "train_args.json").write_text('{"quantization": {"bits": NaN}}')
    result = merge_cli(learn_model, adapter, tmp_path / "merged")
    assert "note:" not in result.stderr


# ---- --adapter DIR -------------------------------------------------------------------------------------


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def test_continuing_with_a_negligible_lr_keeps_the_first_adapter(runs, learn_model, learn_data, tmp_path):
    """Training starts from the first adapter's weights: with lr 1e-12, 10 steps leave them as they were."""
    first = runs("--lora-r", "4", "--lora-target", "q_proj,v_proj")
    out = tmp_path / "again"
    result = train_cli(learn_model, learn_data, out, "--adapter", str(first), "--lr", "1e-12", "--epochs", "1")
    assert result.exit_code == 0, result.output
    assert f"LoRA continued from {first} r=4 alpha=8 on q_proj,v_proj:" in result.stderr
    ours, theirs = adapter_tensors(out), adapter_tensors(first)
    assert max_diff(ours, theirs) < 1e-8
    record = json.loads((out / "train_args.json").read_text())
    assert record["adapter"]["continued_from"] == str(first) and record["adapter"]["r"] == 4
    assert (record["options"]["lora_r"], record["options"]["lora_target"]) == (4, "q_proj,v_proj")
    # the first logged loss is that of base + first adapter: the first run's final loss ballpark
    assert losses(out)[0] < losses(first)[0] - 1.0 and losses(out)[0] < losses(first)[-1] + 0.5


def test_continuing_an_adapter_trains_it_further_and_merges(runs, learn_model, learn_data, tmp_path):
    first = runs("--lora-r", "4", "--lora-target", "q_proj,v_proj")
    out = tmp_path / "more"
    result = train_cli(learn_model, learn_data, out, "--adapter", str(first), "--epochs", "1", "--lr", "1e-2")
    assert result.exit_code == 0, result.output
    assert max_diff(adapter_tensors(out), adapter_tensors(first)) > 1e-4
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert losses(out)[-1] < losses(first)[-1]
    merge_cli(learn_model, out, tmp_path / "merged")
    assert max_diff(load_file(tmp_path / "merged" / "model.safetensors"), peft_merged_state(learn_model, out)) < 1e-5


def test_a_continued_adapter_names_this_runs_base(runs, learn_model, learn_data, tmp_path):
    """The first run's adapter names the base as that run spelled it; the continued one names this run's
    --base (peft reads it back when saving, and PeftModel.from_pretrained(DIR) without a base uses it)."""
    first = runs("--lora-r", "4", "--lora-target", "q_proj,v_proj")
    elsewhere = tmp_path / "same-base"
    elsewhere.symlink_to(learn_model, target_is_directory=True)
    out = tmp_path / "again"
    result = train_cli(elsewhere, learn_data, out, "--adapter", str(first), "--epochs", "1")
    assert result.exit_code == 0, result.output
    assert json.loads((first / "adapter_config.json").read_text())["base_model_name_or_path"] == str(learn_model)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(elsewhere)


@pytest.mark.parametrize(("extra", "fragment"), [
    (["--lora-r", "16"], "--lora-r 16 conflicts with the adapter's r=4"),
    (["--lora-alpha", "64"], "--lora-alpha 64 conflicts with the adapter's lora_alpha=8"),
    (["--lora-target", "q_proj"], "--lora-target q_proj conflicts with the adapter's target_modules=q_proj,v_proj"),
    (["--use-dora"], "--use-dora conflicts with the adapter's use_dora=False"),
])
def test_options_the_adapter_contradicts_are_one_error(runs, learn_model, learn_data, tmp_path, extra, fragment):
    first = runs("--lora-r", "4", "--lora-target", "q_proj,v_proj")
    result = train_cli(learn_model, learn_data, tmp_path / "out", "--adapter", str(first), *extra)
    assert_one_error(result, fragment, "adapter_config.json")


def test_a_pissa_checkpoint_is_refused_as_adapter(runs, learn_model, learn_data, tmp_path):
    checkpoint = runs("--init", "pissa") / "checkpoints" / "checkpoint-10"
    result = train_cli(learn_model, learn_data, tmp_path / "out", "--adapter", str(checkpoint))
    assert_one_error(result, "relative to a PiSSA residual base")


def test_the_adapter_folder_cannot_be_the_output(runs, learn_model, learn_data):
    first = runs("--lora-r", "4", "--lora-target", "q_proj,v_proj")
    result = train_cli(learn_model, learn_data, first, "--adapter", str(first), "--force")
    assert_one_error(result)
    assert (first / "adapter_model.safetensors").is_file()
