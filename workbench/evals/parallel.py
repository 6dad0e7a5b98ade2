"""`wb eval --nproc N`: data-parallel evaluation under `accelerate launch`, and the run's one progress bar.

`wb eval --nproc N` checks its inputs and outputs, then runs the same command again under
`accelerate launch` (workbench/train/launch.py, the shipped ddp.yaml). Each process loads the whole
model; lm-eval's HFLM shards the benchmark requests by rank (every rank-th document) and gathers the
scores to rank 0; the `--gen-data` records are sharded the same way here and gathered in their order.
Rank 0 writes every file and prints; the other ranks write and print nothing.

On CPU the process group is gloo: accelerate's state is started with `cpu=True` before lm-eval builds
its Accelerator (whose own detection would see no GPU and run each process alone), and the ranks lm-eval
keeps only for multi-GPU runs are set on the model. The rank is accelerate's global process index, so
a multi-node launch (`--num_machines`) shards over every process.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

from workbench.errors import WorkbenchError

REFRESH_S = 0.5  # the bar reads the other ranks' counts at most this often
STORE_PREFIX = "wb_eval_progress/"
BAR_ENV = "WB_EVAL_BAR"  # set by `wb eval --nproc` on a terminal: rank 0 draws though its stderr is a pipe
# torch's elastic agent logs each child's end and, when one fails, a traceback of its own and a report
ELASTIC_LOG = re.compile(r"^[IWE]\d{4} \d\d:\d\d:\d\d\.\d+ \d+ \S*torch/distributed/elastic/")


@dataclass(frozen=True)
class World:
    rank: int
    size: int

    @property
    def main(self) -> bool:
        return self.rank == 0


def current() -> World:
    """This process's rank and the world size a launcher (accelerate, torchrun) set; 0 of 1 otherwise."""
    if os.environ.get("WORLD_SIZE", "1") == "1":  # no launcher (a RANK alone is some other tool's)
        return World(0, 1)
    try:
        rank, size = int(os.environ.get("RANK", "0")), int(os.environ["WORLD_SIZE"])
    except ValueError:
        raise WorkbenchError("RANK and WORLD_SIZE must be integers (set by accelerate launch)") from None
    if size < 1 or not 0 <= rank < size:
        raise WorkbenchError(f"RANK {rank} is not a rank of WORLD_SIZE {size}")
    return World(rank, size)


def start(world: World, device_type: str) -> None:
    """Join the launcher's process group (gloo on CPU) before lm-eval creates its Accelerator."""
    if world.size == 1:
        return
    import torch.distributed as dist
    from accelerate import PartialState

    if not dist.is_initialized():
        PartialState(cpu=device_type == "cpu")


def adopt(lm, world: World) -> None:
    """Make lm-eval's model shard by this process's global rank (HFLM does so only with several GPUs,
    and with the node-local index)."""
    if world.size == 1:
        return
    if getattr(lm, "accelerator", None) is None:
        raise WorkbenchError(f"this model backend ({type(lm).__name__}) does not run under accelerate launch; "
                             "use --nproc with --backend hf")
    lm._rank, lm._world_size = world.rank, world.size


def shard(count: int, world: World) -> list[int]:
    """The indices of `count` records this rank handles: every world.size-th, from its rank."""
    return list(range(world.rank, count, world.size))


def gather(value, world: World) -> list | None:
    """Every rank's `value`, in rank order, on rank 0 (None elsewhere)."""
    if world.size == 1:
        return [value]
    import torch.distributed as dist

    gathered = [None] * world.size if world.main else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


def barrier(world: World) -> None:
    if world.size > 1:
        import torch.distributed as dist

        dist.barrier()


class Progress:
    """One bar for the whole run: requests done of all requests, over every process, on rank 0's stderr.

    Each rank adds what it will do (`add_total`) and what it did (`advance`) to two counters in the
    process group's key-value store (no collective: ranks never wait for each other); rank 0 draws the
    sums. A single process counts locally. The bar shows only where stderr is a terminal
    (workbench.progress's convention); the counts are kept either way.
    """

    def __init__(self, world: World, description: str = "eval"):
        self.world = world
        self.done = self.total = 0  # this rank's
        self._store = None
        if world.size > 1:
            import torch.distributed as dist

            self._store = dist.distributed_c10d._get_default_store()
        self._bar = None
        if world.main and (sys.stderr.isatty() or os.environ.get(BAR_ENV) == "1"):
            from tqdm import tqdm

            columns = os.environ.get("COLUMNS", "")
            width = None if sys.stderr.isatty() else int(columns) - 1 if columns.isdigit() and int(columns) > 20 else 79
            self._bar = tqdm(total=0, desc=description, unit="req", file=sys.stderr, leave=False,
                             dynamic_ncols=width is None, ncols=width)
        self._drawn = 0.0

    def add_total(self, count: int) -> None:
        self.total += count
        self._add("total", count)
        self._draw()

    def advance(self, count: int) -> None:
        if count:
            self.done += count
            self._add("done", count)
            self._draw()

    def counts(self) -> tuple[int, int]:
        """(done, total) of the whole run: every rank's sums (on any rank; exact once all have finished)."""
        if self._store is None:
            return self.done, self.total
        return self._store.add(STORE_PREFIX + "done", 0), self._store.add(STORE_PREFIX + "total", 0)

    def close(self) -> None:
        self._draw(force=True)
        if self._bar is not None:
            self._bar.refresh()  # the final count, before the bar clears its line
            self._bar.close()

    def _add(self, name: str, count: int) -> None:
        if self._store is not None and count:
            self._store.add(STORE_PREFIX + name, count)

    def _draw(self, force: bool = False) -> None:
        if self._bar is None or (not force and time.monotonic() - self._drawn < REFRESH_S and self._store):
            return
        self._drawn = time.monotonic()
        done, total = self.counts()
        self._bar.total = total
        self._bar.update(done - self._bar.n)


def run_launcher(command: list[str], debug: bool = False) -> int:
    """Run `accelerate launch ...` as `wb eval --nproc` does; its exit status.

    The processes' output passes through as it comes (the bar included: rank 0 is told to draw it when
    this stderr is a terminal), less what the launcher adds when a process fails: torch's elastic log
    lines, its own traceback and failure report, and the same `error:` line from every rank but once.
    With --debug everything passes.
    """
    if debug:
        return subprocess.run(command, check=False).returncode
    env = {**os.environ, BAR_ENV: "0"}
    if sys.stderr.isatty():  # rank 0's bar is as wide as this terminal (Progress reads COLUMNS)
        import shutil

        env.update({BAR_ENV: "1", "COLUMNS": str(shutil.get_terminal_size().columns)})
    with subprocess.Popen(command, stderr=subprocess.PIPE, env=env) as process:
        errors = _LauncherErrors(sys.stderr)
        for chunk in iter(lambda: os.read(process.stderr.fileno(), 65536), b""):
            errors.feed(chunk.decode("utf-8", errors="replace"))
        errors.feed("", end=True)
    return process.returncode


class _LauncherErrors:
    """A filter of the launcher's stderr (see run_launcher): whole lines are judged, a bar's partial line
    (ending in a carriage return) is passed at once."""

    def __init__(self, out):
        self.out, self.pending, self.errors = out, "", set()
        self.held: list[str] = []  # a traceback, kept until its last line says whose it is
        self.report = False  # the launcher's failure report has begun: nothing more passes

    def feed(self, text: str, end: bool = False) -> None:
        self.pending += text
        *lines, self.pending = re.split(r"(?<=[\n\r])", self.pending)
        if end and self.pending:
            lines, self.pending = [*lines, self.pending], ""
        for line in lines:
            self._line(line)
        if end:
            self._write("".join(self.held))
        self.out.flush()

    def _line(self, line: str) -> None:
        stripped = line.strip()
        if self.report or ELASTIC_LOG.match(line):
            return
        if self.held or stripped == "Traceback (most recent call last):":
            self.held.append(line)
            if len(self.held) > 1 and (line[:1] not in (" ", "\t") or not stripped):  # the exception's line
                block, self.held = "".join(self.held), []
                if "ChildFailedError" in line:  # the launcher's own: the report follows
                    self.report = True
                else:
                    self._write(block)
            return
        if stripped.startswith("error: "):
            if stripped in self.errors:
                return
            self.errors.add(stripped)
        self._write(line)

    def _write(self, text: str) -> None:
        if text:
            self.out.write(text)


@contextlib.contextmanager
def quiet_lm_eval_bars() -> Iterator[None]:
    """lm-eval draws a bar per task while it builds the prompts, on every rank, terminal or not; the run's
    one bar replaces it (the model's own bars are off through `disable_tqdm`, evals/cache.RequestLayer)."""
    from lm_eval.api import task
    from tqdm import tqdm

    drawn = task.tqdm
    task.tqdm = functools.partial(tqdm, disable=True)
    try:
        yield
    finally:
        task.tqdm = drawn


@dataclass
class OtherRank:
    """What a rank other than 0 returns: it writes and prints nothing."""

    world: World

    def lines(self) -> list[str]:
        return []

    def to_json(self) -> None:
        return None
