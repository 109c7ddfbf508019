"""``Qwen2VLProcessor`` without a video processor (so without torchvision).

``Qwen2VLProcessor(...)`` builds a video processor whose registry imports torchvision; RL on images
never needs one. ``ProcessorMixin`` derives a processor's attributes from its ``__init__``
signature, so leaving ``video_processor`` out of it makes it simply not an attribute. Kept in its
own module so importing :mod:`megatron_vrft.data` does not import the transformers processor
stack (~3 s); :func:`megatron_vrft.data.build_qwen2vl_processor` imports it on first use.
"""

from __future__ import annotations

from transformers import Qwen2VLProcessor


class Qwen2VLImageTextProcessor(Qwen2VLProcessor):
    """Qwen2-VL processor for images and text only; calling it with ``videos=`` is unsupported."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)
