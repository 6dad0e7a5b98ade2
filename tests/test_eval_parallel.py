"""`wb eval --nproc N`: data parallel under `accelerate launch` (gloo on CPU), and the run's one progress bar.

The oracle of a data-parallel run is the one-process run of the same command: lm-eval shards the
questions by rank and gathers the scores, `wb` shards the generation records and gathers them in order;
every per-subject score, every sample line and every generated text must come out the same.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from clicheck import assert_one_error
from click.testing import CliRunner
from tiny import MMLU_SUBJECTS, read_jsonl, write_gen_data, write_mmlu

from workbench.cli import wb
from workbench.evals import parallel
from workbench.evals.run import evaluate

pytestmark = pytest.mark.usefixtures("one_thread")


def eval_args(model: Path, data: Path, gen: Path, out: Path, *extra: str) -> list[str]:
    return ["eval", "--model", str(model), "--data-dir", f"mmlu={data}", "--num-fewshot", "1", "--gen-data", str(gen),
            "--max-new-tokens", "4", "--batch-size", "2", "--device", "cpu", "--out", str(out), *extra]


@pytest.mark.slow
def test_two_processes_score_and_generate_as_one(tmp_path, tiny_model):
    data, gen = write_mmlu(tmp_path / "mmlu"), write_gen_data(tmp_path / "gen.json", 5)
    one = CliRunner().invoke(wb, eval_args(tiny_model, data, gen, tmp_path / "one" / "R.json"))
    assert one.exit_code == 0, one.output
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def two_processes(name: str) -> subprocess.CompletedProcess:
        args = eval_args(tiny_model, data, gen, tmp_path / name / "R.json", "--nproc", "2", "--cache", str(tmp_path / "c"))
        done = subprocess.run([sys.executable, "-m", "workbench", *args], capture_output=True, text=True, env=env,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    two = two_processes("two")
    assert "launching 2 processes (ddp)" in two.stderr and two.stderr.count("wrote ") == 1
    assert two.stdout == one.stdout  # rank 0 prints the same lines; the other rank prints nothing

    first, second = (json.loads((tmp_path / d / "R.json").read_text()) for d in ("one", "two"))
    for subject, count in MMLU_SUBJECTS.items():
        task = f"mmlu_{subject}"
        assert second["n-samples"][task] == first["n-samples"][task] == {"original": count, "effective": count}
        assert second["results"][task] == first["results"][task]  # acc, acc_norm and their stderr, bit for bit
    assert second["groups"] == first["groups"]
    assert second["generation"]["metrics"] == first["generation"]["metrics"]
    assert read_jsonl(tmp_path / "two" / "R.samples.jsonl") == read_jsonl(tmp_path / "one" / "R.samples.jsonl")
    predictions = [read_jsonl(tmp_path / d / "R.predictions.jsonl") for d in ("one", "two")]
    assert [r["prediction"] for r in predictions[1]] == [r["prediction"] for r in predictions[0]]
    assert predictions[1] == predictions[0] and [r["id"] for r in predictions[1]] == list(range(5))
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["R.json", "R.predictions.jsonl", "R.samples.jsonl"]

    assert (first["provenance"]["world_size"], second["provenance"]["world_size"]) == (1, 2)
    # one process: 9 questions x 4 options + 5 records; two: lm-eval pads nutrition's short rank by one question
    assert first["provenance"]["requests"] == {"done": 41, "total": 41}
    assert second["provenance"]["requests"] == {"done": 45, "total": 45}

    # the cache under --nproc: one lm-eval database per rank (lm-eval's naming), one answers file per rank
    cache = tmp_path / "c"
    assert sorted(p.name.split("_", 1)[1] for p in (cache / "lm_eval").iterdir()) == ["rank0.db", "rank1.db"]
    assert sorted(p.name for p in cache.glob("*.jsonl")) == ["generations_rank0.jsonl", "generations_rank1.jsonl"]
    assert second["provenance"]["cache"]["lm_eval"]["from_cache"] == 0
    two_processes("resumed")
    resumed = json.loads((tmp_path / "resumed" / "R.json").read_text())
    assert resumed["results"] == first["results"] and resumed["generation"]["metrics"] == first["generation"]["metrics"]
    assert resumed["provenance"]["cache"]["lm_eval"]["loglikelihood"] == {"requests": 40, "from_cache": 40}
    assert resumed["provenance"]["cache"]["generation"] == {"requests": 5, "from_cache": 5, "skipped_lines": 0}
    assert read_jsonl(tmp_path / "resumed" / "R.predictions.jsonl") == predictions[0]


def test_a_refused_output_stops_before_any_process_starts(tmp_path, tiny_model):
    data, gen = write_mmlu(tmp_path / "mmlu"), write_gen_data(tmp_path / "gen.json", 2)
    out = tmp_path / "R.json"
    out.write_text("{}")
    result = CliRunner().invoke(wb, eval_args(tiny_model, data, gen, out, "--nproc", "2"))
    assert_one_error(result, "output exists; pass --force")
    assert "launching" not in result.output and out.read_text() == "{}"
    inside = CliRunner().invoke(wb, eval_args(tiny_model, data, gen, data / "data" / "dev" / "R.json", "--nproc", "2"))
    assert inside.exit_code == 1 and "launching" not in inside.output


def test_nproc_is_refused_under_a_launcher(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    data, gen = write_mmlu(tmp_path / "mmlu"), write_gen_data(tmp_path / "g.json", 1)
    result = CliRunner().invoke(wb, eval_args(tiny_model, data, gen, tmp_path / "R.json", "--nproc", "2"))
    assert_one_error(result, "leave it out under accelerate launch")


def test_child_command_is_the_same_eval_without_nproc(tmp_path, tiny_model, monkeypatch):
    """What `--nproc 2` launches: accelerate with the shipped ddp.yaml, then every option spelled out."""
    data, gen = write_mmlu(tmp_path / "mmlu"), write_gen_data(tmp_path / "gen.json", 2)
    seen = {}

    def fake_run(command, debug):
        seen["command"] = command
        return 3

    monkeypatch.setattr(parallel, "run_launcher", fake_run)
    result = CliRunner().invoke(wb, eval_args(tiny_model, data, gen, tmp_path / "R.json", "--nproc", "2", "--cache",
                                              str(tmp_path / "cache"), "--no-chat-template", "--system-prompt", "Be brief."))
    assert result.exit_code == 3  # the launcher's status
    command = seen["command"]
    assert command[:5] == [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2"]
    assert command[command.index("--config_file") + 1].endswith("workbench/configs/ddp.yaml")
    child = command[command.index("workbench") + 1:]
    assert child[0] == "eval" and "--nproc" not in child
    parsed = wb.commands["eval"].make_context("eval", child[1:]).params  # the child parses to the same options
    given = wb.commands["eval"].make_context("eval", eval_args(tiny_model, data, gen, tmp_path / "R.json", "--cache",
                                             str(tmp_path / "cache"), "--no-chat-template", "--system-prompt",
                                             "Be brief.")[1:]).params
    assert parsed == given and parsed["chat_template"] is False and parsed["system_prompt"] == "Be brief."
    assert child[child.index("--cache") + 1] == str(tmp_path / "cache") and child[child.index("--device") + 1] == "cpu"
    assert not (tmp_path / "R.json").exists()


def test_shards_cover_every_record_once():
    worlds = [parallel.World(rank, 3) for rank in range(3)]
    shards = [parallel.shard(8, world) for world in worlds]
    assert shards == [[0, 3, 6], [1, 4, 7], [2, 5]]
    assert parallel.shard(8, parallel.World(0, 1)) == list(range(8))
    assert parallel.gather({"a": 1}, parallel.World(0, 1)) == [{"a": 1}]


@pytest.mark.parametrize(("rank", "size", "fragment"), [("2", "2", "RANK 2 is not a rank"), ("x", "2", "integers")])
def test_launcher_environment_is_checked(monkeypatch, rank, size, fragment):
    from workbench.errors import WorkbenchError

    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", size)
    with pytest.raises(WorkbenchError, match=fragment):
        parallel.current()


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_one_bar_counts_every_request_of_the_run(tmp_path, tiny_model, monkeypatch):
    """On a terminal: one bar, benchmarks and generation together, ending at total of total; no other bar."""
    data, gen = write_mmlu(tmp_path / "mmlu"), write_gen_data(tmp_path / "gen.json", 3)
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    results = evaluate(tiny_model, data_dir=[f"mmlu={data}"], num_fewshot=0, limit=2, gen_data=gen, max_new_tokens=3,
                       batch_size=2, device="cpu", out=tmp_path / "R.json")
    monkeypatch.undo()
    expected = 2 * len(MMLU_SUBJECTS) * 4 + 3  # 2 questions per subject x 4 options, 3 records
    assert results["provenance"]["requests"] == {"done": expected, "total": expected}
    frames = [frame for frame in re.split(r"[\r\n]", terminal.getvalue()) if frame.strip()]
    counts = [re.search(r"(\d+)/(\d+) \[", frame) for frame in frames]
    assert frames and all(frame.startswith("eval:") for frame in frames if "req" in frame), frames
    assert all(c is None or int(c.group(1)) <= int(c.group(2)) for c in counts)
    last = [c for c in counts if c][-1]
    assert (int(last.group(1)), int(last.group(2))) == (expected, expected)
    assert "Running loglikelihood" not in terminal.getvalue() and "generate:" not in terminal.getvalue()
    assert re.search(r"\[\d\d:\d\d<\d\d:\d\d", terminal.getvalue())  # elapsed<remaining


def test_progress_sums_and_silence_off_a_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    progress = parallel.Progress(parallel.World(0, 1))
    progress.add_total(5)
    progress.advance(2)
    progress.add_total(3)
    progress.advance(6)
    progress.close()
    assert progress.counts() == (8, 8) and sys.stderr.getvalue() == ""


LAUNCHER_FAILURE = """\
error: no tokenizer in the folder (M)
error: no tokenizer in the folder (M)
W1202 14:50:05.543000 25373 .venv/lib/python3.11/site-packages/torch/distributed/elastic/multiprocessing/api.py:1028] \
Sending process 25376 closing signal SIGTERM
Traceback (most recent call last):
  File "<frozen runpy>", line 198, in _run_module_as_main
    raise ChildFailedError(
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
workbench FAILED
"""


def test_launcher_failure_report_is_dropped_and_errors_said_once():
    out = io.StringIO()
    errors = parallel._LauncherErrors(out)
    for start in range(0, len(LAUNCHER_FAILURE), 7):  # in pieces, as a pipe delivers it
        errors.feed(LAUNCHER_FAILURE[start:start + 7])
    errors.feed("", end=True)
    assert out.getvalue() == "error: no tokenizer in the folder (M)\n"

    out = io.StringIO()
    errors = parallel._LauncherErrors(out)
    crash = "eval:  50%| 1/2\reval: 100%| 2/2\rTraceback (most recent call last):\n  File \"x.py\", line 1\nTypeError: no\n"
    errors.feed(crash, end=True)
    assert out.getvalue() == crash  # a bar and a process's own traceback pass as they are


@pytest.mark.slow
def test_a_failing_process_is_one_error_line(tmp_path, tiny_model):
    model = tmp_path / "model"
    model.mkdir()
    for name in ("config.json", "model.safetensors"):
        (model / name).symlink_to(tiny_model / name)
    gen = write_gen_data(tmp_path / "gen.json", 2)
    failed = subprocess.run([sys.executable, "-m", "workbench", "eval", "--model", str(model), "--gen-data", str(gen),
                             "--device", "cpu", "--out", str(tmp_path / "R.json"), "--nproc", "2"],
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert failed.returncode == 1
    lines = [line for line in failed.stderr.splitlines() if line.strip()]
    assert lines[0].startswith("launching 2 processes") and len(lines) == 2, failed.stderr
    assert lines[1].startswith("error: no tokenizer in the folder") and "Traceback" not in failed.stderr
    assert not (tmp_path / "R.json").exists()
