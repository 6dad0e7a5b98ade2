"""`wb train --stage dpo`: preference training through trl's trainers, with wb's guard rails.

| --pref-loss | trl trainer (1.16)                         | loss                                           | reference |
|-------------|--------------------------------------------|------------------------------------------------|-----------|
| sigmoid     | DPOTrainer, loss_type sigmoid              | -log s(beta * (dchosen - drejected))           | yes       |
| ipo         | DPOTrainer, loss_type ipo                  | (per-token-mean delta - 1/(2 beta))^2          | yes       |
| hinge       | DPOTrainer, loss_type hinge                | relu(1 - beta * delta)                         | yes       |
| orpo        | experimental ORPOTrainer, beta = lambda    | NLL(chosen) - beta * log s(log odds ratio)     | none      |
| simpo       | experimental CPOTrainer, loss_type simpo,  | -log s(beta * (mean logp_c - mean logp_r)      | none      |
|             | cpo_alpha 0, simpo_gamma                   |        - simpo_gamma)                          |           |

(d = policy log-prob minus reference log-prob of an answer, summed over its tokens.)

The reference of sigmoid/ipo/hinge is the base with the adapter disabled (peft's `disable_adapter()`),
never a second copy of the model: trl 1.16 handed a PeftModel adds a "ref" copy of the adapter to use
as the reference, which wb removes so that, as in LLaMA-Factory, the reference is the base also when
`--adapter DIR` continues an SFT adapter (the result is one adapter, which `wb merge` merges). PiSSA
changes the base's weights, so its adapter-disabled model is not the base: `--init pissa` is refused
with those losses.

Data reaches trl already tokenized (pref_data.py): DPOTrainer gets `prompt_ids`/`chosen_ids`/
`rejected_ids` rows and its own tokenization is skipped (`_prepare_dataset`); ORPO and CPO get the same
rows turned into their `prompt_input_ids`/`chosen_labels`/... columns (`tokenize_row`), without the BOS/EOS
they would add (the chat template writes BOS; each answer ends with the template's end-of-turn token, as
in SFT). trl's dropout disabling (`disable_dropout`, LLaMA-Factory's default too) applies, LoRA dropout
included. Differences from LLaMA-Factory: trl's ORPO takes its NLL term over the whole chosen sequence,
prompt included (LLaMA-Factory's: the answer's mean log-prob); its IPO divides by the answer's length
(LLaMA-Factory's averages the log-probs first: the same quantity).
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from workbench.errors import WorkbenchError
from workbench.train.datasets import DataSource
from workbench.train.pref_data import PREF_FORMATS, encode_pairs, load_pairs

if TYPE_CHECKING:
    from workbench.train.run import Data, Run

DPO_LOSSES = ("sigmoid", "ipo", "hinge")  # trl's DPOTrainer loss_type, reference = the adapter-disabled base
PREF_LOSSES = (*DPO_LOSSES, "orpo", "simpo")
PREFERENCE_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                      "logps/chosen", "logps/rejected")


def load_preference_data(run: Run) -> Data:
    """The data stage of --stage dpo: preference records -> prompt/chosen/rejected ids, split."""
    from workbench.train.run import finish_data, load_run_tokenizer
    from workbench.train.templates import resolve_template

    o = run.options
    if o["train_on_prompt"]:
        raise WorkbenchError("--train-on-prompt applies to --stage sft: preference losses score the answers only")
    loaded = load_pairs(_sources(run.data, o["fmt"]), o["max_samples"])
    tokenizer = load_run_tokenizer(run)
    chat = resolve_template(o["template"], tokenizer, run.base)
    encoded = encode_pairs(loaded.pairs, chat, tokenizer, o["cutoff_len"])
    return finish_data(run, loaded, encoded, chat, tokenizer, "preference dataset")


def _sources(sources: list[DataSource], fmt: str) -> list[DataSource]:
    """The resolved --data sources, checked to be preference data; --format applies to plain files."""
    if fmt not in PREF_FORMATS:
        raise WorkbenchError(f"--format {fmt} is not a preference format; use one of {', '.join(PREF_FORMATS)}")
    for source in sources:
        if source.name is not None and not source.ranking:
            raise WorkbenchError(f"dataset {source.name!r} is not a preference dataset (dataset_info.json has no "
                                 "\"ranking\": true); --stage dpo needs chosen/rejected pairs", source.path)
    return [replace(s, formatting=fmt) if s.formatting == "auto" else s for s in sources]


def preference_config(o: dict, device_type: str) -> tuple[type, dict[str, Any]]:
    """trl's config class for --pref-loss and its preference settings (the rest are TrainingArguments')."""
    loss = o["pref_loss"]
    if loss not in PREF_LOSSES:
        raise WorkbenchError(f"unknown --pref-loss {loss!r}; use one of {', '.join(PREF_LOSSES)}")
    if loss in DPO_LOSSES and o.get("lora_init") == "pissa":
        raise WorkbenchError(f"--pref-loss {loss} compares with the base (the adapter disabled), which --init pissa "
                             "changes; use --init default, or the reference-free --pref-loss orpo or simpo")
    if loss in DPO_LOSSES:
        from trl import DPOConfig

        return DPOConfig, {"beta": o["pref_beta"], "loss_type": [loss], "max_length": None,
                           "pad_to_multiple_of": 8 if device_type == "cuda" else None}
    with _experimental():
        if loss == "orpo":
            from trl.experimental.orpo import ORPOConfig

            return ORPOConfig, {"beta": o["pref_beta"], "max_length": o["cutoff_len"]}
        from trl.experimental.cpo import CPOConfig

        return CPOConfig, {"loss_type": "simpo", "cpo_alpha": 0.0, "simpo_gamma": o["simpo_gamma"],
                           "beta": o["pref_beta"], "max_length": o["cutoff_len"]}


def preference_trainer(peft, args, data: Data, run: Run, say):
    """The trl trainer for --pref-loss around the LoRA model, with wb's guard rails (WbTrainerMixin)."""
    from datasets import Dataset

    classes = trainer_classes()
    loss = run.options["pref_loss"]
    kind = "dpo" if loss in DPO_LOSSES else loss
    train_set = Dataset.from_list(data.train)
    val_set = Dataset.from_list(data.val) if data.val else None
    with _experimental(), _no_map_bars():
        trainer = classes[kind](model=peft, args=args, train_dataset=train_set, eval_dataset=val_set,
                                processing_class=data.tokenizer, echo=say)
    if kind == "dpo":
        use_base_as_reference(trainer.model)
    say(describe_loss(run.options))
    return trainer


def describe_loss(o: dict) -> str:
    """One line: the loss, its trl trainer and settings, and the reference."""
    loss = o["pref_loss"]
    if loss in DPO_LOSSES:
        return (f"preference loss {loss} (trl DPOTrainer), beta {o['pref_beta']:g}; reference: the base with the "
                "adapter disabled")
    if loss == "orpo":
        return f"preference loss orpo (trl ORPOTrainer), lambda (beta) {o['pref_beta']:g}; no reference model"
    return (f"preference loss simpo (trl CPOTrainer), beta {o['pref_beta']:g}, gamma {o['simpo_gamma']:g}; "
            "no reference model")


def use_base_as_reference(model) -> None:
    """Remove the "ref" adapter trl 1.16 copies from a given PeftModel's adapter: the reference is then
    the model with its adapter disabled (trl's `use_adapter(model, None)`), i.e. the base."""
    if "ref" in model.peft_config:
        model.delete_adapter("ref")


def legacy_row(feature: dict) -> dict:
    """A pre-tokenized pair in the columns trl's ORPO/CPO trainers collate (their `tokenize_row` output)."""
    prompt, chosen, rejected = feature["prompt_ids"], feature["chosen_ids"], feature["rejected_ids"]
    row = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
    for side, answer in (("chosen", chosen), ("rejected", rejected)):
        row[f"{side}_input_ids"] = prompt + answer
        row[f"{side}_attention_mask"] = [1] * (len(prompt) + len(answer))
        row[f"{side}_labels"] = [-100] * len(prompt) + answer
    return row


@functools.cache
def trainer_classes() -> dict[str, type]:
    """wb's subclasses of trl's trainers (built on first use: trl is imported only when needed)."""
    from trl import DPOTrainer

    from workbench.train.trainer import WbTrainerMixin

    with _experimental():
        from trl.experimental.cpo import CPOTrainer
        from trl.experimental.orpo import ORPOTrainer

    class WbDPOTrainer(WbTrainerMixin, DPOTrainer):
        """DPOTrainer on wb's tokenized rows."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # already prompt_ids/chosen_ids/rejected_ids, cut to --cutoff-len

        def create_model_card(self, *args, **kwargs) -> None:
            """No README.md in the checkpoints: train_args.json records how the adapter was made."""

    class _LegacyPreference(WbTrainerMixin):
        """ORPO/CPO (trl's older trainer layout) on wb's tokenized rows."""

        def tokenize_row(self, feature, model=None) -> dict:
            return legacy_row(feature)

        def count_tokens(self, inputs: dict):
            return inputs["chosen_attention_mask"].sum() + inputs["rejected_attention_mask"].sum()

        def create_model_card(self, *args, **kwargs) -> None:
            """No README.md in the checkpoints: train_args.json records how the adapter was made."""

    class WbORPOTrainer(_LegacyPreference, ORPOTrainer):
        pass

    class WbCPOTrainer(_LegacyPreference, CPOTrainer):
        pass

    return {"dpo": WbDPOTrainer, "orpo": WbORPOTrainer, "simpo": WbCPOTrainer}


@contextlib.contextmanager
def _experimental() -> Iterator[None]:
    """Silence trl's TRLExperimentalWarning (only it): ORPO and CPO live in trl.experimental."""
    from trl.import_utils import TRLExperimentalWarning

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=TRLExperimentalWarning)
        yield


@contextlib.contextmanager
def _no_map_bars() -> Iterator[None]:
    """No `datasets` progress bars for ORPO/CPO's column mapping of rows that are already tokenized."""
    from datasets.utils import logging as datasets_logging

    shown = datasets_logging.is_progress_bar_enabled()
    datasets_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            datasets_logging.enable_progress_bar()
