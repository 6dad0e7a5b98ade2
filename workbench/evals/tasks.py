"""lm-eval tasks by name: lm-eval's own, or the same tasks reading local benchmark files.

A local task is lm-eval's own task config (its YAML, as installed: prompt, description, splits,
few-shot sampler, choices, metrics, version) with only the data source replaced: `custom_dataset`
returns the documents read from the CSV files. Groups are lm-eval's groups (`mmlu` with its four
categories, `ceval-valid`, `cmmlu`) holding the subjects the folder has, aggregated as lm-eval
aggregates them (size-weighted means). Nothing of a local task touches the network.

A `custom` folder (MMLU's layout, any subjects) becomes tasks `custom_<subject>` built from
lm-eval's MMLU subject template (`_default_template_yaml`, with MMLU's description) under a group
`custom` aggregated like lm-eval's `mmlu` group.
"""

from __future__ import annotations

import difflib
from functools import lru_cache
from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.evals.layouts import BENCHMARKS, CUSTOM, LocalBenchmark

TASK_ALIASES = {"ceval": "ceval-valid"}  # the group name lm-eval gives C-Eval's scored (val) split
FAMILY_FOLDERS = {"mmlu": ("mmlu", "default"), "ceval": ("ceval",), "cmmlu": ("cmmlu",)}
DEFAULT_FEWSHOT = 5  # MMLU, C-Eval and CMMLU are reported 5-shot (their papers, the Open LLM Leaderboard)


@lru_cache(maxsize=2)
def task_manager(full: bool):
    """lm-eval's TaskManager: every task (`full`), or only MMLU/C-Eval/CMMLU, which indexes in 0.1 s."""
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    if full:
        return TaskManager()
    root = Path(lm_eval.tasks.__file__).parent
    return TaskManager(include_defaults=False, include_path=[root.joinpath(*p) for p in FAMILY_FOLDERS.values()])


@lru_cache(maxsize=1)
def family_members() -> dict[str, str]:
    """{task, group or tag name: benchmark} for every name under MMLU, C-Eval and CMMLU's groups."""
    index = task_manager(False).task_index
    members: dict[str, str] = {}

    def walk(name: str, benchmark: str) -> None:
        members[name] = benchmark
        entry = index[name]
        if entry.kind.name == "TAG":
            children = sorted(entry.tags)
        else:
            children = entry.cfg.get("task", []) if entry.kind.name == "GROUP" else []
        for child in children:
            walk(child, benchmark)

    for benchmark in BENCHMARKS.values():
        walk(benchmark.group, benchmark.name)
    return members


def local_members(local: dict[str, LocalBenchmark]) -> dict[str, str]:
    """family_members() plus the `custom` group and its `custom_<subject>` tasks when a custom folder is given."""
    members = dict(family_members())
    if CUSTOM.name in local:
        members[CUSTOM.group] = CUSTOM.name
        members.update({custom_task(s): CUSTOM.name for s in local[CUSTOM.name].subjects})
    return members


def custom_task(subject: str) -> str:
    return f"{CUSTOM.group}_{subject}"


def canonical(name: str) -> str:
    return TASK_ALIASES.get(name, name)


def load_tasks(names: list[str], local: dict[str, LocalBenchmark], num_fewshot: int | None) -> list:
    """Task and Group objects for `names`, built from `local` folders where one covers the name.

    With `num_fewshot` None, MMLU/C-Eval/CMMLU tasks are set to DEFAULT_FEWSHOT and other tasks keep
    lm-eval's default; an explicit value is applied by lm-eval's simple_evaluate.
    """
    members = local_members(local)
    online = [n for n in names if members.get(n) not in local]
    manager = task_manager(bool(online))
    for name in online:
        if name not in manager.all_tasks:
            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else "; `lm-eval ls tasks` lists them"
            raise WorkbenchError(f"unknown task {name!r}{hint}")
    built, local_nodes = [], []
    for name in names:
        benchmark = members.get(name)
        if benchmark == CUSTOM.name:
            node = custom_node(local[benchmark], name)
            local_nodes.append(node)
        elif benchmark in local:
            node = LocalBuilder(manager, local[benchmark]).build(name)
            if node is None:
                raise WorkbenchError(f"{name}: none of its subjects is in the folder", local[benchmark].given)
            local_nodes.append(node)
        else:
            node = _load_online(manager, name)
        built.append(node)
    if num_fewshot is None:
        for task in _leaf_tasks(built):
            if task.task_name in members and task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=DEFAULT_FEWSHOT)
    for task in _leaf_tasks(local_nodes):
        _check_fewshot_pool(task, num_fewshot if num_fewshot is not None else task.get_config("num_fewshot") or 0)
    return built


def _check_fewshot_pool(task, shots: int) -> None:
    """Fail before the model loads when a local dev split has fewer rows than the shots asked for."""
    pool = len(task.fewshot_docs())
    if shots > pool:
        source = task.config.custom_dataset
        path = source.local.path(source.subject, source.local.benchmark.fewshot_split)
        raise WorkbenchError(f"{task.task_name}: {shots} few-shot examples asked for, the dev split has {pool}", path)


def _load_online(manager, name: str):
    try:
        loaded = manager.load([name])
    except Exception as exc:  # noqa: BLE001 - lm-eval and datasets raise anything for unreachable data
        raise WorkbenchError(f"task {name!r} could not be loaded: {type(exc).__name__}: {exc}") from None
    if name in loaded["groups"]:
        return loaded["groups"][name]
    if name in loaded["tasks"]:
        return loaded["tasks"][name]
    return list(loaded["tasks"].values())  # a tag: its tasks, side by side


def _leaf_tasks(nodes: list) -> list:
    from lm_eval.api.group import Group

    tasks = []
    for node in nodes:
        if isinstance(node, Group):
            tasks += node.get_all_tasks()
        elif isinstance(node, list):
            tasks += node
        else:
            tasks.append(node)
    return tasks


class LocalDataset:
    """lm-eval's `custom_dataset` for one subject: {split: Dataset} of the documents read from CSV.

    The documents are read (and checked) when the task is built, before any model is loaded.
    """

    def __init__(self, local: LocalBenchmark, subject: str):
        self.local = local
        self.subject = subject
        self.splits = local.read(subject)

    def __call__(self, **_metadata):
        from datasets import Dataset, DatasetDict

        return DatasetDict({split: Dataset.from_list(docs) for split, docs in self.splits.items()})

    def __deepcopy__(self, memo):  # lm-eval deep-copies configs; the documents never change
        return self

    def __repr__(self) -> str:  # what lm-eval records as `custom_dataset` in RESULTS' configs
        benchmark = self.local.benchmark
        files = ", ".join(f"{s.folder}/{benchmark.filename(self.subject, s)}" for s in benchmark.splits)
        return f"wb: local {benchmark.name} CSV files {files} in {self.local.root}"


class LocalBuilder:
    """Builds lm-eval's group tree under one name, keeping the subjects a local folder holds."""

    def __init__(self, manager, local: LocalBenchmark):
        self.manager = manager
        self.local = local
        self.index = manager.task_index
        known = {self._subject(n) for n, b in family_members().items() if b == local.benchmark.name and self._is_task(n)}
        unknown = sorted(set(local.subjects) - known)
        if unknown:
            raise WorkbenchError(
                f"{local.benchmark.name}: lm-eval has no subject {unknown[0]!r} "
                f"({len(unknown)} unknown subject(s))",
                local.path(unknown[0], local.benchmark.eval_split),
            )

    def _is_task(self, name: str) -> bool:
        return self.index[name].kind.name == "TASK"

    def _subject(self, name: str) -> str:
        return self.index[name].cfg["dataset_name"]

    def build(self, name: str):
        """The Task or Group for `name`, or None when the folder has none of its subjects."""
        from lm_eval.api.group import Group
        from lm_eval.config.group import GroupConfig

        entry = self.index[name]
        if entry.kind.name == "TASK":
            return self._task(name) if self._subject(name) in self.local.subjects else None
        if entry.kind.name == "TAG":
            children = [self.build(child) for child in sorted(entry.tags)]
            return [c for c in children if c is not None] or None
        fields = {k: v for k, v in entry.cfg.items() if k in GroupConfig.__dataclass_fields__}
        group = Group.from_config(GroupConfig(**fields))
        for member in entry.cfg.get("task", []):
            child = self.build(member)
            for node in child if isinstance(child, list) else [child]:
                if node is not None:
                    group.add(node)
        return group if len(group) else None

    def _task(self, name: str):
        """lm-eval's task `name`, from its own YAML, with `custom_dataset` reading the local files.

        A registered task's YAML is merged with overrides when it is a member of a group config, so
        the task is loaded as the one member of a throwaway inline group.
        """
        subject = self._subject(name)
        override = {"task": name, "custom_dataset": LocalDataset(self.local, subject), "dataset_path": str(self.local.root)}
        loaded = self.manager.load({"group": f"wb-local::{name}", "task": [override]})
        return loaded["tasks"][name]


def custom_node(local: LocalBenchmark, name: str):
    """The Task `custom_<subject>`, or the Group `custom` of every subject, as lm-eval's MMLU builds them.

    Each task is lm-eval's MMLU subject config (its `_default_template_yaml`: prompt, choices,
    target, metric, first_n few-shot sampler from dev) with MMLU's description for the subject; the
    group takes `mmlu`'s aggregation (size-weighted mean).
    """
    from lm_eval.api.group import Group
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.config.group import GroupConfig
    from lm_eval.tasks._yaml_loader import load_yaml

    mmlu_yaml = Path(task_manager(False).task_index["mmlu"].yaml_path)
    template = load_yaml(mmlu_yaml.parent / "_default_template_yaml", resolve_func=True)

    def task(subject: str):
        about = subject.replace("_", " ")
        config = {
            **template,
            "task": custom_task(subject),
            "task_alias": subject,
            "dataset_name": subject,
            "dataset_path": str(local.root),
            "description": f"The following are multiple choice questions (with answers) about {about}.\n\n",
            "custom_dataset": LocalDataset(local, subject),
            "metadata": {**template.get("metadata", {}), "config_source": f"wb custom, from {mmlu_yaml.parent}"},
        }
        return ConfigurableTask(config=config)

    if name != CUSTOM.group:
        return task(name.removeprefix(f"{CUSTOM.group}_"))
    mmlu = load_yaml(mmlu_yaml, resolve_func=True)
    group = Group.from_config(GroupConfig(
        group=CUSTOM.group,
        task=[custom_task(s) for s in local.subjects],
        aggregate_metric_list=mmlu["aggregate_metric_list"],
        metadata=mmlu.get("metadata"),
    ))
    for subject in local.subjects:
        group.add(task(subject))
    return group
