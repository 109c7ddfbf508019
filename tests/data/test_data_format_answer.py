"""SFT targets (``prompts.format_answer``) are answers the rewards score as perfect."""

from __future__ import annotations

import pytest

from megatron_vrft.data import build_qwen2vl_processor, build_tiny_tokenizer, load_records, preprocess_records
from megatron_vrft.data.prompts import format_answer
from megatron_vrft.rewards import compute_rewards

TERMS = {
    "classification": [("format", 1.0), ("accuracy", 1.0)],
    "grounding": [("format", 1.0), ("grounding_giou", 1.0)],
    "detection": [("format", 1.0), ("iou", 1.0), ("confidence", 1.0)],
}


@pytest.mark.parametrize("task", ["classification", "grounding", "detection"])
def test_format_answer_scores_full_marks(task):
    tok = build_tiny_tokenizer()
    proc = build_qwen2vl_processor(tok, min_pixels=56 * 56, max_pixels=224 * 224)
    examples, _ = preprocess_records(
        load_records("synthetic", task, num_synthetic=6, box_space="norm_1000"), proc, box_space="norm_1000"
    )
    texts = [format_answer(e.ground_truth, task) for e in examples]
    scores = compute_rewards(texts, [e.ground_truth for e in examples], TERMS[task])
    assert float(scores.scores["format"].min()) == 1.0
    for name, _ in TERMS[task][1:]:
        # integer rounding of the coordinates costs a little IoU, never a match
        assert float(scores.scores[name].min()) > 0.95, (name, scores.scores[name], texts[0])
