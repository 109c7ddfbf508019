"""Classification accuracy reward (fine-grained / few-shot classification).

Two modes:

- ``mode="default"`` (robust): the answer is the content of the single ``<answer>`` block. Both the
  answer and each accepted name (``label`` and ``synonyms``) are normalised (NFKC, case-folded,
  ``_``/``-``/``/`` and other punctuation turned into spaces, whitespace collapsed). Score 1 if the
  answer equals a name (also compared with spaces removed: ``"boeing737"`` == ``"boeing 737"``), or
  a name occurs in the answer as a whole word or phrase (``"a black footed albatross"`` matches
  ``"black footed albatross"``; ``"category"`` does not match ``"cat"``) and the answer is at most
  ``max_extra_words`` words longer than that name (so listing many classes does not pay). An empty
  answer never scores. Known limit: negations ("not a cat") are not understood.
- ``mode="visual_rft_compat"``: the published Visual-RFT rule, for reproducing the paper. Answer
  = first ``<answer>(.*?)</answer>`` (no DOTALL: a multi-line answer is not found), else the whole
  completion; both strings lower-cased with spaces and underscores removed; score 1 if either
  contains the other. This is hackable: an empty answer or a single letter is contained in every
  label. Failure reasons are still recorded in this mode but do not force a score of 0.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from megatron_vrft.rewards.parsing import MAX_COMPLETION_CHARS, extract_answer
from megatron_vrft.rewards.registry import register_reward
from megatron_vrft.rewards.types import FailureReason as R
from megatron_vrft.rewards.types import (
    GroundTruth,
    RewardOutput,
    as_ground_truths,
    build_reward_output,
)

ClassificationMode = Literal["default", "visual_rft_compat"]

_PUNCT_RE = re.compile(r"[\W_]+", re.UNICODE)


def normalize_label(text: str) -> str:
    """NFKC, case-fold, every run of non-alphanumerics -> one space, stripped."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return _PUNCT_RE.sub(" ", text).strip()


def compat_normalize(text: str) -> str:
    """The published normalisation: remove ``' '`` and ``'_'``, lower-case."""
    return text.replace(" ", "").replace("_", "").lower()


def label_matches(answer: str, names: Sequence[str], *, max_extra_words: int | None = 8) -> bool:
    """Default-mode decision for an already extracted answer (see module docstring)."""
    ans = normalize_label(answer)
    if not ans:
        return False
    ans_words = ans.split(" ")
    padded = f" {ans} "
    for name in names:
        lab = normalize_label(name)
        if not lab:
            continue
        if ans == lab or ans.replace(" ", "") == lab.replace(" ", ""):
            return True
        if f" {lab} " in padded and (
            max_extra_words is None or len(ans_words) <= len(lab.split(" ")) + max_extra_words
        ):
            return True
    return False


def compat_extract(completion: str) -> str:
    """``re.search(r"<answer>(.*?)</answer>", text)`` group 1, else ``text``; in linear time.

    Without DOTALL the match lies within one line, and the leftmost ``<answer>`` of a line that has
    a ``</answer>`` after it is the regex's match (the backtracking search is quadratic on
    ``"<answer>" * n``).
    """
    for line in completion.split("\n"):
        start = line.find("<answer>")
        if start < 0:
            continue
        end = line.find("</answer>", start + len("<answer>"))
        if end >= 0:
            return line[start + len("<answer>") : end]
    return completion


def compat_matches(completion: str, label: str) -> bool:
    """Published Visual-RFT rule on a raw completion."""
    student = compat_normalize(compat_extract(completion).strip())
    truth = compat_normalize(label.strip())
    return truth in student or student in truth


@register_reward("accuracy", min_score=0.0, max_score=1.0)
def classification_accuracy_reward(
    completions: Sequence[str],
    ground_truths: Sequence[GroundTruth | Mapping[str, Any]],
    *,
    mode: ClassificationMode = "default",
    max_extra_words: int | None = 8,
    max_chars: int = MAX_COMPLETION_CHARS,
) -> RewardOutput:
    """1.0 for a correct class name in the answer, else 0.0. Reads ``label`` and ``synonyms``."""
    if mode not in ("default", "visual_rft_compat"):
        raise ValueError(f"accuracy mode must be 'default' or 'visual_rft_compat', got {mode!r}")
    gts = as_ground_truths(ground_truths, len(completions))
    for i, g in enumerate(gts):
        if g.label is None or not normalize_label(g.label):
            raise ValueError(f"{g.where(i)}.label: accuracy needs a non-empty label")
    scores, reasons = [], []
    for text, gt in zip(completions, gts):
        answer, reason = extract_answer(text, max_chars=max_chars)
        if reason is None and not normalize_label(answer):
            reason = R.EMPTY_ANSWER
        if mode == "visual_rft_compat":
            ok = isinstance(text, str) and len(text) <= max_chars and compat_matches(text, gt.label)
        else:
            ok = reason is None and label_matches(answer, (gt.label, *gt.synonyms), max_extra_words=max_extra_words)
        scores.append(1.0 if ok else 0.0)
        reasons.append(None if reason is None else reason.value)
    return build_reward_output(scores, reasons)
