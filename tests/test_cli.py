"""CLI conventions shared by every command."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from workbench.cli import wb

WEIGHT_COMMANDS = ["checksum", "verify", "diff", "recover", "merge"]
HEAVY_MODULES = ["transformers", "peft", "lm_eval", "datasets", "accelerate"]


def test_top_level_help_lists_commands():
    result = CliRunner().invoke(wb, ["--help"])
    assert result.exit_code == 0
    for name in wb.commands:
        assert name in result.output


@pytest.mark.parametrize("name", sorted(wb.commands))
def test_every_command_help_works(name):
    result = CliRunner().invoke(wb, [name, "--help"])
    assert result.exit_code == 0, result.output
    command = wb.commands[name]
    for param in command.params:
        if param.param_type_name == "option" and not param.hidden:
            assert param.help, f"wb {name} {param.opts[0]} has no help text"


def test_python_dash_m_workbench_runs_the_cli():
    result = subprocess.run([sys.executable, "-m", "workbench", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and "wb" in result.stdout


def test_usage_error_exits_2():
    assert CliRunner().invoke(wb, ["checksum"]).exit_code == 2


@pytest.mark.parametrize("name", WEIGHT_COMMANDS)
def test_weight_commands_do_not_import_heavy_libraries(name, tiny_model):
    assert name in wb.commands
    # --help is not enough: run the module import the command performs plus a real checksum.
    code = (
        "import sys, importlib; from click.testing import CliRunner; from workbench.cli import wb;"
        f"CliRunner().invoke(wb, ['checksum', {str(tiny_model)!r}, '--weight-sum']);"
        f"importlib.import_module('workbench.weights.' + {name!r}.replace('-', '_'));"
        f"print(','.join(m for m in {HEAVY_MODULES!r} if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "", f"wb {name} imports {result.stdout.strip()}"
