"""The demo's own data, generated here from small vocabularies (no third-party text is copied).

Three sets, all from one seeded random generator, so the same seed writes byte-identical files:

- **ad copy** in AdvertiseGen's shape: a prompt `类型#连衣裙*颜色#黑色*图案#条纹` and a Chinese sentence
  that uses every attribute value verbatim, built from per-attribute phrase templates. Train and test
  hold disjoint attribute combinations, so the test measures the task, not memory.
- **identity**: questions about the assistant (Chinese and English) answered with its name and maker.
- **multiple choice** in MMLU's CSV layout (`question,A,B,C,D,answer`, no header; dev/val/test splits):
  which attribute an ad sentence mentions, and who the assistant is.
"""

from __future__ import annotations

import csv
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.outputs import atomic_dir

ASSISTANT_NAME = "WB-Assistant"
ASSISTANT_MAKER = "the wb workbench team"
ASSISTANT_MAKER_ZH = "wb 工作台团队"
MC_SUBJECT = "wb_demo"

# Attribute key -> values. 类型 (the garment) is in every prompt; the others are drawn per sample.
VOCABULARY: dict[str, list[str]] = {
    "类型": ["连衣裙", "半身裙", "衬衫", "T恤", "卫衣", "外套", "毛衣", "风衣", "阔腿裤", "牛仔裤"],
    "版型": ["宽松", "修身", "直筒", "收腰", "A字"],
    "材质": ["纯棉", "真丝", "雪纺", "针织", "羊毛", "亚麻", "蕾丝", "牛仔布"],
    "颜色": ["黑色", "白色", "红色", "蓝色", "灰色", "粉色", "绿色", "卡其色", "藏青色", "杏色"],
    "风格": ["简约", "复古", "休闲", "通勤", "甜美", "街头", "文艺", "优雅"],
    "图案": ["条纹", "格子", "碎花", "纯色", "波点", "印花", "刺绣", "字母"],
}
# The order attributes appear in a prompt (AdvertiseGen lists 类型 first, then the rest).
KEY_ORDER = list(VOCABULARY)
OPTIONAL_KEYS = KEY_ORDER[1:]

# Per-attribute phrases; `{v}` is the value. Two variants each keep the task learnable in a few
# hundred steps while not being a single fixed string.
PHRASES: dict[str, list[str]] = {
    "版型": ["{v}版型", "{v}剪裁"],
    "材质": ["选用{v}面料", "{v}材质亲肤"],
    "颜色": ["经典{v}", "{v}的主色调"],
    "风格": ["尽显{v}气质", "{v}风格"],
    "图案": ["点缀{v}元素", "{v}图案"],
}
CLOSERS = ["穿着舒适又显气质。", "日常出街百搭有型。", "轻松穿出好身材。"]

IDENTITY_QUESTIONS_ZH = ["你是谁？", "你叫什么名字？", "介绍一下你自己。", "你是哪个团队开发的？", "你好，请问你是？",
                         "谁创造了你？", "你的名字是什么？", "你是什么模型？"]
IDENTITY_QUESTIONS_EN = ["Who are you?", "What is your name?", "Introduce yourself.", "Who made you?",
                         "Hello, who am I talking to?", "Who created you?", "What model are you?",
                         "Which team trained you?"]
IDENTITY_ANSWER_ZH = f"我是 {ASSISTANT_NAME}，由 {ASSISTANT_MAKER_ZH} 微调的助手。"
IDENTITY_ANSWER_EN = f"I am {ASSISTANT_NAME}, an assistant fine-tuned by {ASSISTANT_MAKER}."


@dataclass(frozen=True)
class AdSample:
    attributes: tuple[tuple[str, str], ...]  # (key, value) in prompt order
    text: str

    @property
    def prompt(self) -> str:
        return "*".join(f"{k}#{v}" for k, v in self.attributes)


@dataclass
class DemoData:
    """Paths of the files `write_demo_data` wrote, and their sizes."""

    root: Path
    adgen_train: Path  # alpaca JSON
    identity_train: Path  # alpaca JSON
    adgen_test: Path  # AdvertiseGen-style jsonl (content/summary)
    identity_test: Path  # alpaca JSON
    mc_dir: Path  # MMLU layout: data/{dev,val,test}/wb_demo_<split>.csv
    counts: dict[str, int]

    @property
    def train_files(self) -> list[Path]:
        return [self.adgen_train, self.identity_train]


def ad_sentence(attributes: tuple[tuple[str, str], ...], rng: random.Random) -> str:
    """"这款<type>" + one phrase per further attribute + a closer: every value appears verbatim."""
    values = dict(attributes)
    parts = [f"这款{values['类型']}"]
    for key, value in attributes:
        if key != "类型":
            parts.append(rng.choice(PHRASES[key]).format(v=value))
    return "，".join(parts) + "，" + rng.choice(CLOSERS)


def ad_samples(n: int, seed: int) -> list[AdSample]:
    """`n` samples with distinct attribute combinations (3 or 4 attributes each, 类型 first)."""
    rng = random.Random(seed)
    seen: set[tuple[tuple[str, str], ...]] = set()
    samples: list[AdSample] = []
    attempts = 0
    while len(samples) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise WorkbenchError(f"cannot draw {n} distinct attribute combinations from the vocabulary")
        keys = {"类型", *rng.sample(OPTIONAL_KEYS, rng.choice([2, 3]))}
        attributes = tuple((k, rng.choice(VOCABULARY[k])) for k in KEY_ORDER if k in keys)
        if attributes in seen:
            continue
        seen.add(attributes)
        samples.append(AdSample(attributes, ad_sentence(attributes, rng)))
    return samples


def identity_samples() -> list[dict]:
    """Every identity question with its answer, alpaca format."""
    rows = [{"instruction": q, "input": "", "output": IDENTITY_ANSWER_ZH} for q in IDENTITY_QUESTIONS_ZH]
    rows += [{"instruction": q, "input": "", "output": IDENTITY_ANSWER_EN} for q in IDENTITY_QUESTIONS_EN]
    return rows


def split_identity(rows: list[dict], seed: int, test_per_language: int = 2) -> tuple[list[dict], list[dict]]:
    """Hold out `test_per_language` questions of each language; the rest train."""
    rng = random.Random(seed)
    train, test = [], []
    for answer in (IDENTITY_ANSWER_ZH, IDENTITY_ANSWER_EN):
        group = [r for r in rows if r["output"] == answer]
        held = set(rng.sample(range(len(group)), test_per_language))
        test += [r for i, r in enumerate(group) if i in held]
        train += [r for i, r in enumerate(group) if i not in held]
    return train, test


def mc_questions(samples: list[AdSample], seed: int) -> list[list[str]]:
    """MMLU-layout rows [question, A, B, C, D, answer]: attribute recall from ad sentences, and identity."""
    rng = random.Random(seed)
    rows = []
    for sample in samples:
        key, value = rng.choice([kv for kv in sample.attributes if kv[0] != "类型"])
        distractors = rng.sample([v for v in VOCABULARY[key] if v != value], 3)
        rows.append(_mc_row(f"广告文案：“{sample.text}” 这件衣服的{key}是什么？", value, distractors, rng))
    makers = ["OpenAI", "Google", "Meta"]
    names = ["ChatGPT", "Gemini", "Llama"]
    rows.append(_mc_row("What is the name of this assistant?", ASSISTANT_NAME, names, rng))
    rows.append(_mc_row("Who fine-tuned this assistant?", ASSISTANT_MAKER, makers, rng))
    rows.append(_mc_row("你的名字是什么？", ASSISTANT_NAME, names, rng))
    rows.append(_mc_row("谁微调了你？", ASSISTANT_MAKER_ZH, makers, rng))
    return rows


def _mc_row(question: str, correct: str, distractors: list[str], rng: random.Random) -> list[str]:
    choices = [correct, *distractors]
    rng.shuffle(choices)
    return [question, *choices, "ABCD"[choices.index(correct)]]


def _csv_text(rows: list[list[str]]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


def _alpaca(samples: list[AdSample]) -> list[dict]:
    return [{"instruction": s.prompt, "input": "", "output": s.text} for s in samples]


def _dump_json(path: Path, rows: list[dict]) -> None:
    path.write_text(json.dumps(rows, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def write_demo_data(out: str | Path, *, seed: int = 0, n_train: int = 600, n_test: int = 40, n_mc: int = 24,
                    force: bool = False) -> DemoData:
    """Write the demo's train/test/multiple-choice files into `out` (atomically)."""
    if min(n_train, n_test, n_mc) < 1:
        raise WorkbenchError("n_train, n_test and n_mc must be at least 1")
    out = Path(out)
    samples = ad_samples(n_train + n_test + n_mc, seed)
    train, test, mc_source = samples[:n_train], samples[n_train:n_train + n_test], samples[n_train + n_test:]
    identity_train, identity_test = split_identity(identity_samples(), seed)
    mc_rows = mc_questions(mc_source, seed)
    dev, val, mc_test = mc_rows[:5], mc_rows[5:9], mc_rows[9:]
    with atomic_dir(out, force=force) as tmp:
        _dump_json(tmp / "adgen_train.json", _alpaca(train))
        _dump_json(tmp / "identity_train.json", identity_train)
        _dump_json(tmp / "identity_test.json", identity_test)
        lines = [json.dumps({"content": s.prompt, "summary": s.text}, ensure_ascii=False) for s in test]
        (tmp / "adgen_test.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        for split, rows in (("dev", dev), ("val", val), ("test", mc_test)):
            folder = tmp / "mc" / "data" / split
            folder.mkdir(parents=True)
            (folder / f"{MC_SUBJECT}_{split}.csv").write_text(_csv_text(rows), encoding="utf-8")
    counts = {"adgen_train": len(train), "adgen_test": len(test), "identity_train": len(identity_train),
              "identity_test": len(identity_test), "mc_dev": len(dev), "mc_val": len(val), "mc_test": len(mc_test)}
    return DemoData(root=out, adgen_train=out / "adgen_train.json", identity_train=out / "identity_train.json",
                    adgen_test=out / "adgen_test.jsonl", identity_test=out / "identity_test.json",
                    mc_dir=out / "mc", counts=counts)
