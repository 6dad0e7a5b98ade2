"""`wb eval`: lm-eval benchmarks (online or from local files) and ROUGE/BLEU of generated text.

One run writes RESULTS.json (the schema `wb report` reads: lm-eval's own result blocks, the
generation metrics and a provenance block) and, beside it, `<stem>.samples.jsonl` (one line per
scored question, with lm-eval's doc_hash) and `<stem>.predictions.jsonl` (one line per generated
answer with its scores). Every file appears only when complete; none is overwritten without force.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from unittest import mock

from workbench import provenance
from workbench.errors import WorkbenchError
from workbench.evals import parallel
from workbench.evals.backends import DEFAULT_GPU_MEMORY_UTILIZATION, BackendOptions
from workbench.evals.cache import RequestLayer, RequestStore, model_key, summed_counts
from workbench.evals.results import LM_EVAL_KEYS, RESULTS_VERSION
from workbench.io.hashing import sha256_file
from workbench.io.jsonfile import read_model_config
from workbench.outputs import Note, atomic_file, check_can_write, check_not_input

VERSIONED = ("torch", "transformers", "peft", "lm_eval")  # provenance.versions: RESULTS.json's libraries
CPU_LM_EVAL_BATCH = 8  # --batch-size auto on CPU (lm-eval's own "auto" probes until memory runs out)


@dataclass
class _Plan:
    """Everything checked before a model is loaded: inputs, task names, output paths, device."""

    model: Path
    adapter: Path | None
    gen_path: Path | None
    local: dict  # benchmark name -> LocalBenchmark
    names: list[str]  # lm-eval task/group names
    items: list  # GenItem records to generate for
    out: Path
    samples_path: Path | None
    predictions_path: Path | None
    device: object  # torch.device
    dtype: object  # torch.dtype
    lm_batch: int | str
    backend: BackendOptions = BackendOptions()
    system_prompt: str | None = None
    fewshot_as_multiturn: bool = False


def evaluate(
    model: str | Path,
    *,
    adapter: str | Path | None = None,
    tasks: list[str] | tuple[str, ...] | str = (),
    data_dir: list[str] | tuple[str, ...] | str | Path | None = None,
    gen_data: str | Path | None = None,
    num_fewshot: int | None = None,
    limit: int | None = None,
    batch_size: int | str = "auto",
    device: str = "auto",
    dtype: str = "auto",
    chat_template: bool | None = None,
    max_new_tokens: int = 128,
    trust_remote_code: bool = False,
    system_prompt: str | None = None,
    fewshot_as_multiturn: bool = False,
    cache: str | Path | None = None,
    backend: str = "hf",
    parallelize: bool = False,
    max_memory_per_gpu: str | None = None,
    offload_folder: str | Path | None = None,
    tensor_parallel_size: int = 1,
    data_parallel_size: int = 1,
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION,
    max_model_len: int | None = None,
    out: Path,
    force: bool = False,
    command: str | None = None,
    check_only: bool = False,
) -> EvalResult | parallel.OtherRank | None:
    """Evaluate `model` (with `adapter`, unmerged) and write RESULTS.json to `out`; returns its content.

    tasks: lm-eval task/group names ("ceval" means "ceval-valid"); empty means the benchmarks of
    `data_dir`. data_dir: "NAME=PATH" or "PATH" entries (NAME: mmlu, ceval, cmmlu, or custom: any
    subjects in MMLU's layout, scored as tasks custom_<subject> in group custom), evaluated from
    local CSV files; a bare PATH holds the benchmark `tasks` ask for (`tasks=["ceval"]`), or, without
    such tasks, the one its layout shows (layouts.resolve_data_dirs). gen_data: prompt/reference records for ROUGE/BLEU. limit: the first N questions
    of each task (generation always runs every record). num_fewshot None: 5 for MMLU/C-Eval/CMMLU,
    lm-eval's default for other tasks. chat_template None: generation uses the tokenizer's template
    when it has one, benchmarks are scored without (as published base-model scores are);
    True/False: both with/without. batch_size "auto": lm-eval's detection (benchmarks) and 64 halved
    on out-of-memory (generation) on CUDA; 8 and 16 on CPU. cache: a folder keeping every answer
    (evals/cache.py), so a killed run re-run with the same settings computes only what is missing.
    check_only: check every input and output, load nothing, return None (`wb eval --nproc`'s parent).
    Under `accelerate launch` each process scores its share (evals/parallel.py) and a rank other than 0
    returns an OtherRank, having written nothing.
    """
    started, clock = datetime.now().astimezone(), time.perf_counter()
    plan = _plan(model, adapter, tasks, data_dir, gen_data, limit, num_fewshot, max_new_tokens, batch_size,
                 device, dtype, out, force, chat_template=chat_template, system_prompt=system_prompt,
                 fewshot_as_multiturn=fewshot_as_multiturn,
                 backend=BackendOptions(backend, parallelize, max_memory_per_gpu, offload_folder, tensor_parallel_size,
                                        data_parallel_size, gpu_memory_utilization, max_model_len))
    if check_only:  # the parent of `wb eval --nproc`: everything is checked before a process starts
        return None
    world = parallel.current()
    parallel.start(world, plan.device.type)
    progress = parallel.Progress(world)
    cache_dir = Path(cache) if cache is not None else None
    try:
        with quiet_libraries(), parallel.quiet_lm_eval_bars():
            from workbench.evals.tasks import load_tasks

            task_objects = load_tasks(plan.names, plan.local, num_fewshot) if plan.names else []
            tokenizer = check_model_files(plan.model, plan.adapter, trust_remote_code)
            fingerprints = _fingerprints(plan.model, plan.adapter)
            answers_key = model_key(fingerprints, str(plan.dtype).removeprefix("torch."), plan.device.type,
                                    plan.backend.name)
            store = RequestStore(cache_dir, answers_key, world.rank) if cache_dir is not None and plan.names else None
            lm = _load_lm(plan, trust_remote_code, tokenizer)
            parallel.adopt(lm, world)
            use_template = _chat_template_choice(chat_template, lm.tokenizer)
            layer = RequestLayer(lm, store, progress, task_objects)
            try:
                lm_results = _run_lm_eval(lm, task_objects, num_fewshot, limit, plan.lm_batch, chat_template is True,
                                          system_instruction=plan.system_prompt,
                                          fewshot_as_multiturn=plan.fewshot_as_multiturn) if plan.names else {}
            finally:
                layer.close()
            generated = _run_generation(lm, plan.items, max_new_tokens, batch_size, use_template,
                                        system_prompt=plan.system_prompt, world=world, progress=progress,
                                        cache=(cache_dir, answers_key)) if plan.gen_path else None
            lm_counts = parallel.gather(layer.counts, world)  # after every rank's last request
            done, total = progress.counts()
    finally:
        progress.close()
    if not world.main:
        return parallel.OtherRank(world)

    samples = {task: sorted(records, key=lambda record: record["doc_id"])  # rank by rank -> document order
               for task, records in (lm_results.pop("samples", None) or {}).items()}
    _complete_nested_groups(lm_results)
    results: dict = {
        "wb_results_version": RESULTS_VERSION,
        "name": plan.model.resolve().name + (f"+{plan.adapter.resolve().name}" if plan.adapter else ""),
        **{key: lm_results.get(key, {}) for key in LM_EVAL_KEYS},
        "generation": None,
        "samples_file": plan.samples_path.name if plan.samples_path else None,
    }
    gen_counts = None
    if generated is not None:
        block = dict(generated[1])
        gen_counts = block.pop("cache")
        block.update(data=str(plan.gen_path.resolve()), data_sha256=sha256_file(plan.gen_path),
                     predictions_file=plan.predictions_path.name)
        results["generation"] = block
    options = {"num_fewshot": num_fewshot, "limit": limit, "batch_size": batch_size, "device": device,
               "dtype": dtype, "chat_template": chat_template, "max_new_tokens": max_new_tokens}
    results["provenance"] = {
        **_provenance(plan, fingerprints, options, command),
        "started": started.isoformat(timespec="seconds"),
        "duration_s": round(time.perf_counter() - clock, 2),
    }
    results["provenance"]["settings"] = _settings(plan, options)
    results["provenance"]["world_size"] = world.size
    results["provenance"]["requests"] = {"done": done, "total": total}
    if cache_dir is not None:
        results["provenance"]["cache"] = {"dir": str(cache_dir.resolve()), "lm_eval": summed_counts(lm_counts) if plan.names else None,
                                          "generation": gen_counts}
    if plan.samples_path is not None:
        _write_jsonl(plan.samples_path, _sample_rows(samples), force)
    if generated is not None:
        _write_jsonl(plan.predictions_path, generated[0], force)
    text = json.dumps(results, indent=2, ensure_ascii=False, default=_json_default) + "\n"
    with atomic_file(plan.out, force=force) as handle:
        handle.write(text)
    return EvalResult(json.loads(text), plan.out)


# evaluate's keyword options and their defaults, read once (a test may replace `evaluate`): `wb compare`
# forwards these.
OPTION_DEFAULTS = {name: parameter.default for name, parameter in inspect.signature(evaluate).parameters.items()
                   if parameter.kind is inspect.Parameter.KEYWORD_ONLY}


def check_launch(nproc: int, model: str | Path, **evaluation) -> None:
    """What `wb eval --nproc N`'s parent checks before it starts any process: that it is not already under
    a launcher, that the backend can run in N processes, and every input and output (`check_only`)."""
    if parallel.current().size > 1:
        raise WorkbenchError("--nproc launches the processes itself: leave it out under accelerate launch")
    from workbench.evals.backends import check_processes

    check_processes(BackendOptions(evaluation.get("backend", "hf"), evaluation.get("parallelize", False)), nproc)
    evaluate(model, check_only=True, **evaluation)


def _plan(model, adapter, tasks, data_dir, gen_data, limit, num_fewshot, max_new_tokens, batch_size, device, dtype,
          out, force, *, chat_template: bool | None = None, system_prompt: str | None = None,
          fewshot_as_multiturn: bool = False, backend: BackendOptions | None = None) -> _Plan:
    """Check every input and output path, read the data files; fail before any model is loaded."""
    from workbench.dtypes import resolve_compute_dtype, resolve_device

    backend = backend or BackendOptions()

    model, out = Path(model), Path(out)
    adapter = Path(adapter) if adapter is not None else None
    gen_path = Path(gen_data) if gen_data is not None else None
    _check_inputs(model, adapter, gen_path, max_new_tokens, limit, num_fewshot)
    _check_chat_settings(system_prompt, fewshot_as_multiturn, chat_template)
    requested = _requested_names(tasks)
    local = _open_data_dirs([data_dir] if isinstance(data_dir, (str, Path)) else list(data_dir or ()), requested)
    names = _task_names(requested, local)
    if not names and gen_path is None:
        raise WorkbenchError("nothing to evaluate: give --tasks, --data-dir or --gen-data")
    samples_path = out.with_name(f"{out.stem}.samples.jsonl") if names else None
    predictions_path = out.with_name(f"{out.stem}.predictions.jsonl") if gen_path else None
    inputs = [model, adapter, gen_path, *(bench.root for bench in local.values())]
    for target in (out, samples_path, predictions_path):
        if target is not None:
            check_can_write(target, force)
            check_not_input(target, inputs)
    torch_device = resolve_device(device)
    _check_backend(backend, torch_device)
    if backend.offload_folder is not None:
        check_not_input(Path(backend.offload_folder), inputs)
    return _Plan(
        model=model, adapter=adapter, gen_path=gen_path, local=local, names=names,
        items=_gen_items(gen_path), out=out, samples_path=samples_path, predictions_path=predictions_path,
        device=torch_device, dtype=resolve_compute_dtype(dtype, torch_device),
        lm_batch=_lm_eval_batch(batch_size, torch_device.type),
        backend=backend, system_prompt=system_prompt, fewshot_as_multiturn=fewshot_as_multiturn,
    )


def check_options(device: str, chat_template: bool | None, system_prompt: str | None, fewshot_as_multiturn: bool,
                  backend: BackendOptions) -> None:
    """The checks of `evaluate`'s options that read no file: `wb compare` makes them once, before it
    evaluates the first model."""
    from workbench.dtypes import resolve_device

    _check_chat_settings(system_prompt, fewshot_as_multiturn, chat_template)
    _check_backend(backend, resolve_device(device))


def _check_chat_settings(system_prompt: str | None, fewshot_as_multiturn: bool, chat_template: bool | None) -> None:
    if system_prompt is not None and not system_prompt.strip():
        raise WorkbenchError("--system-prompt is empty")
    if fewshot_as_multiturn and chat_template is not True:
        raise WorkbenchError("--fewshot-as-multiturn needs --chat-template: the few-shot examples become chat turns")


def _check_backend(backend: BackendOptions, device) -> None:
    """The backend options checked against this machine and launch (`--nproc` runs under a launcher)."""
    import torch

    from workbench.evals.backends import check_backend, launcher_world_size, vllm_installed

    check_backend(backend, device_type=device.type, cuda_available=torch.cuda.is_available(),
                  world_size=launcher_world_size(), vllm_installed=backend.name != "vllm" or vllm_installed())


def with_system_prompt(items: list, system_prompt: str | None) -> list:
    """--gen-data records with `system_prompt` as their system message: before a record's own system text
    (a blank line between), as lm-eval puts its system_instruction before a task's description. With a
    chat template it is the template's system turn; without one, the first line of the plain prompt."""
    if system_prompt is None:
        return items
    from dataclasses import replace

    return [replace(item, system=f"{system_prompt}\n\n{item.system}" if item.system else system_prompt)
            for item in items]


def scores(metrics: dict) -> dict[str, float]:
    """{metric: value} of one lm-eval results entry: "acc,none" -> "acc" (other filters keep their name)."""
    return {label: value for label, value, _ in _metric_items(metrics)}


def _metric_items(metrics: dict):
    """(label, value, stderr) of each numeric metric of one lm-eval results entry."""
    for key, value in metrics.items():
        metric, sep, filter_name = key.partition(",")
        if sep and not metric.endswith("_stderr") and isinstance(value, (int, float)):
            stderr = metrics.get(f"{metric}_stderr,{filter_name}")
            yield (metric if filter_name == "none" else key), value, stderr


class EvalResult(dict):
    """RESULTS.json's content, as written to `out` (a dict: what Python callers read), and what
    `wb eval` prints of it."""

    def __init__(self, results: dict, out: Path):
        super().__init__(results)
        self.out = out

    def to_json(self) -> dict:
        """What `wb eval --json` prints: the file, every task's and group's scores, the generation
        metrics, the side files."""
        generation = self.get("generation") or {}
        return {
            "results": str(self.out),
            "name": self["name"],
            "scores": {name: scores(metrics) for name, metrics in self["results"].items()},
            "generation": generation.get("metrics"),
            "samples_file": self["samples_file"],
            "predictions_file": generation.get("predictions_file"),
        }

    def lines(self) -> list[str]:
        """One line per task/group and metric, then the generation metrics, then (stderr) the file."""
        lines = []
        for name, metrics in self["results"].items():
            n = self["n-samples"].get(name, {}).get("effective", metrics.get("sample_len", ""))
            shots = self["n-shot"].get(name, "")
            for metric, value, stderr in _metric_items(metrics):
                spread = f" ± {stderr:.4f}" if isinstance(stderr, (int, float)) else ""
                lines.append(f"{name:<44} {metric:<9} {value:.4f}{spread}  (n={n}, {shots}-shot)")
        generation = self.get("generation")
        if generation:
            figures = "  ".join(f"{k} {v:.2f}" for k, v in generation["metrics"].items())
            lines.append(f"generation ({generation['n']} prompts): {figures}")
        return [*lines, *self._cache_notes(), Note(f"wrote {self.out}")]

    def _cache_notes(self) -> list[Note]:
        """--cache: how much came from the cache, and damaged cache lines that were skipped."""
        cache = self["provenance"].get("cache")
        if not cache:
            return []
        parts = [f"{block['from_cache']} of {block['requests']} {what}" for what, block in
                 (("lm-eval requests", cache.get("lm_eval")), ("generations", cache.get("generation"))) if block]
        notes = [Note(f"cache {cache['dir']}: {', '.join(parts)} taken from it")]
        skipped = (cache.get("generation") or {}).get("skipped_lines")
        if skipped:
            notes.append(Note(f"note: {skipped} damaged line(s) of the generation cache were skipped (regenerated)"))
        return notes


# -- inputs ----------------------------------------------------------------------------------------
def _check_inputs(model: Path, adapter: Path | None, gen_path: Path | None, max_new_tokens: int,
                  limit: int | None, num_fewshot: int | None) -> None:
    if not model.is_dir():
        raise WorkbenchError("--model must be a model folder (config.json, tokenizer, weights)", model)
    if adapter is not None and not (adapter / "adapter_config.json").is_file():
        raise WorkbenchError("--adapter must be a PEFT adapter folder (adapter_config.json)", adapter)
    if gen_path is not None and not gen_path.is_file():
        raise WorkbenchError("--gen-data is not a file", gen_path)
    if max_new_tokens < 1:
        raise WorkbenchError("--max-new-tokens must be at least 1")
    if limit is not None and limit < 1:
        raise WorkbenchError("--limit must be at least 1")
    if num_fewshot is not None and num_fewshot < 0:
        raise WorkbenchError("--num-fewshot cannot be negative")


def _open_data_dirs(specs: list[str], requested: list[str]) -> dict:
    """{benchmark: LocalBenchmark}. The tasks asked for decide what a bare folder holds (`--tasks ceval
    --data-dir DIR` reads DIR as C-Eval); without such tasks its layout tells (layouts.resolve_data_dirs)."""
    from workbench.evals.layouts import parse_data_dir, resolve_data_dirs

    wanted: set[str] = set()
    if requested and any(parse_data_dir(str(spec))[0] is None for spec in specs):
        from workbench.evals.tasks import family_members

        members = family_members()
        wanted = {members[name] for name in requested if name in members}
    local = {}
    for folder in resolve_data_dirs([str(spec) for spec in specs], wanted):
        name = folder.benchmark.name
        if name in local:
            raise WorkbenchError(f"two --data-dir folders hold {name}: {local[name].given} and {folder.given}")
        local[name] = folder
    return local


def _requested_names(tasks) -> list[str]:
    """The names given (comma lists allowed, aliases resolved, duplicates dropped)."""
    from workbench.evals.tasks import canonical

    names: list[str] = []
    for entry in [tasks] if isinstance(tasks, str) else tasks or ():
        for name in str(entry).split(","):
            name = canonical(name.strip())
            if name and name not in names:
                names.append(name)
    return names


def _task_names(tasks, local: dict) -> list[str]:
    """The requested names, checked against the local folders; none: the local benchmarks' groups."""
    from workbench.evals.tasks import local_members

    names = _requested_names(tasks)
    if not names:
        return [folder.benchmark.group for folder in local.values()]
    members = local_members(local)
    for benchmark, folder in local.items():
        if not any(members.get(name) == benchmark for name in names):
            raise WorkbenchError(f"--data-dir {benchmark} is given but no {benchmark} task is asked for", folder.given)
    return names


def _gen_items(gen_path: Path | None) -> list:
    if gen_path is None:
        return []
    from workbench.evals.gendata import load_gen_data

    return load_gen_data(gen_path)


def _lm_eval_batch(batch_size: int | str, device_type: str) -> int | str:
    if batch_size == "auto":
        return "auto" if device_type == "cuda" else CPU_LM_EVAL_BATCH
    try:
        size = int(batch_size)
    except ValueError:
        raise WorkbenchError(f"--batch-size must be 'auto' or a positive integer, not {batch_size!r}") from None
    if size < 1:
        raise WorkbenchError("--batch-size must be at least 1")
    return size


# -- model -----------------------------------------------------------------------------------------
def _fingerprints(model: Path, adapter: Path | None) -> dict:
    return {
        "model_files": provenance.weight_fingerprints(model),
        "adapter_files": provenance.weight_fingerprints(adapter) if adapter else {},
    }


def check_model_files(model: Path, adapter: Path | None = None, trust_remote_code: bool = False):
    """Check what transformers and peft would read, so that a bad file fails with one line, before loading.

    The weights are opened as `wb` opens them (a pickle that `weights_only` rejects, a damaged
    safetensors header: refused naming the file); a LoRA adapter's tensors are checked against the
    model's (`_adapter_mismatch`); the tokenizer is loaded (and returned, for HFLM).
    """
    from workbench.io.reader import open_checkpoint

    model, adapter = Path(model), Path(adapter) if adapter is not None else None
    read_model_config(model, "config.json, tokenizer and weights")  # its numbers, before transformers builds on them
    with open_checkpoint(model) as base:
        if adapter is not None:
            _check_adapter(adapter, base, _config_vocab_size(model))
    if adapter is not None:  # what peft would refuse once the model is loaded, and warnings (wb compat)
        from workbench.weights.compat import check_before, print_notes

        print_notes(check_before("eval", model, adapter))
    return load_tokenizer(tokenizer_folder(model, adapter), trust_remote_code)


def _check_adapter(adapter: Path, base, vocab_size: int | None) -> None:
    from workbench.io.reader import open_checkpoint
    from workbench.weights.adapters.lora import ADAPTER_WEIGHTS, read_lora_adapter

    weights = next((adapter / name for name in ADAPTER_WEIGHTS if (adapter / name).is_file()), None)
    if weights is None:
        raise WorkbenchError(f"adapter has no weights ({' or '.join(ADAPTER_WEIGHTS)})", adapter)
    with open_checkpoint(weights):  # a pickle weights_only rejects fails here, naming the file
        pass
    try:
        lora = read_lora_adapter(adapter)
    except WorkbenchError:  # not plain LoRA (DoRA, another PEFT type, ...): peft checks it; see _load_lm
        return
    try:
        problem = _adapter_mismatch(lora, base, vocab_size)
    finally:
        lora.checkpoint.close()
    if problem:
        raise WorkbenchError(f"adapter was made for another base: {problem}", adapter)


def _adapter_mismatch(lora, base, vocab_size: int | None) -> str | None:
    """What in a LoRA adapter does not fit the model's checkpoint `base`, or None.

    Every tensor the adapter changes must exist in the base with the shape the adapter's update has
    (a vocabulary-sized dimension may differ: lm-eval resizes the embeddings to the adapter's
    tokenizer). `lm_head.weight` may be absent (tied embeddings). When none of the targets is found
    under its name but every module name occurs, the checkpoint names its tensors differently from
    the model's modules (a prefix): peft matches by module, so the decision is left to it.
    """
    targets = {**{t: ("lora", pair) for t, pair in lora.modules.items()},
               **{t: ("whole", name) for t, name in lora.replacements.items()}}
    targets = {t: v for t, v in targets.items() if t in base or t != "lm_head.weight"}
    if not any(target in base for target in targets):
        components = {part for name in base.names() for part in name.split(".")}
        for target in targets:
            leaf = target.removesuffix(".weight").rsplit(".", 1)[-1]
            if leaf not in components:
                return f"it adapts modules named {leaf!r} ({target.removesuffix('.weight')}), which the model has none of"
        return None
    for target, (kind, ref) in targets.items():
        module = target.removesuffix(".weight")
        if target not in base:
            return f"it has weights for {module!r}, which the model does not have"
        theirs = tuple(base.info(target).shape)
        if kind == "lora":
            a, b = tuple(lora.checkpoint.info(ref.a_name).shape), tuple(lora.checkpoint.info(ref.b_name).shape)
            updates = [(b[0], a[1]), (a[1], b[0])]  # B @ A, or its transpose (embeddings, Conv1D)
            mine = updates[1] if ref.embedding else updates[0]
            fits = any(_shape_fits(u, theirs, vocab_size) for u in ([mine] if ref.embedding else updates))
        else:
            mine = tuple(lora.checkpoint.info(ref).shape)
            fits = _shape_fits(mine, theirs, vocab_size)
        if not fits:
            return (f"{module!r} is {_shape(theirs)} in the model, but the adapter's "
                    f"{'LoRA update' if kind == 'lora' else 'tensor'} for it is {_shape(mine)}")
    return None


def _shape_fits(mine: tuple, theirs: tuple, vocab_size: int | None) -> bool:
    return len(mine) == len(theirs) and all(m == t or (vocab_size is not None and t == vocab_size)
                                            for m, t in zip(mine, theirs))


def _shape(shape: tuple) -> str:
    return "x".join(str(d) for d in shape) or "a scalar"


def _config_vocab_size(model: Path) -> int | None:
    try:
        config = read_model_config(model, "config.json, tokenizer and weights")
    except WorkbenchError:  # transformers reports a missing or damaged config.json when it loads the model
        return None
    for source in (config, config.get("text_config")):
        if isinstance(source, dict) and isinstance(source.get("vocab_size"), int):
            return source["vocab_size"]
    return None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model", "tokenizer.tiktoken", "tiktoken.model")


def tokenizer_folder(model: Path, adapter: Path | None) -> Path:
    """The adapter folder when it has a tokenizer (a fine-tune may add tokens or a template), else the model's."""
    return adapter if adapter is not None and (adapter / "tokenizer_config.json").is_file() else model


def load_tokenizer(folder: Path, trust_remote_code: bool):
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise WorkbenchError("no tokenizer in the folder (tokenizer.json, tokenizer_config.json, tokenizer.model "
                             "or vocab.json); copy the base model's tokenizer files into it", folder)
    from transformers import AutoTokenizer

    try:  # as lm-eval's HFLM loads it
        return AutoTokenizer.from_pretrained(str(folder.resolve()), trust_remote_code=trust_remote_code, use_fast=True)
    except (OSError, ValueError, KeyError, TypeError, ImportError) as exc:
        raise WorkbenchError(f"could not load the tokenizer: {one_line(exc)}", folder) from None


def one_line(exc: BaseException, limit: int = 400) -> str:
    """An exception's message as one line (transformers' and peft's span several), shortened."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _load_lm(plan: _Plan, trust_remote_code: bool, tokenizer=None):
    """lm-eval's HFLM: the model (with the adapter as a PeftModel, unmerged) and its tokenizer; with
    --backend vllm, lm-eval's VLLM (the adapter through vLLM's LoRA support).

    The tokenizer comes from the adapter folder when it has one (a fine-tune may add tokens or a
    chat template), else from the model folder; `tokenizer` is that one, loaded already.
    """
    import transformers

    from workbench.evals import backends

    model, adapter = plan.model, plan.adapter
    if plan.backend.name == "vllm":
        return backends.load_vllm(backends.vllm_model_args(
            model, adapter, tokenizer_folder(model, adapter), str(plan.dtype).removeprefix("torch."), plan.lm_batch,
            plan.backend, trust_remote_code))
    from lm_eval.models.huggingface import HFLM

    if not isinstance(tokenizer, (transformers.PreTrainedTokenizer, transformers.PreTrainedTokenizerFast)):
        tokenizer = str(tokenizer_folder(model, adapter).resolve())  # HFLM takes only these two classes as objects
    try:
        return HFLM(
            pretrained=str(model.resolve()),  # absolute: lm-eval never mistakes it for a hub id
            tokenizer=tokenizer,
            peft=str(adapter.resolve()) if adapter is not None else None,
            device=str(plan.device),
            dtype=plan.dtype,
            batch_size=plan.lm_batch,
            trust_remote_code=trust_remote_code,
            **backends.hf_model_args(plan.backend),
        )
    except RuntimeError as exc:  # peft loading a state dict of other shapes; anything else is unexpected
        mismatches = [line.strip() for line in str(exc).splitlines() if "size mismatch" in line]
        if adapter is None or not mismatches:
            raise
        more = f" (and {len(mismatches) - 1} more)" if len(mismatches) > 1 else ""
        raise WorkbenchError(f"adapter was made for another base: {mismatches[0]}{more}", adapter) from None
    except (OSError, ValueError, KeyError) as exc:
        text = one_line(exc)
        if adapter is not None and "not found in the base model" in text:  # peft: no module to attach to
            raise WorkbenchError(f"adapter was made for another base: {text}", adapter) from None
        raise WorkbenchError(f"could not load the model: {text}", adapter or model) from None


def _chat_template_choice(chat_template: bool | None, tokenizer) -> bool:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat_template and not has_template:
        raise WorkbenchError("--chat-template was asked for but the tokenizer has no chat template")
    return has_template if chat_template is None else chat_template


# -- lm-eval ---------------------------------------------------------------------------------------
def _run_lm_eval(lm, task_objects: list, num_fewshot: int | None, limit: int | None, batch, chat: bool, *,
                 system_instruction: str | None = None, fewshot_as_multiturn: bool = False) -> dict:
    from lm_eval import simple_evaluate

    from workbench.evals.tasks import task_manager

    # lm-eval asks `git describe` for the current folder's commit (printing git's "fatal: not a git
    # repository" outside one); the user's working folder says nothing about the evaluation.
    no_git = mock.patch("lm_eval.evaluator.get_git_commit_hash", lambda: None)
    try:
        with no_git:
            return simple_evaluate(
                model=lm,
                tasks=task_objects,
                num_fewshot=num_fewshot,
                limit=limit,
                batch_size=batch,
                log_samples=True,
                apply_chat_template=chat,
                system_instruction=system_instruction,
                fewshot_as_multiturn=fewshot_as_multiturn,  # explicit: simple_evaluate's own default is True
                task_manager=task_manager(False),  # tasks come built; spare lm-eval its full index
            )
    except (AssertionError, ValueError) as exc:  # e.g. more shots asked for than the dev split has
        raise WorkbenchError(f"lm-eval failed: {exc}") from None


def _complete_nested_groups(lm_results: dict) -> None:
    """Give a group of groups (mmlu) the n-shot and higher_is_better its subjects agree on.

    lm-eval copies them one level up only, in no fixed order, so `mmlu` (whose children are the
    four category groups) may come out without them.
    """
    subtasks = lm_results.get("group_subtasks", {})

    def leaves(name: str) -> list[str]:
        return [leaf for child in subtasks[name] for leaf in leaves(child)] if name in subtasks else [name]

    shots, better = lm_results.get("n-shot", {}), lm_results.get("higher_is_better", {})
    for group in subtasks:
        tasks = leaves(group)
        values = {shots.get(task) for task in tasks}
        if group not in shots and len(values) == 1 and None not in values:
            shots[group] = values.pop()
        merged: dict = {}
        for task in tasks:
            for metric, direction in better.get(task, {}).items():
                merged[metric] = direction if merged.get(metric, direction) == direction else None
        if group not in better and merged:
            better[group] = merged


def _sample_rows(samples: dict[str, list[dict]]) -> Iterator[dict]:
    """lm-eval's per-sample records, kept small: ids, hashes, target, metrics and the model's answer."""
    for task, records in samples.items():
        for record in records:
            row = {
                "task": task,
                "doc_id": record["doc_id"],
                "doc_hash": record["doc_hash"],
                "prompt_hash": record["prompt_hash"],
                "target": record["target"],
            }
            row.update({metric: record[metric] for metric in record["metrics"]})
            row.update(_answer(record["filtered_resps"]))
            yield row


def _answer(responses: list) -> dict:
    """The model's side of one sample: log-likelihoods (and the chosen option), or generated text."""
    if all(isinstance(r, (list, tuple)) and len(r) == 2 and isinstance(r[0], (int, float)) for r in responses):
        scores = [float(r[0]) for r in responses]
    elif all(isinstance(r, (int, float)) for r in responses):
        scores = [float(r) for r in responses]
    else:
        return {"responses": [r if isinstance(r, str) else str(r) for r in responses]}
    answer: dict = {"loglikelihoods": [round(s, 4) for s in scores]}
    if len(scores) > 1:
        answer["choice"] = max(range(len(scores)), key=scores.__getitem__)
    return answer


# -- generation ------------------------------------------------------------------------------------
def _run_generation(lm, items: list, max_new_tokens: int, batch_size, use_template: bool, *,
                    system_prompt: str | None = None, world: parallel.World | None = None, progress=None,
                    cache: tuple[Path | None, str] | None = None) -> tuple[list[dict], dict] | None:
    """Greedy answers to `items`, scored: (prediction rows, the RESULTS.json block) on rank 0, None elsewhere.

    Each rank generates every world.size-th record (parallel.shard); the answers are gathered to rank 0
    in the records' order. cache (folder, model key): answers found there are not generated again, new
    ones are appended as each batch ends; the block's "cache" entry counts them.
    """
    from workbench.evals.genmetrics import score, summarize

    world = world or parallel.World(0, 1)
    progress = progress or parallel.Progress(world)
    add_special_tokens = not use_template
    prompts = _gen_prompts(lm.tokenizer, items, use_template, system_prompt)
    store = _generation_store(cache, world, max_new_tokens, use_template, add_special_tokens)
    known = store.load() if store is not None else {}
    parallel.barrier(world)  # every rank has read the cache files before any rank appends to its own
    mine = parallel.shard(len(items), world)
    answers = {index: known[prompts[index]] for index in mine if prompts[index] in known}
    todo = [index for index in mine if index not in answers]
    progress.add_total(len(mine))
    progress.advance(len(answers))
    started = time.perf_counter()
    computed_tokens = _generate_missing(lm, [prompts[i] for i in todo], max_new_tokens, batch_size,
                                        add_special_tokens, store, progress, answers, todo)
    parts = parallel.gather(({index: answers[index] for index in mine}, computed_tokens, len(mine) - len(todo),
                             sum(store.skipped.values()) if store is not None else 0), world)
    seconds = time.perf_counter() - started
    if not world.main:
        return None
    merged = {index: answer for part in parts for index, answer in part[0].items()}
    rows, per_sample = [], []
    for index, item in enumerate(items):
        prediction = merged[index][0]
        scores = score(prediction, item.reference)
        per_sample.append(scores)
        rows.append({"id": item.id, "prompt": item.prompt, "reference": item.reference, "prediction": prediction, **scores})
    means, errors = summarize(per_sample)
    computed = sum(part[1] for part in parts)
    block = {
        "n": len(items),
        "max_new_tokens": max_new_tokens,
        "chat_template": use_template,
        "metrics": means,
        "stderr": errors,
        "new_tokens": sum(answer[1] for answer in merged.values()),
        "tokens_per_s": round(computed / seconds, 2) if seconds > 0 else 0.0,
        "cache": {"requests": len(items), "from_cache": sum(part[2] for part in parts),
                  "skipped_lines": sum(part[3] for part in parts)} if store is not None else None,
    }
    return rows, block


def _gen_prompts(tokenizer, items: list, use_template: bool, system_prompt: str | None) -> list[str]:
    """Each record's prompt text; --system-prompt leads its system turn (with_system_prompt)."""
    items = with_system_prompt(items, system_prompt)
    if use_template:
        return [tokenizer.apply_chat_template(i.messages(), tokenize=False, add_generation_prompt=True) for i in items]
    return [item.plain_text() for item in items]


def _generation_store(cache: tuple[Path | None, str] | None, world: parallel.World, max_new_tokens: int,
                      use_template: bool, add_special_tokens: bool):
    """The generation cache of these settings (the prompt text carries template and system prompt)."""
    if cache is None or cache[0] is None:
        return None
    from workbench.evals.cache import GenerationStore, digest

    key = digest({"model": cache[1], "max_new_tokens": max_new_tokens, "chat_template": use_template,
                  "add_special_tokens": add_special_tokens, "decoding": "greedy"})
    return GenerationStore(cache[0], key, world.rank, max_new_tokens)


def _generate_missing(lm, prompts: list[str], max_new_tokens: int, batch_size, add_special_tokens: bool,
                      store, progress, answers: dict, indices: list[int]) -> int:
    """Generate `prompts` (records `indices`) into `answers` {index: (text, new tokens)}, each batch cached
    and counted as it ends; the new tokens generated."""
    from workbench.evals.backends import is_vllm, vllm_generate
    from workbench.evals.generate import generate

    def finished(batch: list[int], texts: list[str], counts: list[int]) -> None:
        for position, text, count in zip(batch, texts, counts):
            answers[indices[position]] = (text, count)
        if store is not None:
            store.append([(prompts[position], text, count) for position, text, count in zip(batch, texts, counts)])
        progress.advance(len(batch))

    if not prompts:
        return 0
    if is_vllm(lm):  # one call: vLLM schedules the batches (and its data-parallel replicas) itself
        output = vllm_generate(lm, prompts, max_new_tokens, add_special_tokens)
        counts = output.counts or [len(lm.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in output.texts]
        finished(list(range(len(prompts))), output.texts, counts)
        return output.new_tokens
    size = None if batch_size == "auto" else int(batch_size)
    output = generate(lm.model, lm.tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=size,
                      add_special_tokens=add_special_tokens, on_batch=finished)
    return output.new_tokens


# -- output ----------------------------------------------------------------------------------------
def _write_jsonl(path: Path, rows, force: bool) -> None:
    with atomic_file(path, force=force) as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False, default=_json_default) + "\n")


def _json_default(value):
    if hasattr(value, "item"):  # numpy and torch scalars
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


def _provenance(plan: _Plan, fingerprints: dict, options: dict, command: str | None) -> dict:
    return {
        "model": str(plan.model.resolve()),
        "adapter": str(plan.adapter.resolve()) if plan.adapter else None,
        **fingerprints,
        "dtype": str(plan.dtype).removeprefix("torch."),
        "device": str(plan.device),
        "placement": _placement(plan),
        "versions": provenance.versions(VERSIONED, python=False),
        "command": command or provenance.command_line(_eval_argv(plan, options)),
    }


def _settings(plan: _Plan, options: dict) -> dict:
    return {
        "tasks": plan.names,
        "num_fewshot": options["num_fewshot"],
        "limit": options["limit"],
        "data_dir": {name: str(folder.given) for name, folder in plan.local.items()},
        "gen_data": str(plan.gen_path.resolve()) if plan.gen_path else None,
        "batch_size": options["batch_size"],
        "chat_template": options["chat_template"],
        "max_new_tokens": options["max_new_tokens"],
        "system_prompt": plan.system_prompt,
        "fewshot_as_multiturn": plan.fewshot_as_multiturn,
        "backend": plan.backend.name,
        "max_model_len": plan.backend.max_model_len,
    }


def _placement(plan: _Plan) -> dict:
    """Where the model ran (not a setting: the scores do not depend on it, `wb compare` re-uses across it)."""
    backend = plan.backend
    if backend.name == "vllm":
        return {"backend": "vllm", "tensor_parallel_size": backend.tensor_parallel_size,
                "data_parallel_size": backend.data_parallel_size,
                "gpu_memory_utilization": backend.gpu_memory_utilization}
    return {"backend": "hf", "parallelize": backend.parallelize, "max_memory_per_gpu": backend.max_memory_per_gpu,
            "offload_folder": str(Path(backend.offload_folder).resolve()) if backend.offload_folder else None}


def _eval_argv(plan: _Plan, options: dict) -> list[str]:
    """The `wb eval` arguments equivalent to a call made from Python."""
    parts = ["eval", "--model", str(plan.model)]
    if plan.adapter:
        parts += ["--adapter", str(plan.adapter)]
    if plan.names:
        parts += ["--tasks", ",".join(plan.names)]
    for name, folder in plan.local.items():
        parts += ["--data-dir", f"{name}={folder.given}"]
    if plan.gen_path:
        parts += ["--gen-data", str(plan.gen_path), "--max-new-tokens", str(options["max_new_tokens"])]
    for flag in ("num_fewshot", "limit"):
        if options[flag] is not None:
            parts += [f"--{flag.replace('_', '-')}", str(options[flag])]
    parts += ["--batch-size", str(options["batch_size"]), "--device", options["device"], "--dtype", options["dtype"]]
    if options["chat_template"] is not None:
        parts.append("--chat-template" if options["chat_template"] else "--no-chat-template")
    if plan.system_prompt is not None:
        parts += ["--system-prompt", plan.system_prompt]
    if plan.fewshot_as_multiturn:
        parts.append("--fewshot-as-multiturn")
    return [*parts, *_backend_argv(plan.backend), "--out", str(plan.out)]


def _backend_argv(backend: BackendOptions) -> list[str]:
    if backend.name == "vllm":
        parts = ["--backend", "vllm", "--tensor-parallel-size", str(backend.tensor_parallel_size),
                 "--data-parallel-size", str(backend.data_parallel_size),
                 "--gpu-memory-utilization", str(backend.gpu_memory_utilization)]
        return parts + (["--max-model-len", str(backend.max_model_len)] if backend.max_model_len else [])
    if not backend.parallelize:
        return []
    parts = ["--parallelize"]
    if backend.max_memory_per_gpu is not None:
        parts += ["--max-memory-per-gpu", backend.max_memory_per_gpu]
    if backend.offload_folder is not None:
        parts += ["--offload-folder", str(backend.offload_folder)]
    return parts


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """lm-eval and transformers warn about every task built from a custom dataset; keep errors only.

    transformers' own progress bar ("Loading weights") is off too: a 0.1 s bar before every run, and
    the line an adapter failure's one `error:` line would otherwise follow.
    """
    from transformers.utils import logging as transformers_logging

    loggers = [logging.getLogger(name) for name in ("lm_eval", "transformers", "datasets", "accelerate")]
    levels = [logger.level for logger in loggers]
    bars = transformers_logging.is_progress_bar_enabled()
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        if bars:
            transformers_logging.enable_progress_bar()
