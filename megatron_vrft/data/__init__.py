"""Data layer: records, readers, prompts, Qwen2-VL preprocessing, collation, synthetic tasks.

Flow: a reader (or a synthetic builder) -> :class:`RecordSet` of :class:`VisualRecord` ->
:func:`preprocess_record` with a :func:`build_qwen2vl_processor` processor ->
:class:`PreprocessedExample` -> :func:`collate_examples` -> :class:`VisionLanguageBatch`.
Ground truth is :class:`GroundTruth` (from :mod:`megatron_vrft.rewards.types`, re-exported): readers
build it in the annotation's space, preprocessing maps it into the model's box space, and the
rewards and the evaluation read the example's ``ground_truth`` as it is
(:func:`ground_truth_in_model_space` maps a record's without preprocessing).
"""

from .boxes import (
    COORD_SPACES,
    MODEL_COORD_SPACES,
    CoordSpace,
    clip_boxes,
    convert_boxes,
    space_extent,
    xywh_to_xyxy,
)
from .collate import VisionLanguageBatch, collate_examples
from .dataset import SOURCES, load_records
from .errors import DataError, OnError, OutOfBounds, SkipCounts
from .processing import (
    PreprocessedExample,
    build_chat_messages,
    build_image_processor,
    build_qwen2vl_processor,
    compute_resized_size,
    ground_truth_in_model_space,
    preprocess_record,
    preprocess_records,
    render_prompt,
    resized_size_from_grid,
)
from .prompts import (
    NO_OBJECTS,
    THINK_ANSWER_INSTRUCTION,
    build_classification_prompt,
    build_detection_prompt,
    build_grounding_prompt,
)
from .readers import (
    READERS,
    read_coco_detection,
    read_image_folder,
    read_lisa_grounding,
    read_visual_rft,
)
from .records import (
    TASKS,
    EncodedImage,
    GroundTruth,
    ImageSource,
    RecordSet,
    TaskType,
    VisualRecord,
    load_image,
    read_image_size,
)
from .sampler import PromptBatcher, build_epoch_order, dp_shard
from .sampling import sample_k_shot
from .synthetic import (
    build_synthetic_classification,
    build_synthetic_detection,
    build_synthetic_grounding,
)
from .tokenizer import (
    QWEN2VL_CHAT_TEMPLATE,
    QWEN2VL_SPECIAL_TOKENS,
    build_tiny_tokenizer,
    load_tokenizer,
    stop_token_ids,
)

__all__ = [
    "SOURCES",
    "load_records",
    "COORD_SPACES",
    "MODEL_COORD_SPACES",
    "NO_OBJECTS",
    "QWEN2VL_CHAT_TEMPLATE",
    "QWEN2VL_SPECIAL_TOKENS",
    "TASKS",
    "THINK_ANSWER_INSTRUCTION",
    "CoordSpace",
    "DataError",
    "EncodedImage",
    "GroundTruth",
    "ImageSource",
    "OnError",
    "OutOfBounds",
    "PreprocessedExample",
    "PromptBatcher",
    "READERS",
    "Qwen2VLImageTextProcessor",
    "RecordSet",
    "SkipCounts",
    "TaskType",
    "VisionLanguageBatch",
    "VisualRecord",
    "build_chat_messages",
    "build_classification_prompt",
    "build_detection_prompt",
    "build_epoch_order",
    "dp_shard",
    "build_grounding_prompt",
    "build_image_processor",
    "build_qwen2vl_processor",
    "build_synthetic_classification",
    "build_synthetic_detection",
    "build_synthetic_grounding",
    "build_tiny_tokenizer",
    "clip_boxes",
    "collate_examples",
    "compute_resized_size",
    "convert_boxes",
    "ground_truth_in_model_space",
    "load_image",
    "load_tokenizer",
    "stop_token_ids",
    "preprocess_record",
    "preprocess_records",
    "read_coco_detection",
    "read_image_folder",
    "read_image_size",
    "read_lisa_grounding",
    "read_visual_rft",
    "render_prompt",
    "resized_size_from_grid",
    "sample_k_shot",
    "space_extent",
    "xywh_to_xyxy",
]


def __getattr__(name: str):
    # The processor class imports transformers' processor stack (~3 s): load it on first use.
    if name == "Qwen2VLImageTextProcessor":
        from .qwen2vl_processor import Qwen2VLImageTextProcessor

        return Qwen2VLImageTextProcessor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
