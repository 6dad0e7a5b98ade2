"""`wb eval --cache DIR`: a run killed midway re-run with the same settings computes only what is missing.

The oracle is the same run without a cache: a resumed run's scores, samples and predictions equal it;
RESULTS.json's provenance.cache counts what came from DIR. The cache files are hostile input: damaged
lines and rows are skipped, a damaged database is one error line, another model's answers are never used.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from clicheck import assert_one_error
from click.testing import CliRunner
from tiny import MMLU_SUBJECTS, read_jsonl, write_gen_data, write_mmlu

from workbench.cli import wb
from workbench.errors import WorkbenchError
from workbench.evals.cache import GenerationStore, RequestStore, digest, model_key, valid_response
from workbench.evals.run import _fingerprints, evaluate

RECORDS = 60


pytestmark = pytest.mark.usefixtures("one_thread")


def args(model: Path, data: Path, gen: Path, out: Path, *extra: str) -> list[str]:
    return ["eval", "--model", str(model), "--data-dir", f"mmlu={data}", "--num-fewshot", "1", "--gen-data", str(gen),
            "--max-new-tokens", "24", "--batch-size", "1", "--device", "cpu", "--out", str(out), *extra]


def lines_in(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def same_answers(one: Path, other: Path) -> None:
    first, second = json.loads(one.read_text()), json.loads(other.read_text())
    assert second["results"] == first["results"] and second["groups"] == first["groups"]
    assert second["generation"]["metrics"] == first["generation"]["metrics"]
    assert second["generation"]["new_tokens"] == first["generation"]["new_tokens"]
    for suffix in ("samples", "predictions"):
        name = f".{suffix}.jsonl"
        assert read_jsonl(other.with_suffix(name)) == read_jsonl(one.with_suffix(name))


@pytest.mark.slow
def test_a_killed_run_resumes_from_the_cache(tmp_path, tiny_model):
    data, gen = write_mmlu(tmp_path / "mmlu"), write_gen_data(tmp_path / "gen.json", RECORDS)
    cache = tmp_path / "cache"
    fresh = CliRunner().invoke(wb, args(tiny_model, data, gen, tmp_path / "fresh" / "R.json"))
    assert fresh.exit_code == 0, fresh.output

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = subprocess.Popen([sys.executable, "-m", "workbench", *args(tiny_model, data, gen, tmp_path / "k" / "R.json",
                                                                        "--cache", str(cache))],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    answers = cache / "generations_rank0.jsonl"
    deadline = time.monotonic() + 240
    while lines_in(answers) < 3 and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=60)
    kept = lines_in(answers)
    assert 3 <= kept < RECORDS and not (tmp_path / "k" / "R.json").exists()

    resumed = CliRunner().invoke(wb, args(tiny_model, data, gen, tmp_path / "resumed" / "R.json", "--cache", str(cache)))
    assert resumed.exit_code == 0, resumed.output
    same_answers(tmp_path / "fresh" / "R.json", tmp_path / "resumed" / "R.json")
    counts = json.loads((tmp_path / "resumed" / "R.json").read_text())["provenance"]["cache"]
    questions = sum(MMLU_SUBJECTS.values()) * 4  # every benchmark request was answered before generation
    assert counts["dir"] == str(cache.resolve())
    assert counts["lm_eval"] == {"requests": questions, "from_cache": questions,
                                 "loglikelihood": {"requests": questions, "from_cache": questions}}
    assert counts["generation"] == {"requests": RECORDS, "from_cache": kept, "skipped_lines": 0}
    assert lines_in(answers) == RECORDS
    assert (f"cache {cache.resolve()}: {questions} of {questions} lm-eval requests, {kept} of {RECORDS} generations "
            "taken from it") in resumed.stderr

    again = CliRunner().invoke(wb, args(tiny_model, data, gen, tmp_path / "again" / "R.json", "--cache", str(cache)))
    assert again.exit_code == 0, again.output
    same_answers(tmp_path / "fresh" / "R.json", tmp_path / "again" / "R.json")
    counts = json.loads((tmp_path / "again" / "R.json").read_text())["provenance"]["cache"]
    assert counts["lm_eval"]["from_cache"] == questions and counts["generation"]["from_cache"] == RECORDS
    assert lines_in(answers) == RECORDS  # nothing generated, nothing appended


def test_more_questions_reuse_the_ones_scored(tmp_path, tiny_model):
    """lm-eval's requests are keyed by their text: --limit 3 after --limit 2 scores only the third question."""
    data, cache = write_mmlu(tmp_path / "mmlu"), tmp_path / "cache"
    for limit in (2, 3):
        evaluate(tiny_model, data_dir=[f"mmlu={data}"], num_fewshot=1, limit=limit, device="cpu", cache=cache,
                 out=tmp_path / f"R{limit}.json")
    counts = json.loads((tmp_path / "R3.json").read_text())["provenance"]["cache"]["lm_eval"]
    assert counts["loglikelihood"] == {"requests": 3 * 2 * 4, "from_cache": 2 * 2 * 4}
    reference = evaluate(tiny_model, data_dir=[f"mmlu={data}"], num_fewshot=1, limit=3, device="cpu",
                         out=tmp_path / "plain.json")
    assert json.loads((tmp_path / "R3.json").read_text())["results"] == reference["results"]


def test_another_model_never_reads_the_answers(tmp_path, tiny_models):
    gen, cache = write_gen_data(tmp_path / "gen.json", 2), tmp_path / "cache"
    for seed, expected in ((0, 0), (1, 0), (0, 2)):
        result = evaluate(tiny_models(seed=seed), gen_data=gen, max_new_tokens=3, device="cpu", cache=cache, force=True,
                          out=tmp_path / f"R{seed}.json")
        assert result["provenance"]["cache"]["generation"]["from_cache"] == expected, seed
        assert result["provenance"]["cache"]["lm_eval"] is None  # no benchmark: no request database
    other = evaluate(tiny_models(seed=0), gen_data=gen, max_new_tokens=4, device="cpu", cache=cache,
                     out=tmp_path / "R4.json")
    assert other["provenance"]["cache"]["generation"]["from_cache"] == 0  # other settings, other key
    assert not (cache / "lm_eval").exists()


def test_damaged_generation_lines_are_skipped_and_counted(tmp_path):
    store = GenerationStore(tmp_path, "k1", 0, max_new_tokens=8)
    store.append([("p1", "answer one", 3)])
    good = (tmp_path / "generations_rank0.jsonl").read_text(encoding="utf-8")
    other_rank = tmp_path / "generations_rank1.jsonl"
    other_rank.write_text("".join([
        json.dumps({"key": "k1", "prompt": "p2", "prediction": "answer two", "new_tokens": 8}) + "\n",
        json.dumps({"key": "k2", "prompt": "p3", "prediction": "another model's", "new_tokens": 1}) + "\n",
        json.dumps({"key": "k1", "prompt": "p4", "prediction": "too long", "new_tokens": 9}) + "\n",
        json.dumps({"key": "k1", "prompt": "p5", "prediction": None, "new_tokens": 1}) + "\n",
        json.dumps({"key": "k1", "prompt": "p6", "prediction": "x", "new_tokens": True}) + "\n",
        json.dumps(["k1", "p7"]) + "\n", "\xff\xfe not utf-8\n", '{"key": "k1", "prompt": "p8", "predic',
    ]), encoding="latin-1")
    (tmp_path / "generations_rank0.jsonl").write_text(good + '{"key": "k1", "prom', encoding="utf-8")  # killed mid-line
    loaded = GenerationStore(tmp_path, "k1", 0, max_new_tokens=8)
    assert loaded.load() == {"p1": ("answer one", 3), "p2": ("answer two", 8)}
    assert loaded.skipped == {"generations_rank0.jsonl": 1, "generations_rank1.jsonl": 6}
    loaded.append([("p9", "after the torn line", 2)])
    again = GenerationStore(tmp_path, "k1", 0, max_new_tokens=8)
    assert again.load()["p9"] == ("after the torn line", 2) and again.skipped["generations_rank0.jsonl"] == 1


def test_cached_responses_are_checked_by_type(tmp_path):
    assert valid_response("loglikelihood", [-1.5, True]) == (-1.5, True)
    for bad in ([-1.5], ["-1.5", True], [float("nan"), False], [1.0, 1], {"a": 1}, None):
        assert valid_response("loglikelihood", bad) is None, bad
    assert valid_response("loglikelihood_rolling", -3) == -3.0 and valid_response("loglikelihood_rolling", True) is None
    assert valid_response("generate_until", "text") == "text" and valid_response("generate_until", 3) is None

    store = RequestStore(tmp_path, "a" * 64, 0)
    store.put("loglikelihood", ("context", " A"), (-2.0, False))
    store.put("loglikelihood", ("context", " B"), (-3.0, True))
    from lm_eval.api.model import hash_args

    store.db[hash_args("loglikelihood", ("context", " B"))] = ["not a number", True]  # a hostile row
    store.close()
    again = RequestStore(tmp_path, "a" * 64, 0)
    assert again.get("loglikelihood", ("context", " A")) == (-2.0, False)
    assert again.get("loglikelihood", ("context", " B")) is None and again.skipped == 1
    assert again.get("loglikelihood", ("context", " C")) is None and again.skipped == 1
    assert again.path == tmp_path / "lm_eval" / f"{'a' * 32}_rank0.db"  # lm-eval's <prefix>_rank<R>.db
    again.close()


def test_a_damaged_database_is_one_error_line(tmp_path, tiny_model):
    data, cache = write_mmlu(tmp_path / "mmlu"), tmp_path / "cache"
    key = model_key(_fingerprints(tiny_model, None), "float32", "cpu", "hf")
    path = cache / "lm_eval" / f"{key[:32]}_rank0.db"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"this is not an SQLite file" * 100)
    with pytest.raises(WorkbenchError, match="the request cache cannot be read"):
        RequestStore(cache, key, 0)
    result = CliRunner().invoke(wb, ["eval", "--model", str(tiny_model), "--data-dir", f"mmlu={data}", "--limit", "1",
                                     "--device", "cpu", "--cache", str(cache), "--out", str(tmp_path / "R.json")])
    assert_one_error(result, "the request cache cannot be read", str(path))
    assert not (tmp_path / "R.json").exists()


def test_the_key_names_weights_dtype_device_and_backend():
    prints = {"model_files": {"model.safetensors": "ab"}, "adapter_files": {}}
    key = model_key(prints, "float32", "cpu", "hf")
    assert key == digest({**prints, "dtype": "float32", "device": "cpu", "backend": "hf"})
    others = [model_key({**prints, "adapter_files": {"adapter_model.safetensors": "cd"}}, "float32", "cpu", "hf"),
              model_key({**prints, "model_files": {"model.safetensors": "ac"}}, "float32", "cpu", "hf"),
              model_key(prints, "bfloat16", "cpu", "hf"), model_key(prints, "float32", "cuda", "hf"),
              model_key(prints, "float32", "cpu", "vllm")]
    assert len({key, *others}) == 6


class FakeRequest:
    def __init__(self, args: tuple):
        self.args = args


class FakeLM:
    """What RequestLayer uses of lm-eval's model: the request methods, the cache hook, world size, batch size."""

    def __init__(self, world_size: int = 1, batch_size="auto", report: bool = True):
        self.world_size, self.batch_size, self.device, self.report = world_size, batch_size, "cpu", report
        self.computed: list[tuple] = []

    def set_cache_hook(self, hook) -> None:
        self.cache_hook = hook

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        assert disable_tqdm  # the model's own bar is off
        answers = []
        for request in requests:
            self.computed.append(request.args)
            answers.append(-float(len(request.args[0])))
            if self.report:
                self.cache_hook.add_partial("loglikelihood_rolling", request.args, answers[-1])
        return answers

    loglikelihood = generate_until = loglikelihood_rolling


@pytest.mark.parametrize("report", [True, False])
def test_layer_counts_and_reuses(tmp_path, report):
    """Cached answers are not computed again; the bar ends at total of total whether or not the model
    reports each answer through its cache hook."""
    from workbench.evals import parallel
    from workbench.evals.cache import RequestLayer

    progress = parallel.Progress(parallel.World(0, 1))
    lm = FakeLM(report=report)
    store = RequestStore(tmp_path, "b" * 64, 0)
    store.put("loglikelihood_rolling", ("seen text",), -9.0)
    layer = RequestLayer(lm, store, progress, [])
    texts = ["seen text", "new", "newer one"]
    answers = lm.loglikelihood_rolling([FakeRequest((text,)) for text in texts])
    layer.close()
    assert answers == [-9.0, -3.0, -9.0] and lm.computed == [("new",), ("newer one",)]
    assert layer.counts == {"loglikelihood_rolling": {"requests": 3, "from_cache": 1}}
    assert progress.counts() == (3, 3)
    again = RequestStore(tmp_path, "b" * 64, 0)
    assert again.get("loglikelihood_rolling", ("newer one",)) == -9.0  # stored as computed
    again.close()


def test_a_rank_with_all_answers_still_meets_the_others(tmp_path, monkeypatch):
    """Rolling loglikelihoods (and an automatic batch size) all_gather inside the model: when another rank
    has requests to compute, this rank computes all of its own too instead of skipping the call."""
    from workbench.evals import cache as cache_module
    from workbench.evals import parallel
    from workbench.evals.cache import RequestLayer

    store = RequestStore(tmp_path, "c" * 64, 0)
    store.put("loglikelihood_rolling", ("a",), -1.0)
    store.put("loglikelihood", ("a", "b"), (-1.0, True))
    monkeypatch.setattr(cache_module, "any_rank", lambda flag, lm: True)  # another rank misses answers
    lm = FakeLM(world_size=2, batch_size=8)
    layer = RequestLayer(lm, store, parallel.Progress(parallel.World(0, 1)), [])
    assert lm.loglikelihood_rolling([FakeRequest(("a",))]) == [-1.0] and lm.computed == [("a",)]
    assert lm.loglikelihood([FakeRequest(("a", "b"))]) == [(-1.0, True)] and lm.computed == [("a",)]  # no collective
    lm.batch_size = "auto"
    lm.loglikelihood([FakeRequest(("a", "b"))])
    assert lm.computed == [("a",), ("a", "b")]
    assert layer.counts["loglikelihood_rolling"] == {"requests": 1, "from_cache": 0}
    layer.close()
