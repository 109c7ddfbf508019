"""Pictures and tables of an evaluation: a PNG grid of example predictions, a Markdown report.

In the grid, ground-truth boxes are green and predicted boxes red, drawn on the original image (boxes
are parsed with the rewards' parsers and mapped from the model's box space with ``rewards.coords``);
each panel's title holds the answer text and the ground truth.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from megatron_vrft.rewards.coords import convert_boxes
from megatron_vrft.rewards.parsing import extract_answer, parse_boxes, parse_single_box
from megatron_vrft.rewards.types import GroundTruth, as_ground_truths


def _predicted_boxes(completion: str, task: str) -> np.ndarray:
    answer, _ = extract_answer(completion)
    if answer is None:
        return np.zeros((0, 4))
    if task == "grounding":
        box, _ = parse_single_box(answer)
        return np.zeros((0, 4)) if box is None else np.asarray([box], dtype=np.float64)
    if task == "detection":
        boxes, _ = parse_boxes(answer)
        return np.asarray([b.box for b in boxes or []], dtype=np.float64).reshape(-1, 4)
    return np.zeros((0, 4))


def _to_pixels(boxes: np.ndarray, gt: GroundTruth) -> np.ndarray:
    space = gt.coord_space
    if not len(boxes) or space is None or space == "pixels_original":
        return boxes
    return convert_boxes(boxes, space, "pixels_original", image_size=gt.image_size, resized_size=gt.resized_size)


def draw_prediction_grid(
    path: str | Path,
    images: Sequence[Any],
    completions: Sequence[str],
    ground_truths: Sequence[GroundTruth | Mapping[str, Any]],
    *,
    task: str,
    columns: int = 4,
) -> Path:
    """Write a grid of ``images`` (PIL) with ground truth (green) and predictions (red)."""
    ground_truths = as_ground_truths(ground_truths, len(completions))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches as patches
    import matplotlib.pyplot as plt

    n = len(images)
    rows = max(1, -(-n // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, text, gt in zip(axes.flat, images, completions, ground_truths):
        ax.imshow(image)
        gt_boxes = []
        if gt.boxes is not None:
            gt_boxes = _to_pixels(gt.boxes, gt)
        elif gt.box is not None:
            gt_boxes = _to_pixels(gt.box[None], gt)
        for boxes, colour in ((gt_boxes, "lime"), (_to_pixels(_predicted_boxes(text, task), gt), "red")):
            for x1, y1, x2, y2 in boxes:
                ax.add_patch(patches.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, linewidth=2))
        answer, _ = extract_answer(text)
        shown = (answer if answer is not None else text).replace("\n", " ")
        truth = gt.label or ""
        ax.set_title(
            f"pred: {shown[:40]}\n" + (f"truth: {truth}" if truth else ""),
            fontsize=8,
            color="black" if answer is not None else "firebrick",
        )
    if task != "classification":
        fig.suptitle("ground truth: green    prediction: red", fontsize=9)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def markdown_report(metrics: Mapping[str, Any], *, title: str) -> str:
    """A Markdown table of the scalar metrics, and one of the per-class/category ones if present."""
    lines = [f"# {title}", "", "| metric | value |", "|---|---|"]
    for key, value in metrics.items():
        if isinstance(value, float):
            lines.append(f"| {key} | {value:.4f} |")
        elif isinstance(value, (int, str)):
            lines.append(f"| {key} | {value} |")
    for key, value in metrics.items():
        if isinstance(value, dict) and value and all(isinstance(v, (int, float)) for v in value.values()):
            lines += ["", f"## {key}", "", "| name | value |", "|---|---|"]
            lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in value.items()]
    return "\n".join(lines) + "\n"
