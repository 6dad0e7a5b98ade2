"""`wb eval --parallelize` and `--backend vllm`: the refusals (one line, before any model is loaded) and the
exact arguments handed to lm-eval's HFLM and VLLM and to vLLM's generation, built without vllm or a GPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from clicheck import assert_one_error
from click.testing import CliRunner

from workbench.cli import wb
from workbench.errors import WorkbenchError
from workbench.evals import backends, run
from workbench.evals.backends import (
    VLLM_INSTALL,
    BackendOptions,
    check_backend,
    hf_model_args,
    launcher_world_size,
    vllm_generation_request,
    vllm_model_args,
)


@pytest.fixture
def no_model_load(monkeypatch):
    """A refusal must come before the model files are even opened."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(run, "check_model_files", refuse)
    monkeypatch.setattr(run, "_load_lm", refuse)


def eval_args(tmp_path: Path, model: Path, *extra: str) -> list[str]:
    data = tmp_path / "one.jsonl"
    data.write_text('{"content": "a", "summary": "b"}\n', encoding="utf-8")
    return ["eval", "--model", str(model), "--gen-data", str(data), *extra, "--out", str(tmp_path / "R.json")]


# -- the refusals ------------------------------------------------------------------------------------------------
MACHINE = {"device_type": "cuda", "cuda_available": True, "world_size": 1, "vllm_installed": True}
REFUSED = [
    (BackendOptions(parallelize=True), {"cuda_available": False, "device_type": "cpu"},
     "--parallelize spreads the model over CUDA GPUs, and this machine has none"),
    (BackendOptions(parallelize=True), {"device_type": "cpu"},
     "--parallelize spreads the model over CUDA GPUs; it cannot run with --device cpu"),
    (BackendOptions("vllm", parallelize=True), {},
     "--parallelize is the hf backend's; with --backend vllm use --tensor-parallel-size"),
    (BackendOptions(max_memory_per_gpu="70GiB"), {}, "--max-memory-per-gpu applies with --parallelize only"),
    (BackendOptions(offload_folder=Path("off")), {}, "--offload-folder applies with --parallelize only"),
    (BackendOptions(parallelize=True, max_memory_per_gpu="lots"), {},
     "--max-memory-per-gpu must be a size such as 70GiB or 80GB, not 'lots'"),
    (BackendOptions(tensor_parallel_size=2), {}, "--tensor-parallel-size applies to --backend vllm only"),
    (BackendOptions(data_parallel_size=2), {}, "--data-parallel-size applies to --backend vllm only"),
    (BackendOptions(gpu_memory_utilization=0.5), {}, "--gpu-memory-utilization applies to --backend vllm only"),
    (BackendOptions(max_model_len=2048), {}, "--max-model-len applies to --backend vllm only"),
    (BackendOptions("vllm"), {"vllm_installed": False}, VLLM_INSTALL),
    (BackendOptions("vllm"), {"cuda_available": False, "device_type": "cpu"},
     "--backend vllm runs on CUDA GPUs, and this machine has none"),
    (BackendOptions("vllm"), {"device_type": "cpu"}, "--backend vllm runs on CUDA GPUs; it cannot run with --device cpu"),
    (BackendOptions("vllm"), {"world_size": 4},
     "--backend vllm runs its own workers; it cannot run in 4 processes (--nproc): use --data-parallel-size"),
    (BackendOptions("tgi"), {}, "--backend must be one of hf, vllm, not 'tgi'"),
]


@pytest.mark.parametrize(("options", "machine", "message"), REFUSED)
def test_refusals(options, machine, message):
    with pytest.raises(WorkbenchError) as err:
        check_backend(options, **{**MACHINE, **machine})
    assert str(err.value.line()).startswith(message)


@pytest.mark.parametrize("options", [
    BackendOptions(), BackendOptions(parallelize=True), BackendOptions(parallelize=True, max_memory_per_gpu="70GiB"),
    BackendOptions(parallelize=True, max_memory_per_gpu="80000000000"),
    BackendOptions("vllm", tensor_parallel_size=4, data_parallel_size=2, gpu_memory_utilization=0.8, max_model_len=4096),
])
def test_accepted_on_a_cuda_machine(options):
    check_backend(options, **MACHINE)


def test_processes_check_for_the_nproc_parent():
    """What `wb eval --nproc N` checks before it launches (a launched process sees WORLD_SIZE instead)."""
    backends.check_processes(BackendOptions(parallelize=True), 1)
    backends.check_processes(BackendOptions(), 8)
    backends.check_processes(BackendOptions(parallelize=True), 8)  # lm-eval's model-and-data parallelism
    check_backend(BackendOptions(parallelize=True), **{**MACHINE, "world_size": 2})
    with pytest.raises(WorkbenchError, match=r"--backend vllm runs its own workers; it cannot run in 2 processes"):
        backends.check_processes(BackendOptions("vllm"), 2)


def test_world_size_comes_from_the_launcher():
    assert launcher_world_size({}) == 1
    assert launcher_world_size({"WORLD_SIZE": "8"}) == 8
    assert launcher_world_size({"WORLD_SIZE": "x"}) == 1


def test_cli_parallelize_without_cuda_is_one_line(tmp_path, tiny_model, monkeypatch, no_model_load):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = CliRunner().invoke(wb, eval_args(tmp_path, tiny_model, "--parallelize"))
    assert_one_error(result, "--parallelize spreads the model over CUDA GPUs, and this machine has none")
    assert not (tmp_path / "R.json").exists()


@pytest.mark.parametrize("backend", [["--backend", "vllm"]])
def test_cli_nproc_with_a_backend_that_places_the_model_itself(tmp_path, tiny_model, monkeypatch, no_model_load,
                                                                backend):
    """The `wb eval --nproc` parent refuses before it launches any process."""
    from workbench.train import launch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(launch, "relaunch", lambda *a, **k: pytest.fail("processes were launched"))
    result = CliRunner().invoke(wb, eval_args(tmp_path, tiny_model, *backend, "--nproc", "2"))
    assert_one_error(result, "cannot run in 2 processes")


@pytest.mark.parametrize(("extra", "message"), [
    (["--max-memory-per-gpu", "70GiB"], "--max-memory-per-gpu applies with --parallelize only"),
    (["--offload-folder", "off"], "--offload-folder applies with --parallelize only"),
    (["--tensor-parallel-size", "2"], "--tensor-parallel-size applies to --backend vllm only"),
    (["--max-model-len", "512"], "--max-model-len applies to --backend vllm only"),
    (["--backend", "vllm", "--parallelize"], "--parallelize is the hf backend's"),
])
def test_cli_options_of_another_backend(tmp_path, tiny_model, no_model_load, extra, message):
    assert_one_error(CliRunner().invoke(wb, eval_args(tmp_path, tiny_model, *extra)), message)


def test_cli_vllm_not_installed_is_one_line(tmp_path, tiny_model, monkeypatch, no_model_load):
    monkeypatch.setattr(backends, "vllm_installed", lambda: False)
    result = CliRunner().invoke(wb, eval_args(tmp_path, tiny_model, "--backend", "vllm", "--tensor-parallel-size", "2"))
    assert_one_error(result, VLLM_INSTALL)
    assert not (tmp_path / "R.json").exists()


def test_compare_refuses_before_evaluating(tmp_path, tiny_models, monkeypatch):
    """`wb compare` hands the options to every evaluation: the first refuses before any model is loaded."""
    monkeypatch.setattr(backends, "vllm_installed", lambda: False)
    monkeypatch.setattr(run, "_load_lm", lambda *a, **k: pytest.fail("the model was loaded"))
    data = tmp_path / "one.jsonl"
    data.write_text('{"content": "a", "summary": "b"}\n', encoding="utf-8")
    result = CliRunner().invoke(wb, ["compare", "--base", str(tiny_models()), "--tuned", str(tiny_models(seed=1)),
                                     "--gen-data", str(data), "--backend", "vllm", "--out", str(tmp_path / "cmp")])
    assert_one_error(result, VLLM_INSTALL)


def test_compare_forwards_every_evaluation_option(tmp_path, tiny_models, monkeypatch):
    """Each model of a comparison is evaluated with every option `wb compare` was given."""
    calls = []

    def record(model, **kwargs):
        calls.append(kwargs)
        raise WorkbenchError("recorded")

    monkeypatch.setattr(run, "evaluate", record)
    monkeypatch.setattr(run, "check_options", lambda *args: None)  # this machine has no GPU to check against
    data = tmp_path / "one.jsonl"
    data.write_text('{"content": "a", "summary": "b"}\n', encoding="utf-8")
    given = {"--system-prompt": "Be brief.", "--cache": str(tmp_path / "cache"), "--backend": "vllm",
             "--max-memory-per-gpu": "70GiB", "--offload-folder": str(tmp_path / "off"),
             "--tensor-parallel-size": "2", "--data-parallel-size": "4", "--gpu-memory-utilization": "0.8",
             "--max-model-len": "4096"}
    args = [part for flag, value in given.items() for part in (flag, value)]
    result = CliRunner().invoke(wb, ["compare", "--base", str(tiny_models()), "--tuned", str(tiny_models(seed=1)),
                                     "--gen-data", str(data), *args, "--parallelize", "--fewshot-as-multiturn",
                                     "--chat-template", "--out", str(tmp_path / "cmp")])
    assert result.exit_code == 1 and result.stderr.splitlines()[-1] == "error: recorded", result.output
    (kwargs,) = calls
    assert {key: kwargs[key] for key in ("system_prompt", "fewshot_as_multiturn", "cache", "backend", "parallelize",
                                         "max_memory_per_gpu", "offload_folder", "tensor_parallel_size",
                                         "data_parallel_size", "gpu_memory_utilization", "max_model_len")} == {
        "system_prompt": "Be brief.", "fewshot_as_multiturn": True, "cache": tmp_path / "cache", "backend": "vllm",
        "parallelize": True, "max_memory_per_gpu": "70GiB", "offload_folder": tmp_path / "off",
        "tensor_parallel_size": 2, "data_parallel_size": 4, "gpu_memory_utilization": 0.8, "max_model_len": 4096}


# -- hf: the placement arguments ---------------------------------------------------------------------------------
def test_hf_model_args(tmp_path):
    assert hf_model_args(BackendOptions()) == {}
    assert hf_model_args(BackendOptions(parallelize=True)) == {"parallelize": True}
    options = BackendOptions(parallelize=True, max_memory_per_gpu=" 70GiB", offload_folder=tmp_path / "off")
    assert hf_model_args(options) == {"parallelize": True, "max_memory_per_gpu": "70GiB",
                                      "offload_folder": str((tmp_path / "off").resolve())}


def test_hf_model_args_are_hflm_arguments():
    """Every name hf_model_args produces is one of HFLM's own keyword arguments (not swallowed by **kwargs)."""
    import inspect

    from lm_eval.models.huggingface import HFLM

    names = set(hf_model_args(BackendOptions(parallelize=True, max_memory_per_gpu="1GiB", offload_folder=Path("o"))))
    assert names <= set(inspect.signature(HFLM.__init__).parameters) and len(names) == 3


# -- vllm: the model and generation requests ---------------------------------------------------------------------
def adapter_folder(path: Path, config: dict, tokenizer=None) -> Path:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps(config), encoding="utf-8")
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def test_vllm_model_args_without_adapter(tiny_model):
    options = BackendOptions("vllm", tensor_parallel_size=4, data_parallel_size=2, gpu_memory_utilization=0.85,
                             max_model_len=4096)
    assert vllm_model_args(tiny_model, None, tiny_model, "bfloat16", "auto", options, False) == {
        "pretrained": str(tiny_model.resolve()), "tokenizer": str(tiny_model.resolve()), "dtype": "bfloat16",
        "batch_size": "auto", "tensor_parallel_size": 4, "data_parallel_size": 2, "gpu_memory_utilization": 0.85,
        "max_model_len": 4096, "trust_remote_code": False,
    }


def test_vllm_model_args_with_adapter(tmp_path, tiny_model, tiny_tokenizer):
    """An adapter goes through vLLM's LoRA support, with the smallest max_lora_rank vLLM accepts that holds
    its largest rank; the tokenizer comes from the adapter folder when it has one (run.tokenizer_folder)."""
    plain = adapter_folder(tmp_path / "a", {"r": 4, "peft_type": "LORA"})
    own = adapter_folder(tmp_path / "b", {"r": 8, "rank_pattern": {"q_proj": 20}}, tiny_tokenizer)
    options = BackendOptions("vllm")
    for adapter, rank in ((plain, 8), (own, 32)):
        tokenizer = run.tokenizer_folder(tiny_model, adapter)
        assert vllm_model_args(tiny_model, adapter, tokenizer, "float16", 16, options, True) == {
            "pretrained": str(tiny_model.resolve()), "tokenizer": str(tokenizer.resolve()), "dtype": "float16",
            "batch_size": 16, "tensor_parallel_size": 1, "data_parallel_size": 1, "gpu_memory_utilization": 0.9,
            "max_model_len": None, "trust_remote_code": True,
            "lora_local_path": str(adapter.resolve()), "enable_lora": True, "max_lora_rank": rank,
        }
    assert run.tokenizer_folder(tiny_model, own) == own and run.tokenizer_folder(tiny_model, plain) == tiny_model


@pytest.mark.parametrize(("config", "message"), [
    ({"r": 0}, "adapter config: r must be a whole number of at least 1, not 0"),
    ({"r": 8.0}, "adapter config: r must be a whole number of at least 1, not 8.0"),
    ({"r": True}, "adapter config: r must be a whole number of at least 1, not True"),
    ({}, "adapter config: r must be a whole number of at least 1, not None"),
    ({"r": 8, "rank_pattern": {"q": -1}}, "adapter config: rank_pattern['q'] must be a whole number"),
    ({"r": 8, "rank_pattern": [1]}, "adapter config: 'rank_pattern' must be an object"),
    ({"r": 1024}, "vLLM serves LoRA ranks up to 512; this adapter's is 1024"),
])
def test_vllm_adapter_rank_is_checked(tmp_path, tiny_model, config, message):
    adapter = adapter_folder(tmp_path / "a", config)
    with pytest.raises(WorkbenchError) as err:
        vllm_model_args(tiny_model, adapter, tiny_model, "bfloat16", "auto", BackendOptions("vllm"), False)
    assert err.value.line().startswith(message) and str(adapter) in err.value.line()


def test_vllm_dtype_is_a_vllm_name(tiny_model):
    with pytest.raises(WorkbenchError, match="--backend vllm computes in float16, bfloat16, float32, not float8"):
        vllm_model_args(tiny_model, None, tiny_model, "float8", "auto", BackendOptions("vllm"), False)


def test_vllm_dtype_is_the_hf_backends(tmp_path, tiny_model, monkeypatch):
    """The plan's compute dtype, as _load_lm names it to vLLM: bf16 -> bfloat16 (what hf would compute in)."""
    loaded = []
    monkeypatch.setattr(backends, "load_vllm", lambda args: loaded.append(args) or "the VLLM")
    plan = run._Plan(model=tiny_model, adapter=None, gen_path=None, local={}, names=[], items=[], out=tmp_path / "R",
                     samples_path=None, predictions_path=None, device=torch.device("cpu"), dtype=torch.bfloat16,
                     lm_batch="auto", backend=BackendOptions("vllm"))
    assert run._load_lm(plan, False) == "the VLLM"
    assert loaded == [vllm_model_args(tiny_model, None, tiny_model, "bfloat16", "auto", BackendOptions("vllm"), False)]


def test_vllm_generation_request(tiny_tokenizer):
    """Greedy, at most max_new_tokens; prompts tokenized as the hf generation path tokenizes them."""
    prompts = ["Name a colour.", "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"]
    for special in (True, False):
        ids, sampling = vllm_generation_request(tiny_tokenizer, prompts, 7, special)
        assert ids == tiny_tokenizer(prompts, add_special_tokens=special)["input_ids"]
        assert all(type(i) is int for row in ids for i in row)
        assert sampling == {"temperature": 0.0, "max_tokens": 7}


def test_eval_argv_spells_out_the_backend(tmp_path):
    argv = run._backend_argv
    assert argv(BackendOptions()) == []
    assert argv(BackendOptions(parallelize=True, max_memory_per_gpu="70GiB", offload_folder=tmp_path)) == [
        "--parallelize", "--max-memory-per-gpu", "70GiB", "--offload-folder", str(tmp_path)]
    assert argv(BackendOptions("vllm", tensor_parallel_size=2, data_parallel_size=4, max_model_len=2048)) == [
        "--backend", "vllm", "--tensor-parallel-size", "2", "--data-parallel-size", "4",
        "--gpu-memory-utilization", "0.9", "--max-model-len", "2048"]
    parsed = wb.commands["eval"].make_context("eval", ["--model", ".", "--out", "R.json", *argv(
        BackendOptions("vllm", tensor_parallel_size=2, data_parallel_size=4, max_model_len=2048))])
    assert {k: parsed.params[k] for k in ("backend", "tensor_parallel_size", "data_parallel_size", "max_model_len",
                                          "gpu_memory_utilization")} == {
        "backend": "vllm", "tensor_parallel_size": 2, "data_parallel_size": 4, "max_model_len": 2048,
        "gpu_memory_utilization": 0.9}
