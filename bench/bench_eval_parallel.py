"""`wb eval --nproc 2` against one process, and `wb eval --cache` re-run against a fresh run.

All runs are the same `wb eval` command line, in the same bench run, on the same random Llama (hidden
512, 6 layers, built in-process) and the same questions: an MMLU-layout folder of 4 subjects written
here (1-shot multiple choice) plus greedy generation for 48 records. Each wall time is the whole
command (`python -m workbench eval ...`: imports, model load, launch included), so the ratios are what
a user waits; provenance.duration_s (from the start of `evaluate`, imports excluded) is reported beside it.
The data-parallel run must give the same scores and generations as the one-process run.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUBJECTS = ("anatomy", "nutrition", "astronomy", "virology")
QUESTIONS = 100  # per subject
RECORDS = 48
MAX_NEW_TOKENS = 48


def run(work_dir: Path) -> dict:
    from bench.measure import run_measured, target

    model, data, gen = _model(work_dir / "model"), _questions(work_dir / "mmlu"), _records(work_dir / "gen.json")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    loads: dict[str, float] = {}

    def wb_eval(name: str, *extra: str) -> tuple[dict, dict]:
        out = work_dir / name / "R.json"
        command = [sys.executable, "-m", "workbench", "eval", "--model", str(model), "--data-dir", f"mmlu={data}",
                   "--num-fewshot", "1", "--gen-data", str(gen), "--max-new-tokens", str(MAX_NEW_TOKENS),
                   "--batch-size", "8", "--device", "cpu", "--out", str(out), *extra]
        loads[name] = round(os.getloadavg()[0], 2)  # other work on the machine shares its cores
        measured = run_measured(command, env=env)
        if measured["returncode"] != 0:
            raise RuntimeError(f"{name}: {measured['stderr_tail']}")
        return measured, json.loads(out.read_text())

    one, one_results = wb_eval("one", "--cache", str(work_dir / "cache"))  # also the cache's fresh run
    two, two_results = wb_eval("two", "--nproc", "2")
    resumed, resumed_results = wb_eval("resumed", "--cache", str(work_dir / "cache"))
    same = {
        "scores": two_results["results"] == one_results["results"] == resumed_results["results"],
        "generations": _predictions(work_dir / "two") == _predictions(work_dir / "one") == _predictions(work_dir / "resumed"),
    }
    cache = resumed_results["provenance"]["cache"]
    requests = one_results["provenance"]["requests"]["total"]
    return {
        "figures": {
            "n_questions": QUESTIONS * len(SUBJECTS),
            "n_generation_records": RECORDS,
            "n_requests": requests,
            "max_new_tokens": MAX_NEW_TOKENS,
            "cpus": os.cpu_count(),
            "one_process_wall_s": one["wall_s"],
            "two_processes_wall_s": two["wall_s"],
            "resumed_wall_s": resumed["wall_s"],
            "one_process_eval_s": one_results["provenance"]["duration_s"],
            "two_processes_eval_s": two_results["provenance"]["duration_s"],
            "resumed_eval_s": resumed_results["provenance"]["duration_s"],
            "one_process_generation_s": _generation_s(one_results),
            "two_processes_generation_s": _generation_s(two_results),
            "resumed_from_cache": {"lm_eval": cache["lm_eval"]["from_cache"],
                                   "generation": cache["generation"]["from_cache"]},
            "identical_to_one_process": same,
            "load_average_1m_before": loads,
        },
        "targets": {
            "two_process_wall_ratio": target(two["wall_s"] / one["wall_s"], 0.65),
            "resumed_wall_ratio": target(resumed["wall_s"] / one["wall_s"], 0.2),
        },
    }


def _model(folder: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import make_model, make_tokenizer, save_layout, state_dict_for_files

    tokenizer = make_tokenizer()
    model = make_model(len(tokenizer), hidden=512, layers=6, intermediate=1376, seed=0)
    model.config.max_position_embeddings = 1024  # byte-level tokens: a 1-shot prompt runs past tiny's 256
    return save_layout(state_dict_for_files(model), folder, config=model.config, tokenizer=tokenizer)


def _questions(root: Path) -> Path:
    """MMLU's CSV layout: data/dev and data/test, no header; answers spread over A-D."""
    for subject in SUBJECTS:
        for split, count in (("dev", 5), ("test", QUESTIONS)):
            path = root / "data" / split / f"{subject}_{split}.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("w", encoding="utf-8", newline="") as handle:
                csv.writer(handle).writerows(
                    [[f"In {subject}, question {i}: which of these colours comes {i % 7} places after red?",
                      "red", "blue", "green", "black", "ABCD"[(i * 7) % 4]] for i in range(count)])
    return root


def _records(path: Path) -> Path:
    records = [{"instruction": f"Write an advertisement for dress number {i}.", "input": "black, striped",
                "output": f"Dress {i}: a black dress with stripes, simple and elegant."} for i in range(RECORDS)]
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def _generation_s(results: dict) -> float:
    """The generation phase's seconds: its tokens over its tokens per second."""
    block = results["generation"]
    return round(block["new_tokens"] / block["tokens_per_s"], 2) if block["tokens_per_s"] else 0.0


def _predictions(folder: Path) -> list[str]:
    lines = (folder / "R.predictions.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["prediction"] for line in lines]
