"""A scripted policy: completions of a chosen quality, sampled from the ground truth.

A test aid, used where a model's behaviour must be known in advance (the rewards' quality sweep,
tests of rewards and evaluation). ``quality`` in [0, 1] controls every error source at once:

- format: with probability ``0.4 * (1 - quality)`` the completion is malformed (missing think block,
  truncated answer, prose instead of a list, a non-numeric coordinate, ...);
- classification: the label (or a synonym / case variant) with probability ``quality``, else a
  wrong class name;
- detection: each ground-truth box is kept with probability ``0.4 + 0.6 * quality`` and jittered by
  ``(1 - quality) * 0.35`` of its size; false positives ~ Poisson(``2 * (1 - quality)``); kept
  boxes get high confidence, false positives low (with noise);
- grounding: the box is jittered by ``(1 - quality) * 0.6`` of its size.

Completions follow the Visual-RFT answer formats. Coordinates are rounded to integers as models emit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from megatron_vrft.rewards.types import GroundTruth, as_ground_truth

MALFORMED_TEMPLATES = (
    "<answer>{answer}</answer>",  # no think block
    "<think>{think}</think><answer>{answer_truncated}",  # truncated mid-answer
    "<think>{think}</think>\n<answer>I am not sure what is in this image.</answer>",
    "<think>{think}</think><answer>[{{'Position': [x1, 'y1', 10, 20], 'Confidence': 0.9}}]</answer>",
    "{think} {answer}",  # no tags at all
    "<think>{think}<answer>{answer}</answer>",  # think never closed
)


@dataclass(kw_only=True)
class ScriptedPolicy:
    """Samples groups of completions for examples of one task at a given quality."""

    quality: float
    """In [0, 1]: 1 answers perfectly (up to integer rounding), 0 is mostly wrong."""
    class_names: Sequence[str] = ()
    """Classification: the label set wrong answers are drawn from."""
    seed: int = 0
    """Seed of the sampler; the same seed gives the same completions."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.quality <= 1.0:
            raise ValueError(f"quality must be in [0, 1], got {self.quality}")
        self._rng = np.random.default_rng(self.seed)

    def sample(self, task: str, ground_truth: GroundTruth | Mapping[str, Any], num_samples: int) -> list[str]:
        """``num_samples`` completions for one example; ``ground_truth`` as the rewards take it."""
        gt = as_ground_truth(ground_truth)
        return [self._one(task, gt) for _ in range(num_samples)]

    def _one(self, task: str, gt: GroundTruth) -> str:
        noise = 1.0 - self.quality
        if task == "classification":
            answer = self._classification_answer(gt)
        elif task == "detection":
            answer = self._detection_answer(gt)
        elif task == "grounding":
            answer = self._grounding_answer(gt)
        else:
            raise ValueError(f"unknown task {task!r}")
        think = "The image shows the objects described; I compare their shapes, colours and places."
        if self._rng.random() < 0.4 * noise:
            template = MALFORMED_TEMPLATES[int(self._rng.integers(len(MALFORMED_TEMPLATES)))]
            cut = max(1, int(len(answer) * self._rng.uniform(0.2, 0.8)))
            return template.format(think=think, answer=answer, answer_truncated=answer[:cut])
        return f"<think>{think}</think>\n<answer>{answer}</answer>"

    def _classification_answer(self, gt: GroundTruth) -> str:
        label = str(gt.label)
        if self._rng.random() < self.quality:
            choices = [label, label.title(), *gt.synonyms]
            return choices[int(self._rng.integers(len(choices)))]
        wrong = [c for c in self.class_names if c != label] or ["unknown object"]
        return wrong[int(self._rng.integers(len(wrong)))]

    def _jitter(self, box: np.ndarray, scale: float) -> np.ndarray:
        w, h = max(box[2] - box[0], 1.0), max(box[3] - box[1], 1.0)
        out = box + self._rng.normal(0.0, 1.0, 4) * scale * np.array([w, h, w, h])
        out[2] = max(out[2], out[0] + 1.0)
        out[3] = max(out[3], out[1] + 1.0)
        return np.round(out)

    def _detection_answer(self, gt: GroundTruth) -> str:
        noise = 1.0 - self.quality
        boxes = gt.boxes if gt.boxes is not None else np.zeros((0, 4))
        categories = list(gt.categories or [])
        entries = []
        for i, box in enumerate(boxes):
            if self._rng.random() > 0.4 + 0.6 * self.quality:
                continue
            conf = float(np.clip(self._rng.normal(0.75 + 0.2 * self.quality, 0.1), 0.05, 1.0))
            entries.append((self._jitter(box, 0.35 * noise), conf, categories[i] if i < len(categories) else None))
        extent = boxes.max(axis=0)[2:] if len(boxes) else np.array([100.0, 100.0])
        for _ in range(int(self._rng.poisson(2.0 * noise))):
            xy = self._rng.uniform(0, 0.7, 2) * extent
            wh = self._rng.uniform(0.05, 0.3, 2) * extent
            conf = float(np.clip(self._rng.normal(0.4, 0.15), 0.05, 1.0))
            label = categories[int(self._rng.integers(len(categories)))] if categories else None
            entries.append((np.round(np.concatenate([xy, xy + wh])), conf, label))
        if not entries:
            return "No Objects"
        parts = []
        for box, conf, label in entries:
            position = ", ".join(str(int(v)) for v in box)
            item = f"{{'Position': [{position}], 'Confidence': {conf:.2f}"
            if label is not None and len(set(categories)) > 1:
                item += f", 'Label': '{label}'"
            parts.append(item + "}")
        return "[" + ", ".join(parts) + "]"

    def _grounding_answer(self, gt: GroundTruth) -> str:
        box = gt.box
        jittered = self._jitter(box, 0.6 * (1.0 - self.quality))
        return "[" + ", ".join(str(int(v)) for v in jittered) + "]"
