"""CLI conventions shared by every command."""

from __future__ import annotations

import re
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

import workbench
from workbench.cli import wb

WEIGHT_COMMANDS = ["checksum", "verify", "diff", "recover", "merge"]
HEAVY_MODULES = ["transformers", "peft", "lm_eval", "datasets", "accelerate"]


def test_top_level_help_lists_commands():
    result = CliRunner().invoke(wb, ["--help"])
    assert result.exit_code == 0
    listed = re.findall(r"^ {2}([\w-]+) ", result.output.split("Commands:")[1], flags=re.M)
    assert listed == sorted(wb.commands)


@pytest.mark.parametrize("name", sorted(wb.commands))
def test_every_command_help_describes_every_option(name):
    """`wb NAME --help` exits 0 and prints each visible option with its own help text, and no other option."""
    result = CliRunner().invoke(wb, [name, "--help"])
    assert result.exit_code == 0, result.output
    command = wb.commands[name]
    options = [p for p in command.get_params(click.Context(command)) if isinstance(p, click.Option) and not p.hidden]
    listed = re.findall(r"^ {2}(?:-\w, )?(--[\w-]+)", result.output.split("Options:")[1], flags=re.M)
    assert sorted(listed) == sorted(next(o for o in p.opts if o.startswith("--")) for p in options)
    flat = "".join(result.output.split())  # click wraps long lines (also at hyphens)
    for param in options:
        assert param.help, f"wb {name} {param.opts[0]} has no help text"
        assert all(opt in result.output for opt in param.opts + param.secondary_opts), param.opts
        assert "".join(param.help.split()) in flat, f"wb {name} {param.opts[0]}: its help text is not printed"


def test_python_dash_m_workbench_runs_the_cli():
    result = subprocess.run([sys.executable, "-m", "workbench", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == f"wb, version {workbench.__version__}"


def test_usage_error_exits_2():
    assert CliRunner().invoke(wb, ["checksum"]).exit_code == 2


@pytest.mark.parametrize("name", WEIGHT_COMMANDS)
def test_weight_commands_do_not_import_heavy_libraries(name, tiny_model):
    assert name in wb.commands
    # --help is not enough: run the module import the command performs plus a real checksum.
    code = (
        "import sys, importlib; from click.testing import CliRunner; from workbench.cli import wb;"
        f"done = CliRunner().invoke(wb, ['checksum', {str(tiny_model)!r}, '--weight-sum']);"
        "assert done.exit_code == 0 and 'weight-sum' in done.output, done.output;"
        f"importlib.import_module('workbench.weights.' + {name!r}.replace('-', '_'));"
        f"print(','.join(m for m in {HEAVY_MODULES!r} if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "", f"wb {name} imports {result.stdout.strip()}"


def test_importing_workbench_silences_transformers_deprecation_asked_by_peft():
    """peft and trl ask transformers 5 about `is_gradient_checkpointing` whenever they wrap a model (wb chat
    --adapter, wb train): the FutureWarning is not the user's concern; other FutureWarnings still show."""
    code = ("import warnings, workbench\n"
            "warnings.warn('`is_gradient_checkpointing` is deprecated and will be removed in v6.', FutureWarning)\n"
            "warnings.warn('another deprecation', FutureWarning)\n")
    done = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "is_gradient_checkpointing" not in done.stderr and "another deprecation" in done.stderr


def test_an_error_line_is_one_line_whatever_its_message_holds():
    from workbench.errors import WorkbenchError

    error = WorkbenchError("cannot load it:\n  first reason\r\n  second reason", "a\nb.json")
    assert error.line() == "cannot load it: first reason second reason (a b.json)"
    assert WorkbenchError("plain  text", "f").line() == "plain  text (f)"  # untouched without line breaks
