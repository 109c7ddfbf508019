"""Every reader on small fixtures written in tmp_path."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from data_test_helpers import random_image, write_image

from megatron_vrft.data import (
    DataError,
    EncodedImage,
    load_image,
    read_coco_detection,
    read_image_folder,
    read_lisa_grounding,
    read_visual_rft,
)
from megatron_vrft.data.readers import infer_task, parse_visual_rft_solution

# ---------------------------------------------------------------- Visual-RFT table


def _png_bytes(w, h, seed):
    buf = io.BytesIO()
    random_image(w, h, seed).save(buf, format="PNG")
    return buf.getvalue()


DET_PROBLEM = (
    "Detect all objects belonging to the category 'bird' in the image, and provide the bounding "
    "boxes (between 0 and 1000, integer) and confidence (between 0 and 1, with two decimal places)."
)
ROWS = [
    (
        "This is an image containing a plant. Please identify the species.",
        "<answer>wall flower</answer>",
    ),
    (
        DET_PROBLEM,
        "<answer>[{'Position': [100, 200, 300, 400], 'Confidence': 1}, "
        "{'Position': [500, 510, 900, 1000], 'Confidence': 1}]</answer>",
    ),
    (DET_PROBLEM, "<answer>No Objects</answer>"),
    ("Output the bounding box ... the dog", "<answer>(10,20),(300,400)</answer>"),
    ("Output the bounding box ... the cat", "<answer>[1, 2, 3, 4]</answer>"),
]


def _visual_rft_table(n_rows=5):
    import datasets

    feats = datasets.Features(
        {
            "image": datasets.Image(),
            "problem": datasets.Value("string"),
            "solution": datasets.Value("string"),
        }
    )
    data = {
        "image": [{"bytes": _png_bytes(40 + i, 30 + i, i), "path": None} for i in range(n_rows)],
        "problem": [p for p, _ in ROWS[:n_rows]],
        "solution": [s for _, s in ROWS[:n_rows]],
    }
    return datasets.Dataset.from_dict(data, features=feats)


def _check_visual_rft(rs):
    assert [r.task for r in rs] == [
        "classification",
        "detection",
        "detection",
        "grounding",
        "grounding",
    ]
    assert rs[0].ground_truth.label == "wall flower"
    det = rs[1].ground_truth
    np.testing.assert_array_equal(det.boxes, [[100, 200, 300, 400], [500, 510, 900, 1000]])
    assert det.categories == ("bird", "bird") and det.coord_space == "norm_1000"
    assert rs[1].query == "bird" and rs[1].problem == DET_PROBLEM
    assert rs[2].ground_truth.boxes.shape == (0, 4) and rs[2].query == "bird"
    np.testing.assert_array_equal(rs[3].ground_truth.box, [10, 20, 300, 400])
    np.testing.assert_array_equal(rs[4].ground_truth.box, [1, 2, 3, 4])
    for i, r in enumerate(rs):
        assert r.image_size == (40 + i, 30 + i)
        assert load_image(r.images[0]).size == (40 + i, 30 + i)
        assert isinstance(r.images[0], EncodedImage)


def test_visual_rft_save_to_disk_parquet_and_dataset_dict(tmp_path):
    import datasets

    ds = _visual_rft_table()
    ds.save_to_disk(str(tmp_path / "saved"))
    _check_visual_rft(read_visual_rft(tmp_path / "saved", coord_space="norm_1000"))

    (tmp_path / "hub" / "data").mkdir(parents=True)
    ds.to_parquet(str(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet"))
    _visual_rft_table(1).to_parquet(str(tmp_path / "hub" / "data" / "test-00000-of-00001.parquet"))
    _check_visual_rft(read_visual_rft(tmp_path / "hub", coord_space="norm_1000"))
    assert len(read_visual_rft(tmp_path / "hub", coord_space="norm_1000", split="test")) == 1
    _check_visual_rft(
        read_visual_rft(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet", coord_space="norm_1000")
    )

    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dd"))
    _check_visual_rft(read_visual_rft(tmp_path / "dd", coord_space="norm_1000"))
    with pytest.raises(DataError, match="no split 'val'"):
        read_visual_rft(tmp_path / "dd", coord_space="norm_1000", split="val")


def test_visual_rft_image_paths_and_forced_task(tmp_path):
    import datasets

    write_image(tmp_path / "imgs" / "a.png", 50, 40, 0)
    ds = datasets.Dataset.from_dict(
        {"image": ["imgs/a.png"], "problem": ["p"], "solution": ["<answer>[5, 6, 45, 35]</answer>"]}
    )
    ds.save_to_disk(str(tmp_path / "t"))
    rs = read_visual_rft(tmp_path / "t", coord_space="pixels_original", image_root=tmp_path)
    assert rs[0].task == "grounding" and rs[0].images[0] == tmp_path / "imgs" / "a.png"
    rs = read_visual_rft(tmp_path / "t", coord_space="pixels_original", image_root=tmp_path, task="classification")
    assert rs[0].ground_truth.label == "[5, 6, 45, 35]"


def test_visual_rft_bad_solution_raises_or_counts(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict(
        {
            "image": [{"bytes": _png_bytes(20, 20, 1), "path": None}] * 2,
            "problem": ["p", "p"],
            "solution": [
                "<answer>[{'Position': [1, 2, 3, 4], 'Confidence': 1}]</answer>",
                "<answer>[{'Position': [1, 2], 'Confidence': 1}]</answer>",
            ],
        },
        features=_visual_rft_table(1).features,
    )
    ds.save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(DataError, match=r"bad\[train\]\[1\].*4-number position"):
        read_visual_rft(tmp_path / "bad", coord_space="norm_1000", task="detection")
    rs = read_visual_rft(tmp_path / "bad", coord_space="norm_1000", task="detection", on_error="skip")
    assert len(rs) == 1 and rs.skips.counts == {"unparseable_solution": 1}


def test_solution_parsing_variants():
    assert infer_task("<answer>Boeing 737-800</answer>") == "classification"
    assert infer_task("[]") == "detection"
    assert infer_task("<answer>(1,2),(3,4)</answer>") == "grounding"
    gt = parse_visual_rft_solution(
        '<answer>[{"position": [1, 2, 3, 4], "confidence": 0.5, "label": "cat"}]</answer>',
        task="detection",
        problem="no category here",
        coord_space="pixels_resized",
    )
    assert gt.categories == ("cat",) and gt.coord_space == "pixels_resized"
    with pytest.raises(DataError, match="not one box"):
        parse_visual_rft_solution("<answer>[1, 2, 3]</answer>", task="grounding", problem="", coord_space="norm_1000")


# ---------------------------------------------------------------- COCO / LVIS

CATS = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 7, "name": "kite"}]


def _write_coco(tmp_path, n_images=8, seed=0, lvis=False):
    rng = np.random.default_rng(seed)
    images, anns = [], []
    for i in range(n_images):
        w, h = int(rng.integers(60, 120)), int(rng.integers(50, 100))
        fname = f"{i:06d}.jpg"
        write_image(tmp_path / "images" / fname, w, h, seed=i)
        img = {"id": 100 + i, "width": w, "height": h}
        img.update({"coco_url": f"http://x/val/{fname}"} if lvis else {"file_name": fname})
        images.append(img)
        for _ in range(int(rng.integers(1, 4))):
            cat = CATS[int(rng.integers(len(CATS)))]["id"]
            x, y = float(rng.uniform(0, w - 10)), float(rng.uniform(0, h - 10))
            bw, bh = float(rng.uniform(2, w - x)), float(rng.uniform(2, h - y))
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": 100 + i,
                    "category_id": cat,
                    "bbox": [x, y, bw, bh],
                    "area": bw * bh,
                    "iscrowd": 0,
                }
            )
    data = {"images": images, "annotations": anns, "categories": CATS}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path, data


def _expected_boxes(data, image_id, cat_ids):
    name = {c["id"]: c["name"] for c in data["categories"]}
    out = [
        (
            [a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]],
            name[a["category_id"]],
        )
        for a in data["annotations"]
        if a["image_id"] == image_id and a["category_id"] in cat_ids and not a["iscrowd"]
    ]
    return out


@pytest.mark.parametrize("lvis", [False, True])
def test_coco_reader_boxes_categories_and_prompts(tmp_path, lvis):
    path, data = _write_coco(tmp_path, lvis=lvis)
    rs = read_coco_detection(path, tmp_path / "images", box_space="norm_1000")
    pairs = {(a["image_id"], a["category_id"]) for a in data["annotations"]}
    assert len(rs) == len(pairs)
    name_to_id = {c["name"]: c["id"] for c in CATS}
    for r in rs:
        img_id = r.metadata["image_id"]
        (cat_id,) = r.metadata["category_ids"]
        exp = _expected_boxes(data, img_id, {cat_id})
        order = np.lexsort(np.asarray([b for b, _ in exp]).T[::-1])
        got = r.ground_truth.boxes[np.lexsort(r.ground_truth.boxes.T[::-1])]
        np.testing.assert_allclose(got, np.asarray([exp[i][0] for i in order]), atol=1e-9)
        assert set(r.ground_truth.categories) == {r.query} and name_to_id[r.query] == cat_id
        assert f"category '{r.query}'" in r.problem and "between 0 and 1000" in r.problem
        img = next(i for i in data["images"] if i["id"] == img_id)
        assert r.image_size == (img["width"], img["height"])


def test_coco_group_by_image_subsets_and_crowd(tmp_path):
    path, data = _write_coco(tmp_path)
    data["annotations"].append(
        {
            "id": 999,
            "image_id": 100,
            "category_id": 1,
            "bbox": [1, 1, 5, 5],
            "area": 25,
            "iscrowd": 1,
        }
    )
    path.write_text(json.dumps(data))
    rs = read_coco_detection(
        path,
        tmp_path / "images",
        box_space="pixels_resized",
        group_by="image",
        exclude_categories=["kite"],
    )
    for r in rs:
        assert 7 not in r.metadata["category_ids"]
        exp = _expected_boxes(data, r.metadata["image_id"], set(r.metadata["category_ids"]))
        assert len(r.ground_truth.boxes) == len(exp)
        assert sorted(r.ground_truth.categories) == sorted(c for _, c in exp)
        if len(r.metadata["category_ids"]) > 1:
            assert "'Label'" in r.problem
    assert 999 not in [a for r in rs for a in r.metadata["annotation_ids"]]
    crowd = read_coco_detection(path, tmp_path / "images", box_space="norm_1000", categories=[1], include_crowd=True)
    assert 999 in [a for r in crowd for a in r.metadata["annotation_ids"]]
    only = read_coco_detection(path, tmp_path / "images", box_space="norm_1000", categories=["car", 7])
    assert {c for r in only for c in r.metadata["category_ids"]} <= {3, 7}
    with pytest.raises(DataError, match="unknown categories \\['zebra'\\]"):
        read_coco_detection(path, tmp_path / "images", box_space="norm_1000", categories=["zebra"])
    with pytest.raises(DataError, match="empty category selection"):
        read_coco_detection(
            path,
            tmp_path / "images",
            box_space="norm_1000",
            categories=["car"],
            exclude_categories=[3],
        )


def test_coco_crowd_regions_kept_apart_from_training_boxes(tmp_path):
    from megatron_vrft.data import SkipCounts
    from megatron_vrft.data.records import GroundTruth, check_ground_truth_boxes

    path, data = _write_coco(tmp_path)
    before = read_coco_detection(path, tmp_path / "images", box_space="norm_1000")
    before_by_image = read_coco_detection(path, tmp_path / "images", box_space="norm_1000", group_by="image")
    # image 100: a crowd region of a category it has objects of (a), and one of a category it has none of (b)
    present = {a["category_id"] for a in data["annotations"] if a["image_id"] == 100}
    cat_a = min(present)
    cat_b = next(c["id"] for c in CATS if c["id"] not in present)
    crowd_a, crowd_b = [2.0, 3.0, 40.0, 30.0], [5.0, 1.0, 50.0, 60.0]  # xywh; b leaves the image: kept as is
    for ann_id, cat, bbox in ((900, cat_a, crowd_a), (901, cat_b, crowd_b)):
        data["annotations"].append(
            {"id": ann_id, "image_id": 100, "category_id": cat, "bbox": bbox, "area": 1.0, "iscrowd": 1}
        )
    path.write_text(json.dumps(data))
    name = {c["id"]: c["name"] for c in CATS}
    xyxy = lambda b: [b[0], b[1], b[0] + b[2], b[1] + b[3]]  # noqa: E731

    rs = read_coco_detection(path, tmp_path / "images", box_space="norm_1000")
    # the crowd-only (image, category) pair is no record; the training ground truth is unchanged
    assert [r.source_id for r in rs] == [r.source_id for r in before]
    for old, r in zip(before, rs):
        np.testing.assert_array_equal(r.ground_truth.boxes, old.ground_truth.boxes)
        assert r.ground_truth.categories == old.ground_truth.categories
        if r.metadata["image_id"] == 100 and r.metadata["category_ids"] == [cat_a]:
            np.testing.assert_array_equal(r.ground_truth.crowd_boxes, [xyxy(crowd_a)])
            assert r.ground_truth.crowd_categories == (name[cat_a],)
            assert r.metadata["crowd_annotation_ids"] == [900] and 900 not in r.metadata["annotation_ids"]
        else:
            assert r.ground_truth.crowd_boxes.shape == (0, 4) and r.ground_truth.crowd_categories == ()

    # one record per image: the crowd regions of every selected category on it
    by_image = read_coco_detection(path, tmp_path / "images", box_space="norm_1000", group_by="image")
    assert [r.source_id for r in by_image] == [r.source_id for r in before_by_image]
    (r100,) = [r for r in by_image if r.metadata["image_id"] == 100]
    np.testing.assert_array_equal(r100.ground_truth.crowd_boxes, [xyxy(crowd_a), xyxy(crowd_b)])
    assert r100.ground_truth.crowd_categories == (name[cat_a], name[cat_b])
    assert cat_b not in r100.metadata["category_ids"]
    (old100,) = [r for r in before_by_image if r.metadata["image_id"] == 100]
    np.testing.assert_array_equal(r100.ground_truth.boxes, old100.ground_truth.boxes)
    excluded = read_coco_detection(
        path, tmp_path / "images", box_space="norm_1000", group_by="image", exclude_categories=[cat_b]
    )
    (r100,) = [r for r in excluded if r.metadata["image_id"] == 100]
    assert r100.ground_truth.crowd_categories == (name[cat_a],)

    # the crowd regions survive the box checks of preprocessing (unclipped)
    checked = check_ground_truth_boxes(
        r100.ground_truth, width=10, height=10, out_of_bounds="clip", on_error="skip", name="x", skips=SkipCounts()
    )
    np.testing.assert_array_equal(checked.crowd_boxes, r100.ground_truth.crowd_boxes)
    assert checked.crowd_categories == r100.ground_truth.crowd_categories
    # include_crowd=True: the old behaviour, crowd boxes are ordinary boxes
    legacy = read_coco_detection(path, tmp_path / "images", box_space="norm_1000", include_crowd=True)
    assert all(r.ground_truth.crowd_boxes.shape == (0, 4) for r in legacy)
    assert 900 in [a for r in legacy for a in r.metadata["annotation_ids"]]

    # a bad crowd box fails its record like a bad box
    data["annotations"][-1]["bbox"] = [5.0, 1.0, -3.0, 6.0]
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match="bad crowd 'bbox'"):
        read_coco_detection(path, tmp_path / "images", box_space="norm_1000", group_by="image")
    skipped = read_coco_detection(path, tmp_path / "images", box_space="norm_1000", group_by="image", on_error="skip")
    assert len(skipped) == len(before_by_image) - 1 and skipped.skips.counts["bad_annotation"] == 1
    with pytest.raises(ValueError, match="1 crowd boxes but 0 crowd category names"):
        GroundTruth(boxes=np.zeros((0, 4)), crowd_boxes=np.ones((1, 4)), coord_space="pixels_original")
    assert GroundTruth(boxes=np.zeros((0, 4)), coord_space="pixels_original").crowd_boxes is None
    with pytest.raises(ValueError, match=r"ground_truth\.coord_space: .*required with boxes"):
        GroundTruth(boxes=np.zeros((0, 4)))


# ---------------------------------------------------------------- image folder


def test_image_folder_labels_and_prompt(tmp_path):
    for c, cls in enumerate(["black_footed_albatross", "wallflower"]):
        for i in range(3):
            write_image(tmp_path / cls / f"{i}.png", 30 + i, 20 + c, seed=10 * c + i)
    (tmp_path / "wallflower" / "notes.txt").write_text("not an image")
    rs = read_image_folder(tmp_path, object_type="bird", attribute="species", synonyms={"wallflower": ["erysimum"]})
    assert len(rs) == 6
    labels = [r.ground_truth.label for r in rs]
    assert labels == ["black footed albatross"] * 3 + ["wallflower"] * 3
    assert rs[3].ground_truth.synonyms == ("erysimum",)
    assert rs[0].image_size == (30, 20) and rs[5].image_size == (32, 21)
    assert "This is an image containing a bird. Please identify the species of the bird" in rs[0].problem
    rs2 = read_image_folder(tmp_path, classes=["wallflower"], label_map={"wallflower": "wall flower"})
    assert {r.ground_truth.label for r in rs2} == {"wall flower"}
    with pytest.raises(DataError, match="unknown class folders"):
        read_image_folder(tmp_path, classes=["zebra"])


# ---------------------------------------------------------------- LISA-style grounding


def test_lisa_reader_schema(tmp_path):
    write_image(tmp_path / "a.jpg", 80, 60, 1)
    write_image(tmp_path / "sub" / "b.png", 50, 50, 2)
    entries = [
        {"id": "x1", "image": "a.jpg", "query": "the thing that flies", "box": [10, 5, 40, 30]},
        {
            "image": "sub/b.png",
            "query": ["what keeps you dry?", "the umbrella"],
            "box": [5, 5, 20, 10],
            "box_format": "xywh",
            "image_size": [50, 50],
        },
        {
            "image": str(tmp_path / "a.jpg"),
            "query": "normalised",
            "box": [0.5, 0.5, 1.0, 1.0],
            "coord_space": "norm_1",
        },
    ]
    path = tmp_path / "lisa.json"
    path.write_text(json.dumps({"entries": entries}))
    rs = read_lisa_grounding(path, box_space="norm_1000")
    assert len(rs) == 4 and all(r.task == "grounding" for r in rs)
    np.testing.assert_array_equal(rs[0].ground_truth.box, [10, 5, 40, 30])
    assert rs[0].query == "the thing that flies" and "the thing that flies" in rs[0].problem
    assert "between 0 and 1000" in rs[0].problem
    assert [r.query for r in rs[1:3]] == ["what keeps you dry?", "the umbrella"]
    np.testing.assert_array_equal(rs[1].ground_truth.box, [5, 5, 25, 15])
    assert rs[3].ground_truth.coord_space == "norm_1" and rs[3].image_size == (80, 60)
    path.write_text(json.dumps(entries))  # bare list works too
    assert len(read_lisa_grounding(path, box_space="norm_1000")) == 4

    path.write_text(json.dumps([{"image": "a.jpg", "query": "q", "bbox": [1, 2, 3, 4]}]))
    with pytest.raises(DataError, match=r"lisa.json\[0\]: unknown keys \['bbox'\]"):
        read_lisa_grounding(path, box_space="norm_1000")
    path.write_text(json.dumps([{"image": "a.jpg", "query": "q", "box": [1, 2, 3, 4], "image_size": [81, 60]}]))
    with pytest.raises(DataError, match="differs"):
        read_lisa_grounding(path, box_space="norm_1000")
