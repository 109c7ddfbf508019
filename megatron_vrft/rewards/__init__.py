"""Verifiable rewards for Visual-RFT: format, classification, detection IoU/confidence, grounding.

Importing the package registers every reward:

==========================  =======================================================  ===========
name                        what                                                     range
==========================  =======================================================  ===========
``format``                  ``<think>..</think>\\s*<answer>..</answer>`` fullmatch   [0, 1]
``accuracy``                classification label (``mode="visual_rft_compat"``       [0, 1]
                            reproduces the published, hackable rule)
``iou``                     detection: matched IoU sum / max(#gt, #pred)             [0, 1]
``confidence``              detection: c if matched else 1 - c, averaged             [0, 1]
``grounding_iou``           one box: IoU                                             [0, 1]
``grounding_giou``          one box: GIoU (failure -1)                               [-1, 1]
``grounding_giou_shifted``  one box: GIoU + 1                                        [0, 2]
==========================  =======================================================  ===========

Every reward: ``fn(completions, ground_truths, **options) -> RewardOutput``; bad completions never
raise, they score the reward's failure score and count one ``FailureReason``.
``compute_rewards(completions, ground_truths, [(name, weight), ...])`` combines them.
"""

from megatron_vrft.rewards.coords import (  # noqa: I001 - registry before the reward modules
    COORD_SPACES,
    MODEL_COORD_SPACES,
    CoordSpace,
    ModelCoordSpace,
    space_extent,
)
from megatron_vrft.rewards.types import (
    FailureReason,
    GroundTruth,
    ParseFailures,
    RewardOutput,
    as_ground_truth,
    as_ground_truths,
)
from megatron_vrft.rewards.registry import (
    RewardBatch,
    RewardSpec,
    available_rewards,
    compute_rewards,
    get_reward,
    register_reward,
)
from megatron_vrft.rewards.coords import (
    convert_boxes,
    norm1000_to_original,
    norm1000_to_resized,
    original_to_norm1000,
    original_to_resized,
    resized_to_norm1000,
    resized_to_original,
)
from megatron_vrft.rewards.parsing import (
    MAX_ABS_COORD,
    MAX_ANSWER_CHARS,
    MAX_BOXES,
    MAX_COMPLETION_CHARS,
    MAX_DEPTH,
    ParsedBox,
    extract_answer,
    parse_boxes,
    parse_single_box,
)
from megatron_vrft.rewards.format import PUBLISHED_FORMAT_PATTERN, format_matches, format_reward
from megatron_vrft.rewards.classification import (
    classification_accuracy_reward,
    label_matches,
    normalize_label,
)
from megatron_vrft.rewards.detection import (
    DetectionScores,
    compute_detection_scores,
    deduplicate_predictions,
    detection_confidence_reward,
    detection_iou_reward,
    match_greedy,
    match_hungarian,
)
from megatron_vrft.rewards.grounding import (
    GroundingScores,
    compute_grounding_scores,
    grounding_giou_reward,
    grounding_giou_shifted_reward,
    grounding_iou_reward,
)

__all__ = [
    "COORD_SPACES",
    "MODEL_COORD_SPACES",
    "CoordSpace",
    "ModelCoordSpace",
    "space_extent",
    "DetectionScores",
    "FailureReason",
    "GroundingScores",
    "GroundTruth",
    "MAX_ABS_COORD",
    "MAX_ANSWER_CHARS",
    "MAX_BOXES",
    "MAX_COMPLETION_CHARS",
    "MAX_DEPTH",
    "PUBLISHED_FORMAT_PATTERN",
    "ParseFailures",
    "ParsedBox",
    "RewardBatch",
    "RewardOutput",
    "RewardSpec",
    "as_ground_truth",
    "as_ground_truths",
    "available_rewards",
    "classification_accuracy_reward",
    "compute_detection_scores",
    "compute_grounding_scores",
    "compute_rewards",
    "convert_boxes",
    "deduplicate_predictions",
    "detection_confidence_reward",
    "detection_iou_reward",
    "extract_answer",
    "format_matches",
    "format_reward",
    "get_reward",
    "grounding_giou_reward",
    "grounding_giou_shifted_reward",
    "grounding_iou_reward",
    "label_matches",
    "match_greedy",
    "match_hungarian",
    "norm1000_to_original",
    "norm1000_to_resized",
    "normalize_label",
    "original_to_norm1000",
    "original_to_resized",
    "parse_boxes",
    "parse_single_box",
    "register_reward",
    "resized_to_norm1000",
    "resized_to_original",
]
