"""A tiny offline Qwen2-VL-style tokenizer for tests and the CPU demo.

No model hub is reachable here, so tests and the demo train their own byte-level BPE with the
`tokenizers` library: Qwen2's pre-tokenizer split (digits one by one, so coordinates tokenize the
same way they do for the real model), Qwen2-VL's special tokens and a chat template that renders
the same text as Qwen2-VL's (system turn, ``<|vision_start|><|image_pad|><|vision_end|>`` per
image, ``<|im_start|>assistant`` generation prompt). Byte-level means every string tokenizes;
the corpus only decides which merges exist. Training is deterministic and takes ~1 s.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

# Qwen2-VL's added special tokens, in the order the real vocabulary lists them.
QWEN2VL_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# The format reward's tags, added to the tiny tokenizer as single (non-special) tokens.
THINK_ANSWER_TAGS: tuple[str, ...] = ("<think>", "</think>", "<answer>", "</answer>")

# Qwen2's pre-tokenizer regex (public tokenizer configuration): contractions, letter runs,
# single digits, punctuation runs, newlines, spaces.
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Renders the Qwen2-VL chat format. Content is either a string or a list of
# {"type": "image"} / {"type": "video"} / {"type": "text", "text": ...} parts.
QWEN2VL_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] }}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part -%}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'video' or 'video' in part -%}"
    "{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif 'text' in part -%}"
    "{{ part['text'] }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{%- endif -%}"
)

_WORDS = """
the a an of in on at to for with and or is are be this that it its there here which what
image picture photo object objects category categories class species name answer think final
detect detection find locate provide bounding box boxes confidence position number integer
output thinking process format follow strictly please should as follows between and with two
decimal places if no return all belonging given left right above below top bottom middle center
red green blue yellow orange purple pink cyan magenta white black gray brown
circle square triangle star diamond hexagon cross ring rectangle ellipse
person bicycle car motorcycle airplane bus train truck boat traffic light fire hydrant stop sign
parking meter bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella
handbag tie suitcase frisbee skis snowboard sports ball kite baseball bat glove skateboard
surfboard tennis racket bottle wine glass cup fork knife spoon bowl banana apple sandwich
broccoli carrot hot pizza donut cake chair couch potted plant bed dining table toilet tv laptop
mouse remote keyboard cell phone microwave oven toaster sink refrigerator book clock vase
scissors teddy hair drier toothbrush astronaut coffee chelsea rocket china flower grass
aircraft flowers pets cars birds fine grained closest most prominent describe region referring
expression query reasoning user assistant system helpful you are model coordinates pixels width
height resized normalized from to one each only single
time year people way day man woman child world life hand part place case week company system
program question work government point home water room mother area money story fact month lot
study book eye job word business issue side kind head house service friend father power hour
game line end member law city community idea body information back parent face others level
office door health art war history party result change morning reason research girl guy moment
air teacher force education foot boy age policy everything process music market sense nation
plan college interest death experience effect use class control care field development role
effort rate heart drug show leader light voice wife police mind price report decision son view
relationship town road arm difference value building action model season society tax director
early position player record paper space ground form event official matter center couple site
project activity table need court oil situation cost industry figure street minute tree
small large little big long short high low old new young good bad great same different
first last next other many few more less much very really just also still even never always
see look watch show appear seem know believe understand remember consider choose decide
shape shapes colour colours color colors background foreground photograph scene contains
"""


def build_tiny_tokenizer_corpus() -> list[str]:
    """Deterministic training text: prompt templates, answers, numbers and a small word list."""
    words = _WORDS.split()
    rng = random.Random(0)
    lines: list[str] = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(400)]
    for i in range(0, len(words), 7):
        chunk = words[i : i + 7]
        lines.append(" ".join(chunk))
        lines.append(" ".join(w.capitalize() for w in chunk))
    for n in range(0, 1001, 7):
        lines.append(
            f"<think> The object is near {n} and {1000 - n}. </think> "
            f"<answer>[{{'Position': [{n}, {n // 2}, {1000 - n}, {n // 3 + 5}], "
            f"'Confidence': 0.{n % 100:02d}}}]</answer>"
        )
    lines += [
        "Output the thinking process in <think> </think> and final answer in <answer> </answer> tags.",
        "The output answer format should be as follows:",
        "<think> ... </think> <answer>[{'Position': [x1, y1, x2, y2], 'Confidence': number}, ...]</answer>",
        "Please strictly follow the format.",
        "This is an image containing an object. Please tell me what it is.",
        "If no object belonging to the category in the image, return 'No Objects'.",
        "<answer>No Objects</answer>",
        "You are a helpful assistant.",
    ] * 5
    return lines


def build_tiny_tokenizer(
    out_dir: str | os.PathLike | None = None,
    *,
    vocab_size: int = 3000,
    model_max_length: int = 32768,
):
    """Train the tiny byte-level BPE and return it as a transformers tokenizer.

    Args:
        out_dir: where to ``save_pretrained`` it (tokenizer.json, tokenizer_config.json, chat
            template); not saved when None.
        vocab_size: BPE vocabulary target including the 256 byte symbols and the special tokens;
            the corpus may stop it short.
        model_max_length: recorded in the tokenizer config.

    Returns:
        A transformers fast tokenizer with Qwen2's ``eos_token = pad_token = "<|endoftext|>"``,
        left padding, every token of :data:`QWEN2VL_SPECIAL_TOKENS` as a special token (the
        Qwen2-VL processor finds ``<|image_pad|>`` by name) and the Qwen2-VL chat template.
    """
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(QWEN2VL_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(build_tiny_tokenizer_corpus(), trainer=trainer)

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=model_max_length,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        additional_special_tokens=list(QWEN2VL_SPECIAL_TOKENS[1:]),
    )
    # One token per think/answer tag: a tiny model trained from scratch confuses the positions after
    # ``<answer`` and ``</answer`` when the tags share sub-word tokens (measured: format collapse).
    hf_tok.add_tokens(list(THINK_ANSWER_TAGS))
    hf_tok.chat_template = QWEN2VL_CHAT_TEMPLATE
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        hf_tok.save_pretrained(str(out_dir))
    return hf_tok


def load_tokenizer(path: str | os.PathLike):
    """Load a saved tokenizer (the tiny one or a real Qwen2-VL one) with ``AutoTokenizer``."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")
"""Tokens that end a response: the chat turn's end, and the document end."""


def stop_token_ids(tokenizer) -> tuple[int, ...]:
    """Ids of :data:`STOP_TOKENS` the tokenizer has (the first one ends SFT targets)."""
    ids = tokenizer.convert_tokens_to_ids(list(STOP_TOKENS))
    unk = getattr(tokenizer, "unk_token_id", None)
    return tuple(i for i in ids if i is not None and i != unk)
