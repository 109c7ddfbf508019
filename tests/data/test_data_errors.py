"""Bad input: missing / corrupt images, bad boxes, empty data. Errors name the file; skip mode
counts by reason."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from data_test_helpers import tiny_processor, truncate_file, write_image

from megatron_vrft.data import (
    DataError,
    EncodedImage,
    GroundTruth,
    VisualRecord,
    load_image,
    preprocess_records,
    read_coco_detection,
    read_image_folder,
    read_lisa_grounding,
)


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_truncated_and_missing_images_name_the_file(tmp_path, suffix):
    path = write_image(tmp_path / f"img{suffix}", 64, 48, seed=1)
    assert load_image(path).size == (64, 48)
    truncate_file(path)
    with pytest.raises(DataError, match=f"cannot decode image .*img{suffix}") as exc:
        load_image(path)
    assert exc.value.reason == "corrupt_image"
    with pytest.raises(DataError, match="image file not found: .*nope.png") as exc:
        load_image(tmp_path / "nope.png")
    assert exc.value.reason == "missing_image"
    with pytest.raises(DataError, match="row 7 image"):
        load_image(EncodedImage(data=b"not an image at all", name="row 7 image"))


def _records(tmp_path):
    good = write_image(tmp_path / "good.png", 60, 40, seed=0)
    bad = truncate_file(write_image(tmp_path / "bad.jpg", 60, 40, seed=1))
    gt = GroundTruth(label="x")
    return [
        VisualRecord(source_id="r-good", task="classification", images=[good], problem="p", ground_truth=gt),
        VisualRecord(source_id="r-bad", task="classification", images=[bad], problem="p", ground_truth=gt),
        VisualRecord(
            source_id="r-missing",
            task="classification",
            images=[tmp_path / "gone.png"],
            problem="p",
            ground_truth=gt,
        ),
    ]


def test_preprocess_raise_names_record_and_file_skip_counts_and_logs(tmp_path, caplog):
    proc = tiny_processor(max_pixels=28 * 28 * 8)
    recs = _records(tmp_path)
    with pytest.raises(DataError, match="record r-bad: cannot decode image .*bad.jpg"):
        preprocess_records(recs, proc)
    with caplog.at_level(logging.WARNING, logger="megatron_vrft.data"):
        out, skips = preprocess_records(recs, proc, on_error="skip")
    assert [e.source_id for e in out] == ["r-good"]
    assert skips.counts == {"corrupt_image": 1, "missing_image": 1}
    assert skips.examples == {"corrupt_image": ["r-bad"], "missing_image": ["r-missing"]}
    assert "gone.png" in caplog.text and "bad.jpg" in caplog.text
    assert "corrupt_image=1 (r-bad)" in skips.summary()
    with pytest.raises(DataError, match="no records left.*corrupt_image=1"):
        preprocess_records(recs[1:], proc, on_error="skip")


def test_readers_skip_counts_and_empty_dataset(tmp_path):
    write_image(tmp_path / "cls_a" / "0.png", 20, 20, 0)
    truncate_file(write_image(tmp_path / "cls_a" / "1.png", 20, 20, 1))
    truncate_file(write_image(tmp_path / "cls_b" / "0.jpg", 20, 20, 2))
    with pytest.raises(DataError, match="1.png"):
        read_image_folder(tmp_path)
    rs = read_image_folder(tmp_path, on_error="skip")
    assert len(rs) == 1 and rs.skips.counts == {"corrupt_image": 2}
    with pytest.raises(DataError, match="empty dataset: no records"):
        read_image_folder(tmp_path, classes=["cls_b"], on_error="skip")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        read_image_folder(tmp_path / "empty")


def test_header_only_check_defers_truncation_to_load(tmp_path):
    truncate_file(write_image(tmp_path / "c" / "0.png", 64, 64, 3), keep_fraction=0.6)
    rs = read_image_folder(tmp_path, verify_images=False)  # header is intact
    assert len(rs) == 1
    with pytest.raises(DataError, match="0.png"):
        load_image(rs[0].images[0])
    with pytest.raises(DataError):
        read_image_folder(tmp_path, verify_images=True)


def _coco(tmp_path, bboxes, cats=({"id": 1, "name": "a"},)):
    write_image(tmp_path / "0.png", 50, 40, 0)
    anns = [
        {"id": i, "image_id": 0, "category_id": 1, "bbox": b, "iscrowd": 0, "area": 1.0} for i, b in enumerate(bboxes)
    ]
    data = {
        "images": [{"id": 0, "file_name": "0.png", "width": 50, "height": 40}],
        "annotations": anns,
        "categories": list(cats),
    }
    path = tmp_path / "a.json"
    path.write_text(json.dumps(data))
    return path


def test_coco_out_of_bounds_clip_or_error_and_degenerate(tmp_path):
    path = _coco(tmp_path, [[40.0, 30.0, 20.0, 20.0], [1.0, 1.0, 5.0, 5.0]])  # first leaves the image
    rs = read_coco_detection(path, tmp_path, box_space="norm_1000")
    np.testing.assert_allclose(sorted(rs[0].ground_truth.boxes.tolist()), [[1, 1, 6, 6], [40, 30, 50, 40]])
    assert rs.skips.counts == {"box_clipped": 1}
    with pytest.raises(DataError, match=r"a.json: image id 0 \(a\).*outside the image"):
        read_coco_detection(path, tmp_path, box_space="norm_1000", out_of_bounds="error")
    path = _coco(tmp_path, [[10.0, 10.0, 0.0, 5.0], [1.0, 1.0, 5.0, 5.0]])  # zero-width box
    with pytest.raises(DataError, match="degenerate"):
        read_coco_detection(path, tmp_path, box_space="norm_1000")
    rs = read_coco_detection(path, tmp_path, box_space="norm_1000", on_error="skip")
    assert len(rs[0].ground_truth.boxes) == 1 and rs.skips.counts == {"degenerate_box": 1}
    path = _coco(tmp_path, [[10.0, 10.0, 0.0, 5.0]])  # the only box is degenerate: record skipped
    with pytest.raises(DataError, match="empty dataset"):
        read_coco_detection(path, tmp_path, box_space="norm_1000", on_error="skip")


def test_bad_annotation_files(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="broken.json"):
        read_coco_detection(bad, tmp_path, box_space="norm_1000")
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(DataError, match="missing list 'annotations'"):
        read_coco_detection(bad, tmp_path, box_space="norm_1000")
    path = _coco(tmp_path, [[1.0, 1.0, 5.0, 5.0]], cats=({"id": 1, "name": "a"}, {"id": 2, "name": "b"}))
    rs = read_coco_detection(path, tmp_path, box_space="norm_1000")
    assert rs.skips.counts == {"category_without_examples": 1}  # "b" has no annotation: reported
    with pytest.raises(DataError, match="not found"):
        read_lisa_grounding(tmp_path / "missing.json", box_space="norm_1000")
    lisa = tmp_path / "l.json"
    lisa.write_text(
        json.dumps(
            [
                {"image": "0.png", "query": "", "box": [1, 2, 3, 4]},
                {"image": "0.png", "query": "ok", "box": [1, 2, 3, 4]},
                {"image": "zz.png", "query": "ok", "box": [1, 2, 3, 4]},
            ]
        )
    )
    with pytest.raises(DataError, match=r"l.json\[0\]: 'query' must be"):
        read_lisa_grounding(lisa, box_space="norm_1000")
    rs = read_lisa_grounding(lisa, box_space="norm_1000", on_error="skip")
    assert len(rs) == 1 and rs.skips.counts == {"bad_annotation": 1, "missing_image": 1}
    assert "zz.png" in rs.skips.summary() or any("id 2" in n for n in rs.skips.examples["missing_image"])
    with pytest.raises(ValueError, match="on_error"):
        read_lisa_grounding(lisa, box_space="norm_1000", on_error="ignore")


def test_processor_rejection_becomes_a_named_data_error(tmp_path):
    proc = tiny_processor(max_pixels=28 * 28 * 16)
    thin = write_image(tmp_path / "thin.png", 1000, 4, seed=0)  # aspect ratio 250 > 200
    rec = VisualRecord(
        source_id="r-thin",
        task="classification",
        images=[thin],
        problem="p",
        ground_truth=GroundTruth(label="x"),
    )
    with pytest.raises(DataError, match="r-thin: the image processor rejected .*thin.png"):
        preprocess_records([rec], proc)
    with pytest.raises(DataError, match="no records left"):
        preprocess_records([rec], proc, on_error="skip")


def test_raise_or_skip_is_the_one_on_error_decision():
    from megatron_vrft.data.errors import DEGENERATE_BOX, SkipCounts, raise_or_skip

    error = DataError("a.json: row 3: 2 degenerate box(es)", DEGENERATE_BOX)
    with pytest.raises(DataError, match="row 3") as err:
        raise_or_skip("raise", SkipCounts(), error, "a.json: row 3")
    assert err.value is error
    skips = SkipCounts()
    assert raise_or_skip("skip", skips, error, "a.json: row 3", count=2, skip_message="box dropped") is None
    assert skips.counts == {DEGENERATE_BOX: 2} and skips.examples[DEGENERATE_BOX][0] == "a.json: row 3"
