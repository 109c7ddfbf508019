"""Qwen2-VL preprocessing: image processor, processor wiring, chat prompt, model-space ground truth.

- :func:`build_image_processor`: transformers' Qwen2-VL image processor (the torchvision backend
  when torchvision is importable, else the PIL/numpy one) with ``min_pixels`` / ``max_pixels``.
- :func:`build_qwen2vl_processor`: a
  :class:`~megatron_vrft.data.qwen2vl_processor.Qwen2VLImageTextProcessor` (``Qwen2VLProcessor``
  without the video processor that needs torchvision).
- :func:`preprocess_record`: record -> :class:`PreprocessedExample` (``input_ids``,
  ``attention_mask``, ``mm_token_type_ids``, ``pixel_values``, ``image_grid_thw``) plus the ground
  truth mapped into the model's box space using the processor's resized size
  (``image_grid_thw[1:] * patch_size``, identical to ``smart_resize``): the same
  :class:`~megatron_vrft.rewards.types.GroundTruth`, which the rewards read directly.
- :func:`ground_truth_in_model_space`: a record's ground truth in the model's box space without
  preprocessing its image.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image

from .boxes import MODEL_COORD_SPACES, CoordSpace, space_extent
from .errors import (
    CORRUPT_IMAGE,
    DataError,
    OnError,
    OutOfBounds,
    SkipCounts,
    check_on_error,
    raise_or_skip,
)
from .records import (
    GroundTruth,
    VisualRecord,
    check_ground_truth_boxes,
    image_source_name,
    load_image,
)

DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 1280


def build_image_processor(
    *,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    patch_size: int = 14,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
):
    """Qwen2-VL image processor with the given pixel budget (``min_pixels <= W'H' <= max_pixels``).

    Uses the torchvision backend when torchvision is importable, the PIL/numpy backend otherwise
    (same resize rule and patch layout).
    """
    if min_pixels <= 0 or max_pixels < min_pixels:
        raise ValueError(f"need 0 < min_pixels <= max_pixels, got {min_pixels}, {max_pixels}")
    kwargs = dict(
        min_pixels=int(min_pixels),
        max_pixels=int(max_pixels),
        patch_size=patch_size,
        merge_size=merge_size,
        temporal_patch_size=temporal_patch_size,
    )
    if importlib.util.find_spec("torchvision") is not None:
        from transformers import Qwen2VLImageProcessor

        return Qwen2VLImageProcessor(**kwargs)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    return Qwen2VLImageProcessorPil(**kwargs)


def build_qwen2vl_processor(
    tokenizer,
    *,
    image_processor=None,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    chat_template: str | None = None,
) -> Qwen2VLImageTextProcessor:  # noqa: F821 - imported lazily
    """Processor from a tokenizer (the tiny test one or a real Qwen2-VL one).

    ``image_processor`` defaults to :func:`build_image_processor` with the pixel budget;
    ``chat_template`` defaults to the tokenizer's.
    """
    if image_processor is None:
        image_processor = build_image_processor(min_pixels=min_pixels, max_pixels=max_pixels)
    template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
    if template is None:
        raise ValueError("the tokenizer has no chat template; pass chat_template=")
    from .qwen2vl_processor import Qwen2VLImageTextProcessor

    return Qwen2VLImageTextProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=template)


def compute_resized_size(width: int, height: int, image_processor) -> tuple[int, int]:
    """``(W', H')`` the image processor resizes a ``(width, height)`` image to (``smart_resize``)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    factor = image_processor.patch_size * image_processor.merge_size
    size = image_processor.size
    h, w = smart_resize(
        int(height),
        int(width),
        factor=factor,
        min_pixels=size["shortest_edge"],
        max_pixels=size["longest_edge"],
    )
    return int(w), int(h)


def resized_size_from_grid(image_grid_thw, patch_size: int) -> list[tuple[int, int]]:
    """``(W', H')`` per image from ``image_grid_thw (I, 3)``: ``(w * patch, h * patch)``."""
    grid = torch.as_tensor(image_grid_thw).reshape(-1, 3)
    return [(int(g[2]) * patch_size, int(g[1]) * patch_size) for g in grid]


def build_chat_messages(problem: str, num_images: int, *, system_prompt: str | None = None) -> list[dict]:
    """Chat messages in the Qwen2-VL layout: image parts first, then the text."""
    content: list[dict] = [{"type": "image"} for _ in range(num_images)]
    content.append({"type": "text", "text": problem})
    messages: list[dict] = []
    if system_prompt is not None:
        messages.append({"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": content})
    return messages


def render_prompt(processor, problem: str, num_images: int, *, system_prompt: str | None = None) -> str:
    """The chat-templated prompt text ending with the assistant generation prompt."""
    return processor.apply_chat_template(
        build_chat_messages(problem, num_images, system_prompt=system_prompt),
        tokenize=False,
        add_generation_prompt=True,
    )


@dataclass(kw_only=True)
class PreprocessedExample:
    """One record ready for the model (tensors without a batch dimension)."""

    source_id: str
    """The record's id."""
    task: str
    """The record's task."""
    prompt_text: str
    """Chat-templated prompt (image placeholders NOT expanded), e.g. for a rollout engine."""
    input_ids: torch.Tensor
    """``(T,)`` int64, image placeholders expanded to one ``<|image_pad|>`` per merged patch."""
    attention_mask: torch.Tensor
    """``(T,)`` int64, all ones."""
    mm_token_type_ids: torch.Tensor
    """``(T,)`` int64: 0 text, 1 image (required by transformers' Qwen2-VL forward)."""
    pixel_values: torch.Tensor
    """``(P, C * temporal_patch * patch * patch)`` float32 flattened patches of all images."""
    image_grid_thw: torch.Tensor
    """``(I, 3)`` int64 ``(t, h, w)`` patch grid per image."""
    ground_truth: GroundTruth
    """Ground truth in the model's box space ``box_space`` with ``image_size`` and ``resized_size``
    set: what the rewards and the evaluation read (classification: only the sizes added)."""
    image_size: tuple[int, int]
    """Original ``(W, H)`` of the first image."""
    resized_size: tuple[int, int]
    """``(W', H')`` of the first image as the model saw it."""
    images: list[Image.Image] = field(default_factory=list, repr=False)
    """The decoded RGB images (what a rollout engine with its own processor needs)."""


def preprocess_record(
    record: VisualRecord,
    processor,
    *,
    box_space: CoordSpace = "pixels_resized",
    out_of_bounds: OutOfBounds = "clip",
    on_error: OnError = "raise",
    skips: SkipCounts | None = None,
    system_prompt: str | None = None,
    keep_images: bool = True,
) -> PreprocessedExample:
    """Decode the images, tokenize the chat prompt, map the ground truth into ``box_space``.

    Boxes are checked in their own space (against the original size, 1000 or 1) before mapping:
    outside boxes are clipped and counted (``out_of_bounds="clip"``) or raise; degenerate
    detection boxes are dropped and counted under ``on_error="skip"``.

    Raises:
        DataError: naming the record and file, for a missing/corrupt image or bad boxes.
    """
    if box_space not in MODEL_COORD_SPACES:
        raise ValueError(f"box_space must be one of {MODEL_COORD_SPACES}, got {box_space!r}")
    skips = skips if skips is not None else SkipCounts()
    try:
        images = [load_image(src) for src in record.images]
    except DataError as exc:
        raise DataError(f"record {record.source_id}: {exc}", exc.reason) from exc
    image_size = (int(images[0].size[0]), int(images[0].size[1]))
    if record.image_size is not None and tuple(record.image_size) != image_size:
        raise DataError(
            f"record {record.source_id}: image_size {tuple(record.image_size)} does not match the "
            f"decoded image {image_size}"
        )
    prompt_text = render_prompt(processor, record.problem, len(images), system_prompt=system_prompt)
    try:
        enc = processor(text=[prompt_text], images=images, return_tensors="pt")
    except ValueError as exc:  # e.g. smart_resize: aspect ratio above 200
        raise DataError(
            f"record {record.source_id}: the image processor rejected "
            f"{image_source_name(record.images[0])} {image_size}: {exc}",
            CORRUPT_IMAGE,
        ) from exc
    grid = enc["image_grid_thw"]
    patch = processor.image_processor.patch_size
    resized_size = resized_size_from_grid(grid, patch)[0]

    gt = record.ground_truth
    if gt.boxes is not None or gt.box is not None:
        w, h = space_extent(gt.coord_space, image_size=image_size, resized_size=resized_size)
        gt = check_ground_truth_boxes(
            gt,
            width=w,
            height=h,
            out_of_bounds=out_of_bounds,
            on_error=on_error,
            name=record.source_id,
            skips=skips,
        )
    gt = gt.in_space(box_space, image_size=image_size, resized_size=resized_size)
    return PreprocessedExample(
        source_id=record.source_id,
        task=record.task,
        prompt_text=prompt_text,
        input_ids=enc["input_ids"][0],
        attention_mask=enc["attention_mask"][0],
        mm_token_type_ids=enc["mm_token_type_ids"][0],
        pixel_values=enc["pixel_values"],
        image_grid_thw=grid,
        ground_truth=gt,
        image_size=image_size,
        resized_size=resized_size,
        images=images if keep_images else [],
    )


def preprocess_records(
    records: Iterable[VisualRecord],
    processor,
    *,
    box_space: CoordSpace = "pixels_resized",
    out_of_bounds: OutOfBounds = "clip",
    on_error: OnError = "raise",
    system_prompt: str | None = None,
    keep_images: bool = True,
) -> tuple[list[PreprocessedExample], SkipCounts]:
    """:func:`preprocess_record` over ``records``; with ``on_error="skip"`` bad records are dropped
    and counted (by reason, logged with the record and file name). Returns ``(examples, skips)``.

    Raises:
        DataError: the first bad record (``on_error="raise"``), or no record survived.
    """
    check_on_error(on_error)
    skips = SkipCounts()
    out: list[PreprocessedExample] = []
    num_in = 0
    for record in records:
        num_in += 1
        try:
            out.append(
                preprocess_record(
                    record,
                    processor,
                    box_space=box_space,
                    out_of_bounds=out_of_bounds,
                    on_error=on_error,
                    skips=skips,
                    system_prompt=system_prompt,
                    keep_images=keep_images,
                )
            )
        except DataError as exc:
            raise_or_skip(on_error, skips, exc, record.source_id)
    if not out:
        raise DataError(f"no records left to preprocess ({num_in} in; skipped: {skips.summary()})")
    return out, skips


def ground_truth_in_model_space(
    record: VisualRecord, box_space: CoordSpace, *, resized_size: Sequence[int] | None = None
) -> GroundTruth:
    """``record``'s ground truth mapped into the model's ``box_space`` without preprocessing the
    image (e.g. to evaluate saved answers): what :func:`preprocess_record` puts on its example,
    minus the box checks. Needs ``record.image_size`` for ``"pixels_original"`` boxes and
    ``resized_size`` (:func:`compute_resized_size`) for ``"pixels_resized"``; both are stored on
    the result."""
    if box_space not in MODEL_COORD_SPACES:
        raise ValueError(f"box_space must be one of {MODEL_COORD_SPACES}, got {box_space!r}")
    return record.ground_truth.in_space(box_space, resized_size=resized_size)
