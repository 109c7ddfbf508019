"""Prompt templates of the Visual-RFT paper (arXiv 2503.01785), one per task.

Every prompt ends with the think/answer instruction the format reward checks::

    Output the thinking process in <think> </think> and final answer in <answer> </answer> tags.

Detection follows the paper's open-vocabulary / few-shot detection prompt (boxes of the given
category with confidences, ``[{'Position': [x1, y1, x2, y2], 'Confidence': number}, ...]``, or
``No Objects``); with several categories in one prompt each entry also carries ``'Label'``.
Classification follows the fine-grained prompt ("This is an image containing a plant. Please
identify the species of the plant based on the image."). Grounding follows the reasoning-grounding
prompt ("Output the bounding box in the image corresponding to the instruction: ...") with one box
``[x1, y1, x2, y2]``. The coordinate wording matches the model's box space (see
:mod:`megatron_vrft.data.boxes`).
"""

from __future__ import annotations

from collections.abc import Sequence

from .boxes import COORD_SPACES, CoordSpace

THINK_ANSWER_INSTRUCTION = (
    "Output the thinking process in <think> </think> and final answer in <answer> </answer> tags."
)
STRICT_FORMAT = "Please strictly follow the format."
NO_OBJECTS = "No Objects"

# How the prompt describes coordinates in each space.
_COORD_WORDING: dict[str, str] = {
    "norm_1000": "between 0 and 1000, integer",
    "pixels_resized": "absolute pixel coordinates of the image, integer",
    "pixels_original": "absolute pixel coordinates of the image, integer",
    "norm_1": "between 0 and 1, with three decimal places",
}


def coordinate_wording(space: CoordSpace) -> str:
    """The parenthesised coordinate description used in box prompts for ``space``."""
    if space not in COORD_SPACES:
        raise ValueError(f"unknown coordinate space {space!r}; expected {COORD_SPACES}")
    return _COORD_WORDING[space]


def _quote_list(names: Sequence[str]) -> str:
    return ", ".join(f"'{n}'" for n in names)


def build_detection_prompt(categories: Sequence[str], *, box_space: CoordSpace) -> str:
    """Detection prompt for one or more category names.

    Raises:
        ValueError: ``categories`` is empty or holds an empty name.
    """
    names = [str(c).strip() for c in categories]
    if not names or any(not n for n in names):
        raise ValueError(f"detection prompt needs at least one non-empty category name, got {categories!r}")
    coords = coordinate_wording(box_space)
    if len(names) == 1:
        cat = names[0]
        return (
            f"Detect all objects belonging to the category '{cat}' in the image, and provide the "
            f"bounding boxes ({coords}) and confidence (between 0 and 1, with two decimal places).\n"
            f"If no object belonging to the category '{cat}' in the image, return '{NO_OBJECTS}'.\n"
            f"{THINK_ANSWER_INSTRUCTION}"
            "The output answer format should be as follows:\n"
            "<think> ... </think> <answer>[{'Position': [x1, y1, x2, y2], 'Confidence': number}, ...]"
            "</answer>\n"
            f"{STRICT_FORMAT}"
        )
    cats = _quote_list(names)
    return (
        f"Detect all objects belonging to the categories {cats} in the image, and provide the "
        f"bounding boxes ({coords}), the category label and confidence (between 0 and 1, with two "
        "decimal places).\n"
        f"If no object belonging to these categories is in the image, return '{NO_OBJECTS}'.\n"
        f"{THINK_ANSWER_INSTRUCTION}"
        "The output answer format should be as follows:\n"
        "<think> ... </think> <answer>[{'Position': [x1, y1, x2, y2], 'Confidence': number, "
        "'Label': 'category name'}, ...]</answer>\n"
        f"{STRICT_FORMAT}"
    )


def build_classification_prompt(
    *, object_type: str = "object", attribute: str = "category", answer_hint: str | None = None
) -> str:
    """Fine-grained classification prompt.

    Args:
        object_type: what the image contains ("plant", "aircraft", "pet", "car", "shape").
        attribute: what to name ("species", "model", "category").
        answer_hint: placeholder in the answer format; defaults to ``"<attribute> name"``.
    """
    article = "an" if object_type[:1].lower() in "aeiou" else "a"
    hint = answer_hint or f"{attribute} name"
    return (
        f"This is an image containing {article} {object_type}. Please identify the {attribute} of "
        f"the {object_type} based on the image.\n"
        f"{THINK_ANSWER_INSTRUCTION}"
        "The output answer format should be as follows:\n"
        f"<think> ... </think> <answer>{hint}</answer>\n"
        f"{STRICT_FORMAT}"
    )


def build_grounding_prompt(query: str, *, box_space: CoordSpace) -> str:
    """Reasoning-grounding prompt: one box for the instruction / referring expression ``query``."""
    query = str(query).strip()
    if not query:
        raise ValueError("grounding prompt needs a non-empty query")
    coords = coordinate_wording(box_space)
    return (
        f"Output the bounding box in the image corresponding to the instruction: {query}\n"
        f"Provide exactly one bounding box ({coords}).\n"
        f"{THINK_ANSWER_INSTRUCTION}"
        "The output answer format should be as follows:\n"
        "<think> ... </think> <answer>[x1, y1, x2, y2]</answer>\n"
        f"{STRICT_FORMAT}"
    )


def format_answer(ground_truth, task: str) -> str:
    """The ``<think>...</think> <answer>...</answer>`` completion a perfect model writes for a
    model-space ground truth (SFT targets): a class name, one box, or the box list with confidence
    1.0 (and labels when the record has several categories). Coordinates are rounded to integers.
    """
    if task == "classification":
        answer = ground_truth.label
    elif task == "grounding":
        answer = "[" + ", ".join(str(round(float(v))) for v in ground_truth.box) + "]"
    elif task == "detection":
        boxes = [] if ground_truth.boxes is None else list(ground_truth.boxes)
        categories = list(ground_truth.categories or [])
        several = len(set(categories)) > 1
        if not boxes:
            answer = NO_OBJECTS
        else:
            entries = []
            for i, box in enumerate(boxes):
                pos = ", ".join(str(round(float(v))) for v in box)
                label = f", 'Label': '{categories[i]}'" if several else ""
                entries.append(f"{{'Position': [{pos}], 'Confidence': 1.0{label}}}")
            answer = "[" + ", ".join(entries) + "]"
    else:
        raise ValueError(f"unknown task {task!r}")
    return f"<think>I look at the image.</think> <answer>{answer}</answer>"
