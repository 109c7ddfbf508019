"""The tiny offline Qwen2-VL tokenizer fixture and its chat template."""

from __future__ import annotations

import os

from data_test_helpers import TOKENIZER_DIR, tiny_tokenizer

from megatron_vrft.data import (
    QWEN2VL_SPECIAL_TOKENS,
    build_chat_messages,
    build_tiny_tokenizer,
)


def test_fixture_is_small_and_has_a_few_thousand_tokens():
    size = sum(os.path.getsize(TOKENIZER_DIR / f) for f in os.listdir(TOKENIZER_DIR))
    assert size < 1_000_000
    tok = tiny_tokenizer()
    assert 1000 <= len(tok) <= 10000


def test_special_tokens_are_single_ids_and_distinct():
    tok = tiny_tokenizer()
    ids = []
    for t in QWEN2VL_SPECIAL_TOKENS:
        enc = tok(t, add_special_tokens=False)["input_ids"]
        assert len(enc) == 1, (t, enc)
        assert tok.convert_ids_to_tokens(enc[0]) == t
        ids.append(enc[0])
    assert len(set(ids)) == len(ids)
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|endoftext|>"


def test_think_answer_text_round_trips_and_specials_are_not_split():
    tok = tiny_tokenizer()
    text = (
        "<|im_start|>assistant\n<think> the red circle is left; 12.5% </think> "
        "<answer>[{'Position': [12, 345, 678, 999], 'Confidence': 0.87}]</answer><|im_end|>"
        " unicode: héllo 日本 😀"
    )
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    toks = tok.convert_ids_to_tokens(ids)
    assert toks[0] == "<|im_start|>" and "<|im_end|>" in toks
    # Digits are split one by one, as in Qwen2's pre-tokenizer.
    assert all(len(t) == 1 for t in toks if t.isdigit())
    image = tok("<|vision_start|><|image_pad|><|image_pad|><|vision_end|>", add_special_tokens=False)
    assert len(image["input_ids"]) == 4


def test_chat_template_renders_qwen2vl_layout():
    tok = tiny_tokenizer()
    text = tok.apply_chat_template(build_chat_messages("Which shape?", 2), tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
        "<|vision_start|><|image_pad|><|vision_end|>Which shape?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    with_system = tok.apply_chat_template(
        build_chat_messages("Hi", 1, system_prompt="Be brief."),
        tokenize=False,
        add_generation_prompt=False,
    )
    assert with_system.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert not with_system.endswith("assistant\n")


def test_build_is_deterministic_and_matches_the_fixture(tmp_path):
    a = build_tiny_tokenizer(tmp_path / "a")
    b = build_tiny_tokenizer(None)
    assert a.get_vocab() == b.get_vocab()
    fixture = tiny_tokenizer()
    sample = "Detect all objects belonging to the category 'star' <answer>No Objects</answer>"
    assert a(sample)["input_ids"] == fixture(sample)["input_ids"]
    assert (tmp_path / "a" / "tokenizer.json").is_file()
