"""Hostile inputs of `wb train` and `wb eval`: --config YAML, dataset_info.json and the data files it
names, preference records, --adapter's adapter_config.json, DIR/train_args.json for `wb merge`'s
quantized-base note, and an `wb eval --cache` folder.

Each property mutates a VALID file and asserts the house contract on the function that reads it:
it returns normally or raises a WorkbenchError whose `.line()` is one line, never another exception,
and its inputs are unchanged (sha256 before/after). The CLI-level properties run `wb train` in a
sandbox (tests/hostile.py) up to the end of the data stage (`build_model` replaced by a sentinel) and
check the outcome (one `error: ` line, no traceback) and that nothing appears outside OUT.

Settings follow tests/test_hostile.py's profiles (WB_FUZZ=1 for the long run), with fewer examples by
default so that the file stays well under 30 s.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import pytest
import yaml
from hostile import PATH_STRINGS, Sandbox, blobs, dumps, hostile_json_file, mutated_doc, run_wb
from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_hostile import HOSTILE

from workbench.cli import wb
from workbench.errors import WorkbenchError
from workbench.train.config import read_config
from workbench.train.data import load_conversations
from workbench.train.datasets import DataSource, resolve_sources
from workbench.train.pref_data import load_pairs

FUZZ = os.environ.get("WB_FUZZ", "") not in ("", "0")
FAST = settings(HOSTILE, max_examples=HOSTILE.max_examples if FUZZ else 25)  # pure-Python readers
CLI = settings(HOSTILE, max_examples=HOSTILE.max_examples if FUZZ else 6)  # a `wb train` run per example


pytestmark = pytest.mark.usefixtures("one_thread")


def tree_digest(*paths: Path) -> dict[str, str]:
    """sha256 of every file under `paths` (what 'inputs unchanged' compares)."""
    digests = {}
    for path in paths:
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
        for file in files:
            digests[str(file)] = hashlib.sha256(file.read_bytes()).hexdigest()
    return digests


@contextmanager
def unchanged(*paths: Path):
    before = tree_digest(*paths)
    yield
    assert tree_digest(*paths) == before, "an input was changed"


def contract(call, *inputs: Path):
    """`call()` returns, or raises a WorkbenchError of one line; inputs are unchanged either way."""
    with unchanged(*inputs):
        try:
            return call()
        except WorkbenchError as exc:
            line = exc.line()
            assert isinstance(line, str) and line and "\n" not in line and "\r" not in line, repr(line)
            return exc


# -- 1. wb train --config FILE.yaml --------------------------------------------------------------------
VALID_CONFIG = {
    "model_name_or_path": "base", "stage": "sft", "do_train": True, "finetuning_type": "lora", "lora_rank": 4,
    "lora_alpha": 8, "lora_target": "all", "dataset": "alpaca,sharegpt", "dataset_dir": "data", "template": "chatml",
    "cutoff_len": 48, "max_samples": 4, "output_dir": "out", "per_device_train_batch_size": 1,
    "gradient_accumulation_steps": 1, "learning_rate": 1.0e-4, "num_train_epochs": 1.0, "lr_scheduler_type": "cosine",
    "warmup_ratio": 0.1, "bf16": False, "fp16": False, "overwrite_output_dir": False, "report_to": "none",
    "val_size": 0.0, "seed": 3, "logging_steps": 1,
}
YAML_STRINGS = ["!!python/object:os.system {}", "&a [*a]", "*undefined", "!!binary AAAA", "!!set {a, b}",
                "2001-12-14", "~", ".nan", ".inf", "-.inf", "0o17", "0x1F", "1_000", "5e-5", "1e400", "yes", "on"]
RAW_YAML = [b"", b"---\n...\n", b"- a\n- b\n", b"a: [\n", b"\t- x", b"a: !!python/name:os.system\n", b"? [a]\n: 1\n",
            b"lora_rank: " + b"9" * 500 + b"\n", b"cutoff_len: 1e400\n", b"learning_rate: " + b"9" * 400 + b"\n",
            b"a: &x [*x]\n", b"\xff\xfe\x00", b"a: " + b"[" * 5000 + b"\n",
            b"seed: !!float 1e400\n", b"template: \"\\0\"\n", b"base: \"a\\0b\"\n", b"dataset_dir: \"\\0\"\n"]


@st.composite
def hostile_yaml(draw) -> bytes:
    kind = draw(st.sampled_from(["mutate", "mutate", "mutate", "raw", "truncate", "scalar"]))
    valid = yaml.safe_dump(VALID_CONFIG, sort_keys=False).encode()
    if kind == "mutate":
        doc = draw(mutated_doc(VALID_CONFIG, YAML_STRINGS + [v for v in PATH_STRINGS if "{" not in v]))
        try:
            return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True).encode("utf-8", "surrogatepass")
        except yaml.YAMLError:
            return dumps(doc)  # JSON is YAML
    if kind == "truncate":
        return valid[: draw(st.integers(0, len(valid) - 1))]
    if kind == "scalar":  # a key's value written as raw YAML text (tags, aliases, odd numbers)
        key = draw(st.sampled_from(sorted(VALID_CONFIG)))
        return valid + f"{key}: {draw(st.sampled_from(YAML_STRINGS))}\n".encode()
    return draw(st.sampled_from(RAW_YAML))


@FAST
@given(data=blobs(hostile_yaml()))
@example(data=b"cutoff_len: " + b"9" * 400 + b"\n")  # an int too large for float(): math.isfinite overflowed
@example(data=b"learning_rate: " + b"9" * 400 + b"\n")
@example(data=b'dataset_dir: "a\\0b"\n')  # click.Path's os.stat of a NUL name: ValueError
def test_read_config_hostile(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("cfg")
    path = folder / "c.yaml"
    path.write_bytes(data)
    result = contract(lambda: read_config(path, wb.commands["train"]), path)
    if not isinstance(result, WorkbenchError):
        assert set(result.values) <= {o.name for o in wb.commands["train"].params}


def test_read_config_valid_maps(tmp_path, monkeypatch):
    """The unmutated file is read (else the property tests nothing)."""
    (tmp_path / "data").mkdir()
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(VALID_CONFIG))
    monkeypatch.chdir(tmp_path)
    config = read_config(path, wb.commands["train"])
    assert config.values["lora_r"] == 4 and config.values["lora_target"] == "all-linear"
    assert config.values["data"] == ("alpaca,sharegpt",) and config.values["lr"] == 1e-4 and config.ignored == ["report_to"]
    assert config.values["dtype"] == "fp32"  # bf16: false + fp16: false (both keys once said "both set dtype")


# -- 2. dataset_info.json and the files it names -----------------------------------------------------
ALPACA = [{"instruction": "Say hi", "input": "", "output": "hi"}, {"instruction": "Add", "input": "1+1", "output": "2",
                                                                    "history": [["q", "a"]], "system": "be brief"}]
SHAREGPT = [{"conversations": [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "hey"}],
             "system": "s", "tools": "[]"},
            {"conversations": [{"from": "system", "value": "sys"}, {"from": "human", "value": "a"},
                               {"from": "function_call", "value": "{}"}, {"from": "observation", "value": "o"},
                               {"from": "gpt", "value": "b"}]}]
OPENAI = [{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}]
PREF_ALPACA = [{"instruction": "Pick", "input": "", "chosen": "good", "rejected": "bad"}]
PREF_SHAREGPT = [{"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "yes"},
                  "rejected": {"from": "gpt", "value": "no"}}]
PREF_PAIRS = [{"prompt": [{"role": "user", "content": "q"}],
               "chosen": [{"role": "assistant", "content": "A"}], "rejected": [{"role": "assistant", "content": "B"}]},
              {"prompt": "plain", "chosen": "c", "rejected": "r"}]
REGISTRY = {
    "alpaca": {"file_name": "alpaca.json", "columns": {"prompt": "instruction", "query": "input", "response": "output",
                                                       "system": "system", "history": "history"}},
    "sharegpt": {"file_name": "sharegpt.jsonl", "formatting": "sharegpt",
                 "columns": {"messages": "conversations", "system": "system", "tools": "tools"}},
    "openai": {"file_name": "openai", "formatting": "sharegpt", "columns": {"messages": "messages"},
               "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}},
    "pref_alpaca": {"file_name": "pref_alpaca.json", "ranking": True,
                    "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected"}},
    "pref_sharegpt": {"file_name": "pref_sharegpt.json", "formatting": "sharegpt", "ranking": True,
                      "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}},
}  # pref_pairs.jsonl (trl's prompt/chosen/rejected) is read as a plain --data file: formatting "auto"
DATA_FILES = {"alpaca.json": ALPACA, "sharegpt.jsonl": SHAREGPT, "openai/part.json": OPENAI,
              "pref_alpaca.json": PREF_ALPACA, "pref_sharegpt.json": PREF_SHAREGPT, "pref_pairs.jsonl": PREF_PAIRS}
SFT_NAMES, PREF_NAMES = ("alpaca", "sharegpt", "openai"), ("pref_alpaca", "pref_sharegpt", "data/pref_pairs.jsonl")
NAME_STRINGS = [*DATA_FILES, "openai", "openai/", "../data/alpaca.json", "/etc/passwd", "..", ".", "",
                "alpaca.json\x00", "a\\b", "sharegpt", "ranking", "columns", "tags", "human", "gpt", "from", "value",
                "role", "content", "conversations", "chosen", "rejected", "instruction", "output"]


def encode_records(name: str, records: list) -> bytes:
    return b"".join(dumps(r) + b"\n" for r in records) if name.endswith(".jsonl") else dumps(records, indent=1)


def write_dataset_dir(folder: Path, registry: bytes | None = None, damaged: tuple[str, bytes] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dataset_info.json").write_bytes(registry if registry is not None else dumps(REGISTRY, indent=2))
    for name, records in DATA_FILES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(encode_records(name, records))
    if damaged is not None:
        (folder / damaged[0]).write_bytes(damaged[1])
    return folder


def read_dataset(folder: Path, names) -> object:
    """dataset_info.json -> sources -> records: SFT names through load_conversations, ranking ones through
    load_pairs (what `wb train` does per --stage)."""
    sources = [s if s.name is not None or not s.path.name.startswith("pref_") else DataSource(s.path, ranking=True)
               for s in resolve_sources(list(names), folder)]
    ranked = [s for s in sources if s.ranking]
    plain = [s for s in sources if not s.ranking]
    loaded = [load_conversations(plain, "auto", None, 10)] if plain else []
    return loaded + ([load_pairs(ranked, 10)] if ranked else [])


def test_valid_dataset_dir_reads(tmp_path, monkeypatch):
    folder = write_dataset_dir(tmp_path / "data")
    monkeypatch.chdir(tmp_path)  # data/pref_pairs.jsonl: a plain file, from the current directory
    sft, pref = read_dataset(folder, SFT_NAMES + PREF_NAMES)
    assert [f.kept for f in sft.files] == [2, 2, 1] and len(sft.conversations) == 5
    assert [f.kept for f in pref.files] == [1, 1, 2] and pref.files[2].format == "pairs"
    assert pref.pairs[0].chosen == {"role": "assistant", "content": "good"}


@FAST
@given(registry=blobs(hostile_json_file(REGISTRY, NAME_STRINGS)),
       names=st.lists(st.sampled_from([*SFT_NAMES, *PREF_NAMES, *NAME_STRINGS[:6]]), min_size=1, max_size=3))
def test_dataset_info_hostile(tmp_path_factory, registry, names):
    root = tmp_path_factory.mktemp("ds")
    folder = write_dataset_dir(root / "data", registry=registry)
    (root / "outside.json").write_bytes(dumps(ALPACA))
    contract(lambda: read_dataset(folder, names), root)


def _records_strategy():
    name = st.sampled_from(sorted(DATA_FILES))
    return name.flatmap(lambda n: st.tuples(st.just(n), blobs(hostile_json_file(DATA_FILES[n], NAME_STRINGS))))


@FAST
@given(damaged=_records_strategy())
@example(damaged=("sharegpt.jsonl", dumps({"conversations": [{"from": ["human"], "value": "x"}]}) + b"\n"))
@example(damaged=("openai/part.json", dumps([{"messages": [{"role": {}, "content": "x"}]}])))
@example(damaged=("alpaca.json", b"[" * 100_000))  # json.loads RecursionError
@example(damaged=("pref_pairs.jsonl", b'{"a":' * 50_000 + b"\n"))
@example(damaged=("pref_sharegpt.json", dumps([{"conversations": [{"from": [1], "value": "q"}],
                                                "chosen": "a", "rejected": "b"}])))
def test_data_records_hostile(tmp_path_factory, damaged):
    folder = write_dataset_dir(tmp_path_factory.mktemp("ds") / "data", damaged=damaged)
    name = next((n for n, entry in REGISTRY.items() if damaged[0].startswith(entry["file_name"])), None)
    contract(lambda: read_dataset(folder, [name or str(folder / damaged[0])]), folder)


def test_plain_data_file_hostile_role_is_dropped(tmp_path):
    """A plain --data file (format detected) with an unhashable role: the record is dropped, not a crash."""
    path = tmp_path / "d.jsonl"
    path.write_bytes(dumps({"messages": [{"role": ["user"], "content": "x"}]}) + b"\n"
                     + dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}))
    loaded = load_conversations([path])
    assert loaded.files[0].kept == 1 and loaded.files[0].dropped == {"unknown role ['user']": 1}


def test_preference_source_outside_registry_is_read_as_given(tmp_path):
    """load_pairs reads a DataSource as resolve_sources made it (a plain path stays a plain path)."""
    path = tmp_path / "p.jsonl"
    path.write_bytes(encode_records("p.jsonl", PREF_PAIRS))
    loaded = load_pairs([DataSource(path)])
    assert len(loaded.pairs) == 2 and loaded.files[0].format == "pairs"


# -- CLI: wb train --config ... up to the end of the data stage ------------------------------------------
class ReachedModelStage(Exception):
    """Raised in place of build_model: the data stage finished."""


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, tiny_tokenizer) -> Path:
    from tiny import make_model, save_layout, state_dict_for_files

    model = make_model(len(tiny_tokenizer), seed=0)
    folder = tmp_path_factory.mktemp("base") / "model"
    return save_layout(state_dict_for_files(model), folder, config=model.config, tokenizer=tiny_tokenizer)


def run_train_until_model(box: Sandbox, stage: str = "sft"):
    """`wb train --config c.yaml` in the sandbox, stopped where the model would load."""
    with mock.patch("workbench.train.run.build_model", side_effect=ReachedModelStage):
        result = run_wb(["train", "--config", "c.yaml", "--device", "cpu", "--stage", stage], cwd=box.home)
    if isinstance(result.exception, ReachedModelStage):
        result.exception = None  # the data stage passed: a success for this contract
        result.exit_code = 0
    return result


def cli_config(names: tuple[str, ...]) -> dict:
    return {**VALID_CONFIG, "model_name_or_path": "base", "dataset": ",".join(names), "dataset_dir": "data",
            "output_dir": "out", "stage": "sft"}


def _sandboxed(box: Sandbox, tiny_base: Path, config: bytes, registry: bytes | None = None, damaged=None) -> None:
    box.write(config, "c.yaml")
    box.copy(tiny_base, "base")
    write_dataset_dir(box.path("data"), registry=registry, damaged=damaged)
    box.out("out")
    box.may_read(box.path("base"), box.path("data"), box.path("c.yaml"))


def test_cli_valid_config_reaches_model_stage(tiny_base):
    for stage, names in (("sft", SFT_NAMES), ("dpo", PREF_NAMES)):
        with Sandbox() as box:
            _sandboxed(box, tiny_base, yaml.safe_dump({**cli_config(names), "stage": stage}).encode())
            box.freeze()
            result = run_train_until_model(box, stage)
            box.check(result)
            assert result.exit_code == 0, result.output


@CLI
@given(config=blobs(hostile_yaml()))
def test_cli_train_config_hostile(tiny_base, config):
    with Sandbox() as box:
        _sandboxed(box, tiny_base, config)
        box.freeze()
        box.check(run_train_until_model(box))


@CLI
@given(damage=st.one_of(st.tuples(blobs(hostile_json_file(REGISTRY, NAME_STRINGS)), st.none()),
                        st.tuples(st.none(), _records_strategy())),
       stage=st.sampled_from(["sft", "dpo"]))
def test_cli_train_dataset_hostile(tiny_base, damage, stage):
    registry, damaged = damage
    with Sandbox() as box:
        names = SFT_NAMES if stage == "sft" else PREF_NAMES
        _sandboxed(box, tiny_base, yaml.safe_dump({**cli_config(names), "stage": stage}).encode(), registry=registry,
                   damaged=None if damaged is None else (damaged[0], box.substitute(damaged[1])))
        box.freeze()
        box.check(run_train_until_model(box, stage))


# -- 3. --adapter DIR (adapter_config.json) and DIR/train_args.json for wb merge --------------------------
VALID_ADAPTER = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "lora_dropout": 0.05, "target_modules": ["q_proj", "v_proj"],
                 "rank_pattern": {"q_proj": 6}, "alpha_pattern": {}, "use_dora": False, "use_rslora": False,
                 "fan_in_fan_out": False, "init_lora_weights": True, "task_type": "CAUSAL_LM", "bias": "none"}
TRAIN_OPTIONS = {"lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "use_dora": False, "use_rslora": False,
                 "lora_target": "q_proj,v_proj"}


@FAST
@given(config=blobs(hostile_json_file(VALID_ADAPTER, ["q_proj", "v_proj", "LORA", "pissa"])),
       given_r=st.sampled_from([8, 4, 16]))
@example(config=dumps({**VALID_ADAPTER, "target_modules": ["q_proj", 1]}), given_r=8)  # would reach sorted() of mixed types
@example(config=dumps({**VALID_ADAPTER, "lora_alpha": 10**400}), given_r=8)
def test_read_continued_config_hostile(tmp_path_factory, config, given_r):
    from workbench.train.adapters import read_continued_config

    folder = tmp_path_factory.mktemp("run") / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_bytes(config)
    o = {**TRAIN_OPTIONS, "lora_r": given_r, "lora_alpha": 2 * given_r}
    contract(lambda: read_continued_config(folder, o), folder.parent)


VALID_TRAIN_ARGS = {"base": "/models/base", "quantization": {"bits": 4, "type": "nf4", "double_quant": True},
                    "options": {"lora_r": 8}}


@FAST
@given(record=blobs(hostile_json_file(VALID_TRAIN_ARGS, ["nf4", "fp4", "llm.int8"])))
def test_quantized_base_note_hostile(tmp_path_factory, record):
    from workbench.weights.merge import quantized_base_note

    folder = tmp_path_factory.mktemp("adapter")
    (folder / "train_args.json").write_bytes(record)
    note = contract(lambda: quantized_base_note(folder), folder)
    assert note is None or (isinstance(note, str) and "\n" not in note)


def test_quantized_base_note_valid(tmp_path):
    from workbench.weights.merge import quantized_base_note

    folder = tmp_path
    (folder / "train_args.json").write_bytes(dumps(VALID_TRAIN_ARGS))
    assert "4-bit (nf4) quantized base" in quantized_base_note(folder)


# -- 4. wb eval --cache DIR and --backend vllm's adapter rank -------------------------------------------------
@FAST
@given(config=blobs(hostile_json_file(VALID_ADAPTER, ["q_proj"])))
def test_adapter_rank_hostile(tmp_path_factory, config):
    from workbench.evals.backends import adapter_rank, vllm_lora_rank

    folder = tmp_path_factory.mktemp("adapter")
    (folder / "adapter_config.json").write_bytes(config)
    rank = contract(lambda: adapter_rank(folder), folder)
    if isinstance(rank, int):
        assert rank >= 1
        contract(lambda: vllm_lora_rank(rank, folder), folder)


def test_adapter_rank_valid(tmp_path):
    from workbench.evals.backends import adapter_rank

    (tmp_path / "adapter_config.json").write_bytes(dumps(VALID_ADAPTER))
    assert adapter_rank(tmp_path) == 6


KEY = "k" * 64
GEN_ROWS = [{"key": KEY, "prompt": "p1", "prediction": "a", "new_tokens": 3},
            {"key": "other", "prompt": "p2", "prediction": "b", "new_tokens": 1}]


@FAST
@given(line=blobs(hostile_json_file(GEN_ROWS[0], ["p1", KEY], indent=None)))
@example(line=b"[" * 100_000)  # json.loads RecursionError
@example(line=dumps({**GEN_ROWS[0], "new_tokens": 10**400}))
def test_generation_cache_hostile(tmp_path_factory, line):
    from workbench.evals.cache import GenerationStore

    folder = tmp_path_factory.mktemp("cache")
    (folder / "generations_rank1.jsonl").write_bytes(b"".join(dumps(r) + b"\n" for r in GEN_ROWS) + line.replace(b"\n", b" "))
    store = GenerationStore(folder, KEY, 0, 16)
    answers = contract(store.load, folder)
    if not isinstance(answers, WorkbenchError):
        assert answers.get("p1") is not None or store.skipped


@FAST
@given(value=st.one_of(st.just(10**400), st.just(-(10**400)), st.lists(st.sampled_from([10**400, True, 1.5, "x"]),
                                                                       max_size=3),
                       st.floats(allow_nan=True), st.integers(), st.text(max_size=3)),
       attr=st.sampled_from(["loglikelihood", "loglikelihood_rolling", "generate_until"]))
@example(value=10**400, attr="loglikelihood_rolling")  # math.isfinite(int) overflowed
@example(value=[10**400, True], attr="loglikelihood")
def test_request_cache_value_hostile(value, attr):
    from workbench.evals.cache import valid_response

    response = valid_response(attr, value)
    assert response is None or attr != "loglikelihood_rolling" or isinstance(response, float)


@FAST
@given(data=blobs(st.one_of(st.binary(max_size=200), st.sampled_from([b"SQLite format 3\x00" + b"\x00" * 84,
                                                                     b"SQLite format 3\x00" + b"\xff" * 4000]))))
def test_request_cache_database_hostile(tmp_path_factory, data):
    from workbench.evals.cache import RequestStore

    folder = tmp_path_factory.mktemp("cache")
    path = folder / "lm_eval" / f"{KEY[:32]}_rank0.db"
    path.parent.mkdir()
    path.write_bytes(data)
    try:  # the cache is written when accepted (an empty file becomes a database); refused, it is left as it was
        RequestStore(folder, KEY, 0).db.close()
    except WorkbenchError as exc:
        assert "\n" not in exc.line() and path.read_bytes() == data


# -- 4b. links in a crafted cache folder (R2 duplicate: the symlink fix in cache.py's _no_links) -----------
DB = f"lm_eval/{KEY[:32]}_rank0.db"
LINKS = ["generations_rank0.jsonl", "generations_rank1.jsonl", "lm_eval", DB, DB + "-journal", DB + "-wal"]


@pytest.mark.parametrize("link", LINKS)
def test_cache_link_is_refused_and_its_target_untouched(tmp_path, link):
    """A symbolic link where wb reads or writes a cache file (or SQLite its journal) is one error: before
    the fix, GenerationStore appended to the link's target and SQLite wrote a database through it."""
    from workbench.evals.cache import GenerationStore, RequestStore

    victim = tmp_path / "victim"
    victim.mkdir() if link == "lm_eval" else victim.write_bytes(b"keep\n")
    folder = tmp_path / "cache"
    (folder / link).parent.mkdir(parents=True, exist_ok=True)
    (folder / link).symlink_to(victim)
    with unchanged(victim):
        with pytest.raises(WorkbenchError) as caught:
            if link.startswith("generations"):
                store = GenerationStore(folder, KEY, 0, 16)
                store.load()
                store.append([("p", "x", 1)])
            else:
                RequestStore(folder, KEY, 0).put("loglikelihood_rolling", ("a",), -1.0)
    line = caught.value.line()
    assert "a cache file is a symbolic link" in line and "\n" not in line and link.rsplit("/", 1)[-1] in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "victim"]
    assert not victim.is_dir() or not any(victim.iterdir())


def test_generation_cache_folder_in_place_of_the_file_is_refused(tmp_path):
    from workbench.evals.cache import GenerationStore

    (tmp_path / "generations_rank0.jsonl").mkdir()
    with pytest.raises(WorkbenchError, match="the generation cache is not a file"):
        GenerationStore(tmp_path, KEY, 0, 16).load()


# -- CLI for 3. and 4.: wb train --adapter, wb merge's note, wb eval --cache (R2 duplicate) ---------------
def test_cli_valid_adapter_reaches_model_stage(tiny_base):
    with Sandbox() as box:
        _sandboxed(box, tiny_base, yaml.safe_dump({**cli_config(SFT_NAMES), "adapter_name_or_path": "adapter"}).encode())
        box.write(dumps(VALID_ADAPTER), "adapter", "adapter_config.json")
        box.may_read(box.path("adapter"))
        box.freeze()
        result = run_train_until_model(box)
        box.check(result)
        assert result.exit_code == 0, result.output


@CLI
@given(config=blobs(hostile_json_file(VALID_ADAPTER, ["q_proj", "v_proj", "LORA", "pissa"]), dumps(VALID_ADAPTER, 2)))
@example(config=dumps({**VALID_ADAPTER, "target_modules": [{}, "q_proj"]}))  # sorted() of mixed types, before the fix
def test_cli_train_adapter_config_hostile(tiny_base, config):
    """`wb train --adapter DIR` (through --config's adapter_name_or_path): DIR's adapter_config.json is
    checked while the settings are resolved, before the data stage."""
    with Sandbox() as box:
        target = {**cli_config(SFT_NAMES), "adapter_name_or_path": "adapter", "lora_target": "q_proj,v_proj"}
        _sandboxed(box, tiny_base, yaml.safe_dump(target).encode())
        box.write(config, "adapter", "adapter_config.json")
        box.may_read(box.path("adapter"))
        box.freeze()
        box.check(run_train_until_model(box))


TRAIN_ARGS = {"base": "base", "data": ["data/a.json"], "quantization": {"bits": 4, "type": "nf4",
                                                                        "double_quantization": True,
                                                                        "compute_dtype": "bfloat16"},
              "lora": {"r": 4, "alpha": 8}, "versions": {"torch": "2.13.0"}}


@pytest.fixture(scope="module")
def merge_inputs(tmp_path_factory) -> tuple[Path, Path]:
    from hostile import llama_config, llama_state, write_adapter, write_model

    root = tmp_path_factory.mktemp("merge")
    return write_model(root / "base", llama_state(), llama_config()), write_adapter(root / "adapter")


def _merge_with_train_args(merge_inputs, raw: bytes):
    with Sandbox() as box:
        base, adapter = box.copy(merge_inputs[0], "base"), box.copy(merge_inputs[1], "adapter")
        box.write(raw, "adapter", "train_args.json")
        box.may_read(base, adapter)
        box.freeze()
        result = run_wb(["merge", "--base", base, "--adapter", adapter, "--out", box.out("out")])
        box.check(result)
        return result


def test_cli_merge_names_a_quantized_base(merge_inputs):
    result = _merge_with_train_args(merge_inputs, dumps(TRAIN_ARGS, 2))
    assert result.exit_code == 0 and "trained on a 4-bit (nf4) quantized base (QLoRA)" in result.output, result.output


@CLI
@given(raw=blobs(hostile_json_file(TRAIN_ARGS, ["nf4", "fp4", "llm.int8", "4", "8"]), dumps(TRAIN_ARGS, 2)))
def test_cli_merge_train_args_hostile(merge_inputs, raw):
    """train_args.json is a record, not an input of the merge: whatever it holds, the merge succeeds."""
    result = _merge_with_train_args(merge_inputs, raw)
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def eval_inputs(tmp_path_factory, tiny_models) -> tuple[Path, Path, Path]:
    """(the tiny model, a 2-prompt --gen-data file, a cache folder a first run filled)."""
    root = tmp_path_factory.mktemp("evalcache")
    gen = root / "gen.json"
    gen.write_bytes(dumps([{"instruction": f"Say {i}", "input": "", "output": f"{i}"} for i in range(2)]))
    model = tiny_models()
    result = run_wb(eval_args(model, gen, root / "cache", root / "R.json"))
    assert result.exit_code == 0, result.output
    return model, gen, root / "cache"


def eval_args(model: Path, gen: Path, cache: Path, out: Path) -> list:
    return ["eval", "--model", model, "--gen-data", gen, "--max-new-tokens", "2", "--device", "cpu", "--cache", cache,
            "--out", out]


@st.composite
def hostile_generations(draw, valid: bytes) -> bytes:
    """A generations_rank<R>.jsonl from `valid`: one line replaced by a damaged JSON row, or the file cut."""
    rows = valid.splitlines(keepends=True)
    if draw(st.booleans()):
        return valid[: draw(st.integers(0, len(valid) - 1))]
    index = draw(st.integers(0, len(rows) - 1))
    line = draw(hostile_json_file(json.loads(rows[index]), ["<|im_start|>", "k" * 64], indent=None))
    return b"".join(rows[:index]) + line.replace(b"\n", b" ") + b"\n" + b"".join(rows[index + 1:])


def test_cli_eval_cache_valid_is_used(eval_inputs):
    model, gen, cache = eval_inputs
    with Sandbox() as box:
        mine = box.copy(cache, "cache")
        box.outs.append(mine)  # the cache folder is written to (answers appended)
        box.may_read(model, gen)
        box.freeze()
        result = run_wb(eval_args(model, gen, mine, box.out("res") / "R.json"))  # R.json and its .predictions.jsonl
        box.check(result)
        assert result.exit_code == 0 and "2 of 2 generations taken from it" in result.output, result.output


@CLI
@given(data=st.data(), rank=st.sampled_from(["generations_rank0.jsonl", "generations_rank1.jsonl"]))
def test_cli_eval_cache_hostile(eval_inputs, data, rank):
    """A damaged generations file (this rank's or another's): damaged lines are recomputed, never an error."""
    model, gen, cache = eval_inputs
    valid = (cache / "generations_rank0.jsonl").read_bytes()
    raw = data.draw(blobs(hostile_generations(valid), valid), label=rank)
    with Sandbox() as box:
        mine = box.copy(cache, "cache")
        box.write(raw, "cache", rank)
        box.outs.append(mine)
        box.may_read(model, gen)
        box.freeze()
        result = run_wb(eval_args(model, gen, mine, box.out("res") / "R.json"))
        box.check(result)
        assert result.exit_code == 0, result.output
        assert json.loads(box.path("res", "R.json").read_text())["generation"]["n"] == 2


def test_cli_eval_cache_link_is_one_error(eval_inputs):
    """A crafted cache folder whose generations file links elsewhere: one error line, the target untouched."""
    from clicheck import assert_one_error

    model, gen, cache = eval_inputs
    with Sandbox() as box:
        victim = box.write(b"keep\n", "victim.txt")
        mine = box.copy(cache, "cache")
        (mine / "generations_rank0.jsonl").unlink()
        (mine / "generations_rank0.jsonl").symlink_to(victim)
        box.may_read(model, gen)
        box.freeze()
        result = run_wb(eval_args(model, gen, mine, box.out("res") / "R.json"))
        box.check_untouched(result.argv)
        assert_one_error(result, "a cache file is a symbolic link", "generations_rank0.jsonl")
        assert victim.read_bytes() == b"keep\n"


# -- regressions found by the long run (WB_FUZZ=1): Python's 4300-digit limit and deep YAML ----------------
HUGE_HEX = "0x" + "f" * 5000  # YAML reads it as an int of ~6000 decimal digits, which repr() and str() refuse to write
CONFIG_REGRESSIONS = {
    f"lora_rank: {HUGE_HEX}": "config key lora_rank: expects an integer within 64 bits, not a value too large to show",
    "cutoff_len: " + "9" * 30: "config key cutoff_len: expects an integer within 64 bits",  # was accepted
    f"learning_rate: {HUGE_HEX}": "config key learning_rate: expects a finite number, not an integer beyond any float",
    f"template: {HUGE_HEX}": "config key template: expects text, not int a value too large to show",
    f"stage: {HUGE_HEX}": "config key stage: expects text",
    f"max_steps: {HUGE_HEX}": "config key max_steps: a value too large to show changes training",
    "seed: " + "9" * 5000: "cannot read the config as YAML: Exceeds the limit (4300 digits)",
    "a: " + "[" * 5000: "cannot read the config as YAML: nested too deeply",
    "template: " + "A" * 5000: "config key template:",
}


@pytest.mark.parametrize("text", CONFIG_REGRESSIONS, ids=lambda t: t[:24])
def test_config_huge_numbers_and_deep_yaml_are_one_short_error(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text + "\n")
    with pytest.raises(WorkbenchError) as caught:
        read_config(path, wb.commands["train"])
    line = caught.value.line()
    assert CONFIG_REGRESSIONS[text] in line and "\n" not in line and len(line) < 400, line


@pytest.mark.parametrize("raw", [b"1" * 5000, b"[" + b"1" * 5000 + b"]", b'{"a": ' + b"1" * 5000 + b"}\n"],
                         ids=["line", "array", "object"])
def test_data_file_with_a_huge_number_is_one_error(tmp_path, raw):
    path = tmp_path / "d.json"
    path.write_bytes(raw)
    with pytest.raises(WorkbenchError, match="Exceeds the limit"):
        load_conversations([path])


@pytest.mark.parametrize("tools", ["[" * 100_000, "1" * 5000])
def test_a_tools_string_that_json_refuses_drops_the_record(tmp_path, tools):
    path = tmp_path / "d.jsonl"
    good = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}
    path.write_bytes(dumps({**good, "tools": tools}) + b"\n" + dumps(good) + b"\n")
    loaded = load_conversations([path])
    assert loaded.files[0].kept == 1 and loaded.files[0].dropped == {"tools is not valid JSON": 1}


def test_a_pairs_record_without_prompt_is_dropped(tmp_path):
    """The format is detected from the first record: a later one without `prompt` raised KeyError."""
    path = tmp_path / "p.jsonl"
    path.write_bytes(encode_records("p.jsonl", [PREF_PAIRS[1], {"chosen": "c", "rejected": "r"}]))
    loaded = load_pairs([DataSource(path)])
    assert len(loaded.pairs) == 1 and loaded.files[0].dropped == {f"missing prompt (first: {path}:2)": 1}


@pytest.mark.parametrize("keys", [{"\r": "Say hi", "input": "", "output": "hi"}, {"a\nb": 1}])
def test_record_keys_with_control_characters_stay_on_one_line(tmp_path, keys):
    """A record's keys are named in the error; a crafted "\\r" or "\\n" key printed a second line."""
    folder = write_dataset_dir(tmp_path / "data", damaged=("alpaca.json", dumps([keys])))
    with pytest.raises(WorkbenchError) as caught:
        read_dataset(folder, ["alpaca"])
    line = caught.value.line()
    assert "its columns map prompt='instruction'" in line and "\n" not in line and "\r" not in line, line
    path = tmp_path / "plain.json"
    path.write_bytes(dumps([keys]))
    with pytest.raises(WorkbenchError, match="unknown data format") as caught:
        load_conversations([path])
    assert "\n" not in caught.value.line() and "\r" not in caught.value.line()


def test_registry_names_with_control_characters_stay_on_one_line(tmp_path):
    registry = {"alpaca": {**REGISTRY["alpaca"], "x\ny": 1}, "b": {"file_name": "alpaca.json", "columns": {"pro\nmpt": "a"}}}
    folder = write_dataset_dir(tmp_path / "data", registry=dumps(registry))
    for name, fragment in (("alpaca", "unknown key(s) 'x\\ny'"), ("b", "columns: unknown key(s) 'pro\\nmpt'")):
        with pytest.raises(WorkbenchError) as caught:
            resolve_sources([name], folder)
        assert fragment in caught.value.line() and "\n" not in caught.value.line(), caught.value.line()


def test_cli_base_that_is_neither_folder_nor_cached_repo_is_one_error(tiny_base):
    with Sandbox() as box:
        _sandboxed(box, tiny_base, yaml.safe_dump({**cli_config(SFT_NAMES), "model_name_or_path": "basex"}).encode())
        box.freeze()
        box.check(run_train_until_model(box))
