"""Dataset builders behind ``tools/prepare_data.py``: few-shot subsets and format conversions whose
outputs the readers in :mod:`megatron_vrft.data.readers` load. Each returns a
:class:`BuildSummary`, is deterministic for a seed and writes atomically."""

from .coco import COCO_OV_BASE_48, COCO_OV_NOVEL_17, build_coco_fewshot, build_ov_split
from .common import BuildSummary
from .image_folder import FLOWERS102_CLASSES, build_aircraft, build_cars, build_flowers102, build_pets
from .lisa import build_lisa
from .visual_rft import build_visual_rft

__all__ = [
    "COCO_OV_BASE_48",
    "COCO_OV_NOVEL_17",
    "FLOWERS102_CLASSES",
    "BuildSummary",
    "build_aircraft",
    "build_cars",
    "build_coco_fewshot",
    "build_flowers102",
    "build_lisa",
    "build_ov_split",
    "build_pets",
    "build_visual_rft",
]
