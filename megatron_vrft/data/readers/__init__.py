"""Dataset readers: each returns a :class:`~megatron_vrft.data.records.RecordSet`."""

from types import MappingProxyType

from .coco import load_coco, read_coco_detection, resolve_category_ids
from .image_folder import IMAGE_EXTENSIONS, read_image_folder
from .lisa import LISA_KEYS, read_lisa_grounding
from .visual_rft import infer_task, parse_visual_rft_solution, read_visual_rft

# Reader by source kind (read-only), for configs that name their source: ``READERS[kind](**args)``.
READERS = MappingProxyType(
    {
        "visual_rft": read_visual_rft,
        "coco": read_coco_detection,
        "lvis": read_coco_detection,
        "image_folder": read_image_folder,
        "lisa": read_lisa_grounding,
    }
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "LISA_KEYS",
    "READERS",
    "infer_task",
    "load_coco",
    "parse_visual_rft_solution",
    "read_coco_detection",
    "read_image_folder",
    "read_lisa_grounding",
    "read_visual_rft",
    "resolve_category_ids",
]
