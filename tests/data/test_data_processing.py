"""Qwen2-VL preprocessing: processor wiring, box mapping into the model space, collation, and a
forward pass of a tiny transformers Qwen2-VL on the outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from data_test_helpers import (
    random_image,
    tiny_processor,
    tiny_qwen2vl_model,
    tiny_tokenizer,
)

from megatron_vrft.data import (
    DataError,
    GroundTruth,
    VisualRecord,
    build_detection_prompt,
    collate_examples,
    compute_resized_size,
    convert_boxes,
    preprocess_record,
    preprocess_records,
)

PATCH = 14


def _random_boxes(rng, w, h, k):
    x1 = rng.uniform(0, w * 0.8, k)
    y1 = rng.uniform(0, h * 0.8, k)
    x2 = x1 + rng.uniform(1, w - x1)
    y2 = y1 + rng.uniform(1, h - y1)
    return np.stack([x1, y1, x2, y2], axis=1)


def _det_record(img, boxes, sid="rec"):
    return VisualRecord(
        source_id=sid,
        task="detection",
        images=[img],
        problem=build_detection_prompt(["thing"], box_space="pixels_resized"),
        ground_truth=GroundTruth(coord_space="pixels_original", boxes=boxes, categories=("thing",) * len(boxes)),
        image_size=img.size,
    )


@pytest.mark.parametrize("size", [(37, 91), (160, 120), (333, 201), (640, 427), (501, 77)])
def test_box_mapping_matches_processor_resize_and_round_trips(size):
    w, h = size
    rng = np.random.default_rng(w * 1000 + h)
    proc = tiny_processor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64)
    img = random_image(w, h, seed=w + h)
    boxes = _random_boxes(rng, w, h, 5)
    ex = preprocess_record(_det_record(img, boxes), proc, box_space="pixels_resized")

    # Independent: the processor's reported grid gives the resized size.
    grid = ex.image_grid_thw[0].tolist()
    rw, rh = grid[2] * PATCH, grid[1] * PATCH
    assert ex.resized_size == (rw, rh)
    assert compute_resized_size(w, h, proc.image_processor) == (rw, rh)
    assert ex.pixel_values.shape[0] == grid[0] * grid[1] * grid[2]
    expected = boxes * np.array([rw / w, rh / h, rw / w, rh / h], dtype=np.float64)
    np.testing.assert_allclose(ex.ground_truth.boxes, expected, rtol=0, atol=1e-9)
    assert ex.ground_truth.coord_space == "pixels_resized"

    back = convert_boxes(
        ex.ground_truth.boxes,
        "pixels_resized",
        "pixels_original",
        image_size=(w, h),
        resized_size=(rw, rh),
    )
    assert np.abs(back - boxes).max() < 1.0
    # Model answers are integers in the resized space: rounding costs at most half a resized
    # pixel, i.e. < 1 original pixel whenever the image was not shrunk by more than 2x.
    if rw / w >= 0.5 and rh / h >= 0.5:
        back_int = convert_boxes(
            np.round(ex.ground_truth.boxes),
            "pixels_resized",
            "pixels_original",
            image_size=(w, h),
            resized_size=(rw, rh),
        )
        assert np.abs(back_int - boxes).max() <= 1.0

    ex1000 = preprocess_record(_det_record(img, boxes), proc, box_space="norm_1000")
    np.testing.assert_allclose(ex1000.ground_truth.boxes, boxes * np.array([1000 / w, 1000 / h] * 2), rtol=0, atol=1e-9)


def test_tokens_and_mm_types_line_up_with_the_image_grid():
    proc = tiny_processor()
    tok = tiny_tokenizer()
    img = random_image(150, 100, seed=3)
    ex = preprocess_record(_det_record(img, np.array([[10.0, 10.0, 50.0, 60.0]])), proc)
    pad_id = tok.convert_tokens_to_ids("<|image_pad|>")
    n_image_tokens = int(ex.image_grid_thw.prod()) // 4  # merge_size ** 2
    assert int((ex.input_ids == pad_id).sum()) == n_image_tokens
    assert torch.equal(ex.mm_token_type_ids == 1, ex.input_ids == pad_id)
    assert torch.all(ex.attention_mask == 1)
    text = tok.decode(ex.input_ids)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert "Detect all objects belonging to the category 'thing'" in text
    assert ex.prompt_text.count("<|image_pad|>") == 1  # un-expanded placeholder for engines


def test_processor_output_runs_tiny_qwen2vl_and_left_padding_is_exact():
    tok = tiny_tokenizer()
    proc = tiny_processor(max_pixels=28 * 28 * 16)
    rng = np.random.default_rng(0)
    examples = []
    for i, (w, h) in enumerate([(120, 90), (60, 140), (200, 60)]):
        rec = _det_record(random_image(w, h, seed=i), _random_boxes(rng, w, h, 2), sid=f"r{i}")
        if i == 1:  # a longer prompt -> different lengths in the batch
            rec.problem = rec.problem + " Think about every corner of the image carefully."
        examples.append(preprocess_record(rec, proc))
    batch = collate_examples(examples, pad_token_id=tok.pad_token_id, padding_side="left")
    assert len(set(batch.prompt_lengths.tolist())) > 1
    model = tiny_qwen2vl_model(tok)
    with torch.no_grad():
        out = model(**batch.model_inputs())
    assert out.logits.shape[:2] == batch.input_ids.shape
    assert torch.isfinite(out.logits).all()
    # Each row's last-token logits equal an unpadded single-example forward.
    for i, ex in enumerate(examples):
        with torch.no_grad():
            single = model(
                input_ids=ex.input_ids[None],
                attention_mask=ex.attention_mask[None],
                mm_token_type_ids=ex.mm_token_type_ids[None],
                pixel_values=ex.pixel_values,
                image_grid_thw=ex.image_grid_thw,
            )
        torch.testing.assert_close(out.logits[i, -1], single.logits[0, -1], atol=1e-4, rtol=1e-4)
    # The model refuses images without mm_token_type_ids (transformers >= 5.x): we always send it.
    with pytest.raises(ValueError, match="mm_token_type_ids"):
        model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            pixel_values=batch.pixel_values,
            image_grid_thw=batch.image_grid_thw,
        )


def test_collate_right_padding_and_concatenation():
    proc = tiny_processor(max_pixels=28 * 28 * 16)
    exs = [
        preprocess_record(_det_record(random_image(w, h, seed=w), np.array([[1.0, 1.0, 5.0, 5.0]])), proc)
        for w, h in [(56, 56), (112, 84)]
    ]
    exs[1].input_ids = exs[1].input_ids[:-3]  # make lengths differ
    exs[1].attention_mask = exs[1].attention_mask[:-3]
    exs[1].mm_token_type_ids = exs[1].mm_token_type_ids[:-3]
    b = collate_examples(exs, pad_token_id=-7, padding_side="right")
    n0, n1 = exs[0].input_ids.numel(), exs[1].input_ids.numel()
    assert torch.equal(b.input_ids[1, :n1], exs[1].input_ids)
    assert torch.all(b.input_ids[1, n1:] == -7) and torch.all(b.attention_mask[1, n1:] == 0)
    assert torch.equal(b.pixel_values, torch.cat([exs[0].pixel_values, exs[1].pixel_values]))
    assert torch.equal(b.image_grid_thw, torch.cat([exs[0].image_grid_thw, exs[1].image_grid_thw]))
    assert b.num_images.tolist() == [1, 1] and b.prompt_lengths.tolist() == [n0, n1]
    with pytest.raises(ValueError):
        collate_examples([], pad_token_id=0)


def test_out_of_bounds_boxes_clip_with_count_or_raise():
    proc = tiny_processor(max_pixels=28 * 28 * 16)
    img = random_image(100, 80, seed=5)
    boxes = np.array([[-5.0, 10.0, 50.0, 90.0], [10.0, 10.0, 20.0, 20.0]])
    exs, skips = preprocess_records([_det_record(img, boxes, sid="oob")], proc, out_of_bounds="clip")
    assert skips.counts["box_clipped"] == 1 and skips.examples["box_clipped"] == ["oob"]
    rw, rh = exs[0].resized_size
    np.testing.assert_allclose(
        exs[0].ground_truth.boxes[0], [0.0, 10 * rh / 80, 50 * rw / 100, 80 * rh / 80], atol=1e-9
    )
    with pytest.raises(DataError, match="oob.*outside the image"):
        preprocess_records([_det_record(img, boxes, sid="oob")], proc, out_of_bounds="error")


def test_one_ground_truth_type_from_data_to_rewards():
    """Preprocessing maps the record's GroundTruth into the model's space as the same type, with
    both sizes; the rewards take it as it is (no dict bridge)."""
    from megatron_vrft import rewards
    from megatron_vrft.data import ground_truth_in_model_space
    from megatron_vrft.rewards.types import as_ground_truth

    assert GroundTruth is rewards.GroundTruth
    proc = tiny_processor(max_pixels=28 * 28 * 16)
    img = random_image(90, 70, seed=9)
    rec = _det_record(img, np.array([[5.0, 6.0, 40.0, 50.0]]))
    assert rec.ground_truth.image_size == (90, 70) and rec.ground_truth.name == rec.source_id
    ex = preprocess_record(rec, proc)
    gt = ex.ground_truth
    assert type(gt) is GroundTruth and gt.coord_space == "pixels_resized"
    assert gt.image_size == (90, 70) and gt.resized_size == ex.resized_size and gt.categories == ("thing",)
    assert gt.boxes.dtype == np.float64 and as_ground_truth(gt) is gt
    # without preprocessing the image: the same mapping
    mapped = ground_truth_in_model_space(rec, "pixels_resized", resized_size=ex.resized_size)
    assert mapped == gt
    with pytest.raises(ValueError, match="box_space must be one of"):
        ground_truth_in_model_space(rec, "norm_1")
    with pytest.raises(ValueError, match="resized_size"):
        ground_truth_in_model_space(rec, "pixels_resized")
    assert rewards.compute_rewards(["<answer>[]</answer>"], [gt], [("iou", 1.0)]).total.item() == 0.0

    grd = VisualRecord(
        source_id="g",
        task="grounding",
        images=[img],
        problem="p",
        ground_truth=GroundTruth(coord_space="norm_1", box=[0.1, 0.2, 0.5, 0.6]),
        image_size=(90, 70),
    )
    g = ground_truth_in_model_space(grd, "norm_1000")
    assert g.coord_space == "norm_1000" and g.boxes is None and g.categories is None
    np.testing.assert_allclose(g.box, [100, 200, 500, 600])
    cls = VisualRecord(
        source_id="c",
        task="classification",
        images=[img],
        problem="p",
        ground_truth=GroundTruth(label="cat", synonyms=("kitty",)),
    )
    c = ground_truth_in_model_space(cls, "norm_1000")
    assert c.label == "cat" and c.synonyms == ("kitty",) and c.coord_space is None
    with pytest.raises(ValueError, match=r"c: image_size \(90, 70\) but the ground truth's is \(9, 7\)"):
        VisualRecord(
            source_id="c",
            task="classification",
            images=[img],
            problem="p",
            ground_truth=GroundTruth(label="cat", image_size=(9, 7)),
            image_size=(90, 70),
        )


def test_one_coordinate_module_serves_data_rewards_and_eval():
    from megatron_vrft import data, rewards
    from megatron_vrft.data import boxes
    from megatron_vrft.eval import evaluate
    from megatron_vrft.rewards import coords, types

    assert data.convert_boxes is boxes.convert_boxes is rewards.convert_boxes is coords.convert_boxes
    assert evaluate.convert_boxes is coords.convert_boxes and evaluate.space_extent is coords.space_extent
    assert data.MODEL_COORD_SPACES is types.MODEL_COORD_SPACES is coords.MODEL_COORD_SPACES
    assert set(coords.MODEL_COORD_SPACES) < set(coords.COORD_SPACES)


def test_multi_image_record():
    proc = tiny_processor(max_pixels=28 * 28 * 16)
    imgs = [random_image(60, 40, seed=1), random_image(100, 120, seed=2)]
    rec = VisualRecord(
        source_id="two",
        task="grounding",
        images=imgs,
        problem="Which image shows more red?",
        ground_truth=GroundTruth(coord_space="pixels_original", box=[1.0, 2.0, 30.0, 20.0]),
    )
    ex = preprocess_record(rec, proc, box_space="norm_1000")
    assert ex.image_grid_thw.shape == (2, 3)
    assert ex.pixel_values.shape[0] == int(ex.image_grid_thw.prod(dim=1).sum())
    assert ex.prompt_text.count("<|vision_start|><|image_pad|><|vision_end|>") == 2
    assert int(ex.mm_token_type_ids.sum()) == int(ex.image_grid_thw.prod(dim=1).sum()) // 4
    np.testing.assert_allclose(ex.ground_truth.box, [1000 / 60, 2000 / 40, 30000 / 60, 20000 / 40])
    assert ex.image_size == (60, 40)
