"""`wb train --nproc N --strategy S`: re-run the same command under `accelerate launch`.

The child command is rebuilt from the parsed options (every value spelled out, `--nproc` left out,
`--strategy` kept so that each rank knows its DeepSpeed config), and launched with the config that
ships in workbench/configs: an accelerate YAML for ddp and fsdp, a DeepSpeed JSON for zero2/zero3.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import click

STRATEGIES = ("ddp", "fsdp", "zero2", "zero3")
CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def config_file(strategy: str) -> Path:
    """The shipped config of a strategy: configs/ddp.yaml, fsdp.yaml, zero2.json or zero3.json."""
    return CONFIGS / (f"{strategy}.yaml" if strategy in ("ddp", "fsdp") else f"{strategy}.json")


def launch_command(child: list[str], nproc: int, strategy: str) -> list[str]:
    """`python -m accelerate.commands.launch ... -m workbench <child>` for `nproc` processes."""
    if strategy not in STRATEGIES:
        raise click.BadParameter(f"unknown strategy {strategy!r}", param_hint="--strategy")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(nproc), "--num_machines", "1"]
    if strategy in ("ddp", "fsdp"):
        command += ["--config_file", str(config_file(strategy))]
    else:
        command += ["--use_deepspeed", "--deepspeed_config_file", str(config_file(strategy))]
    return command + ["-m", "workbench", *child]


def child_args(command: click.Command, params: dict, debug: bool = False, skip: tuple[str, ...] = ("nproc",)) -> list[str]:
    """The argument list that reproduces `params` for `command`, without the options named in `skip`."""
    args = ["--debug"] if debug else []
    args.append(command.name)
    for option in command.params:
        if not isinstance(option, click.Option) or option.name in skip:
            continue
        value = params.get(option.name)
        flag = max(option.opts, key=len)
        if option.is_flag:
            if value:
                args.append(flag)
            elif value is False and option.secondary_opts:  # --x/--no-x given as --no-x (default None or True)
                args.append(max(option.secondary_opts, key=len))
        elif option.multiple:
            for item in value or ():
                args += [flag, str(item)]
        elif value is not None:
            args += [flag, str(value)]
    return args


def relaunch(command: click.Command, params: dict, nproc: int, strategy: str, debug: bool = False,
             run: Callable[[list[str]], int] | None = None) -> int:
    """Run the command again under `accelerate launch`; the launcher's exit status. `run` runs the launch
    command instead of a plain subprocess (`wb eval` filters what the launcher adds to a failure)."""
    launch = launch_command(child_args(command, params, debug), nproc, strategy)
    print(f"launching {nproc} processes ({strategy}): {shlex.join(launch)}", file=sys.stderr, flush=True)
    if run is not None:
        return run(launch)
    return subprocess.run(launch, check=False).returncode
