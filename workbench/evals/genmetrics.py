"""ROUGE-1/2/L F-scores and BLEU-4 of predictions, x100, as LLaMA-Factory scores SFT predictions.

For each (prediction, reference) pair, as LLaMA-Factory's `ComputeSimilarity` does:
- ROUGE: both texts segmented with jieba, words joined by spaces, scored with the `rouge` package
  (rouge-chinese, which LLaMA-Factory imports, is the same code); an empty side scores 0;
- BLEU-4: NLTK's `sentence_bleu` with `SmoothingFunction().method3` over characters;
- every score x100, rounded to 4 decimals; the reported figure is the mean over samples.
Text without any CJK character is English-like: its BLEU runs over jieba's words and punctuation
(whitespace dropped) instead of characters, so "English by words" on both metrics. Chinese text,
AdvertiseGen included, is scored exactly as LLaMA-Factory scores it.
"""

from __future__ import annotations

import logging
import math
import re

METRICS = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")
_CJK = re.compile("[\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef\U00020000-\U0002ffff]")


def _jieba():
    import jieba

    jieba.setLogLevel(logging.CRITICAL)
    return jieba


def words(text: str) -> list[str]:
    """jieba's segmentation without whitespace tokens (English comes out word by word)."""
    return [token for token in _jieba().cut(text) if token.strip()]


def bleu_tokens(text: str, cjk: bool) -> list[str]:
    return list(text) if cjk else words(text)


def score(prediction: str, reference: str) -> dict[str, float]:
    """{"rouge-1", "rouge-2", "rouge-l", "bleu-4"} of one pair, x100 and rounded to 4 decimals."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge import Rouge

    hypothesis, target = words(prediction), words(reference)
    if hypothesis and target:
        rouge = Rouge().get_scores(" ".join(hypothesis), " ".join(target))[0]
        scores = {name: round(rouge[name]["f"] * 100, 4) for name in ("rouge-1", "rouge-2", "rouge-l")}
    else:
        scores = {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    cjk = bool(_CJK.search(prediction) or _CJK.search(reference))
    predicted = bleu_tokens(prediction, cjk)
    bleu = sentence_bleu(
        [bleu_tokens(reference, cjk)], predicted, smoothing_function=SmoothingFunction().method3
    ) if predicted else 0.0
    scores["bleu-4"] = round(float(bleu) * 100, 4)
    return scores


def summarize(per_sample: list[dict[str, float]]) -> tuple[dict[str, float], dict[str, float | None]]:
    """(mean of each metric, standard error of that mean), both rounded to 4 decimals."""
    means: dict[str, float] = {}
    errors: dict[str, float | None] = {}
    n = len(per_sample)
    for name in METRICS:
        values = [sample[name] for sample in per_sample]
        mean = sum(values) / n
        means[name] = round(mean, 4)
        if n > 1:
            variance = sum((v - mean) ** 2 for v in values) / (n - 1)
            errors[name] = round(math.sqrt(variance / n), 4)
        else:
            errors[name] = None
    return means, errors
