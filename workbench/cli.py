"""The `wb` command line: parses options and delegates; no work is done here.

Each command imports its module when it runs, so `wb --help` is quick and the weight commands
never import transformers, peft or lm-eval.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from workbench import __version__
from workbench.errors import CheckFailed, WorkbenchError

DTYPES = ["auto", "fp32", "float32", "bf16", "bfloat16", "fp16", "float16"]

existing_path = click.Path(exists=True, path_type=Path)
new_path = click.Path(path_type=Path)


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

    @staticmethod
    def _fail(ctx: click.Context, exc: WorkbenchError):
        if ctx.obj and ctx.obj.get("debug"):
            raise exc
        click.echo(f"error: {exc.line()}", err=True)
        ctx.exit(1)


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
    from workbench.checksum import checksum as run
    from workbench.io.hashing import format_lines
    from workbench.outputs import atomic_file

    result = run(path, algo=algo, all_files=all_files, weight_sum=weight_sum, jobs=jobs)
    if output is not None:
        with atomic_file(output, force=force) as handle:
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
@click.option("--weight-sum", "expected_sum", type=float, help="The published weight-sum to compare with.")
@click.option("--atol", type=float, default=1e-2, show_default=True, help="Tolerance of the weight-sum check.")
@click.option("--jobs", type=click.IntRange(min=1), help="Files hashed at once (default: CPU cores).")
@json_option
def verify(path, checksums, expected_sum, atol, jobs, as_json):
    """Check a checkpoint's structure, published checksums and weight-sum."""
    from workbench.verify import verify as run

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


def main() -> None:
    wb(prog_name="wb")


if __name__ == "__main__":
    main()
